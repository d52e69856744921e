"""A real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): a head plus two worker
nodes with one logical GPU each, so that a trial's two fold bundles ({"CPU": 1, "GPU": 1}) must land
on different nodes. One real Tune sweep of `trainables.trial.train_trial` on DeepForest tiles (2 trials
x 2 folds x 2 epochs, one trial at a time) checks that folds run on different nodes at the same time,
what a trial's checkpoint holds, and, because the node running fold 1 of the second trial is removed
after that trial's first epoch, that a lost fold is recreated from its last state on a fresh node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray import tune
from ray.cluster_utils import Cluster

from detection.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from detection.data.splits import Split
from detection.models.anchors import anchor_shapes_from_state_dict
from detection.models.factory import build_detector
from search.config import ResourcesConfig
from trainables.trial import TrialSetup, train_trial, trial_resources

pytestmark = pytest.mark.slow

OBJECT_STORE = 200 * 1024**2  # per node (Ray's default is 30% of the machine's memory per node)
# One CPU and one (logical) GPU per fold: a worker node holds exactly one fold.
RESOURCES = ResourcesConfig(cpus_per_fold=1, gpus_per_fold=1, coordinator_cpus=0.5)
# Fold 0 validates on tiles 0-1, fold 1 on 2-3; each trains on the other two (one batch of 2).
SPLIT = Split(selection=(4,), test=(), folds=((0, 1), (2, 3)), seed=0)


def add_gpu_node(cluster: Cluster) -> Any:
    # Logical GPUs: Ray schedules by them and sets CUDA_VISIBLE_DEVICES, torch still sees no CUDA here.
    return cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE)


@pytest.fixture(scope="module")
def cluster():
    # The head runs the trials' coordinators (0.5 CPU each) and no fold: it has no GPU.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                            "include_dashboard": False})
    for _ in range(2):
        add_gpu_node(cluster)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def make_setup(data_path: Path, split_path: Path, *, epochs: int) -> TrialSetup:
    base = ExperimentConfig(
        data=DataConfig(path=str(data_path), num_folds=2, class_balanced_sampling=False),
        model=ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", pretrained=False, roi_batch_size_per_image=32,
                          rpn_post_nms_top_n_train=200),
        train=TrainConfig(epochs=epochs, image_size=64, batch_size=2, eval_batch_size=2, augment=False,
                          amp=False, warmup_epochs=0.0),
    ).validate()
    return TrialSetup(base=base, split=Split.from_json(split_path), split_path=str(split_path), resources=RESOURCES,
                      keep_best=3)


class RemoveFoldNode(tune.Callback):
    """After the first epoch of the trial with `score_threshold == victim`, removes the node that runs its
    fold 1 and adds a fresh GPU node (Ray moves the lost bundle there)."""

    def __init__(self, cluster: Cluster, victim: float) -> None:
        self.cluster = cluster
        self.victim = victim
        self.removed: str | None = None

    def __getstate__(self) -> dict:  # Tune saves its callbacks; the cluster handle stays here
        return {"cluster": None, "victim": self.victim, "removed": self.removed}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.removed is None and trial.config["score_threshold"] == self.victim and result["epoch"] == 1:
            self.removed = result["fold1/node_id"]
            (node,) = [n for n in self.cluster.worker_nodes if n.node_id == self.removed]
            self.cluster.remove_node(node)
            add_gpu_node(self.cluster)


@dataclass(frozen=True)
class Sweep:
    results: dict[float, tune.Result]  # by score_threshold
    removed: str | None  # node id removed under the second trial's fold 1
    head: str  # the head node's id


@pytest.fixture(scope="module")
def sweep(cluster: Cluster, deepforest_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """Both trials train the same (lr 0.01, same seed and data); score_threshold only changes evaluation,
    so their losses must agree epoch by epoch, also for the fold that lost its node."""
    root = tmp_path_factory.mktemp("multinode-sweep")
    setup = make_setup(deepforest_root, SPLIT.to_json(root / "split.json"), epochs=2)
    remover = RemoveFoldNode(cluster, victim=0.5)
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    trial_resources(SPLIT.num_folds, setup.resources))
    results = tune.Tuner(
        trainable,
        param_space={"lr": 0.01, "score_threshold": tune.grid_search([0.3, 0.5])},
        tune_config=tune.TuneConfig(metric="score_mean", mode="max"),
        run_config=tune.RunConfig(
            storage_path=str(root), name="tune", verbose=0, callbacks=[remover],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    ).fit()
    assert len(results) == 2 and not results.errors
    return Sweep({r.config["score_threshold"]: r for r in results}, remover.removed, cluster.head_node.node_id)


def assert_parallel_on_two_nodes(row: Any, head: str) -> None:
    nodes = {row["fold0/node_id"], row["fold1/node_id"]}
    assert len(nodes) == 2 and head not in nodes  # one fold per GPU node, none on the head
    # Both folds worked at the same time: their epochs' [train start, eval end] wall-clock windows overlap.
    assert max(row["fold0/train_start"], row["fold1/train_start"]) < min(row["fold0/eval_end"], row["fold1/eval_end"])


def test_sweep_runs_folds_on_different_nodes_in_parallel(sweep: Sweep) -> None:
    history = sweep.results[0.3].metrics_dataframe
    assert history["epoch"].tolist() == history["training_iteration"].tolist() == [1, 2]
    for _, row in history.iterrows():
        assert_parallel_on_two_nodes(row, sweep.head)
        assert row["fold0/restarts"] == row["fold1/restarts"] == 0
    assert_parallel_on_two_nodes(sweep.results[0.5].metrics_dataframe.iloc[0], sweep.head)
    # Fold aggregates are the mean of the two folds.
    last = sweep.results[0.3].metrics
    assert last["score_mean"] == pytest.approx((last["fold0/score"] + last["fold1/score"]) / 2)
    assert last["best_fold_score"] == pytest.approx(max(last["fold0/best_score"], last["fold1/best_score"]))


def test_fold_on_a_removed_node_is_recreated_from_its_last_state(sweep: Sweep) -> None:
    results, removed = sweep.results, sweep.removed
    history = results[0.5].metrics_dataframe
    assert history["epoch"].tolist() == [1, 2]  # the trial completed all its epochs
    first, last = history.iloc[0], history.iloc[1]
    assert removed is not None and first["fold1/node_id"] == removed
    assert last["fold1/node_id"] != removed and last["fold1/pid"] != first["fold1/pid"]
    assert (last["fold1/restarts"], last["fold_restarts"]) == (1, 1)
    assert last["fold0/node_id"] == first["fold0/node_id"] and last["fold0/pid"] == first["fold0/pid"]
    # Recreated from its epoch-1 state, it trained epoch 2 (not epoch 1 again), exactly as the
    # undisturbed first trial did: same loss.
    state = torch.load(Path(results[0.5].checkpoint.path) / "folds" / "fold-1.pt", weights_only=True)
    assert state["epoch"] == 2
    undisturbed = results[0.3].metrics_dataframe
    for k in range(2):
        assert history[f"fold{k}/loss"].tolist() == pytest.approx(undisturbed[f"fold{k}/loss"].tolist(), rel=1e-4)


def test_checkpoint_holds_fold_states_and_ranked_best_models(sweep: Sweep) -> None:
    for threshold, result in sweep.results.items():
        directory = Path(result.checkpoint.path)
        # num_to_keep=1: only the latest epoch's checkpoint stays on disk.
        assert [p.name for p in Path(result.path).glob("checkpoint_*")] == [directory.name]

        for k in range(2):
            state = torch.load(directory / "folds" / f"fold-{k}.pt", weights_only=True)
            assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= set(state)

        entries = json.loads((directory / "best" / "best.json").read_text())
        assert len(entries) == min(3, SPLIT.num_folds)  # K = 2 folds -> 2 models
        assert sorted(e["fold"] for e in entries) == [0, 1]  # one model per fold
        assert [e["rank"] for e in entries] == [1, 2]
        assert entries[0]["score"] >= entries[1]["score"]
        # + every fold's out-of-fold validation predictions at its best epoch
        assert sorted(p.name for p in (directory / "best").iterdir()) == ["best.json", "oof-fold-0.pt", "oof-fold-1.pt",
                                                                          "rank-1.pt", "rank-2.pt"]
        history = result.metrics_dataframe
        for entry in entries:
            weights = torch.load(directory / "best" / entry["file"], weights_only=True)
            assert set(weights) == set(state["model"])
            # What the ensemble job does: a fresh detector loads the kept weights (anchors included).
            model = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=3, image_size=64,
                                   start="none", anchor_shapes=anchor_shapes_from_state_dict(weights))
            model.load_state_dict(weights)
            # The fold's best epoch, by its own validation score, is what was kept.
            fold_scores = history[f"fold{entry['fold']}/score"].tolist()
            assert entry["score"] == pytest.approx(max(fold_scores))
            assert entry["epoch"] == 1 + fold_scores.index(max(fold_scores))

        trial = json.loads((directory / "trial.json").read_text())
        assert trial["epoch"] == 2 and trial["num_folds"] == 2 and trial["split_hash"] == SPLIT.hash
        assert (trial["arch"], trial["backbone"], trial["num_classes"]) == ("faster_rcnn", "mobilenet_v2", 3)
        assert trial["class_names"] == ["Tree", "Dead", "Alive"] and trial["params"] == result.config
        assert (trial["image_size"], trial["score_threshold"]) == (64, threshold)
        assert json.loads((directory / "manifest.json").read_text())["split"]["sha256"] == SPLIT.hash
