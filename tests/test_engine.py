from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from detection.data.coco import collate_detection
from detection.engine import (
    EarlyStopping,
    NonFiniteLossError,
    build_optimizer,
    build_warmup_cosine_scheduler,
    evaluate,
    mirror_boxes,
    predict,
    train_one_epoch,
)
from detection.metrics import METRIC_NAMES

CLASS_NAMES = ("Tree", "Dead")


class BoxRegressor(nn.Module):
    """A tiny detector-shaped model: conv features -> one box per image, torchvision loss dict.

    ``nan_calls``: training forward calls (0-based) whose box loss is multiplied by NaN, as a
    diverging run would produce (NaN reaches the gradients too). ``loss_scale`` inflates the loss.
    """

    def __init__(self, nan_calls=(), loss_scale=1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.nan_calls = set(nan_calls)
        self.loss_scale = loss_scale
        self.calls = 0

    def forward(self, images, targets=None):
        features = torch.stack([self.norm(self.conv(image[None])).mean(dim=(2, 3))[0] for image in images])
        boxes = self.head(features) * 32  # [B, 4]
        if not self.training:
            return [
                {"boxes": box[None], "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64)}
                for box in boxes
            ]
        target_boxes = torch.stack([t["boxes"][0] for t in targets])
        loss_box = nn.functional.smooth_l1_loss(boxes, target_boxes) * self.loss_scale
        if self.calls in self.nan_calls:
            loss_box = loss_box * float("nan")
        self.calls += 1
        return {"loss_box_reg": loss_box, "loss_classifier": features.pow(2).mean()}


def _box_batches(num_images=8, batch_size=2, size=32):
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(num_images):
        image = torch.rand(3, size, size, generator=generator)
        xy = torch.rand(2, generator=generator) * 16
        samples.append((image, {"boxes": torch.cat([xy, xy + 12])[None], "labels": torch.ones(1, dtype=torch.int64)}))
    return DataLoader(samples, batch_size=batch_size, collate_fn=collate_detection)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_train_one_epoch_returns_mean_losses_and_learns():
    torch.manual_seed(0)
    model = BoxRegressor()
    optimizer = build_optimizer(model, name="adam", lr=0.05, weight_decay=0.0)
    loader = _box_batches()
    first = train_one_epoch(model, optimizer, loader, device="cpu")
    for _ in range(4):
        last = train_one_epoch(model, optimizer, loader, device="cpu")
    assert set(first) == {"loss_box_reg", "loss_classifier", "loss"}
    assert first["loss"] == pytest.approx(first["loss_box_reg"] + first["loss_classifier"])
    assert last["loss_box_reg"] < first["loss_box_reg"]


def test_nonfinite_loss_skips_the_step():
    torch.manual_seed(0)
    model = BoxRegressor(nan_calls={1})
    optimizer = build_optimizer(model, name="adam", lr=0.01, weight_decay=0.0)
    scheduler = build_warmup_cosine_scheduler(optimizer, warmup_iters=0, total_iters=10)
    with pytest.warns(RuntimeWarning, match=r"Skipping iteration 1: non-finite loss \(loss_box_reg=nan"):
        losses = train_one_epoch(model, optimizer, _box_batches(), device="cpu", scheduler=scheduler)
    # 4 batches, the 2nd skipped: Adam took 3 steps, the schedule advanced 4 iterations
    assert all(optimizer.state[p]["step"] == 3 for p in model.parameters())
    assert scheduler.last_epoch == 4
    assert all(math.isfinite(v) for v in losses.values())
    assert torch.isfinite(_params(model)).all()


def test_nonfinite_losses_in_a_row_raise():
    model = BoxRegressor(nan_calls={1, 2, 3})
    optimizer = build_optimizer(model, name="sgd", lr=0.01, weight_decay=0.0)
    with pytest.warns(RuntimeWarning, match="Skipping iteration"), pytest.raises(
        NonFiniteLossError, match=r"3 iterations in a row \(last: iteration 3"
    ):
        train_one_epoch(model, optimizer, _box_batches(), device="cpu", max_nonfinite=3)

    # the same number of NaNs, but never 2 in a row, does not raise
    model = BoxRegressor(nan_calls={0, 2})
    optimizer = build_optimizer(model, name="sgd", lr=0.01, weight_decay=0.0)
    with pytest.warns(RuntimeWarning, match="1 in a row") as record:
        train_one_epoch(model, optimizer, _box_batches(), device="cpu", max_nonfinite=2)
    assert len(record) == 2


@pytest.mark.parametrize("use_scaler", [False, True], ids=["fp32", "grad-scaler"])
def test_grad_clip_bounds_the_step(use_scaler):
    loader = _box_batches(num_images=2, batch_size=2)  # one iteration
    steps = {}
    for grad_clip in (None, 0.5):
        torch.manual_seed(0)
        model = BoxRegressor(loss_scale=1e4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD: step = -lr * grad
        # GradScaler runs on CPU too (no autocast there): its scale/unscale/step path is the CUDA one
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_scaler else None
        before = _params(model)
        train_one_epoch(model, optimizer, loader, device="cpu", grad_clip=grad_clip, scaler=scaler)
        steps[grad_clip] = (_params(model) - before).norm().item()
    # unclipped: |step| = 0.1 * |grad| with |grad| in the thousands; clipped: 0.1 * 0.5 = 0.05
    # (clipping the still-scaled gradients would give 0.05 / 256)
    assert steps[None] > 10.0
    assert steps[0.5] == pytest.approx(0.05, rel=1e-3)


def test_nonfinite_loss_with_grad_scaler_recovers():
    torch.manual_seed(0)
    model = BoxRegressor(nan_calls={0, 2})
    optimizer = build_optimizer(model, name="adam", lr=0.01, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with pytest.warns(RuntimeWarning, match="Skipping iteration") as record:
        losses = train_one_epoch(model, optimizer, _box_batches(), device="cpu", scaler=scaler, max_nonfinite=2)
    assert [str(w.message).split(":")[0] for w in record] == ["Skipping iteration 0", "Skipping iteration 2"]
    # iterations 0 and 2 skipped, 1 and 3 stepped; each NaN halved the scale: 256 / 2 / 2 = 64
    assert all(optimizer.state[p]["step"] == 2 for p in model.parameters())
    assert scaler.get_scale() == 64.0
    assert math.isfinite(losses["loss"]) and torch.isfinite(_params(model)).all()


def test_warmup_cosine_values():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_warmup_cosine_scheduler(optimizer, warmup_iters=4, total_iters=12, min_lr_ratio=0.01)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {
        0: 0.1 * 0.001,  # warmup starts at 0.001 * lr
        2: 0.1 * (0.001 + 0.999 * 2 / 4),  # halfway: 0.05005
        4: 0.1,  # warmup done, cosine progress 0
        8: 0.1 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 4 / 8))),  # progress 0.5: 0.0505
        12: 0.1 * 0.01,  # progress 1: min_lr_ratio * lr
        13: 0.1 * 0.01,  # flat after total_iters
    }
    for i, lr in expected.items():
        assert lrs[i] == pytest.approx(lr), i

    # resume: a fresh scheduler loaded from the state dict continues at the same LR
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler2 = build_warmup_cosine_scheduler(optimizer2, warmup_iters=4, total_iters=12, min_lr_ratio=0.01)
    scheduler2.load_state_dict(state)
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())

    with pytest.raises(ValueError, match="warmup_iters <= total_iters"):
        build_warmup_cosine_scheduler(optimizer, warmup_iters=20, total_iters=12)


def test_build_optimizer_no_decay_on_norm_and_bias():
    model = BoxRegressor()
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model.conv.weight), id(model.head.weight)}
    assert no_decay == {id(model.conv.bias), id(model.norm.weight), id(model.norm.bias), id(model.head.bias)}
    assert isinstance(optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"one of \('sgd', 'adamw', 'adam'\).*'lion'"):
        build_optimizer(model, name="lion", lr=1e-3, weight_decay=0.0)


def test_early_stopping():
    stopper = EarlyStopping(patience=2, mode="max")
    # 0.1 best; 0.2 best; 0.2 not better (1 bad); 0.15 (2 bad) -> stop
    assert [stopper.step(v) for v in (0.1, 0.2, 0.2, 0.15)] == [False, False, False, True]

    stopper = EarlyStopping(patience=2, mode="max", min_delta=0.01)
    # 0.5 best; 0.505 < 0.5 + 0.01 (1 bad); 0.52 best; nan (1 bad); 0.3 (2 bad) -> stop
    assert [stopper.step(v) for v in (0.5, 0.505, 0.52, float("nan"), 0.3)] == [False, False, False, False, True]

    stopper = EarlyStopping(patience=1, mode="min")
    assert [stopper.step(v) for v in (1.0, 0.8, 0.9)] == [False, False, True]

    resumed = EarlyStopping(patience=5)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.state_dict() == {"patience": 1, "mode": "min", "min_delta": 0.0, "best": 0.8,
                                    "num_bad": 1, "should_stop": True}
    assert all(isinstance(v, (int, float, str, bool)) for v in resumed.state_dict().values())
    assert resumed.step(0.7) is False  # an improvement resets it


def _tiny_faster_rcnn():
    torch.manual_seed(0)
    backbone = nn.Sequential(  # stride 4, 16 channels: a few thousand weights
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    )
    backbone.out_channels = 16
    return FasterRCNN(
        backbone,
        num_classes=len(CLASS_NAMES) + 1,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        representation_size=64,
        box_score_thresh=0.0,
    )


def _detection_loader(with_boxes=True):
    generator = torch.Generator().manual_seed(1)
    samples = []
    for i, (h, w) in enumerate([(64, 80), (48, 64), (64, 64), (56, 72)]):
        image = torch.rand(3, h, w, generator=generator) * 0.2
        if with_boxes:
            image[:, 10:30, 12:40] = 0.9  # a bright "object" where the box is
            boxes = torch.tensor([[12.0, 10.0, 40.0, 30.0]])
            labels = torch.tensor([1 + i % 2])
        else:
            boxes, labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        samples.append((image, {"boxes": boxes, "labels": labels, "iscrowd": torch.zeros_like(labels)}))
    return DataLoader(samples, batch_size=2, collate_fn=collate_detection)


@pytest.mark.parametrize("with_boxes", [True, False], ids=["boxes", "empty-targets"])
def test_faster_rcnn_trains_and_evaluates(with_boxes):
    model = _tiny_faster_rcnn()
    optimizer = build_optimizer(model, name="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9)
    loader = _detection_loader(with_boxes)
    losses = train_one_epoch(model, optimizer, loader, device="cpu", progress=True)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())

    metrics = evaluate(model, loader, device="cpu", score_threshold=0.05, class_names=CLASS_NAMES)
    assert set(METRIC_NAMES) <= set(metrics)
    assert {"ap/Tree", "ap/Dead", "ap_50/Tree", "ap_50/Dead"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert model.training  # evaluate restores the mode it found
    if not with_boxes:
        assert metrics["map"] == metrics["recall"] == metrics["score"] == 0.0


def test_predict_returns_cpu_boxes_in_each_image_frame():
    model = _tiny_faster_rcnn()
    images = [torch.rand(3, 64, 80), torch.rand(3, 40, 50), torch.rand(3, 100, 30)]
    preds = predict(model, images, device="cpu", batch_size=2)
    assert len(preds) == 3
    for pred, image in zip(preds, images):
        h, w = image.shape[1:]
        assert set(pred) == {"boxes", "scores", "labels"} and pred["boxes"].device.type == "cpu"
        assert len(pred["boxes"]) > 0  # box_score_thresh=0: an untrained head still proposes boxes
        # boxes are clipped to each input image's own size, not the 64 px the model resizes to
        assert (pred["boxes"][:, 2] <= w + 1e-3).all() and (pred["boxes"][:, 3] <= h + 1e-3).all()
    assert preds[2]["boxes"][:, 3].max() > 64  # the 100 px tall image is mapped back past 64
    with pytest.raises(ValueError, match=r"images\[0\].*\[3, H, W\]"):
        predict(model, [torch.zeros(64, 64)], device="cpu")


def test_hflip_predicts_the_mirrored_image_in_the_original_frame():
    model = _tiny_faster_rcnn()
    images = [torch.rand(3, 64, 80), torch.rand(3, 40, 50)]
    flipped = predict(model, images, device="cpu", hflip=True)
    on_mirrors = predict(model, [image.flip(-1) for image in images], device="cpu")
    for pred, mirror, image in zip(flipped, on_mirrors, images):
        width = image.shape[-1]
        assert len(pred["boxes"]) == len(mirror["boxes"]) > 0
        torch.testing.assert_close(pred["boxes"], mirror_boxes(mirror["boxes"], width=width))
        torch.testing.assert_close(pred["scores"], mirror["scores"])
        assert (pred["boxes"][:, 0] < pred["boxes"][:, 2]).all() and (pred["boxes"][:, 2] <= width + 1e-3).all()
    # x1' = W - x2, x2' = W - x1 in an 80 px wide image; y unchanged; empty stays [0, 4]
    torch.testing.assert_close(mirror_boxes(torch.tensor([[10.0, 5.0, 30.0, 25.0]]), width=80),
                               torch.tensor([[50.0, 5.0, 70.0, 25.0]]))
    assert mirror_boxes(torch.zeros(0, 4), width=80).shape == (0, 4)
