"""Check every image of a dataset before any training: one bad file costs one check, not N trials x K folds.

`verify_images` looks at each record's file once and says which ones a fold worker would fail on:

- ``"header"`` (the default, `data.verify`): the file exists and is not empty, PIL identifies it from its
  header (no decode), the size in the header equals the annotation's ``width x height``, and a JPEG ends
  with its end-of-image marker (``FF D9``) or a PNG with its ``IEND`` chunk. A truncated file shows at its
  end; a file whose marker is missing is decoded whole before it is called bad (a JPEG may carry data after
  its EOI, e.g. a phone's motion photo).
- ``"decode"``: the header check plus a full decode of every file, for formats without an end marker
  (WebP, BMP, TIFF, ...).

What a file's check finds (`FileFacts`: its size in pixels, format and problem) does not depend on the
annotation file, so it is cached per file keyed by (path, size in bytes, mtime): a second sweep, a resume
or `detsweep data check` on the same data reads a JSON file and stats every image instead. The check runs
in a pool of processes over the machine's cores and shows a tqdm progress bar for large datasets.

`summarize` + `format_summary` give the load-time line the driver prints (images, images without boxes,
boxes kept / clipped / dropped with reasons, bad files); `bad_images_error` is the one `DatasetError` that
lists every bad file.

Plain Python + PIL: no torch, no Ray (the check runs in the driver before Ray starts).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from detection.data.coco import CocoIndex, DatasetError, ImageRecord
from detection.files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FILE",
    "VERIFY_MODES",
    "BadImage",
    "FileFacts",
    "VerifyReport",
    "bad_images_error",
    "default_cache_path",
    "format_summary",
    "inspect_file",
    "summarize",
    "verify_images",
]

VERIFY_MODES = ("header", "decode")
CACHE_FILE = ".detsweep-verify.json"  # beside the dataset (or in the experiment when the dataset is read-only)
CACHE_VERSION = 1
JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its CRC, the last 8 bytes of a PNG
TAIL_BYTES = 64  # read from a file's end to find its end marker (padding after it is allowed)
PROGRESS_MIN = 2000  # a progress bar from this many files to check
PARALLEL_MIN = 200  # fewer files are checked in this process (a pool costs more than it saves)
CHUNK = 64  # files per pool task


@dataclass(frozen=True)
class FileFacts:
    """What checking one file found; independent of any annotation file, so it can be cached.

    Attributes:
        size, mtime_ns: the file's size in bytes and modification time when it was checked (the cache key).
        width, height: the image size from its header (None when unreadable).
        format: PIL's format name ("JPEG", "PNG", ...), None when unreadable.
        problem: why the file cannot be used ("is truncated: ...", "is empty (0 bytes)", ...), None if it can.
        decoded: a full decode succeeded (so a `decode` check needs nothing more).
    """

    size: int
    mtime_ns: int
    width: int | None = None
    height: int | None = None
    format: str | None = None
    problem: str | None = None
    decoded: bool = False


@dataclass(frozen=True)
class BadImage:
    """One image a fold worker would fail on: its global id, file, where the JSON names it, and why."""

    image_id: int
    file: str
    source: str  # "train/_annotations.coco.json#12": the annotation file and the image's id in it
    reason: str

    def describe(self) -> str:
        return f"{self.source}: image id {self.image_id}: {self.file} {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify_images`: bad images (in image id order) and what the check cost."""

    mode: str
    images: int  # images checked in all
    inspected: int  # files opened now
    cached: int  # files answered from the cache
    seconds: float
    bad: tuple[BadImage, ...] = ()

    @property
    def excluded(self) -> dict[int, str]:
        """image id -> reason, for `detection.data.splits.make_split(exclude=...)`."""
        return {b.image_id: b.reason for b in self.bad}


# ----------------------------------------------------------------------------------------- one file


def inspect_file(path: str | Path, *, decode: bool = False, stat: os.stat_result | None = None) -> FileFacts:
    """Check one image file (see the module docstring); never raises for a bad file.

    Args:
        path: the image file.
        decode: decode it whole (``data.verify: decode``); else only when its end marker is missing.
        stat: its `os.stat` result when the caller has it already.
    """
    path = Path(path)
    try:
        stat = stat or path.stat()
    except FileNotFoundError:
        return FileFacts(size=-1, mtime_ns=-1, problem="does not exist")
    except OSError as error:
        return FileFacts(size=-1, mtime_ns=-1, problem=f"cannot be read ({error.strerror or error})")
    facts = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if stat.st_size == 0:
        return FileFacts(**facts, problem="is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            fmt = image.format
            facts.update(width=width, height=height, format=fmt)
            marker = {"JPEG": JPEG_EOI, "PNG": PNG_IEND}.get(fmt)
            has_marker = marker is None or marker in _tail(path, stat.st_size)
            if decode or not has_marker:
                try:
                    image.load()
                except (OSError, SyntaxError, ValueError) as error:
                    missing = "" if has_marker else f"no {fmt} end marker ({'EOI' if fmt == 'JPEG' else 'IEND'}) and "
                    kind = "is truncated" if not has_marker or "truncated" in str(error) else "cannot be decoded"
                    return FileFacts(**facts, problem=f"{kind}: {missing}decoding it fails ({error})")
                facts["decoded"] = True
    except UnidentifiedImageError:
        return FileFacts(**facts, problem=f"is not an image PIL can identify ({stat.st_size} bytes)")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return FileFacts(**facts, problem=f"cannot be read as an image ({error})")
    return FileFacts(**facts)


def _tail(path: Path, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        return handle.read()


def _inspect_chunk(paths: Sequence[str], decode: bool) -> list[FileFacts]:
    return [inspect_file(p, decode=decode) for p in paths]


def image_problem(record: ImageRecord, facts: FileFacts) -> str | None:
    """Why the record's file is bad, given what its check found; None when it is good."""
    if facts.problem is not None:
        return facts.problem
    if (facts.width, facts.height) != (record.width, record.height):
        return (f"is {facts.width}x{facts.height} (WxH), but the annotation file says "
                f"{record.width}x{record.height}")
    return None


# ------------------------------------------------------------------------------------------ dataset


def default_cache_path(dataset_root: str | Path, fallback_dir: str | Path | None = None) -> Path:
    """`<dataset root>/.detsweep-verify.json` when that folder is writable (every sweep and resume on the
    data shares it), else `<fallback_dir>/.detsweep-verify.json` (e.g. the experiment folder)."""
    root = Path(dataset_root)
    if os.access(root, os.W_OK) or fallback_dir is None:
        return root / CACHE_FILE
    return Path(fallback_dir) / CACHE_FILE


def verify_images(
    records: Iterable[ImageRecord],
    *,
    mode: str = "header",
    cache_path: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> VerifyReport:
    """Check the files of `records` (see the module docstring) and report the bad ones.

    Args:
        records: the images to check (e.g. ``index.images``).
        mode: "header" or "decode" (`data.verify`).
        cache_path: JSON file of earlier checks, read and updated (None: no cache).
        workers: processes to check in; default the CPUs this process may use.
        progress: a tqdm bar (on stderr) when at least `PROGRESS_MIN` files need a check.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"`mode` must be one of {list(VERIFY_MODES)}, but got {mode!r}.")
    started = time.perf_counter()
    records = list(records)
    cache = _read_cache(cache_path) if cache_path is not None else {}
    facts: dict[str, FileFacts] = {}
    todo: list[str] = []
    for path in dict.fromkeys(str(r.path) for r in records):  # each file once, in order
        known = cache.get(path)
        try:
            stat = os.stat(path)
        except OSError:
            todo.append(path)  # inspect_file says why
            continue
        if (known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
                and (mode == "header" or known.decoded or known.problem is not None)):
            facts[path] = known
        else:
            todo.append(path)
    facts.update(zip(todo, _inspect_all(todo, decode=mode == "decode", workers=workers, progress=progress)))
    if cache_path is not None and todo:
        cache.update({p: f for p in todo if (f := facts[p]).size >= 0})
        _write_cache(cache_path, cache)
    bad = []
    for record in records:
        problem = image_problem(record, facts[str(record.path)])
        if problem is not None:
            bad.append(BadImage(image_id=record.image_id, file=str(record.path), source=record.source, reason=problem))
    return VerifyReport(mode=mode, images=len(records), inspected=len(todo), cached=len(facts) - len(todo),
                        seconds=time.perf_counter() - started, bad=tuple(bad))


def _inspect_all(paths: list[str], *, decode: bool, workers: int | None, progress: bool) -> list[FileFacts]:
    workers = workers or _available_cpus()
    bar = tqdm(total=len(paths), desc=f"checking images ({'decode' if decode else 'header'})", unit="img",
               disable=not progress or len(paths) < PROGRESS_MIN)
    with bar:
        if workers < 2 or len(paths) < PARALLEL_MIN:
            out = []
            for path in paths:
                out.append(inspect_file(path, decode=decode))
                bar.update()
            return out
        chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
        # fork: the workers need only PIL, not a fresh interpreter importing torch (spawn/forkserver).
        context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        out = []
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
            for chunk_facts in pool.map(_inspect_chunk, chunks, [decode] * len(chunks)):
                out.extend(chunk_facts)
                bar.update(len(chunk_facts))
        return out


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _read_cache(path: str | Path) -> dict[str, FileFacts]:
    """{file: FileFacts} from a cache file; a missing, unreadable or older-format file is an empty cache."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION:
            return {}
        return {file: FileFacts(*entry) for file, entry in data["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_cache(path: str | Path, cache: Mapping[str, FileFacts]) -> None:
    """Write the cache atomically; a cache that cannot be written is only logged (the check stands)."""
    path = Path(path)
    fields = list(FileFacts.__dataclass_fields__)
    payload = {"version": CACHE_VERSION, "fields": fields,
               "files": {file: [getattr(f, name) for name in fields] for file, f in cache.items()}}
    try:
        atomic_write_text(path, json.dumps(payload, separators=(",", ":")))
    except OSError as error:
        logger.warning("Cannot write the image check cache %s (%s); the next check reads every file again.",
                       path, error)


# ------------------------------------------------------------------------------------------ summary


def summarize(index: CocoIndex, report: VerifyReport | None = None, *, path: str | Path | None = None) -> dict[str, Any]:
    """The load-time figures (JSON-ready): images, images without boxes, boxes kept / clipped / dropped per
    reason, images left out as empty, and the bad files with the check's mode and cost."""
    stats = index.box_stats
    summary: dict[str, Any] = {
        "path": str(path if path is not None else index.root),
        "images": len(index),
        "images_without_boxes": sum(1 for r in index.images if len(r.boxes) == 0),
        "images_filtered_empty": stats.images_filtered,
        "boxes_kept": stats.kept,
        "boxes_clipped": stats.clipped,
        "boxes_dropped": dict(stats.dropped),
    }
    if report is not None:
        summary.update(verify=report.mode, checked_now=report.inspected, checked_cached=report.cached,
                       check_seconds=round(report.seconds, 3),
                       bad_images=[asdict(b) for b in report.bad])
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line of `summarize`'s figures, e.g. ``data/x: 45 images (2 without boxes), 810 boxes kept (3 clipped
    to the image), 1 dropped (1 negative width or height), 0 bad image files (header check: 45 read, 0 cached)``."""
    dropped = summary["boxes_dropped"]
    parts = [f"{summary['images']} images ({summary['images_without_boxes']} without boxes"
             + (f", {summary['images_filtered_empty']} more left out as empty" if summary["images_filtered_empty"] else "")
             + ")",
             f"{summary['boxes_kept']} boxes kept ({summary['boxes_clipped']} clipped to the image)",
             f"{sum(dropped.values())} dropped"
             + (" (" + ", ".join(f"{n} {reason}" for reason, n in dropped.items()) + ")" if dropped else "")]
    if "bad_images" in summary:
        parts.append(f"{len(summary['bad_images'])} bad image files ({summary['verify']} check: "
                     f"{summary['checked_now']} read, {summary['checked_cached']} cached, "
                     f"{summary['check_seconds']:.2f} s)")
    return f"{summary['path']}: " + ", ".join(parts)


def bad_images_error(report: VerifyReport, *, dataset: str | Path) -> DatasetError:
    """One error that lists every bad file with its reason (`data.on_bad_image: error`)."""
    lines = "\n".join(f"  {b.describe()}" for b in report.bad)
    return DatasetError(
        f"{dataset}: {len(report.bad)} of {report.images} image files are bad ({report.mode} check); expected "
        f"every image readable and of the size its annotation file states:\n{lines}\n"
        "Fix or remove these files, or set `data.on_bad_image: skip` to leave them out of the split."
    )


# ------------------------------------------------------------------------------------ before a sweep


def check_dataset(
    index: CocoIndex,
    *,
    mode: str,
    on_bad_image: str,
    cache_path: str | Path | None,
    path: str | Path | None = None,
    workers: int | None = None,
) -> tuple[VerifyReport, dict[str, Any]]:
    """`verify_images` over the whole index, the summary logged as one line, and `data.on_bad_image` applied.

    Returns the report (its `excluded` feeds `make_split(exclude=...)` under "skip") and the summary.

    Raises:
        DatasetError: `on_bad_image == "error"` and some file is bad (every bad file is listed).
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"`on_bad_image` must be 'error' or 'skip', but got {on_bad_image!r}.")
    report = verify_images(index.images, mode=mode, cache_path=cache_path, workers=workers)
    summary = summarize(index, report, path=path)
    logger.info("%s", format_summary(summary))
    if report.bad and on_bad_image == "error":
        raise bad_images_error(report, dataset=path if path is not None else index.root)
    if report.bad:
        logger.warning("Leaving %d bad image files out of the split (data.on_bad_image: skip):\n%s", len(report.bad),
                       "\n".join(f"  {b.describe()}" for b in report.bad))
    return report, summary


def check_fold_count(
    index: CocoIndex,
    *,
    num_folds: int,
    selection_fraction: float,
    test_fraction: float,
    exclude: Mapping[int, str] | None = None,
    where: str = "<config>",
) -> int:
    """The number of images left for the K folds; `ConfigError` when it is below `num_folds`.

    Counts as `detection.data.splits.make_split` splits: a Roboflow ``test/`` (``valid/``) folder is the test
    (selection) split, else ``round(fraction * images)`` of the images not excluded.
    """
    from detection.config import ConfigError

    exclude = exclude or {}
    records = [r for r in index.images if r.image_id not in exclude]
    held: dict[str, tuple[int, str]] = {}
    for name, folder, fraction in (("selection", "valid", selection_fraction), ("test", "test", test_fraction)):
        in_folder = sum(1 for r in records if r.split == folder)
        held[name] = ((in_folder, f"the {folder}/ folder") if in_folder else
                      (int(round(fraction * len(records))), f"`data.{name}_fraction` = {fraction:g}"))
    pool = len(records) - sum(n for n, _ in held.values())
    if pool < num_folds:
        left_out = f" and {len(exclude)} bad files left out" if exclude else ""
        raise ConfigError(
            f"{where}: `data.num_folds` = {num_folds} needs at least {num_folds} images for the folds, but only "
            f"{pool} of the {len(records)} images{left_out} remain after the held-out parts: selection "
            f"{held['selection'][0]} ({held['selection'][1]}), test {held['test'][0]} ({held['test'][1]}); "
            f"set `data.num_folds` to at most {pool} (and >= 2) or hold out a smaller share.")
    return pool
