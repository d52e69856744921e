"""`train_trial` under a real `tune.Tuner` on a local Ray: a diverging trial ends as errored with the
reason while the sweep goes on, and a trial whose coordinator dies resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray import tune

from detection.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from detection.data.splits import Split
from search.config import ResourcesConfig
from trainables.trial import TrialFailed, TrialSetup, train_trial, trial_resources

pytestmark = pytest.mark.slow

RESOURCES = ResourcesConfig(cpus_per_fold=0.5, gpus_per_fold=0, coordinator_cpus=0.1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def make_setup(data_path: Path, split: Split, folder: Path, **train: Any) -> TrialSetup:
    base = ExperimentConfig(
        data=DataConfig(path=str(data_path), num_folds=split.num_folds, class_balanced_sampling=False),
        model=ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", pretrained=False),
        train=TrainConfig(**{"image_size": 128, "eval_batch_size": 3, "augment": False, "amp": False,
                             "warmup_epochs": 0.0, **train}),
    ).validate()
    return TrialSetup(base=base, split_path=str(split.to_json(folder / "split.json")), resources=RESOURCES)


def fit(setup: TrialSetup, storage: Path, param_space: dict, *, max_failures: int = 0,
        callbacks: list | None = None) -> tune.ResultGrid:
    num_folds = Split.from_json(setup.split_path).num_folds
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    trial_resources(num_folds, setup.resources))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(
            storage_path=str(storage), name="tune", verbose=0, callbacks=callbacks or [],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    ).fit()


def test_diverging_trial_errors_with_its_reason_and_the_sweep_goes_on(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    # Fold 0 trains on 4 tiles one at a time: 4 iterations, enough for 3 non-finite losses in a row.
    split = Split(holdout=(), folds=((0,), (1, 2, 3, 4)), seed=0)
    setup = make_setup(deepforest_root, split, tmp_path, epochs=1, batch_size=1)
    results = fit(setup, tmp_path, {"lr": tune.grid_search([1e6, 0.01])})

    assert len(results) == 2 and len(results.errors) == 1
    by_lr = {r.config["lr"]: r for r in results}
    error = by_lr[1e6].error
    assert isinstance(error, TrialFailed)  # Ray re-raises the trainable's exception type
    assert "fold 0: non-finite loss in train" in str(error)
    assert error.fold == 0 and error.reason == "non-finite loss"
    assert by_lr[1e6].checkpoint is None  # it failed before its first report
    healthy = by_lr[0.01]
    assert healthy.error is None and healthy.metrics["epoch"] == 1 and healthy.checkpoint is not None


class KillCoordinator(tune.Callback):
    """SIGKILLs the trial's coordinator process once Tune has registered its first checkpoint."""

    def __init__(self) -> None:
        self.killed: int | None = None

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # (Not in on_trial_result: Tune registers a reported checkpoint only after that callback.)
        if self.killed is None and trial.last_result["epoch"] == 1:
            self.killed = int(trial.last_result["coordinator_pid"])
            os.kill(self.killed, signal.SIGKILL)


def test_trial_resumes_from_its_checkpoint_after_its_coordinator_dies(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    split = Split(holdout=(), folds=((0, 1, 2), (3, 4, 5)), seed=0)
    setup = make_setup(deepforest_root, split, tmp_path, epochs=2, batch_size=2)
    killer = KillCoordinator()
    results = fit(setup, tmp_path, {"lr": 0.01}, max_failures=1, callbacks=[killer])

    (result,) = results
    assert killer.killed is not None and result.error is None
    last = result.metrics
    # Tune restarted the trial from the epoch-1 checkpoint: it ran epoch 2 only, in new processes.
    assert (last["epoch"], last["training_iteration"], last["resumed_epoch"]) == (2, 2, 1)
    assert last["coordinator_pid"] != killer.killed
    state = torch.load(Path(result.checkpoint.path) / "folds" / "fold-0.pt", weights_only=True)
    assert state["epoch"] == 2
