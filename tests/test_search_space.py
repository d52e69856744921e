"""The define-by-run space with a real Optuna study, and the searcher that Tune drives (no Ray cluster)."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest

from search.config import DetectorChoice, FloatRange, SweepConfig, sweep_config_from_dict
from search.space import DetectorSpace, build_search_space, lr_param_name
from detection.config import ConfigError
from search.tuner import OPTUNA_DB, TUNE_DIR, build_searcher, optuna_storage_url, write_optuna_db
from trainables.trial import TRIAL_PARAMS

SPACE = DetectorSpace(
    detectors=(DetectorChoice("faster_rcnn", "mobilenet_v2"),
               DetectorChoice("fcos_tal", "resnet18", lr=FloatRange(1e-5, 1e-4))),
    lr=FloatRange(1e-3, 1e-1),
    batch_sizes=(4, 8),
    score_threshold=FloatRange(0.2, 0.6),
)


def tpe(seed: int) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=5)


def run_study(seed: int, n_trials: int) -> list[dict]:
    """Sample `n_trials` configs the way OptunaSearch does: suggested values merged with the returned dict."""
    study = optuna.create_study(direction="maximize", sampler=tpe(seed))
    configs = []

    def objective(trial: optuna.Trial) -> float:
        returned = SPACE(trial)
        config = {**trial.params, **returned}
        configs.append(config)
        # A made-up smooth score so that TPE has something to model: best near lr 1e-2 and threshold 0.4.
        return -abs(math.log10(config["lr"]) + 2) - abs(config["score_threshold"] - 0.4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=n_trials)
    return configs


def test_space_samples_valid_values_with_a_real_study():
    study = optuna.create_study(direction="maximize", sampler=tpe(0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        returned = SPACE(trial)
        config = {**trial.params, **returned}  # what OptunaSearch hands the trainable
        assert set(TRIAL_PARAMS) <= set(config)
        choice = {d.key: d for d in SPACE.detectors}[config["detector"]]
        lr_range = choice.lr or SPACE.lr
        assert lr_range.low <= config["lr"] <= lr_range.high
        assert config["lr"] == trial.params[lr_param_name(choice, num_detectors=2)]
        assert config["batch_size"] in (4, 8) and isinstance(config["batch_size"], int)
        assert 0.2 <= config["score_threshold"] <= 0.6
        seen.add(config["detector"])
        study.tell(trial, -abs(math.log10(config["lr"]) + 2))
    assert seen == {"faster_rcnn/mobilenet_v2", "fcos_tal/resnet18"}
    # Each detector's lr is its own (conditional) Optuna parameter.
    names = {name for t in study.trials for name in t.params}
    assert names == {"detector", "lr_faster_rcnn_mobilenet_v2", "lr_fcos_tal_resnet18", "batch_size",
                     "score_threshold"}


def test_same_seed_same_proposals():
    assert run_study(3, 12) == run_study(3, 12)
    assert run_study(3, 12) != run_study(4, 12)


def test_single_detector_and_single_batch_size():
    space = DetectorSpace(detectors=(DetectorChoice("faster_rcnn", "mobilenet_v2"),), lr=FloatRange(0.01, 0.01),
                          batch_sizes=(4,), score_threshold=FloatRange(0.3, 0.3))
    trial = optuna.create_study().ask()
    returned = space(trial)
    assert {**trial.params, **returned} == {"detector": "faster_rcnn/mobilenet_v2", "lr": 0.01, "batch_size": 4,
                                            "score_threshold": 0.3}


def test_param_keys_are_what_the_trainable_reads():
    # The space suggests these four (the module docstring of search/space.py); TRIAL_PARAMS is their one definition.
    assert TRIAL_PARAMS == ("detector", "lr", "batch_size", "score_threshold")


def test_empty_space_is_refused():
    with pytest.raises(ValueError, match="at least one detector"):
        DetectorSpace(detectors=(), lr=FloatRange(0.01, 0.1), batch_sizes=(4,), score_threshold=FloatRange(0.3, 0.5))


def test_searcher_state_survives_a_pickle_and_exports_to_optuna_db(tmp_path):
    """What resume relies on: Tune pickles the searcher into the experiment; a restored one continues the
    same study, and `write_optuna_db` exports it with each trial's Tune id."""
    from search.optuna_search import PruningAwareOptunaSearch

    config = SweepConfig().validate(check_data=False)
    assert build_search_space(config=config).detectors == (DetectorChoice("faster_rcnn", "mobilenet_v2"),)
    limiter = build_searcher(config, study_name="s")
    first = limiter.suggest("t1")
    # The default space samples no score threshold: each trial's is chosen on its out-of-fold predictions.
    assert set(first) == set(TRIAL_PARAMS) - {"score_threshold"}
    limiter.on_trial_result("t1", {"cv_score": 0.25, "training_iteration": 1, "finished": 0})
    assert limiter.suggest("t2") is None  # max_concurrent_trials = 1 (the default)
    limiter.on_trial_complete("t1", {"cv_score": 0.5, "training_iteration": 2, "finished": 1})
    assert set(limiter.suggest("t2")) == set(TRIAL_PARAMS) - {"score_threshold"}
    (tmp_path / TUNE_DIR).mkdir()
    limiter.searcher.save_to_dir(str(tmp_path / TUNE_DIR), session_str="a")  # what Tune does each snapshot

    restored = PruningAwareOptunaSearch()
    restored.restore_from_dir(str(tmp_path / TUNE_DIR))
    # t2 stopped by a scheduler after epoch 1 of 2: its last result lacks the trial's own `finished: 1`.
    restored.on_trial_result("t2", {"cv_score": 0.75, "training_iteration": 1, "finished": 0})
    restored.on_trial_complete("t2", {"cv_score": 0.75, "training_iteration": 1, "finished": 0})
    assert set(restored.suggest("t3")) == set(TRIAL_PARAMS) - {"score_threshold"}
    restored.save_to_dir(str(tmp_path / TUNE_DIR), session_str="b")  # the newer session wins

    C, F, P = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED
    path = write_optuna_db(tmp_path)
    assert path == tmp_path / OPTUNA_DB and path.is_file()
    study = optuna.load_study(study_name="s", storage=optuna_storage_url(tmp_path))
    # t2 was pruned (a value from outside, not its own end); t3 never reported back (say, a killed driver
    # that was not resumed): written as failed.
    assert [t.state for t in study.trials] == [C, P, F]
    # Optuna keeps a pruned trial's last intermediate value as its value.
    assert study.trials[0].value == 0.5 and study.trials[1].value == 0.75
    assert study.trials[1].intermediate_values == {1: 0.75}
    assert [t.user_attrs["tune_trial_id"] for t in study.trials] == ["t1", "t2", "t3"]
    assert study.trials[0].intermediate_values == {1: 0.25}
    assert study.trials[0].params["lr"] == first["lr"] and study.metric_names == ["cv_score"]

    # While the sweep runs (sweep_over=False) a trial in flight stays RUNNING; exporting again rewrites the file.
    write_optuna_db(tmp_path, sweep_over=False)
    study = optuna.load_study(study_name="s", storage=optuna_storage_url(tmp_path))
    assert [t.state for t in study.trials] == [C, P, optuna.trial.TrialState.RUNNING]


def test_export_without_searcher_state_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="searcher-state"):
        write_optuna_db(tmp_path)


def test_each_detector_first_gives_the_first_trials_every_detector_once():
    config = sweep_config_from_dict({
        "data": {"path": "unused"},
        "search": {"max_concurrent_trials": 4, "n_startup_trials": 0, "each_detector_first": True,
                   "space": {"detectors": [{"arch": "faster_rcnn", "backbone": "mobilenet_v2"},
                                           {"arch": "fcos_tal", "backbone": "tf_efficientnet_lite0"}]}},
    }, check_data=False)
    limiter = build_searcher(config, study_name="first")
    first, second = limiter.suggest("t1"), limiter.suggest("t2")
    assert [first["detector"], second["detector"]] == ["faster_rcnn/mobilenet_v2", "fcos_tal/tf_efficientnet_lite0"]
    assert all(0 < t["lr"] for t in (first, second)) and {"batch_size"} <= set(first)  # the rest is sampled
