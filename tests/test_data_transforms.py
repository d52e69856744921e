"""albumentations pipelines: boxes stay valid, resizing is exact, seeds reproduce, workers differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.data.coco import CocoDetection, collate_detection, load_dataset
from detection.data.transforms import MIN_BOX_SIDE, build_eval_transforms, build_train_transforms


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# Boxes near every edge and corner, tiny and large, so flips/affine push some out of the image.
BOXES = np.array([
    [0, 0, 6, 5], [90, 0, 120, 12], [0, 70, 10, 80], [110, 72, 120, 80],
    [40, 30, 80, 60], [59, 39, 61, 41], [1, 1, 119, 79],
], dtype=np.float32)  # xyxy absolute in a 120x80 (WxH) image
LABELS = np.array([1, 2, 3, 1, 2, 3, 1], dtype=np.int64)


@pytest.mark.parametrize("image_size", [None, 64, 160])
def test_train_transforms_keep_boxes_valid(image_size):
    transform = build_train_transforms(image_size, seed=0, vflip_p=0.5, affine_p=1.0, blur_p=0.5)
    image = _image(80, 120)
    seen_counts = set()
    for _ in range(40):
        out_image, boxes, labels = transform(image, BOXES, LABELS)
        height, width = out_image.shape[:2]
        assert out_image.dtype == np.uint8 and out_image.shape[2] == 3
        if image_size is not None:
            assert (height, width) == (image_size, image_size)
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
        assert np.all(boxes >= 0) and np.all(boxes[:, 0::2] <= width) and np.all(boxes[:, 1::2] <= height)
        assert np.all(boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) and np.all(boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
        assert set(labels.tolist()) <= {1, 2, 3}
        seen_counts.add(len(labels))
    assert max(seen_counts) >= 6  # the boxes mostly survive ...
    assert min(seen_counts) < len(BOXES)  # ... and some are dropped when pushed out


def test_labels_follow_their_boxes_through_flips():
    transform = build_train_transforms(None, seed=3, hflip_p=1.0, color_p=0.0, affine_p=0.0, blur_p=0.0)
    _, boxes, labels = transform(_image(80, 120), BOXES[:2], np.array([5, 9]))
    # horizontal flip in a 120 px wide image: x' = 120 - x, so [0, 0, 6, 5] -> [114, 0, 120, 5]
    np.testing.assert_allclose(boxes, [[114, 0, 120, 5], [0, 0, 30, 12]])
    assert labels.tolist() == [5, 9]


def test_quarter_turns_move_boxes_with_the_pixels():
    # A white box on black: whichever of the 90/180/270-degree turns is drawn, the turned box must still frame it.
    image = np.zeros((80, 120, 3), np.uint8)
    image[20:50, 10:40] = 255
    box = np.array([[10, 20, 40, 50]], np.float32)
    transform = build_train_transforms(None, seed=0, hflip_p=0.0, rot90_p=1.0, color_p=0.0, affine_p=0.0, blur_p=0.0)
    shapes = set()
    for _ in range(12):
        out, boxes, labels = transform(image, box, np.array([4]))
        shapes.add(out.shape[:2])
        rows, cols = np.nonzero(out[..., 0])
        np.testing.assert_allclose(boxes, [[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]])
        assert labels.tolist() == [4]
    assert shapes == {(80, 120), (120, 80)}  # both odd and even quarter turns were drawn


def test_empty_boxes_pass_through():
    for transform in (build_train_transforms(64, seed=0), build_eval_transforms(64), build_eval_transforms(None)):
        _, boxes, labels = transform(_image(50, 70), np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
        assert boxes.shape == (0, 4) and labels.shape == (0,)


def test_eval_resize_pads_top_left_so_boxes_only_scale():
    image = _image(100, 200)
    out, boxes, labels = build_eval_transforms(64)(image, np.array([[50, 20, 150, 80]], np.float32), np.array([2]))
    # scale = 64 / max(100, 200) = 0.32: [50, 20, 150, 80] * 0.32 = [16, 6.4, 48, 25.6]
    np.testing.assert_allclose(boxes, [[16.0, 6.4, 48.0, 25.6]], rtol=1e-5)
    assert out.shape == (64, 64, 3) and labels.tolist() == [2]
    # 100 rows * 0.32 = 32 real rows at the top; the rest is zero padding
    assert out[32:].max() == 0 and out[:32].max() > 0


def test_eval_without_size_is_identity():
    image = _image(33, 47)
    out, boxes, labels = build_eval_transforms(None)(image, BOXES[:1], LABELS[:1])
    assert out is image
    np.testing.assert_array_equal(boxes, BOXES[:1])
    assert labels.tolist() == [1]


def test_seed_reproduces_and_another_seed_differs():
    image = _image(80, 120)
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        transform = build_train_transforms(96, seed=seed, affine_p=1.0)
        runs[name] = [transform(image, BOXES, LABELS) for _ in range(5)]
    for (ia, ba, la), (ib, bb, lb) in zip(runs["a"], runs["b"]):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ba, bb)
        np.testing.assert_array_equal(la, lb)
    assert any(not np.array_equal(a[0], c[0]) for a, c in zip(runs["a"], runs["c"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`image_size >= 16` must hold .* got \(image_size=8\)"):
        build_eval_transforms(8)
    with pytest.raises(ValueError, match=r"`0 <= hflip_p <= 1` must hold, but got \(hflip_p=1.5\)"):
        build_train_transforms(64, hflip_p=1.5)
    with pytest.raises(ValueError, match="one label per box, but got 2 boxes and 1 labels"):
        build_eval_transforms(None)(_image(10, 10), BOXES[:2], LABELS[:1])


def test_dataloader_workers_do_not_repeat_each_other(tmp_path, coco_writer):
    # Four copies of one image: without per-worker reseeding both workers would augment identically.
    path = coco_writer(tmp_path, [(48, 40, [(5, 5, 20, 12, 1), (30, 20, 10, 15, 2)])])
    index = load_dataset(path)
    dataset = CocoDetection(index, image_ids=[0, 0, 0, 0], transforms=build_train_transforms(64, seed=0))

    def batches():
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_detection,
                                             generator=torch.Generator().manual_seed(0))
        return [images[0] for images, _ in loader]

    first = batches()
    # DataLoader order: worker 0 gives items 0 and 2, worker 1 items 1 and 3
    assert not torch.equal(first[0], first[1])
    second = batches()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # seeded loader -> same augmentation


def test_dataset_with_train_transforms_yields_valid_targets(deepforest_index):
    dataset = CocoDetection(deepforest_index, image_ids=range(6), transforms=build_train_transforms(128, seed=1))
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.shape == (3, 128, 128)
        boxes = target["boxes"]
        assert boxes.shape[0] == target["labels"].shape[0] == target["iscrowd"].shape[0] == target["area"].shape[0]
        assert torch.all(boxes[:, 2:] > boxes[:, :2]) and torch.all(boxes >= 0) and torch.all(boxes <= 128)
        torch.testing.assert_close(target["area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def test_transforms_pickle_with_their_random_state():
    import pickle

    transform = build_train_transforms(64, seed=5, affine_p=1.0)
    copy = pickle.loads(pickle.dumps(transform))  # DataLoader workers and Ray ship transforms pickled
    image = _image(50, 60)
    for _ in range(3):
        a, b = transform(image, BOXES[4:5], LABELS[4:5]), copy(image, BOXES[4:5], LABELS[4:5])
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
