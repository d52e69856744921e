"""The backbone registry, tested by looping over it: a new entry needs no new test code."""

from __future__ import annotations

import math

import pytest
import torch

from detection.models.backbones import (
    BACKBONES,
    FeatureBody,
    FPNBackbone,
    build_backbone_body,
    build_fpn_backbone,
    freeze_stages,
    get_backbone_spec,
)
from detection.models.weights import url_file_name

NAMES = sorted(BACKBONES)


@pytest.fixture(scope="module", params=NAMES)
def body(request: pytest.FixtureRequest) -> tuple[str, FeatureBody]:
    torch.manual_seed(0)
    return request.param, build_backbone_body(request.param, image_size=64, pretrained=False)


def test_registry_has_the_required_backbones() -> None:
    assert {"mobilenet_v2", "resnet18", "resnet50_fpn", "efficientnet_b3", "swin_s"} <= set(BACKBONES)
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert len(spec.image_mean) == len(spec.image_std) == 3
        assert spec.weights_source in ("torchvision", "timm")
        if spec.weights_source == "torchvision":
            # torchvision's cache file name is the URL's last path component
            assert spec.weights_file == url_file_name(spec.weights_url) and spec.weights_file.endswith(".pth")
        else:
            assert spec.weights_url.startswith("hf-hub:timm/")


def test_body_outputs_match_declared_channels_and_strides(body: tuple[str, FeatureBody]) -> None:
    name, module = body
    x = torch.rand(1, 3, 64, 96)  # non-square: catches swapped H/W (e.g. an NHWC map read as NCHW)
    with torch.no_grad():
        features = module.eval()(x)
    assert list(features) == [str(i) for i in range(len(module.strides))], name
    for (key, feature), channels, stride in zip(features.items(), module.out_channels, module.strides):
        # e.g. stride 8: [1, C, 64 / 8, 96 / 8] = [1, C, 8, 12]
        assert tuple(feature.shape) == (1, channels, math.ceil(64 / stride), math.ceil(96 / stride)), (name, key)
    assert list(module.strides) == sorted(module.strides)


def test_stages_partition_the_body_parameters(body: tuple[str, FeatureBody]) -> None:
    name, module = body
    stages = get_backbone_spec(name).stages
    assert len(stages) == 5, name  # stem + 4 strided stages: trainable_layers means the same everywhere
    names = [n for n, _ in module.named_parameters()]
    for group in stages:
        for prefix in group:
            assert any(n.startswith(prefix + ".") for n in names), f"{name}: stage prefix {prefix!r} matches nothing"
    every_prefix = tuple(p + "." for group in stages for p in group)
    assert [n for n in names if not n.startswith(every_prefix)] == [], name


def test_freeze_stages_counts_stages_from_the_output_end() -> None:
    spec = get_backbone_spec("resnet18")
    module = build_backbone_body("resnet18", image_size=64, pretrained=False)
    freeze_stages(module, spec.stages, trainable_layers=2)  # layer3 + layer4 train; conv1, layer1, layer2 frozen
    trainable = {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in module.named_parameters() if not p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}
    freeze_stages(module, spec.stages, trainable_layers=0)
    assert not any(p.requires_grad for p in module.parameters())
    with pytest.raises(ValueError, match=r"trainable_layers <= 5.*trainable_layers=6"):
        freeze_stages(module, spec.stages, trainable_layers=6)


def test_random_init_trains_every_layer_and_bad_trainable_layers_is_rejected() -> None:
    # as torchvision: freezing randomly initialized stages would only hurt
    module = build_backbone_body("mobilenet_v2", image_size=64, pretrained=False, trainable_layers=0)
    assert all(p.requires_grad for p in module.parameters())
    with pytest.raises(ValueError, match=r"trainable_layers=-1"):
        build_backbone_body("mobilenet_v2", image_size=64, pretrained=False, trainable_layers=-1)


def test_fpn_backbone_adds_a_pool_level() -> None:
    fpn = build_fpn_backbone("mobilenet_v2", image_size=64, pretrained=False)
    assert isinstance(fpn, FPNBackbone)
    assert fpn.strides == (8, 16, 32, 64) and fpn.featmap_names == ("0", "1", "2")
    with torch.no_grad():
        out = fpn.eval()(torch.rand(1, 3, 64, 64))
    # 64 px: 8x8, 4x4, 2x2 and the max-pooled 1x1
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (1, 256, 8, 8), "1": (1, 256, 4, 4), "2": (1, 256, 2, 2), "pool": (1, 256, 1, 1),
    }


def test_unknown_backbone_lists_the_registry() -> None:
    expected = r"`backbone` must be one of \[.*'mobilenet_v2'.*'swin_s'.*\], but got 'vgg16'"
    with pytest.raises(ValueError, match=expected):
        build_backbone_body("vgg16", image_size=64, pretrained=False)


def test_model_backbone_is_a_registry_key_for_every_arch() -> None:
    from detection.config import ConfigError, ModelConfig

    for arch in ("faster_rcnn", "fcos_tal"):
        ModelConfig(arch=arch, backbone="tf_efficientnet_lite0").validate("x.yaml")  # configs/demo.yaml's fcos_tal
        # a timm name (timm's MobileNetV2) is no key, for fcos_tal either
        expected = r"x.yaml: `model.backbone` must be one of \[.*'mobilenet_v2'.*\].*got 'mobilenetv2_100'"
        with pytest.raises(ConfigError, match=expected):
            ModelConfig(arch=arch, backbone="mobilenetv2_100").validate("x.yaml")
