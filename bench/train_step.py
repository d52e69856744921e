"""Training-step benchmark: images/s per backbone, and the engine's overhead over a plain loop.

For each backbone, on the real DeepForest tiles (``detection.data``) resized to ``--size``:

- ``train img/s``: ``detection.engine.train_one_epoch`` (grad clipping, per-iteration scheduler,
  non-finite check) over a DataLoader of ``--iters`` batches of ``--batch`` images;
- ``eval img/s``: ``detection.engine.predict`` (inference only) and ``evaluate`` (with metrics);
- ``ratio``: engine time per iteration / the plain torchvision loop's
  (``loss = sum(model(images, targets).values()); opt.zero_grad(); loss.backward(); opt.step()``)
  on the same model, optimizer and batches, in this process, after warmup, with the two loops
  alternating (ABBA) over ``--rounds`` rounds and the median run of each compared. Target: <= 1.05.
  ``cpu-time ratio`` is the same with this process's CPU time, steadier on a shared CPU machine.

The tiles are decoded once and kept in memory, so decoding does not dilute the ratio.
Writes JSON to ``--out`` and prints a table. Does not import Ray.

    python bench/train_step.py --backbones mobilenet_v2,resnet18 --size 320 --batch 2 --iters 10 \
        --device auto --out bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder

from detection.data import CocoDetection, build_eval_transforms, collate_detection, load_dataset  # noqa: E402
from detection.data.deepforest import write_deepforest_coco  # noqa: E402
from detection.engine import (  # noqa: E402
    build_optimizer,
    build_warmup_cosine_scheduler,
    evaluate,
    predict,
    train_one_epoch,
)
from detection.models.factory import build_detector  # noqa: E402

OVERHEAD_TARGET = 1.05


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18", help="comma-separated BACKBONES keys")
    parser.add_argument("--arch", default="faster_rcnn", help="detection.models.factory.ARCHS entry")
    parser.add_argument("--size", type=int, default=320, help="input size (longest side), pixels")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--iters", type=int, default=10, help="batches per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each loop (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches of each loop first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler in both loops (CUDA)")
    parser.add_argument("--data", type=Path, default=None,
                        help="DeepForest COCO folder: read if present, else written there (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    args = parser.parse_args(argv)
    for name in ("size", "batch", "iters", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine.")
    return device


def load_tiles(data_dir: Path, *, size: int, count: int) -> tuple[list, tuple[str, ...]]:
    """``count`` (image [3, H, W], target) pairs from the DeepForest train tiles, decoded once."""
    if not (data_dir / "train" / "_annotations.coco.json").is_file():
        write_deepforest_coco(data_dir)
    index = load_dataset(data_dir)
    ids = [record.image_id for record in index.images if record.split == "train"]
    dataset = CocoDetection(index, ids, transforms=build_eval_transforms(size))
    tiles = [dataset[i % len(ids)] for i in range(count)]  # cycles when more are needed than exist
    return tiles, index.class_names


def reference_loop(model, optimizer, loader, *, device, scaler=None) -> None:
    """The plain torchvision training loop that the engine is compared to."""
    model.train()
    for images, targets in loader:
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``.

    On a shared CPU machine wall time swings with the other processes' load; CPU time of this
    process barely does, so the CPU-time ratio is the steadier overhead estimate there.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_backbone(backbone: str, tiles: list, class_names: Sequence[str], args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_detector(arch=args.arch, backbone=backbone, num_classes=len(class_names),
                           image_size=args.size, start="none").to(device)
    # One optimizer for both loops: only the loop differs. A small LR keeps the weights sane.
    optimizer = build_optimizer(model, name="sgd", lr=1e-3, weight_decay=1e-4, momentum=0.9)
    scheduler = build_warmup_cosine_scheduler(optimizer, warmup_iters=0, total_iters=10**6)
    use_amp = args.amp and device.type == "cuda"
    engine_scaler = torch.amp.GradScaler("cuda") if use_amp else None
    reference_scaler = torch.amp.GradScaler("cuda") if use_amp else None

    def loader(num_batches: int) -> DataLoader:
        return DataLoader(tiles[: num_batches * args.batch], batch_size=args.batch, shuffle=False,
                          collate_fn=collate_detection, pin_memory=device.type == "cuda")

    def run_engine(batches: DataLoader) -> None:
        train_one_epoch(model, optimizer, batches, device=device, scaler=engine_scaler, scheduler=scheduler)

    def run_reference(batches: DataLoader) -> None:
        reference_loop(model, optimizer, batches, device=device, scaler=reference_scaler)

    if args.warmup:
        run_engine(loader(args.warmup))
        run_reference(loader(args.warmup))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_loader = loader(args.iters)
    runs: dict[str, list[tuple[float, float]]] = {"engine": [], "reference": []}
    for r in range(args.rounds):  # ABBA: neither loop always runs first (thermal, caches, allocator)
        order = [("engine", run_engine), ("reference", run_reference)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            wall, cpu = timed(lambda: run(timed_loader), device)
            runs[name].append((wall / args.iters, cpu / args.iters))

    images = [image for image, _ in tiles[: args.iters * args.batch]]
    predict(model, images[: args.batch], device=device, batch_size=args.batch)  # warmup
    predict_s, _ = timed(lambda: predict(model, images, device=device, batch_size=args.batch), device)
    evaluate_s, _ = timed(lambda: evaluate(model, timed_loader, device=device, score_threshold=0.3,
                                           class_names=class_names), device)

    engine_s = [wall for wall, _ in runs["engine"]]
    reference_s = [wall for wall, _ in runs["reference"]]
    engine, reference = statistics.median(engine_s), statistics.median(reference_s)
    engine_cpu = statistics.median(cpu for _, cpu in runs["engine"])
    reference_cpu = statistics.median(cpu for _, cpu in runs["reference"])
    result = {
        "backbone": backbone,
        "train_img_s": args.batch / engine,
        "reference_train_img_s": args.batch / reference,
        "eval_img_s": len(images) / predict_s,
        "evaluate_img_s": len(images) / evaluate_s,
        "engine_s_per_iter": engine,
        "reference_s_per_iter": reference,
        "engine_runs_s_per_iter": engine_s,
        "reference_runs_s_per_iter": reference_s,
        "ratio": engine / reference,
        "within_target": engine / reference <= OVERHEAD_TARGET,
        "engine_cpu_s_per_iter": engine_cpu,
        "reference_cpu_s_per_iter": reference_cpu,
        "cpu_ratio": engine_cpu / reference_cpu,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def print_table(results: list[dict], header: str) -> None:
    print(header)
    columns = ("backbone", "train img/s", "eval img/s", "evaluate img/s", "engine s/it", "plain s/it", "ratio",
               "cpu-time ratio")
    rows = [
        (r["backbone"], f"{r['train_img_s']:.2f}", f"{r['eval_img_s']:.2f}", f"{r['evaluate_img_s']:.2f}",
         f"{r['engine_s_per_iter']:.4f}", f"{r['reference_s_per_iter']:.4f}",
         f"{r['ratio']:.3f}" + ("" if r["within_target"] else f" (> {OVERHEAD_TARGET})"), f"{r['cpu_ratio']:.3f}")
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    count = max(args.iters, args.warmup) * args.batch
    with tempfile.TemporaryDirectory(prefix="deepforest-") as tmp:
        tiles, class_names = load_tiles(args.data or Path(tmp), size=args.size, count=count)
    results = [bench_backbone(name, tiles, class_names, args, device) for name in backbones]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "benchmark": "train_step",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "overhead_target_ratio": OVERHEAD_TARGET,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results, f"{args.arch} at {args.size}px, batch {args.batch}, {args.iters} iters x {args.rounds} "
                         f"rounds on {device} ({device_name}), amp={args.amp and device.type == 'cuda'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
