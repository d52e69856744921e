"""Detectors with torchvision's contract: `build_detector(arch=..., backbone=...)` and the backbone registry.

Images in: list of float [3, H, W] in [0, 1], any size. Boxes out: `xyxy absolute` in each input image's
pixels, labels 1..C. Architectures are chosen by an explicit `match` in `factory.py`; backbones come from
the flat registry `backbones.BACKBONES`.
"""

from __future__ import annotations

from detection.models.anchors import ShapeAnchorGenerator, anchor_shapes_from_state_dict, build_anchor_generator
from detection.models.backbones import BACKBONES, BackboneSpec, build_backbone_body, build_fpn_backbone
from detection.models.factory import ARCHS, build_detector, set_image_size
from detection.models.weights import (
    DETECTION_CHECKPOINTS,
    STARTS,
    WeightsNotFoundError,
    check_start_available,
    install_offline_weights,
    resolve_start,
)

__all__ = [
    "ARCHS",
    "BACKBONES",
    "BackboneSpec",
    "DETECTION_CHECKPOINTS",
    "STARTS",
    "ShapeAnchorGenerator",
    "WeightsNotFoundError",
    "anchor_shapes_from_state_dict",
    "build_anchor_generator",
    "build_backbone_body",
    "build_detector",
    "build_fpn_backbone",
    "check_start_available",
    "install_offline_weights",
    "resolve_start",
    "set_image_size",
]
