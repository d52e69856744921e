"""Reproducibility manifest of one trial: what data, split, seeds, code and packages produced it.

A trial writes `manifest.json` into every Tune checkpoint it saves (beside `trial.json`), so the
manifest travels with the models to whatever storage the sweep uses (local folder or S3) and the
report, `export-best` and a later reader can tell whether a rerun would see the same inputs:

    {
      "format": 1,
      "created": "2026-01-01T00:00:00+00:00",
      "dataset": {"path": ..., "sha256": <over the annotation JSON files>, "files": {<name>: <sha256>}},
      "data": {...},  # the driver's load summary (images, boxes kept/clipped/dropped, bad files), when given
      "split": {"path": ..., "sha256": <Split.hash>, "file_sha256": <sha256 of split.json's bytes, when read from it>},
      "seeds": {...},
      "packages": {"python": "3.11.2", "torch": "2.14.1", ..., <missing package>: null},
      "git": {"commit": <40 hex> | null, "dirty": true | false | null},
      "platform": {...},
      "config": {...}  # the trial's full training config (ExperimentConfig.to_dict())
    }

The hashes are content hashes: a copy of the same dataset in another folder hashes the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detection.data.coco import ROBOFLOW_ANNOTATIONS, ROBOFLOW_SPLITS, DatasetError
from detection.data.splits import Split

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_PACKAGES",
    "annotation_files",
    "build_trial_manifest",
    "dataset_sha256",
    "file_sha256",
    "git_state",
    "package_versions",
    "write_trial_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# Distribution names whose versions change what a trial computes.
MANIFEST_PACKAGES = ("torch", "torchvision", "timm", "ray", "optuna", "albumentations", "numpy")
_PROJECT_DIR = Path(__file__).resolve().parents[1]
_CHUNK = 1 << 20


@functools.lru_cache(maxsize=256)
def _cached_file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes.

    Cached per (path, size, mtime) so that a trial can rewrite its manifest into every epoch's
    checkpoint without reading a large annotation file again.
    """
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file to hash it ({error}).") from error
    return _cached_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def annotation_files(dataset_path: str | Path) -> dict[str, Path]:
    """The annotation JSON files of a dataset, by the name used in the manifest.

    The same files `detection.data.coco.load_dataset` reads: a `.json` file itself (named by its file
    name), or a Roboflow export folder's `<split>/_annotations.coco.json` (named `<split>/...`), or a
    folder holding `_annotations.coco.json` directly.

    Raises:
        DatasetError: when the path is neither.
    """
    path = Path(dataset_path)
    if path.is_file():
        return {path.name: path}
    found = {f"{split}/{ROBOFLOW_ANNOTATIONS}": path / split / ROBOFLOW_ANNOTATIONS for split in ROBOFLOW_SPLITS
             if (path / split / ROBOFLOW_ANNOTATIONS).is_file()}
    if not found and (path / ROBOFLOW_ANNOTATIONS).is_file():
        found = {ROBOFLOW_ANNOTATIONS: path / ROBOFLOW_ANNOTATIONS}
    if not found:
        raise DatasetError(f"{path}: expected a COCO .json file or a Roboflow export folder with "
                           f"{'/, '.join(ROBOFLOW_SPLITS)}/ holding {ROBOFLOW_ANNOTATIONS}, but found neither.")
    return found


def dataset_sha256(dataset_path: str | Path) -> tuple[str, dict[str, str]]:
    """(combined sha256, {name: sha256 of that file}) over a dataset's annotation JSON files.

    The combined digest hashes `"<name>\\0<file sha256>\\n"` lines in name order, so it changes when a
    file is added, removed, renamed or edited, and not when the folder moves.
    """
    per_file = {name: file_sha256(path) for name, path in sorted(annotation_files(dataset_path).items())}
    combined = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in per_file.items()).encode())
    return combined.hexdigest(), per_file


def package_versions(packages: tuple[str, ...] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    """{"python": "3.x.y", <distribution>: version or None when it is not installed}."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(folder: str | Path = _PROJECT_DIR) -> dict[str, Any]:
    """{"commit": HEAD's sha or None, "dirty": uncommitted changes to tracked files, or None}.

    None when the folder is not in a git checkout (e.g. an installed wheel on a cluster worker) or
    git is not installed: a manifest never fails for want of git.
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _plain_config(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return json.loads(json.dumps(dataclasses.asdict(config), default=str))
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"Expected `config` to be an ExperimentConfig or a mapping, got {type(config).__name__}.")


def build_trial_manifest(
    *,
    dataset_path: str | Path,
    split_path: str | Path,
    seeds: Mapping[str, Any],
    config: Any,
    split: Split | None = None,
    data_summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict (see the module docstring for its fields).

    Args:
        dataset_path: what `data.path` names: a COCO .json file or a Roboflow export folder.
        split_path: the experiment's `split.json` (`detection.data.splits.Split.to_json`), read unless
            `split` is given; then only recorded (it may be a URI, e.g. `s3://.../split.json`).
        seeds: every seed the trial used, e.g. `{"seed": 0, "folds": [0, 1, 2]}`.
        config: the trial's training config (an `ExperimentConfig` or its `to_dict()`).
        split: the split itself, when the trial has it in memory (`file_sha256` is then left out).
        data_summary: `detection.data.verify.summarize` of the driver's check (images, boxes kept / clipped /
            dropped per reason, the bad files the split leaves out), recorded as "data".

    Raises:
        DatasetError: when the dataset's annotation files or the split file cannot be read.
    """
    dataset_digest, files = dataset_sha256(dataset_path)
    if split is None:
        split = Split.from_json(split_path)  # checks the file's recorded hash too
        split_record = {"path": str(Path(split_path).resolve()), "sha256": split.hash,
                        "file_sha256": file_sha256(split_path)}
    else:
        split_record = {"path": str(split_path), "sha256": split.hash}
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(Path(dataset_path).resolve()), "sha256": dataset_digest, "files": files},
        "split": split_record,
        "seeds": json.loads(json.dumps(dict(seeds), default=str)),
        "packages": package_versions(),
        "git": git_state(),
        "platform": {"system": platform.system(), "machine": platform.machine(), "node": platform.node()},
        "config": _plain_config(config),
    }
    if data_summary is not None:
        manifest["data"] = json.loads(json.dumps(dict(data_summary), default=str))
    return manifest


def write_trial_manifest(
    path: str | Path,
    *,
    dataset_path: str | Path,
    split_path: str | Path,
    seeds: Mapping[str, Any],
    config: Any,
) -> Path:
    """Write `build_trial_manifest(...)` as JSON to `path` (a file, or a folder to put `manifest.json` in).

    Returns the file written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    manifest = build_trial_manifest(dataset_path=dataset_path, split_path=split_path, seeds=seeds, config=config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))
    return path
