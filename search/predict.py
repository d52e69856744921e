"""`detsweep predict`: run a sweep's best ensemble on image files or folders.

    detsweep predict --ensemble EXP/best_ensemble.json photo.png more/ --out preds.json [--draw DIR] [--device auto]

The ensemble (the fold models the ensemble job chose on the selection split, of one trial or several,
fused with Weighted Boxes Fusion as the job scored them) is loaded with `search.ensemble_models.load_ensemble` and
run with `search.ensemble_models.predict_ensemble`, on CPU or GPU. Two JSON files come out:

- `preds.json`, a COCO results file: the list `[{"image_id", "category_id", "bbox": [x, y, w, h] absolute
  pixels, "score"}, ...]` with the dataset's original COCO category ids, the fused boxes at or above the
  score threshold (the ensemble's own, where its F1 was measured, unless `score_threshold=` says otherwise);
- `preds.images.json` (`images_file(out)`), a COCO dataset dict naming the images those ids stand for:

      {
        "info": {"ensemble": <best_ensemble.json>, "ensemble_name": <trial id or "greedy">,
                 "detectors": ["<arch>/<backbone>", ...], "score_threshold": <the one applied>,
                 "results": <preds.json>, ...},
        "images":      [{"id": 1, "file_name": <absolute path>, "width": W, "height": H}, ...],
        "categories":  [{"id": <the dataset's original COCO category id>, "name": ...}, ...],
        "annotations": [],
        "skipped":     [{"file": ..., "error": ...}, ...]
      }

so that pycocotools reads them as they are: `COCO("preds.images.json").loadRes("preds.json")` (pycocotools
cannot `loadRes` an empty list; faster_coco_eval can). An image that cannot be read is reported on stderr,
naming the file, and skipped; the others are still predicted and written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detection.files import atomic_write_text

__all__ = ["IMAGE_SUFFIXES", "PredictError", "PredictSummary", "collect_images", "images_file", "predict_images",
           "read_image_file", "write_predictions"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class PredictError(ValueError):
    """Inputs that give nothing to predict, or a device that cannot be used; names what was given."""


@dataclass
class PredictSummary:
    """What `predict_images` did."""

    out: Path  # the COCO results list
    images: Path  # the COCO dataset dict of the images (`images_file(out)`)
    num_images: int  # images predicted
    num_detections: int  # boxes written (at or above `score_threshold`)
    score_threshold: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    drawn: list[Path] = field(default_factory=list)


def images_file(out: str | Path) -> Path:
    """The images file written beside the results file `out`: `preds.json` -> `preds.images.json`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.images{out.suffix or '.json'}")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The files to predict, in order: a file as given (whatever its suffix: an unreadable one is reported
    when it is read), a folder's files with an image suffix (`IMAGE_SUFFIXES`, any case), recursively, sorted.
    A path that does not exist is kept too, so that it is reported and skipped like any unreadable image.

    Raises:
        PredictError: when the inputs name no file at all (e.g. only empty folders).
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    if not files:
        raise PredictError(f"No image files in {[str(i) for i in inputs]}; expected image files or folders "
                           f"holding files ending in {', '.join(IMAGE_SUFFIXES)}.")
    return files


def read_image_file(path: str | Path) -> np.ndarray:
    """An image file as np.uint8 [H, W, 3] RGB (pixels as stored: no EXIF rotation, like the training data).

    Raises:
        PredictError: when the file is missing or cannot be decoded (the message names it).
    """
    try:
        with Image.open(path) as image:
            image.load()
            return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy shares it
    except FileNotFoundError as error:
        raise PredictError(f"{path}: no such file.") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise PredictError(f"{path}: cannot decode the image ({error}).") from error


def _resolve_device(device: str) -> torch.device:
    from detection.trainer import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"`--device {device}` asks for CUDA, but torch.cuda.is_available() is False here; "
                           "use `--device cpu` or `--device auto`.")
    return resolved


def _readable(files: Sequence[Path], warn: Callable[[str], None], skipped: list[tuple[str, str]]
              ) -> Iterator[tuple[Path, np.ndarray]]:
    for path in files:
        try:
            yield path, read_image_file(path)
        except PredictError as error:
            skipped.append((str(path), str(error)))
            warn(f"detsweep predict: skipping {path}: {error}")


def _batches(items: Iterator[tuple[Path, np.ndarray]], size: int) -> Iterator[list[tuple[Path, np.ndarray]]]:
    batch: list[tuple[Path, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _draw_name(path: Path, used: set[str]) -> str:
    name, n = f"{path.stem}.png", 1
    while name in used:  # same stem in two folders
        n += 1
        name = f"{path.stem}-{n}.png"
    used.add(name)
    return name


def predict_images(
    ensemble_path: str | Path,
    inputs: Sequence[str | Path],
    *,
    out: str | Path,
    draw_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 4,
    score_threshold: float | None = None,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> PredictSummary:
    """Predict every readable image of `inputs` with the ensemble of `ensemble_path`; write `out`.

    Args:
        ensemble_path: a `best_ensemble.json` written by the ensemble job.
        inputs: image files and/or folders (see `collect_images`).
        out: the COCO results file to write; the images file goes beside it (`images_file(out)`; see the
            module docstring).
        draw_dir: when given, one PNG per image with the boxes at or above the score threshold.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        batch_size: images per forward pass of each model.
        score_threshold: boxes below it are not written (nor drawn); None: the ensemble's own threshold (where
            its F1 was measured), 0.0: every fused box.
        warn: where "skipping FILE: why" lines go (stderr).

    Raises:
        PredictError: no input files, or an unusable device.
        search.ensemble_models.EnsembleError: a missing or malformed ensemble manifest or model file.
    """
    from detection.drawing import draw_detections
    from search.ensemble_models import load_ensemble, predict_ensemble, predictions_to_coco

    if batch_size < 1:
        raise PredictError(f"`batch_size >= 1` must hold, but got {batch_size=}.")
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise PredictError(f"`0 <= score_threshold <= 1` must hold, but got {score_threshold=}.")
    files = collect_images(inputs)
    models, spec = load_ensemble(ensemble_path, _resolve_device(device))
    threshold = float(score_threshold if score_threshold is not None else (spec.score_threshold or 0.0))

    images_json: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    drawn: list[Path] = []
    used_names: set[str] = set()
    for batch in _batches(_readable(files, warn, skipped), batch_size):
        tensors = [torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0) for _, array in batch]  # [3, H, W]
        fused = [{k: v[pred["scores"] >= threshold] for k, v in pred.items()}
                 for pred in predict_ensemble(models, spec, tensors, batch_size=batch_size)]
        ids = list(range(len(images_json) + 1, len(images_json) + len(batch) + 1))  # COCO ids from 1
        for image_id, (path, array) in zip(ids, batch):
            images_json.append({"id": image_id, "file_name": str(path.resolve()), "width": int(array.shape[1]),
                                "height": int(array.shape[0])})
        results += predictions_to_coco(fused, ids, spec.category_ids)  # {image_id, category_id, bbox, score}
        if draw_dir is not None:
            for (path, array), pred in zip(batch, fused):
                drawn.append(draw_detections(array, pred, None, class_names=spec.class_names,
                                             score_threshold=threshold,
                                             out_path=Path(draw_dir) / _draw_name(path, used_names)))

    out = Path(out)
    images_path = write_predictions(
        out, results=results, images=images_json,
        categories=[{"id": int(c), "name": name} for c, name in zip(spec.category_ids, spec.class_names)],
        info={"description": "detsweep predict", "ensemble": str(Path(ensemble_path).resolve()),
              **_ensemble_info(spec), "score_threshold": threshold, "num_models": len(spec.models)},
        skipped=skipped,
    )
    return PredictSummary(out=out, images=images_path, num_images=len(images_json), num_detections=len(results),
                          score_threshold=threshold, skipped=skipped, drawn=drawn)


def write_predictions(
    out: str | Path, *, results: Sequence[Mapping[str, Any]], images: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]], info: Mapping[str, Any], skipped: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the COCO results file `out` (`results`: `{image_id, category_id, bbox, score}` each) and beside it
    the images file (`images_file(out)`: a COCO dataset dict of `images` and `categories`, no annotations);
    returns the images file. `COCO(images file).loadRes(out)` reads them as they are."""
    out = Path(out)
    images_path = images_file(out)
    dataset = {
        "info": {**info, "results": str(out.resolve())},
        "images": [dict(image) for image in images],
        "categories": [dict(category) for category in categories],
        "annotations": [],  # a dataset dict without ground truth: the boxes are in the results file
        "skipped": [{"file": file, "error": error} for file, error in skipped],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(images_path, dataset)
    _write_json(out, [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results])
    return images_path


def _ensemble_info(spec: Any) -> dict[str, Any]:
    """Which ensemble predicted (an `EnsembleSpec` of best_ensemble.json format 2): its name (a trial id, or
    "greedy" for the cross-trial one) and its detectors (`arch/backbone` of its models, sorted, once each)."""
    return {"ensemble_name": spec.name, "detectors": sorted({f"{m.arch}/{m.backbone}" for m in spec.models})}


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))  # a reader never sees half a file
