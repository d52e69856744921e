from __future__ import annotations

import numpy as np
import pytest
import torch
from ensemble_boxes import weighted_boxes_fusion

from detection.fusion import boxes_to_absolute, boxes_to_normalized, fuse_predictions
from detection.metrics import MAX_DETECTIONS


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _sorted_rows(pred):
    """[K, 6] rows (x1, y1, x2, y2, score, label) in a canonical order, for order-free comparison."""
    rows = torch.cat([pred["boxes"], pred["scores"][:, None], pred["labels"][:, None].float()], dim=1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def test_normalize_roundtrip_and_clamp():
    size = (100, 200)  # (h, w)
    boxes = np.array([[20.0, 10.0, 60.0, 50.0], [-10.0, 90.0, 250.0, 120.0]])
    normalized = boxes_to_normalized(boxes, size)
    # x / 200, y / 100; the second box is clamped to the image: (0, 0.9, 1, 1)
    np.testing.assert_allclose(normalized, [[0.1, 0.1, 0.3, 0.5], [0.0, 0.9, 1.0, 1.0]])
    np.testing.assert_allclose(boxes_to_absolute(normalized, size), [[20, 10, 60, 50], [0, 90, 200, 100]])


def test_single_model_gives_back_its_boxes():
    pred = _pred(
        [[10, 10, 50, 40], [100, 20, 150, 90], [60, 60, 80, 95], [12, 11, 49, 41]],
        [0.9, 0.7, 0.2, 0.6],
        [1, 2, 1, 2],  # the 4th box overlaps the 1st but has another label: no fusion
    )
    (fused,) = fuse_predictions([[pred]], [(100, 200)], weights=[1.0], skip_box_thr=0.3)
    expected = {key: value[[0, 1, 3]] for key, value in pred.items()}  # 0.2 < skip_box_thr
    np.testing.assert_allclose(_sorted_rows(fused), _sorted_rows(expected), atol=1e-4)
    assert fused["labels"].dtype == torch.int64
    assert fused["scores"].tolist() == sorted(fused["scores"].tolist(), reverse=True)


def test_two_models_fuse_to_weighted_average():
    size = (100, 200)
    model_a = [_pred([[20, 10, 60, 50], [150, 60, 190, 90]], [0.9, 0.5], [1, 2])]
    model_b = [_pred([[24, 14, 64, 54]], [0.6], [1])]
    (fused,) = fuse_predictions([model_a, model_b], [size], weights=[1.0, 2.0], iou_thr=0.55)
    # IoU(a0, b0) = 36*36 / (1600 + 1600 - 1296) = 0.68 >= 0.55: one cluster.
    # Each box votes with score * weight: 0.9 * 1 = 0.9 and 0.6 * 2 = 1.2, so
    # x1 = (0.9*20 + 1.2*24) / 2.1 = 22.2857, y1 = (0.9*10 + 1.2*14) / 2.1 = 12.2857,
    # x2 = (0.9*60 + 1.2*64) / 2.1 = 62.2857, y2 = (0.9*50 + 1.2*54) / 2.1 = 52.2857;
    # score = mean vote * min(2 models, 2 boxes) / sum(weights) = 1.05 * 2 / 3 = 0.7.
    # a1 is alone: score = 0.5 * 1 * min(2, 1) / 3 = 0.1667, box unchanged.
    assert fused["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(fused["scores"].numpy(), [0.7, 0.5 / 3], rtol=1e-5)
    np.testing.assert_allclose(
        fused["boxes"].numpy(),
        [[46.8 / 2.1, 25.8 / 2.1, 130.8 / 2.1, 109.8 / 2.1], [150, 60, 190, 90]],
        rtol=1e-5,
    )


def test_fused_boxes_are_capped_at_the_detection_limit():
    # Two models, 200 boxes each on a grid, none overlapping: 400 clusters, of which the 300 best are kept.
    rng = np.random.default_rng(0)
    cells = [(x, y) for x in range(20) for y in range(20)]
    preds = []
    for half in (cells[:200], cells[200:]):
        boxes = [[10 * x, 10 * y, 10 * x + 8, 10 * y + 8] for x, y in half]
        preds.append([_pred(boxes, rng.uniform(0.01, 1.0, len(half)).tolist(), [1] * len(half))])
    (fused,) = fuse_predictions(preds, [(200, 200)], weights=None)
    all_scores = np.sort(np.concatenate([p[0]["scores"].numpy() for p in preds]))[::-1] / 2  # 1 box of 2 models
    assert len(fused["scores"]) == MAX_DETECTIONS == 300
    np.testing.assert_allclose(fused["scores"].numpy(), all_scores[:300], rtol=1e-5)
    (few,) = fuse_predictions(preds, [(200, 200)], weights=None, max_detections=10)
    np.testing.assert_allclose(few["scores"].numpy(), all_scores[:10], rtol=1e-5)


def test_agrees_with_ensemble_boxes():
    rng = np.random.default_rng(0)
    sizes = [(300, 400), (250, 250)]
    weights = [1.0, 2.0, 0.5]
    per_model = []
    for _ in weights:
        preds = []
        for h, w in sizes:
            xy = rng.uniform(0, [w - 60, h - 60], size=(12, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(10, 60, size=(12, 2))], axis=1)
            preds.append(_pred(boxes, rng.uniform(0.05, 1, 12), rng.integers(1, 3, 12)))
        per_model.append(preds)

    fused = fuse_predictions(per_model, sizes, weights=weights, iou_thr=0.4, skip_box_thr=0.1, conf_type="max")
    for i, (h, w) in enumerate(sizes):
        scale = np.array([w, h, w, h])
        boxes, scores, labels = weighted_boxes_fusion(
            [p[i]["boxes"].double().numpy() / scale for p in per_model],
            [p[i]["scores"].numpy() for p in per_model],
            [p[i]["labels"].numpy() for p in per_model],
            weights=weights, iou_thr=0.4, skip_box_thr=0.1, conf_type="max",
        )
        np.testing.assert_allclose(fused[i]["boxes"].numpy(), boxes * scale, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(fused[i]["scores"].numpy(), scores, rtol=1e-5)
        np.testing.assert_array_equal(fused[i]["labels"].numpy(), labels.astype(np.int64))
        assert len(boxes) > 0


def test_empty_inputs():
    empty = _pred([], [], [])
    one = _pred([[1, 1, 5, 5]], [0.9], [1])
    fused = fuse_predictions([[empty, one], [empty, empty]], [(10, 10), (10, 10)], weights=None)
    assert fused[0]["boxes"].shape == (0, 4) and fused[0]["labels"].dtype == torch.int64
    # one of two equal-weight models found it: 0.9 * min(2, 1) / 2 = 0.45
    assert fused[1]["scores"].tolist() == pytest.approx([0.45])
    assert fuse_predictions([[], []], [], weights=[1, 1]) == []
    outside = _pred([[20, 20, 30, 30]], [0.9], [1])  # wholly outside a 10x10 image
    assert fuse_predictions([[outside]], [(10, 10)], weights=[1])[0]["boxes"].shape == (0, 4)


def test_rejects_bad_arguments():
    one = [_pred([[1, 1, 5, 5]], [0.9], [1])]
    with pytest.raises(ValueError, match="2 positive model weights"):
        fuse_predictions([one, one], [(10, 10)], weights=[1.0])
    with pytest.raises(ValueError, match="conf_type"):
        fuse_predictions([one], [(10, 10)], weights=[1.0], conf_type="mean")
    with pytest.raises(ValueError, match="model 1 has 0"):
        fuse_predictions([one, []], [(10, 10)], weights=None)
    with pytest.raises(ValueError, match=r"`max_detections >= 1` must hold, but got max_detections=0"):
        fuse_predictions([one], [(10, 10)], weights=None, max_detections=0)
