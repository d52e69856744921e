"""How far a split's figures can be trusted: a paired bootstrap over its images.

A held-out split of a few dozen images gives map_50 and F1 that move by several points with the images drawn,
so "the ensemble beats the single model by 0.01" means little on its own. Resampling the split's images with
replacement (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13 percentile intervals) and
scoring both sets of predictions on the same resample gives a confidence interval for each figure and, paired,
for their difference (Koehn 2004's paired bootstrap for comparing two systems on one test set).

Each resample re-ranks the pooled detections, as mAP and F1 are not means over images: mAP@0.5 is recomputed by
torchmetrics at IoU 0.5 only, F1 from the images' greedy matches (computed once) at the fixed thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from detection.metrics import MAX_DETECTIONS, Detections, Matches, _check_inputs, map_50, match_predictions

__all__ = ["BOOTSTRAP_METRICS", "format_interval", "paired_bootstrap"]

BOOTSTRAP_METRICS = ("map_50", "f1", "score")


def paired_bootstrap(preds_a: Detections, preds_b: Detections, targets: Detections, *,
                     thresholds: tuple[float, float], samples: int, seed: int = 0, level: float = 0.95,
                     max_detections: int = MAX_DETECTIONS) -> dict[str, Any]:
    """Percentile intervals of `a`'s and `b`'s map_50, F1 and score and of `a - b`, over `samples` resamples of
    the images (the same resample for both: paired).

    Args:
        preds_a, preds_b: one dict per image of each system, in the order of `targets`.
        targets: one dict per image (``boxes``, ``labels``, optional ``iscrowd``).
        thresholds: the score thresholds F1 uses for `a` and `b` (chosen elsewhere, never on these images).
        samples: number of resamples (>= 1).
        seed: the resampling seed (the intervals are reproducible).
        level: the two-sided coverage of the intervals.

    Returns:
        ``{"samples", "level", "seed", "images", "a": {metric: [lo, hi]}, "b": {...}, "difference": {...},
        "share_a_ge_b": {metric: share of resamples with a >= b}}`` for metric in `BOOTSTRAP_METRICS`.
    """
    _check_inputs(preds_a, targets)
    _check_inputs(preds_b, targets)
    if samples < 1:
        raise ValueError(f"`samples >= 1` must hold, but got {samples=}.")
    if not 0 < level < 1:
        raise ValueError(f"`level` must be in (0, 1), but got {level=}.")
    n = len(targets)
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one image, got none.")
    matches = [[match_predictions([p], [t], iou_threshold=0.5) for p, t in zip(preds, targets)]
               for preds in (preds_a, preds_b)]
    rng = np.random.default_rng(seed)
    draws: dict[str, np.ndarray] = {f"{side}/{m}": np.zeros(samples) for side in "ab" for m in BOOTSTRAP_METRICS}
    for s in range(samples):
        idx = rng.integers(0, n, size=n)
        picked = [targets[i] for i in idx]
        for side, preds, per_image, thr in (("a", preds_a, matches[0], thresholds[0]),
                                            ("b", preds_b, matches[1], thresholds[1])):
            m50 = map_50([preds[i] for i in idx], picked, max_detections=max_detections)
            f1 = Matches.concat([per_image[i] for i in idx]).f1_at(thr)
            draws[f"{side}/map_50"][s], draws[f"{side}/f1"][s] = m50, f1
            draws[f"{side}/score"][s] = 0.5 * m50 + 0.5 * f1
    tail = 100 * (1 - level) / 2

    def interval(values: np.ndarray) -> list[float]:
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

    diff = {m: draws[f"a/{m}"] - draws[f"b/{m}"] for m in BOOTSTRAP_METRICS}
    return {"samples": samples, "level": level, "seed": seed, "images": n,
            "a": {m: interval(draws[f"a/{m}"]) for m in BOOTSTRAP_METRICS},
            "b": {m: interval(draws[f"b/{m}"]) for m in BOOTSTRAP_METRICS},
            "difference": {m: interval(d) for m, d in diff.items()},
            "share_a_ge_b": {m: float((d >= 0).mean()) for m, d in diff.items()}}


def format_interval(bounds: Sequence[float], spec: str = ".3f") -> str:
    """``[lo, hi]`` as text."""
    lo, hi = bounds
    return f"[{lo:{spec}}, {hi:{spec}}]"
