"""Probe a training recipe on the bundled DeepForest tiles without Ray: one fold model, its map_50/F1 on
the Roboflow valid/ (selection) and test/ images after every epoch, and the wall time.

    python bench/recipe_probe.py --arch faster_rcnn --backbone mobilenet_v2 --image-size 320 --epochs 6

Used to choose configs/demo.yaml's recipe by measurement (README "Demo recipe"). F1 is at the threshold
that is F1-optimal on the fold's own validation images (as a sweep chooses it), mAP uses every box.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detection.config import ExperimentConfig
from detection.data.coco import CocoDetection, collate_detection, load_dataset
from detection.data.splits import make_split
from detection.engine import evaluate, predict
from detection.trainer import FoldTrainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/deepforest")
    parser.add_argument("--arch", default="faster_rcnn")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", action="append", default=[], help="extra model.KEY=VALUE (int/float/bool)")
    parser.add_argument("--train", action="append", default=[], help="extra train.KEY=VALUE")
    parser.add_argument("--eval-every", type=int, default=1, help="score selection/test every N epochs")
    parser.add_argument("--test-proposals", type=int, default=None, help="faster_rcnn: RPN proposals kept at test time")
    parser.add_argument("--tta", action="store_true",
                        help="at the last epoch also score hflip test-time augmentation (WBF of both views)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def parse(items):
        out = {}
        for item in items:
            key, value = item.split("=", 1)
            out[key] = json.loads(value) if value not in ("true", "false") else value == "true"
        return out

    index = load_dataset(args.data, filter_empty=False)
    split = make_split(index, num_folds=args.folds, selection_fraction=0.15, test_fraction=0.15, seed=0)
    config = ExperimentConfig().with_overrides(
        data={"path": args.data, "num_folds": args.folds},
        model={"arch": args.arch, "backbone": args.backbone, **parse(args.model)},
        train={"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "image_size": args.image_size,
               "optimizer": args.optimizer, "patience": 0, "score_threshold": None, **parse(args.train)},
    ).validate()
    started = time.perf_counter()
    trainer = FoldTrainer(config, index, train_ids=split.train_ids(0), val_ids=split.val_ids(0), device="cpu")
    build_s = time.perf_counter() - started
    if args.test_proposals:
        trainer.model.rpn._post_nms_top_n["testing"] = args.test_proposals
    sets = {name: DataLoader(CocoDetection(index, ids), batch_size=4, collate_fn=collate_detection)
            for name, ids in (("selection", split.selection), ("test", split.test))}
    rows = []
    print(f"{args.arch}/{args.backbone} {args.image_size}px: {len(split.train_ids(0))} train, "
          f"{len(split.val_ids(0))} val; build {build_s:.1f}s", flush=True)
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        losses = trainer.train_epoch()
        t1 = time.perf_counter()
        val = trainer.evaluate()
        t2 = time.perf_counter()
        row = {"epoch": trainer.epoch, "loss": losses["loss"], "train_s": t1 - t0, "eval_s": t2 - t1,
               "val_map_50": val["map_50"], "val_f1": val["f1"], "thr": val["score_threshold"]}
        for name, loader in sets.items() if trainer.epoch % args.eval_every == 0 else ():
            m = evaluate(trainer.model, loader, device="cpu", score_threshold=val["score_threshold"],
                         class_names=index.class_names)
            row[f"{name}_map_50"], row[f"{name}_f1"] = m["map_50"], m["f1"]
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.tta:
        print(" ".join(f"{k}={v:.3f}" for k, v in _tta_figures(trainer.model, index, split).items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


def _tta_figures(model, index, split) -> dict[str, float]:
    """map_50/F1 on the fold's validation images, selection and test of the model alone and fused with its hflip
    view (WBF, iou 0.55); F1 at the threshold F1-optimal on the validation images."""
    from detection.fusion import fuse_predictions
    from detection.metrics import detection_metrics

    out = {}
    thresholds = {}
    for name, ids in (("val", split.val_ids(0)), ("selection", split.selection), ("test", split.test)):
        records = index.records(ids)
        dataset = CocoDetection(index, ids)
        images = [dataset[i][0] for i in range(len(ids))]
        targets = [{"boxes": torch.as_tensor(r.boxes).reshape(-1, 4), "labels": torch.as_tensor(r.labels),
                    "iscrowd": torch.as_tensor(r.iscrowd)} for r in records]
        plain = predict(model, images, device="cpu")
        mirrored = predict(model, images, device="cpu", hflip=True)
        sizes = [(r.height, r.width) for r in records]
        views = {"plain": plain, "tta": fuse_predictions([plain, mirrored], sizes, weights=None, iou_thr=0.55)}
        for view, preds in views.items():
            m = detection_metrics(preds, targets, score_threshold=thresholds.get(view),
                                  class_names=index.class_names)
            thresholds.setdefault(view, m["score_threshold"])
            out[f"{name}_{view}_map_50"], out[f"{name}_{view}_f1"] = m["map_50"], m["f1"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
