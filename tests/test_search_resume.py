"""Kill the sweep driver in the middle of a sweep, then `detsweep resume`: real processes, real Ray, real data.

The sweep runs as `python -m search.cli sweep` in its own process group; once the first trial has
reported its first epoch the whole group gets SIGKILL (driver, its embedded Ray, the trial and its fold
workers). `detsweep resume` must then finish the sweep with exactly `num_samples` trials, continue the
killed trial from its checkpoint (no epoch trained twice) and leave no Optuna trial running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import tiny_sweep_data, write_tiny_sweep_config
from search.tuner import OPTUNA_DB, SPLIT_JSON, SWEEP_YAML, TUNE_DIR, optuna_storage_url, sweep_status

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES, EPOCHS = 2, 2  # the killed trial resumes mid-way and the second one is sampled after the resume


def write_config(tmp_path: Path, data_path: Path) -> Path:
    return write_tiny_sweep_config(tmp_path / "sweep.yaml", name="resume", data=data_path,
                                   storage=tmp_path / "experiments", num_samples=NUM_SAMPLES, epochs=EPOCHS,
                                   image_size=64, score_threshold=(0.2, 0.4), model={"kmeans_anchors": False},
                                   train={"augment": False, "eval_batch_size": 4})


def result_rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpointed(tune_dir: Path) -> tuple[str, int] | None:
    """(trial id, epoch) of the first checkpoint the experiment state records, else None.

    Waiting for result.json alone is not enough: Tune writes a result row before it records the result's
    checkpoint in the experiment state, and a driver killed in between re-runs that epoch on resume.
    """
    from ray.tune import ExperimentAnalysis

    if not any(result_rows(d) for d in tune_dir.glob("trial_*")):
        return None
    try:
        trials = ExperimentAnalysis(str(tune_dir)).trials
    except (ValueError, OSError, EOFError):  # no state yet, or one being written
        return None
    for trial in trials:
        if trial.latest_checkpoint_result is not None:
            return trial.trial_id, int(trial.latest_checkpoint_result.metrics["training_iteration"])
    return None


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args, "--no-dashboard", "--no-ensemble"]


@pytest.mark.slow
def test_killed_driver_then_resume_completes_without_duplicate_work(tmp_path, deepforest_root):
    config = write_config(tmp_path, tiny_sweep_data(deepforest_root, tmp_path / "data", num_images=8))
    experiment = tmp_path / "experiments" / "exp"
    tune_dir = experiment / TUNE_DIR
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    with open(tmp_path / "sweep.log", "w") as log:
        driver = subprocess.Popen(cli("sweep", "--config", str(config), "--name", "exp"), cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 400  # generous: the machine may be shared
            while (found := checkpointed(tune_dir)) is None:
                assert driver.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no trial checkpointed an epoch within 400 s"
                time.sleep(0.5)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
            driver.wait()

    trial_id, killed_epochs = found
    first = tune_dir / f"trial_{trial_id}"
    assert (experiment / SWEEP_YAML).is_file() and (experiment / SPLIT_JSON).is_file()
    killed_rows = result_rows(first)
    assert 1 <= killed_epochs == len(killed_rows) < EPOCHS  # killed mid-way, right after a checkpoint

    # `status` works on the killed sweep (no Ray needed): one trial with its epochs so far.
    rows = sweep_status(experiment)
    assert [r.trial_id for r in rows] == [first.name.removeprefix("trial_")]
    assert rows[0].epochs >= killed_epochs

    with open(tmp_path / "resume.log", "w") as log:
        resumed = subprocess.Popen(cli("resume", str(experiment)), cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = resumed.wait(timeout=600)
        finally:
            if resumed.poll() is None:  # timed out: leave no Ray behind
                os.killpg(resumed.pid, signal.SIGKILL)
                resumed.wait()
    assert returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]

    trial_dirs = sorted(tune_dir.glob("trial_*"))
    assert len(trial_dirs) == NUM_SAMPLES
    for trial_dir in trial_dirs:
        iterations = [r["training_iteration"] for r in result_rows(trial_dir)]
        assert iterations == list(range(1, EPOCHS + 1)), (trial_dir.name, iterations)  # each epoch once

    # The killed trial continued from its checkpoint in new fold processes (after the kill) ...
    continued = result_rows(first)
    assert continued[:killed_epochs] == killed_rows
    assert {r["fold0/pid"] for r in continued[killed_epochs:]}.isdisjoint({r["fold0/pid"] for r in killed_rows})
    # ... and kept its parameters.
    assert {json.dumps(r["config"], sort_keys=True) for r in continued} == {json.dumps(killed_rows[0]["config"],
                                                                                        sort_keys=True)}

    rows = sweep_status(experiment)
    assert len(rows) == NUM_SAMPLES and {r.status for r in rows} == {"TERMINATED"}
    assert all(r.epochs == EPOCHS and r.score_mean is not None and r.cv_score is not None for r in rows)
    assert f"{NUM_SAMPLES}/{NUM_SAMPLES} trials: {NUM_SAMPLES} terminated" in subprocess.run(
        [sys.executable, "-m", "search.cli", "status", str(experiment)], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=120, check=True).stdout

    # The Optuna history survived the kill (the searcher state is restored with the experiment): one study,
    # num_samples complete trials, exported to optuna.db.
    storage = optuna_storage_url(experiment)
    assert (experiment / OPTUNA_DB).is_file()
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * NUM_SAMPLES
    by_id = {r.trial_id: r for r in rows}
    assert sorted(t.user_attrs["tune_trial_id"] for t in study.trials) == sorted(by_id)
    for t in study.trials:
        row = by_id[t.user_attrs["tune_trial_id"]]
        assert (t.params["lr"], t.params["batch_size"]) == (pytest.approx(row.lr), row.batch_size)
        assert t.value == pytest.approx(row.cv_score)  # the last reported cv_score (search.metric)
