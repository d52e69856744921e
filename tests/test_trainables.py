"""trainables without a Ray cluster: trial params and resources, fold metrics, best-model ranking,
the checkpoint layout, and one `FoldWorker` trained for real on DeepForest tiles (as a plain object)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from detection.data.splits import Split
from detection.metrics import Matches
from detection.predictions import SavedPredictions
from search.config import ResourcesConfig
from trainables.fold_worker import FoldWorker, pick_device, state_from_bytes, state_to_bytes
from trainables.trial import (
    FOLD_METRICS,
    BestModel,
    TrialSetup,
    aggregate_fold_metrics,
    checkpoint_contents,
    pooled_oof_threshold,
    apply_trial_params,
    rank_best,
    read_best,
    read_trial_checkpoint,
    trial_resources,
    write_trial_checkpoint,
)

# Fold 0 validates on tiles 0-1 and trains on 2-3; fold 1 the other way round (the rest is unused).
TINY_SPLIT = Split(selection=(4,), test=(), folds=((0, 1), (2, 3)), seed=0)


def tiny_config(data_path: Path, **train: object) -> ExperimentConfig:
    """Faster R-CNN MobileNetV2 from scratch at 64 px, 32 RoIs per image: about a second per epoch on a CPU."""
    return ExperimentConfig(
        data=DataConfig(path=str(data_path), num_folds=2, class_balanced_sampling=False),
        model=ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", pretrained=False, roi_batch_size_per_image=32,
                          rpn_post_nms_top_n_train=200),
        train=TrainConfig(**{"epochs": 2, "image_size": 64, "batch_size": 2, "eval_batch_size": 2,
                             "augment": False, "amp": False, "warmup_epochs": 0.0, **train}),
    ).validate()


# ------------------------------------------------------------------------------------ trial params


def test_apply_trial_params_maps_every_key() -> None:
    base = ExperimentConfig().validate()
    cfg = apply_trial_params(base, {"detector": "fcos_tal/resnet18", "lr": 3e-3, "batch_size": 8,
                                    "score_threshold": 0.35})

    assert (cfg.model.arch, cfg.model.backbone) == ("fcos_tal", "resnet18")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.score_threshold) == (3e-3, 8, 0.35)
    assert cfg.data == base.data and cfg.train.epochs == base.train.epochs  # the rest is the base's


def test_apply_trial_params_empty_params_is_the_base() -> None:
    base = ExperimentConfig().validate()
    assert apply_trial_params(base, {}) == base


def test_apply_trial_params_accepts_numpy_numbers() -> None:
    import numpy as np

    cfg = apply_trial_params(ExperimentConfig(), {"batch_size": np.int64(4), "lr": np.float64(0.02)})
    assert type(cfg.train.batch_size) is int and cfg.train.batch_size == 4
    assert cfg.train.lr == 0.02


@pytest.mark.parametrize(
    ("params", "error", "named"),
    [
        pytest.param({"momentum": 0.8}, ValueError, "['momentum']", id="unknown-key"),
        pytest.param({"detector": "faster_rcnn"}, ValueError, "'<arch>/<backbone>'", id="detector-without-slash"),
        pytest.param({"detector": "faster_rcnn/"}, ValueError, "'<arch>/<backbone>'", id="detector-empty-backbone"),
        pytest.param({"detector": "retinanet/resnet18"}, ConfigError, "model.arch", id="unknown-arch"),
        pytest.param({"batch_size": 0}, ConfigError, "train.batch_size", id="batch-size-0"),
        pytest.param({"batch_size": 4.0}, ValueError, "`batch_size` must be an integer", id="batch-size-float"),
        pytest.param({"lr": "0.1"}, ValueError, "`lr` must be a number", id="lr-string"),
        pytest.param({"lr": -1.0}, ConfigError, "train.lr", id="lr-negative"),
        pytest.param({"score_threshold": 1.0}, ConfigError, "train.score_threshold", id="threshold-1"),
    ],
)
def test_apply_trial_params_rejects(params: dict, error: type, named: str) -> None:
    with pytest.raises(error, match=None) as info:
        apply_trial_params(ExperimentConfig(), params)
    assert named in str(info.value)


# ---------------------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        pytest.param(ResourcesConfig(cpus_per_fold=4, gpus_per_fold=1, coordinator_cpus=0.5),
                     [{"CPU": 0.5}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}],
                     id="one-gpu-per-fold"),
        pytest.param(ResourcesConfig(cpus_per_fold=2, gpus_per_fold=0.5, coordinator_cpus=0.1),
                     [{"CPU": 0.1}, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 0.5}],
                     id="two-folds-share-a-gpu"),
        pytest.param(ResourcesConfig(cpus_per_fold=1, gpus_per_fold=0, coordinator_cpus=0.1),
                     [{"CPU": 0.1}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], id="cpu-only-no-gpu-key"),
        # cluster.yaml's head advertises {"CPU": 0, "coordinator": N}: the coordinator asks for no CPU there.
        pytest.param(ResourcesConfig(cpus_per_fold=8, gpus_per_fold=1, coordinator_cpus=0,
                                     coordinator_resource="coordinator"),
                     [{"coordinator": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0},
                      {"CPU": 8.0, "GPU": 1.0}], id="coordinator-on-the-head-resource"),
        # an on-demand CPU worker type advertising the resource: the coordinator takes a CPU share there too.
        pytest.param(ResourcesConfig(cpus_per_fold=1, gpus_per_fold=0, coordinator_cpus=0.1,
                                     coordinator_resource="coordinator"),
                     [{"CPU": 0.1, "coordinator": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}],
                     id="coordinator-resource-and-cpus"),
    ],
)
def test_trial_resources_bundles(resources: ResourcesConfig, expected: list[dict]) -> None:
    factory = trial_resources(3, resources)
    assert factory.bundles == expected
    assert not factory.head_bundle_is_empty


def test_trial_resources_without_coordinator_cpus_has_only_fold_bundles() -> None:
    factory = trial_resources(2, ResourcesConfig(cpus_per_fold=1, gpus_per_fold=0, coordinator_cpus=0))
    assert factory.head_bundle_is_empty
    assert factory.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]  # Tune drops the empty head bundle


@pytest.mark.parametrize(
    ("num_folds", "resources", "named"),
    [
        pytest.param(0, ResourcesConfig(), "num_folds >= 1", id="no-folds"),
        pytest.param(2, ResourcesConfig(cpus_per_fold=0), "cpus_per_fold > 0", id="zero-cpus"),
        pytest.param(2, ResourcesConfig(gpus_per_fold=-1), "gpus_per_fold >= 0", id="negative-gpus"),
        pytest.param(2, ResourcesConfig(coordinator_resource="GPU"), "custom Ray resource", id="builtin-resource"),
    ],
)
def test_trial_resources_rejects(num_folds: int, resources: ResourcesConfig, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        trial_resources(num_folds, resources)


def test_trial_setup_rejects_keep_best_0(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_best >= 1"):
        TrialSetup(base=ExperimentConfig(), split=TINY_SPLIT,
                   split_path=str(tmp_path / "split.json"), resources=ResourcesConfig(), keep_best=0)


# ----------------------------------------------------------------------------------- fold metrics


def test_aggregate_fold_metrics_mean_std_and_per_fold() -> None:
    folds = [
        {"map": 0.1, "map_50": 0.2, "map_75": 0.0, "f1": 0.4, "score": 0.3, "loss": 2.0},
        {"map": 0.3, "map_50": 0.6, "map_75": 0.2, "f1": 0.8, "score": 0.7, "loss": 1.0},
    ]
    out = aggregate_fold_metrics(folds)

    # score: mean (0.3 + 0.7) / 2 = 0.5; population std sqrt(((0.3-0.5)^2 + (0.7-0.5)^2) / 2) = 0.2
    assert out["score_mean"] == pytest.approx(0.5) and out["score_std"] == pytest.approx(0.2)
    # loss: mean 1.5, std sqrt((0.25 + 0.25) / 2) = 0.5
    assert out["loss_mean"] == pytest.approx(1.5) and out["loss_std"] == pytest.approx(0.5)
    assert out["fold1/map_50"] == 0.6 and out["fold0/f1"] == 0.4
    assert set(out) == {f"{m}_{s}" for m in FOLD_METRICS for s in ("mean", "std")} | {
        f"fold{k}/{m}" for k in range(2) for m in FOLD_METRICS}


def test_aggregate_fold_metrics_single_fold_has_zero_std() -> None:
    out = aggregate_fold_metrics([{m: 0.25 for m in FOLD_METRICS}])
    assert out["map_mean"] == 0.25 and out["map_std"] == 0.0


def test_aggregate_fold_metrics_rejects_no_folds_and_missing_metric() -> None:
    with pytest.raises(ValueError, match="at least one fold"):
        aggregate_fold_metrics([])
    with pytest.raises(ValueError, match="'loss'.*fold 1"):
        aggregate_fold_metrics([{m: 0.0 for m in FOLD_METRICS}, {m: 0.0 for m in FOLD_METRICS if m != "loss"}])


# ------------------------------------------------------------------------------ best and checkpoint


def _best(fold: int, score: float, epoch: int = 1) -> BestModel:
    weights = {"w": torch.full((2, 3), float(fold)), "b": torch.arange(3, dtype=torch.float32)}
    return BestModel(fold=fold, epoch=epoch, score=score, map_50=score + 0.1, f1=score - 0.1, map=score / 2,
                     model=state_to_bytes(weights))


def test_rank_best_keeps_top_folds_by_score() -> None:
    best = {0: _best(0, 0.4), 1: _best(1, 0.7), 2: _best(2, 0.1), 3: _best(3, 0.7)}
    assert [b.fold for b in rank_best(best, 3)] == [1, 3, 0]  # 0.7 (tie: lower fold first), 0.7, 0.4
    assert [b.fold for b in rank_best({0: _best(0, 0.2), 1: _best(1, 0.5)}, 3)] == [1, 0]  # K=2 < 3: both
    assert rank_best({}, 3) == []  # no fold evaluated yet


def test_checkpoint_layout_round_trip(tmp_path: Path) -> None:
    states = [state_to_bytes({"model": {"w": torch.full((2,), float(k))}, "epoch": 3}) for k in range(3)]
    ranked = rank_best({0: _best(0, 0.4, epoch=2), 1: _best(1, 0.6, epoch=3), 2: _best(2, 0.5, epoch=1)}, 2)
    trial = {"arch": "faster_rcnn", "num_folds": 3, "epoch": 3}
    # Out-of-fold predictions of every fold's best epoch (all folds, also the one not among the ranked models).
    oof = {k: SavedPredictions([10 + k], [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 9.0]]), "scores": torch.tensor([0.5]),
                                           "labels": torch.tensor([1])}],
                               Matches(np.array([0.5]), np.array([k == 1]), np.array([True]), 1)).to_bytes()
           for k in range(3)}
    write_trial_checkpoint(tmp_path, fold_states=states, best=ranked, trial=trial, manifest={"format": 1},
                           predictions=oof)

    assert sorted(p.name for p in (tmp_path / "folds").iterdir()) == ["fold-0.pt", "fold-1.pt", "fold-2.pt"]
    assert torch.load(tmp_path / "folds" / "fold-2.pt", weights_only=True)["model"]["w"].tolist() == [2.0, 2.0]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "best.json", "oof-fold-0.pt", "oof-fold-1.pt", "oof-fold-2.pt", "rank-1.pt", "rank-2.pt"]
    entries = json.loads((tmp_path / "best" / "best.json").read_text())
    assert [(e["rank"], e["fold"], e["epoch"], e["score"], e["file"], e["predictions"]) for e in entries] == [
        (1, 1, 3, 0.6, "rank-1.pt", "oof-fold-1.pt"), (2, 2, 1, 0.5, "rank-2.pt", "oof-fold-2.pt")]
    assert set(entries[0]) == {"rank", "fold", "epoch", "score", "map_50", "f1", "map", "file", "predictions"}
    assert torch.load(tmp_path / "best" / "rank-1.pt", weights_only=True)["w"].tolist() == [[1.0] * 3] * 2
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"format": 1}
    assert [Path(e["path"]).name for e in read_best(tmp_path)] == ["rank-1.pt", "rank-2.pt"]

    back = read_trial_checkpoint(tmp_path)
    assert back.fold_states == states and back.trial == trial
    assert back.best == ranked  # frozen dataclasses, model bytes included
    assert back.predictions == oof
    saved = SavedPredictions.from_bytes(back.predictions[2])  # weights_only=True inside
    assert saved.image_ids == [12] and saved.preds[0]["boxes"].tolist() == [[1.0, 2.0, 5.0, 9.0]]
    # Pooled over the folds: one TP (fold 1) and two FP at score 0.5 of 3 gt -> P 1/3, R 1/3, F1 1/3 at 0.5.
    assert pooled_oof_threshold(back.predictions) == pytest.approx((0.5, 1 / 3))


def test_checkpoint_without_best_models(tmp_path: Path) -> None:
    write_trial_checkpoint(tmp_path, fold_states=[b"a", b"b"], best=[], trial={"num_folds": 2, "epoch": 0})
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == []
    assert read_trial_checkpoint(tmp_path).best == []
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(("epoch", "finished", "improved", "expected"), [
    (5, False, False, "states"),   # every resume_every-th epoch
    (10, True, False, "states"),   # ... also when it is the last
    (3, False, True, "best"),      # a fold improved: its best model goes to storage
    (3, False, False, None),       # nothing new: no checkpoint
    (7, True, False, "best"),      # the last epoch: the final trial.json, no resume states (never resumed)
    (7, True, True, "best"),
])
def test_checkpoint_contents_writes_resume_states_every_n_epochs_only(epoch: int, finished: bool, improved: bool,
                                                                       expected: str | None) -> None:
    assert checkpoint_contents(epoch, resume_every=5, finished=finished, improved=improved) == expected


def test_checkpoint_without_fold_states_names_the_one_that_has_them(tmp_path: Path) -> None:
    trial = {"num_folds": 2, "epoch": 3, "states_epoch": 2, "states_checkpoint": "checkpoint_000001"}
    write_trial_checkpoint(tmp_path, fold_states=None, best=[_best(1, 0.5, epoch=3)], trial=trial)
    assert not (tmp_path / "folds").exists()
    back = read_trial_checkpoint(tmp_path)
    assert back.fold_states == [] and back.trial == trial and [b.fold for b in back.best] == [1]
    # Without the pointer it would be a checkpoint nobody can resume from.
    with pytest.raises(ValueError, match="states_checkpoint"):
        write_trial_checkpoint(tmp_path / "x", fold_states=None, best=[], trial={"num_folds": 2, "epoch": 1})


def test_read_trial_checkpoint_names_a_missing_fold(tmp_path: Path) -> None:
    write_trial_checkpoint(tmp_path, fold_states=[b"a"], best=[], trial={"num_folds": 2, "epoch": 1})
    with pytest.raises(FileNotFoundError, match=r"fold-1\.pt.*num_folds=2"):
        read_trial_checkpoint(tmp_path)


# ------------------------------------------------------------------------------- one real fold


def test_fold_worker_trains_saves_and_resumes(deepforest_root: Path) -> None:
    config = tiny_config(deepforest_root)
    assert pick_device() == torch.device("cpu")  # no CUDA here; outside Ray nothing else decides
    worker = FoldWorker(config, TINY_SPLIT, 1, num_threads=1)
    info = worker.info()
    assert (info["num_train"], info["num_val"], info["num_classes"]) == (2, 2, 3)
    assert info["class_names"] == ["Tree", "Dead", "Alive"] and info["node_id"] is None  # not in Ray

    train = worker.train_epoch()
    assert train["epoch"] == 1 and math.isfinite(train["loss"]) and train["start"] <= train["end"]
    evaluation = worker.evaluate()
    assert {"map", "map_50", "map_75", "f1", "score"} <= set(evaluation)
    assert evaluation["improved"] and evaluation["best_epoch"] == 1  # the first evaluation is the best so far
    assert worker.epoch() == 1 and worker.should_stop() is False

    state = state_from_bytes(worker.state_bytes())  # weights_only=True inside
    assert state["epoch"] == 1 and set(state["model"]) == set(worker.trainer.model.state_dict())
    best = worker.best_outputs()
    model = state_from_bytes(best["model"])
    assert all(torch.equal(model[k], v.cpu()) for k, v in worker.trainer.model.state_dict().items())
    oof = SavedPredictions.from_bytes(best["predictions"])  # the fold's validation images, in order
    assert oof.image_ids == list(TINY_SPLIT.val_ids(1)) and len(oof.preds) == len(oof.image_ids)

    saved = worker.state_bytes()
    continued = worker.train_epoch()  # from the RNG state that `saved` holds
    resumed = FoldWorker(config, TINY_SPLIT, 1, saved, num_threads=1)
    assert resumed.epoch() == 1 and resumed.info()["resumed_epoch"] == 1
    assert all(torch.equal(resumed.trainer.model.state_dict()[k], v) for k, v in state["model"].items())
    # The resumed fold's next epoch is the original's next epoch: same data order, same RNG.
    again = resumed.train_epoch()
    assert again["epoch"] == continued["epoch"] == 2
    assert again["loss"] == pytest.approx(continued["loss"], rel=1e-5)


def test_fold_worker_reads_the_split_file_and_checks_it(deepforest_root: Path, tmp_path: Path) -> None:
    path = TINY_SPLIT.to_json(tmp_path / "split.json")
    worker = FoldWorker(tiny_config(deepforest_root), str(path), 0, num_threads=1)
    assert worker.info()["split_hash"] == TINY_SPLIT.hash and worker.info()["num_val"] == 2

    from detection.data.coco import DatasetError

    far = Split(selection=(), test=(), folds=((0,), (10_000,)), seed=0)  # an id the dataset does not have
    with pytest.raises(DatasetError, match="10000"):
        FoldWorker(tiny_config(deepforest_root), far, 0, num_threads=1)


def test_fold_worker_reset_serves_the_next_trial_as_a_new_worker_would(deepforest_root: Path) -> None:
    """A worker parked by one trial and `reset` for the next (Tune's reuse_actors, trainables/fold_pool.py) trains
    exactly as a new worker does: nothing of the first trial (weights, optimizer, RNG, early stopping) is left."""
    first, second = tiny_config(deepforest_root, lr=0.02), tiny_config(deepforest_root, lr=0.005)
    fresh = FoldWorker(second, TINY_SPLIT, 0, num_threads=1)
    expected = [fresh.train_epoch()["loss"], fresh.evaluate()["score"]]

    worker = FoldWorker(first, TINY_SPLIT, 1, num_threads=1)
    index = worker._indexes[str(deepforest_root)]
    worker.train_epoch()
    worker.evaluate()
    worker.release()  # what a parked worker holds: no trainer
    assert worker.trainer is None
    info = worker.reset(second, TINY_SPLIT, 0, num_threads=1)
    assert info["fold"] == 0 and info["resumed_epoch"] == 0 and info["trials_served"] == 2
    assert worker._indexes[str(deepforest_root)] is index  # the dataset is not read again for the same path
    assert worker.epoch() == 0 and worker.trainer.config.train.lr == 0.005
    again = [worker.train_epoch()["loss"], worker.evaluate()["score"]]
    assert again == pytest.approx(expected, rel=1e-5)

    # reset with a state resumes it, as the constructor does
    saved = worker.state_bytes()
    worker.reset(second, TINY_SPLIT, 0, saved, num_threads=1)
    assert worker.epoch() == 1 and worker.info()["trials_served"] == 3
