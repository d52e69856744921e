"""`detsweep export-best` + `detsweep train --all-data`: the winner of a real finished sweep, retrained."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from detection.config import ConfigError, load_experiment_config
from search.cli import main as cli_main
from search.export import best_trial, export_best_config
from search.trial_results import read_trials


@pytest.mark.slow
def test_export_best_then_train_on_all_data(finished_sweep: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "best.yaml"
    assert cli_main(["export-best", str(finished_sweep), "--out", str(out)]) == 0
    assert f"detsweep train --config {out} --all-data" in capsys.readouterr().out

    best = json.loads((finished_sweep / "best_ensemble.json").read_text())
    heaviest = max(range(len(best["models"])), key=lambda i: (best["wbf"]["weights"][i], -i))
    trial_id = best["models"][heaviest]["trial_id"]  # the chosen ensemble's (heaviest model's) trial
    params = json.loads((finished_sweep / "tune" / f"trial_{trial_id}" / "params.json").read_text())
    config = load_experiment_config(out)
    arch, backbone = params["detector"].split("/")
    assert (config.model.arch, config.model.backbone) == (arch, backbone)
    assert config.train.lr == params["lr"] and config.train.batch_size == params["batch_size"]
    assert config.train.score_threshold is None and "score_threshold" not in params  # chosen on predictions
    # Everything else is the sweep's base config.
    sweep = yaml.safe_load((finished_sweep / "sweep.yaml").read_text())
    assert config.seed == sweep["seed"] and config.data.path == sweep["data"]["path"]
    for key in ("epochs", "image_size", "warmup_epochs", "patience", "optimizer", "weight_decay"):
        assert getattr(config.train, key) == sweep["train"][key], key
    assert config.model.start == sweep["model"]["start"]
    # The trial trained exactly this config (trial.json in its checkpoint holds the config it applied).
    trial_json = json.loads(next((finished_sweep / "tune").glob(f"trial_{trial_id}/checkpoint_*/trial.json"))
                            .read_text())
    assert trial_json["config"] == json.loads(json.dumps(config.to_dict()))
    assert out.read_text().startswith(f"# detsweep export-best {finished_sweep}\n# trial {trial_id} "
                                      f"(chosen ensemble on the selection split, score "
                                      f"{best['selection_metrics']['score']:.4f}); sampled params: ")

    run_dir = tmp_path / "run"
    assert cli_main(["train", "--config", str(out), "--all-data", "--epochs", "1", "--out", str(run_dir),
                     "--device", "cpu"]) == 0
    summary = json.loads((run_dir / "train.json").read_text())
    assert summary["all_data"] is True and summary["fold"] is None
    assert summary["config"]["model"] == json.loads(json.dumps(config.to_dict()))["model"]
    assert summary["config"]["train"]["lr"] == params["lr"]
    assert len(summary["history"]) == 1 and summary["history"][0]["loss"] > 0
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()


@pytest.mark.slow
def test_best_trial_before_the_ensemble_job_is_the_best_cv_trial(finished_sweep: Path, tmp_path: Path) -> None:
    experiment = shutil.copytree(finished_sweep, tmp_path / "exp",
                                 ignore=shutil.ignore_patterns("best_ensemble*", "ensemble", "leaderboard.*"))
    trial = best_trial(experiment)
    assert trial.source == "cv"
    runs = read_trials(experiment / "tune")
    top = max(runs, key=lambda r: (r.last["cv_score"], r.trial_id))
    assert trial.score == top.last["cv_score"]  # the sweep's metric
    assert trial.params == {k: top.params[k] for k in ("detector", "lr", "batch_size")}
    out = export_best_config(experiment, tmp_path / "cv.yaml")
    assert "best cross-validation score" in out.read_text().splitlines()[1]
    load_experiment_config(out)


@pytest.mark.slow
def test_best_ensemble_naming_an_unknown_trial_is_an_error(finished_sweep: Path, tmp_path: Path) -> None:
    experiment = shutil.copytree(finished_sweep, tmp_path / "exp", ignore=shutil.ignore_patterns("ensemble"))
    best_file = experiment / "best_ensemble.json"
    best = json.loads(best_file.read_text())
    assert "trial_id" not in best  # format 2: each model names its trial
    best_file.write_text(json.dumps({**best, "models": [{**m, "trial_id": "nosuchtrial"} for m in best["models"]]}))
    with pytest.raises(ConfigError, match=re.escape(str(best_file)) + ".*nosuchtrial"):
        export_best_config(experiment, tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.slow
def test_sweep_without_results_has_nothing_to_export(finished_sweep: Path, tmp_path: Path) -> None:
    """The empty case: a sweep folder whose trials have reported nothing."""
    experiment = tmp_path / "exp"
    experiment.mkdir()
    for name in ("sweep.yaml", "split.json"):
        shutil.copy(finished_sweep / name, experiment / name)
    with pytest.raises(ConfigError, match="no trial has reported `cv_score`"):  # the sweep's metric
        export_best_config(experiment, tmp_path / "x.yaml")


def test_export_from_a_folder_that_is_no_experiment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        export_best_config(tmp_path, tmp_path / "x.yaml")
