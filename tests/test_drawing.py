from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detection.drawing import GT_COLOR, PRED_COLOR, draw_detections

CLASS_NAMES = ("Tree", "Dead")


def _gray(h=120, w=160):
    return torch.full((3, h, w), 0.5)  # 0.5 -> 128 in uint8


def _read(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)  # [H, W, 3]


def test_draws_ground_truth_and_predictions(tmp_path):
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}
    pred = {
        "boxes": torch.tensor([[80.0, 60.0, 150.0, 110.0], [5.0, 70.0, 40.0, 110.0]]),
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([2, 1]),
    }
    out = draw_detections(
        _gray(), pred, target, class_names=CLASS_NAMES, score_threshold=0.5, out_path=tmp_path / "sub" / "a.png"
    )
    assert out == tmp_path / "sub" / "a.png"
    pixels = _read(out)
    assert pixels.shape == (120, 160, 3)
    assert tuple(pixels[30, 10]) == GT_COLOR  # left edge of the GT box (x = 10)
    assert tuple(pixels[50, 35]) == GT_COLOR  # bottom edge (y = 50)
    assert tuple(pixels[85, 150]) == PRED_COLOR  # right edge of the kept prediction (x = 150)
    assert tuple(pixels[110, 120]) == PRED_COLOR  # bottom edge (y = 110)
    assert tuple(pixels[90, 5]) == (128, 128, 128)  # the 0.1 prediction is under the threshold
    assert tuple(pixels[30, 35]) == (128, 128, 128)  # inside a box: not filled
    assert tuple(pixels[5, 155]) == (128, 128, 128)  # far from every box
    label_area = pixels[60:75, 80:150]  # "Dead 0.90" on a filled label background above/inside the box top
    assert (label_area == PRED_COLOR).all(axis=-1).sum() > 50


def test_empty_prediction_and_target_write_the_image(tmp_path):
    empty_pred = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    empty_target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = draw_detections(_gray(), empty_pred, empty_target, class_names=CLASS_NAMES, out_path=tmp_path / "e.png")
    assert (_read(out) == 128).all()


@pytest.mark.parametrize("kind", ["pil", "hwc_uint8", "uint8_chw"])
def test_other_image_types(tmp_path, kind):
    array = np.full((64, 96, 3), 128, dtype=np.uint8)
    image = {
        "pil": Image.fromarray(array),
        "hwc_uint8": array,
        "uint8_chw": torch.from_numpy(array).permute(2, 0, 1),
    }[kind]
    target = {"boxes": torch.tensor([[20.0, 20.0, 50.0, 40.0]]), "labels": torch.tensor([2])}
    pixels = _read(draw_detections(image, None, target, class_names=CLASS_NAMES, out_path=tmp_path / "o.png"))
    assert pixels.shape == (64, 96, 3)
    assert tuple(pixels[30, 20]) == GT_COLOR and tuple(pixels[5, 90]) == (128, 128, 128)


def test_rejects_bad_input(tmp_path):
    target = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match=r"labels in 1..2.*got label 3"):
        draw_detections(_gray(), None, target, class_names=CLASS_NAMES, out_path=tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_detections(torch.zeros(4, 8, 8), None, None, class_names=CLASS_NAMES, out_path=tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\.png"):
        draw_detections(_gray(), None, None, class_names=CLASS_NAMES, out_path=tmp_path / "x.jpg")
