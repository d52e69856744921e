"""Class-imbalance sampling: LVIS repeat-factor sampling (Gupta et al., LVIS, 2019, section 3.3).

For class c with image frequency ``f_c`` (the share of the training images that contain c):
``r_c = max(1, sqrt(t / f_c))``; an image repeats ``r_i = max(r_c for c in image)`` times per
epoch (1 for an image without boxes). Fractional repeat factors are rounded stochastically each
epoch (``floor(r) + Bernoulli(r - floor(r))``), so their expectation is exact over epochs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from detection.data.coco import ImageRecord

DEFAULT_REPEAT_THRESHOLD = 0.3  # DataConfig.repeat_threshold's default; LVIS uses 0.001 with 1203 classes


def repeat_factors(records: Sequence[ImageRecord], *, threshold: float = DEFAULT_REPEAT_THRESHOLD) -> np.ndarray:
    """Per-image repeat factors r_i, float64 ``[N]``, in the order of ``records``.

    Args:
        records: the training images (frequencies are counted over these only).
        threshold: t; classes present in fewer than ``t * N`` images are repeated.
    """
    if not threshold > 0:
        raise ValueError(f"`threshold > 0` must hold, but got ({threshold=}).")
    presence = [set(np.unique(record.labels).tolist()) for record in records]
    num_images = len(records)
    images_per_class = Counter(c for labels in presence for c in labels)
    class_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in images_per_class.items()}
    return np.array([max((class_factor[c] for c in labels), default=1.0) for labels in presence], dtype=np.float64)


class RepeatFactorSampler(torch.utils.data.Sampler[int]):
    """Yields dataset positions, image i about ``repeat_factors[i]`` times per epoch, shuffled.

    The epoch's draw depends only on (seed, epoch): call `set_epoch` before each epoch (as with
    `DistributedSampler`); ``len(sampler)`` is the length of the current epoch's draw.

    Args:
        repeat_factors: float ``[N]``, each >= 1 (see `repeat_factors`).
        seed: seeds the stochastic rounding and the shuffle.
        shuffle: shuffle the repeated positions (else they come in order).
    """

    def __init__(self, repeat_factors: Sequence[float] | np.ndarray, *, seed: int, shuffle: bool = True) -> None:
        factors = np.asarray(repeat_factors, dtype=np.float64).reshape(-1)
        if len(factors) == 0:
            raise ValueError("Expected repeat factors for at least one image, but got none.")
        if not np.all(np.isfinite(factors)) or factors.min() < 1.0:
            raise ValueError(f"Expected finite repeat factors >= 1, but got min {factors.min()}.")
        self.factors = factors
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._draw = self._indices(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw `__iter__` yields next."""
        self.epoch = int(epoch)
        self._draw = self._indices(self.epoch)

    def _indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self.factors)
        counts = (whole + (rng.random(len(self.factors)) < self.factors - whole)).astype(np.int64)
        positions = np.repeat(np.arange(len(self.factors)), counts)  # [sum(counts)]
        return rng.permutation(positions) if self.shuffle else positions

    def __iter__(self) -> Iterator[int]:
        return iter(self._draw.tolist())

    def __len__(self) -> int:
        return len(self._draw)
