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
