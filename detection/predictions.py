"""Saved predictions: one file per fold of its validation (out-of-fold) predictions at its best epoch.

A sweep chooses a trial's score threshold on these (no retraining) and the report draws from them. The
file is `torch.save` of tensors only, so `torch.load(..., weights_only=True)` reads it:

    image_ids [I] int64      global image ids, in order
    counts    [I] int64      boxes per image
    boxes     [N, 4] float32 xyxy absolute, images concatenated in order
    scores    [N] float32
    labels    [N] int64      1..C
    match_scores / match_tp / match_counted [P], num_gt []   `detection.metrics.Matches` of the same boxes
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from detection.metrics import Matches

__all__ = ["SavedPredictions", "load_predictions", "save_predictions"]


class SavedPredictions:
    """Predictions of a set of images and their matches against the ground truth."""

    def __init__(self, image_ids: Sequence[int], preds: Sequence[Mapping[str, torch.Tensor]], matches: Matches) -> None:
        if len(image_ids) != len(preds):
            raise ValueError(f"Expected one prediction per image id, but got {len(preds)} predictions and "
                             f"{len(image_ids)} ids.")
        self.image_ids = [int(i) for i in image_ids]
        self.preds = [{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in preds]
        self.matches = matches

    def to_bytes(self) -> bytes:
        counts = [len(p["scores"]) for p in self.preds]
        payload = {
            "image_ids": torch.tensor(self.image_ids, dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64),
            "boxes": torch.cat([p["boxes"].float().reshape(-1, 4) for p in self.preds]) if self.preds
            else torch.zeros(0, 4),
            "scores": torch.cat([p["scores"].float().reshape(-1) for p in self.preds]) if self.preds else torch.zeros(0),
            "labels": torch.cat([p["labels"].long().reshape(-1) for p in self.preds]) if self.preds
            else torch.zeros(0, dtype=torch.int64),
            "match_scores": torch.from_numpy(self.matches.scores.astype(np.float64)),
            "match_tp": torch.from_numpy(self.matches.is_tp.astype(bool)),
            "match_counted": torch.from_numpy(self.matches.counted.astype(bool)),
            "num_gt": torch.tensor(self.matches.num_gt, dtype=torch.int64),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SavedPredictions:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        counts = payload["counts"].tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        preds = [{"boxes": payload["boxes"][a:b], "scores": payload["scores"][a:b], "labels": payload["labels"][a:b]}
                 for a, b in zip(starts[:-1], starts[1:])]
        matches = Matches(payload["match_scores"].numpy(), payload["match_tp"].numpy(),
                          payload["match_counted"].numpy(), int(payload["num_gt"]))
        return cls(payload["image_ids"].tolist(), preds, matches)


def save_predictions(path: str | Path, predictions: SavedPredictions) -> None:
    Path(path).write_bytes(predictions.to_bytes())


def load_predictions(path: str | Path) -> SavedPredictions:
    return SavedPredictions.from_bytes(Path(path).read_bytes())
