"""Training configuration: frozen dataclasses read from YAML in one place.

`ExperimentConfig` is what one fold's training needs (data, model, train, seed). The sweep config
(`search.config.SweepConfig`) embeds one as the base that each trial's sampled parameters override.
Unknown keys and bad values raise `ConfigError` naming the file, the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

OPTIMIZERS = ("sgd", "adamw", "adam")
VERIFY_MODES = ("header", "decode")  # data.verify
ON_BAD_IMAGE = ("error", "skip")  # data.on_bad_image


class ConfigError(ValueError):
    """A config file or value that does not match the schema."""


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/deepforest"  # COCO .json or a Roboflow export folder (train/ valid/ test/)
    # Images without boxes are trained on only when false; they always stay in validation, selection and
    # test (false positives there must cost).
    filter_empty: bool = True
    num_folds: int = 3
    # Held-out shares of all images when the dataset has no Roboflow valid/ (selection) or test/ folder.
    selection_fraction: float = 0.15
    test_fraction: float = 0.15
    class_balanced_sampling: bool = True  # LVIS repeat-factor sampling of rare-class images
    repeat_threshold: float = 0.3  # RFS threshold t: classes in fewer than t of the images repeat
    num_workers: int = 0  # DataLoader workers per fold
    # Every image is checked before a sweep (detection/data/verify.py): "header" reads its size and end
    # marker (JPEG EOI, PNG IEND), "decode" decodes it whole (formats without an end marker).
    verify: str = "header"
    on_bad_image: str = "error"  # error: stop and list every bad file; skip: leave them out of the split

    def validate(self, where: str) -> None:
        _check(self.num_folds >= 2, where, "data.num_folds", f"an integer >= 2, got {self.num_folds}")
        _check(self.verify in VERIFY_MODES, where, "data.verify", f"one of {list(VERIFY_MODES)}, got {self.verify!r}")
        _check(self.on_bad_image in ON_BAD_IMAGE, where, "data.on_bad_image",
               f"one of {list(ON_BAD_IMAGE)}, got {self.on_bad_image!r}")
        for key in ("selection_fraction", "test_fraction"):
            value = getattr(self, key)
            _check(0.0 <= value < 1.0, where, f"data.{key}", f"a number in [0, 1), got {value}")
        _check(self.selection_fraction + self.test_fraction < 1.0, where, "data.selection_fraction",
               f"such that selection_fraction + test_fraction < 1, got {self.selection_fraction} + "
               f"{self.test_fraction}")
        _check(self.repeat_threshold > 0.0, where, "data.repeat_threshold", f"> 0, got {self.repeat_threshold}")
        _check(self.num_workers >= 0, where, "data.num_workers", f">= 0, got {self.num_workers}")


TORCHVISION_TEST_PROPOSALS = 1000  # FasterRCNN's rpn_post_nms_top_n_test


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "faster_rcnn"  # faster_rcnn | fcos_tal
    backbone: str = "mobilenet_v2"  # a key of detection.models.backbones.BACKBONES (every arch)
    # Where the weights start from: detection (a COCO detector of this arch/backbone, box predictor replaced),
    # backbone (ImageNet backbone weights), none (random), or auto: detection where a checkpoint exists
    # (detection.models.weights.DETECTION_CHECKPOINTS: faster_rcnn/resnet50_fpn), else backbone.
    start: str = "auto"
    # Local file that overrides torchvision/timm's cache and download: a full detection state dict for a
    # detection start, the backbone's classification state dict for a backbone start.
    weights_path: str | None = None
    pretrained: bool | None = None  # deprecated alias of `start`, read from old YAML: true = auto, false = none
    kmeans_anchors: bool = True  # Faster R-CNN anchors from k-means over the training boxes
    trainable_layers: int = 3
    freeze_backbone_epochs: int = 0  # fcos_tal: backbone frozen for this many epochs, then unfrozen
    # faster_rcnn: RoIs per image for the box head and training proposals kept (torchvision's defaults);
    # the box head dominates a CPU step at small sizes, so CPU configs lower them.
    roi_batch_size_per_image: int = 512
    rpn_post_nms_top_n_train: int = 2000
    # faster_rcnn: proposals the box head scores per image at inference (torchvision's 1000); it dominates a CPU
    # evaluation, and a few hundred proposals cover scenes of tens of objects.
    rpn_post_nms_top_n_test: int = TORCHVISION_TEST_PROPOSALS
    # fcos_tal: PAN neck channels and convs per head tower (None: 256 and 4, as FCOS); a CPU config lowers them.
    neck_channels: int | None = None
    head_convs: int | None = None

    @property
    def architecture_options(self) -> dict[str, int]:
        """The `build_detector` keywords beyond arch/backbone that change the model's state dict or what it
        predicts: what a saved model must be rebuilt with (the ensemble job records them per model)."""
        options = {k: getattr(self, k) for k in ("neck_channels", "head_convs") if getattr(self, k) is not None}
        if self.arch == "faster_rcnn" and self.rpn_post_nms_top_n_test != TORCHVISION_TEST_PROPOSALS:
            options["rpn_post_nms_top_n_test"] = self.rpn_post_nms_top_n_test
        return options

    def __post_init__(self) -> None:
        if self.pretrained is None:
            return
        start = "auto" if self.pretrained else "none"
        if self.start not in ("auto", start):
            raise ConfigError(f"`model.pretrained: {str(self.pretrained).lower()}` (deprecated: `model.start`) "
                              f"contradicts `model.start: {self.start}`; keep only `model.start`.")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "pretrained", None)  # read once: `start` is the one key from here on

    def validate(self, where: str) -> None:
        from detection.models.backbones import BACKBONES
        from detection.models.factory import ARCHS
        from detection.models.weights import AUTO_START, STARTS, resolve_start

        _check(self.arch in ARCHS, where, "model.arch", f"one of {list(ARCHS)}, got {self.arch!r}")
        _check(self.backbone in BACKBONES, where, "model.backbone",
               f"one of {sorted(BACKBONES)} (detection.models.backbones.BACKBONES, for every arch; a timm model "
               f"needs an entry there), got {self.backbone!r}")
        _check(self.start in (AUTO_START, *STARTS), where, "model.start",
               f"one of {[AUTO_START, *STARTS]}, got {self.start!r}")
        if self.start == "detection":
            try:
                resolve_start(self.arch, self.backbone, self.start)
            except ValueError as err:
                raise ConfigError(f"{where}: `model.start`: {err}") from None
        _check(0 <= self.trainable_layers <= 5, where, "model.trainable_layers",
               f"an integer in [0, 5], got {self.trainable_layers}")
        _check(self.freeze_backbone_epochs >= 0, where, "model.freeze_backbone_epochs",
               f">= 0, got {self.freeze_backbone_epochs}")
        _check(self.roi_batch_size_per_image >= 1, where, "model.roi_batch_size_per_image",
               f">= 1, got {self.roi_batch_size_per_image}")
        _check(self.rpn_post_nms_top_n_train >= 1, where, "model.rpn_post_nms_top_n_train",
               f">= 1, got {self.rpn_post_nms_top_n_train}")
        _check(self.rpn_post_nms_top_n_test >= 1, where, "model.rpn_post_nms_top_n_test",
               f">= 1, got {self.rpn_post_nms_top_n_test}")
        for key in ("neck_channels", "head_convs"):
            value = getattr(self, key)
            _check(value is None or value >= 1, where, f"model.{key}", f"null or an integer >= 1, got {value}")
        if self.weights_path is not None:
            _check(Path(self.weights_path).is_file(), where, "model.weights_path",
                   f"an existing file, got {self.weights_path!r}")
            _check(self.start != "none", where, "model.weights_path",
                   "null with `model.start: none` (a random start reads no weights file)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 4
    optimizer: str = "sgd"  # sgd | adamw | adam
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    image_size: int = 640
    small_image_size: int | None = None  # progressive resizing: this size first ...
    progressive_epochs: int = 0  # ... for this many epochs, then image_size
    amp: bool = True  # mixed precision; only takes effect on CUDA
    grad_clip: float = 10.0
    patience: int = 5  # early stopping on the validation score; 0 disables
    # F1's score cut; null: the F1-optimal cut on each evaluation's own predictions (a sweep then picks the
    # trial's threshold on its out-of-fold predictions). mAP always uses every box.
    score_threshold: float | None = None
    augment: bool = True
    # Aerial and microscopy images have no "up": vertical flips and 90-degree turns are free extra data there
    # (off by default: street scenes and documents do have an up).
    vflip_p: float = 0.0
    rot90_p: float = 0.0
    eval_batch_size: int = 4

    def validate(self, where: str) -> None:
        _check(self.epochs >= 1, where, "train.epochs", f"an integer >= 1, got {self.epochs}")
        _check(self.lr > 0, where, "train.lr", f"> 0, got {self.lr}")
        _check(self.batch_size >= 1, where, "train.batch_size", f"an integer >= 1, got {self.batch_size}")
        _check(self.optimizer in OPTIMIZERS, where, "train.optimizer",
               f"one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.image_size >= 32, where, "train.image_size", f">= 32, got {self.image_size}")
        if self.small_image_size is not None:
            _check(32 <= self.small_image_size <= self.image_size, where, "train.small_image_size",
                   f"in [32, image_size={self.image_size}], got {self.small_image_size}")
        _check(self.progressive_epochs >= 0, where, "train.progressive_epochs", f">= 0, got {self.progressive_epochs}")
        _check(self.warmup_epochs >= 0, where, "train.warmup_epochs", f">= 0, got {self.warmup_epochs}")
        _check(0 < self.min_lr_ratio <= 1, where, "train.min_lr_ratio", f"in (0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, where, "train.grad_clip", f">= 0 (0 disables), got {self.grad_clip}")
        _check(self.patience >= 0, where, "train.patience", f">= 0 (0 disables), got {self.patience}")
        if self.score_threshold is not None:
            _check(0.0 <= self.score_threshold < 1.0, where, "train.score_threshold",
                   f"null (F1-optimal) or a number in [0, 1), got {self.score_threshold}")
        for key in ("vflip_p", "rot90_p"):
            value = getattr(self, key)
            _check(0.0 <= value <= 1.0, where, f"train.{key}", f"a probability in [0, 1], got {value}")
        _check(self.eval_batch_size >= 1, where, "train.eval_batch_size", f">= 1, got {self.eval_batch_size}")

    def image_size_at(self, epoch: int) -> int:
        """Input size for a 0-based epoch under progressive resizing."""
        if self.small_image_size is not None and epoch < self.progressive_epochs:
            return self.small_image_size
        return self.image_size


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def validate(self, where: str = "<config>") -> ExperimentConfig:
        self.data.validate(where)
        self.model.validate(where)
        self.train.validate(where)
        return self

    def with_overrides(self, where: str = "<overrides>", **sections: dict[str, Any]) -> ExperimentConfig:
        """Copy with e.g. `train={"lr": 1e-3}, model={"arch": "fcos_tal"}` applied (keys and types checked;
        an error names `where`)."""
        changes: dict[str, Any] = {}
        for name, values in sections.items():
            current = getattr(self, name)
            if is_dataclass(current):
                changes[name] = from_dict(type(current), {**dataclasses.asdict(current), **values}, where=where,
                                          prefix=f"{name}.")
            else:
                changes[name] = values
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, where: str, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: `{key}` must be {expected}.")


def from_dict(cls: type, data: Any, *, where: str, prefix: str = "") -> Any:
    """Build a (nested) frozen dataclass from plain YAML data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: `{prefix.rstrip('.') or '<top level>'}` must be a mapping, "
                          f"got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key `{prefix}{unknown[0]}`; allowed keys under "
                          f"`{prefix.rstrip('.') or '<top level>'}` are {sorted(known)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, where=where, key=f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, where: str, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        return from_dict(hint, value, where=where, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where=where, key=key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: `{key}` must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: `{key}` must be a list, got {value!r}.")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, where=where, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: `{key}` must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: `{key}` must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: `{key}` must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: `{key}` must be a string, got {value!r}.")
        return value
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


def resolve_data_path(data: DataConfig, config_file: Path | None) -> DataConfig:
    """Relative dataset paths are relative to the config file's folder's project root (the cwd) first,
    then to the config file itself."""
    p = Path(data.path).expanduser()
    if p.is_absolute() or p.exists() or config_file is None:
        return dataclasses.replace(data, path=str(p.resolve()) if p.exists() else str(p))
    beside = (config_file.parent / p)
    return dataclasses.replace(data, path=str(beside.resolve()) if beside.exists() else str(p))


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read a training YAML (sections data, model, train, seed) into a validated ExperimentConfig."""
    path = Path(path)
    cfg = from_dict(ExperimentConfig, read_yaml(path), where=str(path))
    cfg = dataclasses.replace(cfg, data=resolve_data_path(cfg.data, path))
    return cfg.validate(str(path))


def dump_yaml(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
