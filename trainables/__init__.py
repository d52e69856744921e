"""The Ray Tune trainable: one trial trains its K folds in parallel as Ray actors, epoch by epoch.

`trainables.trial.train_trial` is the function trainable (bound with `TrialSetup`, resources from
`trial_resources`); `trainables.fold_worker.FoldWorker` is one fold's actor. Imports point one way:
`search -> trainables -> detection`.
"""

from __future__ import annotations

from trainables.fold_worker import FoldWorker, pick_device, state_from_bytes, state_to_bytes
from trainables.trial import (
    FOLD_METRICS,
    TRIAL_PARAMS,
    BestModel,
    TrialFailed,
    TrialSetup,
    apply_trial_params,
    read_best,
    read_trial_checkpoint,
    train_trial,
    trial_resources,
    write_trial_checkpoint,
)

__all__ = [
    "FOLD_METRICS",
    "TRIAL_PARAMS",
    "BestModel",
    "FoldWorker",
    "TrialFailed",
    "TrialSetup",
    "apply_trial_params",
    "pick_device",
    "read_best",
    "read_trial_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
    "train_trial",
    "trial_resources",
    "write_trial_checkpoint",
]
