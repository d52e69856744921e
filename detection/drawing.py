"""Draw ground truth and predictions on an image and save it as PNG (for reports and debugging)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from detection.metrics import class_name

__all__ = ["GT_COLOR", "PRED_COLOR", "draw_detections"]

GT_COLOR = (0, 255, 0)  # ground truth: green
PRED_COLOR = (255, 0, 255)  # predictions: magenta (visible on green canopy and on the green GT boxes)


def draw_detections(
    image: torch.Tensor | Image.Image | np.ndarray,
    pred: Mapping[str, torch.Tensor] | None,
    target: Mapping[str, torch.Tensor] | None = None,
    *,
    class_names: Sequence[str],
    score_threshold: float = 0.0,
    out_path: str | Path,
) -> Path:
    """Write a PNG with the ground-truth boxes in :data:`GT_COLOR` and the predictions in
    :data:`PRED_COLOR`, each prediction labelled ``"<class name> <score>"``.

    Args:
        image: float tensor [3, H, W] (or [1, H, W]) in [0, 1], uint8 tensor [3, H, W], a PIL image,
            or a uint8 array [H, W, 3] / [H, W].
        pred: ``boxes`` [N, 4] xyxy absolute (in this image's pixels), ``scores`` [N], ``labels`` [N]
            in 1..C; ``None`` draws no predictions.
        target: ``boxes`` [M, 4] xyxy absolute, ``labels`` [M]; ``None`` draws no ground truth.
        class_names: name of label ``i + 1`` at index ``i``.
        score_threshold: predictions with a lower score are not drawn.
        out_path: where to write the PNG (its folder is created).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"Expected `out_path` to end in .png, but got {str(out_path)!r}.")
    canvas = _to_uint8_chw(image)  # [3, H, W] uint8
    width = max(2, round(max(canvas.shape[1:]) / 300))  # lines stay visible on large tiles

    if target is not None and target["boxes"].numel():
        boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
        names = [class_name(int(label), class_names) for label in target["labels"].reshape(-1)]
        canvas = draw_bounding_boxes(canvas, boxes, labels=names, colors=GT_COLOR, width=width)
    if pred is not None and pred["boxes"].numel():
        keep = pred["scores"].detach().cpu().reshape(-1) >= score_threshold
        boxes = pred["boxes"].detach().cpu().float().reshape(-1, 4)[keep]
        scores = pred["scores"].detach().cpu().reshape(-1)[keep].tolist()
        labels = pred["labels"].detach().cpu().reshape(-1)[keep].tolist()
        if len(boxes):
            names = [f"{class_name(label, class_names)} {score:.2f}" for label, score in zip(labels, scores)]
            canvas = draw_bounding_boxes(
                canvas, boxes, labels=names, colors=PRED_COLOR, width=width, label_colors=(255, 255, 255),
                label_background_colors=PRED_COLOR, fill_labels=True,
            )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(out_path, format="PNG")
    return out_path


def _to_uint8_chw(image: torch.Tensor | Image.Image | np.ndarray) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(
                f"Expected a uint8 array of shape [H, W, 3] or [H, W], got {image.dtype} {image.shape}."
            )
        array = image if image.ndim == 3 else image[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).expand(3, -1, -1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"Expected an image tensor of shape [3, H, W] or [1, H, W], got {tuple(image.shape)}.")
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"Expected a float image in [0, 1] or a uint8 image, got dtype {image.dtype}.")
        return image.expand(3, -1, -1).contiguous()
    raise ValueError(f"Expected a tensor, PIL image or numpy array, got {type(image).__name__}.")


