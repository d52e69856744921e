"""K-fold splits: disjoint, covering, seeded, stratified by class presence, hashed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from detection.data.coco import CocoIndex, DatasetError, ImageRecord
from detection.data.splits import Split, make_split, stratification_keys, unlearnable_labels


def _index(labels_per_image: list[list[int]], splits: list[str | None] | None = None, num_classes: int = 3) -> CocoIndex:
    """An index of records whose boxes carry the given labels (splits only read labels and split)."""
    splits = splits or [None] * len(labels_per_image)
    records = tuple(
        ImageRecord(
            image_id=i, path=Path(f"img{i}.png"), width=32, height=32,
            boxes=np.tile(np.array([[1, 1, 9, 9]], np.float32), (len(labels), 1)),
            labels=np.array(labels, np.int64), iscrowd=np.zeros(len(labels), np.int64),
            split=split, source=f"synthetic.json#{i}",
        )
        for i, (labels, split) in enumerate(zip(labels_per_image, splits))
    )
    return CocoIndex(records, tuple(f"c{c}" for c in range(1, num_classes + 1)), tuple(range(1, num_classes + 1)))


def _imbalanced(n: int = 100) -> CocoIndex:
    # class 1 everywhere, class 2 in every 10th image (10 images), class 3 in images 5, 55, 95 (3 images),
    # and 4 images without boxes
    labels = [[1] + ([2] if i % 10 == 0 else []) + ([3] if i in (5, 55, 95) else []) for i in range(n)]
    for i in (7, 17, 27, 37):
        labels[i] = []
    return _index(labels)


def _check_partition(split: Split, num_images: int) -> None:
    folds = [set(f) for f in split.folds]
    for a in range(len(folds)):
        for b in range(a + 1, len(folds)):
            assert not folds[a] & folds[b]
    pool = set().union(*folds)
    assert not pool & set(split.selection) and not pool & set(split.test) and not set(split.selection) & set(split.test)
    excluded = {i for i, _, _ in split.excluded}
    assert pool | set(split.selection) | set(split.test) | excluded == set(range(num_images))
    for k in range(split.num_folds):
        assert set(split.train_ids(k)) == pool - folds[k]
        assert set(split.val_ids(k)) == folds[k]


def test_folds_are_disjoint_and_cover_the_pool():
    split = make_split(_imbalanced(), num_folds=5, selection_fraction=0.1, test_fraction=0.1, seed=0)
    _check_partition(split, 100)
    assert len(split.selection) == len(split.test) == 10  # round(0.1 * 100) each
    assert sorted(len(f) for f in split.folds) == [16] * 5  # 80 pool images / 5 folds


def test_stable_under_seed_and_different_under_another():
    index = _imbalanced()
    a = make_split(index, num_folds=4, selection_fraction=0.1, test_fraction=0.1, seed=3)
    b = make_split(index, num_folds=4, selection_fraction=0.1, test_fraction=0.1, seed=3)
    c = make_split(index, num_folds=4, selection_fraction=0.1, test_fraction=0.1, seed=4)
    assert a == b and a.hash == b.hash
    assert a.folds != c.folds and a.hash != c.hash


def test_stratification_spreads_rare_classes_over_folds():
    index = _imbalanced()
    keys = stratification_keys(index.images)
    assert keys[5] == 3 and keys[10] == 2 and keys[1] == 1 and keys[7] == 0  # rarest class present; 0 = no boxes
    split = make_split(index, num_folds=5, selection_fraction=0.0, test_fraction=0.0, seed=0)
    assert split.selection == split.test == ()
    has_2 = {i for i in range(100) if i % 10 == 0}
    # 10 images with class 2 over 5 folds: exactly 2 in each
    assert [len(has_2 & set(f)) for f in split.folds] == [2, 2, 2, 2, 2]
    # 3 images with class 3 (fewer than K = 5): each lands in a different fold
    assert sorted(len({5, 55, 95} & set(f)) for f in split.folds) == [0, 0, 1, 1, 1]


def test_held_out_shares_are_stratified_and_keep_single_image_classes_in_the_pool():
    labels = [[1]] * 40 + [[1, 2]] * 10 + [[1, 3]]  # class 3 is in one image only (id 50)
    split = make_split(_index(labels), num_folds=3, selection_fraction=0.2, test_fraction=0.0, seed=0)
    # round(0.2 * 51) = 10: floor(0.2 * 40) = 8 of key 1, floor(0.2 * 10) = 2 of key 2, 0 of key 3
    assert len(split.selection) == 10 and split.test == ()
    assert len([i for i in split.selection if i >= 40]) == 2
    assert 50 in split.pool_ids
    _check_partition(split, 51)
    both = make_split(_index(labels), num_folds=3, selection_fraction=0.2, test_fraction=0.2, seed=0)
    # test first: round(0.2 * 51) = 10 of 51; then selection: 10 of the 41 left; 31 in the pool
    assert len(both.test) == 10 and len(both.selection) == 10 and len(both.pool_ids) == 31
    _check_partition(both, 51)


def test_roboflow_valid_folder_is_the_selection_split_and_test_folder_the_test_split():
    labels = [[1], [2], [1], [1, 2], [2], [1], [1], [2]]
    splits = ["train", "train", "valid", "train", "test", "test", "train", "valid"]
    split = make_split(_index(labels, splits), num_folds=2, selection_fraction=0.5, test_fraction=0.5, seed=0)
    assert split.test == (4, 5) and split.selection == (2, 7)  # the fractions are not used when the folders exist
    assert split.pool_ids == (0, 1, 3, 6)
    _check_partition(split, 8)
    # test/ alone: the selection split is a seeded share of all images, out of the non-test ones
    only_test = ["train", "train", "train", "train", "test", "test", "train", "train"]
    split = make_split(_index(labels, only_test), num_folds=2, selection_fraction=0.25, test_fraction=0.5, seed=0)
    assert split.test == (4, 5) and len(split.selection) == 2 and not set(split.selection) & {4, 5}
    _check_partition(split, 8)


def test_excluded_images_are_in_no_part_and_recorded(tmp_path):
    split = make_split(_imbalanced(), num_folds=3, selection_fraction=0.1, test_fraction=0.1, seed=0,
                       exclude={3: "truncated: no JPEG end marker", 42: "0 bytes"})
    _check_partition(split, 100)
    assert [(i, r) for i, _, r in split.excluded] == [(3, "truncated: no JPEG end marker"), (42, "0 bytes")]
    assert not {3, 42} & set(split.pool_ids + split.selection + split.test)
    assert Split.from_json(split.to_json(tmp_path / "split.json")) == split
    saved = json.loads((tmp_path / "split.json").read_text())["excluded"]
    assert saved[1] == {"image_id": 42, "file": "img42.png", "reason": "0 bytes"}


def test_falls_back_to_kfold_when_no_class_has_k_images():
    split = make_split(_index([[1], [2], [3], [1], [2], [3]]), num_folds=3, selection_fraction=0.0, test_fraction=0.0, seed=1)
    _check_partition(split, 6)
    assert [len(f) for f in split.folds] == [2, 2, 2]


def test_empty_target_images_are_split_too():
    split = make_split(_index([[], [], [], [1], [1], [1]]), num_folds=3, selection_fraction=0.0, test_fraction=0.0, seed=0)
    _check_partition(split, 6)
    # key 0 (no boxes) and key 1 each have 3 images: one of each per fold
    assert all(len({0, 1, 2} & set(f)) == 1 for f in split.folds)


def test_bad_arguments_name_the_numbers():
    index = _index([[1]] * 5)
    with pytest.raises(ValueError, match=r"`num_folds >= 2` must hold, but got \(num_folds=1\)"):
        make_split(index, num_folds=1, selection_fraction=0.2, test_fraction=0.0, seed=0)
    # round(0.2 * 5) = 1 in the selection split, 4 left for 5 folds
    with pytest.raises(ValueError, match=r"\(num_pool_images=4, num_folds=5\) from 5 images with 1 in the "
                                         r"selection split and 0 in the test split"):
        make_split(index, num_folds=5, selection_fraction=0.2, test_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match=r"`0 <= test_fraction < 1` must hold, but got \(test_fraction=1.0\)"):
        make_split(index, num_folds=2, selection_fraction=0.0, test_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match=r"`0 <= k < num_folds` must hold, but got \(k=2, num_folds=2\)"):
        make_split(index, num_folds=2, selection_fraction=0.0, test_fraction=0.0, seed=0).train_ids(2)
    with pytest.raises(ValueError, match="fold 1 repeats ids"):
        Split(selection=(0,), test=(), folds=((1, 2), (2, 3)), seed=0)


def test_hash_is_sha256_of_canonical_content():
    split = Split(selection=(4,), test=(), folds=((0, 2), (1, 3)), seed=9)
    canonical = '{"excluded":[],"folds":[[0,2],[1,3]],"seed":9,"selection":[4],"test":[]}'
    assert split.hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_json_round_trip_and_hash_verified(tmp_path):
    split = make_split(_imbalanced(), num_folds=3, selection_fraction=0.1, test_fraction=0.1, seed=0)
    path = split.to_json(tmp_path / "exp" / "split.json")
    loaded = Split.from_json(path)
    assert loaded == split and loaded.hash == split.hash == json.loads(path.read_text())["hash"]
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # written beside, then moved onto it

    data = json.loads(path.read_text())
    data["folds"][0][0], data["folds"][1][0] = data["folds"][1][0], data["folds"][0][0]  # an edit
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"split\.json: the split's sha256 is [0-9a-f]{64}, but the file records"):
        Split.from_json(path)
    path.write_text('{"selection": [1], "test": [], "folds": [[0]]}')
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['seed', 'hash'\]"):
        Split.from_json(path)
    path.write_text('{"holdout": [1], "folds": [[0]], "seed": 0, "hash": "x"}')  # format 1
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['selection', 'test'\]"):
        Split.from_json(path)
    path.write_text('{"holdout": [1,')
    with pytest.raises(DatasetError, match="malformed JSON at line 1"):
        Split.from_json(path)


def test_check_index_rejects_a_split_of_another_dataset():
    split = make_split(_imbalanced(), num_folds=3, selection_fraction=0.1, test_fraction=0.1, seed=0)
    split.check_index(_imbalanced())
    with pytest.raises(DatasetError, match=r"names image id 99, but the dataset has ids 0\.\.9"):
        split.check_index(_index([[1]] * 10))


def test_deepforest_split_holds_out_valid_and_test_folders_and_trains_on_rare_classes(deepforest_index):
    split = make_split(deepforest_index, num_folds=3, selection_fraction=0.1, test_fraction=0.1, seed=0)
    _check_partition(split, len(deepforest_index))
    assert set(split.test) == {r.image_id for r in deepforest_index.images if r.split == "test"}
    assert set(split.selection) == {r.image_id for r in deepforest_index.images if r.split == "valid"}
    assert len(split.test) == len(split.selection) == 7 and len(split.pool_ids) == 31
    alive = [r.image_id for r in deepforest_index.images if 3 in r.labels]  # label 3 = Alive
    assert alive and set(alive) <= set(split.pool_ids)


def test_the_fold_that_validates_on_a_single_image_class_cannot_learn_it(deepforest_index):
    # DeepForest's Dead (2) and Alive (3) boxes are all in one tile: whichever fold validates on it has no
    # training image of them; every other fold trains on them and has none to validate.
    rare = [r.image_id for r in deepforest_index.images if {2, 3} & set(r.labels.tolist())]
    assert len(rare) == 1
    for num_folds in (2, 3):
        split = make_split(deepforest_index, num_folds=num_folds, selection_fraction=0.1, test_fraction=0.1, seed=0)
        unscored = [unlearnable_labels(deepforest_index, train_ids=split.train_ids(k), val_ids=split.val_ids(k))
                    for k in range(num_folds)]
        holder = next(k for k in range(num_folds) if rare[0] in split.val_ids(k))
        assert unscored[holder] == (2, 3)
        assert all(u == () for k, u in enumerate(unscored) if k != holder)
    # Training on the tile itself: nothing is left unscored.
    assert unlearnable_labels(deepforest_index, train_ids=rare, val_ids=rare) == ()
