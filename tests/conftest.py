"""Shared pytest fixtures.

Data (detection/data):
- ``deepforest_root``: the real DeepForest photos written once per session as a Roboflow-style COCO
  folder (``train/ valid/ test/``) by `write_deepforest_coco`; 400 px tiles, seed 0.
- ``deepforest_index``: `load_dataset(deepforest_root)` (a `CocoIndex`), once per session.
- ``coco_writer``: a function that writes a small synthetic COCO JSON with real PNGs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def deepforest_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Roboflow-style COCO folder of the real DeepForest tiles (45 tiles, 810 boxes; Tree/Dead/Alive)."""
    from detection.data.deepforest import write_deepforest_coco

    return write_deepforest_coco(tmp_path_factory.mktemp("deepforest"), tile_size=400, seed=0)


@pytest.fixture(scope="session")
def deepforest_index(deepforest_root: Path):
    """`CocoIndex` of ``deepforest_root`` (labels 1 Tree, 2 Dead, 3 Alive)."""
    from detection.data.coco import load_dataset

    return load_dataset(deepforest_root)


def write_coco(
    folder: Path,
    images: Sequence[tuple[int, int, Sequence[Sequence[float]]]],
    *,
    categories: Sequence[dict[str, Any]] = ({"id": 1, "name": "a"}, {"id": 2, "name": "b"}),
    json_name: str = "annotations.json",
    seed: int = 0,
) -> Path:
    """Write a COCO file with one random RGB PNG per image; returns the JSON path.

    Args:
        folder: created if missing; PNGs ``img<i>.png`` and the JSON go there.
        images: per image ``(width, height, [(x, y, w, h, category_id), ...])``; image ids are 1..N,
            annotation ids 1..M.
        categories: COCO categories as written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [dict(c) for c in categories]}
    for image_id, (width, height, boxes) in enumerate(images, start=1):
        file_name = f"img{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / file_name)
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for x, y, w, h, category_id in boxes:
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
    path = folder / json_name
    path.write_text(json.dumps(coco, indent=1))
    return path


@pytest.fixture
def coco_writer() -> Callable[..., Path]:
    """`write_coco(folder, images, *, categories, json_name, seed) -> json path` (see its docstring)."""
    return write_coco


# ------------------------------------------------------------------------------------ a finished sweep


def tiny_sweep_data(deepforest_root: Path, out: Path, *, num_images: int) -> Path:
    """The first `num_images` annotated DeepForest training tiles as one COCO file, images copied beside it."""
    import shutil

    source = deepforest_root / "train" / "_annotations.coco.json"
    coco = json.loads(source.read_text())
    annotated = sorted({a["image_id"] for a in coco["annotations"]})[:num_images]
    images = [image for image in coco["images"] if image["id"] in annotated]
    out.mkdir(parents=True)
    for image in images:
        shutil.copy(source.parent / image["file_name"], out / image["file_name"])
    subset = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in annotated]}
    path = out / "annotations.json"
    path.write_text(json.dumps(subset))
    return path


def write_tiny_sweep_config(path: Path, *, name: str, data: Path, storage: Path, num_samples: int, epochs: int,
                            image_size: int, held_out_fraction: float = 0.25, score_threshold=None,
                            model: dict | None = None, train: dict | None = None) -> Path:
    """A sweep YAML for the tests' tiny real sweeps: Faster R-CNN/MobileNetV2 without pretrained weights,
    2 folds, one trial at a time, 1 CPU per fold and none for the coordinator (fits a 2-core machine)."""
    import yaml

    config = {
        "name": name, "storage": str(storage), "seed": 0,
        "data": {"path": str(data), "num_folds": 2, "selection_fraction": held_out_fraction,
                 "test_fraction": held_out_fraction, "class_balanced_sampling": False},
        "model": {"arch": "faster_rcnn", "backbone": "mobilenet_v2", "start": "none", **(model or {})},
        "train": {"epochs": epochs, "image_size": image_size, "warmup_epochs": 0, "patience": 0, **(train or {})},
        "search": {"num_samples": num_samples, "max_concurrent_trials": 1,
                   "space": {"lr": {"low": 0.005, "high": 0.02}, "batch_size": [2, 4],
                             **({"score_threshold": {"low": score_threshold[0], "high": score_threshold[1]}}
                                if score_threshold else {})}},
        "resources": {"cpus_per_fold": 1, "gpus_per_fold": 0, "coordinator_cpus": 0},
        "ensemble": {"bootstrap_samples": 50},  # a few seconds; the default 1000 is the product's
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def finished_sweep(deepforest_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment folder of a real tiny sweep, run once per session as `python -m search.cli sweep`
    (real embedded local Ray, real DeepForest tiles, the ensemble job at the end).

    2 trials x 2 folds x 2 epochs of Faster R-CNN/MobileNetV2 (no pretrained weights) at 128 px on 8 tiles
    (2 selection, 2 test, 4 in the folds); score thresholds chosen on the trials' out-of-fold predictions.
    The folder holds everything of docs/INTERFACES.md "Experiment folder": sweep.yaml, split.json,
    optuna.db, tune/trial_<id>/ (result.json, checkpoints with manifest.json), ensemble/<trial_id>.json (and
    greedy.json, test.json),
    leaderboard.csv/.md, best_ensemble.json (+ best_ensemble/); the sweep's console output is in
    `<experiment>/../sweep.log`. Tests must treat the folder as read-only (copy it to change it).
    """
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("finished_sweep")
    data = tiny_sweep_data(deepforest_root, root / "data", num_images=8)
    config_path = write_tiny_sweep_config(root / "sweep.yaml", name="tiny", data=data, storage=root, num_samples=2,
                                          epochs=2, image_size=128, train={"eval_batch_size": 4})
    log = root / "sweep.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "search.cli", "sweep", "--config", str(config_path), "--name", "exp",
             "--no-dashboard"],
            cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT, timeout=900,
        )
    assert done.returncode == 0, log.read_text()[-5000:]
    return root / "exp"
