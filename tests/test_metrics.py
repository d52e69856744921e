from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from detection.metrics import (
    MAX_DETECTIONS,
    METRIC_NAMES,
    Matches,
    best_f1_threshold,
    detection_metrics,
    f1_at_iou,
    keep_classes,
    match_predictions,
    mean_average_precision,
    precision_recall_curve,
)

CLASS_NAMES = ("Tree", "Dead", "Alive")


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _target(boxes, labels, iscrowd=None):
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if iscrowd is not None:
        target["iscrowd"] = torch.tensor(iscrowd, dtype=torch.int64)
    return target


def _random_dataset(seed: int = 0, num_images: int = 6):
    """Seeded images with 3 classes: jittered hits, misses, duplicates, wrong classes and pure FPs."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(num_images):
        num_gt = 0 if i == 4 else int(rng.integers(3, 9))  # image 4 has no ground truth
        xy = rng.uniform(0, 300, size=(num_gt, 2))
        wh = rng.uniform(12, 90, size=(num_gt, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1)
        gt_labels = rng.integers(1, 4, size=num_gt)
        boxes, scores, labels = [], [], []
        for box, label in zip(gt_boxes, gt_labels):
            if i == 5 or rng.random() < 0.2:  # image 5 gets no prediction at all; others miss ~20%
                continue
            jitter = rng.normal(0, 0.12, size=4) * np.r_[box[2:] - box[:2], box[2:] - box[:2]]
            boxes.append(box + jitter)
            scores.append(rng.uniform(0.05, 1.0))
            labels.append(label if rng.random() > 0.15 else rng.integers(1, 4))
            if rng.random() < 0.2:  # duplicate detection of the same object
                boxes.append(box + rng.normal(0, 3, size=4))
                scores.append(rng.uniform(0.05, 1.0))
                labels.append(label)
        if i != 5:
            for _ in range(int(rng.integers(1, 4))):  # false positives on background
                xy_fp = rng.uniform(0, 300, size=2)
                boxes.append(np.r_[xy_fp, xy_fp + rng.uniform(10, 60, size=2)])
                scores.append(rng.uniform(0.05, 1.0))
                labels.append(rng.integers(1, 4))
        boxes_np = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        boxes_np[:, 2:] = np.maximum(boxes_np[:, 2:], boxes_np[:, :2] + 1)
        preds.append(_pred(boxes_np, scores, labels))
        targets.append(_target(gt_boxes.astype(np.float32), gt_labels))
    return preds, targets


def _cocoeval(preds, targets, max_detections=100):
    """The reference: pycocotools' COCOeval on the same boxes, built in memory (xywh)."""
    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(preds, targets)):
        images.append({"id": image_id, "width": 400, "height": 400})
        # xywh in float32 as torchmetrics converts them: a float64 width can move an IoU across a threshold
        gt_xywh = box_convert(target["boxes"], "xyxy", "xywh").tolist()
        for box, label in zip(gt_xywh, target["labels"].tolist()):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                 "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            )
        pred_xywh = box_convert(pred["boxes"], "xyxy", "xywh").tolist()
        for box, score, label in zip(pred_xywh, pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label, "score": score, "bbox": box})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASS_NAMES)],
        }
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _coco_ap(evaluator, *, iou_index=None, class_index=None):
    """AP as COCOeval.summarize() computes it (all areas, the last maxDets), from its precision table.

    summarize() itself only reports maxDets=100, so the table is read directly.
    """
    precision = evaluator.eval["precision"][..., 0, -1]  # [T iou thresholds, R recall points, K classes]
    if iou_index is not None:
        precision = precision[iou_index]
    if class_index is not None:
        precision = precision[..., class_index]
    return float(precision[precision > -1].mean()) if (precision > -1).any() else -1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_matches_pycocotools(seed):
    preds, targets = _random_dataset(seed)
    reference = _cocoeval(preds, targets, max_detections=MAX_DETECTIONS)
    ours = mean_average_precision(preds, targets, class_names=CLASS_NAMES)

    # IoU thresholds 0.50, 0.55, ..., 0.95: index 0 is AP@.5, index 5 is AP@.75
    assert ours["map"] == pytest.approx(_coco_ap(reference), abs=1e-4)
    assert ours["map_50"] == pytest.approx(_coco_ap(reference, iou_index=0), abs=1e-4)
    assert ours["map_75"] == pytest.approx(_coco_ap(reference, iou_index=5), abs=1e-4)
    assert 0.05 < ours["map"] < 0.95  # the dataset is neither trivial nor hopeless
    for k, name in enumerate(CLASS_NAMES):
        assert ours[f"ap/{name}"] == pytest.approx(_coco_ap(reference, class_index=k), abs=1e-4)
        assert ours[f"ap_50/{name}"] == pytest.approx(_coco_ap(reference, iou_index=0, class_index=k), abs=1e-4)


def test_map_matches_cocoeval_summary_at_100_detections():
    preds, targets = _random_dataset(3)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = _cocoeval(preds, targets, max_detections=100)
        reference.summarize()  # stock COCO numbers: stats[0..2] = AP@[.5:.95], AP@.5, AP@.75
    ours = mean_average_precision(preds, targets, class_names=CLASS_NAMES, max_detections=100)
    assert (ours["map"], ours["map_50"], ours["map_75"]) == pytest.approx(tuple(reference.stats[:3]), abs=1e-4)


def test_max_detections_caps_each_image_like_cocoeval():
    # 30 true boxes in one image, each found once, scores rising along the row;
    # with 10 detections counted only the 10 best are seen: recall 10/30.
    boxes = [[10.0 * i, 0.0, 10.0 * i + 8, 8.0] for i in range(30)]
    preds = [_pred(boxes, [0.5 + i / 100 for i in range(30)], [1] * 30)]
    targets = [_target(boxes, [1] * 30)]
    capped = _cocoeval(preds, targets, max_detections=10)
    with pytest.warns(UserWarning, match="more than 10 detections"):  # torchmetrics says it drops some
        ours = mean_average_precision(preds, targets, class_names=CLASS_NAMES, max_detections=10)
    assert ours["map_50"] == pytest.approx(_coco_ap(capped, iou_index=0), abs=1e-4)
    # precision 1 up to recall 10/30: 34 of the 101 recall points (0.00 .. 0.33) -> AP = 34 / 101
    assert ours["map_50"] == pytest.approx(34 / 101, abs=1e-4)
    assert mean_average_precision(preds, targets, class_names=CLASS_NAMES)["map_50"] == pytest.approx(1.0)


def _hand_case():
    preds = [
        _pred(
            [[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50], [20, 20, 30, 35], [40, 40, 50, 50]],
            [0.9, 0.8, 0.7, 0.6, 0.2],
            [1, 1, 1, 1, 2],
        ),
        _pred([[0, 0, 5, 5]], [0.95], [1]),  # an image without ground truth
        _pred([], [], []),  # an image without predictions
    ]
    targets = [
        _target([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 2]),
        _target([], []),
        _target([[0, 0, 10, 10]], [2]),
    ]
    return preds, targets


def test_f1_hand_computed():
    preds, targets = _hand_case()
    precision, recall, f1 = f1_at_iou(preds, targets, score_threshold=0.5)
    # image 0: 0.9 -> TP (IoU 1 with gt 0); 0.8 -> FP (IoU 90/110 with gt 0, already taken);
    #          0.7 -> FP (right place, wrong class); 0.6 -> TP (IoU 100/150 = 0.67 with gt 1);
    #          0.2 is under the threshold, so class-2 gt 2 is a FN
    # image 1: 0.95 -> FP (no ground truth); image 2: its gt is a FN
    # TP = 2, FP = 3, FN = 2 -> P = 2/5, R = 2/4, F1 = 2 * 0.4 * 0.5 / 0.9 = 0.4444
    assert precision == pytest.approx(0.4)
    assert recall == pytest.approx(0.5)
    assert f1 == pytest.approx(0.4 / 0.9)

    precision, recall, f1 = f1_at_iou(preds, targets, score_threshold=0.1)
    # 0.2 now matches gt 2 (class 2, IoU 1): TP = 3, FP = 3, FN = 1 -> P = 0.5, R = 0.75, F1 = 0.75 / 1.25
    assert (precision, recall) == pytest.approx((0.5, 0.75))
    assert f1 == pytest.approx(0.6)


def test_f1_takes_highest_iou_not_first():
    targets = [_target([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1])]
    preds = [_pred([[1.5, 0, 11.5, 10], [0, 0, 7, 10]], [0.9, 0.8], [1, 1])]
    # pred 0.9: IoU gt0 = 85/115 = 0.74, IoU gt1 = 95/105 = 0.90 -> takes gt1
    # pred 0.8: IoU gt0 = 70/100 = 0.70 -> TP (taking gt0 first would leave it IoU 50/120 = 0.42 with gt1)
    assert f1_at_iou(preds, targets, score_threshold=0.0) == pytest.approx((1.0, 1.0, 1.0))


def test_f1_ignores_crowd_regions():
    targets = [_target([[0, 0, 10, 10], [50, 50, 90, 90]], [1, 1], iscrowd=[0, 1])]
    preds = [_pred([[0, 0, 10, 10], [50, 50, 90, 90], [200, 200, 210, 210]], [0.9, 0.8, 0.7], [1, 1, 1])]
    # 0.9 TP; 0.8 only overlaps the crowd box -> ignored; 0.7 FP; the crowd box is never a FN
    # TP = 1, FP = 1, FN = 0 -> P = 0.5, R = 1, F1 = 1 / 1.5
    assert f1_at_iou(preds, targets, score_threshold=0.0) == pytest.approx((0.5, 1.0, 2 / 3))


def test_f1_empty_cases():
    empty_pred, empty_target = _pred([], [], []), _target([], [])
    assert f1_at_iou([], [], score_threshold=0.5) == (0.0, 0.0, 0.0)
    assert f1_at_iou([empty_pred], [empty_target], score_threshold=0.5) == (0.0, 0.0, 0.0)
    # predictions but no ground truth: TP = 0, FP = 1 -> P = 0; R = 0/0 -> 0
    assert f1_at_iou([_pred([[0, 0, 5, 5]], [0.9], [1])], [empty_target], score_threshold=0.5) == (0.0, 0.0, 0.0)
    # ground truth but no predictions: P = 0/0 -> 0; R = 0/1 = 0
    assert f1_at_iou([empty_pred], [_target([[0, 0, 5, 5]], [1])], score_threshold=0.5) == (0.0, 0.0, 0.0)


def test_precision_recall_curve_hand_computed():
    preds, targets = _hand_case()
    precision, recall, thresholds = precision_recall_curve(preds, targets)
    # by score: 0.95 FP, 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP, 0.2 TP; 4 ground-truth boxes
    # cumulative TP 0 1 1 1 2 3, FP 1 1 2 3 3 3
    np.testing.assert_allclose(thresholds, [0.95, 0.9, 0.8, 0.7, 0.6, 0.2], rtol=1e-6)
    np.testing.assert_allclose(precision, [0 / 1, 1 / 2, 1 / 3, 1 / 4, 2 / 5, 3 / 6])
    np.testing.assert_allclose(recall, [0 / 4, 1 / 4, 1 / 4, 1 / 4, 2 / 4, 3 / 4])
    for j in (1, 4, 5):  # each point is f1_at_iou's answer at that threshold
        p, r, _ = f1_at_iou(preds, targets, score_threshold=float(thresholds[j]))
        assert (p, r) == pytest.approx((precision[j], recall[j]))

    # class 2 alone: scores 0.2 TP; gt of class 2: 2 -> P = [1], R = [1/2]
    precision, recall, thresholds = precision_recall_curve(preds, targets, label=2)
    np.testing.assert_allclose(precision, [1.0])
    np.testing.assert_allclose(recall, [0.5])

    empty = precision_recall_curve([_pred([], [], [])], [_target([], [])])
    assert [len(a) for a in empty] == [0, 0, 0]


def test_best_f1_threshold_hand_computed_and_no_sampled_threshold_beats_it():
    preds, targets = _hand_case()
    # By score (see test_precision_recall_curve_hand_computed): cumulative TP 0 1 1 1 2 3, FP 1 1 2 3 3 3, 4 gt.
    # F1 at each cut: 0.95 -> 0; 0.9 -> 2/(2+1+3) = 1/3; 0.8 -> 2/7; 0.7 -> 1/4; 0.6 -> 4/9; 0.2 -> 6/10 = 0.6
    assert best_f1_threshold(preds, targets) == pytest.approx(0.2)
    matches = match_predictions(preds, targets)
    threshold, f1 = matches.best_f1()
    assert threshold == pytest.approx(0.2) and f1 == pytest.approx(0.6)
    for sampled in np.linspace(0.0, 1.0, 201):  # what a sampled `score_threshold` could have been
        assert f1 >= f1_at_iou(preds, targets, score_threshold=float(sampled))[2] - 1e-12
        # Cutting after one matching of every box equals matching only the kept boxes.
        kept = [{k: p[k][p["scores"] >= float(sampled)] for k in ("boxes", "scores", "labels")} for p in preds]
        assert matches.f1_at(float(sampled)) == pytest.approx(match_predictions(kept, targets).at(-1.0)[2])
    result = detection_metrics(preds, targets, score_threshold=None, class_names=CLASS_NAMES)
    assert result["score_threshold"] == pytest.approx(0.2) and result["f1"] == pytest.approx(0.6)
    # Nothing to match: the fallback cut 0.5 with F1 0.
    assert match_predictions([_pred([], [], [])], [_target([], [])]).best_f1() == (0.5, 0.0)


def test_matches_of_disjoint_images_pool_into_one_curve():
    preds, targets = _hand_case()
    pooled = Matches.concat([match_predictions(preds[:1], targets[:1]), match_predictions(preds[1:], targets[1:])])
    whole = match_predictions(preds, targets)
    np.testing.assert_allclose(pooled.scores, whole.scores)
    assert pooled.is_tp.tolist() == whole.is_tp.tolist() and pooled.num_gt == whole.num_gt == 4
    assert Matches.from_dict(pooled.to_dict()).best_f1() == pytest.approx(whole.best_f1())


def test_detection_metrics_keys_and_score():
    preds, targets = _hand_case()
    result = detection_metrics(preds, targets, score_threshold=0.5, class_names=CLASS_NAMES)
    expected = set(METRIC_NAMES) | {f"ap/{n}" for n in CLASS_NAMES} | {f"ap_50/{n}" for n in CLASS_NAMES}
    expected |= {"score_threshold"}  # the threshold F1 was computed at
    assert set(result) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())
    assert result["f1"] == pytest.approx(0.4 / 0.9)
    assert result["score"] == pytest.approx(0.5 * result["map_50"] + 0.5 * result["f1"])
    assert result["ap/Alive"] == 0.0  # no ground truth, no prediction of class 3: undefined -> 0.0
    # Tree at IoU 0.5: detections 0.95 FP, 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP over 2 gt -> precision
    # precision 0, 1/2, 1/3, 1/4, 2/5 at recall 0, 1/2, 1/2, 1/2, 1; its envelope is 0.5 up to recall
    # 0.5 (51 of COCO's 101 recall points) and 0.4 above it (50 points): AP = (51 * 0.5 + 50 * 0.4) / 101
    assert result["ap_50/Tree"] == pytest.approx((51 * 0.5 + 50 * 0.4) / 101, abs=1e-4)


def test_detection_metrics_empty():
    result = detection_metrics([], [], score_threshold=0.5, class_names=CLASS_NAMES)
    assert result["map"] == result["map_50"] == result["f1"] == result["score"] == 0.0
    only_fp = detection_metrics(
        [_pred([[0, 0, 5, 5]], [0.9], [1])], [_target([], [])], score_threshold=0.5, class_names=CLASS_NAMES
    )
    # torchmetrics' -1 ("undefined") comes back as 0.0; score_threshold is the cut F1 used, not a metric
    assert all(v == 0.0 for k, v in only_fp.items() if k != "score_threshold") and only_fp["score_threshold"] == 0.5


def test_detection_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions and 1 targets"):
        detection_metrics([_pred([], [], [])] * 2, [_target([], [])], score_threshold=0.5, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match=r"preds\[0\]\['boxes'\].*shape \[N, 4\]"):
        bad = {"boxes": torch.zeros(2, 5), "scores": torch.zeros(2), "labels": torch.ones(2, dtype=torch.int64)}
        f1_at_iou([bad], [_target([], [])], score_threshold=0.5)
    with pytest.raises(ValueError, match="labels in 1..3"):
        mean_average_precision([_pred([[0, 0, 5, 5]], [0.9], [7])], [_target([], [])], class_names=CLASS_NAMES)


def test_keep_classes_scores_a_category_subset_like_cocoeval_cat_ids(deepforest_index):
    # The tile with every Dead and Alive box and a Tree tile; predictions = the Tree ground truth (a model
    # that learnt Tree perfectly and never saw Dead or Alive).
    index = deepforest_index
    rare = next(r for r in index.images if {2, 3} & set(r.labels.tolist()))
    tree = next(r for r in index.images if len(r.boxes) and set(r.labels.tolist()) == {1})
    targets = [{"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels)} for r in (rare, tree)]
    preds = [{"boxes": t["boxes"][t["labels"] == 1], "labels": t["labels"][t["labels"] == 1],
              "scores": torch.ones(int((t["labels"] == 1).sum()))} for t in targets]
    everything = detection_metrics(preds, targets, score_threshold=0.5, class_names=index.class_names)
    assert everything["map_50"] == pytest.approx(1 / 3) and everything["ap_50/Dead"] == 0.0
    assert everything["recall"] == pytest.approx(len(tree.boxes) / (len(tree.boxes) + len(rare.boxes)))
    kept_preds, kept_targets = keep_classes(preds, targets, [1])
    tree_only = detection_metrics(kept_preds, kept_targets, score_threshold=0.5, class_names=index.class_names)
    assert tree_only["map_50"] == pytest.approx(1.0) and tree_only["f1"] == pytest.approx(1.0)
    assert [len(t["labels"]) for t in kept_targets] == [0, len(tree.boxes)]
    # A prediction of a left-out class is left out too (not a false positive).
    stray = [{**preds[0], "boxes": targets[0]["boxes"][:1] + 1, "labels": torch.tensor([2]),
              "scores": torch.tensor([0.9])}, preds[1]]
    assert detection_metrics(*keep_classes(stray, targets, [1]), score_threshold=0.5,
                             class_names=index.class_names)["precision"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one prediction dict per target"):
        keep_classes(preds[:1], targets, [1])
