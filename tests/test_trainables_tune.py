"""`train_trial` under a real `tune.Tuner` on a local Ray: a diverging trial ends as errored with the
reason while the sweep goes on, a trial whose coordinator dies resumes from its checkpoint, and trials reuse
the coordinator and fold processes of the trial before them (also after Tune stopped it mid-epoch)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray import tune

from detection.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from detection.data.splits import Split
from search.config import ResourcesConfig
from trainables.fold_worker import FoldWorker
from trainables.trial import (
    TrialFailed, TrialSetup, checkpoint_staging_dir, failure_reason, train_trial, trial_resources,
)

pytestmark = pytest.mark.slow

RESOURCES = ResourcesConfig(cpus_per_fold=0.5, gpus_per_fold=0, coordinator_cpus=0.1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def make_setup(data_path: Path, split: Split, folder: Path, **train: Any) -> TrialSetup:
    base = ExperimentConfig(
        data=DataConfig(path=str(data_path), num_folds=split.num_folds, class_balanced_sampling=False),
        model=ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", pretrained=False, roi_batch_size_per_image=32,
                          rpn_post_nms_top_n_train=200),
        train=TrainConfig(**{"image_size": 64, "eval_batch_size": 2, "augment": False, "amp": False,
                             "warmup_epochs": 0.0, **train}),
    ).validate()
    return TrialSetup(base=base, split=split, split_path=str(split.to_json(folder / "split.json")), resources=RESOURCES)


def fit(setup: TrialSetup, storage: Path, param_space: dict, *, max_failures: int = 0,
        callbacks: list | None = None, checkpoint_config: tune.CheckpointConfig | None = None,
        stop: Any = None) -> tune.ResultGrid:
    num_folds = setup.split.num_folds
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    trial_resources(num_folds, setup.resources))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=setup.reuse_workers),
        run_config=tune.RunConfig(
            storage_path=str(storage), name="tune", verbose=0, callbacks=callbacks or [], stop=stop,
            checkpoint_config=checkpoint_config or tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    ).fit()


def test_diverging_trial_errors_with_its_reason_and_the_sweep_goes_on(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    # Fold 0 trains on 4 tiles one at a time: 4 iterations, enough for 3 non-finite losses in a row.
    split = Split(selection=(), test=(), folds=((0,), (1, 2, 3, 4)), seed=0)
    setup = make_setup(deepforest_root, split, tmp_path, epochs=1, batch_size=1)
    results = fit(setup, tmp_path, {"lr": tune.grid_search([1e6, 0.01])})

    assert len(results) == 2 and len(results.errors) == 1
    by_lr = {r.config["lr"]: r for r in results}
    error = by_lr[1e6].error
    assert isinstance(error, TrialFailed)  # Ray re-raises the trainable's exception type
    assert "fold 0: non-finite loss in train" in str(error)
    assert error.fold == 0 and error.reason == "non-finite loss"
    assert by_lr[1e6].checkpoint is None  # it failed before its first report
    healthy = by_lr[0.01]
    assert healthy.error is None and healthy.metrics["epoch"] == 1 and healthy.checkpoint is not None


@ray.remote(num_cpus=0)
def _raise(error: BaseException) -> None:
    raise error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "CUDA out of memory",
                     id="cuda-oom"),
        pytest.param(ValueError("bad box"), "ValueError", id="other"),
    ],
)
def test_failure_reason_sees_through_rays_wrapping(local_ray: None, error: BaseException, reason: str) -> None:
    # (A CUDA OOM cannot be had on a CPU machine, but its exception type can; the non-finite loss is
    # raised for real in the diverging-trial test below.)
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(_raise.remote(error))
    assert failure_reason(info.value) == reason


def test_fold_worker_under_ray_takes_its_share_and_a_bad_one_fails_at_init(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    setup = make_setup(deepforest_root, Split(selection=(), test=(), folds=((0,), (1,)), seed=0), tmp_path, epochs=1)
    good = Split(selection=(), test=(), folds=((0,), (1,)), seed=0)
    worker = ray.remote(FoldWorker).options(num_cpus=1, num_gpus=0).remote(setup.base, good, 1)
    info = ray.get(worker.info.remote())
    # torch threads = the actor's CPUs; no GPU reserved -> CPU, whatever CUDA the node has
    assert (info["num_threads"], info["device"]) == (1, "cpu")
    assert info["node_id"] == ray.get_runtime_context().get_node_id()  # the one local node
    ray.kill(worker)
    # In the driver (Ray initialized, but not a worker) nothing is assigned: no thread change, no crash.
    assert FoldWorker(setup.base, good, 0).info()["device"] == "cpu"

    # A worker that cannot start dies with actor_init_failed: the coordinator fails the trial on it
    # instead of recreating the worker again and again.
    bad = Split(selection=(), test=(), folds=((0,), (99_999,)), seed=0)  # an image id the dataset does not have
    worker = ray.remote(FoldWorker).options(num_cpus=0.5).remote(setup.base, bad, 0)
    with pytest.raises(ray.exceptions.ActorDiedError) as error:
        ray.get(worker.info.remote())
    assert error.value.actor_init_failed and "99999" in str(error.value) and "DatasetError" in str(error.value)


class KillCoordinator(tune.Callback):
    """SIGKILLs the trial's coordinator process once Tune has registered its first checkpoint."""

    def __init__(self) -> None:
        self.killed: int | None = None

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # (Not in on_trial_result: Tune registers a reported checkpoint only after that callback.)
        if self.killed is None and trial.last_result["epoch"] == 1:
            self.killed = int(trial.last_result["coordinator_pid"])
            os.kill(self.killed, signal.SIGKILL)


def test_trial_resumes_from_its_checkpoint_after_its_coordinator_dies(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    split = Split(selection=(), test=(), folds=((0, 1), (2, 3)), seed=0)
    setup = make_setup(deepforest_root, split, tmp_path, epochs=3, batch_size=2, patience=1)
    killer = KillCoordinator()
    results = fit(setup, tmp_path, {"lr": 0.01}, max_failures=1, callbacks=[killer])

    (result,) = results
    assert killer.killed is not None and result.error is None
    history = result.metrics_dataframe
    # Tune restarted the trial from the epoch-1 checkpoint: epochs 2.. ran in a new coordinator.
    assert history["epoch"].tolist() == history["training_iteration"].tolist() == list(range(1, len(history) + 1))
    assert history["resumed_epoch"].tolist()[1:] == [1] * (len(history) - 1)
    assert killer.killed not in history["coordinator_pid"].tolist()[1:]
    state = torch.load(Path(result.checkpoint.path) / "folds" / "fold-0.pt", weights_only=True)
    assert state["epoch"] == len(history)
    # The killed coordinator's half-written checkpoint folder went with the restarted one's next report.
    assert not checkpoint_staging_dir(result.metrics["trial_id"]).exists()

    # Early stopping with patience 1, across the restart: fold k stops at epoch e >= 2 when its score did
    # not beat its best so far, and the trial ends at the first epoch where every fold has stopped.
    for k in range(2):
        scores = history[f"fold{k}/score"].tolist()
        expected = [False] + [scores[e] <= max(scores[:e]) for e in range(1, len(scores))]
        assert history[f"fold{k}/should_stop"].astype(bool).tolist() == expected
    all_stopped = (history["folds_stopped"] == 2).tolist()
    stopped_at = all_stopped.index(True) + 1 if True in all_stopped else None
    assert len(history) == (stopped_at or 3)


class KillBetweenResumeStates(tune.Callback):
    """SIGKILLs the coordinator twice: once Tune registered epoch 1's checkpoint (best/ only, no fold states
    written yet: the folds start afresh), and at epoch 3 (its checkpoint, if a fold improved, holds best/ only and
    points at epoch 2's; without one the latest is epoch 2's): both times the trial goes back to the last fold
    states written and reruns the epochs since unreported."""

    def __init__(self) -> None:
        self.kills: list[tuple[int, bool]] = []  # (epoch, whether its checkpoint had no fold states)

    def _kill(self, trial: Any, partial: bool) -> None:
        self.kills.append((int(trial.last_result["epoch"]), partial))
        os.kill(int(trial.last_result["coordinator_pid"]), signal.SIGKILL)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result["epoch"] == 3 and len(self.kills) == 1 and result["checkpoint_bytes"] == 0:
            self._kill(trial, partial=False)

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = trial.last_result["epoch"]
        if (epoch, len(self.kills)) in ((1, 0), (3, 1)):
            assert not (Path(trial.checkpoint.path) / "folds").exists()  # resume_every=2: odd epochs have none
            self._kill(trial, partial=True)


def test_checkpoints_between_resume_states_hold_no_fold_states_and_still_resume(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    split = Split(selection=(), test=(), folds=((0, 1), (2, 3)), seed=0)
    setup = dataclasses.replace(make_setup(deepforest_root, split, tmp_path, epochs=4, batch_size=2, patience=0),
                                resume_every=2)
    killer = KillBetweenResumeStates()
    results = fit(setup, tmp_path, {"lr": 0.01}, max_failures=2, callbacks=[killer],
                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="resume_state_epoch",
                                                          checkpoint_score_order="max"))
    (result,) = results
    assert result.error is None and [e for e, _ in killer.kills] == [1, 3] and killer.kills[0][1]
    history = result.metrics_dataframe
    if not killer.kills[1][1]:
        # Epoch 3 had no checkpoint: Tune went back to epoch 2's and epoch 3 was reported again.
        history = history.drop_duplicates("epoch", keep="last").reset_index(drop=True)
    # Every epoch reported once, in order: an epoch rerun after resuming from older fold states is not reported.
    assert history["epoch"].tolist() == history["training_iteration"].tolist() == [1, 2, 3, 4]
    # Fold states went into the checkpoints of epochs 2 and 4 only (4: the last); the first restart began afresh,
    # the second from epoch 2's states.
    assert history["resume_state_epoch"].tolist() == [0, 2, 0, 4]
    assert history["resumed_epoch"].tolist() == ([0, 0, 0, 2] if killer.kills[1][1] else [0, 0, 2, 2])
    sizes = history["checkpoint_bytes"].tolist()
    assert sizes[1] > 2 * max(sizes[0], sizes[2]) and sizes[3] > 2 * max(sizes[0], sizes[2])
    final = Path(result.checkpoint.path)
    assert torch.load(final / "folds" / "fold-1.pt", weights_only=True)["epoch"] == 4
    trial_json = json.loads((final / "trial.json").read_text())
    assert trial_json["states_epoch"] == 4 and trial_json["states_checkpoint"] is None
    # On storage: the latest checkpoint (with fold states) only.
    assert [p.name for p in Path(result.path).glob("checkpoint_*")] == [final.name]


def test_a_batch_that_does_not_fit_ends_the_trial_as_infeasible_before_its_first_epoch(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    """The memory probe (resources.fold_memory_gb on CPU): under a 50 MiB bound, which no torch process with a
    detector stays within, the trial reports infeasible with the measured peak, trains no epoch and is not an
    error; under a 64 GiB bound the probe passes and the trial trains, its peak in every report."""
    split = Split(selection=(), test=(), folds=((0, 1), (2, 3)), seed=0)
    setup = make_setup(deepforest_root, split, tmp_path, epochs=1, batch_size=2)
    tight = dataclasses.replace(setup, resources=dataclasses.replace(RESOURCES, fold_memory_gb=50 / 1024))
    (result,) = fit(tight, tmp_path / "tight", {"lr": 0.01})
    assert result.error is None and result.checkpoint is None
    metrics = result.metrics
    assert metrics["infeasible"] == 1 and metrics["epoch"] == 0 and metrics["cv_score"] == 0.0
    assert metrics["memory_limit_mb"] == pytest.approx(50) and metrics["memory_probe_peak_mb"] > 50
    assert metrics["memory_excess"] == pytest.approx(metrics["memory_probe_peak_mb"] / 50 - 1)
    assert "batch 2 at 64 px does not fit on cpu" in metrics["infeasible_reason"]
    assert len(result.metrics_dataframe) == 1  # the one infeasible report: no epoch ran

    roomy = dataclasses.replace(setup, resources=dataclasses.replace(RESOURCES, fold_memory_gb=64.0))
    (result,) = fit(roomy, tmp_path / "roomy", {"lr": 0.01})
    assert result.error is None and result.metrics["epoch"] == 1 and "infeasible" not in result.metrics
    assert 50 < result.metrics["memory_probe_peak_mb"] < 64 * 1024


def test_trials_reuse_the_fold_processes_also_after_tune_stopped_the_trial_before(
    local_ray: None, deepforest_root: Path, tmp_path: Path
) -> None:
    """reuse_actors: trial 2 runs on trial 1's coordinator and fold processes (parked, then `reset`). Tune stops
    trial 2 after its first report, as a scheduler's STOP would; the stop ends its thread inside that report, with
    the folds between epochs, so they are parked too and trial 3 runs on the same processes. Each trial trains
    as a fresh one: trial 3 (lr 0.01, like trial 1) reproduces trial 1's losses on reused workers."""
    split = Split(selection=(), test=(), folds=((0, 1), (2, 3)), seed=0)
    setup = dataclasses.replace(make_setup(deepforest_root, split, tmp_path, epochs=2, batch_size=2),
                                reuse_workers=True)

    def stop_the_second(trial_id: str, result: dict) -> bool:
        return result["config"]["lr"] == 0.02  # after its first report

    results = fit(setup, tmp_path, {"lr": tune.grid_search([0.01, 0.02, 0.01])}, stop=stop_the_second)
    assert not results.errors, [str(r.error)[:500] for r in results if r.error]
    first, second, third = (r.metrics_dataframe for r in sorted(results, key=lambda r: r.metrics_dataframe["timestamp"].min()))
    assert first["epoch"].tolist() == third["epoch"].tolist() == [1, 2] and third["finished"].tolist()[-1] == 1
    assert second["epoch"].tolist() == [1] and second["finished"].tolist() == [0]  # stopped by Tune
    # one coordinator process and the same two fold processes for all three trials
    assert len({int(h["coordinator_pid"].iloc[0]) for h in (first, second, third)}) == 1
    assert [int(h["folds_reused"].iloc[0]) for h in (first, second, third)] == [0, 2, 2]
    for k in range(2):
        assert first[f"fold{k}/pid"].iloc[0] == second[f"fold{k}/pid"].iloc[0] == third[f"fold{k}/pid"].iloc[0]
    # rebuilding a parked fold is much cheaper than starting one
    assert third["startup_folds_s"].iloc[0] < first["startup_folds_s"].iloc[0] / 2
    for k in range(2):
        assert third[f"fold{k}/loss"].tolist() == pytest.approx(first[f"fold{k}/loss"].tolist(), rel=1e-4)
