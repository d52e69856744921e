"""Detection metrics: COCO mAP (torchmetrics), F1 at a score threshold, precision-recall curves.

Every function takes the torchvision detector contract, one dict per image:

- ``preds[i]``:   ``boxes`` float [N, 4] xyxy absolute pixels, ``scores`` float [N], ``labels`` int64 [N] (1..C)
- ``targets[i]``: ``boxes`` float [M, 4] xyxy absolute pixels, ``labels`` int64 [M] (1..C),
  optional ``iscrowd`` int64 [M] (crowd boxes are ignored, as COCO does)

Metric names are the project-wide strings: ``map``, ``map_50``, ``map_75``, ``f1``, ``precision``,
``recall``, ``score`` (= 0.5 * map_50 + 0.5 * f1), ``ap/<class name>`` (AP@[.5:.95]) and
``ap_50/<class name>`` (AP@0.5).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

__all__ = [
    "MAX_DETECTIONS",
    "METRIC_NAMES",
    "Matches",
    "best_f1_threshold",
    "detection_metrics",
    "f1_at_iou",
    "keep_classes",
    "map_50",
    "match_predictions",
    "mean_average_precision",
    "precision_recall_curve",
]

METRIC_NAMES = ("map", "map_50", "map_75", "f1", "precision", "recall", "score")

# faster_coco_eval is the same algorithm as pycocotools in C++ (several times faster on big val sets).
_MAP_BACKEND = "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
# It logs its whole COCO summary table at INFO on every evaluation: keep the console for our own lines.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

# COCOeval's own float64 grids. torchmetrics' defaults come from float32 torch.linspace, where
# 0.8 is 0.800000012: a recall of exactly 4/5 then misses that recall point and AP drifts ~1e-3.
_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
_COCO_REC_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()

# COCO counts 100 detections per image; dense scenes (tree crowns: up to a few hundred per tile) need
# more, and the project's detectors return up to 300 (torchvision's box_detections_per_img).
MAX_DETECTIONS = 300

Detections = Sequence[Mapping[str, torch.Tensor]]


def detection_metrics(
    preds: Detections,
    targets: Detections,
    *,
    score_threshold: float | None,
    class_names: Sequence[str],
    max_detections: int = MAX_DETECTIONS,
    matches: Matches | None = None,
) -> dict[str, float]:
    """All validation metrics of one split, as plain floats.

    ``map``/``map_50``/``map_75`` and the per-class APs use every prediction (COCO ranks by score,
    a threshold would only lower AP); ``f1``/``precision``/``recall`` use the predictions with
    ``score >= score_threshold`` (see :func:`f1_at_iou`). ``score_threshold=None`` picks the
    F1-optimal threshold on these predictions (:func:`best_f1_threshold`); the threshold used is
    returned as ``score_threshold`` either way.

    Undefined values (no ground truth at all, or a class without ground truth) are reported as
    0.0, never as torchmetrics' -1, so that fold means stay finite and comparable.

    Args:
        preds: one dict per image (``boxes`` [N, 4] xyxy absolute, ``scores`` [N], ``labels`` [N]).
        targets: one dict per image (``boxes`` [M, 4] xyxy absolute, ``labels`` [M]), same order.
        score_threshold: minimum score of a prediction counted by F1.
        class_names: name of label ``i + 1`` at index ``i``.
        max_detections: highest-scored detections per image that mAP counts (see
            :data:`MAX_DETECTIONS`); F1 counts every detection above the threshold.
        matches: :func:`match_predictions` of these predictions, when the caller has it already.

    Returns:
        ``map, map_50, map_75, f1, precision, recall, score`` and ``ap/<name>``, ``ap_50/<name>``
        for every class name.
    """
    _check_inputs(preds, targets)
    result = mean_average_precision(preds, targets, class_names=class_names, max_detections=max_detections)
    if matches is None:
        matches = match_predictions(preds, targets, iou_threshold=0.5)
    if score_threshold is None:
        score_threshold = matches.best_f1()[0]
    precision, recall, f1 = matches.at(score_threshold)
    result.update(f1=f1, precision=precision, recall=recall, score_threshold=float(score_threshold))
    result["score"] = 0.5 * result["map_50"] + 0.5 * f1
    return result


def keep_classes(preds: Detections, targets: Detections, labels: Iterable[int]
                 ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The predictions and ground truth of the classes in ``labels`` only (COCOeval's ``catIds``): the metrics
    of that category subset. Returns new ``boxes``/``scores``/``labels`` and ``boxes``/``labels``/``iscrowd``
    dicts."""
    _check_inputs(preds, targets)
    keep = torch.tensor(sorted(set(labels)), dtype=torch.int64)
    kept_preds, kept_targets = [], []
    for pred, target in zip(preds, targets):
        pred, target = _as_pred(pred), _as_target(target)
        pred_kept, target_kept = torch.isin(pred["labels"], keep), torch.isin(target["labels"], keep)
        kept_preds.append({k: v[pred_kept] for k, v in pred.items()})
        kept_targets.append({k: v[target_kept] for k, v in target.items()})
    return kept_preds, kept_targets


def mean_average_precision(
    preds: Detections,
    targets: Detections,
    *,
    class_names: Sequence[str],
    max_detections: int = MAX_DETECTIONS,
) -> dict[str, float]:
    """COCO bbox mAP via torchmetrics' ``MeanAveragePrecision``, counting the ``max_detections``
    highest-scored detections per image (COCO's maxDets ``[1, 10, max_detections]``).

    Returns ``map``, ``map_50``, ``map_75``, ``ap/<name>`` (AP@[.5:.95]) and ``ap_50/<name>``
    (AP@0.5, read from the same COCOeval precision table: no second evaluation). Undefined -> 0.0.
    """
    _check_inputs(preds, targets)
    if len(class_names) == 0:
        raise ValueError(f"`class_names` must name at least one class, but got {class_names!r}.")
    summary = _coco_map(preds, targets, iou_thresholds=_COCO_IOU_THRESHOLDS, max_detections=max_detections,
                        class_metrics=True, extended_summary=True)

    result = {key: _defined(summary[key].item()) for key in ("map", "map_50", "map_75")}
    per_class = {name: 0.0 for name in class_names}
    per_class_50 = {name: 0.0 for name in class_names}
    classes = summary["classes"].reshape(-1).tolist()  # sorted labels seen in preds or targets
    if classes:
        ap_per_class = summary["map_per_class"].reshape(-1).tolist()
        # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max dets];
        # T index 0 is IoU 0.5, A index 0 is "all", M index -1 is max_detections.
        precision_50 = summary["precision"][0, :, :, 0, -1]  # [R, K]
        for k, label in enumerate(classes):
            name = class_name(label, class_names)
            per_class[name] = _defined(ap_per_class[k])
            curve = precision_50[:, k]
            curve = curve[curve > -1]  # -1 marks "no ground truth of this class"
            per_class_50[name] = float(curve.mean()) if curve.numel() else 0.0
    result.update({f"ap/{name}": value for name, value in per_class.items()})
    result.update({f"ap_50/{name}": value for name, value in per_class_50.items()})
    return result


def map_50(preds: Detections, targets: Detections, *, max_detections: int = MAX_DETECTIONS) -> float:
    """COCO mAP at IoU 0.5 alone: :func:`mean_average_precision`'s ``map_50`` at a tenth of the work (one IoU
    threshold, no per-class table), for figures recomputed many times (detection/bootstrap.py)."""
    _check_inputs(preds, targets)
    return _defined(_coco_map(preds, targets, iou_thresholds=[0.5], max_detections=max_detections)["map"].item())


def _coco_map(preds: Detections, targets: Detections, *, iou_thresholds: Sequence[float], max_detections: int,
              **options: Any) -> dict[str, torch.Tensor]:
    """torchmetrics' COCO evaluation with COCOeval's own grids and maxDets ``[1, 10, max_detections]``."""
    if max_detections < 10:
        raise ValueError(
            f"`max_detections >= 10` must hold (COCO's maxDets are 1, 10, N), but got {max_detections=}."
        )
    metric = MeanAveragePrecision(iou_type="bbox", backend=_MAP_BACKEND, iou_thresholds=list(iou_thresholds),
                                  rec_thresholds=_COCO_REC_THRESHOLDS,
                                  max_detection_thresholds=[1, 10, max_detections], **options)
    metric.update([_as_pred(p) for p in preds], [_as_target(t) for t in targets])
    return metric.compute()


def f1_at_iou(
    preds: Detections,
    targets: Detections,
    *,
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> tuple[float, float, float]:
    """Precision, recall and F1 of the predictions with ``score >= score_threshold``.

    Matching is greedy, class-aware and score-ordered, per image: each kept prediction, from the
    highest score down, takes the unmatched ground-truth box of its own class with the highest IoU
    (``torchvision.ops.box_iou``, xyxy absolute) if that IoU is ``>= iou_threshold`` (TP), else it
    is a FP; unmatched ground truth is FN. A prediction that only matches a crowd box is ignored.
    TP/FP/FN are summed over all images before dividing; an undefined ratio (0/0) is 0.0.

    Returns:
        ``(precision, recall, f1)`` with ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
        ``f1 = 2 * precision * recall / (precision + recall)``.
    """
    return match_predictions(preds, targets, iou_threshold=iou_threshold).at(score_threshold)


@dataclass(frozen=True)
class Matches:
    """Every prediction of a set of images, matched once (greedy, class-aware, see :func:`f1_at_iou`).

    ``scores`` float64 [P] descending, ``is_tp`` bool [P], ``counted`` bool [P] (False: it only matched a
    crowd box), ``num_gt`` the non-crowd ground-truth boxes. Matches of disjoint image sets pool with
    :meth:`concat`, so K folds' out-of-fold predictions give one precision-recall curve without the images.
    """

    scores: np.ndarray
    is_tp: np.ndarray
    counted: np.ndarray
    num_gt: int

    @staticmethod
    def concat(parts: Sequence[Matches]) -> Matches:
        if not parts:
            return Matches(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool), 0)
        scores = np.concatenate([p.scores for p in parts])
        order = np.argsort(-scores, kind="stable")
        return Matches(scores[order], np.concatenate([p.is_tp for p in parts])[order],
                       np.concatenate([p.counted for p in parts])[order], sum(p.num_gt for p in parts))

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.tolist(), "is_tp": self.is_tp.tolist(), "counted": self.counted.tolist(),
                "num_gt": self.num_gt}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Matches:
        return Matches(np.asarray(data["scores"], dtype=np.float64), np.asarray(data["is_tp"], dtype=bool),
                       np.asarray(data["counted"], dtype=bool), int(data["num_gt"]))

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(precision [P], recall [P], thresholds [P])``: see :func:`precision_recall_curve`."""
        if not len(self.scores):
            return np.zeros(0), np.zeros(0), np.zeros(0)
        cum_tp = np.cumsum(self.is_tp)
        cum_fp = np.cumsum(~self.is_tp & self.counted)
        denom = cum_tp + cum_fp
        precision = np.divide(cum_tp, denom, out=np.zeros(len(self.scores)), where=denom > 0)
        recall = cum_tp / self.num_gt if self.num_gt else np.zeros(len(self.scores))
        return precision, recall.astype(np.float64), self.scores.copy()

    def best_f1(self) -> tuple[float, float]:
        """``(threshold, f1)``: the score threshold with the highest F1 and that F1.

        Every distinct score is a candidate (F1 only changes where a prediction enters), so no threshold
        gives a higher F1 on the same predictions. Ties go to the higher threshold (fewer boxes, same F1).
        Without predictions, or when nothing matches, ``(0.5, 0.0)``.
        """
        precision, recall, thresholds = self.curve()
        if not len(thresholds):
            return 0.5, 0.0
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        # Point j counts every prediction with score >= thresholds[j]; among equal scores only the last
        # point of the run is a threshold that can actually be applied.
        last_of_run = np.append(thresholds[1:] != thresholds[:-1], True)
        f1 = np.where(last_of_run, f1, -1.0)
        if f1.max() <= 0:
            return 0.5, 0.0
        best = int(np.flatnonzero(f1 == f1.max())[0])  # thresholds descend: the first is the highest
        return float(thresholds[best]), float(f1[best])

    def at(self, score_threshold: float) -> tuple[float, float, float]:
        """``(precision, recall, f1)`` of the predictions with ``score >= score_threshold``; an undefined
        ratio (0/0) is 0.0. (Greedy matching in score order: a lower-scored box never changes an earlier
        match, so matching all boxes once and cutting afterwards equals matching the kept boxes.)"""
        keep = self.scores >= np.float32(score_threshold)  # as torch compares float32 scores with a Python float
        tp = int((self.is_tp & keep).sum())
        fp = int((~self.is_tp & self.counted & keep).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / self.num_gt if self.num_gt else 0.0
        return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    def f1_at(self, score_threshold: float) -> float:
        """F1 of the predictions with ``score >= score_threshold``."""
        return self.at(score_threshold)[2]


def match_predictions(
    preds: Detections,
    targets: Detections,
    *,
    iou_threshold: float = 0.5,
    label: int | None = None,
) -> Matches:
    """Match every prediction once (the matching of :func:`f1_at_iou`); ``label`` keeps one class only."""
    _check_inputs(preds, targets)
    _check_iou_threshold(iou_threshold)
    parts = []
    for pred, target in zip(preds, targets):
        pred, target = _as_pred(pred), _as_target(target)
        if label is not None:
            pred = {key: value[pred["labels"] == label] for key, value in pred.items()}
            target = {key: value[target["labels"] == label] for key, value in target.items()}
        is_tp, ignored, num_gt = _match_image(pred["boxes"], pred["scores"], pred["labels"], target, iou_threshold)
        order = torch.argsort(pred["scores"], descending=True, stable=True)
        parts.append(Matches(pred["scores"][order].double().numpy(), is_tp.numpy(), ~ignored.numpy(), num_gt))
    return Matches.concat(parts)


def best_f1_threshold(preds: Detections, targets: Detections, *, iou_threshold: float = 0.5) -> float:
    """The F1-optimal score threshold on these predictions (:meth:`Matches.best_f1`)."""
    return match_predictions(preds, targets, iou_threshold=iou_threshold).best_f1()[0]


def precision_recall_curve(
    preds: Detections,
    targets: Detections,
    *,
    iou_threshold: float = 0.5,
    label: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of every score threshold, with the matching of :func:`f1_at_iou`.

    Point ``j`` is what :func:`f1_at_iou` reports at ``score_threshold=thresholds[j]`` (greedy
    matching in score order makes lower-scored predictions unable to change earlier matches).

    Args:
        label: only this class (1..C); ``None`` pools all classes (matching stays class-aware).

    Returns:
        ``(precision [P], recall [P], thresholds [P])`` float64 arrays, thresholds descending, one
        point per prediction (ties in score give one point each); empty arrays without predictions.
        ``recall`` is 0.0 everywhere when there is no ground truth.
    """
    return match_predictions(preds, targets, iou_threshold=iou_threshold, label=label).curve()


def _match_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    target: Mapping[str, torch.Tensor],
    iou_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Greedy score-ordered matching of one image.

    Returns ``(is_tp [N] bool, ignored [N] bool, num_non_crowd_gt)`` with N indexed in descending
    score order (stable on ties).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, labels = boxes[order], labels[order]
    crowd = target["iscrowd"].bool()
    gt_boxes, gt_labels = target["boxes"], target["labels"]
    num_gt = int((~crowd).sum())
    is_tp = torch.zeros(len(boxes), dtype=torch.bool)
    ignored = torch.zeros(len(boxes), dtype=torch.bool)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return is_tp, ignored, num_gt
    iou = box_iou(boxes.float(), gt_boxes.float())  # [N, M]
    iou[labels[:, None] != gt_labels[None, :]] = -1.0  # class-aware: other classes never match
    crowd_iou = iou[:, crowd]  # [N, M_crowd]
    iou = iou[:, ~crowd]  # [N, M_non_crowd]
    taken = torch.zeros(iou.shape[1], dtype=torch.bool)
    for i in range(len(boxes)):
        candidates = iou[i].masked_fill(taken, -1.0)
        if candidates.numel():
            best = int(candidates.argmax())
            if candidates[best] >= iou_threshold:
                is_tp[i] = True
                taken[best] = True
                continue
        if crowd_iou.shape[1] and bool((crowd_iou[i] >= iou_threshold).any()):
            ignored[i] = True
    return is_tp, ignored, num_gt


def _as_pred(pred: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "boxes": pred["boxes"].detach().cpu().float().reshape(-1, 4),
        "scores": pred["scores"].detach().cpu().float().reshape(-1),
        "labels": pred["labels"].detach().cpu().long().reshape(-1),
    }


def _as_target(target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    labels = target["labels"].detach().cpu().long().reshape(-1)
    iscrowd = target.get("iscrowd")
    iscrowd = torch.zeros_like(labels) if iscrowd is None else iscrowd.detach().cpu().long().reshape(-1)
    return {"boxes": target["boxes"].detach().cpu().float().reshape(-1, 4), "labels": labels, "iscrowd": iscrowd}


def _check_inputs(preds: Detections, targets: Detections) -> None:
    if len(preds) != len(targets):
        raise ValueError(
            f"Expected one prediction dict per target dict, but got {len(preds)} predictions and "
            f"{len(targets)} targets."
        )
    for i, (pred, target) in enumerate(zip(preds, targets)):
        checks = (("preds", pred, ("boxes", "scores", "labels")), ("targets", target, ("boxes", "labels")))
        for what, entry, keys in checks:
            missing = [key for key in keys if key not in entry]
            if missing:
                raise ValueError(f"Expected {what}[{i}] to have keys {keys}, but it lacks {missing}.")
            boxes = entry["boxes"]
            if boxes.numel() and (boxes.ndim != 2 or boxes.shape[-1] != 4):  # empty may come as [0]
                raise ValueError(
                    f"Expected {what}[{i}]['boxes'] to be a tensor of shape [N, 4], got {tuple(boxes.shape)}."
                )
            if entry["labels"].numel() != boxes.numel() // 4:
                raise ValueError(
                    f"Expected {what}[{i}] to have one label per box, but got {entry['labels'].numel()} labels "
                    f"for {boxes.numel() // 4} boxes."
                )
        if pred["scores"].numel() != pred["boxes"].numel() // 4:
            raise ValueError(
                f"Expected preds[{i}] to have one score per box, but got {pred['scores'].numel()} scores "
                f"for {pred['boxes'].numel() // 4} boxes."
            )


def _check_iou_threshold(iou_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"`0 < iou_threshold <= 1` must hold, but got {iou_threshold=}.")


def class_name(label: int, class_names: Sequence[str]) -> str:
    """The name of a contiguous label 1..C; a ValueError for a label outside it."""
    if not 1 <= label <= len(class_names):
        raise ValueError(
            f"Expected labels in 1..{len(class_names)} (one per class name in {tuple(class_names)}), "
            f"but got label {label}."
        )
    return class_names[label - 1]


def _defined(value: float) -> float:
    """torchmetrics/COCO write -1 for "undefined" (no ground truth): report 0.0 instead."""
    return 0.0 if value < 0 or math.isnan(value) else float(value)
