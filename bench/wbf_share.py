"""Share of the ensemble job spent in Weighted Boxes Fusion against model inference, for 3 and 5 models.

    python bench/wbf_share.py [--data data/deepforest] [--image-size 320] [--threads 1]

The ensemble job predicts every image with every model, then fuses per image (`detection.fusion`, which
wraps ensemble-boxes). Here M Faster R-CNN/MobileNetV2 models (random start: the timing does not depend on
the weights, but an untrained model returns the full 300 boxes per image, the worst case for fusion)
predict the DeepForest selection and test tiles at full resolution, and the same predictions are fused
with the ensemble job's settings. Prints inference and fusion seconds and fusion / inference; target
< 0.05. Writes bench/results/wbf_share.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from detection.data.coco import CocoDetection, load_dataset
from detection.engine import predict
from detection.fusion import fuse_predictions
from detection.models.factory import build_detector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/deepforest")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an ensemble task's CPUs)")
    parser.add_argument("--out", default="bench/results/wbf_share.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    index = load_dataset(args.data, filter_empty=False)
    ids = [r.image_id for r in index.images if r.split in ("valid", "test")]
    dataset = CocoDetection(index, ids)
    images = [dataset[i][0] for i in range(len(dataset))]
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    rows = []
    for num_models in (3, 5):
        models = [build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=index.num_classes,
                                 image_size=args.image_size, start="none").eval() for _ in range(num_models)]
        started = time.perf_counter()
        per_model = [predict(model, images, device="cpu", batch_size=4) for model in models]
        inference_s = time.perf_counter() - started
        started = time.perf_counter()
        fused = fuse_predictions(per_model, sizes, weights=[1.0] * num_models, iou_thr=0.55, skip_box_thr=0.01,
                                 conf_type="avg")
        fusion_s = time.perf_counter() - started
        boxes = sum(len(p["boxes"]) for preds in per_model for p in preds)
        row = {"models": num_models, "images": len(images), "boxes_in": boxes,
               "boxes_out": sum(len(p["boxes"]) for p in fused), "inference_s": inference_s, "fusion_s": fusion_s,
               "fusion_over_inference": fusion_s / inference_s}
        rows.append(row)
        print(f"{num_models} models, {len(images)} images, {boxes} boxes in: inference {inference_s:.2f} s, "
              f"fusion {fusion_s:.3f} s, fusion / inference = {fusion_s / inference_s:.4f} (target < 0.05)",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
