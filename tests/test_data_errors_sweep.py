"""Bad data against `detsweep sweep` / `resume` / `data check`: real files (copies of the DeepForest tiles), real
local Ray and Tune.

- Before Ray: a truncated file, a 0-byte file, a size that differs from the JSON, or more folds than images stop
  with exit status 2 and one message naming the file or key; no Ray session starts, no Tune folder appears.
- `data.on_bad_image: skip`: the sweep runs on the rest and split.json + the manifest list what was left out;
  a negative-width box is dropped and the driver's load summary counts it with its reason.
- Inside a running sweep (a file changed after the check): the sweep stops at once (no retry, no next trial),
  exit status 2; `detsweep resume` continues once the file is fixed.
- search/failures.py on a real Tune run: a deterministic failure is not run again, a retryable one is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_sweep_data, write_tiny_sweep_config
from search.cli import main
from search.tuner import DATA_SUMMARY_JSON, SPLIT_JSON, TUNE_DIR, sweep_status

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args]


def sweep_config(tmp_path: Path, data: Path, *, num_samples: int = 1, **data_keys) -> Path:
    path = write_tiny_sweep_config(tmp_path / "sweep.yaml", name="bad", data=data, storage=tmp_path / "experiments",
                                   num_samples=num_samples, epochs=1, image_size=64, score_threshold=(0.2, 0.4),
                                   model={"kmeans_anchors": False},
                                   train={"augment": False, "eval_batch_size": 4})
    if data_keys:
        config = yaml.safe_load(path.read_text())
        config["data"].update(data_keys)
        path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def data(tmp_path, deepforest_root) -> Path:
    """8 annotated real DeepForest tiles as one COCO file with the PNGs beside it (a private copy)."""
    return tiny_sweep_data(deepforest_root, tmp_path / "data", num_images=8)


def image(data: Path, position: int) -> tuple[dict, Path]:
    entry = json.loads(data.read_text())["images"][position]
    return entry, data.parent / entry["file_name"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


# ------------------------------------------------------------------------------------- before Ray


def mismatch_size(data: Path) -> None:
    coco = json.loads(data.read_text())
    coco["images"][2]["width"] += 8
    data.write_text(json.dumps(coco))


@pytest.mark.parametrize("case, spoil, expected", [
    ("truncated", lambda data: truncate(image(data, 2)[1]), "is truncated: no PNG end marker (IEND)"),
    ("empty", lambda data: image(data, 2)[1].write_bytes(b""), "is empty (0 bytes)"),
    ("size", mismatch_size, "is 400x400 (WxH), but the annotation file says 408x400"),
])
def test_bad_image_stops_the_sweep_before_ray(tmp_path, data, capsys, case, spoil, expected):
    import ray

    assert not ray.is_initialized()
    spoil(data)
    entry, path = image(data, 2)
    with pytest.raises(SystemExit) as raised:
        main(["sweep", "--config", str(sweep_config(tmp_path, data)), "--name", "exp", "--no-dashboard"])
    err = capsys.readouterr().err
    assert raised.value.code == 2, err
    assert f"annotations.json#{entry['id']}: image id 2: {path} {expected}" in err
    assert "1 of 8 image files are bad" in err and "Traceback" not in err
    assert not ray.is_initialized() and not (tmp_path / "experiments" / "exp" / TUNE_DIR).exists()


def test_too_many_folds_is_a_config_error_before_ray(tmp_path, data, capsys):
    import ray

    config = sweep_config(tmp_path, data, num_folds=7)  # 8 images: 2 selection, 2 test -> 4 for the folds
    with pytest.raises(SystemExit) as raised:
        main(["sweep", "--config", str(config), "--name", "exp", "--no-dashboard"])
    err = capsys.readouterr().err
    assert raised.value.code == 2, err
    assert "`data.num_folds` = 7 needs at least 7 images for the folds, but only 4 of the 8 images remain" in err
    assert "selection 2 (`data.selection_fraction` = 0.25), test 2 (`data.test_fraction` = 0.25)" in err
    assert "Traceback" not in err and not ray.is_initialized()
    assert not (tmp_path / "experiments" / "exp" / TUNE_DIR).exists()


def test_data_check_command(tmp_path, data, capsys):
    truncate(image(data, 4)[1])
    with pytest.raises(SystemExit) as raised:
        main(["data", "check", str(data)])
    out, err = capsys.readouterr()
    assert raised.value.code == 2 and "8 images (0 without boxes)" in out and "1 bad image files" in out
    assert f"image id 4: {image(data, 4)[1]} is truncated" in err
    config = sweep_config(tmp_path, data, on_bad_image="skip")
    assert main(["data", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "left out (data.on_bad_image: skip)" in out and "3 images for 2 folds: a sweep can start." in out


# ---------------------------------------------------------------------------------- real sweeps


def test_skip_runs_the_sweep_without_the_bad_files(tmp_path, data):
    truncate(image(data, 1)[1])
    coco = json.loads(data.read_text())
    coco["annotations"].append({**coco["annotations"][0], "id": 10_000, "bbox": [10, 10, -5, 20]})  # negative width
    data.write_text(json.dumps(coco))
    config = sweep_config(tmp_path, data, on_bad_image="skip")
    done = subprocess.run(cli("sweep", "--config", str(config), "--name", "exp", "--no-dashboard", "--no-ensemble"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The driver's load summary, with the dropped box's reason and the bad file.
    assert "1 dropped (1 negative width or height), 1 bad image files (header check" in done.stderr
    assert "Leaving 1 bad image files out of the split" in done.stderr

    experiment = tmp_path / "experiments" / "exp"
    split = json.loads((experiment / SPLIT_JSON).read_text())
    assert [e["image_id"] for e in split["excluded"]] == [1] and split["excluded"][0]["file"] == str(image(data, 1)[1])
    assert split["excluded"][0]["reason"].startswith("is truncated")
    used = {*split["selection"], *split["test"], *(i for fold in split["folds"] for i in fold)}
    assert used == set(range(8)) - {1}
    summary = json.loads((experiment / DATA_SUMMARY_JSON).read_text())
    assert summary["boxes_dropped"] == {"negative width or height": 1} and summary["bad_images"][0]["image_id"] == 1
    manifest = json.loads(next(experiment.glob("tune/trial_*/checkpoint_*/manifest.json")).read_text())
    assert manifest["data"] == summary
    assert [r.status for r in sweep_status(experiment)] == ["TERMINATED"]


def test_data_error_inside_a_trial_stops_the_sweep_and_resume_continues(tmp_path, data):
    config = sweep_config(tmp_path, data, num_samples=2)
    experiment = tmp_path / "experiments" / "exp"
    _, victim = image(data, 3)
    good = victim.read_bytes()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "sweep.log", "w") as log:
        driver = subprocess.Popen(cli("sweep", "--config", str(config), "--name", "exp", "--no-dashboard",
                                      "--no-ensemble"), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (experiment / SPLIT_JSON).is_file():  # checked and split: now the file "changes"
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.2)
        truncate(victim)
        rc = driver.wait(timeout=600)
    text = (tmp_path / "sweep.log").read_text()
    assert rc == 2, text[-4000:]
    # One last line from the CLI (Tune itself logs the trial's traceback above it).
    assert re.search(rf"detsweep sweep: error: fold \d: bad data in (train|eval): .*{re.escape(str(victim))}", text)
    assert "no retry, no further trials" in text and "detsweep resume" in text
    trials = sorted((experiment / TUNE_DIR).glob("trial_*"))
    assert len(trials) == 1  # no further trial started
    errors = (trials[0] / "error.txt").read_text()
    assert errors.count("Failure # ") == 1  # not retried
    assert [r.status for r in sweep_status(experiment)] == ["PENDING"]  # resumable

    with pytest.raises(SystemExit) as raised:  # still bad: resume stops before Ray
        main(["resume", str(experiment), "--no-dashboard", "--no-ensemble"])
    assert raised.value.code == 2

    victim.write_bytes(good)
    done = subprocess.run(cli("resume", str(experiment), "--no-dashboard", "--no-ensemble"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(r.status for r in sweep_status(experiment)) == ["TERMINATED", "TERMINATED"]


# ------------------------------------------------------------------- search/failures.py on real Tune


def flaky(config):
    """Fails with `config["reason"]` on its first run (a marker file counts the runs), then finishes."""
    from ray import tune

    from search.failures import refuse_retry
    from trainables.trial import TrialFailed

    refuse_retry(tune.get_context().get_trial_id())
    runs = Path(config["dir"]) / f"runs-{config['reason'].replace(' ', '_')}"
    count = int(runs.read_text()) + 1 if runs.is_file() else 1
    runs.write_text(str(count))
    if count == 1:
        raise TrialFailed(f"fold 0: {config['reason']} in train: boom", fold=0, reason=config["reason"])
    tune.report({"score": 1.0})


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `flaky` travels by value: tests/ is no package
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def run_flaky(tmp_path: Path, reasons: list[str], *, max_failures: int = 2):
    from ray import tune

    from search.failures import FailurePolicy

    tuner = tune.Tuner(
        tune.with_resources(flaky, {"cpu": 0.5}),
        param_space={"reason": tune.grid_search(reasons), "dir": str(tmp_path)},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="flaky", verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures),
                                  callbacks=[FailurePolicy()]),
    )
    return tuner.fit()


def runs(tmp_path: Path, reason: str) -> int:
    return int((tmp_path / f"runs-{reason.replace(' ', '_')}").read_text())


def test_deterministic_failure_is_not_run_again_but_a_lost_worker_is(tmp_path, local_ray):
    results = run_flaky(tmp_path, ["non-finite loss", "worker lost"])
    by_reason = {r.config["reason"]: r for r in results}
    # non-finite loss: Tune requeued it (max_failures=2), the restart refused at once, the trial errored.
    assert runs(tmp_path, "non-finite loss") == 1 and by_reason["non-finite loss"].error is not None
    assert "not run again from the same state" in str(by_reason["non-finite loss"].error)
    # worker lost: retried from the start and finished.
    assert runs(tmp_path, "worker lost") == 2 and by_reason["worker lost"].error is None


def test_data_error_in_a_trial_stops_tune_at_once(tmp_path, local_ray):
    from search.failures import take_stop

    take_stop()
    results = run_flaky(tmp_path, ["bad data", "worker lost"])
    stop = take_stop()
    assert stop is not None and stop["reason"] == "bad data" and "boom" in stop["message"]
    assert runs(tmp_path, "bad data") == 1  # not retried
    assert not (tmp_path / "runs-worker_lost").exists()  # the next trial never started
    assert len(results) == 1 and take_stop() is None  # the grid's second trial was never even created


def test_the_driver_names_the_fold_that_cannot_learn_a_class_before_ray(deepforest_root, tmp_path, caplog):
    # The demo's split: the one tile with Dead and Alive boxes lands in one fold's validation.
    from search.config import sweep_config_from_dict
    from search.tuner import prepare_experiment

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["data"]["path"] = str(deepforest_root)
    config = sweep_config_from_dict(raw, where="demo.yaml")
    with caplog.at_level("WARNING", logger="search.tuner"):
        prepare_experiment(config, experiment_dir=tmp_path / "exp")
    warnings = [r.getMessage() for r in caplog.records if "no training image of the fold holds" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert re.search(r"fold [01] validates on Dead, Alive, .* leave them out", warnings[0]), warnings[0]
    assert not (tmp_path / "exp" / TUNE_DIR).exists()
