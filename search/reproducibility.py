"""Reading the trials' reproducibility manifests back from an experiment folder.

Every trial writes `manifest.json` into each Tune checkpoint it saves (`trainables.trial_manifest`, which
also documents the fields). Here the driver side finds a trial's latest manifest and checks it against
the data and code of today: `detsweep report` shows the best trial's manifest and any drift.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from detection.data.coco import DatasetError
from trainables.trial_manifest import MANIFEST_FILE, dataset_sha256, git_state, package_versions

__all__ = ["MANIFEST_FILE", "check_manifest", "latest_checkpoint", "read_trial_manifest", "trial_dirs"]

_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def trial_dirs(tune_dir: str | Path) -> dict[str, Path]:
    """{trial_id: trial folder} of a Tune experiment folder (`<experiment>/tune`).

    A trial folder is one with a `result.json` or `params.json`; its id is the `trial_id` of its first
    reported result, else the folder name after the last "_" (Tune's and our `trial_<id>` naming).
    """
    found: dict[str, Path] = {}
    tune_dir = Path(tune_dir)
    if not tune_dir.is_dir():
        return found
    for folder in sorted(p for p in tune_dir.iterdir() if p.is_dir()):
        if not ((folder / "result.json").is_file() or (folder / "params.json").is_file()):
            continue
        trial_id = None
        result = folder / "result.json"
        if result.is_file():
            with result.open() as handle:
                first = handle.readline().strip()
            if first:
                try:
                    trial_id = json.loads(first).get("trial_id")
                except json.JSONDecodeError:  # a line being written while the sweep runs
                    trial_id = None
        found[str(trial_id or folder.name.rsplit("_", 1)[-1])] = folder
    return found


def latest_checkpoint(trial_dir: str | Path) -> Path | None:
    """The trial's `checkpoint_<n>` folder with the highest n, or None before its first checkpoint."""
    numbered = [(int(m.group(1)), p) for p in Path(trial_dir).glob("checkpoint_*")
                if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return max(numbered)[1] if numbered else None


def read_trial_manifest(trial_dir: str | Path) -> dict[str, Any] | None:
    """The manifest in the trial's latest checkpoint, or None when it has none (yet).

    Raises:
        ValueError: when the manifest file exists but is not valid JSON (names the file).
    """
    checkpoint = latest_checkpoint(trial_dir)
    path = None if checkpoint is None else checkpoint / MANIFEST_FILE
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: expected a JSON manifest written by trainables.trial_manifest, but line "
                         f"{error.lineno} column {error.colno}: {error.msg}.") from error


def _split_hash(location: str) -> str:
    """`Split.hash` of the split.json at a path or URI (an experiment on S3 keeps it there)."""
    from detection.data.splits import Split
    from search.storage import is_uri, read_bytes

    if not is_uri(location):
        return Split.from_json(location).hash
    with tempfile.TemporaryDirectory() as tmp:  # Split.from_json reads (and checks) a file
        local = Path(tmp) / "split.json"
        local.write_bytes(read_bytes(location))
        return Split.from_json(local).hash


def check_manifest(manifest: dict[str, Any]) -> list[str]:
    """What differs between a manifest and the dataset, split, packages and git commit of today.

    Returns human-readable lines (empty when a rerun would start from the same inputs): e.g.
    `"dataset sha256 differs: manifest 1a2b3c4d5e6f, now 9f8e7d6c5b4a (valid/_annotations.coco.json)"`.
    """
    issues: list[str] = []
    dataset = manifest.get("dataset", {})
    try:
        digest, files = dataset_sha256(dataset.get("path", ""))
        if digest != dataset.get("sha256"):
            changed = sorted(set(files) ^ set(dataset.get("files", {}))
                             | {n for n in files if dataset.get("files", {}).get(n, files[n]) != files[n]})
            issues.append(f"dataset sha256 differs: manifest {str(dataset.get('sha256'))[:12]}, now {digest[:12]} "
                          f"({', '.join(changed)})")
    except DatasetError as error:
        issues.append(f"dataset cannot be hashed now: {error}")
    split = manifest.get("split", {})
    try:
        now = _split_hash(split.get("path", ""))
        if now != split.get("sha256"):
            issues.append(f"split sha256 differs: manifest {str(split.get('sha256'))[:12]}, now {now[:12]}")
    except (DatasetError, OSError) as error:
        issues.append(f"split cannot be read now: {error}")
    for name, version in package_versions(tuple(k for k in manifest.get("packages", {}) if k != "python")).items():
        recorded = manifest.get("packages", {}).get(name)
        if recorded != version:
            issues.append(f"{name} {recorded} in the manifest, {version} now")
    commit = manifest.get("git", {}).get("commit")
    now_commit = git_state()["commit"]
    if commit != now_commit:
        issues.append(f"git commit {str(commit)[:12]} in the manifest, {str(now_commit)[:12]} now")
    return issues
