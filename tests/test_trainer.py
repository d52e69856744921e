"""FoldTrainer on real DeepForest tiles with the offline ImageNet MobileNetV2 weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detection.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from detection.metrics import detection_metrics, keep_classes
from detection.trainer import FoldTrainer, restore_rng


def tiny_config(deepforest_root, **train) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(path=str(deepforest_root), class_balanced_sampling=True),
        model=ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", pretrained=True, kmeans_anchors=True,
                          roi_batch_size_per_image=128, rpn_post_nms_top_n_train=500),
        train=TrainConfig(**{"epochs": 6, "lr": 0.02, "batch_size": 2, "image_size": 160, "warmup_epochs": 0.5,
                             "patience": 0, "score_threshold": 0.3, **train}),
        seed=0,
    ).validate()


def most_boxed_train_tiles(index, n: int) -> list[int]:
    train = [r for r in index.images if r.split == "train"]
    return [r.image_id for r in sorted(train, key=lambda r: -len(r.boxes))[:n]]


@pytest.mark.slow
def test_training_on_real_tiles_learns(deepforest_root, deepforest_index):
    """Loss falls and map_50 on the training tiles rises well above its first epoch's.

    4 real tiles at 320 px, 2 iterations an epoch: seen here, map_50 went 0.004 after epoch 1 -> 0.084
    after epoch 5 (evaluated only then, to keep the test short).
    """
    ids = most_boxed_train_tiles(deepforest_index, 4)
    cfg = tiny_config(deepforest_root, epochs=5, image_size=320, augment=False)
    cfg = cfg.with_overrides(data={"class_balanced_sampling": False})
    trainer = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids)
    first = {**trainer.train_epoch(), **trainer.evaluate()}
    losses = [first["loss"]] + [trainer.train_epoch()["loss"] for _ in range(cfg.train.epochs - 1)]
    last = trainer.evaluate()
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert min(losses[-2:]) < 0.95 * losses[0], losses
    assert last["map_50"] > max(5 * first["map_50"], first["map_50"] + 0.04), (first["map_50"], last["map_50"])
    assert trainer.best_score == max(first["score"], last["score"])


@pytest.mark.slow
def test_resume_from_weights_only_checkpoint_repeats_the_next_epoch(deepforest_root, deepforest_index, tmp_path):
    """A fold saved after epoch 1 and restored into a fresh trainer trains epoch 2 exactly as the original."""
    ids = most_boxed_train_tiles(deepforest_index, 4)
    cfg = tiny_config(deepforest_root, epochs=3, image_size=128, small_image_size=96, progressive_epochs=1,
                      patience=2)
    original = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids[:2])
    first = original.train_epoch()
    original.evaluate()
    assert first["image_size"] == 96  # progressive resizing: the small size first

    torch.save(original.state_dict(), tmp_path / "fold.pt")
    state = torch.load(tmp_path / "fold.pt", weights_only=True)
    resumed = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids[:2])
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and resumed.best_score == original.best_score

    # Both trainers share this process's global RNGs (a fold worker has a process of its own):
    # each runs from the saved RNG state.
    got = resumed.train_epoch()
    restore_rng(state["rng"])
    expected = original.train_epoch()
    assert got["image_size"] == expected["image_size"] == 128
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for name, value in original.model_state_dict().items():
        torch.testing.assert_close(resumed.model_state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_empty_training_set_is_an_error(deepforest_root, deepforest_index):
    with pytest.raises(ValueError, match="train_ids"):
        FoldTrainer(tiny_config(deepforest_root), deepforest_index, train_ids=[], val_ids=[0])


def test_same_seed_same_first_epoch_loss(deepforest_root, deepforest_index):
    ids = most_boxed_train_tiles(deepforest_index, 2)
    cfg = dataclasses.replace(tiny_config(deepforest_root, epochs=1, image_size=96), seed=3)
    a = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids).train_epoch()["loss"]
    b = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids).train_epoch()["loss"]
    assert a == b


@pytest.mark.parametrize("arch, backbone", [("faster_rcnn", "mobilenet_v2"), ("fcos_tal", "tf_efficientnet_lite0")])
def test_memory_probe_measures_one_step_and_leaves_the_fold_as_it_was(deepforest_root, deepforest_index, arch,
                                                                       backbone):
    """The batch-size probe (detection/memory_probe.py): a peak, a verdict against a bound, and afterwards the
    same weights, buffers and first-epoch loss as a fold that was never probed."""
    ids = most_boxed_train_tiles(deepforest_index, 2)
    cfg = tiny_config(deepforest_root, epochs=1, image_size=96, augment=False)
    cfg = cfg.with_overrides(model={"arch": arch, "backbone": backbone},
                             train={"optimizer": "adamw" if arch == "fcos_tal" else "sgd", "lr": 1e-3})
    probed = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids)
    before = {k: v.clone() for k, v in probed.model.state_dict().items()}

    probe = probed.probe_memory()
    assert probe.fits and probe.peak_bytes > 10 * 2**20 and probe.limit_bytes is None  # CPU: no bound given
    assert (probe.batch_size, probe.image_size, probe.device) == (2, 96, "cpu")
    tight = probed.probe_memory(limit_bytes=2**20)  # 1 MiB: no detector step fits
    assert not tight.fits and tight.excess > 0 and "bound 1 MiB" in tight.describe()
    after = probed.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in probed.model.parameters())

    probed_loss = probed.train_epoch()["loss"]
    # (built after the probed fold trained: building a fold reseeds torch's global RNG, as training draws from it)
    fresh = FoldTrainer(cfg, deepforest_index, train_ids=ids, val_ids=ids)
    assert probed_loss == fresh.train_epoch()["loss"]


def test_a_fold_is_not_scored_on_classes_none_of_its_training_images_hold(deepforest_root, deepforest_index):
    # The tile with every Dead and Alive box, validated by a fold that trains on Tree tiles only: its Dead and
    # Alive ground truth (and any such prediction) stays out of the fold's metrics; trained on, it counts.
    index = deepforest_index
    rare = next(r.image_id for r in index.images if {2, 3} & set(r.labels.tolist()))
    trees = most_boxed_train_tiles(index, 2)
    val_ids = [rare, trees[0]]
    targets = [{"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels),
                "iscrowd": torch.as_tensor(r.iscrowd)} for r in index.records(val_ids)]
    cfg = tiny_config(deepforest_root, epochs=1, image_size=96, score_threshold=None)
    for train_ids, unscored in ((trees, ("Dead", "Alive")), ([rare, *trees], ())):
        trainer = FoldTrainer(cfg, index, train_ids=train_ids, val_ids=val_ids)
        assert trainer.unscored_classes == unscored
        trainer.train_epoch()
        metrics = trainer.evaluate()
        saved = trainer.best_predictions
        assert saved is not None and saved.image_ids == val_ids
        scored = [1] if unscored else [1, 2, 3]
        kept_preds, kept_targets = keep_classes(saved.preds, targets, scored)
        for pred in saved.preds:
            assert set(pred["labels"].tolist()) <= set(scored)
        again = detection_metrics(kept_preds, kept_targets, score_threshold=None, class_names=index.class_names)
        for key in ("map", "map_50", "f1", "recall", "score"):
            assert metrics[key] == pytest.approx(again[key], abs=1e-9), key
        # Recall counts only the scored classes' boxes (the saved matches too).
        assert saved.matches.num_gt == sum(len(t["labels"]) for t in kept_targets)
        assert saved.matches.num_gt == (len(targets[1]["labels"]) if unscored else sum(len(t["labels"]) for t in targets))
