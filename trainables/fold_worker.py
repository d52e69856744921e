"""One fold of a trial as a Ray actor: a thin wrapper around `detection.trainer.FoldTrainer`.

`FoldWorker` is a plain class (it runs, and is tested, without Ray); the trial coordinator turns it into
an actor at use time inside the trial's placement group:

    ray.remote(FoldWorker).options(
        name=f"{trial_id}/fold-{k}", num_cpus=..., num_gpus=..., max_restarts=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k + 1),
    ).remote(config, split, k, state)

The worker loads the dataset and the split itself (every node reads `data.path`; only the small
config and split travel with the trial), so a fold recreated on another node needs nothing but the
bytes of its last state. `reset` rebuilds a worker for the next trial of the same placement group (Tune's
`reuse_actors`; see `trainables.fold_pool`). Every result carries the node id, the process id and wall-clock start/end
times (`time.time()`), so that placement and overlap of folds can be checked from the metrics.
"""

from __future__ import annotations

import gc
import io
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from detection.config import ExperimentConfig
from detection.data.coco import CocoIndex, load_dataset
from detection.data.splits import Split
from detection.trainer import FoldTrainer

__all__ = ["FoldWorker", "pick_device", "state_from_bytes", "state_to_bytes"]


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """`torch.save` of a state dict (tensors and primitives only) into bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of `state_to_bytes`; `weights_only=True`, so the bytes can come from a checkpoint on disk."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _assigned(resource: str) -> float | None:
    """This Ray worker's share of a resource (CPU or GPU); None outside a Ray worker (also in a driver)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0.0))
    except AssertionError:  # a driver: Ray assigns it nothing and asserts that only workers ask
        return None


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The fold's device: `device` when given, else CUDA only where CUDA works *and* Ray gave this
    worker a GPU. Ray no longer hides GPUs from actors that asked for none (it leaves
    CUDA_VISIBLE_DEVICES alone when num_gpus=0), so `torch.cuda.is_available()` alone would put a
    `gpus_per_fold: 0` fold on a GPU it did not reserve."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():  # also on nodes whose GPUs are logical only (tests)
        return torch.device("cpu")
    gpus = _assigned("GPU")
    return torch.device("cpu") if gpus == 0.0 else torch.device("cuda")


class FoldWorker:
    """Trains and evaluates fold `fold` of `split`, epoch by epoch; restartable from `state_bytes()`.

    Args:
        config: the trial's experiment config (`data.path` absolute or valid on every node).
        split: a `Split`, or the path of its `split.json` (readable on the worker's node).
        fold: k in `0..K-1`: validation on `split.val_ids(k)`, training on `split.train_ids(k)`.
        state: bytes of a previous `state_bytes()` (or a checkpoint's `folds/fold-<k>.pt`) to resume from.
        num_threads: torch intra-op threads; default: the CPUs Ray assigned to this actor (at least 1).
        device: default: `pick_device()`.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        split: Split | str | os.PathLike,
        fold: int,
        state: bytes | None = None,
        *,
        num_threads: int | None = None,
        device: str | None = None,
    ) -> None:
        self._device = device
        self._indexes: dict[str, CocoIndex] = {}  # data.path -> its loaded index, kept across `reset`
        self.trainer: FoldTrainer | None = None
        self.trials = 0  # trials this worker has served (`reset` calls)
        self.reset(config, split, fold, state, num_threads=num_threads)

    def reset(
        self,
        config: ExperimentConfig,
        split: Split | str | os.PathLike,
        fold: int,
        state: bytes | None = None,
        *,
        num_threads: int | None = None,
    ) -> dict[str, Any]:
        """Rebuild the worker for a (new) trial in this process, as `FoldWorker(config, split, fold, state)`
        would, and return its `info()`. A fold actor parked by one trial's coordinator serves the next trial of
        the same placement group this way (Tune's `reuse_actors`): no process start, no imports, and the dataset
        index is loaded once per `data.path`."""
        started = time.time()
        self.release()
        if num_threads is None:
            cpus = _assigned("CPU")
            num_threads = max(1, math.floor(cpus)) if cpus else None
        if num_threads is not None:
            # One fold's share of the node: without this torch takes every core and K folds thrash.
            torch.set_num_threads(num_threads)
        if not isinstance(split, Split):
            split = Split.from_json(Path(split))
        key = str(config.data.path)
        if key not in self._indexes:
            self._indexes = {key: load_dataset(config.data.path, filter_empty=False)}
        index = self._indexes[key]
        split.check_index(index)
        self.fold = int(fold)
        self.split_hash = split.hash
        self.trainer = FoldTrainer(
            config, index, train_ids=split.train_ids(self.fold), val_ids=split.val_ids(self.fold),
            device=pick_device(self._device),
        )
        if state is not None:
            self.trainer.load_state_dict(state_from_bytes(state))
        self.trials += 1
        self._info = {
            "fold": self.fold,
            "node_id": _ray_node_id(),
            "pid": os.getpid(),
            "device": str(self.trainer.device),
            "num_threads": torch.get_num_threads(),
            "num_train": len(split.train_ids(self.fold)),
            "num_val": len(split.val_ids(self.fold)),
            "num_classes": index.num_classes,
            "class_names": list(index.class_names),
            "category_ids": list(index.category_ids),
            "split_hash": split.hash,
            "resumed_epoch": self.trainer.epoch,
            "setup_time_s": time.time() - started,
            "trials_served": self.trials,  # 1 for a fresh worker, n for one reused by n - 1 trials before
        }
        return self.info()

    def release(self) -> None:
        """Drop the trainer (model, optimizer, scaler, data loaders) so that a worker parked between trials holds
        no model memory (on CUDA the cached blocks go back to the driver too); `reset` builds the next one."""
        if self.trainer is None:
            return
        on_cuda = self.trainer.device.type == "cuda"
        self.trainer = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def _where(self) -> dict[str, Any]:
        return {"fold": self.fold, "node_id": self._info["node_id"], "pid": self._info["pid"]}

    def info(self) -> dict[str, Any]:
        """Where the fold runs (node id, pid, device, threads), its image counts and the dataset's classes."""
        return dict(self._info)

    def probe_memory(self, limit_bytes: int | None = None, device_share: float = 1.0) -> dict[str, Any]:
        """`FoldTrainer.probe_memory`: one training step's peak memory against `limit_bytes` (on CUDA by default
        the GPU's memory x `device_share`), as `MemoryProbe.to_json` ("fits", "excess") plus node_id and pid;
        the fold is left as it was."""
        return {**self.trainer.probe_memory(limit_bytes, device_share).to_json(), **self._where()}

    def train_epoch(self) -> dict[str, Any]:
        """One training epoch: `FoldTrainer.train_epoch()` (mean losses incl. "loss", "epoch" 1-based)
        plus node_id, pid and wall-clock "start"/"end" (seconds since the epoch, `time.time()`)."""
        start = time.time()
        result = self.trainer.train_epoch()
        return {**result, **self._where(), "start": start, "end": time.time()}

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics (map, map_50, map_75, f1, score, ...) plus "improved" (this epoch gave the
        fold's best score), "best_score", "best_epoch", "should_stop", node_id, pid, "start"/"end"."""
        start = time.time()
        result = self.trainer.evaluate()
        return {
            **result,
            "improved": bool(self.trainer.improved),
            "best_score": float(self.trainer.best_score),
            "best_epoch": int(self.trainer.best_epoch),
            "should_stop": bool(self.trainer.should_stop),
            **self._where(),
            "start": start,
            "end": time.time(),
        }

    def state_bytes(self) -> bytes:
        """The fold's full resume state (model, optimizer, scaler, scheduler, epoch, RNG, early stopping)."""
        return state_to_bytes(self.trainer.state_dict())

    def best_outputs(self) -> dict[str, bytes] | None:
        """When the last `evaluate()` gave this fold's best score: the model's state_dict (CPU tensors) and
        its out-of-fold validation predictions (`detection.predictions.SavedPredictions` bytes) as
        `{"model", "predictions"}`; else None (an unchanged best model is not shipped again)."""
        if not self.trainer.improved or self.trainer.best_predictions is None:
            return None
        return {"model": state_to_bytes(self.trainer.model_state_dict()),
                "predictions": self.trainer.best_predictions.to_bytes()}

    def should_stop(self) -> bool:
        """Early stopping: the fold's score has not improved for `train.patience` evaluations."""
        return bool(self.trainer.should_stop)

    def epoch(self) -> int:
        """Epochs completed."""
        return int(self.trainer.epoch)
