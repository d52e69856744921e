"""Cluster-scale scheduling on a real multi-node Ray (`ray.cluster_utils.Cluster`, CPU-only nodes).

The head advertises no CPU and 3 units of "coordinator" (as cluster.yaml's head does), so the coordinator
bundles fit only the head and the fold bundles only workers. The sweep starts with no worker at all: every
trial's placement group is pending, as it is on a cluster that has not scaled up yet. With
`search.max_concurrent_trials: 3` the driver sets `TUNE_MAX_PENDING_TRIALS_PG` (search/tuner.py), so all
3 groups are pending at once (what the autoscaler sees as demand), even where a user had left it at 1.
Then a worker node comes, every trial runs, and every coordinator ran on the head.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
import ray
from ray import cloudpickle, tune
from ray.cluster_utils import Cluster

from search.config import sweep_config_from_dict
from search.tuner import MAX_PENDING_ENV, build_searcher, set_max_pending_trials
from trainables.trial import trial_resources

pytestmark = pytest.mark.slow

OBJECT_STORE = 100 * 1024**2
TRIALS = 3


def tiny_trial(config: dict[str, Any]) -> None:
    # The coordinator's node, and the fold bundles' nodes of its placement group.
    pg = ray.util.get_current_placement_group()
    table = ray.util.placement_group_table(pg)
    tune.report({"cv_score": float(config["lr"]), "finished": 1,
                 "coordinator_node": ray.get_runtime_context().get_node_id(),
                 "bundle_nodes": ",".join(str(table["bundles_to_node_id"][i]) for i in sorted(table["bundles"]))})


class WatchPending(tune.Callback):
    """Counts PENDING placement groups every controller step; once `want` are pending at once (or after
    `patience` s) adds the worker node that lets the trials run."""

    def __init__(self, cluster: Cluster, want: int, patience: float = 25.0) -> None:
        self.cluster, self.want, self.patience = cluster, want, patience
        self.started = time.monotonic()
        self.most_pending = 0
        self.added = False

    def __getstate__(self) -> dict:
        return {"want": self.want, "most_pending": self.most_pending, "added": self.added}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.added:
            return
        pending = sum(1 for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING")
        self.most_pending = max(self.most_pending, pending)
        if self.most_pending >= self.want or time.monotonic() - self.started > self.patience:
            self.added = True
            self.cluster.add_node(num_cpus=2 * TRIALS, object_store_memory=OBJECT_STORE)


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(MAX_PENDING_ENV, "1")  # a stale user setting: the driver must override it
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is no package
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"coordinator": TRIALS}, "object_store_memory": OBJECT_STORE,
        "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_every_concurrent_trial_has_its_placement_group_pending_at_once(cluster: Cluster, tmp_path) -> None:
    config = sweep_config_from_dict({
        "data": {"num_folds": 2},
        "search": {"num_samples": TRIALS, "max_concurrent_trials": TRIALS, "space": {"batch_size": [2]}},
        "resources": {"cpus_per_fold": 1, "coordinator_cpus": 0, "coordinator_resource": "coordinator"},
    }, check_data=False)
    assert set_max_pending_trials(config) == TRIALS and os.environ[MAX_PENDING_ENV] == str(TRIALS)
    watch = WatchPending(cluster, want=TRIALS)
    trainable = tune.with_resources(tiny_trial, trial_resources(config.data.num_folds, config.resources))
    results = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=build_searcher(config), num_samples=TRIALS),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="tune", verbose=0, callbacks=[watch]),
    ).fit()

    # All three trials' groups (1 coordinator + 2 fold bundles each) were pending together before any node came.
    assert watch.most_pending == TRIALS
    assert len(results) == TRIALS and not results.errors
    head = cluster.head_node.node_id
    (worker,) = [n.node_id for n in cluster.worker_nodes]
    for result in results:
        # bundle 0 (the coordinator's "coordinator" unit) on the head, the folds on the worker.
        assert result.metrics["coordinator_node"] == head
        assert result.metrics["bundle_nodes"].split(",") == [head, worker, worker]
