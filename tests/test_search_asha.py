"""A real tiny sweep with `search.scheduler: asha` (`python -m search.cli sweep`, embedded local Ray, real
DeepForest tiles): the second trial is weak by construction (its detector's learning rate is 1e-8, so its
folds do not learn, and its F1 is taken at score threshold 0.999, which no untrained box reaches), ASHA stops it at its first rung, and the exported study (`optuna.db`) records it as
PRUNED while the strong trial, which ran all its epochs, is COMPLETE (search/optuna_search.py: a trial's own
last report carries `finished: 1`; one ended by the scheduler does not). With `checkpoint.keep_trials: 1` the
storage left holds the strong trial's fold models only (search/checkpoint_budget.py).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_sweep_data, write_tiny_sweep_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


def test_asha_stops_the_weak_trial_the_study_records_it_pruned_and_only_the_best_trial_keeps_models(deepforest_root: Path, tmp_path: Path) -> None:
    import optuna

    data = tiny_sweep_data(deepforest_root, tmp_path / "data", num_images=8)
    path = write_tiny_sweep_config(tmp_path / "sweep.yaml", name="asha", data=data, storage=tmp_path, num_samples=2,
                                   epochs=EPOCHS, image_size=64, train={"eval_batch_size": 4})
    config = yaml.safe_load(path.read_text())
    config["model"].update(roi_batch_size_per_image=32, rpn_post_nms_top_n_train=200)
    # keep_trials 1: once both trials have ended, only the strong one keeps its fold models (search/checkpoint_budget.py)
    config["checkpoint"] = {"resume_every": EPOCHS, "keep_trials": 1}
    config["search"].update(
        scheduler="asha", asha={"grace_period": 1, "reduction_factor": 2}, each_detector_first=True,
        space={"batch_size": [2], "detectors": [
            # strong first (trial 1), then the weak one (trial 2): ASHA compares trial 2's first rung with trial 1's
            {"arch": "faster_rcnn", "backbone": "resnet18", "lr": {"low": 0.01, "high": 0.01}},
            # no learning (lr 1e-8) and F1 at a score threshold no untrained box reaches: its score is half
            # its chance mAP@0.5
            {"arch": "faster_rcnn", "backbone": "mobilenet_v2", "lr": {"low": 1e-8, "high": 1e-8},
             "train": {"score_threshold": 0.999}},
        ]})
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "search.cli", "sweep", "--config", str(path), "--name", "exp",
                               "--no-dashboard"],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()[-5000:]
    experiment = tmp_path / "exp"

    epochs: dict[str, list[dict]] = {}
    for result in (experiment / "tune").glob("trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        epochs[rows[0]["trial_id"]] = rows
    by_detector = {rows[0]["config"]["detector"]: rows for rows in epochs.values()}
    strong, weak = by_detector["faster_rcnn/resnet18"], by_detector["faster_rcnn/mobilenet_v2"]
    assert [r["epoch"] for r in strong] == list(range(1, EPOCHS + 1)) and strong[-1]["finished"] == 1
    # Stopped by ASHA after its first epoch (grace period 1), below the strong trial's first rung.
    assert [r["epoch"] for r in weak] == [1] and weak[-1]["finished"] == 0
    assert weak[0]["f1_mean"] == 0 and weak[0]["cv_score"] < strong[0]["cv_score"]

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = {t.params.get("detector"): t.state for t in study.trials}
    assert states == {"faster_rcnn/resnet18": optuna.trial.TrialState.COMPLETE,
                      "faster_rcnn/mobilenet_v2": optuna.trial.TrialState.PRUNED}
    tune_ids = {t.params["detector"]: t.user_attrs["tune_trial_id"] for t in study.trials}
    assert tune_ids["faster_rcnn/mobilenet_v2"] == weak[0]["trial_id"]

    # The checkpoint budget, counted in files: no fold resume states anywhere (both trials ended), the strong
    # trial's latest checkpoint keeps its 2 fold models (keep_best 3, 2 folds), the weak one none and says why.
    trial_dirs = {rows[0]["trial_id"]: experiment / "tune" / f"trial_{rows[0]['trial_id']}" for rows in epochs.values()}
    assert not list((experiment / "tune").rglob("folds"))
    assert len(list(trial_dirs[strong[0]["trial_id"]].glob("checkpoint_*/best/rank-*.pt"))) == 2
    assert list(trial_dirs[weak[0]["trial_id"]].glob("checkpoint_*/best/rank-*.pt")) == []
    (removed,) = trial_dirs[weak[0]["trial_id"]].glob("checkpoint_*/best/removed.json")
    record = json.loads(removed.read_text())
    assert record["rank"] == 2 and record["keep_trials"] == 1 and "checkpoint.keep_trials" in record["reason"]
    assert len(list((experiment / "tune").rglob("rank-*.pt"))) == 2  # the whole sweep: keep_trials x 2 models
    # ... and the ensemble job, which runs on the strong trial's models alone, says so on the leaderboard.
    with (experiment / "leaderboard.csv").open() as handle:
        status = {row["trial_id"]: row["status"] for row in csv.DictReader(handle)}
    assert status[strong[0]["trial_id"]] == "ensembled" and status[weak[0]["trial_id"]] == "models not kept"
