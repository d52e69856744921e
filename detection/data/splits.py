"""Seeded K-fold splits over image ids, stratified by class presence, plus a held-out test split.

The held-out split is the Roboflow ``test/`` folder when the dataset has one, else a seeded,
stratified share ``holdout_fraction`` of the images. The rest (the pool) is cut into K disjoint
validation folds with sklearn's `StratifiedKFold`; fold k trains on the pool minus fold k.

Stratification key of an image: the rarest class present in it (rarest = in the fewest images),
0 for an image without boxes. `StratifiedKFold` spreads each key over the folds as evenly as it can,
so a class in fewer images than K lands in as many different folds as it has images; when no key
has K images, plain seeded `KFold` is used.

A `Split` is saved to JSON with a sha256 of its content; `Split.from_json` checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from detection.data.coco import CocoIndex, DatasetError, ImageRecord

logger = logging.getLogger(__name__)

SPLIT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Split:
    """Held-out ids and K disjoint validation folds over the remaining pool (global image ids)."""

    holdout: tuple[int, ...]
    folds: tuple[tuple[int, ...], ...]
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "holdout", tuple(int(i) for i in self.holdout))
        object.__setattr__(self, "folds", tuple(tuple(int(i) for i in fold) for fold in self.folds))
        seen: set[int] = set(self.holdout)
        if len(seen) != len(self.holdout):
            raise ValueError(f"Split holdout ids must be unique, but got {len(self.holdout)} ids with repeats.")
        for k, fold in enumerate(self.folds):
            if not fold:
                raise ValueError(f"Split fold {k} is empty; every fold needs at least one image.")
            overlap = seen.intersection(fold)
            if overlap or len(set(fold)) != len(fold):
                raise ValueError(
                    f"Split folds and holdout must be disjoint, but fold {k} repeats ids {sorted(overlap)[:10]}."
                )
            seen.update(fold)

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    @property
    def pool_ids(self) -> tuple[int, ...]:
        """All non-held-out ids (the union of the folds), sorted."""
        return tuple(sorted(i for fold in self.folds for i in fold))

    def _check_fold(self, k: int) -> None:
        if not 0 <= k < len(self.folds):
            raise ValueError(f"`0 <= k < num_folds` must hold, but got ({k=}, num_folds={len(self.folds)}).")

    def val_ids(self, k: int) -> tuple[int, ...]:
        """Validation ids of fold k."""
        self._check_fold(k)
        return self.folds[k]

    def train_ids(self, k: int) -> tuple[int, ...]:
        """Training ids of fold k: the pool minus fold k, sorted."""
        self._check_fold(k)
        val = set(self.folds[k])
        return tuple(i for i in self.pool_ids if i not in val)

    def _payload(self) -> dict:
        return {"holdout": list(self.holdout), "folds": [list(f) for f in self.folds], "seed": self.seed}

    @property
    def hash(self) -> str:
        """sha256 hex digest of the canonical JSON of (holdout, folds, seed)."""
        canonical = json.dumps(self._payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def check_index(self, index: CocoIndex) -> None:
        """Raise DatasetError when the split names ids that the dataset does not have."""
        largest = max([*self.holdout, *self.pool_ids], default=-1)
        if largest >= len(index) or min([*self.holdout, *self.pool_ids], default=0) < 0:
            raise DatasetError(
                f"The split (hash {self.hash[:12]}) names image id {largest}, but the dataset has ids "
                f"0..{len(index) - 1} (root {index.root}); expected the split made from this dataset."
            )

    def to_json(self, path: str | Path) -> Path:
        """Write ``{"version", "seed", "holdout", "folds", "hash"}`` to path; returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": SPLIT_FORMAT_VERSION, **self._payload(), "hash": self.hash}, indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Split:
        """Read a split written by `to_json`; DatasetError when malformed or its hash does not match."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}.") from error
        except OSError as error:
            raise DatasetError(f"{path}: cannot read the split file ({error}).") from error
        missing = [key for key in ("holdout", "folds", "seed", "hash") if not isinstance(data, dict) or key not in data]
        if missing:
            raise DatasetError(f"{path}: missing key(s) {missing}; expected a file written by Split.to_json.")
        try:
            split = cls(holdout=data["holdout"], folds=data["folds"], seed=data["seed"])
        except (TypeError, ValueError) as error:
            raise DatasetError(f"{path}: invalid split ({error}).") from error
        if split.hash != data["hash"]:
            raise DatasetError(
                f"{path}: the split's sha256 is {split.hash}, but the file records {data['hash']}; "
                "the file was edited or corrupted."
            )
        return split


def stratification_keys(records: Sequence[ImageRecord]) -> np.ndarray:
    """Per image, the rarest class present (fewest images among ``records``), 0 for no boxes. int64 [N]."""
    presence = [set(np.unique(r.labels).tolist()) for r in records]
    images_per_class = Counter(label for labels in presence for label in labels)
    # Ties broken by the label so that keys do not depend on set order.
    return np.array(
        [min(labels, key=lambda c: (images_per_class[c], c)) if labels else 0 for labels in presence],
        dtype=np.int64,
    )


def make_split(index: CocoIndex, *, num_folds: int, holdout_fraction: float, seed: int) -> Split:
    """Seeded, stratified split of a dataset into a held-out set and K validation folds.

    Args:
        index: the dataset; records with ``split == "test"`` (a Roboflow ``test/`` folder) form the
            held-out set, and then ``holdout_fraction`` is not used.
        num_folds: K >= 2.
        holdout_fraction: share of the images held out when there is no ``test/`` folder, in
            ``[0, 1)``; 0 holds nothing out.
        seed: same seed, same dataset -> same split.

    Raises:
        ValueError: K < 2, holdout_fraction outside ``[0, 1)``, or fewer pool images than K.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"`num_folds >= 2` must hold, but got ({num_folds=}).")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"`0 <= holdout_fraction < 1` must hold, but got ({holdout_fraction=}).")
    records = index.records()
    ids = np.array([r.image_id for r in records], dtype=np.int64)
    keys = stratification_keys(records)
    is_test = np.array([r.split == "test" for r in records])
    if is_test.any():
        if holdout_fraction:
            logger.info("Holding out the %d images of the test/ folder; holdout_fraction=%s is not used.",
                        int(is_test.sum()), holdout_fraction)
        holdout_mask = is_test
    else:
        holdout_mask = _stratified_share(keys, holdout_fraction, seed)
    pool, pool_keys = ids[~holdout_mask], keys[~holdout_mask]
    if len(pool) < num_folds:
        raise ValueError(
            f"`num_pool_images >= num_folds` must hold for K-fold, but got (num_pool_images={len(pool)}, "
            f"{num_folds=}) from {len(ids)} images with {int(holdout_mask.sum())} held out."
        )
    if Counter(pool_keys.tolist()).most_common(1)[0][1] >= num_folds:
        splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # "The least populated class has fewer members than n_splits": spread as far as it goes.
            warnings.simplefilter("ignore", UserWarning)
            parts = list(splitter.split(pool, pool_keys))
    else:
        logger.info("No class is in %d pool images or more; using unstratified KFold.", num_folds)
        parts = list(KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(pool))
    folds = tuple(tuple(sorted(pool[val].tolist())) for _, val in parts)
    return Split(holdout=tuple(sorted(ids[holdout_mask].tolist())), folds=folds, seed=seed)


def _stratified_share(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask [N] selecting ``round(fraction * N)`` images, proportionally per key, seeded.

    Each key gets ``floor(fraction * n_key)`` images; the remaining picks go by largest remainder to
    keys that keep at least two images in the pool, so a class seen in one image stays trainable.
    (sklearn's stratified ``train_test_split`` refuses keys with a single image.)
    """
    n = len(keys)
    total = int(round(fraction * n))
    if fraction > 0:
        total = max(total, 1)
    mask = np.zeros(n, dtype=bool)
    if total == 0:
        return mask
    rng = np.random.default_rng(seed)
    groups = {key: rng.permutation(np.flatnonzero(keys == key)) for key in np.unique(keys)}
    quota = {key: fraction * len(members) for key, members in groups.items()}
    take = {key: int(np.floor(q)) for key, q in quota.items()}
    # Remainders: largest first; keys whose last pool images would go are not eligible at first.
    order = sorted(groups, key=lambda key: (-(quota[key] - take[key]), -len(groups[key]), key))
    for eligible in (lambda key: len(groups[key]) - take[key] >= 2, lambda key: len(groups[key]) - take[key] >= 1):
        for key in order:
            if sum(take.values()) >= total:
                break
            if eligible(key):
                take[key] += 1
    for key, members in groups.items():
        mask[members[: take[key]]] = True
    return mask
