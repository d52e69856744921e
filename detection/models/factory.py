"""The one place that turns (arch, backbone, ...) into a detector: an explicit `match` over `ARCHS`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detection.models.anchors import ShapeAnchorGenerator
from detection.models.weights import AUTO_START, resolve_start

ARCHS = ("faster_rcnn", "fcos_tal")


def build_detector(
    *,
    arch: str,
    backbone: str,
    num_classes: int,
    image_size: int,
    start: str | None = None,
    pretrained: bool | None = None,
    weights_path: str | Path | None = None,
    anchor_shapes: np.ndarray | Tensor | None = None,
    trainable_layers: int = 3,
    roi_batch_size_per_image: int = 512,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    freeze_backbone_epochs: int = 0,
    neck_channels: int | None = None,
    head_convs: int | None = None,
) -> nn.Module:
    """A detector with torchvision's contract.

    Args:
        arch: one of `ARCHS`.
        backbone: a key of `detection.models.backbones.BACKBONES`, the same for every arch.
        num_classes: C foreground classes; labels are 1..C.
        image_size: input size (longest side) the model resizes images to; `set_image_size` changes it.
        start: where the weights start from (`detection.models.weights`): `"detection"` (a COCO detector of
            this arch/backbone, box predictor replaced for C + 1 classes), `"backbone"` (ImageNet backbone
            weights), `"none"` (random), or `"auto"`/None: detection where a checkpoint exists, else backbone.
            Weights come through torchvision's/timm's cache (or download); `WeightsNotFoundError` names the
            missing file and the folder to put it in. The resolved value is kept as `model.start`.
        pretrained: deprecated alias of `start` (used only when `start` is None): True = "auto", False = "none".
        weights_path: a local file that overrides the cache/download: a full detection state dict for
            `"detection"`, the backbone's classification state dict for `"backbone"`.
        anchor_shapes: faster_rcnn only: [k, 2] (w, h) pixels at `image_size` from k-means.
        trainable_layers: backbone stages left trainable (0..5).
        roi_batch_size_per_image, rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: faster_rcnn only: RoIs
            sampled per image, proposals kept in training and at inference (see `build_faster_rcnn`).
        freeze_backbone_epochs: fcos_tal only: backbone frozen for this many epochs (`model.set_epoch`).
        neck_channels, head_convs: fcos_tal only: PAN neck width and convs per head tower (None: the
            builder's defaults).
    Returns:
        An `nn.Module`: train mode `model(images, targets)` -> dict of losses; eval mode `model(images)` ->
        list of {"boxes" [N, 4] xyxy absolute in each input image's pixels, "scores" [N], "labels" int64 [N]}.
        Images are lists of float [3, H, W] tensors in [0, 1].
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes >= 1` (foreground classes) must hold, but got {num_classes=}.")
    if image_size < 32:
        raise ValueError(f"`image_size >= 32` must hold, but got {image_size=}.")
    if start is None:
        start = AUTO_START if pretrained is None or pretrained else "none"
    if arch in ARCHS:
        start = resolve_start(arch, backbone, start)
    match arch:
        case "faster_rcnn":
            from detection.models.faster_rcnn import build_faster_rcnn

            return build_faster_rcnn(
                backbone=backbone, num_classes=num_classes, image_size=image_size, start=start,
                weights_path=weights_path, anchor_shapes=anchor_shapes, trainable_layers=trainable_layers,
                roi_batch_size_per_image=roi_batch_size_per_image, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            )
        case "fcos_tal":
            if anchor_shapes is not None:
                raise ValueError("`anchor_shapes` must be None for the anchor-free arch 'fcos_tal', "
                                 f"but got an array of shape {list(np.shape(anchor_shapes))}.")
            from detection.models.fcos_tal import build_fcos_tal  # lazy: only this arch pays its imports

            return build_fcos_tal(
                backbone=backbone, num_classes=num_classes, image_size=image_size, start=start,
                weights_path=weights_path, trainable_layers=trainable_layers,
                freeze_backbone_epochs=freeze_backbone_epochs,
                **{k: v for k, v in (("neck_channels", neck_channels), ("head_convs", head_convs)) if v is not None},
            )
        case _:
            raise ValueError(f"`arch` must be one of {list(ARCHS)}, but got {arch!r}.")


def set_image_size(model: nn.Module, size: int) -> None:
    """Make `model` resize its inputs to `size` (longest side) from now on: progressive resizing.

    A model with its own `set_image_size(size)` method handles it; otherwise its torchvision
    `GeneralizedRCNNTransform` gets `min_size = max_size = size` and its `ShapeAnchorGenerator`s are
    scaled by `size / build image_size`, keeping anchors in proportion to the resized boxes.
    """
    if size < 32:
        raise ValueError(f"`size >= 32` must hold, but got {size=}.")
    own = getattr(model, "set_image_size", None)
    if callable(own):
        own(size)
        return
    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        raise ValueError(f"Expected a model with a `set_image_size` method or a torchvision "
                         f"`GeneralizedRCNNTransform` at `.transform`, got {type(model).__name__} "
                         f"with transform {type(transform).__name__}.")
    transform.min_size = (size,)
    transform.max_size = size
    for module in model.modules():
        if isinstance(module, ShapeAnchorGenerator):
            module.set_image_size(size)


__all__ = ["ARCHS", "build_detector", "set_image_size"]
