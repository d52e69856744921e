"""One fold's training, epoch by epoch, with no Ray: the unit that a Ray fold worker wraps.

`FoldTrainer` owns the model, optimizer, LR schedule, grad scaler, data loaders and early stopping of
one fold, and can save and restore all of it (`state_dict` holds only tensors and primitives so that
`torch.load(..., weights_only=True)` reads it back). `detsweep train` drives one directly.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from detection.config import ExperimentConfig
from detection.data.anchors import kmeans_anchor_shapes
from detection.data.coco import CocoDetection, CocoIndex, collate_detection
from detection.data.sampling import RepeatFactorSampler, repeat_factors
from detection.data.transforms import build_eval_transforms, build_train_transforms
from detection.engine import (
    EarlyStopping,
    build_optimizer,
    build_warmup_cosine_scheduler,
    collect_predictions,
    train_one_epoch,
)
from detection.data.splits import unlearnable_labels
from detection.metrics import class_name, detection_metrics, keep_classes, match_predictions
from detection.memory_probe import MemoryProbe, probe_training_step
from detection.models.factory import build_detector, set_image_size
from detection.predictions import SavedPredictions


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def anchor_shapes_for(index: CocoIndex, image_ids: Sequence[int], *, image_size: int, seed: int) -> np.ndarray:
    """K-means anchor (w, h) shapes, in pixels at the detector's input size, from the training boxes.

    Training images are resized so that their longest side is `image_size` (LongestMaxSize), so each
    box is scaled by image_size / max(width, height) of its image.
    """
    scaled = []
    for record in index.records(image_ids):
        if len(record.boxes):
            wh = record.boxes[:, 2:4] - record.boxes[:, 0:2]  # [M, 2] xyxy absolute -> (w, h)
            scaled.append(wh * (image_size / max(record.width, record.height)))
    if not scaled:
        raise ValueError("k-means anchors need at least one training box; set model.kmeans_anchors: false.")
    wh = np.concatenate(scaled).astype(np.float64)
    return kmeans_anchor_shapes(wh, k=min(9, len(wh)), seed=seed)


class FoldTrainer:
    """Trains and evaluates one fold (`train_ids` vs `val_ids` of a CocoIndex)."""

    def __init__(
        self,
        config: ExperimentConfig,
        index: CocoIndex,
        *,
        train_ids: Sequence[int],
        val_ids: Sequence[int],
        device: str | torch.device | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> None:
        if config.data.filter_empty:  # not trained on; they stay in validation
            train_ids = [i for i in train_ids if len(index.by_id(i).boxes)]
        if not train_ids:
            raise ValueError("FoldTrainer needs at least one training image (with boxes when data.filter_empty), "
                             "got an empty `train_ids`.")
        self.config = config
        self.index = index
        self.device = resolve_device(device)
        self.seed = config.seed if seed is None else seed
        self.progress = progress
        seed_everything(self.seed)
        train_cfg, model_cfg = config.train, config.model

        anchor_shapes = None
        if model_cfg.kmeans_anchors and model_cfg.arch == "faster_rcnn":
            anchor_shapes = anchor_shapes_for(index, train_ids, image_size=train_cfg.image_size, seed=self.seed)
        self.model = build_detector(
            arch=model_cfg.arch,
            backbone=model_cfg.backbone,
            num_classes=len(index.class_names),
            image_size=train_cfg.image_size,
            start=model_cfg.start,
            weights_path=model_cfg.weights_path,
            anchor_shapes=anchor_shapes,
            trainable_layers=model_cfg.trainable_layers,
            roi_batch_size_per_image=model_cfg.roi_batch_size_per_image,
            rpn_post_nms_top_n_train=model_cfg.rpn_post_nms_top_n_train,
            freeze_backbone_epochs=model_cfg.freeze_backbone_epochs,
            **model_cfg.architecture_options,
        ).to(self.device)

        # Crowd boxes are ignored in training as the metrics ignore them (torchvision's references drop them).
        self.train_set = CocoDetection(index, list(train_ids), transforms=None, drop_crowd=True)
        self.val_set = CocoDetection(index, list(val_ids), transforms=build_eval_transforms(None))
        # A class that no training image of this fold holds cannot be learnt here: scoring it would rank where
        # the split put its images, not the hyperparameters (its AP is 0 and drags the fold's mAP down by a
        # share of the classes). The fold's metrics leave such classes out, ground truth and predictions alike.
        self.unscored_labels = unlearnable_labels(index, train_ids=train_ids, val_ids=val_ids)
        self.unscored_classes = tuple(class_name(label, index.class_names) for label in self.unscored_labels)
        self.sampler = None
        if config.data.class_balanced_sampling:
            factors = repeat_factors(index.records(train_ids), threshold=config.data.repeat_threshold)
            self.sampler = RepeatFactorSampler(factors, seed=self.seed)
            expected_images = float(np.sum(factors))
        else:
            expected_images = float(len(train_ids))
        self.iters_per_epoch = max(1, math.ceil(expected_images / train_cfg.batch_size))

        self.optimizer = build_optimizer(
            self.model, name=train_cfg.optimizer, lr=train_cfg.lr,
            weight_decay=train_cfg.weight_decay, momentum=train_cfg.momentum,
        )
        self.scheduler = build_warmup_cosine_scheduler(
            self.optimizer,
            warmup_iters=int(train_cfg.warmup_epochs * self.iters_per_epoch),
            total_iters=train_cfg.epochs * self.iters_per_epoch,
            min_lr_ratio=train_cfg.min_lr_ratio,
        )
        use_amp = train_cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        self.early_stopping = EarlyStopping(patience=train_cfg.patience, mode="max") if train_cfg.patience else None
        self.epoch = 0  # epochs completed
        self.best_score = -math.inf
        self.best_epoch = -1
        self.improved = False  # whether the last evaluate() gave this fold's best score
        self.best_predictions: SavedPredictions | None = None  # validation predictions of the best epoch
        self.should_stop = False

    # -- one epoch -------------------------------------------------------------------------------
    def _train_loader(self, size: int) -> DataLoader:
        # Transforms and shuffling are reseeded per epoch so that a resumed fold sees the same epochs.
        epoch_seed = self.seed * 1000 + self.epoch
        train_cfg = self.config.train
        self.train_set.transforms = build_train_transforms(
            size, seed=epoch_seed, vflip_p=train_cfg.vflip_p, rot90_p=train_cfg.rot90_p,
        ) if train_cfg.augment else build_eval_transforms(size)
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        return DataLoader(
            self.train_set,
            batch_size=self.config.train.batch_size,
            sampler=self.sampler,
            shuffle=self.sampler is None,
            generator=generator,
            num_workers=self.config.data.num_workers,
            collate_fn=collate_detection,
        )

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch; returns the mean losses, lr, input size and wall time."""
        start = time.perf_counter()
        size = self.config.train.image_size_at(self.epoch)
        set_image_size(self.model, size)
        set_epoch = getattr(self.model, "set_epoch", None)
        if callable(set_epoch):  # e.g. fcos_tal's backbone unfreezing schedule
            set_epoch(self.epoch)
        losses = train_one_epoch(
            self.model, self.optimizer, self._train_loader(size),
            device=self.device, scaler=self.scaler, scheduler=self.scheduler,
            grad_clip=self.config.train.grad_clip, progress=self.progress,
        )
        self.epoch += 1
        return {
            **losses,
            "epoch": self.epoch,
            "image_size": size,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_time_s": time.perf_counter() - start,
        }

    def probe_memory(self, limit_bytes: int | None = None, device_share: float = 1.0) -> MemoryProbe:
        """One training step's peak memory at the largest input and the train batch size, the fold left as it
        was (detection/memory_probe.py): whether this batch size fits before any epoch is spent on it."""
        size = max(self.config.train.image_size, self.config.train.small_image_size or 0)
        set_image_size(self.model, size)
        return probe_training_step(self.model, batch_size=self.config.train.batch_size, image_size=size,
                                   num_classes=len(self.index.class_names), device=self.device,
                                   limit_bytes=limit_bytes, device_share=device_share, amp=self.scaler is not None)

    def evaluate(self) -> dict[str, float]:
        """Metrics on this fold's validation images at full input size; updates early stopping.

        F1 is at `train.score_threshold`, or at the F1-optimal threshold of these predictions when it is
        None. Classes without a training image in this fold (`unscored_classes`) are left out of every metric.
        The predictions of the best epoch so far are kept in `best_predictions` (out-of-fold).
        """
        start = time.perf_counter()
        set_image_size(self.model, self.config.train.image_size)
        loader = DataLoader(self.val_set, batch_size=self.config.train.eval_batch_size, shuffle=False,
                            num_workers=self.config.data.num_workers, collate_fn=collate_detection)
        preds, targets = collect_predictions(self.model, loader, device=self.device)
        if self.unscored_labels:
            scored = set(range(1, len(self.index.class_names) + 1)) - set(self.unscored_labels)
            preds, targets = keep_classes(preds, targets, scored)
        matches = match_predictions(preds, targets)  # once: F1 below and the saved out-of-fold predictions
        metrics = detection_metrics(preds, targets, score_threshold=self.config.train.score_threshold,
                                    class_names=self.index.class_names, matches=matches)
        score = metrics["score"]
        self.improved = score > self.best_score
        if self.improved:
            self.best_score, self.best_epoch = score, self.epoch
            self.best_predictions = SavedPredictions(self.val_set.ids, preds, matches)
        if self.early_stopping is not None:
            self.should_stop = self.early_stopping.step(score)
        return {**metrics, "epoch": self.epoch, "eval_time_s": time.perf_counter() - start}

    # -- state -----------------------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: loadable with torch.load(..., weights_only=True)."""
        np_state = np.random.get_state()
        return {
            "model": self.model_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping is not None else None,
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "should_stop": self.should_stop,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.early_stopping is not None and state["early_stopping"] is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])
        self.epoch = int(state["epoch"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.should_stop = bool(state["should_stop"])
        restore_rng(state["rng"])


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the process-global torch/CUDA/numpy/python RNGs to a `FoldTrainer.state_dict()["rng"]`."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(rng["python"])
