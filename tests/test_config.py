from __future__ import annotations

from pathlib import Path

import pytest

from detection.config import ConfigError, ExperimentConfig, TrainConfig, load_experiment_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = ExperimentConfig().validate()
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    path = write(tmp_path, f"data:\n  path: {data_dir}\ntrain:\n  lr: 1e-3\n  epochs: 2\nseed: 7\n")
    loaded = load_experiment_config(path)
    assert loaded.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: coerced
    assert loaded.train.epochs == 2 and loaded.seed == 7
    assert loaded.model == cfg.model


@pytest.mark.parametrize(
    "text, key",
    [
        pytest.param("train:\n  learning_rate: 0.1\n", "train.learning_rate", id="unknown-nested-key"),
        pytest.param("optimiser: sgd\n", "optimiser", id="unknown-top-key"),
        pytest.param("train:\n  batch_size: 0\n", "train.batch_size", id="batch-size-zero"),
        pytest.param("train:\n  batch_size: four\n", "train.batch_size", id="batch-size-string"),
        pytest.param("train:\n  optimizer: rmsprop\n", "train.optimizer", id="unknown-optimizer"),
        pytest.param("data:\n  num_folds: 1\n", "data.num_folds", id="one-fold"),
        pytest.param("model:\n  arch: yolo\n", "model.arch", id="unknown-arch"),
        pytest.param("train:\n  small_image_size: 1024\n  image_size: 512\n", "train.small_image_size",
                     id="small-size-above-size"),
        pytest.param("train: 3\n", "train", id="section-not-mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment_config(path)
    message = str(info.value)
    assert f"`{key}`" in message and str(path) in message


def test_progressive_resizing_sizes():
    cfg = TrainConfig(image_size=640, small_image_size=320, progressive_epochs=2)
    assert [cfg.image_size_at(e) for e in range(4)] == [320, 320, 640, 640]
    assert TrainConfig(image_size=640).image_size_at(0) == 640


def test_overrides_are_validated_copies():
    base = ExperimentConfig()
    new = base.with_overrides(train={"lr": 0.5, "batch_size": 8}, model={"arch": "fcos_tal"})
    assert (new.train.lr, new.train.batch_size, new.model.arch) == (0.5, 8, "fcos_tal")
    assert base.train.lr == 0.01
    with pytest.raises(ConfigError, match="train.lr_max"):
        base.with_overrides(train={"lr_max": 1.0})
