"""What a failed trial means for the sweep: retry it, end it, or stop the whole sweep.

Ray Tune 2.60 decides a retry before any user code sees the failure: `TuneController._process_trial_failure`
counts it (`Trial.handle_error`) and requeues the trial while `num_failures <= FailureConfig.max_failures`
(`Trial.should_recover`), then calls `Callback.on_trial_recover`; otherwise it errors the trial and calls
`Callback.on_trial_error`. Tune has no per-exception policy, so `FailurePolicy` (a Tune Callback) reads the
failure the trial raised (`trainables.trial.TrialFailed`, pickled by Tune beside the trial) and acts on it:

- a data error (`reason == DATA_ERROR`: a `DatasetError` in a fold worker, e.g. a file changed after the
  driver's check) stops the sweep at once, through Tune's own graceful stop (the SIGUSR1 that `tune.run`
  handles like Ctrl-C): no retry and no further trial starts; Tune saves the experiment state, trials that
  finished keep their results, and the one that met the bad file stays pending (errored under
  `failure.max_failures: 0`), so `detsweep resume` continues it once the data is fixed. `take_stop` hands
  the reason to the CLI (exit status 2). (Tuner.restore brings back the pickled callback, so the record is
  kept in this module, not in the callback object the CLI never sees.)
- a deterministic failure (`TrialFailed.retryable` is false: non-finite loss, CUDA out of memory, a worker
  that cannot start, ...) that Tune requeued anyway is refused: the policy records it in Ray's internal KV
  store and sets the trial's `max_failures` to its failure count, and `refuse_retry` (first thing in the
  restarted trainable) raises it again before any fold worker is built. So no epoch runs again from the same
  state, and the refusal ends the trial as errored.
- anything else (a lost coordinator or node, fold workers lost too often, host memory pressure) is Tune's
  to retry as `failure.max_failures` says.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import cloudpickle
from ray import tune
from ray.experimental import internal_kv

from trainables.trial import DATA_ERROR, TrialFailed

logger = logging.getLogger(__name__)

__all__ = ["FailurePolicy", "refuse_retry", "take_stop", "trial_failure"]

_KV_NAMESPACE = "detsweep"
_stops: list[dict[str, str]] = []  # {"reason", "trial_id", "message"}: why FailurePolicy stopped the sweep


def trial_failure(error: BaseException | None) -> TrialFailed | None:
    """The `TrialFailed` behind what Tune recorded for a trial (a RayTaskError wrapping it), else None."""
    # The cause first: Ray's RayTaskError(TrialFailed) is a TrialFailed too, but its text is the traceback.
    for candidate in (getattr(error, "cause", None), error):
        if isinstance(candidate, TrialFailed):
            return candidate
    return None


def _last_error(trial: Any) -> BaseException | None:
    path = trial.pickled_error_file  # the driver's own copy, written by Trial.handle_error just now
    if not path or not Path(path).is_file():
        return None
    try:
        with open(path, "rb") as handle:
            return cloudpickle.load(handle)
    except Exception:  # noqa: BLE001 - an unreadable error file: Tune's own policy applies
        logger.warning("trial %s: cannot read its error file %s", trial.trial_id, path, exc_info=True)
        return None


def _kv_key(trial_id: str) -> bytes:
    return f"refused/{trial_id}".encode()


def refuse_retry(trial_id: str) -> None:
    """Raise the deterministic failure a trial met earlier in this Ray session, if any (see the module
    docstring); called by the trainable before it builds anything."""
    if not internal_kv._internal_kv_initialized():
        return
    record = internal_kv._internal_kv_get(_kv_key(trial_id), namespace=_KV_NAMESPACE)
    if record is not None:
        failed = json.loads(record)
        raise TrialFailed(f"not run again from the same state after a deterministic failure: {failed['message']}",
                          fold=failed["fold"], reason=failed["reason"])


def take_stop() -> dict[str, str] | None:
    """Why `FailurePolicy` stopped the sweep in this process since the last call ({"reason", "trial_id",
    "message"}), or None; the record is consumed."""
    stop = _stops[0] if _stops else None
    _stops.clear()
    return stop


class FailurePolicy(tune.Callback):
    """Stops the sweep on a data error and refuses Tune's retries of deterministic failures (module docstring)."""

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._judge(trial, requeued=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._judge(trial, requeued=False)

    def _judge(self, trial: Any, *, requeued: bool) -> None:
        failed = trial_failure(_last_error(trial))
        if failed is None:
            return  # not the trial's own verdict (its coordinator or node was lost): Tune's policy stands
        if failed.reason == DATA_ERROR:
            self._stop_sweep(trial, failed)
        elif requeued and not failed.retryable:
            internal_kv._internal_kv_put(
                _kv_key(trial.trial_id),
                json.dumps({"message": str(failed), "fold": failed.fold, "reason": failed.reason}),
                overwrite=True, namespace=_KV_NAMESPACE)
            trial.max_failures = trial.run_metadata.num_failures  # the refusal is its last failure
            logger.warning("trial %s: %s is deterministic; it is not run again from the same state.",
                           trial.trial_id, failed.reason)

    def _stop_sweep(self, trial: Any, failed: TrialFailed) -> None:
        if _stops:  # already stopping: another fold or trial met bad data in the same step
            return
        _stops.append({"reason": failed.reason, "trial_id": trial.trial_id, "message": str(failed)})
        logger.error("trial %s: %s; stopping the sweep (no retry, no further trials).", trial.trial_id, failed)
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # tune.run's graceful stop: the loop ends after this step, the state is saved
            os.kill(os.getpid(), signal.SIGUSR1)
        else:  # Tune runs outside the main thread and installed no handler
            raise RuntimeError(f"Stopping the sweep: {failed}")
