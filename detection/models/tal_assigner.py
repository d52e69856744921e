"""Task-Aligned Assigner (TOOD, Feng et al., ICCV 2021, section 3.2) for anchor-free points.

Every function here is stateless and works on padded batches: an image with fewer ground-truth
boxes than the largest one in the batch pads its rows and marks them ``False`` in ``gt_mask``.

Notation used in shapes: ``B`` images, ``M`` ground-truth slots per image (padded), ``A`` points
(all pyramid levels concatenated), ``C`` foreground classes. Boxes are ``xyxy absolute`` pixels in
the batched (resized, padded) image. Labels are the project's contiguous ``1..C`` (0 = background).

The alignment metric of point ``a`` for box ``m`` is ``t = s ** alpha * u ** beta`` with ``s`` the
predicted probability of box ``m``'s class at ``a`` and ``u`` the IoU of ``a``'s predicted box with
box ``m``. Candidates are the points strictly inside the box and inside its centre region (centre
+- ``center_radius`` strides, FCOS centre sampling); each box keeps its ``topk`` candidates by
``t``; a point kept by several boxes goes to the box it overlaps most (highest ``u``). The soft
class target of a positive point is ``t * max_u(m) / max_t(m)``, the maxima taken over the box's
positive points, so the best point of each box gets that box's best IoU (TOOD eq. 10).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["TaskAlignedAssignment", "candidate_mask", "task_aligned_assign"]


class TaskAlignedAssignment(NamedTuple):
    """Targets of one batch, one row per point.

    labels:   int64 ``[B, A]``, ``1..C`` for positives, 0 for background.
    boxes:    float ``[B, A, 4]``, the assigned ground-truth box (``xyxy absolute``), zeros for background.
    scores:   float ``[B, A, C]``, soft class targets: the normalized alignment at the assigned
              class column, 0 everywhere else (background rows are all zero).
    fg_mask:  bool ``[B, A]``, True for positive points.
    gt_index: int64 ``[B, A]``, index of the assigned box in the padded ``M`` axis, -1 for background.
    """

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    fg_mask: Tensor
    gt_index: Tensor


def candidate_mask(points: Tensor, strides: Tensor, gt_boxes: Tensor, *, center_radius: float) -> Tensor:
    """Which points may be assigned to which box (before the top-k).

    Args:
        points: ``[A, 2]`` point centres ``(x, y)`` in absolute pixels.
        strides: ``[A]`` stride of each point's level in pixels.
        gt_boxes: ``[B, M, 4]`` ``xyxy absolute``.
        center_radius: half-side of the centre region in strides; ``<= 0`` turns centre sampling off.

    Returns:
        bool ``[B, M, A]``: the point lies strictly inside the box and, with centre sampling, strictly
        inside the square of half-side ``center_radius * stride`` around the box centre.
    """
    x = points[:, 0].view(1, 1, -1)  # [1, 1, A]
    y = points[:, 1].view(1, 1, -1)
    x1, y1, x2, y2 = (gt_boxes[..., i : i + 1] for i in range(4))  # each [B, M, 1]
    # Strictly inside: all four FCOS distances (l, t, r, b) > 0, so every target is a valid box.
    inside = torch.minimum(torch.minimum(x - x1, y - y1), torch.minimum(x2 - x, y2 - y)) > 0
    if center_radius <= 0:
        return inside
    half = center_radius * strides.view(1, 1, -1)  # [1, 1, A]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    near_centre = ((x - cx).abs() < half) & ((y - cy).abs() < half)
    return inside & near_centre


def task_aligned_assign(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    strides: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    *,
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
    center_radius: float = 2.5,
    eps: float = 1e-9,
) -> TaskAlignedAssignment:
    """Assign every point of every image to one ground-truth box or to the background.

    Args:
        pred_scores: ``[B, A, C]`` predicted class probabilities in ``[0, 1]`` (after the sigmoid).
        pred_boxes: ``[B, A, 4]`` predicted boxes, ``xyxy absolute``.
        points: ``[A, 2]`` point centres ``(x, y)``, absolute pixels.
        strides: ``[A]`` stride of each point in pixels.
        gt_boxes: ``[B, M, 4]`` ``xyxy absolute`` (padding rows may hold anything).
        gt_labels: int ``[B, M]`` in ``1..C`` (padding rows may hold anything).
        gt_mask: bool ``[B, M]``, True for real boxes, False for padding.
        topk: positives kept per box at most (fewer when the box has fewer candidates).
        alpha, beta: exponents of the class score and of the IoU in the alignment metric.
        center_radius: centre-sampling half-side in strides (see :func:`candidate_mask`).

    Returns:
        :class:`TaskAlignedAssignment`. Inputs are read without gradients.
    """
    if pred_scores.dim() != 3 or pred_boxes.shape != (*pred_scores.shape[:2], 4):
        raise ValueError(
            f"Expected pred_scores [B, A, C] and pred_boxes [B, A, 4], got {tuple(pred_scores.shape)} "
            f"and {tuple(pred_boxes.shape)}."
        )
    batch, num_points, num_classes = pred_scores.shape
    if points.shape != (num_points, 2) or strides.shape != (num_points,):
        raise ValueError(
            f"Expected points [{num_points}, 2] and strides [{num_points}], got {tuple(points.shape)} "
            f"and {tuple(strides.shape)}."
        )
    if gt_boxes.dim() != 3 or gt_boxes.shape[0] != batch or gt_boxes.shape[2] != 4:
        raise ValueError(f"Expected gt_boxes [{batch}, M, 4], got {tuple(gt_boxes.shape)}.")
    if gt_labels.shape != gt_boxes.shape[:2] or gt_mask.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"Expected gt_labels and gt_mask of shape {tuple(gt_boxes.shape[:2])}, got "
            f"{tuple(gt_labels.shape)} and {tuple(gt_mask.shape)}."
        )
    if topk < 1:
        raise ValueError(f"`topk >= 1` must hold, but got ({topk=}).")

    device = pred_scores.device
    with torch.no_grad():
        pred_scores = pred_scores.detach().float()
        pred_boxes = pred_boxes.detach().float()
        gt_boxes = gt_boxes.float()
        gt_mask = gt_mask.bool()
        num_gt = gt_boxes.shape[1]
        if num_gt == 0 or not bool(gt_mask.any()):
            return _background(batch, num_points, num_classes, device, pred_scores.dtype)

        candidates = candidate_mask(points.float(), strides.float(), gt_boxes, center_radius=center_radius)
        candidates &= gt_mask[:, :, None]  # [B, M, A]

        ious = torch.stack([box_iou(gt_boxes[b], pred_boxes[b]) for b in range(batch)])  # [B, M, A]
        # A zero-area prediction (the `relu` box option can predict 0, 0, 0, 0) against a zero-area row (an
        # all-zero padding row) is 0 / 0 in box_iou: no overlap, so IoU 0. Padding rows never count anyway.
        ious = ious.nan_to_num(nan=0.0) * gt_mask[:, :, None]
        class_index = (gt_labels.long() - 1).clamp(0, num_classes - 1)  # padding rows: any valid column
        scores = pred_scores.transpose(1, 2).gather(1, class_index[:, :, None].expand(-1, -1, num_points))
        metric = scores.pow(alpha) * ious.pow(beta)  # [B, M, A]

        # Top-k among candidates only: non-candidates rank below any candidate, even one whose
        # metric is 0 (a degenerate predicted box early in training).
        k = min(topk, num_points)
        top_index = metric.masked_fill(~candidates, -1.0).topk(k, dim=-1).indices  # [B, M, k]
        positive = torch.zeros_like(candidates).scatter_(-1, top_index, True) & candidates  # [B, M, A]

        # A point kept by several boxes goes to the one it overlaps most.
        claimed = positive.sum(dim=1) > 1  # [B, A]
        if bool(claimed.any()):
            best = ious.masked_fill(~positive, -1.0).argmax(dim=1)  # [B, A]
            only_best = torch.zeros_like(positive).scatter_(1, best[:, None, :], True)
            positive = torch.where(claimed[:, None, :], positive & only_best, positive)

        fg_mask = positive.any(dim=1)  # [B, A]
        gt_index = positive.to(torch.uint8).argmax(dim=1)  # [B, A]; 0 for background, fixed below

        # TOOD normalization: t * max_iou(box) / max_t(box), maxima over the box's positives.
        metric = metric * positive
        max_metric = metric.amax(dim=-1, keepdim=True)  # [B, M, 1]
        max_iou = (ious * positive).amax(dim=-1, keepdim=True)  # [B, M, 1]
        normalized = (metric * max_iou / (max_metric + eps)).amax(dim=1)  # [B, A]

        batch_index = torch.arange(batch, device=device)[:, None]
        labels = torch.where(fg_mask, gt_labels.long()[batch_index, gt_index], 0)  # [B, A]
        boxes = gt_boxes[batch_index, gt_index] * fg_mask[..., None]  # [B, A, 4]
        soft = torch.zeros(batch, num_points, num_classes, device=device, dtype=pred_scores.dtype)
        soft.scatter_(2, (labels - 1).clamp(min=0)[..., None], (normalized * fg_mask)[..., None])
        gt_index = torch.where(fg_mask, gt_index, -1)
    return TaskAlignedAssignment(labels, boxes, soft, fg_mask, gt_index)


def _background(batch: int, num_points: int, num_classes: int, device: torch.device, dtype: torch.dtype):
    """The assignment of a batch without any ground truth: every point is background."""
    return TaskAlignedAssignment(
        labels=torch.zeros(batch, num_points, dtype=torch.int64, device=device),
        boxes=torch.zeros(batch, num_points, 4, dtype=dtype, device=device),
        scores=torch.zeros(batch, num_points, num_classes, dtype=dtype, device=device),
        fg_mask=torch.zeros(batch, num_points, dtype=torch.bool, device=device),
        gt_index=torch.full((batch, num_points), -1, dtype=torch.int64, device=device),
    )
