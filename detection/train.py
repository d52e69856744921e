"""`detsweep train`: one fold (or all labelled data) trained in-process, without Ray.

For debugging a config, profiling and GPU benchmarks: `python -m detection.train --config X.yaml --fold 0`
runs on a machine that has torch but no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from detection.config import ExperimentConfig, load_experiment_config
from detection.data.coco import load_dataset
from detection.data.splits import make_split
from detection.trainer import FoldTrainer

_METRIC_COLUMNS = ("loss", "map", "map_50", "f1", "score")


def train_fold(
    config: ExperimentConfig,
    *,
    fold: int = 0,
    all_data: bool = False,
    device: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train fold `fold` of the config's split (or every labelled image with `all_data`).

    Writes `best.pt` (model state_dict of the best validation epoch; the last epoch with `all_data`),
    `last.pt` (the full resume state) and `train.json` (config, classes, per-epoch metrics) to `out_dir`.
    """
    index = load_dataset(config.data.path, filter_empty=False)
    split = make_split(index, num_folds=config.data.num_folds, selection_fraction=config.data.selection_fraction,
                       test_fraction=config.data.test_fraction, seed=config.seed)
    if all_data:
        train_ids, val_ids = tuple(r.image_id for r in index.images), ()
    else:
        if not 0 <= fold < len(split.folds):
            raise ValueError(f"`--fold` must be in [0, {len(split.folds) - 1}] for data.num_folds="
                             f"{config.data.num_folds}, got {fold}.")
        train_ids, val_ids = split.train_ids(fold), split.val_ids(fold)
    out = Path(out_dir) if out_dir else Path("runs") / "train" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    trainer = FoldTrainer(config, index, train_ids=train_ids, val_ids=val_ids, device=device, progress=progress)
    log(f"training {config.model.arch}/{config.model.backbone} on {trainer.device}: "
        f"{len(train_ids)} train / {len(val_ids)} val images, {len(index.class_names)} classes "
        f"{list(index.class_names)}, split {split.hash[:12]}")
    log("epoch " + " ".join(f"{c:>8}" for c in _METRIC_COLUMNS) + "    size  seconds")
    history: list[dict[str, float]] = []
    for _ in range(config.train.epochs):
        row: dict[str, float] = dict(trainer.train_epoch())
        if val_ids:
            row.update(trainer.evaluate())
        history.append(row)
        seconds = row.get("train_time_s", 0.0) + row.get("eval_time_s", 0.0)
        log(f"{trainer.epoch:5d} " + " ".join(f"{row.get(c, float('nan')):8.4f}" for c in _METRIC_COLUMNS)
            + f" {int(row['image_size']):7d} {seconds:8.1f}")
        if all_data or trainer.improved:
            torch.save(trainer.model_state_dict(), out / "best.pt")
        if trainer.should_stop:
            log(f"early stopping: no better score for {config.train.patience} epochs "
                f"(best {trainer.best_score:.4f} at epoch {trainer.best_epoch})")
            break
    torch.save(trainer.state_dict(), out / "last.pt")
    summary = {
        "config": config.to_dict(),
        "fold": None if all_data else fold,
        "all_data": all_data,
        "class_names": list(index.class_names),
        "category_ids": list(index.category_ids),
        "split_hash": split.hash,
        "best_score": trainer.best_score if val_ids else None,
        "best_epoch": trainer.best_epoch if val_ids else None,
        "history": history,
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2, default=float))
    log(f"wrote {out / 'best.pt'}, {out / 'last.pt'}, {out / 'train.json'}")
    return summary


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML: sections data, model, train, seed")
    parser.add_argument("--fold", type=int, default=0, help="which fold of the seeded K-fold split to train")
    parser.add_argument("--all-data", action="store_true", help="train on every labelled image (no validation)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=None, help="output folder (default runs/train/<time>)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")


def run_from_args(args: argparse.Namespace) -> int:
    return run_config(load_experiment_config(args.config), args)


def run_config(config: ExperimentConfig, args: argparse.Namespace) -> int:
    """Train `config` with the command-line options of `add_train_arguments`."""
    if args.epochs is not None:
        config = config.with_overrides(train={"epochs": args.epochs}).validate(args.config)
    train_fold(config, fold=args.fold, all_data=args.all_data, device=args.device, out_dir=args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detection.train", description=__doc__)
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
