"""Faster R-CNN (torchvision's `FasterRCNN`) on a registered FPN backbone, set up for small objects.

Inputs are resized inside the model (`GeneralizedRCNNTransform` with `min_size = max_size = image_size`):
training images already pre-resized to `image_size` (longest side) pass through unchanged, and eval images
of any size come back with boxes in their own pixel coordinates (`xyxy absolute`).

`start="detection"` (ResNet-50-FPN: torchvision's `FasterRCNN_ResNet50_FPN_Weights.COCO_V1`) loads a whole
COCO-trained Faster R-CNN of the same architecture: backbone, FPN, RPN and box head; the box predictor
(`FastRCNNPredictor`, 91 COCO classes there) is new, with C + 1 outputs for the dataset's C classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from detection.models.anchors import build_anchor_generator, default_anchor_generator
from detection.metrics import MAX_DETECTIONS
from detection.models.backbones import build_fpn_backbone, get_backbone_spec
from detection.models.weights import detection_checkpoint, load_torchvision_state_dict, resolve_start

logger = logging.getLogger(__name__)

# Re-initialized when a detection checkpoint is loaded: the class-specific predictor always; the RPN's
# per-anchor outputs when the anchors per location differ (k-means anchors: k shapes instead of 3 ratios).
# Anchor buffers are this project's own (torchvision's generator keeps none).
_NEW_HEAD = ("roi_heads.box_predictor.",)
_ANCHOR_DEPENDENT = ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")
_OWN_BUFFERS = ("rpn.anchor_generator.",)


def build_faster_rcnn(
    *,
    backbone: str,
    num_classes: int,
    image_size: int,
    start: str = "auto",
    weights_path: str | Path | None = None,
    anchor_shapes: np.ndarray | Tensor | None = None,
    trainable_layers: int = 3,
    roi_batch_size_per_image: int = 512,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
) -> FasterRCNN:
    """Faster R-CNN with `BACKBONES[backbone]` + FPN.

    Args:
        backbone: a key of `detection.models.backbones.BACKBONES`.
        num_classes: C foreground classes (labels 1..C); the box predictor gets C + 1 outputs (0 = background).
        image_size: the input size: images are resized so that their longest side is `image_size`.
        start: `"detection"` (a COCO Faster R-CNN of this backbone, box predictor replaced), `"backbone"`
            (ImageNet backbone weights), `"none"` (random), or `"auto"`: detection where a checkpoint exists
            (`detection.models.weights.DETECTION_CHECKPOINTS`), else backbone.
        weights_path: a local file instead of the cache/download: a full detection state dict (91-class
            torchvision layout) for `"detection"`, a classification state dict of the body for `"backbone"`.
        anchor_shapes: [k, 2] (w, h) pixels at `image_size` (k-means over training boxes) replacing the
            default anchors; all k of them at every location of every FPN level.
        trainable_layers: backbone stages left trainable (0..5) when the backbone is pretrained.
        roi_batch_size_per_image, rpn_post_nms_top_n_train: RoIs sampled per image for the box head and
            proposals kept in training (torchvision's 512 / 2000). The box head's RoIAlign backward and fc6
            dominate a CPU step at small image sizes, so CPU configs lower them (e.g. 128 / 500).
        rpn_post_nms_top_n_test: proposals the box head scores per image at inference (torchvision's 1000); the
            box head dominates a CPU evaluation.
    Returns:
        torchvision's `FasterRCNN`: train mode `model(images, targets)` -> dict of losses; eval mode
        `model(images)` -> list of {"boxes" float [N, 4] xyxy absolute, "scores" [N], "labels" int64 [N] in 1..C}.
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes >= 1` (foreground classes) must hold, but got {num_classes=}.")
    spec = get_backbone_spec(backbone)
    start = resolve_start("faster_rcnn", backbone, start)
    fpn_backbone = build_fpn_backbone(
        backbone, image_size=image_size, pretrained=start == "backbone",
        weights_path=weights_path if start == "backbone" else None, trainable_layers=trainable_layers,
        detection_weights=start == "detection",
    )
    if anchor_shapes is None:
        anchor_generator = default_anchor_generator(strides=fpn_backbone.strides, image_size=image_size)
    else:
        anchor_generator = build_anchor_generator(
            anchor_shapes, num_levels=len(fpn_backbone.strides), image_size=image_size
        )
    model = FasterRCNN(
        fpn_backbone,
        num_classes=num_classes + 1,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
        size_divisible=spec.size_divisible,
        rpn_anchor_generator=anchor_generator,
        rpn_head=RPNHead(fpn_backbone.out_channels, anchor_generator.num_anchors_per_location()[0]),
        # small boxes map below the finest level and are clamped to it (canonical 224 px -> level 4)
        box_roi_pool=MultiScaleRoIAlign(featmap_names=list(fpn_backbone.featmap_names), output_size=7,
                                        sampling_ratio=2),
        box_detections_per_img=MAX_DETECTIONS,
        box_batch_size_per_image=roi_batch_size_per_image,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
    )
    if start == "detection":
        weights = detection_checkpoint("faster_rcnn", backbone)
        assert weights is not None  # resolve_start checked it
        source = str(weights_path) if weights_path is not None else f"{type(weights).__name__}.{weights.name}"
        load_detection_state_dict(model, load_torchvision_state_dict(weights, weights_path), source=source)
    model.start = start  # the resolved start, for the record (trainables' trial.json reads resolve_start)
    return model


def load_detection_state_dict(model: FasterRCNN, state: dict[str, Tensor], *, source: str) -> list[str]:
    """Load a COCO Faster R-CNN state dict (torchvision's layout) into `model`, all but its new heads.

    Every tensor of `model` must come from `state` except the box predictor (always new: C + 1 classes), the
    RPN's per-anchor outputs when `model` has another number of anchors per location, and the project's anchor
    buffers; `num_batches_tracked` counters (absent from frozen batch norm) are ignored.

    Returns the names left at their initialization. Raises `ValueError` naming `source` and the first tensor
    when `state` is not the same architecture (an unknown name, a missing one, or another shape).
    """
    target = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    unknown = sorted(k for k in state if k not in target)
    if unknown:
        raise ValueError(f"Detection weights {source!r} are not a Faster R-CNN of this architecture: "
                         f"{len(unknown)} tensors it holds have no place in the model, e.g. {unknown[:3]}.")
    loaded: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(_NEW_HEAD):
            continue
        if tensor.shape != target[key].shape:
            if key.startswith(_ANCHOR_DEPENDENT):
                continue
            raise ValueError(f"Detection weights {source!r}: tensor {key!r} has shape {tuple(tensor.shape)} where "
                             f"the model expects {tuple(target[key].shape)}.")
        loaded[key] = tensor
    fresh = [k for k in target if k not in loaded]
    missing = [k for k in fresh if not k.startswith(_NEW_HEAD + _ANCHOR_DEPENDENT + _OWN_BUFFERS)]
    if missing:
        raise ValueError(f"Detection weights {source!r} lack {len(missing)} tensors of the model, e.g. {missing[:3]}.")
    with torch.no_grad():
        model.load_state_dict(loaded, strict=False)
    logger.info("Loaded detection weights %s; new: %s.", source,
                sorted({k.rsplit(".", 1)[0] for k in fresh if not k.startswith(_OWN_BUFFERS)}))
    return fresh


__all__ = ["build_faster_rcnn", "load_detection_state_dict"]
