"""search/optuna_search.py with a real Optuna TPE sampler (no Ray cluster: the searcher is driven directly, as
Tune's controller drives it): a trial whose batch did not fit is told to the study with its memory
constraint, which TPE's `constraints_func` reads; a scheduler-stopped trial is PRUNED."""

from __future__ import annotations

import warnings

import optuna
from ray import tune

from search.optuna_search import PruningAwareOptunaSearch, memory_constraint


def _searcher() -> PruningAwareOptunaSearch:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=0, constraints_func=memory_constraint, n_startup_trials=2)
    return PruningAwareOptunaSearch(space={"lr": tune.loguniform(1e-3, 1e-1), "batch_size": tune.choice([2, 4, 8])},
                                    metric="cv_score", mode="max", sampler=sampler)


def test_an_infeasible_trial_reaches_the_study_with_its_memory_constraint() -> None:
    searcher = _searcher()
    for trial_id in ("big", "fits", "stopped"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_complete("big", {"cv_score": 0.0, "finished": 1, "infeasible": 1, "memory_excess": 0.5})
    searcher.on_trial_complete("fits", {"cv_score": 0.3, "finished": 1, "memory_probe_peak_mb": 900.0})
    searcher.on_trial_complete("stopped", {"cv_score": 0.1, "finished": 0})

    big, fits, stopped = searcher._ot_study.trials
    states = [t.state for t in (big, fits, stopped)]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.PRUNED]
    # TPESampler.after_trial stored what memory_constraint read: > 0 infeasible, <= 0 feasible.
    assert big.system_attrs["constraints"] == (0.5,) and big.user_attrs["memory_excess"] == 0.5
    assert fits.system_attrs["constraints"] == (-1.0,)
    # The sampler keeps going on the rest of the study (the constrained TPE path, past its startup trials).
    assert searcher.suggest("next") is not None
