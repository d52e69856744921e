"""The paired bootstrap over a split's images (detection/bootstrap.py), on the real DeepForest boxes."""

from __future__ import annotations

import pytest
import torch

from detection.bootstrap import BOOTSTRAP_METRICS, format_interval, paired_bootstrap
from detection.metrics import detection_metrics, map_50

CLASS_NAMES = ("Tree", "Dead", "Alive")


@pytest.fixture(scope="module")
def split(deepforest_index):
    """Ground truth of 10 real tiles and two systems: `good` finds every tree (scores by a seeded draw), `poor`
    misses every third tree and adds a shifted false box per tree."""
    records = deepforest_index.images[:10]
    g = torch.Generator().manual_seed(0)
    targets, good, poor = [], [], []
    for r in records:
        boxes, labels = torch.as_tensor(r.boxes).reshape(-1, 4).float(), torch.as_tensor(r.labels)
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": torch.as_tensor(r.iscrowd)})
        n = len(boxes)
        good.append({"boxes": boxes + torch.randn(n, 4, generator=g), "scores": torch.rand(n, generator=g) * 0.5 + 0.5,
                     "labels": labels})
        kept = torch.arange(n) % 3 != 0
        shifted = boxes + torch.tensor([60.0, 60.0, 60.0, 60.0])
        poor.append({"boxes": torch.cat([boxes[kept], shifted]),
                     "scores": torch.cat([torch.rand(int(kept.sum()), generator=g), torch.rand(n, generator=g)]),
                     "labels": torch.cat([labels[kept], labels])})
    assert sum(len(t["boxes"]) for t in targets) > 50
    return targets, good, poor


def test_map_50_is_detection_metrics_map_50(split) -> None:
    targets, good, poor = split
    for preds in (good, poor):
        full = detection_metrics(preds, targets, score_threshold=0.5, class_names=CLASS_NAMES)
        assert map_50(preds, targets) == pytest.approx(full["map_50"], abs=1e-9)


def test_a_clearly_better_system_has_a_positive_difference_interval(split) -> None:
    targets, good, poor = split
    boot = paired_bootstrap(good, poor, targets, thresholds=(0.5, 0.3), samples=40, seed=1)
    assert (boot["samples"], boot["images"], boot["seed"], boot["level"]) == (40, len(targets), 1, 0.95)
    for m in BOOTSTRAP_METRICS:
        assert boot["difference"][m][0] > 0, m
        assert boot["share_a_ge_b"][m] == 1.0, m
        assert boot["a"][m][0] > boot["b"][m][1], m  # the two intervals do not even overlap here
    # Every resample is scored like the whole split: the point estimates lie inside their own intervals.
    point = detection_metrics(good, targets, score_threshold=0.5, class_names=CLASS_NAMES)
    for m in BOOTSTRAP_METRICS:
        lo, hi = boot["a"][m]
        assert lo - 1e-9 <= point[m] <= hi + 1e-9, m


def test_the_same_system_twice_differs_by_exactly_zero_and_seeds_reproduce(split) -> None:
    targets, _, poor = split
    boot = paired_bootstrap(poor, poor, targets, thresholds=(0.3, 0.3), samples=30, seed=7)
    for m in BOOTSTRAP_METRICS:
        assert boot["difference"][m] == [0.0, 0.0]
        assert boot["a"][m] == boot["b"][m]
        assert boot["a"][m][0] < boot["a"][m][1]  # 10 images: resampling moves the figures
    assert paired_bootstrap(poor, poor, targets, thresholds=(0.3, 0.3), samples=30, seed=7) == boot
    assert paired_bootstrap(poor, poor, targets, thresholds=(0.3, 0.3), samples=30, seed=8)["a"] != boot["a"]
    assert format_interval(boot["a"]["map_50"]) == f"[{boot['a']['map_50'][0]:.3f}, {boot['a']['map_50'][1]:.3f}]"


def test_bad_arguments_are_named(split) -> None:
    targets, good, poor = split
    with pytest.raises(ValueError, match="samples >= 1"):
        paired_bootstrap(good, poor, targets, thresholds=(0.5, 0.5), samples=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(good, poor, targets, thresholds=(0.5, 0.5), samples=5, level=1.5)
    with pytest.raises(ValueError):
        paired_bootstrap(good[:3], poor, targets, thresholds=(0.5, 0.5), samples=5)
