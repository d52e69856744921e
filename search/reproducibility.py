"""Reading the trials' reproducibility manifests back from an experiment folder.

Every trial writes `manifest.json` into each Tune checkpoint it saves (`trainables.trial_manifest`, which
also documents the fields). Here the driver side reads the manifest of a trial's latest checkpoint
(`search.trial_results.TrialResult.checkpoint`, the one Tune registered) and checks it against the data and
code of today: `detsweep report` shows the best trial's manifest and any drift.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from detection.data.coco import DatasetError
from trainables.trial_manifest import MANIFEST_FILE, dataset_sha256, git_state, package_versions

__all__ = ["MANIFEST_FILE", "check_manifest", "read_trial_manifest"]


def read_trial_manifest(checkpoint: str | Path | None) -> dict[str, Any] | None:
    """The manifest in a trial's checkpoint folder, or None when there is none (yet).

    Raises:
        ValueError: when the manifest file exists but is not valid JSON (names the file).
    """
    path = None if checkpoint is None else Path(checkpoint) / MANIFEST_FILE
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
