"""Task-Aligned Assigner against hand-computed cases (arithmetic in the comments)."""

from __future__ import annotations

import pytest
import torch

from detection.models.fcos_tal import make_points
from detection.models.tal_assigner import candidate_mask, task_aligned_assign


def _grid_32():
    """4 x 4 points of stride 8 over a 32 x 32 image: x, y in {4, 12, 20, 28}; index = 4 * row + col."""
    return make_points([(4, 4)], [8])


def _index(x: float, y: float, stride: int = 8, width: int = 4) -> int:
    return int(y // stride) * width + int(x // stride)


def test_make_points_centres_cells_row_major():
    points, strides = make_points([(2, 3), (1, 2)], [8, 16])
    # level 0: x = (j + 0.5) * 8 = 4, 12, 20; y = 4, 12; level 1: x = 8, 24; y = 8
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert points.tolist() == expected
    assert strides.tolist() == [8] * 6 + [16] * 2


def test_one_box_topk_and_normalization():
    points, strides = _grid_32()
    box = torch.tensor([2.0, 2.0, 22.0, 14.0])  # 20 x 12 = 240 px^2, centre (12, 8)
    # Strictly inside: x in {4, 12, 20} (2 < x < 22), y in {4, 12} (2 < y < 14): 6 points. All lie
    # within 2.5 strides (20 px) of the centre, so all 6 are candidates.
    pred_boxes = box.expand(16, 4).clone()  # non-candidates predict the box exactly (IoU 1): must still lose
    scores = torch.full((16, 2), 0.9)  # class-1 column is the one that counts (label 1)
    cases = {
        # point: (pred box, IoU with the box, class-1 score)
        (12, 4): ([2, 2, 22, 14], 1.0, 0.5),  # t = 0.5 * 1^2 = 0.5
        (12, 12): ([2, 2, 22, 8], 0.5, 0.8),  # inter 20*6 = 120, 120/240 = 0.5; t = 0.8 * 0.25 = 0.2
        (4, 4): ([2, 2, 12, 14], 0.5, 0.2),  # 10*12 = 120 -> 0.5; t = 0.2 * 0.25 = 0.05
        (20, 4): ([12, 2, 22, 14], 0.5, 0.4),  # t = 0.4 * 0.25 = 0.1
        (4, 12): ([2, 8, 22, 14], 0.5, 0.1),  # t = 0.1 * 0.25 = 0.025
        (20, 12): ([2, 2, 12, 8], 0.25, 0.9),  # 10*6 = 60, 60/240 = 0.25; t = 0.9 * 0.0625 = 0.05625
    }
    for (x, y), (pred, _, score) in cases.items():
        pred_boxes[_index(x, y)] = torch.tensor(pred, dtype=torch.float32)
        scores[_index(x, y), 0] = score

    # Batch of 2: image 1 has no box, only a padding row holding garbage.
    assigned = task_aligned_assign(
        torch.stack([scores, scores]), torch.stack([pred_boxes, pred_boxes]), points, strides,
        gt_boxes=torch.stack([box[None], torch.tensor([[0.0, 0.0, 32.0, 32.0]])]),
        gt_labels=torch.tensor([[1], [2]]), gt_mask=torch.tensor([[True], [False]]),
        topk=3, alpha=1.0, beta=2.0, center_radius=2.5,
    )
    # top-3 by t: (12, 4) 0.5, (12, 12) 0.2, (20, 4) 0.1. Normalized t * max_iou / max_t with
    # max_iou = 1.0 (at (12, 4)) and max_t = 0.5: 1.0, 0.4, 0.2.
    expected = {_index(12, 4): 1.0, _index(12, 12): 0.4, _index(20, 4): 0.2}
    fg = assigned.fg_mask[0]
    assert set(fg.nonzero().flatten().tolist()) == set(expected)
    for index, value in expected.items():
        assert assigned.scores[0, index, 0].item() == pytest.approx(value, abs=1e-6)
        assert assigned.scores[0, index, 1].item() == 0.0
        assert assigned.labels[0, index].item() == 1
        assert assigned.gt_index[0, index].item() == 0
        assert assigned.boxes[0, index].tolist() == box.tolist()
    assert assigned.scores[0, ~fg].abs().sum() == 0
    assert (assigned.labels[0, ~fg] == 0).all() and (assigned.gt_index[0, ~fg] == -1).all()
    # The padded image is all background.
    assert not assigned.fg_mask[1].any() and assigned.scores[1].sum() == 0


def test_centre_sampling_radius_restricts_candidates():
    points, strides = _grid_32()
    box = torch.tensor([[[2.0, 2.0, 22.0, 14.0]]])  # centre (12, 8)
    # radius 0.75 strides = 6 px: |x - 12| < 6 -> x = 12 only; |y - 8| < 6 -> y = 4 and 12.
    mask = candidate_mask(points, strides, box, center_radius=0.75)[0, 0]
    assert set(mask.nonzero().flatten().tolist()) == {_index(12, 4), _index(12, 12)}
    # radius 0 turns centre sampling off: the 6 points strictly inside remain.
    assert int(candidate_mask(points, strides, box, center_radius=0)[0, 0].sum()) == 6


def test_box_smaller_than_a_stride():
    # Two levels: stride 8 (4 x 4 points at 4, 12, 20, 28) and stride 16 (2 x 2 points at 8, 24).
    points, strides = make_points([(4, 4), (2, 2)], [8, 16])
    boxes = torch.tensor([[
        [9.0, 9.0, 15.0, 15.0],  # 6 x 6 px: only the stride-8 point (12, 12) is inside (9 < 12 < 15)
        [13.0, 21.0, 19.0, 27.0],  # 6 x 6 px between points: x 12 < 13 and 20 > 19, so no point inside
    ]])
    pred_boxes = torch.zeros(1, 20, 4)
    pred_boxes[0, _index(12, 12)] = torch.tensor([9.0, 9.0, 15.0, 12.0])  # 6*3 = 18 of 36 px^2: IoU 0.5
    assigned = task_aligned_assign(
        torch.full((1, 20, 1), 0.3), pred_boxes, points, strides, boxes,
        gt_labels=torch.tensor([[1, 1]]), gt_mask=torch.tensor([[True, True]]), topk=13,
    )
    # topk = 13 but one candidate: one positive; its target t * max_iou / max_t = max_iou = 0.5.
    assert assigned.fg_mask[0].nonzero().flatten().tolist() == [_index(12, 12)]
    assert assigned.scores[0, _index(12, 12), 0].item() == pytest.approx(0.5, abs=1e-6)
    # The second box contains no point centre on any level: it gets no positive (FCOS/TOOD rule).
    assert (assigned.gt_index[0] != 1).all()


def test_point_claimed_by_two_boxes_goes_to_highest_iou():
    points, strides = _grid_32()
    boxes = torch.tensor([[[0.0, 0.0, 24.0, 24.0], [8.0, 8.0, 32.0, 32.0]]])  # 24 x 24 = 576 px^2 each
    # Every point predicts a 2 x 2 box around itself (IoU <= 4 / 576 with either box) except (12, 12).
    pred = torch.cat([points - 1, points + 1], dim=1)[None].clone()
    pred[0, _index(12, 12)] = torch.tensor([4.0, 4.0, 24.0, 24.0])  # 20 x 20 = 400 px^2
    # IoU with box 0: inter 400, union 400 + 576 - 400 = 576 -> 0.694
    # IoU with box 1: inter [8, 8, 24, 24] = 256, union 400 + 576 - 256 = 720 -> 0.356
    # With equal scores (0.5) (12, 12) is the top-1 of both boxes; it goes to box 0.
    assigned = task_aligned_assign(
        torch.full((1, 16, 2), 0.5), pred, points, strides, boxes,
        gt_labels=torch.tensor([[1, 2]]), gt_mask=torch.tensor([[True, True]]), topk=1,
    )
    assert assigned.fg_mask[0].nonzero().flatten().tolist() == [_index(12, 12)]
    assert assigned.gt_index[0, _index(12, 12)].item() == 0
    assert assigned.labels[0, _index(12, 12)].item() == 1
    # Single positive: its normalized target is box 0's IoU, 400 / 576.
    assert assigned.scores[0, _index(12, 12)].tolist() == pytest.approx([400 / 576, 0.0], abs=1e-6)


def test_no_ground_truth_is_all_background():
    points, strides = _grid_32()
    for boxes, mask in [(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)),
                        (torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))]:
        assigned = task_aligned_assign(
            torch.rand(2, 16, 3), torch.rand(2, 16, 4), points, strides, boxes,
            gt_labels=torch.ones(boxes.shape[:2], dtype=torch.int64), gt_mask=mask,
        )
        assert not assigned.fg_mask.any()
        assert assigned.scores.shape == (2, 16, 3) and assigned.scores.sum() == 0
        assert (assigned.labels == 0).all() and (assigned.gt_index == -1).all()


def test_bad_shapes_are_value_errors():
    points, strides = _grid_32()
    with pytest.raises(ValueError, match=r"pred_boxes \[B, A, 4\]"):
        task_aligned_assign(torch.rand(1, 16, 2), torch.rand(1, 15, 4), points, strides,
                            torch.zeros(1, 1, 4), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="topk >= 1"):
        task_aligned_assign(torch.rand(1, 16, 2), torch.rand(1, 16, 4), points, strides,
                            torch.zeros(1, 1, 4), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), topk=0)


def test_zero_area_prediction_against_a_padded_row_gives_finite_targets():
    # The `relu` box option can predict distances (0, 0, 0, 0): a zero-area box at its point. A padded
    # ground-truth row is all zeros, also zero-area, so torchvision's box_iou divides 0 by 0 there (union
    # 0 + 0 - 0 = 0). That NaN used to reach every soft target through the max over the M boxes.
    points, strides = _grid_32()
    pred_boxes = torch.cat([points, points], dim=1).expand(2, 16, 4).clone()  # [2, 16, 4], every box empty
    scores = torch.full((2, 16, 2), 0.5)
    gt_boxes = torch.tensor([[[2.0, 2.0, 22.0, 14.0], [10.0, 10.0, 30.0, 30.0]],
                             [[2.0, 2.0, 22.0, 14.0], [0.0, 0.0, 0.0, 0.0]]])  # image 1: row 1 is padding
    gt_labels = torch.tensor([[1, 2], [1, 0]])
    gt_mask = torch.tensor([[True, True], [True, False]])
    out = task_aligned_assign(scores, pred_boxes, points, strides, gt_boxes, gt_labels, gt_mask, topk=3)
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.boxes).all()
    # Every IoU is 0 (empty predictions), so every alignment metric is 0: the boxes still get their
    # top-3 candidates (positives), with soft targets 0 * 0 / (0 + eps) = 0.
    assert out.fg_mask.sum(dim=1).tolist() == [6, 3]
    assert out.scores.abs().sum() == 0
    assert (out.gt_index[1][out.fg_mask[1]] == 0).all()  # never the padded row
