"""Anchor shapes from the training boxes: k-means with the ``1 - IoU`` distance (YOLOv2, Redmon 2017).

Boxes are compared as (w, h) aligned at a common corner, so ``IoU = min(w) min(h) / union``.
The algorithm (documented because there are several in use):

1. k-means++ seeding (scikit-learn's `kmeans_plusplus`) on ``log(w, h)``: in log space the
   Euclidean distance is scale-relative, as ``1 - IoU`` is, so small boxes get centers too.
2. Lloyd iterations with the IoU distance: assign every box to the center it overlaps most, move
   each center to the per-coordinate median of its boxes (robust to a few huge boxes), until the
   assignment no longer changes. An emptied center is moved to the box worst fitted so far.
3. Of ``n_init`` seeded restarts, keep the one with the highest mean best IoU.

Turning the shapes into a torchvision ``AnchorGenerator`` is `detection.models`' job.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import kmeans_plusplus


def wh_iou(wh: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """IoU of corner-aligned boxes: float64 ``[N, K]`` for ``wh`` ``[N, 2]`` and ``shapes`` ``[K, 2]`` (w, h)."""
    wh = np.asarray(wh, dtype=np.float64)[:, None, :]  # [N, 1, 2]
    shapes = np.asarray(shapes, dtype=np.float64)[None, :, :]  # [1, K, 2]
    inter = np.minimum(wh, shapes).prod(axis=2)  # [N, K]
    return inter / (wh.prod(axis=2) + shapes.prod(axis=2) - inter)


def mean_best_iou(wh: np.ndarray, shapes: np.ndarray) -> float:
    """Mean over boxes of the IoU with their best-fitting shape (a fit figure in ``[0, 1]``)."""
    wh, shapes = _check_wh(wh, "wh"), _check_wh(shapes, "shapes")
    return float(wh_iou(wh, shapes).max(axis=1).mean())


def _check_wh(wh: np.ndarray, name: str) -> np.ndarray:
    wh = np.asarray(wh, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2 or len(wh) == 0:
        raise ValueError(f"Expected `{name}` of shape [N, 2] (w, h) with N >= 1, but got shape {list(wh.shape)}.")
    if not np.all(np.isfinite(wh)) or wh.min() <= 0:
        raise ValueError(f"Expected `{name}` to hold finite positive widths and heights, but got min {wh.min()}.")
    return wh


def kmeans_anchor_shapes(
    wh: np.ndarray, *, k: int = 9, seed: int = 0, n_init: int = 3, max_iter: int = 300
) -> np.ndarray:
    """k anchor shapes (w, h) that fit the boxes, float64 ``[k, 2]`` sorted by area (ascending).

    Args:
        wh: box widths and heights in pixels, ``[N, 2]``, N >= k.
        k: number of shapes.
        seed: seeds the k-means++ restarts.
        n_init: restarts; the best mean IoU wins.
        max_iter: Lloyd iterations per restart at most.
    """
    wh = _check_wh(wh, "wh")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k >= 1` must hold, but got ({k=}).")
    if len(wh) < k:
        raise ValueError(f"`num_boxes >= k` must hold for k-means, but got (num_boxes={len(wh)}, {k=}).")
    log_wh = np.log(wh)
    rng = np.random.default_rng(seed)
    best_shapes, best_fit = None, -1.0
    for _ in range(max(1, n_init)):
        seeds, _ = kmeans_plusplus(log_wh, n_clusters=k, random_state=int(rng.integers(2**31 - 1)))
        shapes = _lloyd_iou(wh, np.exp(seeds), max_iter)
        fit = float(wh_iou(wh, shapes).max(axis=1).mean())
        if fit > best_fit:
            best_shapes, best_fit = shapes, fit
    return best_shapes[np.argsort(best_shapes.prod(axis=1), kind="stable")]


def _lloyd_iou(wh: np.ndarray, shapes: np.ndarray, max_iter: int) -> np.ndarray:
    shapes = shapes.copy()
    assignment = None
    for _ in range(max_iter):
        iou = wh_iou(wh, shapes)  # [N, k]
        new_assignment = iou.argmax(axis=1)
        if assignment is not None and np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        best = iou.max(axis=1)
        for j in range(len(shapes)):
            members = wh[assignment == j]
            if len(members):
                shapes[j] = np.median(members, axis=0)
            else:
                worst = int(best.argmin())
                shapes[j] = wh[worst]
                best[worst] = 1.0  # do not hand the same box to a second empty center
    return shapes
