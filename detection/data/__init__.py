"""Detection data: COCO/Roboflow loading, augmentation, K-fold splits, class-balanced sampling, anchors."""

from __future__ import annotations

from detection.data.anchors import kmeans_anchor_shapes, mean_best_iou
from detection.data.coco import (
    CocoDetection,
    CocoIndex,
    DatasetError,
    ImageRecord,
    collate_detection,
    load_dataset,
)
from detection.data.sampling import RepeatFactorSampler, repeat_factors
from detection.data.splits import Split, make_split
from detection.data.transforms import build_eval_transforms, build_train_transforms

__all__ = [
    "CocoDetection",
    "CocoIndex",
    "DatasetError",
    "ImageRecord",
    "RepeatFactorSampler",
    "Split",
    "build_eval_transforms",
    "build_train_transforms",
    "collate_detection",
    "kmeans_anchor_shapes",
    "load_dataset",
    "make_split",
    "mean_best_iou",
    "repeat_factors",
]
