"""`detsweep predict`: run a sweep's best ensemble on image files or folders.

    detsweep predict --ensemble EXP/best_ensemble.json photo.png more/ --out preds.json [--draw DIR] [--device auto]

The ensemble (the best trial's fold models, fused with Weighted Boxes Fusion as the ensemble job scored
them) is loaded with `search.ensemble.load_ensemble` and run with `search.ensemble.predict_ensemble`, on
CPU or GPU. The output is one COCO-format JSON file:

    {
      "info": {"ensemble": <best_ensemble.json>, "trial_id": ..., "score_threshold": <the trial's>, ...},
      "images":      [{"id": 1, "file_name": <absolute path>, "width": W, "height": H}, ...],
      "categories":  [{"id": <the dataset's original COCO category id>, "name": ...}, ...],
      "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h] absolute pixels, "score",
                       "area", "iscrowd": 0}, ...],   # COCO results entries, every fused box
      "skipped":     [{"file": ..., "error": ...}, ...]
    }

`annotations` is a COCO results list (pycocotools: `COCO(...).loadRes(data["annotations"])`); every fused
box is kept (as the held-out evaluation ranks them), and `info.score_threshold` is where the ensemble's
F1 was measured: `--draw` draws the boxes at or above it. An image that cannot be read is reported on
stderr, naming the file, and skipped; the others are still predicted and written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "PredictError", "PredictSummary", "collect_images", "predict_images", "read_image_file"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class PredictError(ValueError):
    """Inputs that give nothing to predict, or a device that cannot be used; names what was given."""


@dataclass
class PredictSummary:
    """What `predict_images` did."""

    out: Path
    num_images: int  # images predicted
    num_detections: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    drawn: list[Path] = field(default_factory=list)


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
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> PredictSummary:
    """Predict every readable image of `inputs` with the ensemble of `ensemble_path`; write `out`.

    Args:
        ensemble_path: a `best_ensemble.json` written by the ensemble job.
        inputs: image files and/or folders (see `collect_images`).
        out: the COCO JSON to write (see the module docstring).
        draw_dir: when given, one PNG per image with the boxes at or above the trial's score threshold.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        batch_size: images per forward pass of each model.
        warn: where "skipping FILE: why" lines go (stderr).

    Raises:
        PredictError: no input files, or an unusable device.
        search.ensemble.EnsembleError: a missing or malformed ensemble manifest or model file.
    """
    from detection.drawing import draw_detections
    from search.ensemble import load_ensemble, predict_ensemble, predictions_to_coco

    if batch_size < 1:
        raise PredictError(f"`batch_size >= 1` must hold, but got {batch_size=}.")
    files = collect_images(inputs)
    models, spec = load_ensemble(ensemble_path, _resolve_device(device))

    images_json: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    drawn: list[Path] = []
    used_names: set[str] = set()
    for batch in _batches(_readable(files, warn, skipped), batch_size):
        tensors = [torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0) for _, array in batch]  # [3, H, W]
        fused = predict_ensemble(models, spec, tensors, batch_size=batch_size)
        ids = list(range(len(images_json) + 1, len(images_json) + len(batch) + 1))  # COCO ids from 1
        for image_id, (path, array) in zip(ids, batch):
            images_json.append({"id": image_id, "file_name": str(path.resolve()), "width": int(array.shape[1]),
                                "height": int(array.shape[0])})
        for entry in predictions_to_coco(fused, ids, spec.category_ids):
            w, h = entry["bbox"][2], entry["bbox"][3]
            annotations.append({"id": len(annotations) + 1, **entry, "area": w * h, "iscrowd": 0})
        if draw_dir is not None:
            for (path, array), pred in zip(batch, fused):
                drawn.append(draw_detections(array, pred, None, class_names=spec.class_names,
                                             score_threshold=spec.score_threshold,
                                             out_path=Path(draw_dir) / _draw_name(path, used_names)))

    payload = {
        "info": {"description": "detsweep predict", "ensemble": str(Path(ensemble_path).resolve()),
                 "trial_id": spec.trial_id, "detector": f"{spec.arch}/{spec.backbone}",
                 "score_threshold": spec.score_threshold, "num_models": len(spec.models)},
        "images": images_json,
        "categories": [{"id": int(c), "name": name} for c, name in zip(spec.category_ids, spec.class_names)],
        "annotations": annotations,
        "skipped": [{"file": file, "error": error} for file, error in skipped],
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    return PredictSummary(out=out, num_images=len(images_json), num_detections=len(annotations), skipped=skipped,
                          drawn=drawn)
