"""COCO / Roboflow loading: targets, renumbering, label mapping, filtering, clipping and bad input."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.data.coco import CocoDetection, DatasetError, collate_detection, load_dataset


def _edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_targets_follow_torchvision_contract(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(64, 48, [(10, 20, 30, 25, 1), (0, 0, 5, 7, 2)])])
    dataset = CocoDetection(load_dataset(path))
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # COCO [x, y, w, h] -> xyxy: [10, 20, 10 + 30, 20 + 25] and [0, 0, 0 + 5, 0 + 7]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 20.0, 40.0, 45.0], [0.0, 0.0, 5.0, 7.0]]))
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 2] and target["labels"].dtype == torch.int64
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0 and int(target["image_id"]) == 0
    torch.testing.assert_close(target["area"], torch.tensor([30.0 * 25.0, 5.0 * 7.0]))  # 750, 35
    assert target["iscrowd"].tolist() == [0, 0] and target["iscrowd"].dtype == torch.int64


def test_image_pixels_are_the_png_scaled_to_unit_range(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(9, 7, [(1, 1, 3, 3, 1)])])
    from PIL import Image

    pixels = np.array(Image.open(tmp_path / "img1.png"))  # [7, 9, 3] uint8
    image, _ = CocoDetection(load_dataset(path))[0]
    torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)


def test_empty_image_filtered_by_default_and_kept_with_empty_target(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(32, 32, [(1, 1, 8, 8, 1)]), (40, 24, [])])
    assert len(load_dataset(path)) == 1
    index = load_dataset(path, filter_empty=False)
    assert len(index) == 2
    image, target = CocoDetection(index)[1]
    assert image.shape == (3, 24, 40)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["area"].shape == (0,) and target["iscrowd"].shape == (0,)


@pytest.mark.parametrize("size", [(1, 1), (37, 23), (23, 37), (161, 5)])
def test_odd_image_sizes(tmp_path, coco_writer, size):
    width, height = size
    path = coco_writer(tmp_path, [(width, height, [(0, 0, width, height, 1)])])
    image, target = CocoDetection(load_dataset(path))[0]
    assert image.shape == (3, height, width)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, float(width), float(height)]]))


def test_boxes_clipped_and_degenerate_dropped_with_count_logged(tmp_path, coco_writer, caplog):
    path = coco_writer(tmp_path, [(50, 40, [
        (-5, 10, 20, 100, 1),  # -> [0, 10, 15, 40]: x2 = -5 + 20, y2 = min(10 + 100, 40)
        (60, 5, 10, 10, 1),  # starts right of the image: clipped to width 0, dropped
        (5, 5, 0, 10, 2),  # zero width, dropped
        (5, 5, 10, -3, 2),  # negative height, dropped
    ])])
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        index = load_dataset(path)
    np.testing.assert_array_equal(index.images[0].boxes, np.array([[0, 10, 15, 40]], dtype=np.float32))
    assert index.images[0].labels.tolist() == [1]
    assert "dropped 3 boxes" in caplog.text


def test_label_mapping_round_trip(tmp_path, coco_writer):
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}]
    path = coco_writer(tmp_path, [(30, 30, [(1, 1, 5, 5, 7), (2, 2, 5, 5, 12)]), (30, 30, [(3, 3, 4, 4, 3)])],
                       categories=categories)
    index = load_dataset(path)
    # sorted COCO ids [3, 7, 12] -> labels 1, 2, 3
    assert index.category_ids == (3, 7, 12)
    assert index.class_names == ("three", "seven", "twelve")
    assert index.images[0].labels.tolist() == [2, 3] and index.images[1].labels.tolist() == [1]
    written = json.loads(path.read_text())["annotations"]
    exported = [index.category_id(int(label)) for record in index.images for label in record.labels]
    assert exported == [a["category_id"] for a in written]
    with pytest.raises(ValueError, match="label <= 3"):
        index.category_id(4)


def _roboflow(root: Path, coco_writer, categories=None) -> Path:
    categories = categories or [
        {"id": 0, "name": "pets", "supercategory": "none"},
        {"id": 1, "name": "cat", "supercategory": "pets"},
        {"id": 2, "name": "dog", "supercategory": "pets"},
    ]
    coco_writer(root / "train", [(32, 32, [(1, 1, 9, 9, 1)]), (32, 32, [(2, 2, 9, 9, 2)])],
                categories=categories, json_name="_annotations.coco.json")
    coco_writer(root / "valid", [(30, 20, [(3, 3, 5, 5, 2)])], categories=categories, json_name="_annotations.coco.json")
    coco_writer(root / "test", [(20, 30, [(4, 4, 5, 5, 1)]), (16, 16, [])], categories=categories,
                json_name="_annotations.coco.json")
    return root


def test_roboflow_export_merges_splits_renumbers_and_drops_unused_supercategory(tmp_path, coco_writer):
    index = load_dataset(_roboflow(tmp_path, coco_writer))
    assert index.class_names == ("cat", "dog") and index.category_ids == (1, 2)  # "pets" (id 0) dropped
    # every split numbers its images from 1 here: the global ids are 0..N-1 in train, valid, test order
    assert [r.image_id for r in index.images] == [0, 1, 2, 3]
    assert [r.split for r in index.images] == ["train", "train", "valid", "test"]
    assert [r.source for r in index.images] == [
        "train/_annotations.coco.json#1", "train/_annotations.coco.json#2",
        "valid/_annotations.coco.json#1", "test/_annotations.coco.json#1",
    ]
    assert index.by_id(2).path == tmp_path / "valid" / "img1.png"
    _, target = CocoDetection(index, image_ids=[2])[0]
    assert int(target["image_id"]) == 2 and target["labels"].tolist() == [2]
    assert index.summary()["images_per_split"] == {"train": 2, "valid": 1, "test": 1}


def test_used_supercategory_is_kept(tmp_path, coco_writer):
    categories = [{"id": 0, "name": "pets", "supercategory": "none"}, {"id": 1, "name": "cat", "supercategory": "pets"}]
    coco_writer(tmp_path / "train", [(32, 32, [(1, 1, 9, 9, 0), (2, 2, 9, 9, 1)])], categories=categories,
                json_name="_annotations.coco.json")
    assert load_dataset(tmp_path).class_names == ("pets", "cat")


def test_transforms_keep_labels_and_iscrowd_aligned(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(40, 40, [(1, 1, 5, 5, 1), (10, 10, 5, 5, 2), (20, 20, 5, 5, 1)])])
    _edit(path, lambda d: d["annotations"][1].update(iscrowd=1))

    def drop_first_box(image, boxes, labels):
        return image, boxes[1:], labels[1:]

    dataset = CocoDetection(load_dataset(path), transforms=drop_first_box)
    _, target = dataset[0]
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [1, 0]
    dataset.transforms = None  # replaceable between epochs
    assert dataset[0][1]["labels"].tolist() == [1, 2, 1]


def test_collate_keeps_lists(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(20, 10, [(1, 1, 3, 3, 1)]), (10, 20, [(1, 1, 3, 3, 2)])])
    dataset = CocoDetection(load_dataset(path))
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert [tuple(i.shape) for i in images] == [(3, 10, 20), (3, 20, 10)]
    assert [t["labels"].tolist() for t in targets] == [[1], [2]]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == 2 and int(targets[1]["image_id"]) == 1


# --- bad input: each a DatasetError naming the file, the id or key, and what was expected ---------------


def _base(tmp_path: Path, coco_writer) -> Path:
    return coco_writer(tmp_path, [(32, 32, [(1, 1, 8, 8, 1)]), (32, 32, [(2, 2, 8, 8, 2)])])


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"broken\.json: malformed JSON at line 2, column 19"):
        load_dataset(path)


@pytest.mark.parametrize("missing", [["annotations"], ["images", "categories"]])
def test_missing_top_level_keys(tmp_path, coco_writer, missing):
    path = _edit(_base(tmp_path, coco_writer), lambda d: [d.pop(k) for k in missing])
    with pytest.raises(DatasetError, match=re.escape(f"annotations.json: missing top-level key(s) {missing}")):
        load_dataset(path)


def test_missing_image_file(tmp_path, coco_writer):
    path = _base(tmp_path, coco_writer)
    (tmp_path / "img2.png").unlink()
    with pytest.raises(DatasetError, match=r"annotations\.json: image id 2: file .*img2\.png does not exist"):
        load_dataset(path)


def test_unreadable_image_fails_when_read_naming_file_and_id(tmp_path, coco_writer):
    path = _base(tmp_path, coco_writer)
    (tmp_path / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png body")
    dataset = CocoDetection(load_dataset(path))
    dataset[0]  # the good image still reads
    with pytest.raises(DatasetError, match=r"annotations\.json#2: cannot decode image file .*img2\.png"):
        dataset[1]


def test_image_size_differs_from_json(tmp_path, coco_writer):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["images"][0].update(width=33))
    with pytest.raises(DatasetError, match=r"#1: image file .*img1\.png is 32x32 .* says 33x32"):
        CocoDetection(load_dataset(path))[0]


def test_unknown_category_id(tmp_path, coco_writer):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["annotations"][1].update(category_id=9))
    with pytest.raises(DatasetError, match=r"annotations\.json: annotation id 2: category_id 9 does not exist; expected one of \[1, 2\]"):
        load_dataset(path)


def test_category_id_not_an_id(tmp_path, coco_writer):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["annotations"][0].update(category_id=[1]))
    with pytest.raises(DatasetError, match=r"annotation id 1: 'category_id' must be an integer id, but got \[1\]"):
        load_dataset(path)


def test_unknown_image_id(tmp_path, coco_writer):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["annotations"][0].update(image_id=41))
    with pytest.raises(DatasetError, match=r"annotations\.json: annotation id 1: image_id 41 does not exist"):
        load_dataset(path)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], "1,2,3,4", [1, 2, "3", 4], [1, 2, None, 4], [1, True, 3, 4]],
                         ids=["three", "five", "string", "str-item", "null", "bool"])
def test_bbox_not_four_numbers(tmp_path, coco_writer, bbox):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["annotations"][1].update(bbox=bbox))
    with pytest.raises(DatasetError, match=r"annotations\.json: annotation id 2: 'bbox' must be 4 finite numbers"):
        load_dataset(path)


def test_annotation_missing_key(tmp_path, coco_writer):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["annotations"][0].pop("bbox"))
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 1\) is missing key\(s\) \['bbox'\]"):
        load_dataset(path)


def test_duplicate_image_id(tmp_path, coco_writer):
    path = _edit(_base(tmp_path, coco_writer), lambda d: d["images"][1].update(id=1))
    with pytest.raises(DatasetError, match="image id 1 appears more than once"):
        load_dataset(path)


def test_empty_dataset_no_images(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [])
    with pytest.raises(DatasetError, match=r"annotations\.json: the dataset has no images"):
        load_dataset(path)


def test_empty_dataset_all_filtered(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(16, 16, []), (16, 16, [(20, 20, 4, 4, 1)])])  # the box lies outside: dropped
    with pytest.raises(DatasetError, match="all 2 images were filtered out"):
        load_dataset(path)
    assert len(load_dataset(path, filter_empty=False)) == 2


def test_folder_without_coco_files(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match=r"expected a Roboflow export folder with train/, valid/ or test/"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.json")


def test_splits_disagree_on_categories(tmp_path, coco_writer):
    coco_writer(tmp_path / "train", [(16, 16, [(1, 1, 4, 4, 1)])], categories=[{"id": 1, "name": "cat"}],
                json_name="_annotations.coco.json")
    coco_writer(tmp_path / "valid", [(16, 16, [(1, 1, 4, 4, 1)])], categories=[{"id": 1, "name": "dog"}],
                json_name="_annotations.coco.json")
    with pytest.raises(DatasetError, match=r"valid/_annotations\.coco\.json: category id 1 is named 'dog', but .*train.* names it 'cat'"):
        load_dataset(tmp_path)


def test_subset_with_unknown_id(tmp_path, coco_writer):
    index = load_dataset(_base(tmp_path, coco_writer))
    with pytest.raises(DatasetError, match=r"Image id 5 is not in the dataset .*expected an id in \[0, 1\]"):
        CocoDetection(index, image_ids=[0, 5])


def test_category_that_is_its_own_supercategory_is_kept(tmp_path, coco_writer):
    # COCO's instances files: {"id": 1, "name": "person", "supercategory": "person"}; an unused one stays a class
    categories = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 2, "name": "bicycle", "supercategory": "vehicle"}]
    path = coco_writer(tmp_path, [(32, 32, [(1, 1, 9, 9, 2)])], categories=categories)
    assert load_dataset(path).class_names == ("person", "bicycle")
