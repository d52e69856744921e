"""RPN anchors of explicit (w, h) shapes per FPN level: k-means shapes or image-size-scaled defaults.

torchvision's `AnchorGenerator` makes every size x every aspect ratio of a level; k-means shapes are
(w, h) pairs, so `ShapeAnchorGenerator` takes the per-level shapes themselves. The RPN head shares its
convolutions across levels, so every level must have the same number A of anchors per location.

Level assignment of k shapes to L levels (`assign_shapes_to_levels`): every level gets all k shapes
(A = k). Splitting the area-sorted shapes into per-level windows (YOLO style, A = ceil(k / L)) puts the
larger shapes on the sparse coarse grids, where a box's centre can sit half a stride away from every
anchor centre. Measured on the 810 boxes of the 45 DeepForest tiles (`write_deepforest_coco`, 400 px, seed 0;
mobilenet_v2 FPN, strides 8..64, k = 9 k-means shapes; share of boxes whose best anchor has IoU >= 0.7,
the RPN's positive threshold; `tests/test_models_anchors.py` checks the 400 px row):

    input size      default (A=6)   windows (A=3)   all shapes (A=9)
    128 px              0.05            0.02             0.18
    400 px              0.58            0.26             0.82
    640 px              0.81            0.55             0.93

Small shapes on coarse levels only add easy negatives. The cost: k / ceil(k / L) times the anchors to
match and decode, and the same factor in the head's two 1x1 convolutions (small next to the shared 3x3).

Anchor shapes are pixels at the detector's input size `image_size`. `set_image_size(size)` scales them by
`size / image_size`, so progressive resizing keeps anchors in proportion to the (resized) boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # h / w, torchvision's convention
DEFAULT_SCALES = (1.0, 2.0**0.5)  # two sizes per octave between consecutive FPN levels


def _as_shapes(shapes: np.ndarray | Tensor | Sequence, *, name: str) -> np.ndarray:
    array = np.asarray(shapes.detach().cpu() if isinstance(shapes, Tensor) else shapes, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"Expected `{name}` to be (w, h) pixel shapes of shape [k, 2] with k >= 1, "
                         f"got shape {list(array.shape)}.")
    if not (np.isfinite(array).all() and (array > 0).all()):
        raise ValueError(f"Expected `{name}` to hold finite positive (w, h) in pixels, got {array.tolist()}.")
    return array


def assign_shapes_to_levels(shapes: np.ndarray | Tensor | Sequence, *, num_levels: int) -> np.ndarray:
    """Assign k (w, h) shapes to `num_levels` FPN levels: all k on every level (see the module docstring).

    Args:
        shapes: [k, 2] (w, h) pixels, any order.
        num_levels: L, finest level first.
    Returns:
        float32 [L, k, 2]: the shapes sorted by area (ascending), the same on every level.
    """
    array = _as_shapes(shapes, name="shapes")
    if num_levels < 1:
        raise ValueError(f"`num_levels >= 1` must hold, but got {num_levels=}.")
    by_area = array[np.argsort(array[:, 0] * array[:, 1], kind="stable")]
    return np.repeat(by_area[None], num_levels, axis=0).astype(np.float32)


class ShapeAnchorGenerator(AnchorGenerator):
    """An `AnchorGenerator` whose level l has the A explicit (w, h) anchor shapes `level_shapes[l]`.

    `level_shapes` float [L, A, 2] (pixels at `image_size`) is a persistent buffer, so a model's state dict
    carries its anchors; `source_shapes` [k, 2] (the k-means shapes it was built from) too when given.
    Anchors are boxes `(cx - w/2, cy - h/2, cx + w/2, cy + h/2)` around every feature-map cell corner
    `(j * stride, i * stride)`, as in torchvision (xyxy absolute, padded-batch coordinates).
    """

    def __init__(
        self,
        level_shapes: np.ndarray | Tensor | Sequence,
        *,
        image_size: int,
        source_shapes: np.ndarray | Tensor | Sequence | None = None,
    ) -> None:
        super().__init__(sizes=((1.0,),), aspect_ratios=((1.0,),))  # replaced below by explicit shapes
        if isinstance(level_shapes, Tensor):
            shapes = level_shapes.detach().to("cpu", torch.float32).clone()
        else:
            shapes = torch.tensor(np.asarray(level_shapes, dtype=np.float32))
        if shapes.ndim != 3 or shapes.shape[-1] != 2 or 0 in shapes.shape:
            raise ValueError(f"Expected `level_shapes` of shape [L, A, 2], got {list(shapes.shape)}.")
        _as_shapes(shapes.reshape(-1, 2), name="level_shapes")
        if image_size <= 0:
            raise ValueError(f"`image_size > 0` must hold, but got {image_size=}.")
        self.register_buffer("level_shapes", shapes)  # [L, A, 2]
        if source_shapes is not None:
            source = torch.as_tensor(_as_shapes(source_shapes, name="source_shapes"), dtype=torch.float32)
            self.register_buffer("source_shapes", source)  # [k, 2]
        self.image_size = image_size
        self.scale = 1.0
        # torchvision's attributes, one entry per anchor (zipped, not a sizes x ratios product)
        self.sizes = tuple(tuple((w * h) ** 0.5 for w, h in level) for level in shapes.tolist())
        self.aspect_ratios = tuple(tuple(h / w for w, h in level) for level in shapes.tolist())
        self.cell_anchors = self._cell_anchors()

    def _cell_anchors(self) -> list[Tensor]:
        half = self.level_shapes * (self.scale / 2)  # [L, A, 2]
        return list(torch.cat([-half, half], dim=-1).unbind(0))  # L x [A, 4] (-w/2, -h/2, w/2, h/2)

    def set_image_size(self, size: int) -> None:
        """Scale the anchors for inputs resized to `size` (they were given at `image_size`)."""
        if size <= 0:
            raise ValueError(f"`size > 0` must hold, but got {size=}.")
        self.scale = size / self.image_size

    def num_anchors_per_location(self) -> list[int]:
        num_levels, per_level, _ = self.level_shapes.shape
        return [per_level] * num_levels

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.level_shapes):
            raise ValueError(f"Expected {len(self.level_shapes)} feature maps (one per anchor level), "
                             f"got {len(feature_maps)}.")
        self.cell_anchors = self._cell_anchors()  # from the buffer: follows load_state_dict and .to()
        return super().forward(image_list, feature_maps)


def build_anchor_generator(
    shapes: np.ndarray | Tensor | Sequence, *, num_levels: int, image_size: int
) -> ShapeAnchorGenerator:
    """Anchors from k (w, h) shapes (e.g. k-means over the training boxes) for an `num_levels`-level FPN.

    Args:
        shapes: [k, 2] (w, h) pixels at the detector's input size `image_size`.
        num_levels: the number of feature maps the RPN sees (FPN levels including "pool").
    Returns:
        A `ShapeAnchorGenerator` with the k shapes as anchors at every location of every level.
    """
    return ShapeAnchorGenerator(
        assign_shapes_to_levels(shapes, num_levels=num_levels), image_size=image_size, source_shapes=shapes
    )


def default_anchor_shapes(*, strides: Sequence[int], image_size: int) -> np.ndarray:
    """Default per-level shapes [L, 6, 2]: sizes (s, s * sqrt(2)) x aspect ratios h/w (0.5, 1, 2).

    s = stride * image_size / 128: anchors grow with the input size (as resized objects do) and keep a
    fixed ratio to the grid spacing (3.1 x stride at 400 px, 6.25 x stride at 800 px where torchvision
    uses 8 x stride for COCO); small enough at 400 px for 8-108 px boxes (12.5 px on stride 4).
    """
    if image_size <= 0:
        raise ValueError(f"`image_size > 0` must hold, but got {image_size=}.")
    levels = []
    for stride in strides:
        base = stride * image_size / 128
        levels.append([
            (size / ratio**0.5, size * ratio**0.5)  # (w, h) with h / w = ratio and w * h = size^2
            for ratio in DEFAULT_ASPECT_RATIOS
            for size in (base * scale for scale in DEFAULT_SCALES)
        ])
    return np.asarray(levels, dtype=np.float32)


def default_anchor_generator(*, strides: Sequence[int], image_size: int) -> ShapeAnchorGenerator:
    """Anchors for the FPN levels with these strides when no k-means shapes are given."""
    return ShapeAnchorGenerator(default_anchor_shapes(strides=strides, image_size=image_size), image_size=image_size)


def anchor_shapes_from_state_dict(
    state_dict: Mapping[str, Tensor], *, prefix: str = "rpn.anchor_generator."
) -> np.ndarray | None:
    """The k-means shapes [k, 2] a saved Faster R-CNN was built with, or None for default anchors.

    Pass them as `build_detector(anchor_shapes=...)` to rebuild a model that loads that state dict.
    """
    shapes = state_dict.get(prefix + "source_shapes")
    return None if shapes is None else shapes.detach().cpu().numpy().astype(np.float64)


__all__ = [
    "ShapeAnchorGenerator",
    "anchor_shapes_from_state_dict",
    "assign_shapes_to_levels",
    "build_anchor_generator",
    "default_anchor_generator",
    "default_anchor_shapes",
]
