"""Ray Tune's OptunaSearch, telling the study which trials a scheduler pruned (imports Ray: load it lazily)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

__all__ = ["PruningAwareOptunaSearch"]


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records a trial stopped by a scheduler (ASHA) as PRUNED, not COMPLETE.

    Tune hands the searcher the last result of a stopped trial as if the trial had completed, and OptunaSearch
    would record that value as COMPLETE. A trial's own last report carries `finished: 1`
    (trainables/trial.py); a last result without it means the trial was ended from outside.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and not result.get("finished", 1):
            result = None  # OptunaSearch records a completion without a value as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)
