"""COCO detection data: an index of validated records and a torchvision dataset over it.

`load_dataset` reads a COCO JSON file, or a Roboflow COCO export folder as it comes
(``train/ valid/ test/``, each with ``_annotations.coco.json``), validates it once and returns a
`CocoIndex`: one `ImageRecord` per image with boxes in ``xyxy absolute`` pixels (clipped to the
image, degenerate ones dropped), labels contiguous ``1..C`` and image ids renumbered to a global
``0..N-1`` (Roboflow splits number their images from 0 each, so their ids collide).

`CocoDetection` turns records into what torchvision's detectors expect: a float image ``[3, H, W]``
in ``[0, 1]`` and a target dict (``boxes`` float32 ``[N, 4]`` xyxy absolute, ``labels`` int64 ``[N]``,
``image_id`` int64 scalar, ``area`` float32 ``[N]``, ``iscrowd`` int64 ``[N]``).

Every problem with the input raises `DatasetError` naming the file, the image/annotation id or
key, what was expected and what came.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import VisionDataset
from torchvision.transforms import functional as TF

logger = logging.getLogger(__name__)

ROBOFLOW_SPLITS = ("train", "valid", "test")
ROBOFLOW_ANNOTATIONS = "_annotations.coco.json"
REQUIRED_KEYS = ("images", "annotations", "categories")

# A transform maps (image HWC uint8, boxes [N, 4] xyxy absolute, labels [N]) to the same triple.
TransformFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


class DatasetError(ValueError):
    """Bad detection data; the message names the file, the id or key, what was expected and what came."""


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its validated annotations.

    Attributes:
        image_id: global id ``0..N-1`` within its `CocoIndex` (not the id in the JSON file).
        path: the image file.
        width, height: image size in pixels, as the JSON states it (checked when the image is read).
        boxes: np.float32 ``[M, 4]`` ``xyxy absolute``, clipped to the image, no zero-size boxes.
        labels: np.int64 ``[M]`` contiguous ``1..C``.
        iscrowd: np.int64 ``[M]`` (0 or 1).
        split: ``"train"``/``"valid"``/``"test"`` for a Roboflow folder, else None.
        source: ``"<json file>#<original image id>"`` for messages.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    split: str | None = None
    source: str = ""


@dataclass(frozen=True)
class BoxStats:
    """What `load_dataset` did to the annotations' boxes and images.

    Attributes:
        kept: boxes in the index.
        clipped: kept boxes that reached outside the image and were clipped to it.
        dropped: reason -> boxes left out: "negative width or height" (a bbox [x, y, w, h] with w < 0 or
            h < 0), "zero width or height" (w == 0 or h == 0), "outside the image" (no area left after
            clipping to the image).
        images_filtered: images left out because they have no box (``filter_empty=True``).
    """

    kept: int = 0
    clipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    images_filtered: int = 0


@dataclass(frozen=True, eq=False)
class CocoIndex:
    """All images of a dataset. ``images[i].image_id == i``.

    Label ``i + 1`` is ``class_names[i]`` and COCO category id ``category_ids[i]`` (kept for export).
    """

    images: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    root: Path | None = None
    # What loading did to the annotations (see `BoxStats`); the driver's load summary prints it.
    box_stats: BoxStats = field(default_factory=BoxStats)

    def __post_init__(self) -> None:
        for position, record in enumerate(self.images):
            assert record.image_id == position, "image ids must be renumbered 0..N-1 in order"
        assert len(self.class_names) == len(self.category_ids)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes (labels are ``1..C``)."""
        return len(self.class_names)

    def by_id(self, image_id: int) -> ImageRecord:
        """The record with this global image id."""
        if not 0 <= int(image_id) < len(self.images):
            raise DatasetError(
                f"Image id {image_id} is not in the dataset {self.root}: expected an id in "
                f"[0, {len(self.images) - 1}]."
            )
        return self.images[int(image_id)]

    def records(self, ids: Iterable[int] | None = None) -> list[ImageRecord]:
        """Records for these global ids, in the given order (all records when ids is None)."""
        if ids is None:
            return list(self.images)
        return [self.by_id(i) for i in ids]

    def category_id(self, label: int) -> int:
        """The original COCO category id of a contiguous label ``1..C``."""
        if not 1 <= int(label) <= len(self.category_ids):
            raise ValueError(f"`1 <= label <= {len(self.category_ids)}` must hold, but got ({label=}).")
        return self.category_ids[int(label) - 1]

    def summary(self) -> dict[str, Any]:
        """Counts for reports: images and boxes in all, per split and per class."""
        boxes_per_class = Counter()
        images_per_class = Counter()
        images_per_split = Counter()
        for record in self.images:
            images_per_split[record.split or "all"] += 1
            for label, count in zip(*np.unique(record.labels, return_counts=True)):
                boxes_per_class[self.class_names[label - 1]] += int(count)
                images_per_class[self.class_names[label - 1]] += 1
        return {
            "images": len(self.images),
            "boxes": sum(len(r.boxes) for r in self.images),
            "images_per_split": dict(images_per_split),
            "boxes_per_class": {name: boxes_per_class[name] for name in self.class_names},
            "images_per_class": {name: images_per_class[name] for name in self.class_names},
        }


@dataclass
class _CocoFile:
    """One parsed JSON file before categories are merged."""

    path: Path
    display: str  # the name used in `ImageRecord.source`
    split: str | None
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    image_ids: set[int] = field(default_factory=set)


def load_dataset(path: str | Path, *, filter_empty: bool = True) -> CocoIndex:
    """Read and validate a COCO detection dataset.

    Args:
        path: a COCO ``.json`` file (image ``file_name`` is relative to its folder), or a Roboflow
            export folder with ``train/``, ``valid/`` and/or ``test/`` each holding
            ``_annotations.coco.json`` (merged; `ImageRecord.split` says where each image came from).
            A folder holding ``_annotations.coco.json`` itself is read as one file.
        filter_empty: drop images that have no boxes left after validation.

    Categories that are the supercategory of another category and have no annotations are dropped
    (Roboflow adds the dataset name as such a category, usually with id 0). The others, sorted by
    COCO id, become labels ``1..C``.

    Raises:
        DatasetError: on any malformed input, and when no image is left.
    """
    path = Path(path)
    files = [_read_coco_file(p, display, split) for p, display, split in _find_files(path)]
    categories = _merge_categories(files)
    category_ids = tuple(sorted(categories))
    label_of = {category_id: label for label, category_id in enumerate(category_ids, start=1)}
    class_names = tuple(categories[c]["name"] for c in category_ids)

    records: list[ImageRecord] = []
    dropped: Counter[str] = Counter()
    num_clipped = num_empty = 0
    for coco_file in files:
        file_records, file_dropped, clipped = _build_records(coco_file, label_of)
        dropped.update(file_dropped)
        num_clipped += clipped
        for record in file_records:
            if filter_empty and len(record.boxes) == 0:
                num_empty += 1
                continue
            records.append(record)
    if dropped:
        logger.warning("%s: dropped %d boxes (%s).", path, sum(dropped.values()),
                    ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())))
    if num_empty:
        logger.info("%s: filtered %d images without annotations (filter_empty=True).", path, num_empty)

    num_source_images = sum(len(f.images) for f in files)
    if num_source_images == 0:
        raise DatasetError(f"{path}: the dataset has no images; expected at least one entry in 'images'.")
    if not records:
        raise DatasetError(
            f"{path}: all {num_source_images} images were filtered out because none has a valid box; "
            "expected at least one annotated image (or pass filter_empty=False)."
        )
    # Renumber to global ids 0..N-1: Roboflow splits each number their images from 0.
    images = tuple(_renumber(record, new_id) for new_id, record in enumerate(records))
    box_stats = BoxStats(kept=sum(len(r.boxes) for r in images), clipped=num_clipped,
                         dropped=dict(sorted(dropped.items())), images_filtered=num_empty)
    return CocoIndex(images=images, class_names=class_names, category_ids=category_ids,
                     root=path if path.is_dir() else path.parent, box_stats=box_stats)


def _find_files(path: Path) -> list[tuple[Path, str, str | None]]:
    """(json path, display name, split) for a .json file or a Roboflow export folder."""
    if path.is_file():
        return [(path, path.name, None)]
    if not path.is_dir():
        raise DatasetError(f"{path}: expected a COCO .json file or a Roboflow export folder, but it does not exist.")
    found = [
        (path / split / ROBOFLOW_ANNOTATIONS, f"{split}/{ROBOFLOW_ANNOTATIONS}", split)
        for split in ROBOFLOW_SPLITS
        if (path / split / ROBOFLOW_ANNOTATIONS).is_file()
    ]
    if found:
        return found
    if (path / ROBOFLOW_ANNOTATIONS).is_file():
        return [(path / ROBOFLOW_ANNOTATIONS, ROBOFLOW_ANNOTATIONS, None)]
    raise DatasetError(
        f"{path}: expected a Roboflow export folder with train/, valid/ or test/ each holding "
        f"{ROBOFLOW_ANNOTATIONS}, but found none of them."
    )


def _read_coco_file(path: Path, display: str, split: str | None) -> _CocoFile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the annotation file as UTF-8 text ({error}).") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}."
        ) from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, but got {type(data).__name__}.")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(
            f"{path}: missing top-level key(s) {missing}; a COCO detection file needs {list(REQUIRED_KEYS)}, "
            f"but got keys {sorted(data)}."
        )
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: top-level key '{key}' must be a list, but got {type(data[key]).__name__}.")
    coco_file = _CocoFile(path, display, split, data["images"], data["annotations"], data["categories"])
    for position, image in enumerate(coco_file.images):
        _require_keys(path, f"images[{position}]", image, ("id", "file_name", "width", "height"))
        image_id = image["id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise DatasetError(f"{path}: images[{position}]: 'id' must be an integer id, but got {image_id!r}.")
        if image_id in coco_file.image_ids:
            raise DatasetError(f"{path}: image id {image_id} appears more than once in 'images'; ids must be unique.")
        coco_file.image_ids.add(image_id)
        for key in ("width", "height"):
            value = image[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value != int(value):
                raise DatasetError(f"{path}: image id {image_id}: '{key}' must be a positive integer, but got {value!r}.")
    for position, category in enumerate(coco_file.categories):
        _require_keys(path, f"categories[{position}]", category, ("id", "name"))
    for position, annotation in enumerate(coco_file.annotations):
        _require_keys(path, f"annotations[{position}]", annotation, ("image_id", "category_id", "bbox"))
        for key in ("image_id", "category_id"):
            value = annotation[key]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise DatasetError(
                    f"{path}: annotation id {annotation.get('id', '?')}: '{key}' must be an integer id, but got {value!r}."
                )
    return coco_file


def _require_keys(path: Path, where: str, entry: Any, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: {where} must be a JSON object, but got {type(entry).__name__}.")
    missing = [key for key in keys if key not in entry]
    if missing:
        ident = f" (id {entry['id']})" if "id" in entry else ""
        raise DatasetError(f"{path}: {where}{ident} is missing key(s) {missing}; expected {list(keys)}.")


def _merge_categories(files: list[_CocoFile]) -> dict[int, dict[str, Any]]:
    """Union of the files' categories by id, minus unused supercategories (Roboflow's dataset name)."""
    categories: dict[int, dict[str, Any]] = {}
    defined_in: dict[int, Path] = {}
    for coco_file in files:
        for category in coco_file.categories:
            category_id = category["id"]
            if isinstance(category_id, bool) or not isinstance(category_id, int):
                raise DatasetError(f"{coco_file.path}: category id {category_id!r} must be an integer.")
            known = categories.get(category_id)
            if known is not None and known["name"] != category["name"]:
                raise DatasetError(
                    f"{coco_file.path}: category id {category_id} is named {category['name']!r}, but "
                    f"{defined_in[category_id]} names it {known['name']!r}; expected the same categories in every split."
                )
            categories.setdefault(category_id, category)
            defined_in.setdefault(category_id, coco_file.path)
    used = Counter(a["category_id"] for f in files for a in f.annotations)
    # COCO's own files name a category its own supercategory ("person"/"person"): that is no parent.
    parent_names = {c.get("supercategory") for c in categories.values() if c.get("supercategory") != c["name"]}
    unused_parents = {cid for cid, c in categories.items() if used[cid] == 0 and c["name"] in parent_names}
    for cid in sorted(unused_parents):
        logger.info("Dropping category id %d (%r): it is the supercategory of others and has no annotations.",
                    cid, categories[cid]["name"])
    kept = {cid: c for cid, c in categories.items() if cid not in unused_parents}
    if not kept:
        where = ", ".join(str(f.path) for f in files)
        raise DatasetError(f"{where}: no categories; expected at least one entry in 'categories'.")
    return kept


def _build_records(coco_file: _CocoFile, label_of: dict[int, int]) -> tuple[list[ImageRecord], Counter[str], int]:
    """Records with validated, clipped boxes (image ids still the file's); returns them, the dropped boxes
    per reason (see `BoxStats.dropped`) and the number of kept boxes that were clipped."""
    path = coco_file.path
    images = {image["id"]: image for image in coco_file.images}
    per_image: dict[Any, list[tuple[list[float], int, int]]] = defaultdict(list)
    for annotation in coco_file.annotations:
        ann_id = annotation.get("id", "?")
        image_id, category_id, bbox = annotation["image_id"], annotation["category_id"], annotation["bbox"]
        if image_id not in images:
            raise DatasetError(
                f"{path}: annotation id {ann_id}: image_id {image_id!r} does not exist; expected one of the "
                f"{len(images)} ids in 'images'."
            )
        if category_id not in label_of:
            raise DatasetError(
                f"{path}: annotation id {ann_id}: category_id {category_id!r} does not exist; expected one of "
                f"{sorted(label_of)}."
            )
        if (
            not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            raise DatasetError(
                f"{path}: annotation id {ann_id}: 'bbox' must be 4 finite numbers [x, y, width, height], "
                f"but got {bbox!r}."
            )
        per_image[image_id].append((bbox, label_of[category_id], int(bool(annotation.get("iscrowd", 0)))))

    records, dropped, clipped = [], Counter(), 0
    for image_id, image in images.items():
        file_name = str(image["file_name"])
        image_path = path.parent / file_name
        if not image_path.is_file():
            raise DatasetError(
                f"{path}: image id {image_id}: file {image_path} does not exist; expected 'file_name' "
                f"{file_name!r} relative to {path.parent}."
            )
        width, height = int(image["width"]), int(image["height"])
        entries = per_image.get(image_id, [])
        xywh = np.array([e[0] for e in entries], dtype=np.float64).reshape(-1, 4)
        # COCO [x, y, w, h] -> xyxy absolute, clipped to the image.
        unclipped = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = unclipped.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        negative = (xywh[:, 2:] < 0).any(axis=1)
        zero = ~negative & (xywh[:, 2:] == 0).any(axis=1)
        dropped.update({"negative width or height": int(negative.sum()), "zero width or height": int(zero.sum()),
                        "outside the image": int((~keep & ~negative & ~zero).sum())})
        clipped += int((keep & (boxes != unclipped).any(axis=1)).sum())
        records.append(ImageRecord(
            image_id=-1,
            path=image_path,
            width=width,
            height=height,
            boxes=boxes[keep].astype(np.float32),
            labels=np.array([e[1] for e in entries], dtype=np.int64).reshape(-1)[keep],
            iscrowd=np.array([e[2] for e in entries], dtype=np.int64).reshape(-1)[keep],
            split=coco_file.split,
            source=f"{coco_file.display}#{image_id}",
        ))
    return records, +dropped, clipped  # unary + drops the zero counts


def _renumber(record: ImageRecord, image_id: int) -> ImageRecord:
    return ImageRecord(image_id, record.path, record.width, record.height, record.boxes, record.labels,
                       record.iscrowd, record.split, record.source)


def read_image(record: ImageRecord) -> np.ndarray:
    """The record's image as np.uint8 ``[H, W, 3]`` RGB.

    Raises:
        DatasetError: when the file is missing, cannot be decoded, or its size differs from the JSON.
    """
    try:
        with Image.open(record.path) as image:
            image.load()
            size = image.size
            array = np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only arrays
    except FileNotFoundError as error:
        raise DatasetError(f"{record.source}: image file {record.path} does not exist.") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"{record.source}: cannot decode image file {record.path}; expected a readable image ({error})."
        ) from error
    if size != (record.width, record.height):
        raise DatasetError(
            f"{record.source}: image file {record.path} is {size[0]}x{size[1]} (WxH), but the annotation file "
            f"says {record.width}x{record.height}."
        )
    return array


class CocoDetection(VisionDataset):
    """A torchvision detection dataset over (a subset of) a `CocoIndex`.

    ``dataset[i]`` is ``(image, target)``: image float32 ``[3, H, W]`` in ``[0, 1]``; target
    ``boxes`` float32 ``[N, 4]`` ``xyxy absolute``, ``labels`` int64 ``[N]`` in ``1..C``, ``image_id``
    int64 scalar (the global id), ``area`` float32 ``[N]`` (of the boxes as returned), ``iscrowd``
    int64 ``[N]``. An image without boxes yields ``boxes`` of shape ``[0, 4]``.

    Args:
        index: the validated dataset.
        image_ids: global ids of the images to serve, in order (all when None).
        transforms: ``(image HWC uint8, boxes [N, 4] xyxy absolute, labels [N]) -> same triple``
            (see `detection.data.transforms`). It may be replaced between epochs (progressive
            resizing). The dataset passes box indices as the labels so that labels and iscrowd both
            follow the boxes a transform keeps.
        drop_crowd: leave crowd boxes (iscrowd=1) out of the targets: training ignores them, as the
            metrics do (a detector would otherwise learn them as ordinary objects).
    """

    def __init__(
        self,
        index: CocoIndex,
        image_ids: Iterable[int] | None = None,
        transforms: TransformFn | None = None,
        *,
        drop_crowd: bool = False,
    ) -> None:
        super().__init__(root=index.root, transforms=transforms)
        self.index = index
        self.drop_crowd = drop_crowd
        self.ids: tuple[int, ...] = (
            tuple(range(len(index))) if image_ids is None else tuple(int(i) for i in image_ids)
        )
        for image_id in self.ids:
            index.by_id(image_id)  # fail now, not in a worker mid-epoch

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, i: int) -> ImageRecord:
        """The record behind ``self[i]``."""
        return self.index.by_id(self.ids[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.record(i)
        image = read_image(record)  # [H, W, 3] uint8
        boxes, labels, iscrowd = record.boxes, record.labels, record.iscrowd
        if self.drop_crowd and iscrowd.any():
            keep = iscrowd == 0
            boxes, labels, iscrowd = boxes[keep], labels[keep], iscrowd[keep]
        if self.transforms is not None:
            image, boxes, kept = self.transforms(image, boxes, np.arange(len(boxes), dtype=np.int64))
            kept = np.asarray(kept, dtype=np.int64).reshape(-1)
            labels, iscrowd = labels[kept], iscrowd[kept]
        boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))  # [N, 4] xyxy absolute
        target = {
            "boxes": boxes_t,
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
            "iscrowd": torch.as_tensor(iscrowd, dtype=torch.int64),
        }
        return TF.to_tensor(np.ascontiguousarray(image)), target  # [3, H, W] float in [0, 1]

    def extra_repr(self) -> str:
        return f"Images: {len(self.ids)} of {len(self.index)}\nClasses: {list(self.index.class_names)}"


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Batch for torchvision detectors: images of different sizes stay a list."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
