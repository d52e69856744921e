"""Fold actors kept between the trials that Tune runs on one reused coordinator actor.

With `TuneConfig(reuse_actors=True)` (config `search.reuse_actors`) Tune hands a finished trial's coordinator
actor, and with it the trial's placement group, to the next trial that asks for the same resources. A trial
that ended normally parks its fold actors here, keyed by (placement group, bundle index); the next trial on the
same coordinator takes them and calls `FoldWorker.reset` instead of starting K new processes (Python, torch,
the CUDA context, the dataset index: most of a trial's start-up).

A parked fold lives as long as its owner, the coordinator process: when Tune stops that actor, or removes the
placement group, the parked folds go with it, so nothing outlives the sweep. The pool is only touched from the
trial's training thread, and Tune runs one trial at a time per actor; the lock is for safety only.
"""

from __future__ import annotations

import threading
from typing import Any

import ray

__all__ = ["park", "take"]

_lock = threading.Lock()
_parked: dict[tuple[str, int], Any] = {}  # (placement group id hex, bundle index) -> FoldWorker actor handle


def _key(pg: Any, bundle_index: int) -> tuple[str, int]:
    return pg.id.hex(), int(bundle_index)


def park(pg: Any, bundle_index: int, actor: Any) -> None:
    """Keep `actor` (a fold actor in bundle `bundle_index` of `pg`) for the next trial of this process."""
    with _lock:
        previous = _parked.pop(_key(pg, bundle_index), None)
        _parked[_key(pg, bundle_index)] = actor
    if previous is not None and previous is not actor:
        _kill(previous)


def take(pg: Any, bundle_index: int) -> Any | None:
    """The fold actor parked in this bundle of `pg`, removed from the pool; None when there is none. Actors
    parked in another placement group (one Tune no longer gives this process) are killed: nothing can use them."""
    with _lock:
        actor = _parked.pop(_key(pg, bundle_index), None)
        stale = [key for key in _parked if key[0] != pg.id.hex()]
        stale_actors = [_parked.pop(key) for key in stale]
    for other in stale_actors:
        _kill(other)
    return actor


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - an actor that is already gone is fine
        pass
