"""albumentations pipelines for detection, with boxes in ``xyxy absolute`` (pascal_voc) pixels.

Each builder returns a `DetectionTransform`: a picklable callable
``(image np.uint8 [H, W, 3], boxes [N, 4] xyxy absolute, labels [N]) -> (image, boxes float32 [M, 4], labels [M])``
with ``M <= N``: boxes pushed out of the image are dropped together with their labels
(albumentations' ``min_visibility``/``min_area``, then a final filter that guarantees what
torchvision's detectors assert, ``x2 > x1`` and ``y2 > y1``; in training boxes thinner than
`MIN_BOX_SIDE` pixels go too, while eval keeps every box that survives the resize).

Resizing is ``LongestMaxSize`` then ``PadIfNeeded`` to a square at the top left, so box
coordinates only scale and never shift. ``build_eval_transforms(None)`` leaves the size alone:
in eval the detectors resize internally (see docs/INTERFACES.md).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

MIN_BOX_SIDE = 1.0  # pixels; thinner boxes after augmentation carry no signal
MIN_BOX_AREA = 4.0  # pixels^2
MIN_VISIBILITY = 0.3  # share of a box's area that must stay in the image after a geometric transform


class DetectionTransform:
    """An albumentations `Compose` behind the ``(image, boxes, labels)`` triple interface.

    With a seed, the pipeline is reproducible. In a DataLoader worker the pipeline is reseeded from
    the seed and the worker's torch seed (which the DataLoader derives from its generator, per
    worker and per epoch), so that workers do not repeat each other's augmentations.
    """

    def __init__(self, compose: A.Compose | None, *, seed: int | None = None, min_side: float = MIN_BOX_SIDE) -> None:
        self.compose = compose
        self.seed = seed
        self.min_side = min_side
        self._worker_seed: int | None = None

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)  # [N, 4] xyxy absolute
        labels = np.asarray(labels)
        if len(boxes) != len(labels):
            raise ValueError(f"Expected one label per box, but got {len(boxes)} boxes and {len(labels)} labels.")
        if self.compose is None:
            return image, boxes, labels
        self._reseed_in_worker()
        height, width = image.shape[:2]
        # albumentations rejects boxes outside the image; the dataset clips them, other callers may not.
        boxes = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out = self.compose(image=image, bboxes=boxes[valid], labels=np.arange(len(boxes))[valid])
        kept = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        new_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        new_image = out["image"]
        h, w = new_image.shape[:2]
        new_boxes[:, 0::2] = new_boxes[:, 0::2].clip(0, w)
        new_boxes[:, 1::2] = new_boxes[:, 1::2].clip(0, h)
        sides = new_boxes[:, 2:] - new_boxes[:, :2]  # [M, 2] (w, h)
        final = (sides > 0).all(axis=1) & (sides >= self.min_side).all(axis=1)
        return new_image, new_boxes[final], labels[kept[final]]

    def _reseed_in_worker(self) -> None:
        if self.seed is None:
            return
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        worker_seed = torch.initial_seed()
        if worker_seed != self._worker_seed:
            self._worker_seed = worker_seed
            self.compose.set_random_seed(int(np.random.SeedSequence([self.seed, worker_seed]).generate_state(1)[0]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, compose={self.compose!r})"


def _bbox_params(*, train: bool) -> A.BboxParams:
    # Eval keeps every box that survives resizing (dropping targets would bias the metrics).
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_visibility=MIN_VISIBILITY if train else 0.0,
        min_area=MIN_BOX_AREA if train else 0.0,
        min_width=MIN_BOX_SIDE if train else 0.0,
        min_height=MIN_BOX_SIDE if train else 0.0,
        clip=True,
    )


def _resize_and_pad(image_size: int) -> list[A.BasicTransform]:
    # Top-left padding: resized boxes need no shift, and predictions map back by one scale factor.
    return [
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(min_height=image_size, min_width=image_size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0),
    ]


def _check_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16):
        raise ValueError(f"`image_size >= 16` must hold for an integer image_size, but got ({image_size=}).")


def build_train_transforms(
    image_size: int | None,
    *,
    seed: int | None = None,
    hflip_p: float = 0.5,
    vflip_p: float = 0.0,
    rot90_p: float = 0.0,
    color_p: float = 0.5,
    affine_p: float = 0.5,
    blur_p: float = 0.1,
) -> DetectionTransform:
    """Training augmentation: flips, 90-degree turns, brightness/contrast, hue/saturation, affine, blur, resize + pad.

    Args:
        image_size: square output side in pixels (``LongestMaxSize`` + top-left ``PadIfNeeded``);
            None keeps each image's size.
        seed: makes the augmentation sequence reproducible (None: fresh randomness).
        hflip_p, vflip_p: flip probabilities (vertical flips suit aerial and microscopy images).
        rot90_p: probability of a turn by 90, 180 or 270 degrees (the same images: they have no "up").
        color_p: probability of brightness/contrast and, separately, of hue/saturation jitter.
        affine_p: probability of a small shift-scale-rotate (``Affine``; the rotated boxes use the
            ellipse method, which does not inflate boxes as much as the corners do).
        blur_p: probability of a light blur.
    """
    _check_size(image_size)
    for name, p in (("hflip_p", hflip_p), ("vflip_p", vflip_p), ("rot90_p", rot90_p), ("color_p", color_p),
                    ("affine_p", affine_p), ("blur_p", blur_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"`0 <= {name} <= 1` must hold, but got ({name}={p}).")
    steps: list[A.BasicTransform] = [
        A.HorizontalFlip(p=hflip_p),
        A.VerticalFlip(p=vflip_p),
        A.RandomRotate90(p=rot90_p),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=color_p),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=0, p=color_p),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 rotate_method="ellipse", border_mode=cv2.BORDER_CONSTANT, fill=0, p=affine_p),
        A.OneOf([A.Blur(blur_limit=(3, 3)), A.GaussianBlur(blur_limit=(3, 5))], p=blur_p),
    ]
    if image_size is not None:
        steps += _resize_and_pad(image_size)
    return DetectionTransform(A.Compose(steps, bbox_params=_bbox_params(train=True), seed=seed), seed=seed)


def build_eval_transforms(image_size: int | None) -> DetectionTransform:
    """Deterministic evaluation transform: resize + top-left pad to ``image_size``, or nothing for None."""
    _check_size(image_size)
    if image_size is None:
        return DetectionTransform(None)
    return DetectionTransform(A.Compose(_resize_and_pad(image_size), bbox_params=_bbox_params(train=False)), min_side=0.0)

