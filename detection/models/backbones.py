"""One flat registry of detection backbones: multi-scale feature extractors, optionally with an FPN.

`BACKBONES[name]` is a `BackboneSpec`; keys equal torchvision/timm model names where one exists
(`resnet50_fpn` names what `fasterrcnn_resnet50_fpn` builds: torchvision ResNet-50 + FPN) and mean the same
for every arch (Faster R-CNN takes a body + FPN, FCOS-TAL a body's stride-8/16/32 maps). A spec builds
a `FeatureBody`: `body(x [B, 3, H, W])` -> OrderedDict `"0".."L-1"` of NCHW maps `[B, C_l, H / s_l, W / s_l]`
(`body.out_channels[l]`, `body.strides[l]`), finest first. `build_fpn_backbone` puts torchvision's
`FeaturePyramidNetwork` (+ a max-pooled `"pool"` level) on top, which is what Faster R-CNN consumes.

Pretrained ImageNet weights go through torchvision's own `weights=` path or timm's own `pretrained=True`
(see `detection.models.weights`). Pretrained CNN bodies use frozen batch norm, as torchvision's detection
builders do: detection batches are too small for batch statistics. A body that a detection checkpoint is
loaded into later (`detection_weights=True`) is built the same way, without the ImageNet weights.
A timm model is used through an entry here (its stages and normalization), not by its timm name.

Adding a backbone = one `BackboneSpec` entry; `tests/test_models_backbones.py` loops over the registry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torchvision
from torch import Tensor, nn
from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.models.weights import build_torchvision_model, create_timm_model, url_file_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureBody(nn.Module):
    """Multi-scale feature extractor: `forward(x [B, 3, H, W])` -> OrderedDict `"0".."L-1"` -> `[B, C_l, h_l, w_l]`.

    `out_channels[l]` is C_l and `strides[l]` the reduction s_l (`h_l = ceil(H / s_l)`), finest level first.
    """

    out_channels: tuple[int, ...]
    strides: tuple[int, ...]


class IntermediateFeatures(IntermediateLayerGetter, FeatureBody):
    """torchvision's `IntermediateLayerGetter` with the `FeatureBody` attributes.

    Parameter names stay the wrapped model's (`layer1.0.conv1.weight`), as in torchvision's `BackboneWithFPN`.
    """

    def __init__(
        self, model: nn.Module, return_layers: dict[str, str], *, out_channels: Sequence[int], strides: Sequence[int]
    ) -> None:
        super().__init__(model, return_layers)
        self.out_channels = tuple(out_channels)
        self.strides = tuple(strides)


class TimmFeatures(FeatureBody):
    """A timm `features_only=True` model as a `FeatureBody`; NHWC outputs (Swin) are permuted to NCHW."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_channels = tuple(model.feature_info.channels())
        self.strides = tuple(model.feature_info.reduction())
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = self.model(x)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]  # [B, h, w, C] -> [B, C, h, w]
        return OrderedDict((str(i), f) for i, f in enumerate(features))


class FPNBackbone(nn.Module):
    """A `FeatureBody` + torchvision's `FeaturePyramidNetwork` with a max-pooled extra level.

    `forward(x [B, 3, H, W])` -> OrderedDict `"0".."L-1", "pool"` -> `[B, out_channels, h_l, w_l]`; `strides`
    has one entry per output level (the body's, then twice the last for `"pool"`). Same attribute names as
    torchvision's `BackboneWithFPN` (`body`, `fpn`, `out_channels`), so state dicts keep its key layout.
    """

    def __init__(self, body: FeatureBody, *, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = (*body.strides, 2 * body.strides[-1])
        self.featmap_names = tuple(str(i) for i in range(len(body.strides)))  # levels RoIAlign pools from

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


BodyBuilder = Callable[..., FeatureBody]  # (*, pretrained, weights_path, image_size, frozen_bn) -> FeatureBody


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it.

    stages: five groups of parameter-name prefixes of the body, input to output (stem, then one per
        stride); `trainable_layers=n` trains the last n groups and freezes the rest (torchvision's meaning).
    image_mean, image_std: normalization for `GeneralizedRCNNTransform` (inputs are [0, 1] RGB).
    weights_source: "torchvision" (`weights=` loading, cache `torch.hub.get_dir()/checkpoints`) or
        "timm" (`pretrained=True`, Hugging Face hub cache).
    weights_file: the pretrained file's name in that cache; weights_url: its URL or `hf-hub:<repo id>`.
    size_divisible: the batch is padded to a multiple of this (the coarsest body stride).
    weights: the torchvision ImageNet weights enum (torchvision source); timm_name: the timm model (timm source).
    """

    name: str
    build_body: BodyBuilder
    stages: tuple[tuple[str, ...], ...]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    weights_source: str
    weights_file: str
    weights_url: str
    size_divisible: int = 32
    fpn_channels: int = 256
    weights: WeightsEnum | None = None
    timm_name: str | None = None


def _norm_layer(frozen_bn: bool) -> type[nn.Module]:
    return FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d


def _resnet_body(builder: Callable[..., nn.Module], weights: WeightsEnum) -> BodyBuilder:
    """ResNet C2..C5 (strides 4..32), as `fasterrcnn_resnet50_fpn`'s `_resnet_fpn_extractor` returns them."""

    def build(*, pretrained: bool, weights_path: str | Path | None, image_size: int, frozen_bn: bool) -> FeatureBody:
        model = build_torchvision_model(
            builder, weights, pretrained=pretrained, weights_path=weights_path, norm_layer=_norm_layer(frozen_bn)
        )
        c2 = model.inplanes // 8  # the same arithmetic as torchvision: 2048 // 8 = 256 for ResNet-50, 64 for -18
        return IntermediateFeatures(
            model, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
            out_channels=(c2, 2 * c2, 4 * c2, 8 * c2), strides=(4, 8, 16, 32),
        )

    return build


def _mobilenet_v2_body(
    *, pretrained: bool, weights_path: str | Path | None, image_size: int, frozen_bn: bool
) -> FeatureBody:
    """MobileNetV2 `features` at strides 8, 16, 32 (ends of those stages: blocks 6, 13, 18).

    Stride 4 is left out on purpose: a 256-channel FPN level at H/4 costs more than the whole body on CPU.
    """
    model = build_torchvision_model(
        torchvision.models.mobilenet_v2, MobileNet_V2_Weights.IMAGENET1K_V1,
        pretrained=pretrained, weights_path=weights_path, norm_layer=_norm_layer(frozen_bn),
    )
    features = model.features
    return IntermediateFeatures(
        features, {"6": "0", "13": "1", "18": "2"},
        out_channels=(features[6].out_channels, features[13].out_channels, features[18].out_channels),
        strides=(8, 16, 32),
    )


def timm_size_kwargs(model_name: str, image_size: int) -> dict[str, object]:
    """What timm model `model_name` must be built with to take inputs other than its pretraining size.

    Swin (`swin_transformer`): `img_size=image_size, strict_img_size=False`: window sizes are chosen for
    `img_size`, and without a strict size each stage is padded to whole windows and the shifted-window masks
    are built per forward, so every padded batch size works (progressive resizing). CNNs take any size: {}.
    """
    import timm

    if timm.models.get_arch_name(model_name) in timm.list_models(module="swin_transformer"):
        return {"img_size": image_size, "strict_img_size": False}
    return {}


def _timm_body(model_name: str, *, out_indices: tuple[int, ...]) -> BodyBuilder:
    """A timm `features_only` body, built for any input size (`timm_size_kwargs`)."""

    def build(*, pretrained: bool, weights_path: str | Path | None, image_size: int, frozen_bn: bool) -> FeatureBody:
        kwargs: dict = dict(features_only=True, out_indices=out_indices, **timm_size_kwargs(model_name, image_size))
        model = create_timm_model(model_name, pretrained=pretrained, weights_path=weights_path, **kwargs)
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d

            model = freeze_batch_norm_2d(model)
        return TimmFeatures(model)

    return build


def _torchvision_spec(
    name: str, build_body: BodyBuilder, weights: WeightsEnum, stages: tuple[tuple[str, ...], ...]
) -> BackboneSpec:
    return BackboneSpec(
        name=name, build_body=build_body, stages=stages, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        weights_source="torchvision", weights_file=url_file_name(weights.url), weights_url=weights.url,
        weights=weights,
    )


def _timm_spec(
    name: str, timm_name: str, hub_id: str, *, out_indices: tuple[int, ...], stages: tuple[tuple[str, ...], ...],
    image_mean: tuple[float, float, float] = IMAGENET_MEAN, image_std: tuple[float, float, float] = IMAGENET_STD,
) -> BackboneSpec:
    """A timm body; `image_mean`/`image_std` are those of timm's pretrained config for `hub_id`."""
    return BackboneSpec(
        name=name, build_body=_timm_body(timm_name, out_indices=out_indices), stages=stages,
        image_mean=image_mean, image_std=image_std, weights_source="timm", weights_file="model.safetensors",
        weights_url=f"hf-hub:{hub_id}", timm_name=timm_name,
    )


_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
# timm EfficientNets: blocks grouped by output stride 2, 4, 8, 16, 32 (blocks.3 is the first stride-16 block)
_EFFICIENTNET_STAGES = (("model.conv_stem", "model.bn1", "model.blocks.0"), ("model.blocks.1",), ("model.blocks.2",),
                        ("model.blocks.3", "model.blocks.4"), ("model.blocks.5", "model.blocks.6"))

BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": _torchvision_spec(
        "mobilenet_v2", _mobilenet_v2_body, MobileNet_V2_Weights.IMAGENET1K_V1,
        # features blocks grouped by output stride 2, 4, 8, 16, 32
        stages=(("0", "1"), ("2", "3"), ("4", "5", "6"), tuple(str(i) for i in range(7, 14)),
                tuple(str(i) for i in range(14, 19))),
    ),
    "resnet18": _torchvision_spec(
        "resnet18", _resnet_body(torchvision.models.resnet18, ResNet18_Weights.IMAGENET1K_V1),
        ResNet18_Weights.IMAGENET1K_V1, stages=_RESNET_STAGES,
    ),
    # `resnet50` and `resnet50_fpn` build the same body; `resnet50_fpn` is also the name of torchvision's COCO
    # Faster R-CNN (`weights.DETECTION_CHECKPOINTS`)
    "resnet50": _torchvision_spec(
        "resnet50", _resnet_body(torchvision.models.resnet50, ResNet50_Weights.IMAGENET1K_V1),
        ResNet50_Weights.IMAGENET1K_V1, stages=_RESNET_STAGES,
    ),
    "resnet50_fpn": _torchvision_spec(
        "resnet50_fpn", _resnet_body(torchvision.models.resnet50, ResNet50_Weights.IMAGENET1K_V1),
        ResNet50_Weights.IMAGENET1K_V1, stages=_RESNET_STAGES,
    ),
    "efficientnet_b3": _timm_spec(
        "efficientnet_b3", "efficientnet_b3", "timm/efficientnet_b3.ra2_in1k",
        out_indices=(1, 2, 3, 4), stages=_EFFICIENTNET_STAGES,  # strides 4, 8, 16, 32
    ),
    "tf_efficientnet_lite0": _timm_spec(
        "tf_efficientnet_lite0", "tf_efficientnet_lite0", "timm/tf_efficientnet_lite0.in1k",
        out_indices=(1, 2, 3, 4), stages=_EFFICIENTNET_STAGES, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    ),
    # torchvision's name for Swin-S; built by timm, which offers features_only
    "swin_s": _timm_spec(
        "swin_s", "swin_small_patch4_window7_224", "timm/swin_small_patch4_window7_224.ms_in22k_ft_in1k",
        out_indices=(0, 1, 2, 3),
        stages=(("model.patch_embed",), ("model.layers_0",), ("model.layers_1",), ("model.layers_2",),
                ("model.layers_3",)),
    ),
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """`BACKBONES[name]`, or a ValueError that lists the registered names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"`backbone` must be one of {sorted(BACKBONES)}, but got {name!r}. These are registry keys "
                         f"for every arch, not timm model names: to use timm's {name!r}, add a `BackboneSpec` for it "
                         f"(its stages and normalization) to detection.models.backbones.BACKBONES.") from None


def freeze_stages(body: nn.Module, stages: Sequence[Sequence[str]], trainable_layers: int) -> None:
    """Freeze the parameters of all but the last `trainable_layers` stage groups of `body` (in place).

    `stages` holds parameter-name prefixes, input to output; `trainable_layers=len(stages)` trains everything.
    """
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"`0 <= trainable_layers <= {len(stages)}` must hold, but got {trainable_layers=}.")
    frozen = tuple(prefix + "." for group in stages[: len(stages) - trainable_layers] for prefix in group)
    for name, parameter in body.named_parameters():
        if name.startswith(frozen):
            parameter.requires_grad_(False)


def build_backbone_body(
    name: str,
    *,
    image_size: int,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    trainable_layers: int = 3,
    detection_weights: bool = False,
    frozen_bn: bool | None = None,
) -> FeatureBody:
    """The registered body `name`, with its first stages frozen.

    `weights_path` (a classification state dict of the same architecture) overrides `pretrained`. As in
    torchvision, a randomly initialized body trains all its layers whatever `trainable_layers` says.
    `detection_weights=True`: a detection checkpoint is loaded into the whole detector afterwards, so the body
    is built without ImageNet weights but set up as a trained one (frozen batch norm and stages).
    `frozen_bn`: frozen batch norm; None = for a trained body only (frozen statistics of a random init mean nothing).
    Raises `WeightsNotFoundError` when pretrained weights are neither cached nor downloadable.
    """
    spec = get_backbone_spec(name)
    if image_size <= 0:
        raise ValueError(f"`image_size > 0` must hold, but got {image_size=}.")
    if not 0 <= trainable_layers <= len(spec.stages):
        raise ValueError(f"`0 <= trainable_layers <= {len(spec.stages)}` must hold, but got {trainable_layers=}.")
    if detection_weights:
        pretrained, weights_path = False, None
    trained = pretrained or weights_path is not None or detection_weights
    body = spec.build_body(pretrained=pretrained, weights_path=weights_path, image_size=image_size,
                           frozen_bn=trained if frozen_bn is None else frozen_bn)
    freeze_stages(body, spec.stages, trainable_layers if trained else len(spec.stages))
    return body


def build_fpn_backbone(
    name: str,
    *,
    image_size: int,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    trainable_layers: int = 3,
    detection_weights: bool = False,
) -> FPNBackbone:
    """`build_backbone_body(...)` + FPN (`spec.fpn_channels` channels, levels `"0".."L-1", "pool"`)."""
    body = build_backbone_body(
        name, image_size=image_size, pretrained=pretrained, weights_path=weights_path,
        trainable_layers=trainable_layers, detection_weights=detection_weights,
    )
    return FPNBackbone(body, out_channels=get_backbone_spec(name).fpn_channels)


__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FPNBackbone",
    "FeatureBody",
    "IntermediateFeatures",
    "TimmFeatures",
    "build_backbone_body",
    "build_fpn_backbone",
    "freeze_stages",
    "get_backbone_spec",
    "timm_size_kwargs",
]
