"""An ensemble of fold models as a file: the spec (`best_ensemble.json`), loading its models, predicting with
them (WBF-fused) and COCO-style results.

`search.ensemble` (the job) chooses an ensemble and writes its spec; `load_ensemble` + `predict_ensemble` run
a saved one on new images (`search.predict`, the predict command, imports only this module's side).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BEST_ENSEMBLE_DIR",
    "ENSEMBLE_SPEC_FORMAT",
    "EnsembleError",
    "EnsembleModel",
    "EnsembleSpec",
    "build_ensemble_models",
    "fusion_members",
    "load_ensemble",
    "predict_ensemble",
    "predictions_from_coco",
    "predictions_to_coco",
]

BEST_ENSEMBLE_DIR = "best_ensemble"  # beside best_ensemble.json: the chosen models' files
# `format` of an ensemble spec (best_ensemble.json). 2: models of several trials (arch/backbone/image_size per
# model), name, tuned threshold
ENSEMBLE_SPEC_FORMAT = 2


class EnsembleError(ValueError):
    """A checkpoint, manifest or experiment folder that the ensemble job cannot use; the message names the
    file, the key or trial, what was expected and what came."""


# ------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class EnsembleModel:
    """One fold model of an ensemble: its weights file, how to rebuild it and where it came from."""

    path: str  # absolute path of the state_dict file (torch.save; loads with weights_only=True)
    trial_id: str
    arch: str
    backbone: str
    image_size: int  # the model resizes inputs to this longest side; boxes come back in input pixels
    rank: int  # 1 = the trial's best fold model
    fold: int
    epoch: int  # 1-based epoch of the fold's best validation score
    score: float  # the fold's validation score at that epoch (0.5 * map_50 + 0.5 * f1)
    # build_detector keywords the model was trained with that change its state dict or its predictions
    # (`ModelConfig.architecture_options`: fcos_tal's neck_channels/head_convs, faster_rcnn's test proposals)
    options: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`<trial_id>/fold-<k>`: unique within a sweep."""
        return f"{self.trial_id}/fold-{self.fold}"


@dataclass(frozen=True)
class EnsembleSpec:
    """Everything needed to rebuild an ensemble's models and fuse their predictions.

    `name` is the trial id of a trial's own ensemble, or `search.ensemble.GREEDY` for the cross-trial one. The
    models may come from several trials (each has its arch, backbone and input size). `best_ensemble.json` is
    `to_json()` of the chosen ensemble (plus its selection and test metrics and the split hash). Labels are
    contiguous `1..num_classes`; label `i + 1` is `class_names[i]`, COCO category `category_ids[i]`.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    score_threshold: float  # F1-optimal on the selection split: F1 and `predict --draw` count boxes above it
    models: tuple[EnsembleModel, ...]
    weights: tuple[float, ...]  # WBF model weights, one per model
    iou_thr: float
    skip_box_thr: float  # a low fixed floor, not the score threshold
    conf_type: str
    # Flip test-time augmentation: every model also predicts the mirrored image, and WBF fuses both views (each
    # at the model's weight). The selection split chooses it (`ensemble.hflip_tta_grid`).
    hflip_tta: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ENSEMBLE_SPEC_FORMAT,
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "score_threshold": self.score_threshold,
            "models": [asdict(m) for m in self.models],
            "wbf": {"weights": list(self.weights), "iou_thr": self.iou_thr, "skip_box_thr": self.skip_box_thr,
                    "conf_type": self.conf_type, "hflip_tta": self.hflip_tta},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str) -> EnsembleSpec:
        """Read `to_json()` back; `EnsembleError` names `where` and the missing or bad key."""
        if data.get("format") != ENSEMBLE_SPEC_FORMAT:
            raise EnsembleError(f"{where}: `format` is {data.get('format')!r}, but this version reads ensemble "
                                f"manifests of format {ENSEMBLE_SPEC_FORMAT}; run `detsweep ensemble` on the "
                                "experiment again to rewrite it.")
        try:
            wbf = data["wbf"]
            spec = cls(
                name=str(data["name"]), num_classes=int(data["num_classes"]),
                class_names=tuple(str(n) for n in data["class_names"]),
                category_ids=tuple(int(c) for c in data["category_ids"]),
                score_threshold=float(data["score_threshold"]),
                models=tuple(EnsembleModel(
                    path=str(m["path"]), trial_id=str(m["trial_id"]), arch=str(m["arch"]), backbone=str(m["backbone"]),
                    image_size=int(m["image_size"]), rank=int(m["rank"]), fold=int(m["fold"]), epoch=int(m["epoch"]),
                    score=float(m["score"]), options={str(k): int(v) for k, v in m.get("options", {}).items()})
                    for m in data["models"]),
                weights=tuple(float(w) for w in wbf["weights"]), iou_thr=float(wbf["iou_thr"]),
                skip_box_thr=float(wbf["skip_box_thr"]), conf_type=str(wbf["conf_type"]),
                hflip_tta=_flag(wbf.get("hflip_tta", False), where=where, key="wbf.hflip_tta"),
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


def _flag(value: Any, *, where: str, key: str) -> bool:
    if not isinstance(value, bool):  # bool("false") would be True
        raise EnsembleError(f"{where}: `{key}` must be true or false, but got {value!r}.")
    return value


def fusion_members(plain: Sequence[Any], mirrored: Sequence[Any] | None, weights: Sequence[float], *,
                   hflip_tta: bool) -> tuple[list[Any], list[float]]:
    """WBF's inputs for an ensemble: each model's predictions and, with flip TTA, each model's mirrored-view
    predictions too (at the model's weight)."""
    if not hflip_tta:
        return list(plain), list(weights)
    if mirrored is None or len(mirrored) != len(plain):
        raise ValueError(f"flip TTA needs one mirrored-view prediction per model ({len(plain)}), but got "
                         f"{None if mirrored is None else len(mirrored)}.")
    return [*plain, *mirrored], [*weights, *weights]


_SPEC_KEYS = {"format", "name", "num_classes", "class_names", "category_ids", "score_threshold", "models", "wbf"}


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
        raise ValueError(f"Expected one state per model of ensemble {spec.name} ({len(spec.models)}), "
                         f"but got {len(model_bytes)}.")
    models = []
    for i, entry in enumerate(spec.models):
        if model_bytes is not None:
            state = torch.load(io.BytesIO(model_bytes[i]), map_location="cpu", weights_only=True)
        else:
            path = Path(entry.path)
            if not path.is_file():
                raise EnsembleError(f"{path}: model file of trial {entry.trial_id} (rank {entry.rank}, "
                                    f"fold {entry.fold}) not found.")
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_detector(arch=entry.arch, backbone=entry.backbone, num_classes=spec.num_classes,
                               image_size=entry.image_size, start="none",
                               anchor_shapes=anchor_shapes_from_state_dict(state), **entry.options)
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return models


def predict_ensemble(
    models: Sequence[nn.Module], params: EnsembleSpec, images: Sequence[torch.Tensor], *, batch_size: int = 4
) -> list[dict[str, torch.Tensor]]:
    """Fused predictions of `models` on `images` (float [3, H, W] in [0, 1], any sizes, full resolution).

    Every model predicts every image (each resizes internally to its own input size; with `params.hflip_tta`
    also the mirrored image), then WBF fuses the models' boxes per image with `params.weights`, `iou_thr`,
    `skip_box_thr` and `conf_type`.

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
    plain, mirrored = [], []
    for model in models:
        device = next(model.parameters()).device
        plain.append(predict(model, images, device=device, batch_size=batch_size))
        if params.hflip_tta:
            mirrored.append(predict(model, images, device=device, batch_size=batch_size, hflip=True))
    members, weights = fusion_members(plain, mirrored, params.weights, hflip_tta=params.hflip_tta)
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]  # (h, w)
    return fuse_predictions(members, sizes, weights=weights, iou_thr=params.iou_thr,
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
    spec = replace(spec, models=models)
    return build_ensemble_models(spec, device=device), spec


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
