"""Losses of the FCOS + Task-Aligned-Assigner detector and the aggregator that computes them.

Classification and the IoU-quality branch learn soft targets in ``[0, 1]``: the
normalized alignment of the assigner for the class branch, the IoU of the predicted box with its
ground truth for the quality branch. ``torchvision.ops.sigmoid_focal_loss`` documents binary
targets, and with a soft target its modulating factor ``(1 - p_t) ** gamma`` (``p_t = p t +
(1 - p)(1 - t)``) moves the minimum away from ``p = t`` (for ``t = 0.7`` the minimum is at
``p ~ 0.88``), so both branches use the quality focal loss of Generalized Focal Loss (Li et al.,
NeurIPS 2020, eq. 5), ``QFL(p, y) = -|y - p| ** beta * (y log p + (1 - y) log(1 - p))``, which is
minimal at ``p = y`` and equals torchvision's focal loss (``alpha=-1, gamma=beta``) on 0/1 targets.
Boxes use ``torchvision.ops.distance_box_iou_loss`` (DIoU, Zheng et al., AAAI 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import distance_box_iou_loss

from detection.models.tal_assigner import TaskAlignedAssignment, task_aligned_assign

__all__ = ["ComputeLoss", "decode_distances", "fused_scores", "pad_targets", "paired_iou", "quality_focal_loss"]


def quality_focal_loss(logits: Tensor, targets: Tensor, *, beta: float = 2.0, reduction: str = "none") -> Tensor:
    """Quality focal loss on logits with soft targets in ``[0, 1]`` (any shape, same for both).

    ``BCE(sigmoid(logits), targets) * |targets - sigmoid(logits)| ** beta``; see the module docstring.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"Expected logits and targets of one shape, got {tuple(logits.shape)} and {tuple(targets.shape)}.")
    targets = targets.to(logits.dtype)
    modulating = (targets - logits.sigmoid()).abs().pow(beta)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulating
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"`reduction` must be one of 'none', 'mean', 'sum', but got {reduction!r}.")


def decode_distances(points: Tensor, distances: Tensor) -> Tensor:
    """FCOS distances to boxes.

    Args:
        points: ``[A, 2]`` point centres ``(x, y)``, absolute pixels.
        distances: ``[..., A, 4]`` ``(left, top, right, bottom)`` in absolute pixels, ``>= 0``.

    Returns:
        ``[..., A, 4]`` boxes, ``xyxy absolute``.
    """
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def paired_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]``: ``[N, 4]`` and ``[N, 4]`` ``xyxy`` -> ``[N]`` in ``[0, 1]``.

    The diagonal of ``torchvision.ops.box_iou`` without its ``[N, N]`` matrix (N is every positive
    point of a batch, thousands).
    """
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter + eps)


def fused_scores(cls_logits: Tensor, quality_logits: Tensor) -> Tensor:
    """Detection score per class: ``sqrt(sigmoid(cls) * sigmoid(quality))``.

    ``cls_logits`` ``[..., C]``, ``quality_logits`` ``[...]``; returns ``[..., C]`` in ``[0, 1]``.
    The geometric mean keeps the scale of a probability, as torchvision's FCOS does with centerness.
    """
    return (cls_logits.sigmoid() * quality_logits.sigmoid()[..., None]).sqrt()


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets into padded tensors.

    Args:
        targets: per image ``{"boxes": [N_i, 4] xyxy absolute, "labels": [N_i] int64 1..C}``.

    Returns:
        ``boxes`` ``[B, M, 4]``, ``labels`` int64 ``[B, M]``, ``mask`` bool ``[B, M]`` with
        ``M = max(N_i)`` (0 when no image has a box).
    """
    width = max((len(t["boxes"]) for t in targets), default=0)
    boxes = torch.zeros(len(targets), width, 4, device=device)
    labels = torch.zeros(len(targets), width, dtype=torch.int64, device=device)
    mask = torch.zeros(len(targets), width, dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["boxes"])
        boxes[i, :n] = target["boxes"].to(device=device, dtype=boxes.dtype)
        labels[i, :n] = target["labels"].to(device=device)
        mask[i, :n] = True
    return boxes, labels, mask


@dataclass(frozen=True)
class ComputeLoss:
    """Assign targets with the Task-Aligned Assigner and compute the three weighted losses.

    Each loss is a sum over the batch divided by the number of positive points (clamped to >= 1),
    so an image without boxes still trains its class and quality branches towards background.

    Attributes:
        cls_weight, box_weight, quality_weight: multipliers of ``loss_cls``, ``loss_box``, ``loss_quality``.
        focal_beta: exponent of the quality focal loss.
        topk, alpha, beta, center_radius: Task-Aligned Assigner settings: TOOD's alpha = 1 and
            beta = 6, with topk 9 (TOOD: 13) and FCOS's centre radius of 1.5 strides (YOLOv6: 2.5).
            On the small DeepForest crowns 9 / 1.5 beat 13 / 2.5 (bench/fcos_vs_torchvision.py,
            12 epochs at 320 px: map_50 0.38 vs 0.35).
    """

    cls_weight: float = 1.0
    box_weight: float = 2.0
    quality_weight: float = 1.0
    focal_beta: float = 2.0
    topk: int = 9
    alpha: float = 1.0
    beta: float = 6.0
    center_radius: float = 1.5

    def __post_init__(self) -> None:
        for name in ("cls_weight", "box_weight", "quality_weight", "focal_beta", "alpha", "beta"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"`{name} >= 0` must hold, but got ({name}={value}).")
        if self.topk < 1:
            raise ValueError(f"`topk >= 1` must hold, but got (topk={self.topk}).")

    def assign(
        self, cls_logits: Tensor, pred_boxes: Tensor, quality_logits: Tensor, points: Tensor, strides: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> TaskAlignedAssignment:
        """Run the assigner on the fused scores (what inference ranks by); shapes as in :meth:`__call__`."""
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, cls_logits.device)
        return task_aligned_assign(
            fused_scores(cls_logits, quality_logits), pred_boxes, points, strides, gt_boxes, gt_labels, gt_mask,
            topk=self.topk, alpha=self.alpha, beta=self.beta, center_radius=self.center_radius,
        )

    def __call__(
        self,
        cls_logits: Tensor,
        distances: Tensor,
        quality_logits: Tensor,
        points: Tensor,
        strides: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Compute the losses of one batch.

        Args:
            cls_logits: ``[B, A, C]`` class logits.
            distances: ``[B, A, 4]`` predicted ``(left, top, right, bottom)`` in absolute pixels.
            quality_logits: ``[B, A]`` IoU-quality logits.
            points: ``[A, 2]`` point centres; strides: ``[A]``.
            targets: per image ``{"boxes": [N, 4] xyxy absolute, "labels": [N] int64 1..C}``, in the
                same (resized, padded) coordinates as ``points``; ``N`` may be 0.

        Returns:
            ``{"loss_cls", "loss_box", "loss_quality"}``, already weighted, float32 scalars.
        """
        cls_logits, distances, quality_logits = cls_logits.float(), distances.float(), quality_logits.float()
        pred_boxes = decode_distances(points, distances)  # [B, A, 4]
        assigned = self.assign(cls_logits, pred_boxes, quality_logits, points, strides, targets)
        fg = assigned.fg_mask
        num_pos = fg.sum().clamp(min=1).float()

        loss_cls = quality_focal_loss(cls_logits, assigned.scores, beta=self.focal_beta, reduction="sum") / num_pos

        pos_pred, pos_gt = pred_boxes[fg], assigned.boxes[fg]  # [P, 4] each
        loss_box = distance_box_iou_loss(pos_pred, pos_gt, reduction="sum") / num_pos

        quality_target = torch.zeros_like(quality_logits)
        if len(pos_pred):
            # The quality branch predicts how well its own box fits: a target, not a path for gradients.
            quality_target[fg] = paired_iou(pos_pred.detach(), pos_gt)
        loss_quality = quality_focal_loss(quality_logits, quality_target, beta=self.focal_beta,
                                          reduction="sum") / num_pos

        return {
            "loss_cls": self.cls_weight * loss_cls,
            "loss_box": self.box_weight * loss_box,
            "loss_quality": self.quality_weight * loss_quality,
        }
