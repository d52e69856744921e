"""Weighted Boxes Fusion of several detectors' predictions (``ensemble_boxes``).

The project's boxes are ``xyxy absolute`` pixels; ``ensemble_boxes`` wants ``normalized`` [0, 1]
xyxy. The conversion in both directions lives here and nowhere else
(:func:`boxes_to_normalized`, :func:`boxes_to_absolute`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ensemble_boxes import weighted_boxes_fusion

from detection.metrics import MAX_DETECTIONS

__all__ = ["CONF_TYPES", "boxes_to_absolute", "boxes_to_normalized", "fuse_predictions"]

CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


def boxes_to_normalized(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """``xyxy absolute`` [N, 4] -> ``normalized`` [N, 4] in [0, 1] (clamped), for an image of (h, w)."""
    height, width = image_size
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale, 0.0, 1.0)


def boxes_to_absolute(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """``normalized`` [N, 4] -> ``xyxy absolute`` [N, 4] pixels, for an image of (h, w)."""
    height, width = image_size
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale


def fuse_predictions(
    per_model_preds: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    image_sizes: Sequence[tuple[int, int]],
    *,
    weights: Sequence[float] | None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    max_detections: int = MAX_DETECTIONS,
) -> list[dict[str, torch.Tensor]]:
    """Fuse M models' predictions on the same images with Weighted Boxes Fusion.

    Args:
        per_model_preds: ``per_model_preds[m][i]`` is model m's prediction on image i:
            ``boxes`` float [N, 4] xyxy absolute, ``scores`` [N], ``labels`` int64 [N].
        image_sizes: ``(height, width)`` of image i, in the pixels of the boxes.
        weights: one weight per model (a box's vote counts ``score * weight``); ``None``: all 1.
        iou_thr: IoU at which boxes of the same label join a cluster.
        skip_box_thr: boxes with a lower score are dropped before fusing.
        conf_type: how a cluster's score is computed, one of :data:`CONF_TYPES`.
        max_detections: highest-scored fused boxes kept per image: the limit each model and the
            metrics already use (M models' boxes that do not cluster would otherwise add up past it).

    Returns:
        One dict per image: ``boxes`` float32 [K, 4] xyxy absolute, ``scores`` float32 [K],
        ``labels`` int64 [K], sorted by descending score (CPU tensors). Boxes are clamped to the
        image; boxes left with zero area by the clamp (wholly outside the image) are dropped.
    """
    num_models = len(per_model_preds)
    if num_models == 0:
        raise ValueError("Expected predictions of at least one model in `per_model_preds`, but got none.")
    for m, preds in enumerate(per_model_preds):
        if len(preds) != len(image_sizes):
            raise ValueError(
                f"Expected one prediction per image ({len(image_sizes)} image sizes) for every model, "
                f"but model {m} has {len(preds)}."
            )
    if weights is None:
        weights = [1.0] * num_models
    if len(weights) != num_models or any(not w > 0 for w in weights):
        raise ValueError(f"Expected {num_models} positive model weights, but got {weights=}.")
    if conf_type not in CONF_TYPES:  # ensemble_boxes calls exit() on an unknown conf_type
        raise ValueError(f"`conf_type` must be one of {CONF_TYPES}, but got {conf_type=}.")
    if not 0.0 < iou_thr <= 1.0:
        raise ValueError(f"`0 < iou_thr <= 1` must hold, but got {iou_thr=}.")
    if max_detections < 1:
        raise ValueError(f"`max_detections >= 1` must hold, but got {max_detections=}.")
    for i, size in enumerate(image_sizes):
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"Expected image_sizes[{i}] to be a positive (height, width), but got {size!r}.")

    fused = []
    for i, size in enumerate(image_sizes):
        boxes_list, scores_list, labels_list = [], [], []
        for preds in per_model_preds:
            boxes, scores, labels = _to_numpy(preds[i], where=f"model prediction for image {i}")
            boxes = boxes_to_normalized(boxes, size)
            # Zero-area after the clamp: outside the image. Dropped here so WBF does not warn per box.
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes_list.append(boxes[keep])
            scores_list.append(scores[keep])
            labels_list.append(labels[keep])
        boxes, scores, labels = weighted_boxes_fusion(
            boxes_list,
            scores_list,
            labels_list,
            weights=list(weights),
            iou_thr=iou_thr,
            skip_box_thr=skip_box_thr,
            conf_type=conf_type,
        )
        # WBF returns its clusters sorted by descending score.
        boxes, scores, labels = boxes[:max_detections], scores[:max_detections], labels[:max_detections]
        fused.append(
            {
                "boxes": torch.as_tensor(boxes_to_absolute(boxes, size), dtype=torch.float32).reshape(-1, 4),
                "scores": torch.as_tensor(scores, dtype=torch.float32).reshape(-1),
                "labels": torch.as_tensor(np.rint(labels), dtype=torch.int64).reshape(-1),
            }
        )
    return fused


def _to_numpy(pred: Mapping[str, torch.Tensor], *, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = torch.as_tensor(pred["boxes"]).detach().cpu().double().reshape(-1, 4).numpy()
    scores = torch.as_tensor(pred["scores"]).detach().cpu().double().reshape(-1).numpy()
    labels = torch.as_tensor(pred["labels"]).detach().cpu().long().reshape(-1).numpy()
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"Expected one score and one label per box in the {where}, but got {len(boxes)} boxes, "
            f"{len(scores)} scores and {len(labels)} labels."
        )
    return boxes, scores, labels
