"""The one reader of an experiment's trials: `detsweep status`, the ensemble job, the report and export-best.

Everything comes from Tune's own record of the local experiment folder `<experiment>/tune` (an experiment on
S3 is mirrored there first, `search.storage.Experiment.pull`): `ExperimentAnalysis` gives each trial's status,
config, latest checkpoint and error, and its `result.json` rows (one per `tune.report`), for a finished sweep
or one still running.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detection.config import ConfigError
from search.formatting import finite_float

__all__ = ["TrialResult", "error_line", "read_trials"]

_STATE_READS = 3  # the state file may be half-written while the sweep runs: read it again


@dataclass(frozen=True)
class TrialResult:
    """One Tune trial as Tune recorded it.

    Attributes:
        trial_id: Tune's trial id (also the name of `ensemble/<trial_id>.json`).
        status: Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR.
        folder: the trial folder under `<experiment>/tune` (result.json, error.txt, checkpoint_<n>/).
        params: the trial config ("detector", "lr", "batch_size", "score_threshold", ...).
        rows: one dict per `tune.report`, in order (`training_iteration`, `epoch`, `cv_score`, `score_mean`,
            `fold<k>/score`, ...; a key another row has and this one lacks is NaN).
        checkpoint: the latest checkpoint Tune registered (so complete: Tune records a checkpoint only after
            it is persisted), or None before the first one.
        error: `<type>: <message>` of the exception that ended an ERROR trial, else None.
    """

    trial_id: str
    status: str
    folder: Path
    params: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    error: str | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The latest report ({} before the first)."""
        return self.rows[-1] if self.rows else {}

    @property
    def cv_score(self) -> float | None:
        """The max over the reported `cv_score`s (the fold mean of each fold's best-epoch score, what the search is
        told). A fold's best score never falls, so this is the latest report's unless a resumed trial reran
        epochs differently; the max is what the ensemble job always read."""
        scores = [v for v in (finite_float(r.get("cv_score")) for r in self.rows) if v is not None]
        return max(scores) if scores else None

    @property
    def epochs(self) -> int:
        """Reports so far (Tune's `training_iteration`; an infeasible trial's one report counts)."""
        return max((int(r.get("training_iteration", 0) or 0) for r in self.rows), default=0)

    @property
    def infeasible(self) -> str | None:
        """Why the trial's batch did not fit (its only report says `infeasible`, trainables/trial.py), else None."""
        if finite_float(self.last.get("infeasible")):  # NaN in a table of rows that lack it
            return str(self.last.get("infeasible_reason") or "its batch does not fit in memory")
        return None

    @property
    def error_file_line(self) -> str | None:
        """The last line of the trial's error.txt (200 characters; what `detsweep status` prints)."""
        path = self.folder / "error.txt"
        if not path.is_file():
            return None
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return lines[-1][:200] if lines else None

    def series(self, key: str) -> np.ndarray:
        """float64 [E]: `key` per report (NaN where missing)."""
        return np.array([_number(r.get(key)) for r in self.rows], dtype=np.float64)

    @property
    def num_folds(self) -> int:
        return len({k for r in self.rows for k in r if k.startswith("fold") and k.endswith("/score")})


def read_trials(tune_dir: str | Path) -> list[TrialResult]:
    """Every trial of the Tune experiment folder `tune_dir`, by trial id (no Ray cluster needed); none when the
    folder does not exist yet.

    Raises:
        ConfigError: when `tune_dir` holds no readable Tune experiment state.
    """
    from ray.tune import ExperimentAnalysis

    tune_dir = Path(tune_dir).resolve()
    if not tune_dir.is_dir():
        return []
    # Trials that have not reported yet have no result.json: not worth a warning here.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    for attempt in range(_STATE_READS):
        try:
            analysis = ExperimentAnalysis(str(tune_dir))
            break
        except (ValueError, OSError) as error:
            if attempt == _STATE_READS - 1:
                raise ConfigError(f"{tune_dir}: cannot read the Tune experiment state: {error}") from error
            time.sleep(1.0)
    frames = analysis.trial_dataframes
    trials = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows = frame.to_dict("records") if frame is not None and len(frame) else []
        last = dict(trial.last_result or {})
        # result.json is appended on every report, the state saved every few seconds: the newer one is last.
        if last and (not rows or int(last.get("training_iteration", 0)) > int(rows[-1].get("training_iteration", 0))):
            rows.append(last)
        checkpoint = trial.checkpoint
        trials.append(TrialResult(
            trial_id=trial.trial_id, status=trial.status, folder=Path(trial.storage.trial_fs_path),
            params=dict(trial.config or {}), rows=rows,
            checkpoint=Path(checkpoint.path) if checkpoint is not None else None,
            error=_trial_error(trial) if trial.status == "ERROR" else None,
        ))
    return sorted(trials, key=lambda t: t.trial_id)


def error_line(error: BaseException) -> str:
    """`<type>: <message on one line>` of the error a Ray task or trial raised (RayTaskError wraps it as `.cause`)."""
    cause = getattr(error, "cause", None) or error
    message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return f"{type(cause).__name__}: {message}"[:300]


def _trial_error(trial: Any) -> str:
    """`<type>: <message>` of the exception that ended an errored trial (e.g. `TrialFailed: fold 1: non-finite
    loss in train: ...`), from Tune's pickled error, else the last line of its error.txt."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an error that cannot be unpickled here: fall back to the text
        error = None
    if error is not None:
        return error_line(error)
    text = trial.get_error() or ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "errored (no error file)"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
