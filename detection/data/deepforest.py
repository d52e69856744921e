"""The DeepForest tree-crown photos as a Roboflow-style COCO dataset (the embedded default data).

The ``deepforest`` package (MIT) ships four real aerial RGB photos from NEON with hand-drawn
boxes in VOC XML beside them (classes Tree, Dead, Alive). `write_deepforest_coco` cuts them into
square tiles and writes ``out_dir/{train,valid,test}/_annotations.coco.json`` plus the tile PNGs,
as a Roboflow COCO export looks (including its unused dataset-name category with id 0).

The package is only read as files: ``import deepforest`` would pull in pytorch_lightning and more.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detection.data.coco import ROBOFLOW_ANNOTATIONS, ROBOFLOW_SPLITS, DatasetError

logger = logging.getLogger(__name__)

PACKAGE = "deepforest"
INSTALL_HINT = "pip install --no-deps deepforest==2.1.0"
CLASSES = ("Tree", "Dead", "Alive")  # the <name>s in the package's VOC XML, in this label order
DATASET_NAME = "deepforest-trees"  # Roboflow-style unused supercategory (category id 0)
MIN_INSIDE = 0.9  # a box belongs to a tile when at least this share of its area lies inside
MIN_EDGE_STRIP = 0.25  # an edge strip narrower than this share of a tile is left out (mostly padding)
VALID_FRACTION = 0.15
TEST_FRACTION = 0.15


class DeepForestNotInstalledError(ModuleNotFoundError):
    """The ``deepforest`` package, which holds the photos, is not installed."""


@dataclass(frozen=True)
class _Tile:
    file_name: str
    image: np.ndarray  # [tile, tile, 3] uint8, zero-padded past the photo's edge
    boxes: np.ndarray  # [M, 4] xyxy absolute in the tile
    labels: list[str]


def deepforest_data_dir(package: str = PACKAGE) -> Path:
    """The ``data/`` folder of the installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DeepForestNotInstalledError(
            f"The DeepForest photos come from the `{package}` package, which is not installed; "
            f"run `{INSTALL_HINT}` (no dependencies needed: its files are read, never imported).",
            name=package,
        )
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not data_dir.is_dir():
        raise DeepForestNotInstalledError(f"{data_dir}: expected the package's data folder; reinstall with `{INSTALL_HINT}`.",
                                          name=package)
    return data_dir


def read_voc(xml_path: Path) -> tuple[Path, np.ndarray, list[str]]:
    """The .png beside a VOC XML (same stem), its boxes float64 ``[M, 4]`` xyxy absolute and class names.

    The XML's <filename> is not used: OSBS_029.xml names a .tif whose pixels the .png holds too.
    """
    image_path = xml_path.with_suffix(".png")
    if not image_path.is_file():
        raise DatasetError(f"{xml_path}: expected the image {image_path.name} beside it, but it does not exist.")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise DatasetError(f"{xml_path}: malformed XML ({error}).") from error
    boxes, labels = [], []
    for position, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES:
            raise DatasetError(f"{xml_path}: object {position} has class {name!r}; expected one of {list(CLASSES)}.")
        box = obj.find("bndbox")
        try:
            boxes.append([float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax")])
        except (AttributeError, TypeError, ValueError) as error:
            raise DatasetError(f"{xml_path}: object {position} needs numeric xmin, ymin, xmax, ymax ({error}).") from error
        labels.append(name)
    return image_path, np.array(boxes, dtype=np.float64).reshape(-1, 4), labels


def tile_origins(length: int, tile_size: int) -> list[int]:
    """Non-overlapping tile starts along one axis.

    The last tile may reach past the edge (it is zero-padded) unless the strip it would cover is
    narrower than `MIN_EDGE_STRIP` of a tile; a photo shorter than one tile gives one padded tile.
    """
    starts = list(range(0, length, tile_size))
    if len(starts) > 1 and length - starts[-1] < MIN_EDGE_STRIP * tile_size:
        starts.pop()
    return starts


def cut_tiles(image: np.ndarray, boxes: np.ndarray, labels: list[str], *, stem: str, tile_size: int) -> list[_Tile]:
    """Non-overlapping ``tile_size`` squares of an ``[H, W, 3]`` photo with the boxes that belong to each.

    A box belongs to a tile when at least `MIN_INSIDE` of its area lies in the tile's part of the
    photo; it is clipped to that part. Tiles cut past the photo's edge are zero-padded, so all tiles
    are full size and no box is in two tiles (no leak between splits); see `tile_origins` for thin
    edge strips. Tiles without boxes are skipped.
    """
    height, width = image.shape[:2]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    tiles = []
    for y0 in tile_origins(height, tile_size):
        for x0 in tile_origins(width, tile_size):
            x1, y1 = min(x0 + tile_size, width), min(y0 + tile_size, height)
            clipped = boxes.copy()
            clipped[:, 0::2] = clipped[:, 0::2].clip(x0, x1)
            clipped[:, 1::2] = clipped[:, 1::2].clip(y0, y1)
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = inside >= MIN_INSIDE * areas
            if not keep.any():
                continue
            pixels = np.zeros((tile_size, tile_size, 3), dtype=np.uint8)
            pixels[: y1 - y0, : x1 - x0] = image[y0:y1, x0:x1]
            tiles.append(_Tile(
                file_name=f"{stem}_x{x0}_y{y0}.png",
                image=pixels,
                boxes=clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64),
                labels=[label for label, k in zip(labels, keep) if k],
            ))
    return tiles


def _assign_splits(tiles: list[_Tile], seed: int) -> list[str]:
    """Seeded train/valid/test per tile; tiles holding the rarest class (Alive) always go to train."""
    boxes_per_class = Counter(label for tile in tiles for label in tile.labels)
    rarest = min(boxes_per_class, key=lambda name: (boxes_per_class[name], name))
    splits = ["train"] * len(tiles)
    free = [i for i, tile in enumerate(tiles) if rarest not in tile.labels]
    order = np.random.default_rng(seed).permutation(free)
    num_test = int(round(TEST_FRACTION * len(tiles)))
    num_valid = int(round(VALID_FRACTION * len(tiles)))
    for position, i in enumerate(order.tolist()):
        if position < num_test:
            splits[i] = "test"
        elif position < num_test + num_valid:
            splits[i] = "valid"
    return splits


def write_deepforest_coco(out_dir: str | Path, *, tile_size: int = 400, seed: int = 0) -> Path:
    """Write the DeepForest photos as a Roboflow-style COCO dataset; returns ``out_dir``.

    Layout: ``out_dir/{train,valid,test}/_annotations.coco.json`` with the tile PNGs beside each,
    and ``out_dir/README.dataset.txt`` with the source and the counts. Categories: 0 the unused
    dataset name (as Roboflow writes it), 1 Tree, 2 Dead, 3 Alive. About 15% of the tiles go to
    valid and 15% to test (seeded); the tile with the rare Alive class stays in train.
    With ``tile_size=400``: 56 tiles, 757 boxes (`load_dataset(out_dir).summary()` has the counts).

    Raises:
        DeepForestNotInstalledError: the ``deepforest`` package is missing (names the pip command).
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 32:
        raise ValueError(f"`tile_size >= 32` must hold for an integer tile_size, but got ({tile_size=}).")
    data_dir = deepforest_data_dir()
    xml_paths = sorted(data_dir.glob("*.xml"))
    if not xml_paths:
        raise DatasetError(f"{data_dir}: expected VOC XML files beside the photos; reinstall with `{INSTALL_HINT}`.")
    tiles: list[_Tile] = []
    for xml_path in xml_paths:
        image_path, boxes, labels = read_voc(xml_path)
        with Image.open(image_path) as photo:
            pixels = np.asarray(photo.convert("RGB"))
        tiles += cut_tiles(pixels, boxes, labels, stem=image_path.stem, tile_size=tile_size)
    splits = _assign_splits(tiles, seed)

    out_dir = Path(out_dir)
    categories = [{"id": 0, "name": DATASET_NAME, "supercategory": "none"}] + [
        {"id": i, "name": name, "supercategory": DATASET_NAME} for i, name in enumerate(CLASSES, start=1)
    ]
    category_id = {name: i for i, name in enumerate(CLASSES, start=1)}
    counts: dict[str, Counter] = {}
    for split in ROBOFLOW_SPLITS:
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for tile, tile_split in zip(tiles, splits):
            if tile_split != split:
                continue
            image_id = len(images)  # Roboflow numbers each split from 0
            Image.fromarray(tile.image).save(split_dir / tile.file_name, compress_level=1)  # fast; still lossless
            images.append({"id": image_id, "license": 1, "file_name": tile.file_name,
                           "height": tile_size, "width": tile_size, "date_captured": "2019-01-01T00:00:00+00:00"})
            for box, label in zip(tile.boxes, tile.labels):
                x, y, w, h = float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({"id": len(annotations), "image_id": image_id, "category_id": category_id[label],
                                    "bbox": [x, y, w, h], "area": w * h, "segmentation": [], "iscrowd": 0})
        coco = {
            "info": {"description": f"DeepForest NEON tree crowns, {tile_size}px tiles (seed {seed})",
                     "url": "https://github.com/weecology/DeepForest", "version": "2.1.0"},
            "licenses": [{"id": 1, "name": "MIT", "url": "https://opensource.org/licenses/MIT"}],
            "categories": categories,
            "images": images,
            "annotations": annotations,
        }
        (split_dir / ROBOFLOW_ANNOTATIONS).write_text(json.dumps(coco))
        counts[split] = Counter({"images": len(images), "boxes": len(annotations)})
        counts[split].update(a_label for tile, s in zip(tiles, splits) if s == split for a_label in tile.labels)
    summary = "\n".join(
        f"{split}: {c['images']} images, {c['boxes']} boxes (" + ", ".join(f"{n} {c[n]}" for n in CLASSES) + ")"
        for split, c in counts.items()
    )
    (out_dir / "README.dataset.txt").write_text(
        "DeepForest tree crowns (NEON aerial RGB, hand-drawn boxes), from the deepforest 2.1.0 package (MIT).\n"
        f"Photos cut into {tile_size}x{tile_size} tiles (zero-padded at the edges); a box belongs to a tile\n"
        f"when {MIN_INSIDE:.0%} of its area lies inside. Split seed {seed}.\n\n{summary}\n"
    )
    logger.info("Wrote DeepForest COCO dataset to %s:\n%s", out_dir, summary)
    return out_dir
