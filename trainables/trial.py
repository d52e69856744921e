"""The Ray Tune trainable: one trial = K fold workers driven epoch by epoch in lockstep.

A trial runs inside the placement group that `trial_resources` describes: bundle 0 is the trial's own
small coordinator (this function), bundles 1..K hold one `FoldWorker` actor each, named
`<trial_id>/fold-<k>` so that the Ray dashboard shows them. Each epoch the coordinator

1. submits `train_epoch`, `evaluate`, `state_bytes` and `best_outputs` to every fold (actor tasks run in
   order, so a fold evaluates right after it trains, and folds run in parallel),
2. gathers the results (`ray.wait`, so a lost fold is replaced as soon as its loss shows),
3. reports once: `<m>_mean`, `<m>_std` and `fold<k>/<m>` for m in `FOLD_METRICS`, `epoch` (1-based, equal
   to Tune's `training_iteration`), `cv_score` (the fold mean of each fold's best epoch score: the score
   of the models the trial keeps, what the search is told), `oof_threshold`/`oof_f1` (the F1-optimal
   score threshold on the pooled out-of-fold predictions of those best epochs), `finished` (1 on the
   trial's own last report), plus where and when every fold ran, with one checkpoint (see
   `write_trial_checkpoint`).

Fault tolerance: a fold whose actor or node is lost is recreated in the same bundle (Ray reschedules
a dead node's bundles onto other nodes) from the fold's last state, which the coordinator keeps in
memory (and every checkpoint holds on disk), and its epoch is run again; at most `MAX_FOLD_RESTARTS`
times per fold. An exception inside a fold (a non-finite loss, CUDA out of memory, bad data) ends the
trial with `TrialFailed` naming the fold and the reason. The driver's `search.failures.FailurePolicy`
acts on it: bad data (`DATA_ERROR`) stops the whole sweep, a deterministic cause is never run again from
the same state, the rest (`TrialFailed.retryable`) `FailureConfig` may retry from the latest checkpoint.
A coordinator that dies is Tune's to restart: `train_trial` resumes from `tune.get_checkpoint()`.

Reuse across trials (`TrialSetup.reuse_workers`, with Tune's `reuse_actors`): a trial that ends normally parks
its fold actors (`trainables.fold_pool`) and the next trial on the same coordinator rebuilds them with
`FoldWorker.reset` instead of starting K processes; so does a trial that Tune stops (ASHA), which ends inside its
report with the folds between epochs. A reused actor keeps the name of the trial that started it.

Early stopping: the trial stops when every fold's own early stopping (`FoldTrainer.should_stop`: its
validation score has not improved for `train.patience` epochs) has fired. Folds keep training in
lockstep until then, so every report has all K folds and fold means stay comparable across epochs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray import tune
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from detection.config import ExperimentConfig
from detection.data.coco import DatasetError
from detection.data.splits import Split
from detection.engine import NonFiniteLossError
from detection.metrics import Matches
from detection.models.weights import resolve_start
from detection.predictions import SavedPredictions
from trainables import fold_pool
from trainables.fold_worker import FoldWorker
from trainables.trial_manifest import MANIFEST_FILE, build_trial_manifest

__all__ = [
    "BEST_DIR",
    "BEST_JSON",
    "DATA_ERROR",
    "FOLDS_DIR",
    "FOLD_METRICS",
    "MAX_FOLD_RESTARTS",
    "RETRYABLE_REASONS",
    "STATES_CHECKPOINT",
    "TRIAL_JSON",
    "TRIAL_PARAMS",
    "BestModel",
    "FoldResources",
    "TrialCheckpoint",
    "TrialFailed",
    "TrialSetup",
    "aggregate_fold_metrics",
    "apply_trial_params",
    "checkpoint_contents",
    "failure_reason",
    "oof_file",
    "pooled_oof_threshold",
    "rank_best",
    "read_best",
    "read_trial_checkpoint",
    "train_trial",
    "trial_resources",
    "write_trial_checkpoint",
]

logger = logging.getLogger(__name__)

# The per-fold metrics a trial reports each epoch, as `<m>_mean`, `<m>_std` and `fold<k>/<m>` (loss from
# training, the rest from evaluation); not `detection.metrics.METRIC_NAMES`, which is what one evaluation returns.
FOLD_METRICS = ("map", "map_50", "map_75", "f1", "score", "loss")
# The keys of a trial's config (what the search proposes); see `apply_trial_params`.
TRIAL_PARAMS = ("detector", "lr", "batch_size", "score_threshold")
MAX_FOLD_RESTARTS = 3  # per fold and trial run: a fold lost more often ends the trial
BUNDLE_TIMEOUT_S = 1800.0  # how long a lost fold's bundle may take to come back (an autoscaler starting a node)
NAME_RELEASE_TIMEOUT_S = 60.0  # how long a dead actor's name may stay taken

FOLDS_DIR, BEST_DIR, BEST_JSON, TRIAL_JSON = "folds", "best", "best.json", "trial.json"
# trial.json of a checkpoint without folds/: the sibling checkpoint folder that holds the last written states
STATES_CHECKPOINT = "states_checkpoint"

# Errors that mean "the fold's process or node is gone", not "the fold's code failed".
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)


# A DatasetError in a fold worker (a file changed after the driver's check, storage gone): the sweep stops.
DATA_ERROR = "bad data"
# Causes that a retry from the latest checkpoint may get past (a lost process or node, memory another trial
# took); every other reason is deterministic and Tune must not run the trial again from the same state.
RETRYABLE_REASONS = ("worker lost", "bundle not rescheduled", "host out of memory")


class TrialFailed(RuntimeError):
    """A fold of the trial failed for a reason that retrying the epoch will not fix.

    Attributes:
        fold: the fold k, or None when the failure is not one fold's.
        reason: short cause, e.g. "non-finite loss", "CUDA out of memory", `DATA_ERROR`.
        retryable: whether Tune may retry the trial from its latest checkpoint (`RETRYABLE_REASONS`);
            search/failures.py acts on it.
    """

    @property
    def retryable(self) -> bool:
        return self.reason.startswith(RETRYABLE_REASONS)

    def __init__(self, message: str, *, fold: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.fold = fold
        self.reason = reason

    def __reduce__(self):  # keep fold/reason when Ray ships the exception to the driver
        return _rebuild_trial_failed, (str(self), self.fold, self.reason)


def _rebuild_trial_failed(message: str, fold: int | None, reason: str) -> TrialFailed:
    return TrialFailed(message, fold=fold, reason=reason)


# ------------------------------------------------------------------------------------------- setup


class FoldResources(Protocol):
    """What `trial_resources` reads (`search.config.ResourcesConfig` has these fields)."""

    cpus_per_fold: float
    gpus_per_fold: float
    coordinator_cpus: float
    # optional: a custom resource (1 unit) the coordinator bundle asks for; None or absent: none
    coordinator_resource: str | None
    # optional: the bound (GiB) of the memory probe before the folds train; None or absent: only on CUDA
    fold_memory_gb: float | None


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares; bound with `tune.with_parameters(train_trial, setup=...)`.

    Attributes:
        base: the training config each trial starts from (`data.path` absolute: workers on other
            nodes read it).
        split: the experiment's folds and held-out images (shipped with the setup: no node reads a file).
        split_path: where the experiment keeps `split.json` (a path or URI), recorded in manifests.
        resources: CPUs/GPUs per fold and for the coordinator (must match `trial_resources`).
        keep_best: how many fold models a checkpoint keeps (best epoch of each fold, then the top folds).
        data_summary: the driver's load summary (`detection.data.verify.summarize`), recorded in manifests.
        detector_bases: per detector key (`"<arch>/<backbone>"`), the config its trials start from instead of
            `base` (the detector's own model/train keys: `search.config.SweepConfig.detector_bases`).
        resume_every: the checkpoint of every `resume_every`-th epoch holds the folds'
            resume states (`folds/`); the others only `best/` and trial.json (`search.config.CheckpointConfig`).
        metric, mode: the search's; a trial whose batch does not fit reports the metric's worst value.
        reuse_workers: a trial that ends normally parks its fold actors for the next trial Tune runs on the same
            coordinator actor (`TuneConfig(reuse_actors=True)`, config `search.reuse_actors`), which `reset`s
            them instead of starting new processes (`trainables.fold_pool`).
    """

    base: ExperimentConfig
    split: Split
    split_path: str
    resources: FoldResources
    keep_best: int = 3
    data_summary: Mapping[str, Any] | None = None
    detector_bases: Mapping[str, ExperimentConfig] = field(default_factory=dict)
    resume_every: int = 1
    metric: str = "cv_score"
    mode: str = "max"
    reuse_workers: bool = False

    def base_for(self, params: Mapping[str, Any]) -> ExperimentConfig:
        """The config a trial with these sampled params starts from (its detector's, else `base`)."""
        return self.detector_bases.get(params.get("detector"), self.base)

    def __post_init__(self) -> None:
        if self.keep_best < 1:
            raise ValueError(f"`keep_best >= 1` must hold, but got ({self.keep_best=}).")
        if self.resume_every < 1:
            raise ValueError(f"`resume_every >= 1` must hold, but got ({self.resume_every=}).")
        if not str(self.split_path):
            raise ValueError("TrialSetup.split_path must name the experiment's split.json, but got ''.")


def trial_resources(num_folds: int, resources: FoldResources) -> tune.PlacementGroupFactory:
    """The placement group of one trial: `[{"CPU": coordinator_cpus}] + [{"CPU": c, "GPU": g}] * K`.

    The GPU key is left out when `gpus_per_fold` is 0 (CPU machines). With `coordinator_resource` (e.g.
    "coordinator", advertised by the on-demand head only) the coordinator bundle also asks for 1 unit of it,
    so the coordinator lands where that resource is and never on a spot fold node. With `coordinator_cpus
    == 0` and no `coordinator_resource` the coordinator bundle is empty (Tune then places the coordinator
    outside the group and the K fold bundles are 0..K-1). Strategy PACK: folds fill a multi-GPU node before
    spilling to the next one (PACK is soft: the coordinator bundle may sit on another node than the folds).
    """
    if num_folds < 1:
        raise ValueError(f"`num_folds >= 1` must hold, but got ({num_folds=}).")
    cpus, gpus, coordinator = resources.cpus_per_fold, resources.gpus_per_fold, resources.coordinator_cpus
    if not cpus > 0:
        raise ValueError(f"`cpus_per_fold > 0` must hold, but got (cpus_per_fold={cpus}).")
    if gpus < 0 or coordinator < 0:
        raise ValueError(f"`gpus_per_fold >= 0` and `coordinator_cpus >= 0` must hold, but got "
                         f"(gpus_per_fold={gpus}, coordinator_cpus={coordinator}).")
    fold_bundle: dict[str, float] = {"CPU": float(cpus)}
    if gpus > 0:
        fold_bundle["GPU"] = float(gpus)
    head = {"CPU": float(coordinator)} if coordinator > 0 else {}
    custom = getattr(resources, "coordinator_resource", None)
    if custom:
        if custom in ("CPU", "GPU", "memory"):
            raise ValueError(f"`coordinator_resource` must name a custom Ray resource, but got {custom!r}.")
        head[str(custom)] = 1.0
    return tune.PlacementGroupFactory([head] + [dict(fold_bundle) for _ in range(num_folds)], strategy="PACK")


def apply_trial_params(base: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """The trial's config: `base` with the sampled params applied (the one place that maps them).

    `params` keys (all optional): "detector" ("<arch>/<backbone>", e.g. "faster_rcnn/mobilenet_v2")
    -> model.arch/model.backbone; "lr", "batch_size", "score_threshold" -> train.*. The result is
    validated (`ConfigError`, a ValueError, names the bad key).
    """
    unknown = sorted(set(params) - set(TRIAL_PARAMS))
    if unknown:
        raise ValueError(f"Trial config has unknown key(s) {unknown}; expected keys among {list(TRIAL_PARAMS)}.")
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if "detector" in params:
        detector = params["detector"]
        arch, sep, backbone = str(detector).partition("/")
        if not (isinstance(detector, str) and sep and arch and backbone and "/" not in backbone):
            raise ValueError(f"Trial config `detector` must be '<arch>/<backbone>' "
                             f"(e.g. 'faster_rcnn/mobilenet_v2'), but got {detector!r}.")
        model.update(arch=arch, backbone=backbone)
    for key in ("lr", "score_threshold"):
        if key in params:
            if not isinstance(params[key], Real) or isinstance(params[key], bool):
                raise ValueError(f"Trial config `{key}` must be a number, but got {params[key]!r}.")
            train[key] = float(params[key])
    if "batch_size" in params:
        value = params["batch_size"]
        if not isinstance(value, Integral) or isinstance(value, bool):
            raise ValueError(f"Trial config `batch_size` must be an integer, but got {value!r}.")
        train["batch_size"] = int(value)  # numpy ints from a search algorithm become plain ints
    return base.with_overrides(model=model, train=train).validate("<trial config>")


# ------------------------------------------------------------------------------- metrics and best


def aggregate_fold_metrics(per_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`<m>_mean`, `<m>_std` (population std, ddof=0, as sklearn's cross-validation reports) and
    `fold<k>/<m>` for every m in `FOLD_METRICS`. `per_fold[k]` holds fold k's values (NaN propagates)."""
    if not per_fold:
        raise ValueError("aggregate_fold_metrics needs the metrics of at least one fold, but got none.")
    out: dict[str, float] = {}
    for m in FOLD_METRICS:
        missing = [k for k, fold in enumerate(per_fold) if m not in fold]
        if missing:
            raise ValueError(f"Fold metrics must hold {m!r}, but fold {missing[0]} has keys {sorted(per_fold[missing[0]])}.")
        values = np.array([float(fold[m]) for fold in per_fold], dtype=np.float64)
        out[f"{m}_mean"] = float(values.mean())
        out[f"{m}_std"] = float(values.std())
        for k, value in enumerate(values):
            out[f"fold{k}/{m}"] = float(value)
    return out


@dataclass(frozen=True)
class BestModel:
    """The best epoch of one fold (by its own validation score) and its model weights."""

    fold: int
    epoch: int  # 1-based epoch that gave the score
    score: float
    map_50: float
    f1: float
    map: float
    # torch.save of the model's state_dict (Faster R-CNN's k-means anchors are in it: rpn.anchor_generator)
    model: bytes = field(repr=False)

    def to_json(self, rank: int, file: str) -> dict[str, Any]:
        return {"rank": rank, "fold": self.fold, "epoch": self.epoch, "score": self.score,
                "map_50": self.map_50, "f1": self.f1, "map": self.map, "file": file,
                "predictions": oof_file(self.fold)}


def oof_file(fold: int) -> str:
    """The file (in best/) of fold k's out-of-fold validation predictions at its best epoch."""
    return f"oof-fold-{fold}.pt"


def pooled_oof_threshold(predictions: Mapping[int, bytes]) -> tuple[float, float]:
    """`(threshold, f1)`: the F1-optimal score threshold over every fold's out-of-fold predictions pooled
    (each image predicted by the one model that did not train on it); `(0.5, 0.0)` without any."""
    matches = Matches.concat([SavedPredictions.from_bytes(data).matches for _, data in sorted(predictions.items())])
    return matches.best_f1()


def rank_best(best: Mapping[int, BestModel], keep: int) -> list[BestModel]:
    """The `keep` best fold models, one per fold, by score (ties: lower fold first)."""
    if keep < 1:
        raise ValueError(f"`keep >= 1` must hold, but got ({keep=}).")
    return sorted(best.values(), key=lambda b: (-b.score, b.fold))[:keep]


# ------------------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class TrialCheckpoint:
    """What one checkpoint of a trial holds (see `write_trial_checkpoint`)."""

    # fold k's FoldTrainer.state_dict(), torch.save bytes; empty in a checkpoint without resume states, whose
    # trial.json names the one that holds them (`STATES_CHECKPOINT`, see `write_trial_checkpoint`)
    fold_states: list[bytes]
    best: list[BestModel]  # ranked, best first
    trial: dict[str, Any]  # trial.json
    predictions: dict[int, bytes] = field(default_factory=dict)  # fold -> SavedPredictions bytes (best epoch)


def checkpoint_staging_dir(trial_id: str) -> Path:
    """The local folder a trial's checkpoint is written to before Tune copies it to storage (one per trial)."""
    return Path(tempfile.gettempdir()) / "detsweep-checkpoint-staging" / trial_id


def write_trial_checkpoint(
    directory: str | Path,
    *,
    fold_states: Sequence[bytes] | None,
    best: Sequence[BestModel],
    trial: Mapping[str, Any],
    manifest: Mapping[str, Any] | None = None,
    predictions: Mapping[int, bytes] | None = None,
) -> Path:
    """Write one checkpoint of a trial into `directory`:

        folds/fold-<k>.pt   fold k's full resume state (torch.load(..., weights_only=True) reads it); left out
                            when `fold_states` is None: trial.json's `states_checkpoint` then names the sibling
                            checkpoint folder holding the last written states (of epoch `states_epoch`), or is
                            null when none was written yet (a resume starts the folds afresh)
        best/rank-<r>.pt    the r-th best fold model's state_dict, r = 1..len(best)
        best/oof-fold-<k>.pt  fold k's validation predictions at its best epoch (`SavedPredictions`), every fold
        best/best.json      [{rank, fold, epoch, score, map_50, f1, map, file, predictions}] best first; files
                            are relative to best/
        trial.json          arch, backbone, params, num_classes, class_names, category_ids, image_size,
                            score_threshold, epoch, ...
        manifest.json       `trainables.trial_manifest.build_trial_manifest` (when given)
    """
    directory = Path(directory)
    if fold_states is None and STATES_CHECKPOINT not in trial:
        raise ValueError(f"A checkpoint without fold states needs trial.json's {STATES_CHECKPOINT!r} (the "
                         "checkpoint folder holding them, or None); got none.")
    (directory / BEST_DIR).mkdir(parents=True, exist_ok=True)
    if fold_states is not None:
        (directory / FOLDS_DIR).mkdir(parents=True, exist_ok=True)
        for k, state in enumerate(fold_states):
            (directory / FOLDS_DIR / f"fold-{k}.pt").write_bytes(state)
    entries = []
    for rank, model in enumerate(best, start=1):
        file = f"rank-{rank}.pt"
        (directory / BEST_DIR / file).write_bytes(model.model)
        entries.append(model.to_json(rank, file))
    for k, data in sorted((predictions or {}).items()):
        (directory / BEST_DIR / oof_file(k)).write_bytes(data)
    (directory / BEST_DIR / BEST_JSON).write_text(json.dumps(entries, indent=1))
    (directory / TRIAL_JSON).write_text(json.dumps(dict(trial), indent=1))
    if manifest is not None:
        (directory / MANIFEST_FILE).write_text(json.dumps(dict(manifest), indent=1))
    return directory


def read_best(directory: str | Path) -> list[dict[str, Any]]:
    """best/best.json of a checkpoint folder, best first, each entry with "path" (absolute) added."""
    best_dir = Path(directory) / BEST_DIR
    path = best_dir / BEST_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no best.json; expected a checkpoint written by train_trial.")
    entries = json.loads(path.read_text())
    return [{**entry, "path": str((best_dir / entry["file"]).resolve())} for entry in entries]


def read_trial_checkpoint(directory: str | Path) -> TrialCheckpoint:
    """Read back what `write_trial_checkpoint` wrote (`fold_states` empty for a checkpoint without them)."""
    directory = Path(directory)
    trial = json.loads((directory / TRIAL_JSON).read_text())
    num_folds = int(trial["num_folds"])
    states = []
    for k in range(num_folds if not (STATES_CHECKPOINT in trial and not (directory / FOLDS_DIR).is_dir()) else 0):
        path = directory / FOLDS_DIR / f"fold-{k}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the checkpoint's trial.json says num_folds={num_folds}.")
        states.append(path.read_bytes())
    best = [
        BestModel(fold=e["fold"], epoch=e["epoch"], score=e["score"], map_50=e["map_50"], f1=e["f1"], map=e["map"],
                  model=Path(e["path"]).read_bytes())
        for e in read_best(directory)
    ]
    predictions = {k: (directory / BEST_DIR / oof_file(k)).read_bytes() for k in range(num_folds)
                   if (directory / BEST_DIR / oof_file(k)).is_file()}
    return TrialCheckpoint(fold_states=states, best=best, trial=trial, predictions=predictions)


def checkpoint_contents(epoch: int, *, resume_every: int, finished: bool, improved: bool) -> str | None:
    """What the checkpoint of this epoch holds: "states" (folds/ + best/: every `resume_every`-th epoch), "best"
    (best/ only: a fold's best model changed, or the trial's last epoch, whose trial.json is the final one), or
    None (no checkpoint). The trial's last epoch writes no resume states: an ended trial is never resumed, and
    the checkpoint budget would delete them at once (search/checkpoint_budget.py)."""
    if epoch % resume_every == 0:
        return "states"
    return "best" if improved or finished else None


# -------------------------------------------------------------------------------------- the trial


def failure_reason(error: BaseException) -> str:
    """Short reason of a fold's failure as `ray.get` raised it (Ray wraps the worker's exception in a
    RayTaskError that also is an instance of the original type): `DATA_ERROR`, "non-finite loss", "CUDA out
    of memory", "host out of memory ...", else the original exception's type name."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, DatasetError) or isinstance(error, DatasetError):
        return DATA_ERROR
    if isinstance(cause, NonFiniteLossError) or isinstance(error, NonFiniteLossError):
        return "non-finite loss"
    if isinstance(cause, torch.OutOfMemoryError) or isinstance(error, torch.OutOfMemoryError):
        return "CUDA out of memory"
    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return "host out of memory (Ray's memory monitor killed the fold)"
    return type(cause).__name__


def _cause_text(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    text = str(cause) if cause is not None else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


class _Trial:
    """The coordinator of one trial run: its K workers, their last states and best models."""

    def __init__(self, params: Mapping[str, Any], setup: TrialSetup) -> None:
        self._created = time.perf_counter()
        self.params = dict(params)
        self.setup = setup
        self.config = apply_trial_params(setup.base_for(params), params)
        self.split = setup.split
        self.num_folds = self.split.num_folds
        context = tune.get_context()
        self.trial_id = context.get_trial_id() or "trial"
        self.pg = ray.util.get_current_placement_group()
        if self.pg is None:
            raise ValueError("train_trial must run as a Tune trial with "
                             "resources=trial_resources(num_folds, resources); found no placement group.")
        # An empty coordinator bundle is dropped by Tune, so the fold bundles then start at 0.
        self.offset = self.pg.bundle_count - self.num_folds
        if self.offset not in (0, 1):
            raise ValueError(f"The trial's placement group has {self.pg.bundle_count} bundles, but the split "
                             f"{setup.split_path} has {self.num_folds} folds; expected 1 + {self.num_folds} "
                             f"bundles from trial_resources(num_folds={self.num_folds}, ...).")
        self.workers: list[Any] = [None] * self.num_folds
        self.states: list[bytes | None] = [None] * self.num_folds
        self.best: dict[int, BestModel] = {}
        self.predictions: dict[int, bytes] = {}  # fold -> out-of-fold predictions of its best epoch
        self.restarts = [0] * self.num_folds
        self.reused = [False] * self.num_folds  # fold k's actor was parked by an earlier trial (fold_pool)
        self.startup: dict[str, float] = {}  # seconds: "coordinator" (this set-up), "folds" (until all are built)
        self.fold_info: list[dict[str, Any] | None] = [None] * self.num_folds  # FoldWorker.info()
        self.epoch = 0  # epochs completed by every fold
        self.resumed_epoch = 0  # the epoch of the checkpoint this run started from (0: a fresh trial)
        # The last fold states on storage: their epoch and checkpoint folder (None: none written yet).
        self.states_epoch = 0
        self.states_checkpoint: str | None = None
        # Resumed from a checkpoint without fold states: the folds rerun epochs up to this one unreported
        # (Tune already has their results), so that `epoch` stays Tune's `training_iteration`.
        self.catch_up_to = 0
        self.improved = False  # some fold's best model changed in the latest epoch
        self.stopped = False  # every fold's early stopping has fired
        self.memory_probe: dict[str, Any] | None = None  # FoldWorker.probe_memory() of a fresh trial, if run
        self.oof_threshold = 0.5  # F1-optimal on the pooled out-of-fold predictions (updated every epoch)
        self.manifest = build_trial_manifest(
            dataset_path=self.config.data.path, split_path=setup.split_path, split=self.split,
            seeds={"seed": self.config.seed, "split": self.split.seed}, config=self.config,
            data_summary=setup.data_summary,
        )

    # -- workers ---------------------------------------------------------------------------------
    def _spawn(self, k: int) -> Any:
        """A new fold actor in fold k's bundle, built from fold k's last state (or afresh)."""
        res = self.setup.resources
        actor = ray.remote(FoldWorker).options(
            name=f"{self.trial_id}/fold-{k}",
            num_cpus=res.cpus_per_fold,
            num_gpus=res.gpus_per_fold,
            max_restarts=0,  # the coordinator restarts a fold itself, from its last state
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k + self.offset),
        )
        deadline = time.monotonic() + NAME_RELEASE_TIMEOUT_S
        while True:
            try:
                return actor.remote(self.config, self.split, k, self._state_ref(k), num_threads=self._threads())
            except ray.exceptions.ActorAlreadyExistsError:
                # A killed fold's name is released a moment after its death is known.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _threads(self) -> int:
        return max(1, math.floor(self.setup.resources.cpus_per_fold))

    def _state_ref(self, k: int) -> Any:
        return ray.put(self.states[k]) if self.states[k] is not None else None

    def _acquire(self, k: int) -> Any:
        """Fold k's actor and the ref of its `info()`: a parked one (`fold_pool`) rebuilt by `reset`, else a new one."""
        parked = fold_pool.take(self.pg, k + self.offset) if self.setup.reuse_workers else None
        self.reused[k] = parked is not None
        if parked is not None:
            self.workers[k] = parked
            return parked.reset.remote(self.config, self.split, k, self._state_ref(k), num_threads=self._threads())
        self.workers[k] = self._spawn(k)
        return self.workers[k].info.remote()

    def _start_folds(self) -> None:
        """Build every fold (a reused actor's `reset`, or a new process) and wait until all are ready, so that the
        folds start their first epoch together, as they do every later one."""
        started = time.perf_counter()
        ready = {k: self._acquire(k) for k in range(self.num_folds)}
        for k in range(self.num_folds):
            while self.fold_info[k] is None:
                try:
                    self.fold_info[k] = ray.get(ready[k])
                except _LOST as error:
                    if self.reused[k]:
                        # A parked fold that died between trials (its node reclaimed): a new one, not a restart.
                        logger.warning("trial %s: the parked worker of fold %d is gone (%s); starting a new one",
                                       self.trial_id, k, type(error).__name__)
                        self.reused[k] = False
                        self.pg.wait(timeout_seconds=BUNDLE_TIMEOUT_S)
                        self.workers[k] = self._spawn(k)
                    else:
                        self._replace(k, error)
                    ready[k] = self.workers[k].info.remote()
                except ray.exceptions.RayTaskError as error:  # `reset` raised in a reused worker
                    reason = failure_reason(error)
                    raise TrialFailed(f"fold {k}: its reused worker failed to start: {_cause_text(error)}", fold=k,
                                      reason=DATA_ERROR if reason == DATA_ERROR else "worker start failed") from error
        self.startup = {"coordinator_s": started - self._created, "folds_s": time.perf_counter() - started}

    def start(self) -> None:
        checkpoint = tune.get_checkpoint()
        restored = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                restored = read_trial_checkpoint(directory)
            self.states_checkpoint = PurePosixPath(checkpoint.path).name
            if not restored.fold_states:
                # Written between two resume states: go back to the last one and rerun the epochs since.
                self.catch_up_to = int(restored.trial["epoch"])
                self.states_checkpoint = restored.trial[STATES_CHECKPOINT]
                restored = None
                if self.states_checkpoint is not None:
                    source = tune.Checkpoint(path=str(PurePosixPath(checkpoint.path).parent / self.states_checkpoint),
                                             filesystem=checkpoint.filesystem)
                    with source.as_directory() as directory:
                        restored = read_trial_checkpoint(directory)
                logger.info("trial %s: its checkpoint of epoch %d holds no fold states; resuming from %s and "
                            "rerunning the epochs up to %d unreported", self.trial_id, self.catch_up_to,
                            self.states_checkpoint or "the start", self.catch_up_to)
        if restored is not None:
            if len(restored.fold_states) != self.num_folds:
                raise ValueError(f"The checkpoint holds {len(restored.fold_states)} folds, but the split "
                                 f"{self.setup.split_path} has {self.num_folds}; expected the same experiment.")
            self.states = list(restored.fold_states)
            self.best = {b.fold: b for b in restored.best}
            self.predictions = dict(restored.predictions)
            self.epoch = self.resumed_epoch = self.states_epoch = int(restored.trial["epoch"])
            self.stopped = bool(restored.trial.get("stopped", False))
            logger.info("trial %s: resuming after epoch %d from its checkpoint", self.trial_id, self.epoch)
        self._start_folds()
        if self.epoch == 0:
            self.memory_probe = self._probe_memory()

    def _probe_memory(self) -> dict[str, Any] | None:
        """One training step of fold 0 at the trial's largest input and batch size (all folds train the same
        model on the same device type): on CUDA always, on CPU only with `resources.fold_memory_gb`."""
        bound = getattr(self.setup.resources, "fold_memory_gb", None)
        if bound is None and not str(self.fold_info[0].get("device", "cpu")).startswith("cuda"):
            return None
        try:
            share = float(self.setup.resources.gpus_per_fold) or 1.0  # folds sharing a GPU get their share
            probe = ray.get(self.workers[0].probe_memory.remote(int(bound * 2**30) if bound else None, share))
        except _LOST as error:  # the fold is recreated by the first epoch; the probe is not worth a retry
            logger.warning("trial %s: fold 0 was lost during the memory probe (%s); training without it",
                           self.trial_id, type(error).__name__)
            return None
        logger.info("trial %s: memory probe: %s", self.trial_id, probe)
        return probe

    def report_infeasible(self, probe: Mapping[str, Any]) -> None:
        """End the trial before its first epoch: its batch does not fit. The search metric gets its worst value
        and `memory_excess` (> 0) tells Optuna why (search/optuna_search.py)."""
        mib = 2**20
        limit = probe.get("limit_bytes")
        logger.warning("trial %s: infeasible: %s", self.trial_id, probe["description"])
        tune.report({
            self.setup.metric: 0.0 if self.setup.mode == "max" else math.inf,
            "infeasible": 1, "infeasible_reason": probe["description"], "memory_excess": float(probe["excess"]),
            "memory_probe_peak_mb": probe["peak_bytes"] / mib,
            "memory_limit_mb": limit / mib if limit else None,
            "epoch": 0, "finished": 1, "coordinator_pid": os.getpid(),
        })

    def _replace(self, k: int, error: BaseException) -> None:
        """Recreate fold k in its bundle from its last state after its actor or node was lost."""
        if getattr(error, "actor_init_failed", False):
            # The message ends with the traceback of FoldWorker.__init__; its last line names the exception.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            last = lines[-1] if lines else repr(error)
            raise TrialFailed(f"fold {k}: its worker failed to start: {last}", fold=k,
                              reason=DATA_ERROR if "DatasetError" in last else "worker start failed") from error
        self.restarts[k] += 1
        if self.restarts[k] > MAX_FOLD_RESTARTS:
            raise TrialFailed(f"fold {k}: its worker was lost {self.restarts[k]} times (more than "
                              f"MAX_FOLD_RESTARTS={MAX_FOLD_RESTARTS}); last: {_cause_text(error)}",
                              fold=k, reason="worker lost") from error
        logger.warning("trial %s: fold %d lost (%s); recreating it from epoch %d (restart %d of %d)",
                       self.trial_id, k, type(error).__name__, self.epoch, self.restarts[k], MAX_FOLD_RESTARTS)
        ray.kill(self.workers[k], no_restart=True)  # also releases its name
        # Ray moves the bundles of a dead node to other nodes (or waits for the autoscaler to add one).
        if not self.pg.wait(timeout_seconds=BUNDLE_TIMEOUT_S):
            raise TrialFailed(f"fold {k}: its placement group bundle was not rescheduled within "
                              f"{BUNDLE_TIMEOUT_S:.0f} s after its worker was lost", fold=k,
                              reason="bundle not rescheduled") from error
        self.workers[k] = self._spawn(k)

    def _submit(self, k: int) -> dict[str, Any]:
        w = self.workers[k]
        # Actor tasks run in submission order: "best" is the last to finish.
        return {"train": w.train_epoch.remote(), "eval": w.evaluate.remote(), "state": w.state_bytes.remote(),
                "best": w.best_outputs.remote()}

    def _gather(self, k: int, refs: dict[str, Any]) -> dict[str, Any]:
        # In submission order, so that the first failing step is the one reported.
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref)
            except _LOST:
                raise
            except ray.exceptions.RayError as error:
                reason = failure_reason(error)
                raise TrialFailed(f"fold {k}: {reason} in {name}: {_cause_text(error)}",
                                  fold=k, reason=reason) from error
        return out

    # -- one epoch -------------------------------------------------------------------------------
    def run_epoch(self) -> list[dict[str, Any]]:
        """Train and evaluate every fold once; returns each fold's gathered results (fold order)."""
        refs = {k: self._submit(k) for k in range(self.num_folds)}
        results: dict[int, dict[str, Any]] = {}
        while len(results) < self.num_folds:
            waiting = {refs[k]["best"]: k for k in range(self.num_folds) if k not in results}
            done, _ = ray.wait(list(waiting), num_returns=1)
            k = waiting[done[0]]
            try:
                results[k] = self._gather(k, refs[k])
            except _LOST as error:
                self._replace(k, error)
                refs[k] = self._submit(k)  # the lost fold's epoch again, from its last state
        return [results[k] for k in range(self.num_folds)]

    def update(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Keep the new states and best models; return this epoch's report."""
        self.epoch += 1
        per_fold = []
        extras: dict[str, Any] = {}
        self.improved = any(r["best"] is not None for r in results)
        for k, r in enumerate(results):
            train, evaluation = r["train"], r["eval"]
            self.states[k] = r["state"]
            if r["best"] is not None:
                self.best[k] = BestModel(
                    fold=k, epoch=int(evaluation["epoch"]), score=float(evaluation["score"]),
                    map_50=float(evaluation["map_50"]), f1=float(evaluation["f1"]), map=float(evaluation["map"]),
                    model=r["best"]["model"],
                )
                self.predictions[k] = r["best"]["predictions"]
            per_fold.append({**{m: evaluation[m] for m in FOLD_METRICS if m != "loss"}, "loss": train["loss"]})
            extras.update({
                f"fold{k}/node_id": train["node_id"],
                f"fold{k}/pid": train["pid"],
                f"fold{k}/train_start": train["start"],
                f"fold{k}/train_end": train["end"],
                f"fold{k}/eval_start": evaluation["start"],
                f"fold{k}/eval_end": evaluation["end"],
                f"fold{k}/train_time_s": train["end"] - train["start"],
                f"fold{k}/eval_time_s": evaluation["end"] - evaluation["start"],
                f"fold{k}/best_score": evaluation["best_score"],
                f"fold{k}/should_stop": int(evaluation["should_stop"]),
                f"fold{k}/restarts": self.restarts[k],
            })
            if int(train["epoch"]) != self.epoch:
                raise TrialFailed(f"fold {k}: its trainer finished epoch {train['epoch']}, but the trial is at "
                                  f"epoch {self.epoch}; the fold states are out of step", fold=k, reason="out of step")
        self.stopped = all(bool(r["eval"]["should_stop"]) for r in results)
        self.oof_threshold, oof_f1 = pooled_oof_threshold(self.predictions)
        return {
            **aggregate_fold_metrics(per_fold),
            **extras,
            "epoch": self.epoch,
            "cv_score": float(np.mean([float(r["eval"]["best_score"]) for r in results])),
            "oof_threshold": self.oof_threshold,
            "oof_f1": oof_f1,
            "finished": int(self.stopped or self.epoch >= self.config.train.epochs),
            "best_fold_score": max(float(r["eval"]["best_score"]) for r in results),
            "folds_stopped": sum(int(r["eval"]["should_stop"]) for r in results),
            "fold_restarts": sum(self.restarts),
            "resumed_epoch": self.resumed_epoch,
            "coordinator_pid": os.getpid(),
            "coordinator_node_id": ray.get_runtime_context().get_node_id(),
            # this run's start-up: the coordinator's own set-up, then building the folds; folds_reused of them
            # were parked by an earlier trial (fold_pool) and only rebuilt, not started
            "startup_coordinator_s": self.startup.get("coordinator_s", 0.0),
            "startup_folds_s": self.startup.get("folds_s", 0.0),
            "folds_reused": sum(self.reused),
            # what the probe before the first epoch measured (only when it ran: CUDA, or a CPU bound)
            **({"memory_probe_peak_mb": self.memory_probe["peak_bytes"] / 2**20} if self.memory_probe else {}),
        }

    def trial_json(self) -> dict[str, Any]:
        info = self.fold_info[0] or {}
        return {
            "trial_id": self.trial_id,
            "arch": self.config.model.arch,
            "backbone": self.config.model.backbone,
            # the weights its fold models started from: detection | backbone | none (model.start resolved)
            "start": resolve_start(self.config.model.arch, self.config.model.backbone, self.config.model.start),
            "params": self.params,
            "num_classes": info.get("num_classes"),
            "class_names": info.get("class_names"),
            "category_ids": info.get("category_ids"),
            "image_size": self.config.train.image_size,
            # The sampled threshold, else the F1-optimal one on the pooled out-of-fold predictions.
            "score_threshold": self.config.train.score_threshold if self.config.train.score_threshold is not None
            else self.oof_threshold,
            "epoch": self.epoch,
            "stopped": self.stopped,
            "num_folds": self.num_folds,
            "states_epoch": self.states_epoch,  # the epoch of the last fold states written (this checkpoint's, or
            STATES_CHECKPOINT: self.states_checkpoint,  # ... this sibling's, when it has no folds/)
            "split_hash": self.split.hash,
            "config": self.config.to_dict(),
        }

    def report(self, metrics: dict[str, Any]) -> None:
        """Report the epoch with a checkpoint when it has something new to keep: the folds' resume states every
        `resume_every` epochs, else `best/` alone when a fold's best model changed or the trial ended, else
        nothing (the latest checkpoint still holds the trial's best models)."""
        what = checkpoint_contents(self.epoch, resume_every=self.setup.resume_every,
                                   finished=bool(metrics["finished"]), improved=self.improved)
        with_states = what == "states"
        # Tune keeps the latest checkpoint and the best one by this score: the latest with fold states.
        metrics["resume_state_epoch"] = self.epoch if with_states else 0
        if what is None:
            metrics["checkpoint_write_s"], metrics["checkpoint_bytes"] = 0.0, 0
            tune.report(metrics)
            return
        if with_states:
            self.states_epoch, self.states_checkpoint = self.epoch, None
        ranked = rank_best(self.best, self.setup.keep_best)
        started = time.perf_counter()
        # One staging folder per trial, emptied first: a coordinator killed mid-write (spot loss, a test's kill)
        # leaves its folder behind, and the restarted coordinator of the same trial removes it here.
        directory = checkpoint_staging_dir(self.trial_id)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        try:
            write_trial_checkpoint(directory, fold_states=self.states if with_states else None, best=ranked,
                                   trial=self.trial_json(), manifest=self.manifest, predictions=self.predictions)
            metrics["checkpoint_write_s"] = time.perf_counter() - started
            metrics["checkpoint_bytes"] = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            # Tune copies the folder to the experiment's storage before report returns.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(directory)))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if with_states:
            persisted = tune.get_checkpoint()  # the folder Tune just wrote (checkpoint_<n>)
            self.states_checkpoint = PurePosixPath(persisted.path).name if persisted is not None else None

    def run(self) -> None:
        self.start()
        if self.memory_probe is not None and not self.memory_probe["fits"]:
            self.report_infeasible(self.memory_probe)
            return
        while self.epoch < self.config.train.epochs and not self.stopped:
            started = time.perf_counter()
            results = self.run_epoch()
            metrics = self.update(results)
            metrics["epoch_time_s"] = time.perf_counter() - started
            if self.epoch <= self.catch_up_to and not metrics["finished"]:
                continue  # rerun after resuming from older fold states: Tune has this epoch's results
            self.report(metrics)
        if self.stopped:
            logger.info("trial %s: every fold stopped early after epoch %d", self.trial_id, self.epoch)

    def close(self, *, park: bool = False) -> None:
        """With `park` (the trial ended normally and `setup.reuse_workers`): free each fold's model and keep the
        actor for the next trial on this coordinator (`fold_pool`). Else kill the fold workers, so that their (GPU)
        memory is freed now, not when Tune removes the group."""
        for k, worker in enumerate(self.workers):
            if worker is None:
                continue
            if park:
                worker.release.remote()  # runs before the next trial's `reset` (actor tasks run in order)
                fold_pool.park(self.pg, k + self.offset, worker)
                continue
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - a worker that is already gone is fine
                pass


def train_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """The Tune function trainable of one trial (see the module docstring).

    Args:
        config: the trial's sampled params (keys `TRIAL_PARAMS`).
        setup: bound with `tune.with_parameters(train_trial, setup=TrialSetup(...))`; run with
            `tune.with_resources(..., trial_resources(num_folds, setup.resources))`.

    Raises:
        TrialFailed: a fold failed (non-finite loss, CUDA out of memory, ...) or was lost too often.
    """
    trial = _Trial(config, setup)
    ended = False
    try:
        trial.run()
        ended = True
    except SystemExit as stop:
        # Tune stopped the trial (a scheduler's STOP): Tune waits for a function trainable's report to be
        # processed before it lets the thread go on, so the stop ends the thread inside `tune.report`, with
        # every fold idle between epochs.
        ended = stop.code in (0, None)
        raise
    finally:
        # The workers of a failed trial may be mid-epoch or broken: never reused.
        trial.close(park=ended and setup.reuse_workers)
