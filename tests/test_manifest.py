"""Reproducibility: the trial manifest (trainables.manifest) on the real DeepForest export."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from detection.config import ExperimentConfig
from detection.data.coco import DatasetError, load_dataset
from detection.data.deepforest import write_deepforest_coco
from detection.data.splits import make_split
from trainables.manifest import (
    MANIFEST_PACKAGES,
    annotation_files,
    dataset_sha256,
    git_state,
    package_versions,
    write_trial_manifest,
)

HEX64 = re.compile(r"^[0-9a-f]{64}$")
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Roboflow-style DeepForest export, its split.json)."""
    root = tmp_path_factory.mktemp("manifest")
    data = write_deepforest_coco(root / "deepforest", tile_size=400, seed=0)
    split = make_split(load_dataset(data), num_folds=2, holdout_fraction=0.2, seed=0)
    return data, split.to_json(root / "split.json")


def _manifest(path: Path, data: Path, split: Path) -> dict:
    written = write_trial_manifest(path, dataset_path=data, split_path=split, seeds={"seed": 7, "folds": [7, 8]},
                                   config=ExperimentConfig())
    return json.loads(written.read_text())


def test_manifest_has_every_field(forest: tuple[Path, Path], tmp_path: Path) -> None:
    data, split_path = forest
    manifest = _manifest(tmp_path / "manifest.json", data, split_path)

    assert set(manifest["dataset"]["files"]) == {"train/_annotations.coco.json", "valid/_annotations.coco.json",
                                                 "test/_annotations.coco.json"}
    assert HEX64.match(manifest["dataset"]["sha256"])
    split_file = json.loads(split_path.read_text())
    assert manifest["split"]["sha256"] == split_file["hash"]  # Split.hash, as split.json records it
    assert manifest["split"]["file_sha256"] == hashlib.sha256(split_path.read_bytes()).hexdigest()
    assert manifest["seeds"] == {"seed": 7, "folds": [7, 8]}
    assert set(manifest["packages"]) == {"python", *MANIFEST_PACKAGES}
    import torch

    assert torch.__version__.startswith(manifest["packages"]["torch"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else None
    assert manifest["git"]["commit"] == expected_commit
    assert manifest["config"] == json.loads(json.dumps(ExperimentConfig().to_dict()))


def test_hashes_are_stable_and_follow_content(forest: tuple[Path, Path], tmp_path: Path) -> None:
    data, split_path = forest
    first = _manifest(tmp_path / "a.json", data, split_path)
    second = _manifest(tmp_path / "b.json", data, split_path)
    for key in ("dataset", "split"):
        assert first[key] == second[key]

    # A copy elsewhere hashes the same (content hashes, not paths) ...
    copy = shutil.copytree(data, tmp_path / "copy")
    assert dataset_sha256(copy) == dataset_sha256(data)
    # ... and editing one annotation file changes that file's hash and the combined one only.
    valid = copy / "valid" / "_annotations.coco.json"
    valid.write_text(valid.read_text().replace('"iscrowd": 0', '"iscrowd":0', 1))
    combined, files = dataset_sha256(copy)
    assert combined != first["dataset"]["sha256"]
    assert [name for name in files if files[name] != first["dataset"]["files"][name]] == [
        "valid/_annotations.coco.json"]


def test_single_json_dataset_hash_by_hand(tmp_path: Path) -> None:
    coco = tmp_path / "labels.json"
    coco.write_bytes(b'{"images": [], "annotations": [], "categories": []}')  # the empty dataset
    file_digest = hashlib.sha256(coco.read_bytes()).hexdigest()
    # combined = sha256 of the line "<name>\0<file sha256>\n" for the one file
    expected = hashlib.sha256(f"labels.json\0{file_digest}\n".encode()).hexdigest()
    assert dataset_sha256(coco) == (expected, {"labels.json": file_digest})
    assert annotation_files(coco) == {"labels.json": coco}


def test_folder_without_annotations_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        dataset_sha256(tmp_path)


def test_edited_split_is_rejected(forest: tuple[Path, Path], tmp_path: Path) -> None:
    data, split_path = forest
    edited = json.loads(split_path.read_text())
    edited["seed"] += 1  # the recorded hash no longer matches
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps(edited))
    with pytest.raises(DatasetError, match="split"):
        _manifest(tmp_path / "m.json", data, bad)


def test_git_state_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_missing_package_is_none() -> None:
    versions = package_versions(("numpy", "surely-not-installed-detsweep-pkg"))
    assert versions["surely-not-installed-detsweep-pkg"] is None
    import numpy

    assert versions["numpy"] == numpy.__version__
