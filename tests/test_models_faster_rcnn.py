"""Faster R-CNN end to end on every registered backbone: train step with an empty target, eval contract."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import FasterRCNN

from detection.models import BACKBONES, ARCHS, build_detector, set_image_size
from detection.models.anchors import ShapeAnchorGenerator
from detection.metrics import MAX_DETECTIONS

NUM_CLASSES = 3
IMAGE_SIZE = 64  # tiny: resnet50_fpn, efficientnet_b3 and swin_s are heavy on CPU


def _small_sampling(model: FasterRCNN) -> FasterRCNN:
    # Fewer proposals and sampled RoIs keep the 12544 x 1024 box-head matmuls cheap on CPU; the wiring
    # under test (backbone -> FPN -> RPN -> RoIAlign -> heads) is unchanged.
    model.rpn._pre_nms_top_n = dict(training=200, testing=200)
    model.rpn._post_nms_top_n = dict(training=100, testing=100)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
    return model


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [36.0, 20.0, 60.0, 44.0]]),  # xyxy absolute
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no objects
    ]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_train_step_and_eval_contract(backbone: str) -> None:
    torch.manual_seed(0)
    model = _small_sampling(build_detector(
        arch="faster_rcnn", backbone=backbone, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, start="none",
    ))
    assert isinstance(model, FasterRCNN)
    # C foreground classes + background
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
    assert model.roi_heads.detections_per_img == MAX_DETECTIONS

    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    losses = model(images, _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    for part in ("backbone.body.", "backbone.fpn.", "rpn.head.", "roi_heads.box_head.", "roi_heads.box_predictor."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part

    model.eval()
    height, width = 45, 77  # odd size: resized to 64 px on the longest side, padded to 64 x 64
    with torch.no_grad():
        (prediction,) = model([torch.rand(3, height, width)])
    boxes, scores, labels = prediction["boxes"], prediction["scores"], prediction["labels"]
    n = len(boxes)
    assert n > 0  # an untrained head scores about 1 / (C + 1) = 0.25 per class, above the 0.05 threshold
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
    assert scores.shape == (n,) and labels.shape == (n,) and labels.dtype == torch.int64
    assert ((labels >= 1) & (labels <= NUM_CLASSES)).all()
    # boxes are in the input image's own pixels (xyxy absolute), not the resized 64 px frame
    eps = 1e-3
    assert (boxes[:, 0] >= -eps).all() and (boxes[:, 1] >= -eps).all()
    assert (boxes[:, 2] <= width + eps).all() and (boxes[:, 3] <= height + eps).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    # mapped back from the 37 x 64 resized frame (45 * 64 / 77 = 37.4): boxes clipped at its right and bottom
    # edges land on the input's 77 and 45
    assert boxes[:, 2].max() > 64 + 1 and boxes[:, 3].max() > 37 + 1, (boxes[:, 2].max(), boxes[:, 3].max())


def test_set_image_size_changes_the_resize_and_scales_anchors() -> None:
    model = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=128,
                           start="none")
    generator = model.rpn.anchor_generator
    assert isinstance(generator, ShapeAnchorGenerator)
    assert model.transform.min_size == (128,) and model.transform.max_size == 128
    before = generator._cell_anchors()[0].clone()
    set_image_size(model, 64)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    # anchors given at 128 px shrink by 64 / 128 = 0.5 with the images
    torch.testing.assert_close(generator._cell_anchors()[0], before * 0.5)
    model.eval()
    with torch.no_grad():
        images, _ = model.transform([torch.rand(3, 100, 50)])
    assert tuple(images.tensors.shape[-2:]) == (64, 32)  # longest side 100 -> 64, 50 -> 32
    with pytest.raises(ValueError, match=r"size >= 32.*size=0"):
        set_image_size(model, 0)


def test_default_anchors_scale_with_image_size_and_stride() -> None:
    model = build_detector(arch="faster_rcnn", backbone="resnet18", num_classes=1, image_size=400, start="none")
    generator = model.rpn.anchor_generator
    # 5 levels (strides 4..64), 2 sizes x 3 ratios each
    assert generator.num_anchors_per_location() == [6] * 5
    assert model.rpn.head.cls_logits.out_channels == 6
    # level 0: base = stride 4 * 400 / 128 = 12.5 px; the square anchors are 12.5 and 12.5 * sqrt(2) = 17.68
    square = generator.level_shapes[0][2:4]  # ratio 1.0 comes after ratio 0.5 (2 sizes each)
    torch.testing.assert_close(square, torch.tensor([[12.5, 12.5], [17.6777, 17.6777]]), atol=1e-3, rtol=0)
    # top level (pool, stride 64): base 64 * 400 / 128 = 200 px
    assert math.isclose(float(generator.level_shapes[4][2, 0]), 200.0, rel_tol=1e-6)


def test_bad_arch_and_backbone_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"`arch` must be one of \['faster_rcnn', 'fcos_tal'\], but got 'yolo'"):
        build_detector(arch="yolo", backbone="mobilenet_v2", num_classes=1, image_size=64, start="none")
    assert ARCHS == ("faster_rcnn", "fcos_tal")
    with pytest.raises(ValueError, match=r"`backbone` must be one of \[.*'resnet50_fpn'.*\], but got 'resnet51'"):
        build_detector(arch="faster_rcnn", backbone="resnet51", num_classes=1, image_size=64, start="none")
    with pytest.raises(ValueError, match=r"num_classes >= 1.*num_classes=0"):
        build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=0, image_size=64, start="none")


def test_fcos_tal_is_dispatched_lazily_and_takes_no_anchor_shapes() -> None:
    model = build_detector(arch="fcos_tal", backbone="mobilenet_v2", num_classes=2, image_size=64,
                           start="none")
    from detection.models.fcos_tal import FCOSTAL

    assert isinstance(model, FCOSTAL)
    set_image_size(model, 96)  # works through its GeneralizedRCNNTransform
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    with pytest.raises(ValueError, match=r"anchor_shapes.*fcos_tal"):
        build_detector(arch="fcos_tal", backbone="mobilenet_v2", num_classes=2, image_size=64,
                       start="none", anchor_shapes=[[10.0, 10.0]])


def test_inference_proposals_reach_the_rpn_and_travel_with_a_saved_model():
    """`model.rpn_post_nms_top_n_test` (CPU configs lower it: the box head dominates an evaluation) sets the RPN's
    test-time proposals, training's stay, and the ensemble job rebuilds a saved model with it
    (`ModelConfig.architecture_options`); torchvision's 1000 is not recorded."""
    from detection.config import ModelConfig
    from detection.models.factory import build_detector

    config = ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", start="none", rpn_post_nms_top_n_test=300)
    model = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=96, start="none",
                           rpn_post_nms_top_n_train=500, **config.architecture_options)
    assert model.rpn._post_nms_top_n == {"training": 500, "testing": 300}
    assert ModelConfig().architecture_options == {}
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 96)])
    assert out["boxes"].shape[1] == 4
