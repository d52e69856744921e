"""A sweep whose experiment lives in S3 (search/storage.py): `detsweep sweep --storage s3://...`, then
`status` and `resume` from other machines' points of view (empty local mirrors).

AWS is out of reach here, so the bucket is served by moto's standalone S3 server (`python -m moto.server`)
on localhost: the code under test talks the S3 protocol over HTTP through pyarrow's AWS SDK client (Ray
Tune's uploads included), as it does against AWS. The trials read no file from the experiment: the
split travels with the trainable.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import pytest
import yaml

from conftest import tiny_sweep_data, write_tiny_sweep_config
from detection.config import ConfigError
from search.cli import main
from search.storage import CACHE_ENV, Experiment, join_uri, mirror_dir, pull, push, read_bytes

PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "sweeps"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """The URI of an empty bucket on a local S3 server; AWS credentials set in this process's environment."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        base = f"s3://{BUCKET}?endpoint_override=127.0.0.1:{port}&scheme=http"
        fs, _ = pyarrow.fs.FileSystem.from_uri(base + "&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _keys(uri: str) -> set[str]:
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return {info.path[len(root):].lstrip("/") for info in infos if info.type == pyarrow.fs.FileType.File}


def _read(uri: str) -> str:
    return read_bytes(uri).decode()


# ------------------------------------------------------------------------------------ storage helpers


def test_join_uri_keeps_the_query_at_the_end() -> None:
    assert join_uri("s3://b/x?endpoint_override=h:9&scheme=http", "exp", "tune") == \
        "s3://b/x/exp/tune?endpoint_override=h:9&scheme=http"
    assert join_uri("gs://b", "exp/") == "gs://b/exp"


def test_mirrors_are_per_uri_under_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    a, b = mirror_dir("s3://b/exp"), mirror_dir("s3://b/exp?endpoint_override=other:9000")
    assert a.parent == b.parent == tmp_path.resolve() and a != b and a.name.startswith("b_exp-")
    assert Experiment.at("s3://b/exp").local == a
    assert Experiment.at(tmp_path / "exp") == Experiment(local=(tmp_path / "exp").resolve(), uri=None)


def test_push_then_pull_round_trip_skips_excluded_and_unchanged_files(s3: str, tmp_path: Path) -> None:
    uri = join_uri(s3, "roundtrip")
    local = tmp_path / "local"
    for name, text in {"sweep.yaml": "a: 1\n", "tune/t/checkpoint_0/folds/fold-0.pt": "state",
                       "tune/t/checkpoint_0/best/rank-1.pt": "model"}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(text)
    assert push(local, uri) == 3
    assert _keys(uri) == {"sweep.yaml", "tune/t/checkpoint_0/folds/fold-0.pt", "tune/t/checkpoint_0/best/rank-1.pt"}

    mirror = tmp_path / "mirror"
    assert pull(uri, mirror, exclude=("folds",)) == 2
    assert (mirror / "tune/t/checkpoint_0/best/rank-1.pt").read_text() == "model"
    assert not (mirror / "tune/t/checkpoint_0/folds").exists()
    assert pull(uri, mirror, exclude=("folds",)) == 0  # nothing changed: nothing copied again
    assert push(local, uri) == 0  # the bucket holds them all already
    assert push(mirror, uri) == 0  # pulled files carry the bucket's mtimes
    (local / "sweep.yaml").write_text("a: 22\n")
    assert push(local, uri) == 1
    assert pull(uri, mirror, exclude=("folds",)) == 1 and (mirror / "sweep.yaml").read_text() == "a: 22\n"


def test_a_taken_or_unreadable_uri_is_a_config_error(s3: str, deepforest_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from search.config import load_sweep_config
    from search.tuner import new_experiment_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    demo = yaml.safe_load((PROJECT / "configs" / "demo.yaml").read_text())
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump({**demo, "data": {**demo["data"], "path": str(deepforest_root)}}))
    config = load_sweep_config(tmp_path / "demo.yaml")
    taken = tmp_path / "taken"
    (taken / "tune").mkdir(parents=True)
    (taken / "tune" / "experiment_state.json").write_text("{}")
    push(taken, join_uri(s3, "taken"))
    with pytest.raises(ConfigError, match=r"already holds a sweep; continue it with `detsweep resume s3://"):
        new_experiment_dir(config, storage=s3, name="taken")
    with pytest.raises(ConfigError, match="`storage` 'nosuchscheme://bucket/x': cannot use this URI"):
        new_experiment_dir(config, storage="nosuchscheme://bucket/x", name="exp")
    fresh = new_experiment_dir(config, storage=s3, name="fresh")
    assert fresh.uri == join_uri(s3, "fresh") and fresh.local == mirror_dir(fresh.uri)


# ---------------------------------------------------------------------------------- a sweep on S3


@pytest.fixture(scope="module")
def s3_sweep(s3: str, deepforest_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(experiment URI, the driver's cache) of a real tiny sweep run with `--storage s3://...`:
    1 trial x 2 folds x 1 epoch of Faster R-CNN/MobileNetV2 at 64 px on 6 tiles (1 selection, 1 test)."""
    root = tmp_path_factory.mktemp("s3_sweep")
    data = tiny_sweep_data(deepforest_root, root / "data", num_images=6)
    config_path = write_tiny_sweep_config(
        root / "sweep.yaml", name="tiny", data=data, storage=root / "never-used", num_samples=1, epochs=1,
        image_size=64, held_out_fraction=0.17, model={"roi_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 200},
        train={"eval_batch_size": 2})
    cache = root / "driver-cache"
    log = root / "sweep.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "search.cli", "sweep", "--config", str(config_path), "--storage", s3,
             "--name", "exp", "--no-dashboard"],
            cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT, timeout=900,
            env={**os.environ, CACHE_ENV: str(cache)},
        )
    assert done.returncode == 0, log.read_text()[-5000:]
    assert not (root / "never-used").exists()  # `--storage` wins over the config's folder
    return join_uri(s3, "exp"), cache


def test_the_sweep_writes_its_whole_experiment_to_the_bucket(s3_sweep: tuple[str, Path]) -> None:
    uri, _ = s3_sweep
    keys = _keys(uri)
    for name in ("sweep.yaml", "split.json", "optuna.db", "leaderboard.csv", "leaderboard.md", "best_ensemble.json",
                 "ensemble/test.json", "report.html"):
        assert name in keys, sorted(keys)
    trials = {key.split("/")[1] for key in keys if key.startswith("tune/trial_")}
    assert len(trials) == 1
    (trial,) = trials
    # The chosen ensemble's model files, copied beside best_ensemble.json (`<trial id>-fold-<k>.pt`).
    best = json.loads(_read(join_uri(uri, "best_ensemble.json")))
    assert best["models"] and {m["trial_id"] for m in best["models"]} == {trial.removeprefix("trial_")}
    for model in best["models"]:
        assert Path(model["path"]).name == f"{model['trial_id']}-fold-{model['fold']}.pt"
        assert f"best_ensemble/{Path(model['path']).name}" in keys, sorted(keys)
    checkpoint = {key.split("/")[2] for key in keys if key.startswith(f"tune/{trial}/checkpoint_")}
    assert len(checkpoint) == 1  # the latest checkpoint only
    prefix = f"tune/{trial}/{checkpoint.pop()}/"
    for name in ("best/rank-1.pt", "best/rank-2.pt", "best/best.json",
                 "best/oof-fold-0.pt", "best/oof-fold-1.pt", "trial.json", "manifest.json"):
        assert prefix + name in keys, sorted(keys)
    # The trial ended: the checkpoint budget deleted its fold resume states from the bucket (pyarrow's S3).
    assert not [key for key in keys if key.startswith(prefix + "folds/")], sorted(keys)
    assert f"tune/{trial}/result.json" in keys
    assert f"ensemble/{trial.removeprefix('trial_')}.json" in keys


def test_status_from_an_empty_mirror_reads_the_bucket_without_checkpoints(
    s3_sweep: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _ = s3_sweep
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert main(["status", uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith(uri) and "| TERMINATED |" in out and "1/1 trials: 1 terminated" in out
    assert not list(mirror_dir(uri).rglob("checkpoint_*"))  # status pulls results, not models


def test_report_and_export_best_from_an_empty_mirror_fetch_only_what_they_read(
    s3_sweep: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report needs one checkpoint (the best trial's manifest), fetched on its own; export-best needs none."""
    uri, _ = s3_sweep
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert main(["export-best", uri, "--out", str(tmp_path / "best.yaml")]) == 0
    assert (tmp_path / "best.yaml").is_file() and not list(mirror_dir(uri).rglob("checkpoint_*"))

    assert main(["report", uri, "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "sha256" in page and "no manifest.json" not in page  # the reproducibility section read it
    fetched = list(mirror_dir(uri).rglob("checkpoint_*"))
    assert len(fetched) == 1 and (fetched[0] / "manifest.json").is_file()
    assert not list(mirror_dir(uri).rglob("folds"))


def test_resume_from_another_machine_redoes_nothing_and_reranks_the_same(
    s3_sweep: tuple[str, Path], tmp_path: Path
) -> None:
    uri, driver_cache = s3_sweep
    before = _read(join_uri(uri, "leaderboard.csv"))
    result_before = _keys(uri)
    log = tmp_path / "resume.log"
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "search.cli", "resume", uri, "--no-dashboard"], cwd=PROJECT,
                              stdout=out, stderr=subprocess.STDOUT, timeout=600,
                              env={**os.environ, CACHE_ENV: str(tmp_path / "cache")})
    assert done.returncode == 0, log.read_text()[-5000:]
    local = tmp_path / "cache" / mirror_dir(uri).name
    # The finished trial was not run again: one trial, still one checkpoint, same result lines.
    assert {k for k in _keys(uri) if "/checkpoint_" in k} == {k for k in result_before if "/checkpoint_" in k}
    assert not list(local.rglob("fold-*.pt"))  # the fold resume states stayed in the bucket
    (trial_id,) = {k.split("/")[1].removeprefix("trial_") for k in result_before if k.startswith("tune/trial_")}
    rows = list(csv.DictReader(io.StringIO(_read(join_uri(uri, "leaderboard.csv")))))
    # One trial row (the greedy and the test-split rows follow it), ranked as before.
    assert [r["trial_id"] for r in rows if r["status"] == "ensembled"] == [trial_id]
    assert {r["trial_id"] for r in rows if r["split"] == "test"} == {"chosen", "best single model"}
    assert rows == list(csv.DictReader(io.StringIO(before)))
    assert (driver_cache / mirror_dir(uri).name / "leaderboard.csv").read_bytes().decode() == before
