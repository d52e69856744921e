"""Ray Tune's OptunaSearch, telling the study which trials a scheduler pruned and which did not fit in memory
(imports Ray: load it lazily)."""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

__all__ = ["MEMORY_EXCESS", "PruningAwareOptunaSearch", "memory_constraint"]

# The trial result key, and the study's user attribute, of the batch-size probe's peak / bound - 1
# (trainables/trial.py): > 0 means the trial's batch did not fit on its device.
MEMORY_EXCESS = "memory_excess"


def memory_constraint(trial: Any) -> tuple[float]:
    """TPESampler's `constraints_func`: feasible (<= 0) unless the trial's probe step did not fit. TPE then ranks
    infeasible trials below every feasible one and samples away from them (Optuna's constrained TPE)."""
    return (float(trial.user_attrs.get(MEMORY_EXCESS, -1.0)),)


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records a trial stopped by a scheduler (ASHA) as PRUNED, not COMPLETE, and a trial whose
    batch did not fit in memory with its constraint.

    Tune hands the searcher the last result of a stopped trial as if the trial had completed, and OptunaSearch
    would record that value as COMPLETE. A trial's own last report carries `finished: 1`
    (trainables/trial.py); a last result without it means the trial was ended from outside. An infeasible
    trial reports the metric's worst value with `memory_excess` > 0; the excess goes into the study's trial
    before it is told, where the sampler's `memory_constraint` reads it.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and not result.get("finished", 1):
            result = None  # OptunaSearch records a completion without a value as PRUNED
        ot_trial = self._ot_trials.get(trial_id)
        if result and MEMORY_EXCESS in result and ot_trial is not None:
            ot_trial.set_user_attr(MEMORY_EXCESS, float(result[MEMORY_EXCESS]))
        super().on_trial_complete(trial_id, result=result, error=error)
