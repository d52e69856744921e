"""Whether a training step fits in memory, measured with one step before a fold commits to its batch size.

`probe_training_step` runs one forward/backward of a synthetic batch at the largest input (batch_size square
images of image_size px, one box each: LongestMaxSize makes no training input larger) and leaves the model as
it found it (weights, buffers, gradients, RNG). Its peak:

- CUDA: `torch.cuda.max_memory_allocated` over the step, against the device's memory (or a smaller bound);
  an out-of-memory error is caught and reported as not fitting, with the peak reached before it;
- CPU: the process's peak resident memory after the step (`ru_maxrss`: model, data and libraries included),
  against a bound the config gives (a CPU has no memory of its own to run out of first).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MemoryProbe", "probe_training_step"]


@dataclass(frozen=True)
class MemoryProbe:
    """What one probe step measured."""

    device: str
    batch_size: int
    image_size: int
    peak_bytes: int
    limit_bytes: int | None  # None: no bound (the step ran, so it fits)
    out_of_memory: bool = False

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and (self.limit_bytes is None or self.peak_bytes <= self.limit_bytes)

    @property
    def excess(self) -> float:
        """peak / limit - 1: > 0 does not fit (the constraint Optuna learns), <= 0 fits; 1 after an OOM."""
        if self.out_of_memory:
            return max(1.0, self.peak_bytes / self.limit_bytes - 1.0) if self.limit_bytes else 1.0
        return self.peak_bytes / self.limit_bytes - 1.0 if self.limit_bytes else -1.0

    def describe(self) -> str:
        """One line for logs and the leaderboard, e.g. `batch 8 at 800 px does not fit on cuda:0: one step
        peaked at 90112 MiB (bound 81559 MiB)`."""
        mib = 2**20
        limit = f"{self.limit_bytes / mib:.0f} MiB" if self.limit_bytes else "no bound"
        what = "out of memory" if self.out_of_memory else f"one step peaked at {self.peak_bytes / mib:.0f} MiB"
        verdict = "fits" if self.fits else "does not fit"
        return f"batch {self.batch_size} at {self.image_size} px {verdict} on {self.device}: {what} (bound {limit})"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits, "excess": self.excess, "description": self.describe()}


def _process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def probe_training_step(model: nn.Module, *, batch_size: int, image_size: int, num_classes: int,
                        device: torch.device | str, limit_bytes: int | None = None, device_share: float = 1.0,
                        amp: bool = False) -> MemoryProbe:
    """One forward/backward of a synthetic batch in train mode; see the module docstring.

    Args:
        model: a torchvision-style detector: `model(images, targets)` returns a loss dict in train mode.
        num_classes: foreground classes (the synthetic boxes use label 1..num_classes).
        limit_bytes: the bound the peak is compared with; None on CUDA means the device's total memory times
            `device_share` (folds that share a GPU, e.g. `resources.gpus_per_fold: 0.5`, get their share).
        amp: autocast as training does on CUDA (fp16).
    """
    device = torch.device(device)
    if device.type == "cuda" and limit_bytes is None:
        limit_bytes = int(torch.cuda.get_device_properties(device).total_memory * min(1.0, device_share))
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # BN running stats
    was_training = model.training
    out_of_memory = False
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(3, image_size, image_size, generator=generator).to(device) for _ in range(batch_size)]
        side = image_size / 2
        targets = [{"boxes": torch.tensor([[side / 2, side / 2, side * 1.5, side * 1.5]], device=device),
                    "labels": torch.tensor([1 + i % max(num_classes, 1)], device=device)} for i in range(batch_size)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        try:
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                losses = model(images, targets)
            sum(losses.values()).backward()
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            model.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = int(torch.cuda.max_memory_allocated(device))
            torch.cuda.empty_cache()
        else:
            peak = _process_peak_rss_bytes()
    return MemoryProbe(device=str(device), batch_size=batch_size, image_size=image_size, peak_bytes=peak,
                       limit_bytes=limit_bytes, out_of_memory=out_of_memory)
