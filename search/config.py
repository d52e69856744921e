"""Sweep configuration: the YAML that `detsweep sweep` reads, as validated frozen dataclasses.

A sweep YAML has the sections of a training YAML (`data`, `model`, `train`, `seed`: the base every trial
starts from, see `detection.config`) plus `name`, `storage`, `search`, `resources`, `ensemble`,
`checkpoint` and `failure`. Everything is read and checked here, before Ray starts: unknown keys and bad values raise
`detection.config.ConfigError` naming the file, the dotted key, what is allowed and what came.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from detection.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    dump_yaml,
    from_dict,
    read_yaml,
    resolve_data_path,
)

__all__ = [
    "ASHAConfig",
    "CheckpointConfig",
    "DetectorChoice",
    "EnsembleConfig",
    "FailurePolicy",
    "FloatRange",
    "ResourcesConfig",
    "SearchConfig",
    "SpaceConfig",
    "SweepConfig",
    "WBF_CONF_TYPES",
    "load_sweep_config",
    "sweep_config_from_dict",
]

# ensemble_boxes.weighted_boxes_fusion's `conf_type` values.
WBF_CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


@dataclass(frozen=True)
class FloatRange:
    """A closed interval `[low, high]` to sample a float from."""

    low: float
    high: float


@dataclass(frozen=True)
class DetectorChoice:
    """One detector the search may pick: `arch` from `detection.models.factory.ARCHS`, `backbone` from
    `detection.models.backbones.BACKBONES`, optionally its own learning-rate range, and `model`/`train` keys
    that differ from the sweep's base for this detector only (e.g. `train: {optimizer: adamw}` for FCOS-TAL
    beside SGD for Faster R-CNN, `model: {neck_channels: 96}`)."""

    arch: str
    backbone: str
    lr: FloatRange | None = None  # None: `search.space.lr`
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The trial config value `"<arch>/<backbone>"`, e.g. `"faster_rcnn/mobilenet_v2"`."""
        return f"{self.arch}/{self.backbone}"


@dataclass(frozen=True)
class SpaceConfig:
    """The search space. `detectors` empty means the base `model.arch`/`model.backbone` only."""

    lr: FloatRange = field(default_factory=lambda: FloatRange(1e-4, 1e-1))  # log-uniform
    batch_size: tuple[int, ...] = (4, 8)  # categorical
    # None (the default): each trial's threshold is the F1-optimal one on its out-of-fold predictions, no
    # trial spent per value; a range makes it a sampled trial param (uniform) again.
    score_threshold: FloatRange | None = None
    detectors: tuple[DetectorChoice, ...] = ()


@dataclass(frozen=True)
class ASHAConfig:
    grace_period: int = 1  # epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SearchConfig:
    num_samples: int = 4
    max_concurrent_trials: int = 1
    metric: str = "cv_score"  # fold mean of each fold's best-epoch score: the models the trial keeps
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = "none"
    asha: ASHAConfig = field(default_factory=ASHAConfig)
    n_startup_trials: int = 10  # TPE samples at random until this many trials have finished
    # The first trials take each detector of the space once (their other params sampled), so that even a
    # short sweep tries every detector; Optuna's enqueue_trial (OptunaSearch points_to_evaluate).
    each_detector_first: bool = False
    # Tune's reuse_actors: the next trial takes a finished trial's coordinator, placement group and fold worker
    # processes (rebuilt in place: trainables/fold_pool.py) instead of starting them again
    reuse_actors: bool = True
    space: SpaceConfig = field(default_factory=SpaceConfig)


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray resources of one trial: a coordinator bundle plus one bundle per fold."""

    cpus_per_fold: float = 1.0
    gpus_per_fold: float = 0.0  # 1, a fraction (folds share a GPU), an integer > 1, or 0 on CPU machines
    coordinator_cpus: float = 0.1  # the trial's own actor only drives its folds
    # A custom Ray resource the coordinator bundle also asks for (1 unit per trial), e.g. "coordinator" that only
    # the on-demand head advertises (cluster.yaml `resources: {"CPU": 0, "coordinator": N}`): coordinators then
    # never land on a spot GPU node, whose reclaim would restart the whole trial. None: anywhere with CPUs.
    coordinator_resource: str | None = None
    # Before a trial's folds train, one probe step at its largest input and batch size (trainables/trial.py):
    # on CUDA always, against the GPU's memory (or this bound if set); on CPU only with this bound, the fold
    # process's peak resident memory in GiB. A batch that does not fit ends the trial as infeasible, learnt by
    # Optuna as a constraint, before any epoch is spent on it.
    fold_memory_gb: float | None = None


@dataclass(frozen=True)
class EnsembleConfig:
    """The final job: Weighted Boxes Fusion of fold models, chosen on the selection split (search/ensemble.py)."""

    iou_thr: float = 0.55
    conf_type: str = "avg"
    skip_box_thr: float = 0.01  # WBF drops boxes below this fixed floor (mAP ranks every box above it)
    max_models: int = 8  # greedy cross-trial selection: at most this many models (with repeats); 1 disables it
    greedy_candidates: int = 24  # the strongest single fold models (on the selection split) it chooses from
    # WBF settings the selection split may choose for the leading candidates (with iou_thr/conf_type above,
    # which rank trials and drive greedy selection); empty tuples keep those two fixed.
    iou_thr_grid: tuple[float, ...] = (0.4, 0.5, 0.55, 0.6, 0.7)
    conf_type_grid: tuple[str, ...] = ("avg", "box_and_model_avg", "absent_model_aware_avg")
    # Flip test-time augmentation (each model also predicts the mirrored image; WBF fuses both views), for the
    # selection split to choose like the WBF settings; (false,) never runs the mirrored view (half the inference).
    hflip_tta_grid: tuple[bool, ...] = (False, True)
    # Paired bootstrap over the test split's images (detection/bootstrap.py): 95% intervals of the chosen
    # ensemble's and the best single model's figures and of their difference; 0 leaves them out.
    bootstrap_samples: int = 1000
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    """What a trial writes to the experiment's storage each epoch (trainables/trial.py `_Trial.report`)."""

    # The folds' full resume states (model + optimizer + scaler: ~2 GB per epoch for 5 ResNet-50-FPN folds) go
    # into the checkpoint of every `resume_every`-th epoch (not the trial's last: an ended trial is never resumed);
    # other epochs write best/ (the kept fold models and out-of-fold predictions) when a fold improved or the
    # trial ended. They serve only a lost
    # coordinator or driver (a lost fold is recreated from the coordinator's memory): the trial then goes back
    # to the last states written and reruns at most resume_every - 1 epochs. Default from bench/checkpoint_io.py.
    resume_every: int = 5
    # Once a trial has ended, only the best `keep_trials` ended trials by the search metric keep their fold
    # models (the ensemble job's candidates); every ended trial loses its resume states. Storage after a sweep:
    # at most keep_trials x keep_best models (search/checkpoint_budget.py). null keeps every trial's models.
    keep_trials: int | None = 8


@dataclass(frozen=True)
class FailurePolicy:
    max_failures: int = 1  # retries of a failed trial (from its latest checkpoint); -1 retries forever


@dataclass(frozen=True)
class LoggingConfig:
    # Ray Tune's MLflow callback (the optional extra `pip install 'detsweep[mlflow]'`); None: off.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None  # default: the sweep's name


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"  # the experiment folder is `<storage>/<name>-<timestamp>` unless `--name` is given
    storage: str = "experiments"
    seed: int = 0  # split, sampler and every trial's base seed
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure: FailurePolicy = field(default_factory=FailurePolicy)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def base(self) -> ExperimentConfig:
        """The training config every trial starts from (its sampled params are applied on top)."""
        return ExperimentConfig(data=self.data, model=self.model, train=self.train, seed=self.seed)

    def detector_base(self, choice: DetectorChoice, *, where: str = "<config>") -> ExperimentConfig:
        """The training config a trial of this detector starts from: `base` with the choice's arch, backbone
        and own `model`/`train` keys applied (its sampled params go on top, `apply_trial_params`)."""
        return self.base.with_overrides(where, model={**choice.model, "arch": choice.arch, "backbone": choice.backbone},
                                        train=choice.train)

    @property
    def detector_bases(self) -> dict[str, ExperimentConfig]:
        """`detector_base` of every detector of the search, by its key `"<arch>/<backbone>"`."""
        return {choice.key: self.detector_base(choice) for choice in self.detectors}

    @property
    def detectors(self) -> tuple[DetectorChoice, ...]:
        """The detectors to search over (the base model's when `search.space.detectors` is empty)."""
        return self.search.space.detectors or (DetectorChoice(self.model.arch, self.model.backbone),)

    @property
    def trial_cpus(self) -> float:
        """CPUs one trial reserves: coordinator + K fold bundles."""
        return self.resources.coordinator_cpus + self.data.num_folds * self.resources.cpus_per_fold

    @property
    def trial_gpus(self) -> float:
        return self.data.num_folds * self.resources.gpus_per_fold

    def validate(self, where: str = "<config>", *, check_data: bool = True) -> SweepConfig:
        """Check every value and the cross-field rules; returns self. `check_data` checks `data.path`."""
        self.base.validate(where)
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), where, "name",
               f"a non-empty folder name without '/', got {self.name!r}")
        _check(bool(self.storage), where, "storage", "a non-empty path")
        if check_data:
            _check_data_path(self.data.path, where)
        _validate_search(self.search, self.train, where)
        for i, choice in enumerate(self.detectors):
            key = f"search.space.detectors[{i}]" if self.search.space.detectors else "model"
            _check_detector(choice, key, where)
            for section in ("model", "train"):
                _check("arch" not in getattr(choice, section) and "backbone" not in getattr(choice, section),
                       where, f"{key}.{section}", "free of arch/backbone (the choice's own keys say them)")
            self.detector_base(choice, where=f"{where}: `{key}`").validate(f"{where}: `{key}`")
        _validate_resources(self.resources, where)
        _validate_ensemble(self.ensemble, where)
        _check(self.checkpoint.resume_every >= 1, where, "checkpoint.resume_every",
               f"an integer >= 1 (epochs between the folds' resume states), got {self.checkpoint.resume_every}")
        _check(self.checkpoint.keep_trials is None or self.checkpoint.keep_trials >= 1, where,
               "checkpoint.keep_trials", f"null or an integer >= 1 (trials that keep their fold models), "
               f"got {self.checkpoint.keep_trials}")
        _check(self.failure.max_failures >= -1, where, "failure.max_failures",
               f"an integer >= -1 (-1 retries forever), got {self.failure.max_failures}")
        if self.logging.mlflow_tracking_uri is not None:
            import importlib.util

            _check(importlib.util.find_spec("mlflow") is not None, where, "logging.mlflow_tracking_uri",
                   "unset, or mlflow installed: pip install 'detsweep[mlflow]'")
        return self

    def smoke_test(self) -> SweepConfig:
        """The same sweep, small: 2 trials of 1 epoch at <= 128 px on 2 folds, one at a time."""
        size = min(self.train.image_size, 128)
        small = self.train.small_image_size
        # A detector's own epochs and sizes would undo the small base: the base's apply to every detector.
        sizes = {"epochs", "image_size", "small_image_size", "progressive_epochs"}
        detectors = tuple(dataclasses.replace(d, train={k: v for k, v in d.train.items() if k not in sizes})
                          for d in self.search.space.detectors)
        return dataclasses.replace(
            self,
            data=dataclasses.replace(self.data, num_folds=2),
            train=dataclasses.replace(self.train, epochs=1, image_size=size, progressive_epochs=0,
                                      small_image_size=None if small is None else min(small, size)),
            search=dataclasses.replace(self.search, num_samples=min(self.search.num_samples, 2),
                                       max_concurrent_trials=1,
                                       asha=dataclasses.replace(self.search.asha, grace_period=1),
                                       space=dataclasses.replace(self.search.space, detectors=detectors)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data (tuples as lists); `sweep_config_from_dict` reads it back."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self, path: str | Path) -> Path:
        return dump_yaml(self.to_dict(), path)


def sweep_config_from_dict(data: dict[str, Any], *, where: str = "<config>", config_file: Path | None = None,
                           check_data: bool = True, validate: bool = True) -> SweepConfig:
    """Build and validate a SweepConfig from plain data; relative `data.path` is resolved (see
    `detection.config.resolve_data_path`). Keys and types are always checked; `validate=False` skips the
    value checks (for reading back a config that was validated when it was written)."""
    try:
        cfg = from_dict(SweepConfig, data, where=where)
    except TypeError as error:  # a required key (e.g. `high` of a range) is missing
        raise ConfigError(f"{where}: {error}; see search/config.py for the required keys.") from error
    cfg = dataclasses.replace(cfg, data=resolve_data_path(cfg.data, config_file))
    return cfg.validate(where, check_data=check_data) if validate else cfg


def load_sweep_config(path: str | Path, *, check_data: bool = True, validate: bool = True) -> SweepConfig:
    """Read a sweep YAML (e.g. `configs/demo.yaml` or an experiment's `sweep.yaml`) and validate it."""
    path = Path(path)
    return sweep_config_from_dict(read_yaml(path), where=str(path), config_file=path, check_data=check_data,
                                  validate=validate)


# --------------------------------------------------------------------------------------------- checks


def _check(ok: bool, where: str, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: `{key}` must be {expected}.")


def _check_range(rng: FloatRange, where: str, key: str, *, lowest: float, highest: float,
                 log: bool = False) -> None:
    low, high = rng.low, rng.high
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: `{key}` must have finite bounds, but got ({low=}, {high=}).")
    if low > high:
        raise ConfigError(f"{where}: `{key}`: `low <= high` must hold, but got ({low=}, {high=}).")
    if log and low <= 0:
        raise ConfigError(f"{where}: `{key}`: `low > 0` must hold for a log-uniform range, but got ({low=}).")
    if low < lowest or high >= highest:
        raise ConfigError(f"{where}: `{key}` must lie within [{lowest}, {highest}), but got ({low=}, {high=}).")


def _check_data_path(path: str, where: str) -> None:
    from detection.data.coco import ROBOFLOW_ANNOTATIONS, ROBOFLOW_SPLITS

    expected = (f"a COCO .json file or a Roboflow export folder ({'/, '.join(ROBOFLOW_SPLITS)}/ each holding "
                f"{ROBOFLOW_ANNOTATIONS})")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: `data.path` {path!r} does not exist; expected {expected}. "
                          "The demo data is written by `detsweep data deepforest --out data/deepforest`.")
    if p.is_file():
        _check(p.suffix == ".json", where, "data.path", f"{expected}, got the file {path!r}")
        return
    found = [s for s in ROBOFLOW_SPLITS if (p / s / ROBOFLOW_ANNOTATIONS).is_file()]
    _check(bool(found) or (p / ROBOFLOW_ANNOTATIONS).is_file(), where, "data.path",
           f"{expected}, got the folder {path!r} without any of them")


def _validate_search(search: SearchConfig, train: TrainConfig, where: str) -> None:
    _check(search.num_samples >= 1, where, "search.num_samples", f"an integer >= 1, got {search.num_samples}")
    _check(search.max_concurrent_trials >= 1, where, "search.max_concurrent_trials",
           f"an integer >= 1, got {search.max_concurrent_trials}")
    from trainables.trial import FOLD_METRICS

    allowed = ["cv_score"] + [f"{m}_{s}" for m in FOLD_METRICS for s in ("mean", "std")] + ["best_fold_score", "oof_f1"]
    _check(search.metric in allowed, where, "search.metric", f"one of {allowed}, got {search.metric!r}")
    _check(search.n_startup_trials >= 0, where, "search.n_startup_trials", f">= 0, got {search.n_startup_trials}")
    if search.scheduler == "asha":
        _check(1 <= search.asha.grace_period <= train.epochs, where, "search.asha.grace_period",
               f"an integer in [1, train.epochs={train.epochs}], got {search.asha.grace_period}")
        _check(search.asha.reduction_factor > 1, where, "search.asha.reduction_factor",
               f"> 1, got {search.asha.reduction_factor}")
    space = search.space
    _check_range(space.lr, where, "search.space.lr", lowest=0.0, highest=math.inf, log=True)
    if space.score_threshold is not None:
        _check_range(space.score_threshold, where, "search.space.score_threshold", lowest=0.0, highest=1.0)
    _check(len(space.batch_size) >= 1, where, "search.space.batch_size", "a non-empty list of integers >= 1")
    for i, b in enumerate(space.batch_size):
        _check(b >= 1, where, f"search.space.batch_size[{i}]", f"an integer >= 1, got {b}")
    _check(len(set(space.batch_size)) == len(space.batch_size), where, "search.space.batch_size",
           f"a list without repeats, got {list(space.batch_size)}")
    keys = [d.key for d in space.detectors]
    _check(len(set(keys)) == len(keys), where, "search.space.detectors",
           f"a list without repeated arch/backbone pairs, got {keys}")
    for i, choice in enumerate(space.detectors):
        if choice.lr is not None:
            _check_range(choice.lr, where, f"search.space.detectors[{i}].lr", lowest=0.0, highest=math.inf, log=True)


def _check_detector(choice: DetectorChoice, key: str, where: str) -> None:
    from detection.models.backbones import BACKBONES
    from detection.models.factory import ARCHS

    _check(choice.arch in ARCHS, where, f"{key}.arch",
           f"one of {list(ARCHS)} (detection.models.factory.ARCHS), got {choice.arch!r}")
    # One namespace for every arch: the registry's keys (fcos_tal too builds its backbone from the registry).
    _check(choice.backbone in BACKBONES, where, f"{key}.backbone",
           f"one of {sorted(BACKBONES)} (detection.models.backbones.BACKBONES), got {choice.backbone!r}")


def _validate_resources(res: ResourcesConfig, where: str) -> None:
    _check(res.cpus_per_fold > 0, where, "resources.cpus_per_fold", f"> 0, got {res.cpus_per_fold}")
    _check(res.coordinator_cpus >= 0, where, "resources.coordinator_cpus", f">= 0, got {res.coordinator_cpus}")
    name = res.coordinator_resource
    _check(name is None or (isinstance(name, str) and bool(name) and name not in ("CPU", "GPU", "memory")),
           where, "resources.coordinator_resource",
           f"unset or the name of a custom Ray resource (not CPU/GPU/memory), got {name!r}")
    g = res.gpus_per_fold
    _check(g >= 0 and (g <= 1 or float(g).is_integer()), where, "resources.gpus_per_fold",
           f"0, a fraction in (0, 1], or a whole number of GPUs, got {g}")
    _check(res.fold_memory_gb is None or res.fold_memory_gb > 0, where, "resources.fold_memory_gb",
           f"null or a number of GiB > 0 (the memory one fold's training step may peak at), got {res.fold_memory_gb}")


def _validate_ensemble(ens: EnsembleConfig, where: str) -> None:
    _check(0 < ens.iou_thr < 1, where, "ensemble.iou_thr", f"a number in (0, 1), got {ens.iou_thr}")
    _check(ens.conf_type in WBF_CONF_TYPES, where, "ensemble.conf_type",
           f"one of {list(WBF_CONF_TYPES)}, got {ens.conf_type!r}")
    _check(0.0 <= ens.skip_box_thr < 1.0, where, "ensemble.skip_box_thr", f"a number in [0, 1), got {ens.skip_box_thr}")
    _check(ens.max_models >= 1, where, "ensemble.max_models", f"an integer >= 1, got {ens.max_models}")
    _check(ens.greedy_candidates >= 1, where, "ensemble.greedy_candidates",
           f"an integer >= 1, got {ens.greedy_candidates}")
    for i, thr in enumerate(ens.iou_thr_grid):
        _check(0 < thr < 1, where, f"ensemble.iou_thr_grid[{i}]", f"a number in (0, 1), got {thr}")
    for i, conf in enumerate(ens.conf_type_grid):
        _check(conf in WBF_CONF_TYPES, where, f"ensemble.conf_type_grid[{i}]",
               f"one of {list(WBF_CONF_TYPES)}, got {conf!r}")
    _check(len(ens.hflip_tta_grid) >= 1, where, "ensemble.hflip_tta_grid",
           "a non-empty list of true/false ([false] never mirrors), got []")
    _check(ens.bootstrap_samples >= 0, where, "ensemble.bootstrap_samples",
           f"an integer >= 0 (0: no intervals), got {ens.bootstrap_samples}")
    _check(ens.cpus > 0, where, "ensemble.cpus", f"> 0, got {ens.cpus}")
    g = ens.gpus
    _check(g >= 0 and (g <= 1 or float(g).is_integer()), where, "ensemble.gpus",
           f"0, a fraction in (0, 1], or a whole number, got {g}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
