"""The sweep's storage budget for checkpoints, applied by a Tune callback as trials end.

A running trial keeps what a resume needs (Tune's CheckpointConfig in `search.tuner.build_run_config`: the
latest checkpoint and the latest with fold resume states). Once a trial has ended (finished, stopped early by
the scheduler), `CheckpointBudget`:

- deletes its fold resume states (`folds/`, the bulk: model + optimizer + scaler per fold): an ended trial is
  never resumed;
- deletes the fold models (`best/rank-*.pt`) of every checkpoint but its latest (the one the ensemble job
  reads), so no model is stored twice;
- keeps the latest checkpoint's fold models only for the best `checkpoint.keep_trials` ended trials by the
  search metric (the CV score): the trials in the running for the final ensemble. A trial that falls out of
  that top loses its fold models; its checkpoint keeps best.json, the out-of-fold predictions, trial.json and
  a `best/removed.json` saying why, which the ensemble job reports.

So after a sweep the storage holds at most keep_trials x keep_best fold models and no resume states. Files go
through the trial's own storage filesystem (pyarrow.fs: a local folder or a bucket), and every step is
idempotent, so a restored driver simply applies it again.
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from trainables.trial import BEST_DIR, FOLDS_DIR

logger = logging.getLogger(__name__)

__all__ = ["REMOVED_JSON", "CheckpointBudget", "models_removed"]

REMOVED_JSON = "removed.json"  # best/removed.json: why a checkpoint's fold models were deleted
_MODEL_PREFIX, _MODEL_SUFFIX = "rank-", ".pt"  # best/rank-<r>.pt (trainables.trial.write_trial_checkpoint)


def models_removed(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The record `CheckpointBudget` left in a local checkpoint folder whose fold models it deleted, else None."""
    path = Path(checkpoint_dir) / BEST_DIR / REMOVED_JSON
    return json.loads(path.read_text()) if path.is_file() else None


class CheckpointBudget(tune.Callback):
    """See the module docstring. `keep_trials` None keeps every ended trial's fold models."""

    def __init__(self, *, metric: str, mode: str, keep_trials: int | None) -> None:
        self.metric, self.mode, self.keep_trials = metric, mode, keep_trials
        self._removed: set[str] = set()  # trials whose fold models are gone (never back: the top only tightens)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            self._end(trial)
            self._apply_budget(trials, ended=trial)
        except Exception:  # noqa: BLE001 - a storage hiccup costs disk, never the sweep
            logger.warning("checkpoint budget: could not tidy trial %s's checkpoints", trial.trial_id, exc_info=True)

    def _end(self, trial: Any) -> None:
        """Delete the ended trial's resume states, and the fold models of all but its latest checkpoint."""
        fs, latest = trial.storage.storage_filesystem, _latest_path(trial)
        for checkpoint in _checkpoint_dirs(fs, trial.storage.trial_fs_path):
            _delete_dir(fs, posixpath.join(checkpoint, FOLDS_DIR))
            if checkpoint != latest:
                _delete_models(fs, checkpoint)

    def _apply_budget(self, trials: list, *, ended: Any) -> None:
        if self.keep_trials is None:
            return
        scored = [t for t in trials if (t is ended or t.status == "TERMINATED") and _latest_path(t) is not None]
        sign = -1.0 if self.mode == "max" else 1.0
        ranked = sorted(scored, key=lambda t: (sign * _metric(t, self.metric, self.mode), t.trial_id))
        for rank, trial in enumerate(ranked, start=1):
            if rank <= self.keep_trials or trial.trial_id in self._removed:
                continue
            latest = _latest_path(trial)
            fs = trial.storage.storage_filesystem
            _delete_models(fs, latest)
            record = {"reason": f"not among the best {self.keep_trials} ended trials by {self.metric} "
                                f"(checkpoint.keep_trials); ranked {rank} when trial {ended.trial_id} ended",
                      "keep_trials": self.keep_trials, "rank": rank,
                      self.metric: (trial.last_result or {}).get(self.metric)}
            with fs.open_output_stream(posixpath.join(latest, BEST_DIR, REMOVED_JSON)) as out:
                out.write(json.dumps(record, indent=1).encode())
            self._removed.add(trial.trial_id)
            logger.info("checkpoint budget: trial %s's fold models deleted (%s)", trial.trial_id, record["reason"])


def _metric(t: Any, metric: str, mode: str) -> float:
    value = (t.last_result or {}).get(metric)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if value != value:  # a trial without the metric ranks last
        return float("-inf") if mode == "max" else float("inf")
    return value


def _latest_path(trial: Any) -> str | None:
    checkpoint = trial.checkpoint  # the latest registered one (Tune's CheckpointManager)
    return checkpoint.path.rstrip("/") if checkpoint is not None else None


def _checkpoint_dirs(fs: pafs.FileSystem, trial_path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    return [i.path.rstrip("/") for i in infos
            if i.type == pafs.FileType.Directory and posixpath.basename(i.path.rstrip("/")).startswith("checkpoint_")]


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _delete_models(fs: pafs.FileSystem, checkpoint: str) -> None:
    for info in fs.get_file_info(pafs.FileSelector(posixpath.join(checkpoint, BEST_DIR), allow_not_found=True)):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and name.startswith(_MODEL_PREFIX) and name.endswith(_MODEL_SUFFIX):
            fs.delete_file(info.path)
