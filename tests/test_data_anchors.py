"""k-means anchor shapes with the 1 - IoU distance, against hand-checked cases and the real boxes."""

from __future__ import annotations

import numpy as np
import pytest

from detection.data.anchors import kmeans_anchor_shapes, mean_best_iou, wh_iou


def _cluster(w: float, h: float) -> list[tuple[float, float]]:
    # 9 boxes around (w, h): the per-coordinate median is exactly (w, h)
    return [(w + dw, h + dh) for dw in (-1, 0, 1) for dh in (-1, 0, 1)]


def test_three_tight_clusters_give_their_centers_sorted_by_area():
    wh = np.array(_cluster(64, 32) + _cluster(10, 10) + _cluster(20, 40))
    shapes = kmeans_anchor_shapes(wh, k=3, seed=0)
    # areas: 10 * 10 = 100 < 20 * 40 = 800 < 64 * 32 = 2048
    np.testing.assert_array_equal(shapes, [[10, 10], [20, 40], [64, 32]])
    assert shapes.shape == (3, 2)


def test_same_seed_same_shapes():
    wh = np.random.default_rng(0).uniform(8, 100, size=(200, 2))
    np.testing.assert_array_equal(kmeans_anchor_shapes(wh, k=5, seed=1), kmeans_anchor_shapes(wh, k=5, seed=1))


def test_wh_iou_and_mean_best_iou_by_hand():
    # corner-aligned (10, 10) vs (20, 20): 100 / 400 = 0.25; (10, 20) vs (20, 10): 100 / (200 + 200 - 100) = 1/3
    np.testing.assert_allclose(wh_iou(np.array([[10, 10], [10, 20]]), np.array([[20, 20], [20, 10]])),
                               [[0.25, 0.5], [0.5, 1 / 3]])
    # best IoUs 1.0 and 0.25 -> mean 0.625
    assert mean_best_iou(np.array([[10, 10], [20, 20]]), np.array([[10, 10]])) == pytest.approx(0.625)


def test_more_shapes_fit_better():
    wh = np.random.default_rng(1).lognormal(mean=3.5, sigma=0.5, size=(300, 2))
    fits = [mean_best_iou(wh, kmeans_anchor_shapes(wh, k=k, seed=0)) for k in (1, 3, 9)]
    assert fits[0] < fits[1] < fits[2] <= 1.0


def test_single_box_and_duplicates():
    np.testing.assert_array_equal(kmeans_anchor_shapes(np.array([[12.0, 7.0]]), k=1), [[12, 7]])
    shapes = kmeans_anchor_shapes(np.array([[5.0, 5.0]] * 4 + [[30.0, 10.0]] * 4), k=2, seed=0)
    np.testing.assert_array_equal(shapes, [[5, 5], [30, 10]])


def test_bad_input_names_the_numbers():
    with pytest.raises(ValueError, match=r"`num_boxes >= k` must hold for k-means, but got \(num_boxes=2, k=9\)"):
        kmeans_anchor_shapes(np.ones((2, 2)), k=9)
    with pytest.raises(ValueError, match=r"shape \[N, 2\] \(w, h\) with N >= 1, but got shape \[0, 2\]"):
        kmeans_anchor_shapes(np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"shape \[N, 2\] .* but got shape \[5, 4\]"):
        kmeans_anchor_shapes(np.ones((5, 4)), k=2)
    with pytest.raises(ValueError, match="finite positive widths and heights, but got min 0.0"):
        kmeans_anchor_shapes(np.array([[1.0, 2.0], [0.0, 3.0]]), k=1)
    with pytest.raises(ValueError, match=r"`k >= 1` must hold, but got \(k=0\)"):
        kmeans_anchor_shapes(np.ones((5, 2)), k=0)


def test_deepforest_boxes(deepforest_index):
    boxes = np.concatenate([r.boxes for r in deepforest_index.images])  # [M, 4] xyxy absolute
    wh = boxes[:, 2:] - boxes[:, :2]
    shapes = kmeans_anchor_shapes(wh, k=9, seed=0)
    areas = shapes.prod(axis=1)
    assert np.all(np.diff(areas) >= 0)
    assert wh.min() <= shapes.min() and shapes.max() <= wh.max()
    # tree crowns are roughly square, 8 to 108 px: nine shapes fit them closely
    assert mean_best_iou(wh, shapes) > 0.8  # 0.858 with seed 0 (k = 3 gives 0.75)
