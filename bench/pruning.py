"""Fold-epochs saved by pruning: the same tiny sweep without a scheduler and with ASHA (`search.scheduler: asha`,
Ray Tune's AsyncHyperBandScheduler on the trials' running CV score), on the real DeepForest tiles.

Each trial reports after every epoch the fold mean of each fold's best score so far (`cv_score`, all K folds
train in parallel), so ASHA stops a trial at a rung (epochs grace, grace x rf, ...) once its partial CV score is
below the rung's top 1 / rf. Both sweeps sample the same trials: every trial is an Optuna start-up trial
(`n_startup_trials = num_samples`: random, seeded, independent of the results), so the only difference is what
the scheduler stops. Printed: fold-epochs trained (sum over trials of epochs x K), the share ASHA saves, the
sweep wall times, and the best trial of each sweep (its params and CV score), which should be the same trial.

    python bench/pruning.py --trials 6 --epochs 6 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/deepforest"))
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pruning.json"))
    return parser.parse_args(argv)


def sweep_config(args: argparse.Namespace, data: Path, storage: Path, scheduler: str):
    from search.config import sweep_config_from_dict

    return sweep_config_from_dict({
        "name": f"pruning-{scheduler}", "storage": str(storage), "seed": 0,
        "data": {"path": str(data), "num_folds": args.folds, "class_balanced_sampling": False},
        "model": {"arch": "faster_rcnn", "backbone": "mobilenet_v2", "start": "backbone",
                  "roi_batch_size_per_image": 64, "rpn_post_nms_top_n_train": 300, "rpn_post_nms_top_n_test": 300},
        "train": {"epochs": args.epochs, "image_size": args.image_size, "warmup_epochs": 0.5, "patience": 0,
                  "eval_batch_size": 4},
        "search": {"num_samples": args.trials, "max_concurrent_trials": 1, "n_startup_trials": args.trials,
                   "scheduler": scheduler,
                   "asha": {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor},
                   # wide enough that some trials barely learn and some diverge
                   "space": {"lr": {"low": 1e-4, "high": 0.05}, "batch_size": [4]}},
        "resources": {"cpus_per_fold": 1, "gpus_per_fold": 0, "coordinator_cpus": 0},
        "failure": {"max_failures": 0},
    }, where="<bench/pruning.py>")


def run_sweep(config, experiment_dir: Path) -> tuple[list[dict[str, Any]], float]:
    """The sweep through the project's driver; per trial its params, epochs and CV score, and the wall time."""
    import ray

    from search.tuner import build_tuner, init_ray, prepare_experiment

    prepare_experiment(config, experiment_dir=experiment_dir)
    init_ray(config, dashboard=False)
    try:
        started = time.perf_counter()
        results = build_tuner(config, experiment_dir=experiment_dir).fit()
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    trials = []
    for result in results:
        rows = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        trials.append({"lr": float(result.config["lr"]), "epochs": len(rows),
                       "cv_score": max((float(r["cv_score"]) for r in rows), default=None),
                       "error": None if result.error is None else type(result.error).__name__})
    return sorted(trials, key=lambda t: t["lr"]), wall


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data
    if not data.exists():
        from detection.data.deepforest import write_deepforest_coco

        data = write_deepforest_coco(Path(tempfile.mkdtemp(prefix="pruning-data-")), tile_size=400, seed=0)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        for scheduler in ("none", "asha"):
            config = sweep_config(args, data.resolve(), Path(tmp), scheduler)
            trials, wall = run_sweep(config, Path(tmp) / scheduler)
            scored = [t for t in trials if t["cv_score"] is not None]
            best = max(scored, key=lambda t: t["cv_score"]) if scored else None
            runs[scheduler] = {"trials": trials, "wall_s": wall, "best": best,
                               "fold_epochs": sum(t["epochs"] for t in trials) * args.folds}
    none, asha = runs["none"], runs["asha"]
    saved = 1.0 - asha["fold_epochs"] / none["fold_epochs"]
    same_best = none["best"] is not None and asha["best"] is not None and none["best"]["lr"] == asha["best"]["lr"]
    print(f"{args.trials} trials x {args.folds} folds x up to {args.epochs} epochs at {args.image_size} px")
    for name, run in runs.items():
        print(f"  {name:5s}: {run['fold_epochs']:3d} fold-epochs, {run['wall_s']:.0f} s; epochs per trial "
              f"{[t['epochs'] for t in run['trials']]}; best lr {run['best']['lr']:.2e} cv_score "
              f"{run['best']['cv_score']:.4f}")
    print(f"ASHA saves {saved:.0%} of the fold-epochs (wall time ratio asha/none {asha['wall_s'] / none['wall_s']:.2f});"
          f" best trial {'unchanged' if same_best else 'CHANGED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                    "fold_epochs_saved": saved, "best_unchanged": same_best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
