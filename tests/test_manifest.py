"""Reproducibility: the trial manifest (trainables.trial_manifest) on the real DeepForest export."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainables.trial_manifest
from detection.config import ExperimentConfig
from detection.data.coco import DatasetError
from detection.data.splits import make_split
from trainables.trial_manifest import (
    MANIFEST_PACKAGES,
    annotation_files,
    dataset_sha256,
    git_state,
    package_versions,
    write_trial_manifest,
)

HEX64 = re.compile(r"^[0-9a-f]{64}$")
PROJECT = Path(trainables.trial_manifest.__file__).resolve().parents[1]  # the checkout the manifest describes


@pytest.fixture(scope="module")
def forest(deepforest_root: Path, deepforest_index, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Roboflow-style DeepForest export, its split.json)."""
    split = make_split(deepforest_index, num_folds=2, selection_fraction=0.1, test_fraction=0.1, seed=0)
    return deepforest_root, split.to_json(tmp_path_factory.mktemp("manifest") / "split.json")


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


# ------------------------------------------------------------------------------------ same seed, same loss


def _tiny_dataset(deepforest_root: Path, folder: Path, *, num_images: int = 4) -> Path:
    """A COCO file of the first `num_images` annotated real DeepForest training tiles, copied to `folder`."""
    coco = json.loads((deepforest_root / "train" / "_annotations.coco.json").read_text())
    annotated = {a["image_id"] for a in coco["annotations"]}
    images = [image for image in coco["images"] if image["id"] in annotated][:num_images]
    folder.mkdir(parents=True)
    for image in images:
        shutil.copy(deepforest_root / "train" / image["file_name"], folder / image["file_name"])
    ids = {image["id"] for image in images}
    coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.slow
def test_two_train_runs_with_one_seed_give_the_same_first_epoch_loss(deepforest_root: Path, tmp_path: Path) -> None:
    data = _tiny_dataset(deepforest_root, tmp_path / "tiny")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "seed: 3\n"
        f"data: {{path: {data}, num_folds: 2, selection_fraction: 0.0, test_fraction: 0.0}}\n"
        "model: {arch: faster_rcnn, backbone: mobilenet_v2, pretrained: false}\n"
        "train: {epochs: 1, image_size: 96, batch_size: 2, eval_batch_size: 2}\n"
    )
    # Two separate processes (as two `detsweep train` runs are), started together on the 2 cores, with
    # different hash seeds so that nothing may depend on set or dict-of-str ordering.
    runs = []
    for i in range(2):
        env = {**os.environ, "PYTHONHASHSEED": str(i + 1)}
        runs.append(subprocess.Popen(
            [sys.executable, "-m", "search.cli", "train", "--config", str(config), "--out", str(tmp_path / f"run{i}")],
            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
    first = [json.loads((tmp_path / f"run{i}" / "train.json").read_text())["history"][0] for i in range(2)]
    assert math.isfinite(first[0]["loss"])
    assert first[0]["loss"] == first[1]["loss"]
    weights = [torch.load(tmp_path / f"run{i}" / "best.pt", weights_only=True) for i in range(2)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ------------------------------------------------------------------------------------ in a real sweep


@pytest.mark.slow
def test_every_trial_of_a_sweep_checkpoints_its_manifest(finished_sweep: Path, tmp_path: Path) -> None:
    import yaml

    from detection.data.splits import Split
    from search.reproducibility import check_manifest, read_trial_manifest
    from search.trial_results import read_trials

    sweep = yaml.safe_load((finished_sweep / "sweep.yaml").read_text())
    trials = {trial.trial_id: trial for trial in read_trials(finished_sweep / "tune")}
    assert len(trials) == 2
    manifests = {trial_id: read_trial_manifest(trial.checkpoint) for trial_id, trial in trials.items()}
    data_path = Path(sweep["data"]["path"])
    split = Split.from_json(finished_sweep / "split.json")
    for trial_id, manifest in manifests.items():
        assert manifest is not None, trial_id
        assert manifest["dataset"]["sha256"] == dataset_sha256(data_path)[0]
        assert manifest["split"]["sha256"] == split.hash
        assert manifest["seeds"] == {"seed": sweep["seed"], "split": split.seed}
        trial_json = json.loads((trials[trial_id].checkpoint / "trial.json").read_text())
        assert manifest["config"] == trial_json["config"]  # the config the trial trained
        # Nothing changed since: same data, split and packages; the recorded commit is HEAD or an ancestor
        # of it (commits may land while a developer's test session runs).
        assert [d for d in check_manifest(manifest) if not d.startswith("git commit")] == []
        commit = manifest["git"]["commit"]
        if commit is not None:
            assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=PROJECT).returncode == 0
    first, second = manifests.values()
    assert first["dataset"] == second["dataset"] and first["split"] == second["split"]

    # Edited data is noticed, naming the file that changed.
    copy = shutil.copytree(data_path.parent, tmp_path / "data")
    edited = copy / data_path.name
    edited.write_text(edited.read_text().replace('"iscrowd": 0', '"iscrowd":0', 1))
    drift = [d for d in check_manifest({**first, "dataset": {**first["dataset"], "path": str(edited)}})
             if not d.startswith("git commit")]
    assert len(drift) == 1 and drift[0].startswith("dataset sha256 differs") and data_path.name in drift[0]
    # So is another split (a trial records the split it trained on, not just a file path).
    other = Split(selection=split.selection, test=split.test, folds=tuple(reversed(split.folds)), seed=split.seed)
    drift = [d for d in check_manifest({**first, "split": {**first["split"],
                                                            "path": str(other.to_json(tmp_path / "other.json"))}})
             if not d.startswith("git commit")]
    assert drift == [f"split sha256 differs: manifest {split.hash[:12]}, now {other.hash[:12]}"]
