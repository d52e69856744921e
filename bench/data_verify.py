"""Cost of the image check before a sweep (detection/data/verify.py) on many generated images.

Writes `--num-images` 640 px images (half JPEG, half PNG; each file's bytes are one of a few generated
templates, so writing 10,000 takes seconds) with a COCO JSON, then times `verify_images` on them:

- header check (the default `data.verify: header`), cold (no cache) and cached (the second run),
- full decode (`data.verify: decode`), cold and cached,
- the header check in one process (workers=1), for the parallel speed-up.

"Cold" means no check cache; the files themselves sit in the page cache (they were just written), so a
first check on a network disk costs more. Prints per-image milliseconds and ratios, writes JSON.

    .venv/bin/python bench/data_verify.py [--num-images 10000] [--out bench/results/data_verify.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from detection.data.coco import load_dataset
from detection.data.verify import verify_images

SIZE = 640
TEMPLATES = 8  # distinct images per format


def template_bytes(fmt: str, seed: int) -> bytes:
    """A photo-like 640 px image: a smooth gradient, a few rectangles, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([(x * 255 // SIZE), (y * 255 // SIZE), ((x + y) * 127 // SIZE)], axis=-1).astype(np.int16)
    for _ in range(12):
        x0, y0 = rng.integers(0, SIZE - 64, 2)
        w, h = rng.integers(16, 160, 2)
        image[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    image += rng.integers(-6, 7, image.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_dataset(folder: Path, num_images: int) -> Path:
    templates = {fmt: [template_bytes(fmt, seed) for seed in range(TEMPLATES)] for fmt in ("JPEG", "PNG")}
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    for i in range(num_images):
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        name = f"img{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (folder / name).write_bytes(templates[fmt][i // 2 % TEMPLATES])
        coco["images"].append({"id": i, "file_name": name, "width": SIZE, "height": SIZE})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 100, 80],
                                    "area": 8000, "iscrowd": 0})
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def timed(records, *, mode: str, cache: Path | None, workers: int | None) -> dict:
    started = time.perf_counter()
    report = verify_images(records, mode=mode, cache_path=cache, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    assert not report.bad, report.bad[:3]
    return {"mode": mode, "workers": workers, "seconds": seconds, "inspected": report.inspected,
            "cached": report.cached, "ms_per_image": 1000 * seconds / len(records)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None, help="check processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_verify.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="data-verify-bench-"))
    try:
        started = time.perf_counter()
        records = load_dataset(write_dataset(folder, args.num_images)).images
        print(f"wrote and indexed {len(records)} images in {time.perf_counter() - started:.1f} s ({folder})")
        runs = {
            "header_cold": timed(records, mode="header", cache=folder / "header.json", workers=args.workers),
            "header_cached": timed(records, mode="header", cache=folder / "header.json", workers=args.workers),
            "decode_cold": timed(records, mode="decode", cache=folder / "decode.json", workers=args.workers),
            "decode_cached": timed(records, mode="decode", cache=folder / "decode.json", workers=args.workers),
            "header_cold_one_process": timed(records, mode="header", cache=None, workers=1),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ratios = {
        "decode_cold / header_cold": runs["decode_cold"]["seconds"] / runs["header_cold"]["seconds"],
        "header_cached / header_cold": runs["header_cached"]["seconds"] / runs["header_cold"]["seconds"],
        "header_one_process / header_parallel": runs["header_cold_one_process"]["seconds"] / runs["header_cold"]["seconds"],
    }
    for name, run in runs.items():
        print(f"{name:26s} {run['ms_per_image']:8.3f} ms/image  ({run['seconds']:.2f} s, {run['inspected']} read, "
              f"{run['cached']} cached)")
    for name, value in ratios.items():
        print(f"{name:38s} {value:6.3f}")
    goals = {"header_cold_ms_per_image < 2": runs["header_cold"]["ms_per_image"] < 2,
             "header_cached_ms_per_image < 0.1": runs["header_cached"]["ms_per_image"] < 0.1}
    print("goals:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    report = {"num_images": len(records), "image_size": SIZE, "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "platform": platform.platform(), "runs": runs, "ratios": ratios,
              "goals": goals}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
