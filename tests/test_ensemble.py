"""The final ensemble job (search/ensemble.py) on a real finished sweep (`finished_sweep` in conftest.py: a real
`detsweep sweep` on DeepForest tiles with an embedded local Ray, whose last step is the ensemble job).

Everything is recomputed independently from what the job saved: metrics from the saved predictions and the
dataset's ground truth, predictions from the saved best ensemble, CV scores from Tune's own result files.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from detection.bootstrap import paired_bootstrap
from detection.data.coco import CocoDetection, load_dataset
from detection.data.splits import Split, unlearnable_labels
from detection.metrics import detection_metrics, f1_at_iou, keep_classes
from detection.predictions import load_predictions
from search.ensemble import (
    BEST_ENSEMBLE_JSON,
    ENSEMBLE_DIR,
    GREEDY,
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
    MIN_MODEL_WEIGHT,
    bootstrap_line,
    greedy_selection,
    run_ensemble,
)
from search.ensemble_models import (
    BEST_ENSEMBLE_DIR,
    EnsembleError,
    EnsembleSpec,
    load_ensemble,
    predict_ensemble,
    predictions_from_coco,
    predictions_to_coco,
)
from search.tuner import load_experiment

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("map", "map_50", "map_75", "f1", "score")


def read_leaderboard(experiment: Path) -> list[dict[str, str]]:
    with (experiment / LEADERBOARD_CSV).open(newline="") as handle:
        return list(csv.DictReader(handle))


def trial_rows(experiment: Path) -> list[dict[str, str]]:
    return [r for r in read_leaderboard(experiment) if r["status"] == "ensembled"]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def split_truth(experiment: Path, part: str) -> tuple[list[int], list[dict[str, torch.Tensor]], tuple[str, ...], list]:
    """The ids of a split part ("selection" or "test"), their ground truth at full resolution, the class names,
    and the images."""
    config = load_experiment(experiment)
    index = load_dataset(config.data.path, filter_empty=False)
    ids = list(getattr(Split.from_json(experiment / "split.json"), part))
    dataset = CocoDetection(index, ids, transforms=None)
    images, targets = zip(*(dataset[i] for i in range(len(dataset)))) if len(dataset) else ((), ())
    return ids, list(targets), index.class_names, list(images)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def hardlink_copy(experiment: Path, target: Path) -> Path:
    """A copy of an experiment folder that costs no disk (the job replaces files, it never edits them)."""
    shutil.copytree(experiment, target, copy_function=os.link)
    return target


def assert_f1_optimal(preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
                      threshold: float) -> None:
    """No score threshold gives these predictions a higher F1 than `threshold` (every score and a grid tried)."""
    chosen = f1_at_iou(preds, targets, score_threshold=threshold)[2]
    scores = torch.cat([p["scores"] for p in preds]).tolist() if preds else []
    for other in sorted(set(scores) | {i / 100 for i in range(101)}):
        assert chosen >= f1_at_iou(preds, targets, score_threshold=other)[2] - 1e-12, (threshold, other)


# ------------------------------------------------------------------------------------ the leaderboard


def test_selection_split_metrics_agree_with_a_recomputation_from_the_saved_predictions(finished_sweep: Path) -> None:
    rows = trial_rows(finished_sweep)
    assert len(rows) == 2  # the fixture's 2 trials both finish
    image_ids, targets, class_names, _ = split_truth(finished_sweep, "selection")
    assert image_ids, "the fixture's split must have selection images"
    boxes_seen = 0
    for row in rows:
        saved = read_json(finished_sweep / ENSEMBLE_DIR / f"{row['trial_id']}.json")
        assert saved["image_ids"] == image_ids and saved["split"] == "selection"
        spec = saved["ensemble"]
        preds = predictions_from_coco(saved["predictions"], image_ids, spec["category_ids"])
        boxes_seen += sum(len(p["boxes"]) for p in preds)
        recomputed = detection_metrics(preds, targets, score_threshold=spec["score_threshold"], class_names=class_names)
        for m in METRICS:
            assert float(row[m]) == pytest.approx(recomputed[m], abs=1e-6), (row["trial_id"], m)
            assert saved["metrics"][m] == pytest.approx(recomputed[m], abs=1e-6), (row["trial_id"], m)
        # The fused models' threshold is F1-optimal on their selection predictions; mAP ignores it.
        assert float(row["score_threshold"]) == pytest.approx(spec["score_threshold"], abs=1e-12)
        assert_f1_optimal(preds, targets, spec["score_threshold"])
    assert boxes_seen > 0, "the fused ensembles kept no box at all: the comparison above would be vacuous"


def test_leaderboard_ranks_trials_with_params_cv_scores_single_models_and_wbf(finished_sweep: Path) -> None:
    rows = trial_rows(finished_sweep)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    markdown = (finished_sweep / LEADERBOARD_MD).read_text()
    config = load_experiment(finished_sweep)
    for row in rows:
        trial_dir = finished_sweep / "tune" / f"trial_{row['trial_id']}"
        params = read_json(trial_dir / "params.json")
        assert row["detector"] == params["detector"] and row["split"] == "selection"
        assert float(row["lr"]) == pytest.approx(params["lr"], rel=1e-12)
        assert int(row["batch_size"]) == params["batch_size"]
        assert "score_threshold" not in params  # chosen on predictions, not sampled
        # CV score: the fold mean of each fold's best-epoch score (what Optuna was told), from Tune's results.
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        folds = range(config.data.num_folds)
        fold_best = [max(r[f"fold{k}/score"] for r in reports) for k in folds]
        assert reports[-1]["cv_score"] == pytest.approx(sum(fold_best) / len(fold_best), abs=1e-12)
        assert float(row["cv_score"]) == pytest.approx(reports[-1]["cv_score"], abs=1e-12)
        assert reports[-1]["finished"] == 1 and all(r["finished"] == 0 for r in reports[:-1])
        assert int(row["epochs"]) == config.train.epochs == len(reports)
        assert f"| {row['rank']} | {row['trial_id']} | selection | ensembled | {row['detector']} |" in markdown

        checkpoint = max(trial_dir.glob("checkpoint_*"))
        trial_json = read_json(checkpoint / "trial.json")
        assert row["start"] == trial_json["start"] == "none"  # the fixture trains from scratch
        # The best single fold model is one of the trial's own, the best on the selection split.
        best_models = read_json(checkpoint / "best" / "best.json")
        assert row["single_model"] in {f"{row['trial_id']}/fold-{m['fold']}" for m in best_models}
        assert float(row["single_score"]) == pytest.approx(
            0.5 * float(row["single_map_50"]) + 0.5 * float(row["single_f1"]), abs=1e-9)
        # WBF: skip_box_thr the fixed floor, weights the fold models' validation scores, iou_thr and conf_type
        # the sweep's (the leading trial's from the grid: the selection split tunes them).
        wbf = read_json(finished_sweep / ENSEMBLE_DIR / f"{row['trial_id']}.json")["ensemble"]["wbf"]
        assert int(row["num_models"]) == len(best_models) == min(3, config.data.num_folds)  # K=2 folds -> 2 models
        assert wbf["weights"] == [max(m["score"], MIN_MODEL_WEIGHT) for m in best_models]
        assert wbf["skip_box_thr"] == config.ensemble.skip_box_thr
        if row["rank"] == "1":
            assert wbf["iou_thr"] in (*config.ensemble.iou_thr_grid, config.ensemble.iou_thr)
            assert wbf["conf_type"] in (*config.ensemble.conf_type_grid, config.ensemble.conf_type)
        else:
            assert wbf["iou_thr"] == config.ensemble.iou_thr and wbf["conf_type"] == config.ensemble.conf_type


def test_trial_threshold_is_f1_optimal_on_its_saved_out_of_fold_predictions(finished_sweep: Path) -> None:
    config = load_experiment(finished_sweep)
    index = load_dataset(config.data.path, filter_empty=False)
    for row in trial_rows(finished_sweep):
        checkpoint = max((finished_sweep / "tune" / f"trial_{row['trial_id']}").glob("checkpoint_*"))
        split = Split.from_json(finished_sweep / "split.json")
        preds, targets = [], []
        for k in range(split.num_folds):  # each fold's validation images, predicted by the model that did not see them
            saved = load_predictions(checkpoint / "best" / f"oof-fold-{k}.pt")
            assert saved.image_ids == list(split.val_ids(k))
            fold_targets = [{"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels),
                             "iscrowd": torch.as_tensor(r.iscrowd)} for r in index.records(saved.image_ids)]
            # As the fold scored them: without the classes that none of its training images holds.
            unscored = unlearnable_labels(index, train_ids=split.train_ids(k), val_ids=split.val_ids(k))
            scored = [c for c in range(1, len(index.class_names) + 1) if c not in unscored]
            fold_preds, fold_targets = keep_classes(saved.preds, fold_targets, scored)
            preds += fold_preds
            targets += fold_targets
        threshold = read_json(checkpoint / "trial.json")["score_threshold"]
        assert_f1_optimal(preds, targets, threshold)


# ------------------------------------------------------------------------------------- chosen ensemble


def test_the_winner_is_chosen_on_the_selection_split_and_only_it_is_scored_on_the_test_split(
        finished_sweep: Path) -> None:
    board = read_leaderboard(finished_sweep)
    by_name = {r["trial_id"]: r for r in board}
    manifest = read_json(finished_sweep / BEST_ENSEMBLE_JSON)
    candidates = {r["trial_id"]: float(r["score"]) for r in board if r["status"] in ("ensembled", "greedy ensemble")}
    assert GREEDY in candidates  # 2 trials x 2 fold models: greedy selection runs
    assert manifest["name"] == max(candidates, key=lambda n: (candidates[n], n != GREEDY))
    assert manifest["selection_metrics"]["score"] == pytest.approx(candidates[manifest["name"]], abs=1e-12)
    greedy = read_json(finished_sweep / ENSEMBLE_DIR / f"{GREEDY}.json")["ensemble"]
    assert 1 <= sum(greedy["wbf"]["weights"]) <= load_experiment(finished_sweep).ensemble.max_models

    # The test split: the chosen ensemble at its selection threshold, recomputed from its saved predictions.
    chosen, single = by_name["chosen"], by_name["best single model"]
    assert chosen["split"] == single["split"] == "test"
    image_ids, targets, class_names, _ = split_truth(finished_sweep, "test")
    saved = read_json(finished_sweep / ENSEMBLE_DIR / "test.json")
    assert saved["image_ids"] == image_ids and saved["name"] == manifest["name"]
    assert saved["ensemble"]["score_threshold"] == manifest["score_threshold"]  # chosen on selection, not on test
    preds = predictions_from_coco(saved["predictions"], image_ids, manifest["category_ids"])
    recomputed = detection_metrics(preds, targets, score_threshold=manifest["score_threshold"], class_names=class_names)
    for m in METRICS:
        assert float(chosen[m]) == pytest.approx(recomputed[m], abs=1e-6), m
        assert manifest["test_metrics"][m] == pytest.approx(recomputed[m], abs=1e-6), m
    assert single["single_model"] == manifest["best_single_model"]["model"]
    assert float(single["score"]) == pytest.approx(manifest["best_single_model"]["test"]["score"], abs=1e-12)
    text = (finished_sweep / LEADERBOARD_MD).read_text()
    assert f"Test split (scored once): chosen ensemble map_50 {float(chosen['map_50']):.4f}" in text

    # The paired bootstrap's intervals for the chosen ensemble ("a") depend on its predictions and the seed
    # alone: resampling its saved test predictions against themselves reproduces them.
    boot = manifest["test_bootstrap"]
    config = load_experiment(finished_sweep)
    assert (boot["samples"], boot["images"], boot["seed"]) == (config.ensemble.bootstrap_samples, len(image_ids),
                                                               config.seed)
    again = paired_bootstrap(preds, preds, targets, thresholds=(manifest["score_threshold"],) * 2,
                             samples=boot["samples"], seed=boot["seed"])
    for m in ("map_50", "f1", "score"):
        assert again["a"][m] == pytest.approx(boot["a"][m], abs=1e-6), m
        assert boot["a"][m][0] <= boot["a"][m][1] and boot["b"][m][0] <= boot["b"][m][1]
        assert boot["difference"][m][0] <= boot["difference"][m][1]
    assert bootstrap_line(boot) in text


def test_best_ensemble_loads_and_reproduces_the_saved_test_predictions(finished_sweep: Path) -> None:
    manifest = read_json(finished_sweep / BEST_ENSEMBLE_JSON)
    # The model files were copied out of Tune's checkpoints (which the next checkpoint would replace).
    for model in manifest["models"]:
        path = Path(model["path"])
        assert path.is_absolute() and path.parent == (finished_sweep / BEST_ENSEMBLE_DIR).resolve()
        source = next((finished_sweep / "tune" / f"trial_{model['trial_id']}").glob("checkpoint_*/best/best.json"))
        rank_file = next(e["file"] for e in read_json(source) if e["fold"] == model["fold"])
        sources = [p / "best" / rank_file for p in (finished_sweep / "tune" / f"trial_{model['trial_id']}").glob(
            "checkpoint_*")]
        assert path.read_bytes() in [p.read_bytes() for p in sources if p.is_file()]

    models, spec = load_ensemble(finished_sweep / BEST_ENSEMBLE_JSON, "cpu")
    assert len(models) == len(manifest["models"]) and spec.name == manifest["name"]
    assert {(m.arch, m.backbone) for m in spec.models} == {("faster_rcnn", "mobilenet_v2")}
    assert spec.class_names == ("Tree", "Dead", "Alive") and spec.score_threshold == manifest["score_threshold"]

    image_ids, targets, class_names, images = split_truth(finished_sweep, "test")
    # The job's Ray task had 1 CPU, so torch ran on 1 thread there: the same here gives the same floats
    # (with more threads, sums in another order can tip a box near the IoU threshold into another WBF cluster).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fused = predict_ensemble(models, spec, images, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    saved = read_json(finished_sweep / ENSEMBLE_DIR / "test.json")
    expected = predictions_from_coco(saved["predictions"], image_ids, spec.category_ids)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=0)  # pixels, xyxy absolute
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-6, rtol=0)
        assert torch.equal(got["labels"], want["labels"])
    again = detection_metrics(fused, targets, score_threshold=spec.score_threshold, class_names=class_names)
    for m in METRICS:
        assert again[m] == pytest.approx(manifest["test_metrics"][m], abs=1e-3), m


def test_the_chosen_wbf_settings_are_the_best_of_the_grid_on_the_selection_split(finished_sweep: Path) -> None:
    """Recomputed from the chosen models' own selection predictions: no iou_thr x conf_type x flip TTA of the
    config's grid fuses them to a higher selection score than the settings best_ensemble.json records."""
    from detection.engine import predict
    from detection.fusion import fuse_predictions

    config = load_experiment(finished_sweep).ensemble
    manifest = read_json(finished_sweep / BEST_ENSEMBLE_JSON)
    models, spec = load_ensemble(finished_sweep / BEST_ENSEMBLE_JSON, "cpu")
    assert spec.iou_thr in (*config.iou_thr_grid, config.iou_thr)
    assert spec.conf_type in (*config.conf_type_grid, config.conf_type)
    _, targets, class_names, images = split_truth(finished_sweep, "selection")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's 1-CPU task
    try:
        per_model = [predict(model, images, device="cpu", batch_size=2) for model in models]
        mirrored = [predict(model, images, device="cpu", batch_size=2, hflip=True) for model in models]
    finally:
        torch.set_num_threads(threads)
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]

    def score(iou_thr: float, conf_type: str, hflip_tta: bool) -> float:
        members = per_model + mirrored if hflip_tta else per_model
        weights = list(spec.weights) * (2 if hflip_tta else 1)
        fused = fuse_predictions(members, sizes, weights=weights, iou_thr=iou_thr, skip_box_thr=spec.skip_box_thr,
                                 conf_type=conf_type)
        return detection_metrics(fused, targets, score_threshold=None, class_names=class_names)["score"]

    assert config.hflip_tta_grid == (False, True)
    chosen = score(spec.iou_thr, spec.conf_type, spec.hflip_tta)
    assert chosen == pytest.approx(manifest["selection_metrics"]["score"], abs=1e-6)
    tried = {}
    for hflip_tta in config.hflip_tta_grid:
        for iou_thr in config.iou_thr_grid:
            for conf_type in config.conf_type_grid:
                tried[iou_thr, conf_type, hflip_tta] = score(iou_thr, conf_type, hflip_tta)
                assert tried[iou_thr, conf_type, hflip_tta] <= chosen + 1e-6, (iou_thr, conf_type, hflip_tta)
    # the mirrored view changes what is fused: the grid's two halves are not the same numbers
    assert any(abs(tried[i, c, True] - tried[i, c, False]) > 1e-6 for i, c, _ in tried)
    text = (finished_sweep / LEADERBOARD_MD).read_text()
    tta = ", flip TTA" if spec.hflip_tta else ""
    assert f"(WBF iou_thr {spec.iou_thr}, conf_type {spec.conf_type}{tta})" in text


def test_greedy_selection_with_replacement_on_hand_made_scores() -> None:
    # Scores of multisets of three models: b alone is best; a + b beats b; b twice + c beats everything.
    table = {("b",): 0.5, ("a",): 0.4, ("c",): 0.1, ("a", "b"): 0.6, ("b", "b"): 0.45, ("b", "c"): 0.55,
             ("a", "a", "b"): 0.58, ("a", "b", "b"): 0.59, ("a", "b", "c"): 0.61,
             ("a", "a", "a", "b"): 0.5, ("a", "a", "b", "c"): 0.5, ("a", "b", "b", "c"): 0.7, ("a", "b", "c", "c"): 0.6}
    calls = []

    def score_of(keys: list[str]) -> float:
        calls.append(tuple(keys))
        return table[tuple(sorted(keys))]

    chosen, score = greedy_selection(["a", "b", "c"], score_of, max_models=4)
    # b (0.5) -> + a (0.6) -> + c (0.61 > 0.59 > 0.58) -> + b (0.7): with replacement, b twice.
    assert sorted(chosen) == ["a", "b", "b", "c"] and score == 0.7
    chosen, score = greedy_selection(["a", "b", "c"], score_of, max_models=2)
    assert sorted(chosen) == ["a", "b"] and score == 0.6
    assert greedy_selection(["a", "b", "c"], score_of, max_models=1) == (["b"], 0.5)
    with pytest.raises(ValueError, match="at least one candidate"):
        greedy_selection([], score_of, max_models=3)


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


def test_flip_tta_fuses_each_models_mirrored_view_at_its_weight(finished_sweep: Path) -> None:
    """`predict_ensemble` with flip TTA on (and off, whichever the sweep did not choose) is WBF over every model's
    predictions on the images and on their mirrors (boxes mirrored back), each at the model's weight."""
    from dataclasses import replace

    from detection.engine import predict
    from detection.fusion import fuse_predictions

    models, spec = load_ensemble(finished_sweep / BEST_ENSEMBLE_JSON, "cpu")
    _, _, _, images = split_truth(finished_sweep, "test")
    images = images[:3]
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    plain = [predict(model, images, device="cpu") for model in models]
    mirrored = [predict(model, images, device="cpu", hflip=True) for model in models]
    for hflip_tta in (False, True):
        flipped_spec = replace(spec, hflip_tta=hflip_tta)
        got = predict_ensemble(models, flipped_spec, images)
        members, weights = (plain + mirrored, list(spec.weights) * 2) if hflip_tta else (plain, list(spec.weights))
        want = fuse_predictions(members, sizes, weights=weights, iou_thr=spec.iou_thr, skip_box_thr=spec.skip_box_thr,
                                conf_type=spec.conf_type)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g["boxes"], w["boxes"])
            torch.testing.assert_close(g["scores"], w["scores"])
        # the flag survives best_ensemble.json
        round_trip = EnsembleSpec.from_json(json.loads(json.dumps(flipped_spec.to_json())), where="-")
        assert round_trip.hflip_tta is hflip_tta
    assert any(len(p["boxes"]) for p in got)


def test_load_ensemble_finds_moved_models_and_names_bad_manifests(finished_sweep: Path, tmp_path: Path) -> None:
    manifest = read_json(finished_sweep / BEST_ENSEMBLE_JSON)
    moved = tmp_path / "moved"
    shutil.copytree(finished_sweep / BEST_ENSEMBLE_DIR, moved / BEST_ENSEMBLE_DIR)
    stale = {**manifest, "models": [{**m, "path": str(tmp_path / "gone" / Path(m["path"]).name)}
                                    for m in manifest["models"]]}
    (moved / BEST_ENSEMBLE_JSON).write_text(json.dumps(stale))
    models, spec = load_ensemble(moved / BEST_ENSEMBLE_JSON, "cpu")
    assert len(models) == len(manifest["models"])
    assert [Path(m.path).parent for m in spec.models] == [moved / BEST_ENSEMBLE_DIR] * len(models)

    no_wbf = {k: v for k, v in manifest.items() if k != "wbf"}
    (tmp_path / "no_wbf.json").write_text(json.dumps(no_wbf))
    with pytest.raises(EnsembleError, match=r"no_wbf\.json: missing key 'wbf'"):
        load_ensemble(tmp_path / "no_wbf.json", "cpu")

    (tmp_path / "broken.json").write_text('{"name": ')
    with pytest.raises(EnsembleError, match=r"broken\.json: malformed JSON at line 1"):
        load_ensemble(tmp_path / "broken.json", "cpu")

    old = {**manifest, "format": 1}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(EnsembleError, match=r"old\.json: `format` is 1, but this version reads ensemble manifests "
                                            r"of format 2"):
        load_ensemble(tmp_path / "old.json", "cpu")

    short = {**manifest, "wbf": {**manifest["wbf"], "weights": manifest["wbf"]["weights"] + [1.0]}}
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(EnsembleError, match=r"`wbf.weights` must hold one weight per model"):
        load_ensemble(tmp_path / "short.json", "cpu")

    odd_flag = {**manifest, "wbf": {**manifest["wbf"], "hflip_tta": "yes"}}
    (tmp_path / "odd_flag.json").write_text(json.dumps(odd_flag))
    with pytest.raises(EnsembleError, match=r"odd_flag\.json: `wbf.hflip_tta` must be true or false, but got 'yes'"):
        load_ensemble(tmp_path / "odd_flag.json", "cpu")
    unflipped = {**manifest, "wbf": {k: v for k, v in manifest["wbf"].items() if k != "hflip_tta"}}
    (moved / "unflipped.json").write_text(json.dumps(unflipped))  # written before flip TTA: no mirrored view
    assert load_ensemble(moved / "unflipped.json", "cpu")[1].hflip_tta is False

    (tmp_path / "lost.json").write_text(json.dumps(stale))  # no best_ensemble/ beside it either
    with pytest.raises(EnsembleError, match=r"gone/.*\.pt: model file of trial .* not found"):
        load_ensemble(tmp_path / "lost.json", "cpu")


# ------------------------------------------------------------------------------------- the command


def test_ensemble_command_on_one_chosen_trial_matches_the_sweeps_own_run(finished_sweep: Path, tmp_path: Path) -> None:
    experiment = hardlink_copy(finished_sweep, tmp_path / "exp")
    before = read_leaderboard(finished_sweep)
    second = trial_rows(finished_sweep)[1]
    # This run also turns the test bootstrap off (a new file, not an edit through the hard link).
    sweep_yaml = experiment / "sweep.yaml"
    text, found = re.subn(r"bootstrap_samples: [1-9][0-9]*\n", "bootstrap_samples: 0\n", sweep_yaml.read_text())
    assert found == 1
    sweep_yaml.unlink()
    sweep_yaml.write_text(text)

    done = run_cli("ensemble", str(experiment), "--trial", second["trial_id"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"| 1 | {second['trial_id']} | selection | ensembled |" in done.stdout  # the leaderboard is printed
    (row,) = trial_rows(experiment)
    assert row["trial_id"] == second["trial_id"]
    # Alone, the trial leads, so the selection split also tunes its WBF settings (its sweep's ones among them).
    wbf = read_json(experiment / ENSEMBLE_DIR / f"{second['trial_id']}.json")["ensemble"]["wbf"]
    wbf_before = read_json(finished_sweep / ENSEMBLE_DIR / f"{second['trial_id']}.json")["ensemble"]["wbf"]
    assert float(row["score"]) >= float(second["score"]) - 1e-6
    if (wbf["iou_thr"], wbf["conf_type"]) == (wbf_before["iou_thr"], wbf_before["conf_type"]):
        for m in METRICS:  # the same models on the same images: the same numbers as in the sweep's own run
            assert float(row[m]) == pytest.approx(float(second[m]), abs=1e-6), m
    else:
        assert float(row["score"]) > float(second["score"])
    chosen = read_json(experiment / BEST_ENSEMBLE_JSON)
    assert {m["trial_id"] for m in chosen["models"]} == {second["trial_id"]}  # greedy among its own models at most
    assert chosen["test_bootstrap"] is None and chosen["test_metrics"]
    assert "Paired bootstrap" not in (experiment / "leaderboard.md").read_text()
    assert "Paired bootstrap" in (finished_sweep / "leaderboard.md").read_text()
    # The sweep's own results were never touched through the links.
    assert read_leaderboard(finished_sweep) == before

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
    assert row["status"] == "ERROR" and row["rank"] == "" and row["score"] == ""  # no greedy or test rows either
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
