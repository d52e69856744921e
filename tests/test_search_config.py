"""Sweep YAML: the shipped configs validate, and bad ones fail before Ray starts with the key named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import ray
import yaml

from detection.config import ConfigError
from search.cli import DEMO_CONFIG, main
from search.config import DetectorChoice, SweepConfig, load_sweep_config, sweep_config_from_dict

CLUSTER_CONFIG = DEMO_CONFIG.parent / "cluster_example.yaml"


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    """A minimal COCO file: config validation only checks that `data.path` is one."""
    path = tmp_path / "ds" / "annotations.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return path


def demo_dict(data_path: Path) -> dict:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["data"]["path"] = str(data_path)
    return data


def merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_demo_config_validates(coco_json):
    cfg = sweep_config_from_dict(demo_dict(coco_json), where="demo")
    assert cfg.data.num_folds == 2 and cfg.resources.gpus_per_fold == 0
    # Two detectors, each tried first once; FCOS-TAL with its own optimizer and lr range.
    assert [d.key for d in cfg.detectors] == ["faster_rcnn/mobilenet_v2", "fcos_tal/tf_efficientnet_lite0"]
    assert cfg.search.each_detector_first and cfg.search.num_samples >= len(cfg.detectors)
    assert cfg.detector_bases["fcos_tal/tf_efficientnet_lite0"].train.optimizer == "adamw"
    assert cfg.detectors[1].lr.low == pytest.approx(5e-4)
    # 0 coordinator + 2 folds x 1 CPU = 2 CPUs reserved per trial: fits a 2-core laptop
    assert cfg.trial_cpus == 2 and cfg.trial_gpus == 0
    assert cfg.search.space.lr.low == pytest.approx(0.006)  # YAML 1.1 reads 6e-3 style numbers as strings: coerced


def test_cluster_example_validates():
    cfg = load_sweep_config(CLUSTER_CONFIG, check_data=False)  # its data lives on the cluster's shared storage
    assert [d.key for d in cfg.detectors] == ["faster_rcnn/resnet50_fpn", "faster_rcnn/efficientnet_b3",
                                               "faster_rcnn/swin_s", "fcos_tal/resnet50"]
    assert cfg.search.scheduler == "asha" and cfg.resources.gpus_per_fold == 1
    assert cfg.trial_gpus == 5  # 5 folds x 1 GPU


def test_empty_detector_list_means_the_base_model(coco_json):
    data = merged(demo_dict(coco_json), {"model": {"arch": "faster_rcnn", "backbone": "resnet18"},
                                         "search": {"space": {"detectors": []}}})
    cfg = sweep_config_from_dict(data)
    assert cfg.detectors == (DetectorChoice("faster_rcnn", "resnet18"),)


def test_yaml_roundtrip_and_absolute_data_path(coco_json, tmp_path, monkeypatch):
    monkeypatch.chdir(coco_json.parent.parent)  # a relative data.path resolves against the working directory
    data = demo_dict(Path("ds") / coco_json.name)
    data["search"]["space"]["detectors"] = [{"arch": "faster_rcnn", "backbone": "mobilenet_v2",
                                             "lr": {"low": 1e-3, "high": 1e-2}}]
    cfg = sweep_config_from_dict(data)
    assert cfg.data.path == str(coco_json.resolve())
    path = cfg.to_yaml(tmp_path / "out" / "sweep.yaml")
    again = load_sweep_config(path)
    assert again == cfg and isinstance(again.search.space.batch_size, tuple)


def test_smoke_test_is_the_same_sweep_small(coco_json):
    cfg = sweep_config_from_dict(demo_dict(coco_json)).smoke_test().validate()
    assert (cfg.train.epochs, cfg.search.num_samples, cfg.data.num_folds) == (1, 2, 2)
    assert cfg.train.image_size == 128  # min(320, 128)
    assert [d.key for d in cfg.detectors] == [d.key for d in sweep_config_from_dict(demo_dict(coco_json)).detectors]
    # Every detector trains the smoke test's 1 epoch at 128 px, whatever its own epochs; its other keys stay.
    bases = cfg.detector_bases
    assert {(b.train.epochs, b.train.image_size) for b in bases.values()} == {(1, 128)}
    assert bases["fcos_tal/tf_efficientnet_lite0"].train.optimizer == "adamw"


BAD_CASES = [
    pytest.param({"search": {"num_sampels": 3}}, "search.num_sampels", "allowed keys", id="unknown-key"),
    pytest.param({"epochs": 3}, "epochs", "allowed keys", id="unknown-top-level-key"),
    pytest.param({"search": {"space": {"lr": {"low": 0.1, "high": 0.001}}}}, "search.space.lr",
                 "`low <= high` must hold, but got (low=0.1, high=0.001)", id="lr-range-reversed"),
    pytest.param({"search": {"space": {"detectors": [{"arch": "faster_rcnn", "backbone": "mobilenet_v2",
                                                      "lr": {"low": 0.1, "high": 0.01}}]}}},
                 "search.space.detectors[0].lr", "`low <= high` must hold", id="detector-lr-range-reversed"),
    pytest.param({"search": {"space": {"lr": {"low": 0.0, "high": 0.01}}}}, "search.space.lr", "`low > 0`",
                 id="lr-log-range-from-zero"),
    pytest.param({"search": {"space": {"batch_size": [0, 4]}}}, "search.space.batch_size[0]", "integer >= 1",
                 id="batch-size-zero"),
    pytest.param({"search": {"space": {"batch_size": []}}}, "search.space.batch_size", "non-empty",
                 id="batch-size-empty-list"),
    pytest.param({"train": {"batch_size": 0}}, "train.batch_size", "integer >= 1", id="base-batch-size-zero"),
    pytest.param({"train": {"rot90_p": 1.5}}, "train.rot90_p", "a probability in [0, 1], got 1.5",
                 id="rot90-probability-above-one"),
    pytest.param({"data": {"path": "no/such/dataset"}}, "data.path", "a COCO .json file or a Roboflow export folder",
                 id="missing-dataset"),
    pytest.param({"data": {"num_folds": 1}}, "data.num_folds", "integer >= 2", id="one-fold"),
    pytest.param({"search": {"space": {"detectors": [{"arch": "yolo", "backbone": "mobilenet_v2"}]}}},
                 "search.space.detectors[0].arch", "faster_rcnn", id="unknown-arch"),
    pytest.param({"search": {"space": {"detectors": [{"arch": "faster_rcnn", "backbone": "vgg99"}]}}},
                 "search.space.detectors[0].backbone", "mobilenet_v2", id="unknown-backbone"),
    pytest.param({"resources": {"gpus_per_fold": -1}}, "resources.gpus_per_fold", "a fraction", id="negative-gpus"),
    pytest.param({"resources": {"gpus_per_fold": 1.5}}, "resources.gpus_per_fold", "whole number",
                 id="gpus-above-one-not-whole"),
    pytest.param({"resources": {"cpus_per_fold": 0}}, "resources.cpus_per_fold", "> 0", id="zero-cpus"),
    pytest.param({"resources": {"coordinator_resource": "GPU"}}, "resources.coordinator_resource",
                 "custom Ray resource", id="coordinator-resource-builtin"),
    pytest.param({"checkpoint": {"resume_every": 0}}, "checkpoint.resume_every", ">= 1", id="resume-every-0"),
    pytest.param({"search": {"scheduler": "hyperband"}}, "search.scheduler", "'asha'", id="unknown-scheduler"),
    pytest.param({"train": {"epochs": 20}, "search": {"scheduler": "asha", "asha": {"grace_period": 99}}},
                 "search.asha.grace_period", "train.epochs=20", id="asha-grace-beyond-epochs"),
    pytest.param({"checkpoint": {"keep_trials": 0}}, "checkpoint.keep_trials", ">= 1", id="keep-no-trials"),
    pytest.param({"resources": {"fold_memory_gb": 0}}, "resources.fold_memory_gb", "> 0", id="no-fold-memory"),
    pytest.param({"search": {"metric": "accuracy"}}, "search.metric", "score_mean", id="unknown-metric"),
    pytest.param({"search": {"space": {"score_threshold": {"low": 0.5, "high": 1.0}}}},
                 "search.space.score_threshold", "[0.0, 1.0)", id="threshold-up-to-one"),
    pytest.param({"ensemble": {"conf_type": "mean"}}, "ensemble.conf_type", "box_and_model_avg",
                 id="unknown-wbf-conf-type"),
    pytest.param({"ensemble": {"iou_thr_grid": [0.5, 1.2]}}, "ensemble.iou_thr_grid[1]", "(0, 1), got 1.2",
                 id="wbf-iou-grid-out-of-range"),
    pytest.param({"ensemble": {"conf_type_grid": ["avg", "mean"]}}, "ensemble.conf_type_grid[1]", "'mean'",
                 id="unknown-wbf-conf-type-in-grid"),
    pytest.param({"ensemble": {"hflip_tta_grid": []}}, "ensemble.hflip_tta_grid", "[false] never mirrors",
                 id="empty-flip-tta-grid"),
    pytest.param({"ensemble": {"hflip_tta_grid": ["yes"]}}, "ensemble.hflip_tta_grid[0]", "true or false",
                 id="flip-tta-grid-not-bool"),
    pytest.param({"ensemble": {"bootstrap_samples": -1}}, "ensemble.bootstrap_samples", "0: no intervals",
                 id="negative-bootstrap-samples"),
    pytest.param({"search": {"space": {"detectors": [{"arch": "faster_rcnn", "backbone": "mobilenet_v2",
                                                      "lr": {"low": 0.001}}]}}}, "high", "missing",
                 id="range-without-high"),
]


@pytest.mark.parametrize("changes, key, expected", BAD_CASES)
def test_bad_sweep_config_fails_before_ray_starts(tmp_path, coco_json, capsys, changes, key, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(merged(demo_dict(coco_json), changes)))
    storage = tmp_path / "experiments"
    assert not ray.is_initialized()
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--config", str(path), "--storage", str(storage), "--no-dashboard"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert str(path) in message and expected in message
    assert (f"`{key}`" if key != "high" else "'high'") in message
    assert not ray.is_initialized()
    assert not storage.exists()  # nothing written either


def test_folder_without_annotations_is_not_a_dataset(tmp_path, coco_json):
    empty = tmp_path / "export"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"`data\.path` must be a COCO \.json file or a Roboflow export folder"):
        sweep_config_from_dict(merged(demo_dict(coco_json), {"data": {"path": str(empty)}}))


def test_resume_and_status_name_a_folder_that_is_no_experiment(tmp_path, capsys):
    for command in ("resume", "status"):
        with pytest.raises(SystemExit) as info:
            main([command, str(tmp_path)])
        assert info.value.code == 2
        assert "sweep.yaml" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_defaults_validate_without_data_check():
    cfg = SweepConfig().validate(check_data=False)
    assert cfg.search.space.batch_size == (4, 8) and cfg.search.metric == "cv_score" and cfg.search.space.score_threshold is None


def test_experiment_folder_rules(tmp_path, coco_json):
    from search.tuner import TUNE_DIR, new_experiment_dir

    cfg = sweep_config_from_dict(demo_dict(coco_json))
    named = new_experiment_dir(cfg, storage=str(tmp_path), name="exp")
    assert named.local == tmp_path.resolve() / "exp" and named.uri is None
    stamped = new_experiment_dir(cfg, storage=str(tmp_path)).local
    assert stamped.parent == tmp_path.resolve() and stamped.name.startswith("demo-")  # demo-YYYYmmdd-HHMMSS
    (named.local / TUNE_DIR).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"already holds a sweep; continue it with `detsweep resume"):
        new_experiment_dir(cfg, storage=str(tmp_path), name="exp")
    with pytest.raises(ConfigError, match="`--name` must be a folder name"):
        new_experiment_dir(cfg, storage=str(tmp_path), name="a/b")
    # URIs (S3 and others): tests/test_search_s3.py


def test_status_of_a_sweep_that_has_not_started(tmp_path, coco_json, capsys):
    """The empty case: sweep.yaml and split.json written, the driver gone before Tune saved anything."""
    from search.tuner import SPLIT_JSON, SWEEP_YAML

    sweep_config_from_dict(demo_dict(coco_json)).to_yaml(tmp_path / SWEEP_YAML)
    (tmp_path / SPLIT_JSON).write_text("{}")
    with pytest.raises(SystemExit) as info:
        main(["status", str(tmp_path)])
    assert info.value.code == 2
    assert "no Tune experiment (tune/) yet" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_mlflow_logging_needs_the_optional_extra(tmp_path, deepforest_root):
    """`logging.mlflow_tracking_uri` without mlflow installed names the key and the extra to install."""
    import importlib.util

    from search.config import load_sweep_config
    from search.tuner import build_run_config

    base = f"data:\n  path: {deepforest_root}\n"
    plain = tmp_path / "plain.yaml"
    plain.write_text(base)
    # Without MLflow only the failure policy (search/failures.py) and the checkpoint budget are called back.
    plain_callbacks = build_run_config(load_sweep_config(plain), experiment_dir=tmp_path).callbacks
    assert [type(c).__name__ for c in plain_callbacks] == ["FailurePolicy", "CheckpointBudget"]
    with_mlflow = tmp_path / "mlflow.yaml"
    with_mlflow.write_text(base + f"logging:\n  mlflow_tracking_uri: file://{tmp_path}/mlruns\n")
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ConfigError, match=r"logging\.mlflow_tracking_uri.*detsweep\[mlflow\]"):
            load_sweep_config(with_mlflow)
    else:
        callbacks = build_run_config(load_sweep_config(with_mlflow), experiment_dir=tmp_path).callbacks
        assert sorted(type(c).__name__ for c in callbacks) == ["CheckpointBudget", "FailurePolicy",
                                                                "MLflowLoggerCallback"]


def test_a_detector_choice_brings_its_own_model_and_train_keys(coco_json):
    from trainables.trial import TrialSetup, apply_trial_params

    data = demo_dict(coco_json)
    data["search"]["space"]["detectors"] = [
        {"arch": "faster_rcnn", "backbone": "mobilenet_v2"},
        {"arch": "fcos_tal", "backbone": "tf_efficientnet_lite0", "train": {"optimizer": "adamw"},
         "model": {"neck_channels": 96, "head_convs": 2}},
    ]
    cfg = sweep_config_from_dict(data)
    fcos = cfg.detector_bases["fcos_tal/tf_efficientnet_lite0"]
    assert (fcos.train.optimizer, fcos.model.neck_channels, fcos.model.head_convs) == ("adamw", 96, 2)
    assert fcos.model.architecture_options == {"neck_channels": 96, "head_convs": 2}
    frcnn = cfg.detector_bases["faster_rcnn/mobilenet_v2"]
    assert frcnn.train.optimizer == cfg.train.optimizer == "sgd" and frcnn.model.architecture_options == {"rpn_post_nms_top_n_test": 300}
    # A trial of that detector starts from its base; the sampled params go on top.
    setup = TrialSetup(base=cfg.base, split=None, split_path="split.json", resources=cfg.resources,
                       detector_bases=cfg.detector_bases)
    trial = apply_trial_params(setup.base_for({"detector": "fcos_tal/tf_efficientnet_lite0"}),
                               {"detector": "fcos_tal/tf_efficientnet_lite0", "lr": 1e-3})
    assert (trial.model.arch, trial.train.optimizer, trial.train.lr, trial.model.head_convs) == ("fcos_tal", "adamw",
                                                                                                  1e-3, 2)
    # Bad keys inside a choice name the choice.
    data["search"]["space"]["detectors"][1]["train"] = {"optimiser": "adamw"}
    with pytest.raises(ConfigError, match=r"search\.space\.detectors\[1\]`: unknown key `train\.optimiser`"):
        sweep_config_from_dict(data)
    data["search"]["space"]["detectors"][1]["train"] = {"optimizer": "lamb"}
    with pytest.raises(ConfigError, match=r"search\.space\.detectors\[1\]`: `train\.optimizer` must be one of"):
        sweep_config_from_dict(data)
    data["search"]["space"]["detectors"][1]["train"] = {}
    data["search"]["space"]["detectors"][1]["model"] = {"arch": "faster_rcnn"}
    with pytest.raises(ConfigError, match=r"detectors\[1\]\.model` must be free of arch/backbone"):
        sweep_config_from_dict(data)
