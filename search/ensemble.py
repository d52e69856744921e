"""The final ensemble job: fuse each finished trial's best fold models on the held-out split and rank the trials.

For every trial that Tune finished (status TERMINATED, with a checkpoint) the job

1. reads the checkpoint's `trial.json` and `best/best.json` (its `keep_best` best fold models, best first),
2. rebuilds those models (`build_detector(..., start="none")` + the saved state dict; Faster R-CNN's
   k-means anchor shapes come back from the state dict),
3. predicts the held-out images of `split.json` at full resolution (the models resize internally and
   answer in each image's own pixels, `xyxy absolute`),
4. fuses the models' boxes with Weighted Boxes Fusion (`detection.fusion.fuse_predictions`):
   `skip_box_thr` = the trial's score threshold, model weights = the models' fold validation scores
   (at least `MIN_MODEL_WEIGHT`: WBF needs positive weights), `iou_thr` and `conf_type` from the sweep's
   `ensemble` section,
5. scores the fused boxes with `detection.metrics.detection_metrics` (map, map_50, map_75, f1, score, ...).

Trials run as parallel Ray tasks, each with the sweep's `ensemble.cpus`/`ensemble.gpus`. The job writes,
into the experiment folder (docs/INTERFACES.md):

    ensemble/<trial_id>.json   the trial's fused held-out predictions (COCO results style) and metrics
    leaderboard.csv / .md      every trial, ranked by ensemble score; errored trials listed, not ensembled
    best_ensemble.json         the best trial's ensemble: model files (copied to best_ensemble/, so Tune's
    best_ensemble/rank-<r>.pt  checkpoint rotation cannot remove them), classes, WBF parameters

`load_ensemble` + `predict_ensemble` run a saved ensemble on new images (the predict command uses them).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detection.config import ConfigError
from detection.data.splits import Split
from search.tuner import finite_float, format_or_dash

__all__ = [
    "BEST_ENSEMBLE_DIR",
    "BEST_ENSEMBLE_JSON",
    "ENSEMBLE_DIR",
    "LEADERBOARD_COLUMNS",
    "LEADERBOARD_CSV",
    "LEADERBOARD_MD",
    "MIN_MODEL_WEIGHT",
    "EnsembleError",
    "EnsembleModel",
    "EnsembleSpec",
    "LeaderboardRow",
    "build_ensemble_models",
    "format_leaderboard",
    "load_ensemble",
    "predict_ensemble",
    "predictions_from_coco",
    "predictions_to_coco",
    "run_ensemble",
]

logger = logging.getLogger(__name__)

ENSEMBLE_DIR = "ensemble"
BEST_ENSEMBLE_DIR = "best_ensemble"
BEST_ENSEMBLE_JSON = "best_ensemble.json"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
MANIFEST_FORMAT = 1
# WBF needs positive model weights; a fold model whose validation score is 0 still gets a tiny vote.
MIN_MODEL_WEIGHT = 1e-3
# What the leaderboard reports of the fused held-out predictions (the same strings as everywhere).
ENSEMBLE_METRICS = ("map", "map_50", "map_75", "f1", "score")


class EnsembleError(ValueError):
    """A checkpoint, manifest or experiment folder that the ensemble job cannot use; the message names the
    file, the key or trial, what was expected and what came."""


# ------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class EnsembleModel:
    """One fold model of an ensemble: its weights file and where it came from."""

    path: str  # absolute path of the state_dict file (torch.save; loads with weights_only=True)
    rank: int  # 1 = the trial's best fold model
    fold: int
    epoch: int  # 1-based epoch of the fold's best validation score
    score: float  # the fold's validation score at that epoch (0.5 * map_50 + 0.5 * f1)


@dataclass(frozen=True)
class EnsembleSpec:
    """Everything needed to rebuild a trial's models and fuse their predictions.

    `best_ensemble.json` is `to_json()` of the best trial's spec (plus its params, metrics and split hash).
    Labels are contiguous `1..num_classes`; label `i + 1` is `class_names[i]`, COCO category `category_ids[i]`.
    """

    trial_id: str
    arch: str
    backbone: str
    num_classes: int
    image_size: int  # the models resize inputs to this longest side; boxes come back in input pixels
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    score_threshold: float  # the trial's threshold: F1 counts fused boxes at or above it
    models: tuple[EnsembleModel, ...]
    weights: tuple[float, ...]  # WBF model weights, one per model
    iou_thr: float
    skip_box_thr: float
    conf_type: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "trial_id": self.trial_id,
            "arch": self.arch,
            "backbone": self.backbone,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "score_threshold": self.score_threshold,
            "models": [asdict(m) for m in self.models],
            "wbf": {"weights": list(self.weights), "iou_thr": self.iou_thr, "skip_box_thr": self.skip_box_thr,
                    "conf_type": self.conf_type},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str) -> EnsembleSpec:
        """Read `to_json()` back; `EnsembleError` names `where` and the missing or bad key."""
        try:
            wbf = data["wbf"]
            spec = cls(
                trial_id=str(data["trial_id"]), arch=str(data["arch"]), backbone=str(data["backbone"]),
                num_classes=int(data["num_classes"]), image_size=int(data["image_size"]),
                class_names=tuple(str(n) for n in data["class_names"]),
                category_ids=tuple(int(c) for c in data["category_ids"]),
                score_threshold=float(data["score_threshold"]),
                models=tuple(EnsembleModel(path=str(m["path"]), rank=int(m["rank"]), fold=int(m["fold"]),
                                           epoch=int(m["epoch"]), score=float(m["score"])) for m in data["models"]),
                weights=tuple(float(w) for w in wbf["weights"]), iou_thr=float(wbf["iou_thr"]),
                skip_box_thr=float(wbf["skip_box_thr"]), conf_type=str(wbf["conf_type"]),
            )
        except KeyError as error:
            raise EnsembleError(f"{where}: missing key {error}; expected a file written by the ensemble job "
                                f"(keys {sorted(_SPEC_KEYS)}).") from error
        except (TypeError, ValueError) as error:
            raise EnsembleError(f"{where}: a value has the wrong type ({error}).") from error
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        if not self.models:
            raise EnsembleError(f"{where}: `models` must list at least one model file, but got none.")
        if len(self.weights) != len(self.models):
            raise EnsembleError(f"{where}: `wbf.weights` must hold one weight per model ({len(self.models)}), "
                                f"but got {list(self.weights)}.")
        if not len(self.class_names) == len(self.category_ids) == self.num_classes:
            raise EnsembleError(f"{where}: `class_names` and `category_ids` must have num_classes="
                                f"{self.num_classes} entries, but got {len(self.class_names)} and "
                                f"{len(self.category_ids)}.")


_SPEC_KEYS = {"trial_id", "arch", "backbone", "num_classes", "image_size", "class_names", "category_ids",
              "score_threshold", "models", "wbf"}


# ------------------------------------------------------------------------------------ models and fusion


def build_ensemble_models(spec: EnsembleSpec, *, device: str | torch.device,
                          model_bytes: Sequence[bytes] | None = None) -> list[nn.Module]:
    """The spec's models in eval mode on `device`, each built with `start="none"` and loaded from its file
    (or from `model_bytes[i]`, the file's content, when the caller read the files: a Ray task on another node).

    Faster R-CNN's k-means anchor shapes live in its state dict (`rpn.anchor_generator.source_shapes`) and
    must be known to build the model before loading it, so they are read from the file first.
    """
    from detection.models.anchors import anchor_shapes_from_state_dict
    from detection.models.factory import build_detector

    if model_bytes is not None and len(model_bytes) != len(spec.models):
        raise ValueError(f"Expected one state per model of trial {spec.trial_id} ({len(spec.models)}), "
                         f"but got {len(model_bytes)}.")
    models = []
    for i, entry in enumerate(spec.models):
        if model_bytes is not None:
            state = torch.load(io.BytesIO(model_bytes[i]), map_location="cpu", weights_only=True)
        else:
            path = Path(entry.path)
            if not path.is_file():
                raise EnsembleError(f"{path}: model file of trial {spec.trial_id} (rank {entry.rank}, "
                                    f"fold {entry.fold}) not found.")
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_detector(arch=spec.arch, backbone=spec.backbone, num_classes=spec.num_classes,
                               image_size=spec.image_size, start="none",
                               anchor_shapes=anchor_shapes_from_state_dict(state))
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return models


def predict_ensemble(
    models: Sequence[nn.Module], params: EnsembleSpec, images: Sequence[torch.Tensor], *, batch_size: int = 4
) -> list[dict[str, torch.Tensor]]:
    """Fused predictions of `models` on `images` (float [3, H, W] in [0, 1], any sizes, full resolution).

    Every model predicts every image (it resizes internally to `params.image_size`), then WBF fuses the
    models' boxes per image with `params.weights`, `iou_thr`, `skip_box_thr` and `conf_type`.

    Returns:
        One CPU dict per image: `boxes` float32 [K, 4] xyxy absolute in that image's pixels, `scores` [K],
        `labels` int64 [K] in 1..C, by descending score.
    """
    from detection.engine import predict
    from detection.fusion import fuse_predictions

    if len(models) != len(params.weights):
        raise ValueError(f"Expected one model per WBF weight ({len(params.weights)}), but got {len(models)} models.")
    if not images:
        return []
    per_model = []
    for model in models:
        device = next(model.parameters()).device
        per_model.append(predict(model, images, device=device, batch_size=batch_size))
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]  # (h, w)
    return fuse_predictions(per_model, sizes, weights=list(params.weights), iou_thr=params.iou_thr,
                            skip_box_thr=params.skip_box_thr, conf_type=params.conf_type)


def load_ensemble(manifest_path: str | Path, device: str | torch.device) -> tuple[list[nn.Module], EnsembleSpec]:
    """Load `best_ensemble.json` (or any spec written by `EnsembleSpec.to_json`): its models on `device`
    and the spec to pass to `predict_ensemble`.

    A model path that no longer exists (the experiment folder was moved or copied) is looked up by file
    name in the `best_ensemble/` folder beside the manifest.
    """
    manifest_path = Path(manifest_path)
    try:
        data = json.loads(manifest_path.read_text())
    except OSError as error:
        raise EnsembleError(f"{manifest_path}: cannot read the ensemble manifest ({error}).") from error
    except json.JSONDecodeError as error:
        raise EnsembleError(f"{manifest_path}: malformed JSON at line {error.lineno}, column {error.colno}: "
                            f"{error.msg}.") from error
    if not isinstance(data, dict):
        raise EnsembleError(f"{manifest_path}: expected a JSON object, got {type(data).__name__}.")
    spec = EnsembleSpec.from_json(data, where=str(manifest_path))
    moved = manifest_path.resolve().parent / BEST_ENSEMBLE_DIR
    models = tuple(
        m if Path(m.path).is_file() or not (moved / Path(m.path).name).is_file()
        else EnsembleModel(**{**asdict(m), "path": str(moved / Path(m.path).name)})
        for m in spec.models
    )
    spec = EnsembleSpec(**{**_fields(spec), "models": models})
    return build_ensemble_models(spec, device=device), spec


def _fields(spec: EnsembleSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


# ---------------------------------------------------------------------------------- COCO-style results


def predictions_to_coco(
    preds: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results entries `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`.

    `image_ids` are the dataset's global ids (those of `split.json`); labels `1..C` become the original COCO
    category ids; boxes go from `xyxy absolute` to COCO's `xywh absolute`.
    """
    if len(preds) != len(image_ids):
        raise ValueError(f"Expected one image id per prediction, but got {len(preds)} predictions and "
                         f"{len(image_ids)} ids.")
    out = []
    for image_id, pred in zip(image_ids, preds):
        boxes = pred["boxes"].double().reshape(-1, 4)
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[int(label) - 1]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


def predictions_from_coco(
    results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict[str, torch.Tensor]]:
    """Inverse of `predictions_to_coco`: one dict per id of `image_ids` (`boxes` float32 [N, 4] xyxy absolute,
    `scores` [N], `labels` int64 [N] in 1..C), an image without results gets empty tensors."""
    label_of = {int(c): i + 1 for i, c in enumerate(category_ids)}
    rows: dict[int, list[Mapping[str, Any]]] = {int(i): [] for i in image_ids}
    for entry in results:
        if int(entry["image_id"]) not in rows:
            raise ValueError(f"Result for image id {entry['image_id']} is not among the {len(rows)} image ids given.")
        rows[int(entry["image_id"])].append(entry)
    preds = []
    for image_id in image_ids:
        entries = rows[int(image_id)]
        xywh = torch.tensor([e["bbox"] for e in entries], dtype=torch.float64).reshape(-1, 4)
        preds.append({
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).float(),  # [N, 4] xyxy absolute
            "scores": torch.tensor([e["score"] for e in entries], dtype=torch.float32),
            "labels": torch.tensor([label_of[int(e["category_id"])] for e in entries], dtype=torch.int64),
        })
    return preds


# ------------------------------------------------------------------------------------------ the trials


@dataclass(frozen=True)
class _TrialInfo:
    """What the driver knows of one Tune trial before any model is loaded."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    params: dict[str, Any]
    checkpoint: str | None  # the latest checkpoint folder
    cv_score_mean: float | None  # the best reported fold-mean score and its std at that epoch
    cv_score_std: float | None
    cv_epoch: int | None
    epochs: int  # epochs reported
    error: str | None


@dataclass(frozen=True)
class LeaderboardRow:
    """One trial on the leaderboard; the ensemble fields are None for a trial that was not ensembled."""

    rank: int | None
    trial_id: str
    status: str  # "ensembled", or why not: Tune's status (ERROR, RUNNING, ...), "no checkpoint", "ensemble failed"
    detector: str | None
    lr: float | None
    batch_size: int | None
    score_threshold: float | None
    cv_score_mean: float | None
    cv_score_std: float | None
    cv_epoch: int | None
    epochs: int
    num_models: int | None
    map: float | None
    map_50: float | None
    map_75: float | None
    f1: float | None
    score: float | None
    error: str | None


LEADERBOARD_COLUMNS = tuple(LeaderboardRow.__dataclass_fields__)
MAX_TASKS_IN_FLIGHT = 8  # trials whose models sit in Ray's object store at once (3 models each)


def _read_trials(tune_dir: Path) -> list[_TrialInfo]:
    from ray.tune import ExperimentAnalysis

    if not tune_dir.is_dir():
        raise EnsembleError(f"{tune_dir}: no Ray Tune experiment here; expected the `tune/` folder of a sweep.")
    analysis = ExperimentAnalysis(str(tune_dir))
    frames = analysis.trial_dataframes
    trials = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows = frame.to_dict("records") if frame is not None and len(frame) else []
        if not rows and trial.last_result:
            rows = [dict(trial.last_result)]
        scored = [r for r in rows if finite_float(r.get("score_mean")) is not None]
        best = max(scored, key=lambda r: float(r["score_mean"])) if scored else None
        checkpoint = trial.checkpoint
        error = _trial_error(trial) if trial.status == "ERROR" else None
        trials.append(_TrialInfo(
            trial_id=trial.trial_id, status=trial.status,
            params=dict(trial.config or {}),
            checkpoint=str(checkpoint.path) if checkpoint is not None else None,
            cv_score_mean=finite_float(best["score_mean"]) if best else None,
            cv_score_std=finite_float(best.get("score_std")) if best else None,
            cv_epoch=int(best["training_iteration"]) if best and "training_iteration" in best else None,
            epochs=max((int(r.get("training_iteration", 0) or 0) for r in rows), default=0),
            error=error,
        ))
    return sorted(trials, key=lambda t: t.trial_id)


def _trial_error(trial: Any) -> str:
    """`<type>: <message>` of the exception that ended an errored trial (e.g. `TrialFailed: fold 1: non-finite
    loss in train: ...`), from Tune's pickled error, else the last line of its error.txt."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an error that cannot be unpickled here: fall back to the text
        error = None
    if error is not None:
        return _one_line(error)
    text = trial.get_error() or ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "errored (no error file)"


def _trial_spec(info: _TrialInfo, *, iou_thr: float, conf_type: str) -> EnsembleSpec:
    """The ensemble of a finished trial, from its checkpoint's trial.json and best/best.json."""
    from trainables.trial import BEST_DIR, TRIAL_JSON, read_best

    assert info.checkpoint is not None
    directory = Path(info.checkpoint)
    where = str(directory / TRIAL_JSON)
    try:
        trial = json.loads((directory / TRIAL_JSON).read_text())
        best = read_best(directory)
    except (OSError, json.JSONDecodeError) as error:
        raise EnsembleError(f"{directory}: cannot read the checkpoint of trial {info.trial_id} ({error}); "
                            f"expected {TRIAL_JSON} and {BEST_DIR}/best.json written by train_trial.") from error
    if not best:
        raise EnsembleError(f"{directory / BEST_DIR}: trial {info.trial_id} kept no best model; expected at least one.")
    threshold = float(trial["score_threshold"])
    models = tuple(EnsembleModel(path=e["path"], rank=int(e["rank"]), fold=int(e["fold"]), epoch=int(e["epoch"]),
                                 score=float(e["score"])) for e in sorted(best, key=lambda e: e["rank"]))
    try:
        spec = EnsembleSpec(
            trial_id=info.trial_id, arch=str(trial["arch"]), backbone=str(trial["backbone"]),
            num_classes=int(trial["num_classes"]), image_size=int(trial["image_size"]),
            class_names=tuple(trial["class_names"]), category_ids=tuple(int(c) for c in trial["category_ids"]),
            score_threshold=threshold, models=models,
            weights=tuple(max(m.score, MIN_MODEL_WEIGHT) for m in models),
            iou_thr=iou_thr, skip_box_thr=threshold, conf_type=conf_type,
        )
    except (KeyError, TypeError) as error:
        raise EnsembleError(f"{where}: missing or bad key {error}; expected arch, backbone, num_classes, "
                            "image_size, class_names, category_ids and score_threshold.") from error
    spec.check(where)
    return spec


# ------------------------------------------------------------------------------------ one trial's task


def _evaluate_trial(spec: EnsembleSpec, *, data_path: str, filter_empty: bool, split: Split, batch_size: int,
                    model_bytes: Sequence[bytes]) -> dict[str, Any]:
    """Predict the held-out split with the spec's models, fuse, score. Runs as a Ray task (or in-process).
    The driver hands over the model files' bytes, so a task on any node needs only the dataset.

    Returns `{"metrics", "image_ids", "predictions"}` (predictions as COCO results, see `predictions_to_coco`).
    """
    from torch.utils.data import DataLoader

    from detection.data.coco import CocoDetection, collate_detection, load_dataset
    from detection.metrics import detection_metrics
    from trainables.fold_worker import pick_device

    index = load_dataset(data_path, filter_empty=filter_empty)
    split.check_index(index)
    models = build_ensemble_models(spec, device=pick_device(), model_bytes=model_bytes)
    # Full resolution, no eval transform: the detectors resize internally and answer in these pixels.
    dataset = CocoDetection(index, split.holdout, transforms=None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    preds: list[dict[str, torch.Tensor]] = []
    targets: list[dict[str, torch.Tensor]] = []
    for images, batch_targets in loader:
        preds.extend(predict_ensemble(models, spec, images, batch_size=batch_size))
        targets.extend({k: t[k] for k in ("boxes", "labels", "iscrowd")} for t in batch_targets)
    metrics = detection_metrics(preds, targets, score_threshold=spec.score_threshold, class_names=spec.class_names)
    return {"metrics": metrics, "image_ids": list(split.holdout),
            "predictions": predictions_to_coco(preds, split.holdout, spec.category_ids)}


# ------------------------------------------------------------------------------------------ the job


def run_ensemble(experiment_dir: str | Path, *, trial_ids: Sequence[str] | None = None) -> Path:
    """Ensemble every finished trial of a sweep (or only `trial_ids`), write the leaderboard and the best
    ensemble's manifest; returns the path of `leaderboard.csv` (`leaderboard.md` lies beside it).

    Uses the running Ray (the sweep's, or a cluster's under `ray job submit`) or starts a local one.

    Raises:
        ConfigError: the folder is not a sweep's, or `ensemble.gpus` asks for GPUs a local Ray does not have.
        EnsembleError: an unknown trial id, or no held-out images in split.json.
    """
    import ray

    from search.tuner import SPLIT_JSON, TUNE_DIR, load_experiment

    experiment_dir = Path(experiment_dir).resolve()
    config = load_experiment(experiment_dir)
    split_path = experiment_dir / SPLIT_JSON
    split = Split.from_json(split_path)
    if not split.holdout:
        raise EnsembleError(f"{split_path}: the split holds no held-out images; expected a Roboflow test/ folder "
                            "or `data.holdout_fraction` > 0.")
    trials = _read_trials(experiment_dir / TUNE_DIR)
    if trial_ids is not None:
        known = {t.trial_id for t in trials}
        unknown = sorted(set(trial_ids) - known)
        if unknown:
            raise EnsembleError(f"{experiment_dir / TUNE_DIR}: no trial {unknown[0]!r}; the sweep has {sorted(known)}.")
        trials = [t for t in trials if t.trial_id in set(trial_ids)]

    ens = config.ensemble
    specs: dict[str, EnsembleSpec] = {}
    failures: dict[str, str] = {}
    for info in trials:
        if info.status == "TERMINATED" and info.checkpoint is not None:
            try:
                specs[info.trial_id] = _trial_spec(info, iou_thr=ens.iou_thr, conf_type=ens.conf_type)
            except EnsembleError as error:
                failures[info.trial_id] = str(error)
                logger.warning("trial %s is not ensembled: %s", info.trial_id, error)

    started_ray = False
    if specs and not ray.is_initialized():
        started_ray = True
        _init_local_ray(cpus=ens.cpus, gpus=ens.gpus, tasks=len(specs))
    results: dict[str, dict[str, Any]] = {}
    try:
        task = ray.remote(_evaluate_trial)
        waiting = list(specs.items())
        running: dict[Any, str] = {}
        while waiting or running:
            # The driver reads a trial's model files just before its task starts, and keeps a bounded number
            # of tasks (and their models in the object store) in flight.
            while waiting and len(running) < MAX_TASKS_IN_FLIGHT:
                trial_id, spec = waiting.pop(0)
                try:
                    model_bytes = _read_model_files(spec)
                except EnsembleError as error:
                    failures[trial_id] = str(error)
                    logger.warning("trial %s is not ensembled: %s", trial_id, error)
                    continue
                # One task per trial, named so that the dashboard shows which trial each one is.
                ref = task.options(num_cpus=ens.cpus, num_gpus=ens.gpus, max_retries=1,
                                   name=f"ensemble/{trial_id}").remote(
                    spec, data_path=config.data.path, filter_empty=config.data.filter_empty, split=split,
                    batch_size=config.train.eval_batch_size, model_bytes=model_bytes)
                running[ref] = trial_id
            if not running:
                break
            (done,), _ = ray.wait(list(running), num_returns=1)
            trial_id = running.pop(done)
            try:
                results[trial_id] = ray.get(done)
            except ray.exceptions.RayError as error:  # one bad trial does not sink the job
                failures[trial_id] = _one_line(error)
                logger.warning("trial %s: the ensemble task failed: %s", trial_id, failures[trial_id])
    finally:
        if started_ray:
            ray.shutdown()

    out_dir = experiment_dir / ENSEMBLE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for info in trials:
        if info.trial_id in results:
            result = results[info.trial_id]
            payload = {"trial_id": info.trial_id, "params": info.params, "split_hash": split.hash,
                       "metrics": result["metrics"], "ensemble": specs[info.trial_id].to_json(),
                       "image_ids": result["image_ids"], "predictions": result["predictions"]}
            _write_json(out_dir / f"{info.trial_id}.json", payload)

    rows = _leaderboard_rows(trials, specs, results, failures)
    csv_path = _write_leaderboard(rows, experiment_dir)
    best = next((r for r in rows if r.status == "ensembled"), None)
    if best is not None:
        info = next(t for t in trials if t.trial_id == best.trial_id)
        _write_best_ensemble(experiment_dir, specs[info.trial_id], info=info, metrics=results[info.trial_id]["metrics"],
                             split_hash=split.hash)
    else:
        logger.warning("%s: no trial could be ensembled; %s not written.", experiment_dir, BEST_ENSEMBLE_JSON)
    return csv_path


def _read_model_files(spec: EnsembleSpec) -> list[bytes]:
    """The model files of a trial's ensemble, read by the driver (the tasks may run on nodes without them)."""
    try:
        return [Path(m.path).read_bytes() for m in spec.models]
    except OSError as error:
        raise EnsembleError(f"{error.filename}: cannot read a model file of trial {spec.trial_id} "
                            f"({error.strerror}).") from error


def _init_local_ray(*, cpus: float, gpus: float, tasks: int) -> None:
    import ray

    cores = os.cpu_count() or 1
    # address="local": a new Ray of our own even when a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=max(cores, math.ceil(cpus)), include_dashboard=False, log_to_driver=True)
    have = ray.cluster_resources().get("GPU", 0.0)
    if gpus > have:
        ray.shutdown()
        raise ConfigError(f"`ensemble.gpus` = {gpus} per trial, but this machine has {have:g} GPUs; use "
                          "`ensemble.gpus: 0` on a CPU machine, or run the job on a cluster (`ray job submit`).")
    logger.info("ensemble job: %d trials as Ray tasks of %g CPU / %g GPU on a local Ray", tasks, cpus, gpus)


def _one_line(error: BaseException) -> str:
    """`<type>: <message on one line>` of the error a Ray task or trial raised (RayTaskError wraps it as `.cause`)."""
    cause = getattr(error, "cause", None) or error
    message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return f"{type(cause).__name__}: {message}"[:300]


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)  # readers (status, report) never see half a file


def _leaderboard_rows(trials: Sequence[_TrialInfo], specs: Mapping[str, EnsembleSpec],
                      results: Mapping[str, Mapping[str, Any]], failures: Mapping[str, str]) -> list[LeaderboardRow]:
    rows = []
    for info in trials:
        result = results.get(info.trial_id)
        metrics = result["metrics"] if result else {}
        if result:
            status, error = "ensembled", None
        elif info.trial_id in failures:
            status, error = "ensemble failed", failures[info.trial_id]
        elif info.status == "TERMINATED":
            status, error = "no checkpoint", None
        else:
            status, error = info.status, info.error
        params = info.params
        rows.append(LeaderboardRow(
            rank=None, trial_id=info.trial_id, status=status,
            detector=params.get("detector"), lr=finite_float(params.get("lr")),
            batch_size=int(params["batch_size"]) if params.get("batch_size") is not None else None,
            score_threshold=finite_float(params.get("score_threshold")),
            cv_score_mean=info.cv_score_mean, cv_score_std=info.cv_score_std, cv_epoch=info.cv_epoch,
            epochs=info.epochs, num_models=len(specs[info.trial_id].models) if result else None,
            **{m: (float(metrics[m]) if result else None) for m in ENSEMBLE_METRICS},
            error=error,
        ))
    ensembled = sorted((r for r in rows if r.status == "ensembled"), key=lambda r: (-(r.score or 0.0), r.trial_id))
    others = sorted((r for r in rows if r.status != "ensembled"), key=lambda r: r.trial_id)
    return [LeaderboardRow(**{**asdict(r), "rank": i}) for i, r in enumerate(ensembled, start=1)] + others


def _write_leaderboard(rows: Sequence[LeaderboardRow], experiment_dir: Path) -> Path:
    csv_path = experiment_dir / LEADERBOARD_CSV
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LEADERBOARD_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    tmp.replace(csv_path)
    md_path = experiment_dir / LEADERBOARD_MD
    md_tmp = md_path.with_suffix(".md.tmp")
    md_tmp.write_text(format_leaderboard(rows) + "\n")
    md_tmp.replace(md_path)
    return csv_path


def format_leaderboard(rows: Sequence[LeaderboardRow]) -> str:
    """A Markdown table: rank, trial, detector, params, CV score mean +- std, ensemble metrics on the held-out
    split; trials that were not ensembled follow, with their status."""
    head = ("| rank | trial | status | detector | lr | batch | thr | CV score (mean +- std) "
            "| map | map_50 | map_75 | f1 | score |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cv = "-" if r.cv_score_mean is None else f"{r.cv_score_mean:.4f} +- {r.cv_score_std or 0.0:.4f}"
        lines.append(
            f"| {r.rank or '-'} | {r.trial_id} | {r.status} | {r.detector or '-'} | {format_or_dash(r.lr, '.2e')} "
            f"| {format_or_dash(r.batch_size, 'd')} | {format_or_dash(r.score_threshold, '.3f')} | {cv} "
            + " ".join(f"| {format_or_dash(getattr(r, m), '.4f')}" for m in ENSEMBLE_METRICS) + " |")
    for r in rows:
        if r.error:
            lines.append(f"\n{r.trial_id} ({r.status}): {r.error}")
    return "\n".join(lines)


def _write_best_ensemble(experiment_dir: Path, spec: EnsembleSpec, *, info: _TrialInfo, metrics: Mapping[str, Any],
                         split_hash: str) -> Path:
    """Copy the best trial's model files to `best_ensemble/` and write `best_ensemble.json` pointing at them."""
    folder = experiment_dir / BEST_ENSEMBLE_DIR
    if folder.exists():
        shutil.rmtree(folder)  # an earlier run's winner
    folder.mkdir(parents=True)
    models = []
    for m in spec.models:
        target = folder / f"rank-{m.rank}.pt"
        shutil.copy2(m.path, target)
        models.append(EnsembleModel(**{**asdict(m), "path": str(target.resolve())}))
    copied = EnsembleSpec(**{**_fields(spec), "models": tuple(models)})
    path = experiment_dir / BEST_ENSEMBLE_JSON
    _write_json(path, {**copied.to_json(), "params": info.params, "split_hash": split_hash,
                       "holdout_metrics": dict(metrics), "source_checkpoint": info.checkpoint})
    return path
