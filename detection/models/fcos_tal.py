"""FCOS-style anchor-free detector trained with the Task-Aligned Assigner (`arch: fcos_tal`).

Written from the papers: FCOS (Tian et al., ICCV 2019: per-point (l, t, r, b) distances scaled by
the level's stride with a learnable per-level scale, heads shared across levels), TOOD (Feng et
al., ICCV 2021: task-aligned assignment, see ``tal_assigner.py``), PANet (Liu et al., CVPR 2018:
the neck, see ``pan.py``) and DIoU (Zheng et al., AAAI 2020: the box loss, see ``fcos_losses.py``).

The backbone is a registry body (``detection.models.backbones.BACKBONES``, the same keys as Faster R-CNN's),
of which the stride-8, 16 and 32 maps feed the neck.

Contract (torchvision's): ``model(images, targets)`` in train mode returns
``{"loss_cls", "loss_box", "loss_quality"}``; ``model(images)`` in eval mode returns one
``{"boxes" [N, 4] xyxy absolute in the input image's pixels, "scores" [N], "labels" [N] int64 1..C}``
per image. Images are float ``[3, H, W]`` tensors in ``[0, 1]`` of any size; torchvision's
``GeneralizedRCNNTransform`` normalizes, resizes to ``image_size``, batches and maps boxes back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image

from detection.metrics import MAX_DETECTIONS
from detection.models.backbones import FeatureBody, build_backbone_body, get_backbone_spec
from detection.models.fcos_losses import ComputeLoss, decode_distances, fused_scores
from detection.models.pan import PathAggregationNetwork
from detection.models.weights import resolve_start

__all__ = [
    "FCOS_TAL_DEFAULTS",
    "FCOSBackbone",
    "FCOSTAL",
    "FCOSTALHead",
    "build_fcos_tal",
    "make_points",
]

# The seed recipe of this architecture; the config layer reads it, the search may override lr/batch size.
FCOS_TAL_DEFAULTS = {"optimizer": "adam", "lr": 1e-3, "scheduler": "cosine", "image_size": 640}

BOX_ACTIVATIONS = ("exp", "relu")
_FEATURE_STRIDES = (8, 16, 32)  # backbone levels C3, C4, C5
_MAX_LOG_DISTANCE = math.log(1e4)  # exp() cap: 10,000 strides is past any image


class FCOSBackbone(nn.Module):
    """The stride-8, 16 and 32 maps (C3-C5) of a registry body, and a temporary freeze of the whole body.

    Stages are frozen where the body is built (`build_backbone_body`'s `trainable_layers`); a BatchNorm whose
    parameters are frozen stays in eval mode, so that it does not update its running statistics either.
    ``set_frozen(True)`` stops every gradient into the body for a while.

    Args:
        body: a `FeatureBody` (``build_backbone_body(name, ...)``) with maps at strides 8, 16 and 32.

    Input ``[B, 3, H, W]``; output list of ``[B, channels[i], ceil(H / s), ceil(W / s)]`` for
    ``s`` in ``strides`` = (8, 16, 32).
    """

    def __init__(self, body: FeatureBody) -> None:
        super().__init__()
        reductions = list(body.strides)
        missing = [s for s in _FEATURE_STRIDES if s not in reductions]
        if missing:
            raise ValueError(
                f"Expected a backbone body with feature maps at strides {list(_FEATURE_STRIDES)}, "
                f"got strides {reductions} (missing {missing})."
            )
        self.body = body
        self.feature_keys = [str(reductions.index(s)) for s in _FEATURE_STRIDES]
        self.channels = [body.out_channels[reductions.index(s)] for s in _FEATURE_STRIDES]
        self.strides = list(_FEATURE_STRIDES)
        self.frozen = False

    def set_frozen(self, frozen: bool) -> None:
        """Stop (or restore) every gradient into the backbone without touching ``requires_grad``.

        Used for a temporary freeze: the trainable stages stay ``requires_grad=True``, so an optimizer
        built over the trainable parameters at epoch 0 already holds them; while frozen they get no
        gradient, which every torch optimizer skips (no step, no weight decay).
        """
        self.frozen = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> FCOSBackbone:
        super().train(mode)
        if mode:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    self.frozen or (module.affine and not module.weight.requires_grad)
                ):
                    module.eval()  # a frozen stage must not update its running statistics
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.body(x)
        return [features[key] for key in self.feature_keys]


class _Scale(nn.Module):
    """A learnable scalar multiplier (FCOS's per-level scale ``s_i`` in ``exp(s_i x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSTALHead(nn.Module):
    """Classification, box-distance and IoU-quality branches shared across pyramid levels.

    Two towers of ``num_convs`` x (3x3 conv, GroupNorm, ReLU), as in FCOS: the class logits come
    from the first, the distances and the IoU-quality logit from the second. A distance is
    ``act(scale_level * x) * stride`` with ``act`` = ``exp`` or ``relu``.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: foreground classes ``C``.
        strides: stride of each level, fine to coarse (one learnable scale per level).
        num_convs: depth of each tower.
        box_activation: ``"exp"`` or ``"relu"``.
        prior_probability: initial class and quality probability (RetinaNet's focal-loss prior).

    Input: list of ``[B, in_channels, H_l, W_l]``. Output: per level ``cls [B, H_l W_l, C]``,
    ``distances [B, H_l W_l, 4]`` (absolute pixels, ``>= 0``) and ``quality [B, H_l W_l]``, points
    in row-major (y, then x) order.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: Sequence[int],
        *,
        num_convs: int = 4,
        box_activation: str = "exp",
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        if box_activation not in BOX_ACTIVATIONS:
            raise ValueError(f"`box_activation` must be one of {list(BOX_ACTIVATIONS)}, but got {box_activation!r}.")
        if num_convs < 0:
            raise ValueError(f"`num_convs >= 0` must hold, but got ({num_convs=}).")
        self.num_classes = num_classes
        self.strides = list(strides)
        self.box_activation = box_activation
        self.cls_tower = self._tower(in_channels, num_convs)
        self.reg_tower = self._tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_distances = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.quality = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in self.strides)

        for conv in (self.cls_logits, self.box_distances, self.quality):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        prior_bias = -math.log((1 - prior_probability) / prior_probability)
        nn.init.constant_(self.cls_logits.bias, prior_bias)
        nn.init.constant_(self.quality.bias, prior_bias)
        if box_activation == "relu":
            # relu(0) would start every box empty (IoU 0 with everything, no alignment signal);
            # 1.0 starts each at 2 x 2 strides around its point, as exp(0) does.
            nn.init.constant_(self.box_distances.bias, 1.0)

    @staticmethod
    def _tower(channels: int, num_convs: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.GroupNorm(math.gcd(32, channels), channels), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if len(features) != len(self.strides):
            raise ValueError(f"Expected {len(self.strides)} pyramid levels, got {len(features)}.")
        cls_out, box_out, quality_out = [], [], []
        for feature, scale, stride in zip(features, self.scales, self.strides):
            cls_feature, reg_feature = self.cls_tower(feature), self.reg_tower(feature)
            raw = scale(self.box_distances(reg_feature)).float()  # fp16 would overflow past 65504 px
            if self.box_activation == "exp":
                distances = torch.exp(raw.clamp(max=_MAX_LOG_DISTANCE)) * stride
            else:
                distances = F.relu(raw) * stride
            cls_out.append(_to_rows(self.cls_logits(cls_feature)))  # [B, HW, C]
            box_out.append(_to_rows(distances))  # [B, HW, 4]
            quality_out.append(_to_rows(self.quality(reg_feature))[..., 0])  # [B, HW]
        return cls_out, box_out, quality_out


def _to_rows(x: Tensor) -> Tensor:
    """``[B, K, H, W]`` -> ``[B, H * W, K]`` (row-major points, as :func:`make_points` orders them)."""
    return x.flatten(2).transpose(1, 2)


def make_points(sizes: Sequence[tuple[int, int]], strides: Sequence[int], *, device=None) -> tuple[Tensor, Tensor]:
    """Centres of the cells of every level, fine to coarse.

    Args:
        sizes: ``(H_l, W_l)`` of each level.
        strides: stride ``s_l`` of each level in pixels.

    Returns:
        ``points`` ``[A, 2]`` ``(x, y)`` absolute pixels with ``x = (j + 0.5) * s_l``, row-major per
        level, and ``strides`` ``[A]`` (float), ``A = sum(H_l * W_l)``.
    """
    points, point_strides = [], []
    for (height, width), stride in zip(sizes, strides):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
        point_strides.append(torch.full((height * width,), float(stride), device=device))
    return torch.cat(points), torch.cat(point_strides)


class FCOSTAL(nn.Module):
    """The detector: transform -> backbone -> PAN -> shared head -> loss or detections.

    Args:
        backbone: :class:`FCOSBackbone`, its stages already frozen as they are to train.
        neck: :class:`PathAggregationNetwork` over the backbone's channels.
        head: :class:`FCOSTALHead` with one stride per neck output.
        transform: torchvision's ``GeneralizedRCNNTransform``.
        compute_loss: :class:`ComputeLoss`.
        score_thresh: detections below this fused score are dropped before NMS.
        nms_thresh: IoU threshold of the class-wise NMS.
        detections_per_img: detections kept per image after NMS.
        topk_candidates: highest-scoring (point, class) pairs kept per level before NMS.
        freeze_backbone_epochs: epochs (from 0) during which the whole backbone is frozen.
    """

    def __init__(
        self,
        backbone: FCOSBackbone,
        neck: PathAggregationNetwork,
        head: FCOSTALHead,
        transform: GeneralizedRCNNTransform,
        compute_loss: ComputeLoss,
        *,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = MAX_DETECTIONS,
        topk_candidates: int = 1000,
        freeze_backbone_epochs: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"`0 <= score_thresh <= 1` must hold, but got ({score_thresh=}).")
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"`0 < nms_thresh <= 1` must hold, but got ({nms_thresh=}).")
        if detections_per_img < 1 or topk_candidates < 1:
            raise ValueError(
                f"`detections_per_img >= 1` and `topk_candidates >= 1` must hold, but got "
                f"({detections_per_img=}, {topk_candidates=})."
            )
        if freeze_backbone_epochs < 0:
            raise ValueError(f"`freeze_backbone_epochs >= 0` must hold, but got ({freeze_backbone_epochs=}).")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.transform = transform
        self.compute_loss = compute_loss
        self.num_classes = head.num_classes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Apply the backbone freeze schedule for ``epoch`` (0-based); the trainer calls it at each epoch start.

        Epochs before ``freeze_backbone_epochs`` train no backbone stage; later ones train the stages
        that are not frozen for good. The stages to be unfrozen keep ``requires_grad=True`` throughout (the
        freeze stops their gradients instead), so an optimizer built at epoch 0 over the trainable
        parameters steps them once they are unfrozen.
        """
        if epoch < 0:
            raise ValueError(f"`epoch >= 0` must hold, but got ({epoch=}).")
        self.backbone.set_frozen(epoch < self.freeze_backbone_epochs)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in train mode (``targets`` required), detections in eval mode; see the module docstring."""
        if self.training:
            if targets is None:
                raise ValueError("Expected targets in training mode, got None.")
            self._check_targets(images, targets)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)

        features = self.neck(self.backbone(batch.tensors))
        cls_levels, distance_levels, quality_levels = self.head(features)
        points, strides = make_points([f.shape[-2:] for f in features], self.head.strides, device=batch.tensors.device)

        if self.training:
            return self.compute_loss(
                torch.cat(cls_levels, 1), torch.cat(distance_levels, 1), torch.cat(quality_levels, 1),
                points, strides, targets,
            )
        level_sizes = [c.shape[1] for c in cls_levels]
        detections = self._detect(
            torch.cat(cls_levels, 1), torch.cat(distance_levels, 1), torch.cat(quality_levels, 1),
            points, level_sizes, batch.image_sizes,
        )
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def _check_targets(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        if len(images) != len(targets):
            raise ValueError(f"Expected one target per image, got {len(images)} images and {len(targets)} targets.")
        for i, target in enumerate(targets):
            boxes, labels = target.get("boxes"), target.get("labels")
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                shape = None if not isinstance(boxes, Tensor) else tuple(boxes.shape)
                raise ValueError(f"Expected target {i} boxes to be a tensor of shape [N, 4], got {shape}.")
            if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
                shape = None if not isinstance(labels, Tensor) else tuple(labels.shape)
                raise ValueError(f"Expected target {i} labels of shape [{len(boxes)}], got {shape}.")
            if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
                raise ValueError(
                    f"Expected target {i} labels in 1..{self.num_classes}, got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]."
                )
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bool(degenerate.any()):
                j = int(degenerate.nonzero()[0])
                raise ValueError(f"Expected target {i} boxes with x2 > x1 and y2 > y1, got box {j}: {boxes[j].tolist()}.")

    @torch.no_grad()
    def _detect(
        self,
        cls_logits: Tensor,
        distances: Tensor,
        quality_logits: Tensor,
        points: Tensor,
        level_sizes: list[int],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Decode, threshold, keep the top candidates per level, class-wise NMS.

        ``cls_logits [B, A, C]``, ``distances [B, A, 4]``, ``quality_logits [B, A]``, ``points [A, 2]``;
        boxes come out ``xyxy absolute`` in the resized image (``image_sizes`` ``(h, w)``), labels ``1..C``.
        """
        scores_all = fused_scores(cls_logits.float(), quality_logits.float())  # [B, A, C]
        boxes_all = decode_distances(points, distances.float())  # [B, A, 4]
        results = []
        for scores_img, boxes_img, size in zip(scores_all, boxes_all, image_sizes):
            kept_boxes, kept_scores, kept_labels = [], [], []
            for scores, boxes in zip(scores_img.split(level_sizes), boxes_img.split(level_sizes)):
                flat = scores.flatten()  # [A_l * C]
                candidates = (flat > self.score_thresh).nonzero().squeeze(1)
                top = flat[candidates].topk(min(self.topk_candidates, len(candidates)))
                index = candidates[top.indices]
                kept_scores.append(top.values)
                kept_boxes.append(boxes[index // self.num_classes])
                kept_labels.append(index % self.num_classes)
            boxes = clip_boxes_to_image(torch.cat(kept_boxes), size)
            scores, labels = torch.cat(kept_scores), torch.cat(kept_labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep] + 1})
        return results


def build_fcos_tal(
    *,
    backbone: str = "resnet50",
    num_classes: int,
    image_size: int = FCOS_TAL_DEFAULTS["image_size"],
    start: str = "auto",
    pretrained: bool | None = None,
    weights_path: str | Path | None = None,
    neck_channels: int = 256,
    extra_levels: int = 0,
    head_convs: int = 4,
    box_activation: str = "exp",
    frozen_bn: bool | None = None,
    trainable_layers: int = 3,
    freeze_backbone_epochs: int = 0,
    unfreeze_stages: int | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    detections_per_img: int = MAX_DETECTIONS,
    topk_candidates: int = 1000,
    compute_loss: ComputeLoss | None = None,
    anchor_shapes=None,
) -> FCOSTAL:
    """Build the `fcos_tal` detector.

    Args:
        backbone: a key of ``detection.models.backbones.BACKBONES`` (a body with maps at strides 8, 16 and 32).
        num_classes: foreground classes ``C`` (labels ``1..C``).
        image_size: ``GeneralizedRCNNTransform(min_size=image_size, max_size=image_size)``.
        start: ``"backbone"`` (ImageNet weights through torchvision's or timm's cache, or ``weights_path``) or
            ``"none"`` (random: then nothing is frozen, whatever ``trainable_layers`` and
            ``freeze_backbone_epochs`` say); ``"auto"`` is ``"backbone"`` (no fcos_tal detection checkpoint exists).
        pretrained: deprecated alias: True is ``start="auto"``, False is ``start="none"``.
        weights_path: local classification checkpoint of the body for ``"backbone"`` (timm bodies: by name
            or by order, see ``detection.models.weights.create_timm_model``).
        neck_channels: channels of the PAN outputs and of the head.
        extra_levels: 0, 1 or 2 extra levels (P6, P7) above P5, for objects much larger than 32 x 32 strides.
        head_convs: depth of each head tower.
        box_activation: ``"exp"`` or ``"relu"`` on the scaled distances.
        frozen_bn: replace every backbone BatchNorm by a frozen one (small detection batches); None =
            only when weights are loaded (frozen statistics of a random init would be meaningless).
        The resolved start is kept as ``model.start``.
        trainable_layers: backbone stages (``BackboneSpec.stages``, counted from the last) that train once any
            freeze is over; the others never train (torchvision's meaning); values past the count train all.
        freeze_backbone_epochs: epochs (from 0) during which the whole backbone is frozen (``FCOSTAL.set_epoch``).
        unfreeze_stages: overrides ``trainable_layers`` when given (the issue's name for the same count).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: inference, see :class:`FCOSTAL`.
        compute_loss: losses and assigner settings; None = :class:`ComputeLoss` defaults.
        anchor_shapes: ignored (anchor-free); accepted so that one factory call fits every arch.

    Images are normalized with the backbone spec's mean and std.
    """
    del anchor_shapes
    if num_classes < 1:
        raise ValueError(f"`num_classes >= 1` must hold, but got ({num_classes=}).")
    if image_size < 32:
        raise ValueError(f"`image_size >= 32` must hold, but got ({image_size=}).")
    if trainable_layers < 0 or freeze_backbone_epochs < 0 or (unfreeze_stages is not None and unfreeze_stages < 0):
        raise ValueError(
            f"`trainable_layers`, `freeze_backbone_epochs` and `unfreeze_stages` must be >= 0, but got "
            f"({trainable_layers=}, {freeze_backbone_epochs=}, {unfreeze_stages=})."
        )
    spec = get_backbone_spec(backbone)
    if pretrained is not None:
        start = "auto" if pretrained else "none"
    start = resolve_start("fcos_tal", backbone, start)
    trained = start == "backbone"
    if not trained:
        # Randomly initialized stages must learn: none is frozen, for good or for a while (torchvision's rule).
        freeze_backbone_epochs = 0
    trainable = trainable_layers if unfreeze_stages is None else unfreeze_stages
    body = build_backbone_body(
        backbone, image_size=image_size, pretrained=trained, weights_path=weights_path if trained else None,
        trainable_layers=min(trainable, len(spec.stages)), frozen_bn=frozen_bn,
    )

    backbone_module = FCOSBackbone(body)
    neck = PathAggregationNetwork(backbone_module.channels, neck_channels, extra_levels=extra_levels)
    strides = backbone_module.strides + [backbone_module.strides[-1] * 2 ** (i + 1) for i in range(extra_levels)]
    head = FCOSTALHead(neck_channels, num_classes, strides, num_convs=head_convs, box_activation=box_activation)
    transform = GeneralizedRCNNTransform(min_size=image_size, max_size=image_size, image_mean=list(spec.image_mean),
                                         image_std=list(spec.image_std), size_divisible=spec.size_divisible)
    model = FCOSTAL(
        backbone_module, neck, head, transform, compute_loss or ComputeLoss(),
        score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
        topk_candidates=topk_candidates, freeze_backbone_epochs=freeze_backbone_epochs,
    )
    model.start = start
    return model
