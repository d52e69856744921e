"""Sweep overhead and fold-parallel efficiency, on the real DeepForest tiles with the real trainable.

One sweep of `--trials` trials, one at a time (K folds, `--epochs` epochs, lr/batch/threshold pinned to one
point), runs through the project's own driver (`search.tuner`: Tuner + OptunaSearch, embedded local Ray, the
`trainables.trial` trainable with its K fold actors, checkpoints). The first trial starts cold (coordinator and
fold processes); with `search.reuse_actors` (the default; `--no-reuse` turns it off) every later trial reuses
them (trainables/fold_pool.py), so (a) is reported for the first trial, for the later ones and for the sweep.
Then the same K folds train one after another in this process with
`detection.trainer.FoldTrainer` (no Ray), each with the threads one fold actor gets (`--cpus-per-fold`).

(a) overhead share = 1 - compute / trial wall time, where
    compute   = sum over epochs of max over folds of (fold train + eval seconds), as the fold workers report
                them (`fold<k>/train_time_s`, `fold<k>/eval_time_s`): the time a perfect driver would need;
    trial wall = the trial's `time_total_s` at its last report (Tune: from the trainable's start, so fold
                actor start-up, dataset loading, model building, lockstep waits, checkpoints all count).
    Per trial also: its start-up (coordinator set-up and building the folds, `startup_*_s`, and how many folds
    were reused). Also reported: the steady-state share (epochs only: 1 - compute / sum of epoch + checkpoint seconds) and
    the share of the whole `Tuner.fit()` wall time. Target: under 5% when an epoch takes 30 s or more
    (raise `--image-size` or the dataset size until it does).
(b) fold-parallel efficiency = T_sequential / (K * T_parallel), T_parallel = the trial wall time above,
    T_sequential = the K folds one after another (build + train + evaluate, same epochs and settings).
    1.0 is perfect; target >= 0.8 with K=2 folds on 2 CPU workers (`--folds 2 --cpus-per-fold 1`).

Writes JSON to `--out` and prints both ratios.

    python bench/sweep_overhead.py --folds 2 --epochs 2 --image-size 320 --cpus-per-fold 1
    python bench/sweep_overhead.py --folds 2 --epochs 3 --trials 3 --skip-sequential [--no-reuse]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder

OVERHEAD_TARGET = 0.05  # share of trial wall time, for epochs of >= 30 s
EFFICIENCY_TARGET = 0.8  # K=2 folds on 2 CPU workers


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/deepforest"),
                        help="COCO/Roboflow dataset; the DeepForest tiles are written to a temporary folder "
                             "when it does not exist")
    parser.add_argument("--folds", type=int, default=2, help="K")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=1, help="trials in the sweep, run one after another")
    parser.add_argument("--no-reuse", action="store_true",
                        help="search.reuse_actors: false (every trial starts its coordinator and folds anew)")
    parser.add_argument("--image-size", type=int, default=320, help="input size (longest side), pixels")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--arch", default="faster_rcnn")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--pretrained", action="store_true",
                        help="ImageNet backbone weights (from torchvision's cache); default: random init")
    parser.add_argument("--cpus-per-fold", type=float, default=1.0)
    parser.add_argument("--gpus-per-fold", type=float, default=0.0)
    parser.add_argument("--skip-sequential", action="store_true", help="measure (a) only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sweep_overhead.json"))
    return parser.parse_args(argv)


def sweep_config(args: argparse.Namespace, data_path: Path, storage: Path):
    """A one-trial sweep with the search space pinned to one point (lr, batch size, threshold)."""
    from search.config import sweep_config_from_dict

    detector = {"arch": args.arch, "backbone": args.backbone}
    return sweep_config_from_dict({
        "name": "overhead", "storage": str(storage), "seed": 0,
        "data": {"path": str(data_path), "num_folds": args.folds, "class_balanced_sampling": False},
        "model": {**detector, "pretrained": args.pretrained},
        "train": {"epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size,
                  "lr": args.lr, "warmup_epochs": 0.5, "patience": 0, "augment": True},
        "search": {"num_samples": args.trials, "max_concurrent_trials": 1, "reuse_actors": not args.no_reuse,
                   "space": {"lr": {"low": args.lr, "high": args.lr}, "batch_size": [args.batch_size],
                             "score_threshold": {"low": 0.3, "high": 0.3}, "detectors": [detector]}},
        "resources": {"cpus_per_fold": args.cpus_per_fold, "gpus_per_fold": args.gpus_per_fold,
                      "coordinator_cpus": 0},
        "failure": {"max_failures": 0},
    }, where="<bench/sweep_overhead.py>")


def run_parallel(config, experiment_dir: Path) -> tuple[dict[str, Any], list[list[dict[str, Any]]], float]:
    """The sweep through the project's driver; returns the (pinned) trial params, each trial's per-epoch
    reports in the order the trials started, and the `Tuner.fit()` wall time."""
    import ray

    from search.tuner import build_tuner, init_ray, prepare_experiment

    prepare_experiment(config, experiment_dir=experiment_dir)
    init_ray(config, dashboard=False)
    try:
        tuner = build_tuner(config, experiment_dir=experiment_dir)
        started = time.perf_counter()
        results = tuner.fit()
        fit_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    if results.errors:
        raise RuntimeError(f"the benchmark trial failed: {results.errors[0]}")
    trials = sorted(results, key=lambda r: float(r.metrics_dataframe["timestamp"].min()))
    return dict(trials[0].config), [r.metrics_dataframe.to_dict("records") for r in trials], fit_s


def overhead(reports: list[dict[str, Any]], num_folds: int) -> dict[str, Any]:
    """(a) from the trial's per-epoch reports (see the module docstring)."""
    epochs = []
    for r in reports:
        per_fold = [r[f"fold{k}/train_time_s"] + r[f"fold{k}/eval_time_s"] for k in range(num_folds)]
        epochs.append({
            "epoch": int(r["training_iteration"]),
            "fold_compute_s": per_fold,
            "compute_s": max(per_fold),
            "epoch_s": float(r["epoch_time_s"]),  # the coordinator's wall time for train + eval of all folds
            "checkpoint_write_s": float(r.get("checkpoint_write_s", 0.0)),
            "time_this_iter_s": float(r["time_this_iter_s"]),  # Tune: report to report (incl. persisting)
        })
    compute = sum(e["compute_s"] for e in epochs)
    trial_wall = float(reports[-1]["time_total_s"])
    steady = sum(e["time_this_iter_s"] for e in epochs[1:]) if len(epochs) > 1 else None
    steady_compute = sum(e["compute_s"] for e in epochs[1:]) if len(epochs) > 1 else None
    return {
        "epochs": epochs,
        "compute_s": compute,
        "trial_wall_s": trial_wall,
        # Tune times a function trainable's first report from the trainable's start: placement, trial set-up.
        "startup_s": epochs[0]["time_this_iter_s"] - epochs[0]["epoch_s"] - epochs[0]["checkpoint_write_s"],
        # The fold actors build themselves (process, imports, dataset, model) while their first epoch waits.
        "first_epoch_wait_s": epochs[0]["epoch_s"] - epochs[0]["compute_s"],
        "overhead_share": 1.0 - compute / trial_wall,
        # Epochs after the first (report to report): lockstep waits, result gathering, checkpoints.
        "steady_overhead_share": None if not steady else 1.0 - steady_compute / steady,
        "mean_epoch_s": sum(e["epoch_s"] for e in epochs) / len(epochs),
        "startup_coordinator_s": float(reports[0].get("startup_coordinator_s", math.nan)),
        "startup_folds_s": float(reports[0].get("startup_folds_s", math.nan)),
        "folds_reused": int(reports[0].get("folds_reused", 0)),
    }


def sweep_overhead(trials: list[dict[str, Any]], fit_s: float) -> dict[str, Any]:
    """(a) for the first trial (cold start), the later trials (reused workers, when on) and the whole sweep."""
    later = trials[1:]
    compute = sum(t["compute_s"] for t in trials)
    return {
        "first_trial_overhead_share": trials[0]["overhead_share"],
        "later_trials_overhead_share": None if not later else
        1.0 - sum(t["compute_s"] for t in later) / sum(t["trial_wall_s"] for t in later),
        "later_trials_startup_s": None if not later else
        sum(t["startup_s"] + t["first_epoch_wait_s"] for t in later) / len(later),
        "trials_overhead_share": 1.0 - compute / sum(t["trial_wall_s"] for t in trials),
        "fit_wall_s": fit_s,
        # everything between Tuner.fit's start and end that is not fold compute (Tune between trials, too)
        "fit_overhead_share": 1.0 - compute / fit_s,
    }


def run_sequential(config, experiment_dir: Path, params: dict[str, Any], *, threads: int) -> dict[str, Any]:
    """(b)'s baseline: the same K folds one after another in this process, `threads` torch threads."""
    import torch

    from detection.data.coco import load_dataset
    from detection.data.splits import Split
    from detection.trainer import FoldTrainer
    from search.tuner import SPLIT_JSON
    from trainables.trial import apply_trial_params

    torch.set_num_threads(threads)
    trial_config = apply_trial_params(config.base, params)
    started = time.perf_counter()
    index = load_dataset(trial_config.data.path, filter_empty=False)
    split = Split.from_json(experiment_dir / SPLIT_JSON)
    folds = []
    for k in range(split.num_folds):
        fold_started = time.perf_counter()
        trainer = FoldTrainer(trial_config, index, train_ids=split.train_ids(k), val_ids=split.val_ids(k),
                              device="cuda" if config.resources.gpus_per_fold > 0 else "cpu")
        compute = []
        for _ in range(trial_config.train.epochs):
            train = trainer.train_epoch()
            evaluation = trainer.evaluate()
            compute.append(train["train_time_s"] + evaluation["eval_time_s"])
        folds.append({"fold": k, "wall_s": time.perf_counter() - fold_started, "epoch_compute_s": compute})
        del trainer
    return {"wall_s": time.perf_counter() - started, "threads": threads, "folds": folds}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        data = args.data
        if not data.exists():
            from detection.data.deepforest import write_deepforest_coco

            data = write_deepforest_coco(Path(tmp) / "deepforest", tile_size=400, seed=0)
        config = sweep_config(args, data.resolve(), Path(tmp) / "experiments")
        experiment_dir = Path(tmp) / "experiments" / "overhead"

        params, reports, fit_s = run_parallel(config, experiment_dir)
        trials = [overhead(r, args.folds) for r in reports]
        sweep = sweep_overhead(trials, fit_s)
        a = trials[0]
        b = None
        if not args.skip_sequential:
            sequential = run_sequential(config, experiment_dir, params, threads=max(1, math.floor(args.cpus_per_fold)))
            b = {
                "sequential": sequential,
                "parallel_wall_s": a["trial_wall_s"],
                "efficiency": sequential["wall_s"] / (args.folds * a["trial_wall_s"]),
                # Compute only: did K folds side by side slow each other down (memory bandwidth, caches)?
                "compute_efficiency": sum(sum(f["epoch_compute_s"]) for f in sequential["folds"])
                / (args.folds * a["compute_s"]),
            }

    report = {
        "benchmark": "sweep_overhead",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews every ratio: the load averages when the benchmark ended.
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "params": params,
        "overhead": {"trials": trials, "sweep": sweep},
        "fold_parallel": b,
        "targets": {"overhead_share_max": OVERHEAD_TARGET, "overhead_applies_when_epoch_s_at_least": 30.0,
                    "efficiency_min": EFFICIENCY_TARGET},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    applies = "" if a["mean_epoch_s"] >= 30 else " (epochs under 30 s: the 5% target does not apply)"
    print(f"\n{args.arch}/{args.backbone}, {args.folds} folds x {args.epochs} epochs at {args.image_size}px, "
          f"{args.cpus_per_fold:g} CPU + {args.gpus_per_fold:g} GPU per fold; mean epoch {a['mean_epoch_s']:.1f} s")
    for i, t in enumerate(trials, start=1):
        print(f"(a) trial {i} ({t['folds_reused']} of {args.folds} folds reused): overhead share "
              f"{t['overhead_share']:.3f} (compute {t['compute_s']:.1f} s of {t['trial_wall_s']:.1f} s; start-up "
              f"{t['startup_s']:.1f} s [coordinator {t['startup_coordinator_s']:.1f} s, folds built "
              f"{t['startup_folds_s']:.1f} s] + first-epoch wait {t['first_epoch_wait_s']:.1f} s; steady-state "
              f"{_fmt(t['steady_overhead_share'])})")
    print(f"(a) overhead share: first trial {sweep['first_trial_overhead_share']:.3f}, later trials "
          f"{_fmt(sweep['later_trials_overhead_share'])}, all trials {sweep['trials_overhead_share']:.3f}, of "
          f"Tuner.fit {sweep['fit_overhead_share']:.3f}; target < {OVERHEAD_TARGET}{applies}")
    if b is not None:
        print(f"(b) fold-parallel efficiency: {b['efficiency']:.3f} (sequential {b['sequential']['wall_s']:.1f} s / "
              f"({args.folds} x parallel {b['parallel_wall_s']:.1f} s); compute-only {b['compute_efficiency']:.3f}) "
              f"target >= {EFFICIENCY_TARGET}")
    print(f"load average {report['machine']['load_average'][0]:.1f} on {os.cpu_count()} CPUs; wrote {args.out}")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
