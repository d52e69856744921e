"""Seeded K-fold splits over image ids, stratified by class presence, plus two held-out parts.

The evaluation protocol (DESIGN.md) needs three disjoint sets of images:

- ``folds``: K disjoint validation folds over the pool; fold k trains on the pool minus fold k. Each fold's
  validation picks its best epoch and gives the trial's CV score (what the search is told).
- ``selection``: ranks the trials' ensembles, drives greedy cross-trial selection and tunes the winner's
  score threshold. Never trained on.
- ``test``: scored once, for the chosen ensemble's final figures. Never used for any choice.

A Roboflow export's ``valid/`` folder is the selection split and ``test/`` the test split; a part without
its folder is a seeded, stratified share of the images (``selection_fraction``/``test_fraction`` of all).
Images named in ``exclude`` (bad files with ``data.on_bad_image: skip``) are in no part; the split records
them with their reason.

Stratification key of an image: the rarest class present in it (rarest = in the fewest images),
0 for an image without boxes. `StratifiedKFold` spreads each key over the folds as evenly as it can,
so a class in fewer images than K lands in as many different folds as it has images; when no key
has K images, plain seeded `KFold` is used.

A class in one pool image can only be validated by the fold that cannot train on it: `unlearnable_labels`
names such classes, and a fold's metrics leave them out (detection/trainer.py).

A `Split` is saved to JSON with a sha256 of its content; `Split.from_json` checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from detection.data.coco import CocoIndex, DatasetError, ImageRecord
from detection.files import atomic_write_text

logger = logging.getLogger(__name__)

SPLIT_FORMAT_VERSION = 2  # 2: selection + test instead of one holdout


@dataclass(frozen=True)
class Split:
    """Selection ids, test ids and K disjoint validation folds over the pool (global image ids).

    ``excluded`` lists the images left out of every part: ``(image_id, file, reason)``.
    """

    selection: tuple[int, ...]
    test: tuple[int, ...]
    folds: tuple[tuple[int, ...], ...]
    seed: int
    excluded: tuple[tuple[int, str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "selection", tuple(int(i) for i in self.selection))
        object.__setattr__(self, "test", tuple(int(i) for i in self.test))
        object.__setattr__(self, "folds", tuple(tuple(int(i) for i in fold) for fold in self.folds))
        object.__setattr__(self, "excluded", tuple((int(i), str(f), str(r)) for i, f, r in self.excluded))
        seen: set[int] = set()
        parts = [("selection", self.selection), ("test", self.test)]
        parts += [(f"fold {k}", fold) for k, fold in enumerate(self.folds)]
        parts += [("excluded", tuple(i for i, _, _ in self.excluded))]
        for name, ids in parts:
            if name.startswith("fold") and not ids:
                raise ValueError(f"Split {name} is empty; every fold needs at least one image.")
            overlap = seen.intersection(ids)
            if overlap or len(set(ids)) != len(ids):
                raise ValueError(f"Split parts must be disjoint, but {name} repeats ids {sorted(overlap)[:10]}.")
            seen.update(ids)

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    @property
    def pool_ids(self) -> tuple[int, ...]:
        """All fold ids (the union of the folds), sorted."""
        return tuple(sorted(i for fold in self.folds for i in fold))

    @property
    def held_out(self) -> tuple[int, ...]:
        """Selection and test ids together, sorted (never trained on)."""
        return tuple(sorted((*self.selection, *self.test)))

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
        return {"selection": list(self.selection), "test": list(self.test), "folds": [list(f) for f in self.folds],
                "seed": self.seed,
                "excluded": [{"image_id": i, "file": f, "reason": r} for i, f, r in self.excluded]}

    @property
    def hash(self) -> str:
        """sha256 hex digest of the canonical JSON of (selection, test, folds, seed, excluded)."""
        canonical = json.dumps(self._payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def check_index(self, index: CocoIndex) -> None:
        """Raise DatasetError when the split names ids that the dataset does not have."""
        ids = [*self.held_out, *self.pool_ids]
        largest = max(ids, default=-1)
        if largest >= len(index) or min(ids, default=0) < 0:
            raise DatasetError(
                f"The split (hash {self.hash[:12]}) names image id {largest}, but the dataset has ids "
                f"0..{len(index) - 1} (root {index.root}); expected the split made from this dataset."
            )

    def to_json(self, path: str | Path) -> Path:
        """Write ``{"version", "seed", "selection", "test", "folds", "excluded", "hash"}`` atomically."""
        payload = {"version": SPLIT_FORMAT_VERSION, **self._payload(), "hash": self.hash}
        return atomic_write_text(path, json.dumps(payload, indent=1))  # readers never see half a file

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
        keys = ("selection", "test", "folds", "seed", "hash")
        missing = [key for key in keys if not isinstance(data, dict) or key not in data]
        if missing:
            raise DatasetError(f"{path}: missing key(s) {missing}; expected a file written by Split.to_json "
                               f"(format version {SPLIT_FORMAT_VERSION}).")
        try:
            split = cls(selection=data["selection"], test=data["test"], folds=data["folds"], seed=data["seed"],
                        excluded=[(e["image_id"], e["file"], e["reason"]) for e in data.get("excluded", [])])
        except (TypeError, ValueError, KeyError) as error:
            raise DatasetError(f"{path}: invalid split ({error}).") from error
        if split.hash != data["hash"]:
            raise DatasetError(
                f"{path}: the split's sha256 is {split.hash}, but the file records {data['hash']}; "
                "the file was edited or corrupted."
            )
        return split


def unlearnable_labels(index: CocoIndex, *, train_ids: Sequence[int], val_ids: Sequence[int]) -> tuple[int, ...]:
    """Labels that some of ``val_ids`` hold but no (non-crowd) box of ``train_ids``, sorted: a fold's model
    never sees them, so its validation cannot score them (a class in a single image always lands here for
    the fold that validates on that image; DeepForest's Dead and Alive are one tile)."""
    trained = {int(label) for r in index.records(train_ids) for label in r.labels[r.iscrowd == 0]}
    present = {int(label) for r in index.records(val_ids) for label in r.labels}
    return tuple(sorted(present - trained))


def stratification_keys(records: Sequence[ImageRecord]) -> np.ndarray:
    """Per image, the rarest class present (fewest images among ``records``), 0 for no boxes. int64 [N]."""
    presence = [set(np.unique(r.labels).tolist()) for r in records]
    images_per_class = Counter(label for labels in presence for label in labels)
    # Ties broken by the label so that keys do not depend on set order.
    return np.array(
        [min(labels, key=lambda c: (images_per_class[c], c)) if labels else 0 for labels in presence],
        dtype=np.int64,
    )


def make_split(
    index: CocoIndex,
    *,
    num_folds: int,
    selection_fraction: float,
    test_fraction: float,
    seed: int,
    exclude: Mapping[int, str] | None = None,
) -> Split:
    """Seeded, stratified split of a dataset into selection, test and K validation folds.

    Args:
        index: the dataset; records with ``split == "valid"`` (a Roboflow ``valid/`` folder) form the
            selection split and ``split == "test"`` the test split; then the matching fraction is not used.
        num_folds: K >= 2.
        selection_fraction, test_fraction: shares of all (non-excluded) images held out for the part
            without a Roboflow folder, each in ``[0, 1)``; 0 leaves that part empty.
        seed: same seed, same dataset -> same split.
        exclude: image id -> reason: images in no part (recorded in the split).

    Raises:
        ValueError: K < 2, a fraction outside ``[0, 1)``, or fewer pool images than K.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"`num_folds >= 2` must hold, but got ({num_folds=}).")
    for name, fraction in (("selection_fraction", selection_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"`0 <= {name} < 1` must hold, but got ({name}={fraction}).")
    exclude = dict(exclude or {})
    records = [r for r in index.records() if r.image_id not in exclude]
    ids = np.array([r.image_id for r in records], dtype=np.int64)
    keys = stratification_keys(records)
    free = np.ones(len(records), dtype=bool)  # not yet in selection or test
    parts: dict[str, np.ndarray] = {}
    for name, folder, fraction in (("test", "test", test_fraction), ("selection", "valid", selection_fraction)):
        in_folder = np.array([r.split == folder for r in records], dtype=bool)
        if in_folder.any():
            logger.info("The %s split is the %d images of the %s/ folder.", name, int(in_folder.sum()), folder)
            mask = in_folder
        else:
            share = int(round(fraction * len(records)))
            mask = np.zeros(len(records), dtype=bool)
            if share:
                free_at = np.flatnonzero(free)
                picked = _stratified_share(keys[free_at], share / max(1, len(free_at)), seed + len(parts))
                mask[free_at[picked]] = True
        parts[name] = mask
        free &= ~mask
    pool, pool_keys = ids[free], keys[free]
    if len(pool) < num_folds:
        raise ValueError(
            f"`num_pool_images >= num_folds` must hold for K-fold, but got (num_pool_images={len(pool)}, "
            f"{num_folds=}) from {len(ids)} images with {int(parts['selection'].sum())} in the selection split "
            f"and {int(parts['test'].sum())} in the test split."
        )
    if Counter(pool_keys.tolist()).most_common(1)[0][1] >= num_folds:
        splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # "The least populated class has fewer members than n_splits": spread as far as it goes.
            warnings.simplefilter("ignore", UserWarning)
            fold_parts = list(splitter.split(pool, pool_keys))
    else:
        logger.info("No class is in %d pool images or more; using unstratified KFold.", num_folds)
        fold_parts = list(KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(pool))
    folds = tuple(tuple(sorted(pool[val].tolist())) for _, val in fold_parts)
    excluded = tuple((i, str(index.by_id(i).path), reason) for i, reason in sorted(exclude.items()))
    return Split(selection=tuple(sorted(ids[parts["selection"]].tolist())),
                 test=tuple(sorted(ids[parts["test"]].tolist())), folds=folds, seed=seed, excluded=excluded)


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
