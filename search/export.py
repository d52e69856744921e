"""`detsweep export-best PATH --out best.yaml`: the best trial's full training config as a training YAML.

The YAML has the sections of `detection.config.ExperimentConfig` (data, model, train, seed): the sweep's
base config with the best trial's sampled params applied by `trainables.trial.apply_trial_params` (the
one place that maps them), so `detsweep train --config best.yaml --all-data` retrains the winner on
every labelled image, and `--fold K` reproduces one of its folds.

"Best" is the trial of `best_ensemble.json` (the ensemble chosen on the selection split; of a greedy
cross-trial ensemble, the trial of its heaviest model); before the
ensemble job has run, the trial with the best cross-validation metric (`search.metric`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detection.config import ConfigError, ExperimentConfig

__all__ = ["BestTrial", "best_config", "best_trial", "export_best_config"]


@dataclass(frozen=True)
class BestTrial:
    """The chosen trial: its id, sampled params, why it was chosen and its score."""

    trial_id: str
    params: dict[str, Any]
    source: str  # "ensemble" (best_ensemble.json) or "cv" (best `search.metric` of the Tune results)
    score: float | None


def best_trial(experiment_dir: str | Path) -> BestTrial:
    """The best trial of an experiment: the best ensemble's, else the best by the sweep's CV metric.

    Raises:
        ConfigError: when no trial has reported a result yet.
    """
    from search.ensemble import BEST_ENSEMBLE_JSON
    from search.trial_results import read_trials
    from search.tuner import TUNE_DIR, load_experiment

    experiment_dir = Path(experiment_dir).resolve()
    config = load_experiment(experiment_dir)
    runs = {run.trial_id: run for run in read_trials(experiment_dir / TUNE_DIR)}
    best_file = experiment_dir / BEST_ENSEMBLE_JSON
    if best_file.is_file():
        best = json.loads(best_file.read_text())
        # The chosen ensemble's trial; a greedy cross-trial ensemble: the trial of its heaviest model.
        heaviest = max(zip(best["wbf"]["weights"], range(len(best["models"]))), key=lambda wi: (wi[0], -wi[1]))[1]
        trial_id = str(best["models"][heaviest]["trial_id"])
        if trial_id not in runs:
            raise ConfigError(f"{best_file}: names trial {trial_id!r}, but {experiment_dir / TUNE_DIR} has trials "
                              f"{sorted(runs)}.")
        return BestTrial(trial_id=trial_id, params=_params(runs[trial_id].params), source="ensemble",
                         score=(best.get("selection_metrics") or {}).get("score"))
    metric, sign = config.search.metric, (1.0 if config.search.mode == "max" else -1.0)
    scored = [(sign * float(run.last[metric]), run.trial_id) for run in runs.values()
              if run.rows and isinstance(run.last.get(metric), (int, float)) and math.isfinite(run.last[metric])]
    if not scored:
        raise ConfigError(f"{experiment_dir}: no trial has reported `{metric}` yet; nothing to export.")
    _, trial_id = max(scored)
    return BestTrial(trial_id=trial_id, params=_params(runs[trial_id].params), source="cv",
                     score=float(runs[trial_id].last[metric]))


def _params(config: dict[str, Any]) -> dict[str, Any]:
    from trainables.trial import TRIAL_PARAMS

    return {key: config[key] for key in TRIAL_PARAMS if key in config}


def best_config(experiment_dir: str | Path) -> tuple[ExperimentConfig, BestTrial]:
    """(the best trial's validated training config, the trial)."""
    from search.tuner import load_experiment
    from trainables.trial import apply_trial_params

    experiment_dir = Path(experiment_dir).resolve()
    trial = best_trial(experiment_dir)
    sweep = load_experiment(experiment_dir)
    base = sweep.detector_bases.get(trial.params.get("detector"), sweep.base)  # the detector's own keys
    return apply_trial_params(base, trial.params), trial


def export_best_config(experiment_dir: str | Path, out: str | Path) -> Path:
    """Write the best trial's training YAML (loadable by `detection.config.load_experiment_config`).

    Returns the path written. `data.path` is absolute, so the file works from any folder.
    """
    experiment_dir = Path(experiment_dir).resolve()
    config, trial = best_config(experiment_dir)
    score = "n/a" if trial.score is None else f"{trial.score:.4f}"
    which = "chosen ensemble on the selection split" if trial.source == "ensemble" else "best cross-validation score"
    header = (
        f"# detsweep export-best {experiment_dir}\n"
        f"# trial {trial.trial_id} ({which}, score {score}); sampled params: "
        f"{json.dumps(trial.params, sort_keys=True)}\n"
        "# retrain on every labelled image: detsweep train --config THIS_FILE --all-data\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out
