"""Losses of fcos_tal against known values (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import distance_box_iou_loss, sigmoid_focal_loss

from detection.models.fcos_losses import (
    ComputeLoss,
    decode_distances,
    paired_iou,
    quality_focal_loss,
)

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    ("logit", "target", "expected"),
    [
        (0.0, 1.0, LN2 * 0.25),  # p = 0.5: BCE = ln 2, |1 - 0.5|^2 = 0.25 -> 0.1733
        (0.0, 0.5, 0.0),  # p = 0.5 = target: modulating factor 0
        (math.log(3.0), 0.0, -math.log(0.25) * 0.75**2),  # p = 3/4: BCE = -ln(1/4) = 1.386, * 0.5625 = 0.780
        (0.0, 0.0, LN2 * 0.25),  # symmetric to the first case
    ],
)
def test_quality_focal_loss_known_values(logit, target, expected):
    loss = quality_focal_loss(torch.tensor([logit]), torch.tensor([target]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_quality_focal_loss_is_torchvision_focal_loss_on_binary_targets():
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 3) * 3, (torch.rand(50, 3) > 0.7).float()
    ours = quality_focal_loss(logits, targets, beta=2.0, reduction="sum")
    theirs = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="sum")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_soft_targets_need_the_quality_form():
    # Why we do not feed soft targets to torchvision's focal loss: its minimum moves off p = t.
    logits = torch.linspace(-6, 6, 24001)
    target = torch.full_like(logits, 0.7)
    best_qfl = logits[quality_focal_loss(logits, target).argmin()].sigmoid().item()
    best_tv = logits[sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0).argmin()].sigmoid().item()
    assert best_qfl == pytest.approx(0.7, abs=1e-3)
    assert best_tv > 0.85  # about 0.878


def test_quality_focal_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        quality_focal_loss(torch.zeros(3), torch.zeros(4))


def test_diou_loss_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # identical boxes: IoU 1, centre distance 0 -> loss 0
    assert distance_box_iou_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # [0,0,2,2] vs [1,1,3,3]: IoU 1/7; centre distance^2 = 1 + 1 = 2; enclosing diagonal^2 = 9 + 9 = 18
    # loss = 1 - 1/7 + 2/18 = 0.968254
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert distance_box_iou_loss(a, b).item() == pytest.approx(1 - 1 / 7 + 2 / 18, rel=1e-5)
    assert paired_iou(a, b).item() == pytest.approx(1 / 7, rel=1e-5)


def test_decode_distances():
    points = torch.tensor([[4.0, 4.0], [12.0, 20.0]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0], [12.0, 0.0, 0.0, 8.0]])
    # (x - l, y - t, x + r, y + b)
    assert decode_distances(points, distances).tolist() == [[3, 2, 7, 8], [0, 20, 12, 28]]


def _one_point_case(distances):
    """One point (4, 4) of stride 8, one box [0, 0, 8, 8] of class 1, C = 1, zero logits (p = 0.5)."""
    points, strides = torch.tensor([[4.0, 4.0]]), torch.tensor([8.0])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([1])}]
    return (torch.zeros(1, 1, 1), torch.tensor([[distances]]), torch.zeros(1, 1), points, strides, targets)


def test_compute_loss_perfect_box():
    # Predicted box [0, 0, 8, 8] = the ground truth: IoU 1, DIoU loss 0.
    # Fused score sqrt(0.5 * 0.5) = 0.5, t = 0.5 * 1^6, normalized t * 1 / t = 1: cls target 1, QFL = ln2 / 4.
    # Quality target = IoU = 1: QFL = ln2 / 4. One positive: divide by 1.
    losses = ComputeLoss()(*_one_point_case([4.0, 4.0, 4.0, 4.0]))
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    assert losses["loss_cls"].item() == pytest.approx(LN2 / 4, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_quality"].item() == pytest.approx(LN2 / 4, rel=1e-5)


def test_compute_loss_half_overlap_and_weights():
    # Distances (4, 4, 12, 4): box [0, 0, 16, 8], IoU 64 / 128 = 0.5.
    # DIoU: centres (8, 4) vs (4, 4): d^2 = 16; enclosing [0,0,16,8]: c^2 = 256 + 64 = 320
    # loss = 1 - 0.5 + 16/320 = 0.55, box weight 2 -> 1.1.
    # cls target = normalized alignment = max IoU 0.5 = p: QFL 0. Quality target IoU 0.5 = p: QFL 0.
    case = _one_point_case([4.0, 4.0, 12.0, 4.0])
    losses = ComputeLoss()(*case)
    assert losses["loss_box"].item() == pytest.approx(1.1, rel=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_quality"].item() == pytest.approx(0.0, abs=1e-7)
    weighted = ComputeLoss(box_weight=0.5)(*case)
    assert weighted["loss_box"].item() == pytest.approx(0.275, rel=1e-5)  # 0.55 * 0.5


def test_compute_loss_without_ground_truth_is_finite_background():
    torch.manual_seed(0)
    points = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    strides = torch.tensor([8.0, 8.0])
    cls_logits = torch.zeros(2, 2, 3, requires_grad=True)
    distances = torch.ones(2, 2, 4, requires_grad=True)
    quality = torch.zeros(2, 2, requires_grad=True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = ComputeLoss()(cls_logits, distances, quality, points, strides, [empty, dict(empty)])
    # No positive: num_pos clamps to 1. Every class logit 0 against target 0: 2 images * 2 points * 3
    # classes * ln2 / 4; quality: 2 * 2 * ln2 / 4; no box loss.
    assert losses["loss_cls"].item() == pytest.approx(12 * LN2 / 4, rel=1e-5)
    assert losses["loss_quality"].item() == pytest.approx(4 * LN2 / 4, rel=1e-5)
    assert losses["loss_box"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(cls_logits.grad).all() and cls_logits.grad.abs().sum() > 0


def test_compute_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="box_weight >= 0"):
        ComputeLoss(box_weight=-1.0)
    with pytest.raises(ValueError, match="topk >= 1"):
        ComputeLoss(topk=0)


def test_compute_loss_relu_zero_distances_with_a_padded_row_is_finite():
    # relu distances of 0 (zero-area boxes) in a batch whose second image pads its ground truth.
    from detection.models.fcos_tal import make_points

    points, strides = make_points([(4, 4)], [8])
    distances = torch.zeros(2, 16, 4, requires_grad=True)
    cls_logits = torch.zeros(2, 16, 2, requires_grad=True)
    quality = torch.zeros(2, 16, requires_grad=True)
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 22.0, 14.0], [10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[2.0, 2.0, 22.0, 14.0]]), "labels": torch.tensor([1])}]
    losses = ComputeLoss(topk=3)(cls_logits, distances, quality, points, strides, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (distances, cls_logits, quality))
