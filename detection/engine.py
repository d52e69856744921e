"""Training and evaluation loops for torchvision-contract detectors (no Ray, no config objects).

In the spirit of torchvision's ``references/detection/engine.py``: the loops live outside the
models. A detector takes ``images`` (list of float [3, H, W] in [0, 1]) and, in train mode,
``targets`` (``boxes`` float [N, 4] xyxy absolute, ``labels`` int64 [N] in 1..C) and returns a dict
of scalar losses; in eval mode it returns one ``{"boxes", "scores", "labels"}`` dict per image with
boxes in that image's own pixels (xyxy absolute).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from detection.config import OPTIMIZERS
from detection.metrics import detection_metrics

__all__ = [
    "OPTIMIZERS",
    "EarlyStopping",
    "NonFiniteLossError",
    "WarmupCosineFactor",
    "build_optimizer",
    "build_warmup_cosine_scheduler",
    "collect_predictions",
    "evaluate",
    "mirror_boxes",
    "predict",
    "train_one_epoch",
]


Batch = tuple[Sequence[torch.Tensor], Sequence[Mapping[str, Any]]]


class NonFiniteLossError(RuntimeError):
    """Raised when ``max_nonfinite`` iterations in a row had a non-finite loss (the run diverged)."""


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    *,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = 10.0,
    max_nonfinite: int = 3,
    amp: bool | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``.

    Each iteration: forward under ``torch.autocast`` (CUDA only), backward (through ``scaler`` when
    given), gradient-norm clipping (after unscaling), optimizer step, then ``scheduler.step()``: the
    schedule is per iteration, and it advances on skipped iterations too so that the LR at iteration
    i does not depend on how many were skipped.

    An iteration whose loss (or, without a scaler, gradient norm) is not finite is skipped: no
    optimizer step, gradients dropped, a ``RuntimeWarning`` naming the iteration and the loss values.
    ``max_nonfinite`` such iterations in a row raise :class:`NonFiniteLossError`. (With a scaler, an
    inf gradient under a finite loss is fp16 overflow: ``GradScaler`` skips that step and lowers its
    scale, as designed, without counting it here.)

    Args:
        loader: yields ``(images, targets)`` as from ``collate_detection``: a list of float
            [3, H, W] tensors in [0, 1] and a list of target dicts (boxes [N, 4] xyxy absolute).
        device: where the model lives; batches are moved there.
        scaler: a ``torch.amp.GradScaler`` for fp16 autocast on CUDA; ``None`` on CPU.
        scheduler: stepped once per iteration (warmup + cosine is defined per iteration).
        grad_clip: max total L2 norm of the gradients; ``None`` or 0 disables clipping.
        max_nonfinite: how many non-finite iterations in a row are tolerated before raising.
        amp: autocast on/off; ``None`` = on exactly when on CUDA with a scaler. fp16 with a scaler,
            bf16 without one (bf16 needs no loss scaling).
        progress: show a tqdm bar with the running loss.

    Returns:
        The mean of every loss in the model's loss dict over the finite iterations, plus ``"loss"``
        (mean of their sum). NaN when every iteration was skipped.
    """
    device = torch.device(device)
    use_amp = (device.type == "cuda" and scaler is not None) if amp is None else bool(amp)
    if use_amp and device.type != "cuda":
        raise ValueError(f"Mixed precision (`amp=True`) needs a CUDA device, but got {device=}.")
    if max_nonfinite < 1:
        raise ValueError(f"`max_nonfinite >= 1` must hold, but got {max_nonfinite=}.")
    amp_dtype = torch.float16 if scaler is not None else torch.bfloat16
    clip = grad_clip is not None and grad_clip > 0
    params = [p for group in optimizer.param_groups for p in group["params"]]  # clip what is stepped

    model.train()
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="train", leave=False, dynamic_ncols=True)
    sums: dict[str, float] = {}
    finite_iters = 0
    in_a_row = 0
    iteration = -1
    for iteration, (images, targets) in enumerate(batches):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [_to_device(target, device) for target in targets]
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        unscaled = False
        grad_norm = None
        if clip:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                unscaled = True
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)

        # One host sync per iteration: every loss value (and the grad norm) comes over together.
        names = [*loss_dict, "loss"]
        watched = [value.detach().float().reshape(()) for value in loss_dict.values()] + [loss.detach().float()]
        if grad_norm is not None and scaler is None:
            names.append("grad_norm")
            watched.append(grad_norm.detach().float().reshape(()))
        values = dict(zip(names, torch.stack(watched).tolist()))

        if all(math.isfinite(value) for value in values.values()):
            in_a_row = 0
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            finite_iters += 1
            for name in loss_dict:
                sums[name] = sums.get(name, 0.0) + values[name]
            sums["loss"] = sums.get("loss", 0.0) + values["loss"]
            if progress:
                batches.set_postfix(loss=f"{values['loss']:.4f}")
        else:
            in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            if unscaled:
                scaler.update()  # closes this iteration's unscale_; lowers the scale if grads were inf
            shown = ", ".join(f"{name}={value:.4g}" for name, value in values.items())
            warnings.warn(
                f"Skipping iteration {iteration}: non-finite loss ({shown}); {in_a_row} in a row "
                f"(NonFiniteLossError at {max_nonfinite}).",
                RuntimeWarning,
                stacklevel=2,
            )
            if in_a_row >= max_nonfinite:
                raise NonFiniteLossError(
                    f"The loss was not finite for {in_a_row} iterations in a row (last: iteration "
                    f"{iteration}, {shown}). Lower the learning rate, enable grad clipping, or check "
                    f"the targets for degenerate boxes."
                )
        if scheduler is not None:
            scheduler.step()

    if iteration < 0:
        raise ValueError("Expected the training loader to yield at least one batch, but it yielded none.")
    if finite_iters == 0:
        return {"loss": math.nan}
    return {name: total / finite_iters for name, total in sums.items()}


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device | str,
    score_threshold: float | None,
    class_names: Sequence[str],
) -> dict[str, float]:
    """Predict every batch of ``loader`` in eval mode and compute :func:`detection_metrics`.

    Targets must be in the pixels of the images the loader yields (boxes xyxy absolute), which is
    where the detector's predictions come back. The model's train/eval mode is restored afterwards.
    ``score_threshold=None``: F1 at the F1-optimal threshold of these predictions.

    Returns:
        ``map, map_50, map_75, f1, precision, recall, score, score_threshold`` and ``ap/<name>``, ``ap_50/<name>``.
    """
    preds, targets = collect_predictions(model, loader, device=device)
    return detection_metrics(preds, targets, score_threshold=score_threshold, class_names=class_names)


def collect_predictions(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device | str,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Eval-mode predictions of every batch of ``loader`` and the matching targets, on the CPU, in order.

    ``preds[i]``: ``boxes`` [N, 4] xyxy absolute, ``scores`` [N], ``labels`` [N]; ``targets[i]``: ``boxes``,
    ``labels``, ``iscrowd`` (and ``image_id`` when the loader gives it).
    """
    device = torch.device(device)
    preds: list[dict[str, torch.Tensor]] = []
    targets: list[dict[str, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, batch_targets in loader:
                outputs = model([image.to(device, non_blocking=True) for image in images])
                preds.extend(_to_cpu(output, ("boxes", "scores", "labels")) for output in outputs)
                targets.extend(_to_cpu(target, ("boxes", "labels", "iscrowd", "image_id")) for target in batch_targets)
    finally:
        model.train(was_training)
    return preds, targets


def predict(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    *,
    device: torch.device | str,
    batch_size: int = 4,
    hflip: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Eval-mode predictions for ``images`` (float [3, H, W] in [0, 1], any sizes), in batches.

    ``hflip``: predict the mirrored images and mirror the boxes back, the second view of flip test-time
    augmentation (the models train with horizontal flips; WBF fuses the two views).

    Returns:
        One CPU dict per image: ``boxes`` float [N, 4] xyxy absolute in that image's pixels,
        ``scores`` [N], ``labels`` int64 [N].
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size >= 1` must hold, but got {batch_size=}.")
    for i, image in enumerate(images):
        if not (isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 3):
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"Expected images[{i}] to be a float tensor of shape [3, H, W], got {got}.")
    device = torch.device(device)
    results: list[dict[str, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = [image.to(device, non_blocking=True) for image in images[start : start + batch_size]]
                if hflip:
                    batch = [image.flip(-1) for image in batch]
                for image, output in zip(batch, model(batch)):
                    output = _to_cpu(output, ("boxes", "scores", "labels"))
                    if hflip:
                        output["boxes"] = mirror_boxes(output["boxes"], width=image.shape[-1])
                    results.append(output)
    finally:
        model.train(was_training)
    return results


def mirror_boxes(boxes: torch.Tensor, *, width: int) -> torch.Tensor:
    """``xyxy absolute`` boxes of a horizontally flipped image of ``width`` pixels, in the original's pixels."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD (Nesterov off), AdamW or Adam over the trainable parameters of ``model``.

    Biases and normalization parameters (every parameter with ndim <= 1) get no weight decay
    (timm's ``param_groups_weight_decay``). ``momentum`` is used by SGD only; Adam/AdamW keep
    their default betas (0.9, 0.999).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"`name` must be one of {OPTIMIZERS}, but got {name=}.")
    if not lr > 0:
        raise ValueError(f"`lr > 0` must hold, but got {lr=}.")
    if not weight_decay >= 0:
        raise ValueError(f"`weight_decay >= 0` must hold, but got {weight_decay=}.")
    groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False).")
    match name:
        case "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        case "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        case "adam":
            return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise AssertionError(name)  # unreachable: checked against OPTIMIZERS above


@dataclass(frozen=True)
class WarmupCosineFactor:
    """LR multiplier at iteration ``i``: linear warmup, then cosine decay to ``min_lr_ratio``.

    ``i < warmup_iters``: ``start + (1 - start) * i / warmup_iters`` (``start = warmup_start_ratio``);
    then ``min + (1 - min) * 0.5 * (1 + cos(pi * p))`` with ``p = (i - warmup) / (total - warmup)``
    clamped to [0, 1]. Primitive fields only, so ``LambdaLR.state_dict`` stays ``weights_only``-loadable.
    """

    warmup_iters: int
    total_iters: int
    min_lr_ratio: float
    warmup_start_ratio: float

    def __call__(self, i: int) -> float:
        if i < self.warmup_iters:
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * i / self.warmup_iters
        progress = min(1.0, (i - self.warmup_iters) / max(1, self.total_iters - self.warmup_iters))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_iters: int,
    total_iters: int,
    min_lr_ratio: float = 0.01,
    warmup_start_ratio: float = 0.001,
) -> LambdaLR:
    """Per-iteration LR schedule: linear warmup from ``warmup_start_ratio * lr`` to ``lr`` over
    ``warmup_iters``, then cosine to ``min_lr_ratio * lr`` at ``total_iters`` (and flat after).
    See :class:`WarmupCosineFactor` for the formula."""
    if total_iters < 1:
        raise ValueError(f"`total_iters >= 1` must hold, but got {total_iters=}.")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"`0 <= warmup_iters <= total_iters` must hold, but got ({warmup_iters=}, {total_iters=}).")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"`0 <= min_lr_ratio <= 1` must hold, but got {min_lr_ratio=}.")
    if not 0.0 < warmup_start_ratio <= 1.0:
        raise ValueError(f"`0 < warmup_start_ratio <= 1` must hold, but got {warmup_start_ratio=}.")
    factor = WarmupCosineFactor(int(warmup_iters), int(total_iters), float(min_lr_ratio), float(warmup_start_ratio))
    return LambdaLR(optimizer, lr_lambda=factor)


class EarlyStopping:
    """Stop when the monitored value has not improved for ``patience`` evaluations in a row.

    An improvement is ``value > best + min_delta`` (``mode="max"``) or ``value < best - min_delta``
    (``mode="min"``); a NaN never improves.
    """

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"`patience >= 1` must hold, but got {patience=}.")
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be one of ('max', 'min'), but got {mode=}.")
        if min_delta < 0:
            raise ValueError(f"`min_delta >= 0` must hold, but got {min_delta=}.")
        self.patience = int(patience)
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.num_bad = 0
        self.should_stop = False

    def step(self, value: float) -> bool:
        """Record one evaluation; returns whether training should stop now."""
        value = float(value)
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        self.should_stop = self.num_bad >= self.patience
        return self.should_stop

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "best": self.best,
            "num_bad": self.num_bad,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.patience = int(state["patience"])
        self.mode = str(state["mode"])
        self.min_delta = float(state["min_delta"])
        self.best = None if state["best"] is None else float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.should_stop = bool(state["should_stop"])


def _to_device(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in target.items()
    }


def _to_cpu(entry: Mapping[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {key: entry[key].detach().cpu() for key in keys if key in entry}
