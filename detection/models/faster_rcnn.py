"""Faster R-CNN (torchvision's `FasterRCNN`) on a registered FPN backbone, set up for small objects.

Inputs are resized inside the model (`GeneralizedRCNNTransform` with `min_size = max_size = image_size`):
training images already pre-resized to `image_size` (longest side) pass through unchanged, and eval images
of any size come back with boxes in their own pixel coordinates (`xyxy absolute`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from detection.models.anchors import build_anchor_generator, default_anchor_generator
from detection.models.backbones import build_fpn_backbone, get_backbone_spec

# DeepForest-like scenes hold up to a few hundred small boxes (8-108 px) per image: keep more detections
# than torchvision's 100.
BOX_DETECTIONS_PER_IMG = 300


def build_faster_rcnn(
    *,
    backbone: str,
    num_classes: int,
    image_size: int,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    anchor_shapes: np.ndarray | Tensor | None = None,
    trainable_layers: int = 3,
    roi_batch_size_per_image: int = 512,
    rpn_post_nms_top_n_train: int = 2000,
) -> FasterRCNN:
    """Faster R-CNN with `BACKBONES[backbone]` + FPN.

    Args:
        backbone: a key of `detection.models.backbones.BACKBONES`.
        num_classes: C foreground classes (labels 1..C); the box predictor gets C + 1 outputs (0 = background).
        image_size: the input size: images are resized so that their longest side is `image_size`.
        pretrained, weights_path: ImageNet backbone weights (torchvision/timm cache) or a local file.
        anchor_shapes: [k, 2] (w, h) pixels at `image_size` (k-means over training boxes) replacing the
            default anchors; all k of them at every location of every FPN level.
        trainable_layers: backbone stages left trainable (0..5) when the backbone is pretrained.
        roi_batch_size_per_image, rpn_post_nms_top_n_train: RoIs sampled per image for the box head and
            proposals kept in training (torchvision's 512 / 2000). The box head's RoIAlign backward and fc6
            dominate a CPU step at small image sizes, so CPU configs lower them (e.g. 128 / 500).
    Returns:
        torchvision's `FasterRCNN`: train mode `model(images, targets)` -> dict of losses; eval mode
        `model(images)` -> list of {"boxes" float [N, 4] xyxy absolute, "scores" [N], "labels" int64 [N] in 1..C}.
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes >= 1` (foreground classes) must hold, but got {num_classes=}.")
    spec = get_backbone_spec(backbone)
    fpn_backbone = build_fpn_backbone(
        backbone, image_size=image_size, pretrained=pretrained, weights_path=weights_path,
        trainable_layers=trainable_layers,
    )
    if anchor_shapes is None:
        anchor_generator = default_anchor_generator(strides=fpn_backbone.strides, image_size=image_size)
    else:
        anchor_generator = build_anchor_generator(
            anchor_shapes, num_levels=len(fpn_backbone.strides), image_size=image_size
        )
    return FasterRCNN(
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
        box_detections_per_img=BOX_DETECTIONS_PER_IMG,
        box_batch_size_per_image=roi_batch_size_per_image,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
    )


__all__ = ["BOX_DETECTIONS_PER_IMG", "build_faster_rcnn"]
