"""The final ensemble job (search/ensemble.py) on a real finished sweep (`finished_sweep` in conftest.py: a real
`detsweep sweep` on DeepForest tiles with an embedded local Ray, whose last step is the ensemble job).

Everything is recomputed independently from what the job saved: metrics from the saved predictions and the
dataset's ground truth, predictions from the saved best ensemble, CV scores from Tune's own result files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from detection.data.coco import CocoDetection, load_dataset
from detection.data.splits import Split
from detection.metrics import detection_metrics
from search.ensemble import (
    BEST_ENSEMBLE_DIR,
    BEST_ENSEMBLE_JSON,
    ENSEMBLE_DIR,
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
    MIN_MODEL_WEIGHT,
    EnsembleError,
    load_ensemble,
    predict_ensemble,
    predictions_from_coco,
    predictions_to_coco,
    run_ensemble,
)
from search.tuner import load_experiment

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("map", "map_50", "map_75", "f1", "score")


def read_leaderboard(experiment: Path) -> list[dict[str, str]]:
    with (experiment / LEADERBOARD_CSV).open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def holdout_truth(experiment: Path) -> tuple[list[int], list[dict[str, torch.Tensor]], tuple[str, ...], list]:
    """Held-out ids, their ground truth at full resolution, the class names, and the images."""
    config = load_experiment(experiment)
    index = load_dataset(config.data.path, filter_empty=config.data.filter_empty)
    split = Split.from_json(experiment / "split.json")
    dataset = CocoDetection(index, split.holdout, transforms=None)
    images, targets = zip(*(dataset[i] for i in range(len(dataset)))) if len(dataset) else ((), ())
    return list(split.holdout), list(targets), index.class_names, list(images)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def hardlink_copy(experiment: Path, target: Path) -> Path:
    """A copy of an experiment folder that costs no disk (the job replaces files, it never edits them)."""
    shutil.copytree(experiment, target, copy_function=os.link)
    return target


# ------------------------------------------------------------------------------------ the leaderboard


def test_leaderboard_metrics_agree_with_a_recomputation_from_the_saved_predictions(finished_sweep: Path) -> None:
    rows = [r for r in read_leaderboard(finished_sweep) if r["status"] == "ensembled"]
    assert len(rows) == 2  # the fixture's 2 trials both finish
    image_ids, targets, class_names, _ = holdout_truth(finished_sweep)
    assert image_ids, "the fixture's split must hold out images"
    boxes_seen = 0
    for row in rows:
        saved = read_json(finished_sweep / ENSEMBLE_DIR / f"{row['trial_id']}.json")
        assert saved["image_ids"] == image_ids
        spec = saved["ensemble"]
        preds = predictions_from_coco(saved["predictions"], image_ids, spec["category_ids"])
        boxes_seen += sum(len(p["boxes"]) for p in preds)
        recomputed = detection_metrics(preds, targets, score_threshold=spec["score_threshold"], class_names=class_names)
        for m in METRICS:
            assert float(row[m]) == pytest.approx(recomputed[m], abs=1e-6), (row["trial_id"], m)
            assert saved["metrics"][m] == pytest.approx(recomputed[m], abs=1e-6), (row["trial_id"], m)
    assert boxes_seen > 0, "the fused ensembles kept no box at all: the comparison above would be vacuous"


def test_leaderboard_ranks_by_ensemble_score_with_params_and_cv_scores(finished_sweep: Path) -> None:
    rows = read_leaderboard(finished_sweep)
    scores = [float(r["score"]) for r in rows if r["status"] == "ensembled"]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    markdown = (finished_sweep / LEADERBOARD_MD).read_text()
    config = load_experiment(finished_sweep)
    for row in rows:
        trial_dir = finished_sweep / "tune" / f"trial_{row['trial_id']}"
        params = read_json(trial_dir / "params.json")
        assert row["detector"] == params["detector"]
        assert float(row["lr"]) == pytest.approx(params["lr"], rel=1e-12)
        assert int(row["batch_size"]) == params["batch_size"]
        assert float(row["score_threshold"]) == pytest.approx(params["score_threshold"], rel=1e-12)
        # CV score: the best epoch's fold mean as Tune recorded it, with that epoch's fold std.
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        best = max(reports, key=lambda r: r["score_mean"])
        assert float(row["cv_score_mean"]) == pytest.approx(best["score_mean"], abs=1e-12)
        assert float(row["cv_score_std"]) == pytest.approx(best["score_std"], abs=1e-12)
        assert int(row["cv_epoch"]) == best["training_iteration"]
        assert int(row["epochs"]) == config.train.epochs == len(reports)
        assert f"| {row['rank']} | {row['trial_id']} | ensembled | {row['detector']} |" in markdown

        # WBF: skip_box_thr is the trial's threshold, weights the fold models' scores, iou_thr the sweep's.
        wbf = read_json(finished_sweep / ENSEMBLE_DIR / f"{row['trial_id']}.json")["ensemble"]["wbf"]
        checkpoint = max(trial_dir.glob("checkpoint_*"))
        best_models = read_json(checkpoint / "best" / "best.json")
        assert int(row["num_models"]) == len(best_models) == min(3, config.data.num_folds)  # K=2 folds -> 2 models
        assert wbf["weights"] == [max(m["score"], MIN_MODEL_WEIGHT) for m in best_models]
        assert wbf["skip_box_thr"] == params["score_threshold"]
        assert wbf["iou_thr"] == config.ensemble.iou_thr
        assert wbf["conf_type"] == config.ensemble.conf_type


# ------------------------------------------------------------------------------------- best ensemble


def test_best_ensemble_loads_and_reproduces_the_saved_holdout_predictions(finished_sweep: Path) -> None:
    manifest = read_json(finished_sweep / BEST_ENSEMBLE_JSON)
    top = read_leaderboard(finished_sweep)[0]
    assert manifest["trial_id"] == top["trial_id"]
    assert manifest["holdout_metrics"]["score"] == pytest.approx(float(top["score"]), abs=1e-12)
    # The model files were copied out of Tune's checkpoint (which the next checkpoint would replace).
    for model in manifest["models"]:
        path = Path(model["path"])
        assert path.is_absolute() and path.parent == (finished_sweep / BEST_ENSEMBLE_DIR).resolve()
        source = Path(manifest["source_checkpoint"]) / "best" / f"rank-{model['rank']}.pt"
        assert path.read_bytes() == source.read_bytes()

    models, spec = load_ensemble(finished_sweep / BEST_ENSEMBLE_JSON, "cpu")
    assert len(models) == len(manifest["models"]) == 2
    assert (spec.arch, spec.backbone, spec.num_classes) == ("faster_rcnn", "mobilenet_v2", 3)
    assert spec.class_names == ("Tree", "Dead", "Alive") and spec.score_threshold == manifest["score_threshold"]

    image_ids, targets, class_names, images = holdout_truth(finished_sweep)
    # The job's Ray task had 1 CPU, so torch ran on 1 thread there: the same here gives the same floats
    # (with more threads, sums in another order can tip a box near the IoU threshold into another WBF cluster).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fused = predict_ensemble(models, spec, images, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    saved = read_json(finished_sweep / ENSEMBLE_DIR / f"{spec.trial_id}.json")
    expected = predictions_from_coco(saved["predictions"], image_ids, spec.category_ids)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=0)  # pixels, xyxy absolute
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-6, rtol=0)
        assert torch.equal(got["labels"], want["labels"])
    again = detection_metrics(fused, targets, score_threshold=spec.score_threshold, class_names=class_names)
    for m in METRICS:
        assert again[m] == pytest.approx(manifest["holdout_metrics"][m], abs=1e-3), m


def test_predict_ensemble_on_an_empty_scene_and_on_no_images(finished_sweep: Path) -> None:
    models, spec = load_ensemble(finished_sweep / BEST_ENSEMBLE_JSON, "cpu")
    assert predict_ensemble(models, spec, []) == []
    blank = torch.full((3, 150, 230), 0.5)  # uniform grey, nothing to find, an odd size
    (pred,) = predict_ensemble(models, spec, [blank])
    assert pred["boxes"].dtype == torch.float32 and pred["boxes"].shape[1:] == (4,)
    assert len(pred["boxes"]) == len(pred["scores"]) == len(pred["labels"])
    if len(pred["boxes"]):  # whatever it finds lies in the image's own pixels
        assert (pred["boxes"][:, 0::2] <= 230).all() and (pred["boxes"][:, 1::2] <= 150).all()
    # Scored against an empty target: no true positives, so F1 and score are 0.
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    metrics = detection_metrics([pred], [empty], score_threshold=spec.score_threshold, class_names=spec.class_names)
    assert metrics["f1"] == 0.0 and metrics["score"] == 0.5 * metrics["map_50"]


def test_load_ensemble_finds_moved_models_and_names_bad_manifests(finished_sweep: Path, tmp_path: Path) -> None:
    manifest = read_json(finished_sweep / BEST_ENSEMBLE_JSON)
    moved = tmp_path / "moved"
    shutil.copytree(finished_sweep / BEST_ENSEMBLE_DIR, moved / BEST_ENSEMBLE_DIR)
    stale = {**manifest, "models": [{**m, "path": str(tmp_path / "gone" / Path(m["path"]).name)}
                                    for m in manifest["models"]]}
    (moved / BEST_ENSEMBLE_JSON).write_text(json.dumps(stale))
    models, spec = load_ensemble(moved / BEST_ENSEMBLE_JSON, "cpu")
    assert len(models) == 2
    assert [Path(m.path).parent for m in spec.models] == [moved / BEST_ENSEMBLE_DIR] * 2

    no_wbf = {k: v for k, v in manifest.items() if k != "wbf"}
    (tmp_path / "no_wbf.json").write_text(json.dumps(no_wbf))
    with pytest.raises(EnsembleError, match=r"no_wbf\.json: missing key 'wbf'"):
        load_ensemble(tmp_path / "no_wbf.json", "cpu")

    (tmp_path / "broken.json").write_text('{"trial_id": ')
    with pytest.raises(EnsembleError, match=r"broken\.json: malformed JSON at line 1"):
        load_ensemble(tmp_path / "broken.json", "cpu")

    short = {**manifest, "wbf": {**manifest["wbf"], "weights": [1.0]}}  # 2 models, 1 weight
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(EnsembleError, match=r"`wbf.weights` must hold one weight per model \(2\)"):
        load_ensemble(tmp_path / "short.json", "cpu")

    (tmp_path / "lost.json").write_text(json.dumps(stale))  # no best_ensemble/ beside it either
    with pytest.raises(EnsembleError, match=r"gone/rank-1\.pt: model file of trial .* not found"):
        load_ensemble(tmp_path / "lost.json", "cpu")


# ------------------------------------------------------------------------------------- the command


def test_ensemble_command_on_one_chosen_trial_matches_the_sweeps_own_run(finished_sweep: Path, tmp_path: Path) -> None:
    experiment = hardlink_copy(finished_sweep, tmp_path / "exp")
    second = read_leaderboard(finished_sweep)[1]

    done = run_cli("ensemble", str(experiment), "--trial", second["trial_id"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"| 1 | {second['trial_id']} | ensembled |" in done.stdout  # the leaderboard is printed
    (row,) = read_leaderboard(experiment)
    assert row["trial_id"] == second["trial_id"]
    for m in METRICS:  # the same models on the same images: the same numbers as in the sweep's own run
        assert float(row[m]) == pytest.approx(float(second[m]), abs=1e-6), m
    assert read_json(experiment / BEST_ENSEMBLE_JSON)["trial_id"] == second["trial_id"]
    # The sweep's own results were never touched through the links.
    assert read_leaderboard(finished_sweep)[1] == second and len(read_leaderboard(finished_sweep)) == 2

    done = run_cli("ensemble", str(experiment), "--trial", "nope")
    assert done.returncode == 2
    assert "no trial 'nope'" in done.stderr and second["trial_id"] in done.stderr

    done = run_cli("ensemble", str(tmp_path))  # not an experiment folder
    assert done.returncode == 2 and "sweep.yaml" in done.stderr


def test_errored_trial_is_listed_with_its_error_and_not_ensembled(deepforest_root: Path, tmp_path: Path) -> None:
    # A real sweep whose only trial errors: its fold workers cannot load `model.weights_path` (not MobileNetV2
    # weights), Tune marks the trial ERROR (no retries), and `detsweep sweep` says no trial finished.
    bad_weights = tmp_path / "not_mobilenet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad_weights)
    config = {
        "name": "errored", "storage": str(tmp_path), "seed": 0,
        "data": {"path": str(deepforest_root), "num_folds": 2, "class_balanced_sampling": False},
        "model": {"arch": "faster_rcnn", "backbone": "mobilenet_v2", "start": "backbone",
                  "weights_path": str(bad_weights)},
        "train": {"epochs": 1, "image_size": 128},
        "search": {"num_samples": 1, "max_concurrent_trials": 1},
        "resources": {"cpus_per_fold": 1, "gpus_per_fold": 0, "coordinator_cpus": 0},
        "failure": {"max_failures": 0},
    }
    (tmp_path / "sweep.yaml").write_text(json.dumps(config))  # JSON is YAML
    done = run_cli("sweep", "--config", str(tmp_path / "sweep.yaml"), "--name", "exp", "--no-dashboard")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "exp"

    leaderboard = run_ensemble(experiment)  # no trial to ensemble: no Ray needed, still a leaderboard

    (row,) = read_leaderboard(experiment)
    assert row["status"] == "ERROR" and row["rank"] == "" and row["score"] == ""
    # The reason of Tune's pickled TrialFailed, down to the cause: the weights file does not fit the backbone.
    assert row["error"].startswith("TrialFailed: fold ") and "worker failed to start" in row["error"]
    assert "state_dict" in row["error"] and "conv.weight" in row["error"], row["error"]  # the bogus file's key
    assert f"{row['trial_id']} (ERROR): " in (experiment / LEADERBOARD_MD).read_text()
    assert leaderboard == experiment / LEADERBOARD_CSV
    assert not (experiment / ENSEMBLE_DIR / f"{row['trial_id']}.json").exists()
    assert not (experiment / BEST_ENSEMBLE_JSON).exists()


# ------------------------------------------------------------------------------------- COCO results


def test_coco_results_round_trip_with_an_image_without_boxes() -> None:
    preds = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.5, 1.5, 3.0, 4.0]]),
         "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([2, 1])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    results = predictions_to_coco(preds, [7, 3], category_ids=[11, 22])
    # xyxy (10, 20, 50, 80) -> xywh (10, 20, 50 - 10 = 40, 80 - 20 = 60); label 2 -> category_ids[1] = 22
    assert results[0] == {"image_id": 7, "category_id": 22, "bbox": [10.0, 20.0, 40.0, 60.0],
                          "score": pytest.approx(0.9)}
    assert [r["image_id"] for r in results] == [7, 7]  # image 3 has no boxes: no entry

    back = predictions_from_coco(results, [7, 3], category_ids=[11, 22])
    torch.testing.assert_close(back[0]["boxes"], preds[0]["boxes"])
    torch.testing.assert_close(back[0]["scores"], preds[0]["scores"])
    assert back[0]["labels"].tolist() == [2, 1]
    assert back[1]["boxes"].shape == (0, 4) and back[1]["labels"].dtype == torch.int64

    with pytest.raises(ValueError, match="image id 7 is not among the 1 image ids"):
        predictions_from_coco(results, [3], category_ids=[11, 22])
    with pytest.raises(ValueError, match="one image id per prediction"):
        predictions_to_coco(preds, [7], category_ids=[11, 22])
