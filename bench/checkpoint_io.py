"""Checkpoint I/O of one trial: bytes written per epoch and per trial, and the share of epoch time spent
checkpointing, for `checkpoint.resume_every` = 1 (before: every epoch writes every fold's resume state) and
for larger N (after). No Ray: the K folds are real `trainables.fold_worker.FoldWorker`s trained one after
another in this process on the real DeepForest tiles (Faster R-CNN/MobileNetV2, no pretrained weights), and
each epoch's checkpoint is what `trainables.trial._Trial.report` writes (`checkpoint_contents` decides,
`write_trial_checkpoint` writes it into a temporary folder) and then copied to a storage folder the way Tune
persists a checkpoint (`pyarrow.fs.copy_files`), so the bytes are written twice, as in a sweep.

    epoch time  = train + evaluate of every fold + fetching its state (what the coordinator gets each epoch)
    share       = checkpoint seconds / (epoch time + checkpoint seconds), over the trial's epochs
    ratio       = bytes per trial (resume_every=1) / bytes per trial (resume_every=N)

One training run serves every N: after each epoch the checkpoint of each policy is written and timed in turn.

    python bench/checkpoint_io.py --epochs 10 --image-size 128 --every 1 2 5 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from any folder


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="DeepForest tiles in the folds")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--keep-best", type=int, default=3)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 5, 10], help="resume_every values")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "checkpoint_io.json")
    args = parser.parse_args(argv)

    import pyarrow.fs
    import torch

    from detection.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from detection.data.deepforest import write_deepforest_coco
    from detection.data.splits import Split
    from trainables.fold_worker import FoldWorker
    from trainables.trial import BestModel, checkpoint_contents, rank_best, write_trial_checkpoint

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-io-"))
    try:
        root = write_deepforest_coco(work / "data")
        ids = list(range(args.images))  # the first tiles of the index (the tests' tiny folds do the same)
        folds = tuple(tuple(ids[k::args.folds]) for k in range(args.folds))
        split = Split(selection=(), test=(), folds=folds, seed=0)
        config = ExperimentConfig(
            data=DataConfig(path=str(root), num_folds=args.folds, class_balanced_sampling=False),
            model=ModelConfig(arch="faster_rcnn", backbone="mobilenet_v2", start="none"),
            train=TrainConfig(epochs=args.epochs, image_size=args.image_size, batch_size=2, eval_batch_size=2,
                              augment=False, amp=False, warmup_epochs=0.0, patience=0),
        ).validate()
        workers = [FoldWorker(config, split, k, num_threads=1) for k in range(args.folds)]
        stores = {n: work / f"storage-{n}" for n in args.every}
        local = pyarrow.fs.LocalFileSystem()
        best: dict[int, BestModel] = {}
        predictions: dict[int, bytes] = {}
        rows = {n: [] for n in args.every}
        epoch_times = []
        for epoch in range(1, args.epochs + 1):
            started = time.perf_counter()
            improved = False
            states = []
            for k, w in enumerate(workers):
                w.train_epoch()
                ev = w.evaluate()
                states.append(w.state_bytes())
                out = w.best_outputs()
                if out is not None:
                    improved = True
                    best[k] = BestModel(fold=k, epoch=epoch, score=float(ev["score"]), map_50=float(ev["map_50"]),
                                        f1=float(ev["f1"]), map=float(ev["map"]), model=out["model"])
                    predictions[k] = out["predictions"]
            epoch_times.append(time.perf_counter() - started)
            for n in args.every:
                what = checkpoint_contents(epoch, resume_every=n, finished=epoch == args.epochs, improved=improved)
                if what is None:
                    rows[n].append({"epoch": epoch, "what": None, "bytes": 0, "seconds": 0.0})
                    continue
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    write_trial_checkpoint(tmp, fold_states=states if what == "states" else None,
                                           best=rank_best(best, args.keep_best),
                                           trial={"num_folds": args.folds, "epoch": epoch, "states_checkpoint": None},
                                           predictions=predictions)
                    size = folder_bytes(Path(tmp))
                    dest = stores[n] / f"checkpoint_{epoch:06d}"
                    pyarrow.fs.copy_files(tmp, str(dest), source_filesystem=local, destination_filesystem=local)
                seconds = time.perf_counter() - t0
                shutil.rmtree(dest)  # Tune deletes the older ones (num_to_keep)
                rows[n].append({"epoch": epoch, "what": what, "bytes": 2 * size, "seconds": seconds})
            print(f"epoch {epoch}: {epoch_times[-1]:.1f} s, improved={improved}, "
                  + ", ".join(f"N={n}: {rows[n][-1]['what']}" for n in args.every), flush=True)

        compute = sum(epoch_times)
        summary = {}
        for n in args.every:
            total = sum(r["bytes"] for r in rows[n])
            ck = sum(r["seconds"] for r in rows[n])
            summary[n] = {"bytes_per_trial": total, "bytes_per_epoch": total / args.epochs,
                          "checkpoint_s": ck, "share": ck / (compute + ck),
                          "written": [r["what"] for r in rows[n]]}
        base = summary[args.every[0]]
        print(f"\n{args.folds} folds x {args.epochs} epochs at {args.image_size} px, epoch {compute / args.epochs:.2f} s "
              f"(train + eval of every fold, one after another, 1 thread)")
        print("resume_every | MB per epoch | MB per trial | checkpoint share of epoch time | bytes ratio vs first")
        for n, s in summary.items():
            print(f"{n:>12} | {s['bytes_per_epoch'] / 1e6:12.1f} | {s['bytes_per_trial'] / 1e6:12.1f} | "
                  f"{s['share']:30.3f} | {base['bytes_per_trial'] / s['bytes_per_trial']:.2f}")
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "epoch_s": epoch_times,
                  "summary": {str(n): s for n, s in summary.items()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
