"""The final ensemble job: choose an ensemble of the sweep's fold models on the selection split, score it once
on the test split (the evaluation protocol of DESIGN.md).

For every trial that Tune finished (status TERMINATED, with a checkpoint) the job

1. reads the checkpoint's `trial.json` and `best/best.json` (its `keep_best` best fold models, best first),
2. rebuilds those models (`build_detector(..., start="none")` + the saved state dict; Faster R-CNN's
   k-means anchor shapes come back from the state dict) in one Ray task per trial, which predicts the
   selection images at full resolution (the models resize internally and answer in each image's own
   pixels, `xyxy absolute`),
3. scores, on the selection split, each fold model alone and the trial's models fused with Weighted Boxes
   Fusion (`detection.fusion.fuse_predictions`; model weights = the models' fold validation scores,
   `skip_box_thr` = the fixed floor `ensemble.skip_box_thr`), F1 at the threshold that is F1-optimal on
   those selection predictions (the threshold is part of what the selection split chooses),
4. builds a cross-trial ensemble by greedy forward selection with replacement (Caruana et al. 2004) over the
   fold models of all finished trials, WBF-fused, at most `ensemble.max_models` models,
5. tunes the WBF settings (`ensemble.iou_thr_grid` x `ensemble.conf_type_grid` x flip TTA from
   `ensemble.hflip_tta_grid`: the mirrored images' predictions fused too) of the best trial's ensemble
   and the greedy one on their selection predictions, then picks the winner on the selection split (whichever
   of the two scores higher) and scores only the winner, and the best single fold model for comparison, on the
   test split, at the thresholds the selection split chose. Nothing is chosen on the test split.

The job writes, into the experiment folder (docs/INTERFACES.md):

    ensemble/<trial_id>.json   the trial's fused selection-split predictions (COCO results style) and metrics
    ensemble/test.json         the chosen ensemble's test-split predictions and metrics (the final figures)
    leaderboard.csv / .md      every trial: best single model and fused ensemble on the selection split; then
                               the greedy ensemble, the chosen ensemble and its test figures
    best_ensemble.json         the chosen ensemble: model files (copied to best_ensemble/, so Tune's
    best_ensemble/<file>.pt    checkpoint rotation cannot remove them), classes, WBF parameters, threshold

The spec, loading its models and predicting with them live in `search.ensemble_models` (the predict
command uses only that).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from detection.config import ConfigError
from detection.data.splits import Split
from search.ensemble_models import (
    BEST_ENSEMBLE_DIR,
    EnsembleError,
    EnsembleModel,
    EnsembleSpec,
    build_ensemble_models,
    fusion_members,
    predictions_to_coco,
)
from search.formatting import finite_float, format_or_dash, markdown_table
from search.trial_results import TrialResult, error_line, read_trials

__all__ = [
    "BEST_ENSEMBLE_JSON",
    "ENSEMBLE_DIR",
    "LEADERBOARD_COLUMNS",
    "LEADERBOARD_CSV",
    "LEADERBOARD_MD",
    "MIN_MODEL_WEIGHT",
    "LeaderboardRow",
    "format_leaderboard",
    "run_ensemble",
]

logger = logging.getLogger(__name__)

ENSEMBLE_DIR = "ensemble"
BEST_ENSEMBLE_JSON = "best_ensemble.json"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
GREEDY = "greedy"  # the name of the cross-trial ensemble
# WBF needs positive model weights; a fold model whose validation score is 0 still gets a tiny vote.
MIN_MODEL_WEIGHT = 1e-3
# What the leaderboard reports of the fused held-out predictions (the same strings as everywhere).
ENSEMBLE_METRICS = ("map", "map_50", "map_75", "f1", "score")


# ------------------------------------------------------------------------------------------ the trials


@dataclass(frozen=True)
class LeaderboardRow:
    """One line of the leaderboard: a trial (its best single fold model and its fused models on the selection
    split), the greedy cross-trial ensemble, or a test-split figure of the chosen ensemble / best single model.
    Metric fields are None where they do not apply."""

    rank: int | None
    trial_id: str  # a trial id, `greedy`, or `chosen` / `best single model` (split test)
    split: str  # the images the metrics are on: "selection" or "test"
    status: str  # "ensembled", or why not: Tune's status (ERROR, RUNNING, ...), "no checkpoint", "ensemble failed"
    detector: str | None
    start: str | None  # the weights the trial's models started from (detection / backbone / none)
    lr: float | None
    batch_size: int | None
    cv_score: float | None
    epochs: int | None
    num_models: int | None
    single_model: str | None  # the best single fold model (on the selection split) and its figures
    single_map_50: float | None
    single_f1: float | None
    single_score: float | None
    score_threshold: float | None  # the fused models' F1-optimal threshold on the selection split
    map: float | None
    map_50: float | None
    map_75: float | None
    f1: float | None
    score: float | None
    error: str | None


LEADERBOARD_COLUMNS = tuple(LeaderboardRow.__dataclass_fields__)
MAX_TASKS_IN_FLIGHT = 8  # trials whose models sit in Ray's object store at once (3 models each)

_Preds = Mapping[str, Sequence[Mapping[str, torch.Tensor]]]  # model key -> its predictions, one per image
# A prediction task's answer: [model][image] predictions on the images, and on their mirrors (or None).
_Views = tuple[list[list[dict[str, torch.Tensor]]], list[list[dict[str, torch.Tensor]]] | None]


class ModelsNotKept(EnsembleError):
    """A trial's fold models were deleted by the checkpoint budget (search/checkpoint_budget.py): not a failure."""


@dataclass(frozen=True)
class _TrialModels:
    """A finished trial's kept fold models, as read from its checkpoint."""

    trial_id: str
    start: str | None
    num_classes: int
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    models: tuple[EnsembleModel, ...]


def _trial_models(info: TrialResult) -> _TrialModels:
    """The kept fold models of a finished trial, from its checkpoint's trial.json and best/best.json."""
    from trainables.trial import BEST_DIR, TRIAL_JSON, read_best

    from search.checkpoint_budget import REMOVED_JSON, models_removed

    assert info.checkpoint is not None
    directory = info.checkpoint
    where = str(directory / TRIAL_JSON)
    removed = models_removed(directory)
    if removed is not None:
        raise ModelsNotKept(f"{directory / BEST_DIR / REMOVED_JSON}: trial {info.trial_id}'s fold models were "
                            f"deleted by the checkpoint budget: {removed.get('reason', 'no reason recorded')}.")
    try:
        trial = json.loads((directory / TRIAL_JSON).read_text())
        best = read_best(directory)
    except (OSError, json.JSONDecodeError) as error:
        raise EnsembleError(f"{directory}: cannot read the checkpoint of trial {info.trial_id} ({error}); "
                            f"expected {TRIAL_JSON} and {BEST_DIR}/best.json written by train_trial.") from error
    if not best:
        raise EnsembleError(f"{directory / BEST_DIR}: trial {info.trial_id} kept no best model; expected at least one.")
    try:
        from detection.config import ModelConfig, from_dict

        model_config = from_dict(ModelConfig, trial["config"]["model"], where=where, prefix="model.")
        models = tuple(EnsembleModel(path=e["path"], trial_id=info.trial_id, arch=str(trial["arch"]),
                                     backbone=str(trial["backbone"]), image_size=int(trial["image_size"]),
                                     rank=int(e["rank"]), fold=int(e["fold"]), epoch=int(e["epoch"]),
                                     score=float(e["score"]), options=model_config.architecture_options)
                       for e in sorted(best, key=lambda e: e["rank"]))
        return _TrialModels(trial_id=info.trial_id, start=trial.get("start"), num_classes=int(trial["num_classes"]),
                            class_names=tuple(trial["class_names"]),
                            category_ids=tuple(int(c) for c in trial["category_ids"]), models=models)
    except (KeyError, TypeError, ConfigError) as error:
        raise EnsembleError(f"{where}: missing or bad key {error}; expected arch, backbone, num_classes, "
                            "image_size, class_names, category_ids and config.model.") from error


# ------------------------------------------------------------------------------------ prediction tasks


def _predict_models(models: Sequence[EnsembleModel], *, num_classes: int, data_path: str, image_ids: Sequence[int],
                    batch_size: int, model_bytes: Sequence[bytes], hflip: bool = False) -> _Views:
    """Every model's raw predictions on `image_ids` at full resolution: `[model][image]` dicts (`boxes` [N, 4]
    xyxy absolute, `scores`, `labels`), and with `hflip` also on the mirrored images (boxes mirrored back; None
    without). Runs as a Ray task (or in-process); the driver hands over the model files' bytes, so a task on any
    node needs only the dataset."""
    from torch.utils.data import DataLoader

    from detection.data.coco import CocoDetection, collate_detection, load_dataset
    from detection.engine import predict
    from trainables.fold_worker import pick_device

    index = load_dataset(data_path, filter_empty=False)
    spec = EnsembleSpec(name="predict", num_classes=num_classes, class_names=("?",) * num_classes,
                        category_ids=tuple(range(num_classes)), score_threshold=0.5, models=tuple(models),
                        weights=(1.0,) * len(models), iou_thr=0.5, skip_box_thr=0.0, conf_type="avg")
    built = build_ensemble_models(spec, device=pick_device(), model_bytes=model_bytes)
    # Full resolution, no eval transform: the detectors resize internally and answer in these pixels.
    loader = DataLoader(CocoDetection(index, list(image_ids), transforms=None), batch_size=batch_size,
                        shuffle=False, collate_fn=collate_detection)
    out: list[list[dict[str, torch.Tensor]]] = [[] for _ in built]
    mirrored: list[list[dict[str, torch.Tensor]]] = [[] for _ in built]
    for images, _ in loader:
        for m, model in enumerate(built):
            device = next(model.parameters()).device
            out[m].extend(predict(model, images, device=device, batch_size=batch_size))
            if hflip:
                mirrored[m].extend(predict(model, images, device=device, batch_size=batch_size, hflip=True))
    return out, (mirrored if hflip else None)


def _targets(index: Any, image_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.as_tensor(r.boxes).reshape(-1, 4), "labels": torch.as_tensor(r.labels),
             "iscrowd": torch.as_tensor(r.iscrowd)} for r in index.records(image_ids)]


class _Scorer:
    """Fuses and scores model predictions on one split (the driver's side of the job)."""

    def __init__(self, *, targets: Sequence[Mapping[str, torch.Tensor]], sizes: Sequence[tuple[int, int]],
                 class_names: Sequence[str], iou_thr: float, skip_box_thr: float, conf_type: str) -> None:
        self.targets, self.sizes, self.class_names = list(targets), list(sizes), tuple(class_names)
        self.iou_thr, self.skip_box_thr, self.conf_type = iou_thr, skip_box_thr, conf_type

    def fuse(self, per_model: Sequence[Sequence[Mapping[str, torch.Tensor]]], weights: Sequence[float], *,
             iou_thr: float | None = None, conf_type: str | None = None) -> list[dict[str, torch.Tensor]]:
        """WBF at the scorer's settings, or at `iou_thr`/`conf_type` where given."""
        from detection.fusion import fuse_predictions

        return fuse_predictions(per_model, self.sizes, weights=list(weights),
                                iou_thr=self.iou_thr if iou_thr is None else iou_thr, skip_box_thr=self.skip_box_thr,
                                conf_type=self.conf_type if conf_type is None else conf_type)

    def metrics(self, preds: Sequence[Mapping[str, torch.Tensor]], score_threshold: float | None) -> dict[str, float]:
        """`detection_metrics`; `score_threshold=None` picks the F1-optimal one on these predictions."""
        from detection.metrics import detection_metrics

        return detection_metrics(preds, self.targets, score_threshold=score_threshold, class_names=self.class_names)


def greedy_selection(candidates: Sequence[str], score_of: Any, *, max_models: int) -> tuple[list[str], float]:
    """Greedy forward selection with replacement (Caruana et al. 2004, "Ensemble selection from libraries of
    models"): start from the best single candidate, then repeatedly add whichever candidate (one already in the
    ensemble too) raises `score_of(multiset)` most, up to `max_models` members; return the best multiset seen
    (as a list with repeats) and its score. `score_of` takes a list of candidate names (repeats = weight)."""
    if not candidates:
        raise ValueError("greedy_selection needs at least one candidate model, got none.")
    if max_models < 1:
        raise ValueError(f"`max_models >= 1` must hold, but got ({max_models=}).")
    scores = {c: score_of([c]) for c in candidates}
    chosen = [max(candidates, key=lambda c: (scores[c], c))]
    best, best_score = list(chosen), scores[chosen[0]]
    while len(chosen) < max_models:
        trials = {c: score_of(chosen + [c]) for c in candidates}
        pick = max(candidates, key=lambda c: (trials[c], c))
        chosen.append(pick)
        if trials[pick] > best_score:
            best, best_score = list(chosen), trials[pick]
    return best, best_score


# ------------------------------------------------------------------------------------------ the job


@dataclass
class _Candidate:
    """A fused (or single) set of models and its selection-split figures."""

    spec: EnsembleSpec
    preds: list[dict[str, torch.Tensor]]  # fused predictions on the selection split
    metrics: dict[str, float]


def _tune_fusion(candidate: _Candidate, raw: _Preds, mirrored: _Preds, scorer: _Scorer, *,
                 iou_thrs: Sequence[float], conf_types: Sequence[str], hflip_ttas: Sequence[bool]) -> _Candidate:
    """The candidate at the WBF `iou_thr` x `conf_type` x flip TTA that scores best on the selection split (its
    members and weights unchanged); its own settings win ties. `raw` and `mirrored` hold each member's unfused
    selection predictions on the images and on their mirrors."""
    spec = candidate.spec
    plain = [raw[m.key] for m in spec.models]
    best = candidate
    for hflip_tta in dict.fromkeys([*hflip_ttas, spec.hflip_tta]):
        members, weights = fusion_members(plain, [mirrored[m.key] for m in spec.models] if hflip_tta else None,
                                          spec.weights, hflip_tta=hflip_tta)
        for iou_thr in dict.fromkeys([*iou_thrs, spec.iou_thr]):
            for conf_type in dict.fromkeys([*conf_types, spec.conf_type]):
                if (iou_thr, conf_type, hflip_tta) == (spec.iou_thr, spec.conf_type, spec.hflip_tta):
                    continue
                fused = scorer.fuse(members, weights, iou_thr=iou_thr, conf_type=conf_type)
                metrics = scorer.metrics(fused, None)
                if metrics["score"] > best.metrics["score"]:
                    best = _Candidate(replace(spec, iou_thr=iou_thr, conf_type=conf_type, hflip_tta=hflip_tta,
                                              score_threshold=metrics["score_threshold"]), fused, metrics)
    return best


def run_ensemble(experiment_dir: str | Path, *, trial_ids: Sequence[str] | None = None) -> Path:
    """Choose the sweep's ensemble on the selection split and score it once on the test split (see the module
    docstring); writes the leaderboard and `best_ensemble.json`, returns the path of `leaderboard.csv`
    (`leaderboard.md` lies beside it). `trial_ids` limits the job to those trials.

    Uses the running Ray (the sweep's, or a cluster's under `ray job submit`) or starts a local one.

    Raises:
        ConfigError: the folder is not a sweep's, or `ensemble.gpus` asks for GPUs a local Ray does not have.
        EnsembleError: an unknown trial id, or no selection images in split.json.
    """
    from detection.data.coco import load_dataset
    from search.tuner import SPLIT_JSON, TUNE_DIR, load_experiment

    experiment_dir = Path(experiment_dir).resolve()
    config = load_experiment(experiment_dir)
    split_path = experiment_dir / SPLIT_JSON
    split = Split.from_json(split_path)
    if not split.selection:
        raise EnsembleError(f"{split_path}: the split holds no selection images; expected a Roboflow valid/ folder "
                            "or `data.selection_fraction` > 0.")
    if not (experiment_dir / TUNE_DIR).is_dir():
        raise EnsembleError(f"{experiment_dir / TUNE_DIR}: no Ray Tune experiment here; expected the `tune/` folder "
                            "of a sweep.")
    trials = read_trials(experiment_dir / TUNE_DIR)
    if trial_ids is not None:
        known = {t.trial_id for t in trials}
        unknown = sorted(set(trial_ids) - known)
        if unknown:
            raise EnsembleError(f"{experiment_dir / TUNE_DIR}: no trial {unknown[0]!r}; the sweep has {sorted(known)}.")
        trials = [t for t in trials if t.trial_id in set(trial_ids)]

    ens = config.ensemble
    kept: dict[str, _TrialModels] = {}
    failures: dict[str, str] = {}
    not_kept: set[str] = set()  # trials whose models the checkpoint budget deleted (failures says why)
    for info in trials:
        if info.status == "TERMINATED" and info.checkpoint is not None:
            try:
                kept[info.trial_id] = _trial_models(info)
            except ModelsNotKept as error:
                failures[info.trial_id] = str(error)
                not_kept.add(info.trial_id)
            except EnsembleError as error:
                failures[info.trial_id] = str(error)
                logger.warning("trial %s is not ensembled: %s", info.trial_id, error)

    index = load_dataset(config.data.path, filter_empty=False)
    split.check_index(index)
    jobs = {trial_id: (t.models, t.num_classes) for trial_id, t in kept.items()}
    with _local_ray_if_needed(ens, tasks=len(jobs)):  # one Ray for both splits' tasks (workers reused)
        # Mirrored views too where the selection split may choose flip TTA (twice the inference).
        selection_preds, more_failures = _predict_on(jobs, ids=split.selection, config=config,
                                                     hflip=True in ens.hflip_tta_grid)
        failures.update(more_failures)
        out_dir = experiment_dir / ENSEMBLE_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        ensembled = {t: kept[t] for t in selection_preds}
        if not ensembled:
            rows = _leaderboard_rows(trials, kept, {}, {}, failures, greedy=None, final=None, not_kept=not_kept)
            logger.warning("%s: no trial could be ensembled; %s not written.", experiment_dir, BEST_ENSEMBLE_JSON)
            return _write_leaderboard(rows, experiment_dir, summary="No trial could be ensembled.")

        first = next(iter(ensembled.values()))
        records = index.records(split.selection)
        scorer = _Scorer(targets=_targets(index, split.selection), sizes=[(r.height, r.width) for r in records],
                         class_names=first.class_names, iou_thr=ens.iou_thr, skip_box_thr=ens.skip_box_thr,
                         conf_type=ens.conf_type)

        def spec_of(name: str, models: Sequence[EnsembleModel], weights: Sequence[float],
                    threshold: float) -> EnsembleSpec:
            return EnsembleSpec(name=name, num_classes=first.num_classes, class_names=first.class_names,
                                category_ids=first.category_ids, score_threshold=threshold, models=tuple(models),
                                weights=tuple(weights), iou_thr=ens.iou_thr, skip_box_thr=ens.skip_box_thr,
                                conf_type=ens.conf_type)

        # Every fold model alone, then each trial's models fused (weights: their fold validation scores).
        raw = {m.key: p for t in ensembled.values() for m, p in zip(t.models, selection_preds[t.trial_id][0])}
        mirrored = {m.key: p for t in ensembled.values()
                    for m, p in zip(t.models, selection_preds[t.trial_id][1] or ())}
        models = {m.key: m for t in ensembled.values() for m in t.models}
        singles = {key: scorer.metrics(raw[key], None) for key in raw}
        per_trial: dict[str, _Candidate] = {}
        for trial_id, t in ensembled.items():
            weights = [max(m.score, MIN_MODEL_WEIGHT) for m in t.models]
            fused = scorer.fuse([raw[m.key] for m in t.models], weights)
            metrics = scorer.metrics(fused, None)
            spec = spec_of(trial_id, t.models, weights, metrics["score_threshold"])
            per_trial[trial_id] = _Candidate(spec, fused, metrics)

        greedy = None
        if ens.max_models > 1 and len(raw) > 1:
            # The strongest single models only: greedy selection fuses once per candidate and step.
            candidates = sorted(raw, key=lambda k: -singles[k]["score"])[: ens.greedy_candidates]

            def fused_score(keys: Sequence[str]) -> float:
                counts = Counter(keys)
                return scorer.metrics(scorer.fuse([raw[k] for k in counts], list(counts.values())), None)["score"]

            chosen, _ = greedy_selection(candidates, fused_score, max_models=ens.max_models)
            counts = Counter(chosen)
            fused = scorer.fuse([raw[k] for k in counts], list(counts.values()))
            metrics = scorer.metrics(fused, None)
            greedy = _Candidate(spec_of(GREEDY, [models[k] for k in counts], list(counts.values()),
                                        metrics["score_threshold"]), fused, metrics)

        # The WBF settings of the leading candidates are the selection split's to choose too; then the winner on
        # the selection split, ties going to the single trial's ensemble (fewer models).
        best_trial = max(per_trial.values(), key=lambda c: (c.metrics["score"], c.spec.name))
        grid = {"iou_thrs": ens.iou_thr_grid, "conf_types": ens.conf_type_grid, "hflip_ttas": ens.hflip_tta_grid}
        best_trial = per_trial[best_trial.spec.name] = _tune_fusion(best_trial, raw, mirrored, scorer, **grid)
        if greedy is not None:
            greedy = _tune_fusion(greedy, raw, mirrored, scorer, **grid)
        winner = greedy if greedy is not None and greedy.metrics["score"] > best_trial.metrics["score"] else best_trial
        best_single = max(raw, key=lambda k: (singles[k]["score"], k))
        for trial_id, candidate in per_trial.items():
            _write_split_result(out_dir / f"{trial_id}.json", candidate, split=split, image_ids=split.selection,
                                params=next(t.params for t in trials if t.trial_id == trial_id), name="selection")
        if greedy is not None:
            _write_split_result(out_dir / f"{GREEDY}.json", greedy, split=split, image_ids=split.selection, params={},
                                name="selection")

        final = None
        if split.test:
            # The only use of the test split: the chosen ensemble and the best single model, at the thresholds the
            # selection split chose.
            needed = {m.key: m for m in (*winner.spec.models, models[best_single])}
            test_preds, test_failures = _predict_on({"test": (tuple(needed.values()), first.num_classes)},
                                                    ids=split.test, config=config, hflip=winner.spec.hflip_tta)
            if test_failures:
                raise EnsembleError(f"the test-split predictions failed: {test_failures['test']}")
            test_plain, test_mirrored = test_preds["test"]
            test_raw = dict(zip(needed, test_plain))
            test_raw_mirrored = dict(zip(needed, test_mirrored)) if test_mirrored else {}
            test_records = index.records(split.test)
            test_scorer = _Scorer(targets=_targets(index, split.test),
                                  sizes=[(r.height, r.width) for r in test_records],
                                  class_names=first.class_names, iou_thr=winner.spec.iou_thr,
                                  skip_box_thr=winner.spec.skip_box_thr, conf_type=winner.spec.conf_type)
            members, weights = fusion_members(
                [test_raw[m.key] for m in winner.spec.models],
                [test_raw_mirrored[m.key] for m in winner.spec.models] if test_mirrored else None,
                winner.spec.weights, hflip_tta=winner.spec.hflip_tta)
            fused = test_scorer.fuse(members, weights)
            final = {
                "chosen": _Candidate(winner.spec, fused, test_scorer.metrics(fused, winner.spec.score_threshold)),
                "single": test_scorer.metrics(test_raw[best_single], singles[best_single]["score_threshold"]),
            }
            if ens.bootstrap_samples:
                from detection.bootstrap import paired_bootstrap

                # How far the two test figures and their difference can be trusted on this many images.
                final["bootstrap"] = paired_bootstrap(
                    fused, test_raw[best_single], test_scorer.targets, samples=ens.bootstrap_samples,
                    thresholds=(winner.spec.score_threshold, singles[best_single]["score_threshold"]),
                    seed=config.seed)
            _write_split_result(out_dir / "test.json", final["chosen"], split=split, image_ids=split.test, params={},
                                name="test")
        else:
            logger.warning("%s: the split holds no test images; the chosen ensemble has no test figures.", split_path)

        rows = _leaderboard_rows(trials, kept, per_trial, singles, failures, greedy=greedy, final=final,
                                 best_single=best_single, not_kept=not_kept)
        summary = _summary(winner, best_trial, greedy, final, best_single, singles)
        csv_path = _write_leaderboard(rows, experiment_dir, summary=summary)
        _write_best_ensemble(experiment_dir, winner, split_hash=split.hash,
                             test_metrics=final["chosen"].metrics if final else None,
                             test_bootstrap=final.get("bootstrap") if final else None,
                             single={"model": best_single, "selection": singles[best_single],
                                     "test": final["single"] if final else None})
        return csv_path


def _predict_on(jobs: Mapping[str, tuple[Sequence[EnsembleModel], int]], *, ids: Sequence[int],
                config: Any, hflip: bool = False) -> tuple[dict[str, _Views], dict[str, str]]:
    """Run `_predict_models` for every job (one Ray task each, at most `MAX_TASKS_IN_FLIGHT` at once) on the
    running Ray (`run_ensemble` holds one for both splits); returns `{job: ([model][image] predictions, the same
    on the mirrored images or None)}` and `{job: why it failed}`."""
    import ray

    ens = config.ensemble
    results: dict[str, _Views] = {}
    failures: dict[str, str] = {}
    if not jobs:
        return results, failures
    task = ray.remote(_predict_models)
    waiting = list(jobs.items())
    running: dict[Any, str] = {}
    while waiting or running:
        # The driver reads a job's model files just before its task starts, and keeps a bounded number
        # of tasks (and their models in the object store) in flight.
        while waiting and len(running) < MAX_TASKS_IN_FLIGHT:
            name, (models, num_classes) = waiting.pop(0)
            try:
                model_bytes = _read_model_files(models)
            except EnsembleError as error:
                failures[name] = str(error)
                logger.warning("%s is not ensembled: %s", name, error)
                continue
            # One task per trial, named so that the dashboard shows which trial each one is.
            ref = task.options(num_cpus=ens.cpus, num_gpus=ens.gpus, max_retries=1,
                               name=f"ensemble/{name}").remote(
                models, num_classes=num_classes, data_path=config.data.path, image_ids=list(ids),
                batch_size=config.train.eval_batch_size, model_bytes=model_bytes, hflip=hflip)
            running[ref] = name
        if not running:
            break
        (done,), _ = ray.wait(list(running), num_returns=1)
        name = running.pop(done)
        try:
            results[name] = ray.get(done)
        except ray.exceptions.RayError as error:  # one bad trial does not sink the job
            failures[name] = error_line(error)
            logger.warning("%s: the ensemble task failed: %s", name, failures[name])
    return results, failures


@contextlib.contextmanager
def _local_ray_if_needed(ens: Any, *, tasks: int) -> Iterator[None]:
    """The running Ray (the sweep's, a cluster's), or a local one started here and shut down on leaving; none
    for no tasks."""
    import ray

    if tasks == 0 or ray.is_initialized():
        yield
        return
    _init_local_ray(cpus=ens.cpus, gpus=ens.gpus, tasks=tasks)
    try:
        yield
    finally:
        ray.shutdown()


def _read_model_files(models: Sequence[EnsembleModel]) -> list[bytes]:
    """Model files read by the driver (the tasks may run on nodes without them)."""
    try:
        return [Path(m.path).read_bytes() for m in models]
    except OSError as error:
        trial = next((m.trial_id for m in models if m.path == error.filename), "?")
        raise EnsembleError(f"{error.filename}: cannot read a model file of trial {trial} "
                            f"({error.strerror}).") from error


def _init_local_ray(*, cpus: float, gpus: float, tasks: int) -> None:
    import ray

    cores = os.cpu_count() or 1
    # address="local": a new Ray of our own even when a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=max(cores, math.ceil(cpus)), include_dashboard=False, log_to_driver=True)
    have = ray.cluster_resources().get("GPU", 0.0)
    if gpus > have:
        ray.shutdown()
        raise ConfigError(f"`ensemble.gpus` = {gpus} per trial, but this machine has {have:g} GPUs; use "
                          "`ensemble.gpus: 0` on a CPU machine, or run the job on a cluster (`ray job submit`).")
    logger.info("ensemble job: %d prediction tasks of %g CPU / %g GPU on a local Ray", tasks, cpus, gpus)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)  # readers (status, report) never see half a file


def _write_split_result(path: Path, candidate: _Candidate, *, split: Split, image_ids: Sequence[int],
                        params: Mapping[str, Any], name: str) -> None:
    _write_json(path, {"name": candidate.spec.name, "split": name, "params": dict(params), "split_hash": split.hash,
                       "metrics": candidate.metrics, "ensemble": candidate.spec.to_json(),
                       "image_ids": list(image_ids),
                       "predictions": predictions_to_coco(candidate.preds, image_ids, candidate.spec.category_ids)})


def _metric_fields(metrics: Mapping[str, float] | None) -> dict[str, float | None]:
    return {m: (float(metrics[m]) if metrics else None) for m in ENSEMBLE_METRICS}


def _leaderboard_rows(trials: Sequence[TrialResult], kept: Mapping[str, _TrialModels],
                      per_trial: Mapping[str, _Candidate], singles: Mapping[str, Mapping[str, float]],
                      failures: Mapping[str, str], *, greedy: _Candidate | None,
                      final: Mapping[str, Any] | None, best_single: str | None = None,
                      not_kept: Collection[str] = ()) -> list[LeaderboardRow]:
    rows = []
    for info in trials:
        candidate = per_trial.get(info.trial_id)
        if candidate:
            status, error = "ensembled", None
        elif info.trial_id in failures:
            status = "models not kept" if info.trial_id in not_kept else "ensemble failed"
            error = failures[info.trial_id]
        elif info.status == "TERMINATED":
            status, error = ("infeasible", info.infeasible) if info.infeasible else ("no checkpoint", None)
        else:
            status, error = info.status, info.infeasible or info.error
        params = info.params
        trial_models = kept.get(info.trial_id)
        own = [m.key for m in trial_models.models] if trial_models and candidate else []
        single = max(own, key=lambda k: (singles[k]["score"], k)) if own else None
        rows.append(LeaderboardRow(
            rank=None, trial_id=info.trial_id, split="selection", status=status,
            detector=params.get("detector"), start=trial_models.start if trial_models else None,
            lr=finite_float(params.get("lr")),
            batch_size=int(params["batch_size"]) if params.get("batch_size") is not None else None,
            cv_score=info.cv_score, epochs=info.epochs, num_models=len(candidate.spec.models) if candidate else None,
            single_model=single,
            single_map_50=singles[single]["map_50"] if single else None,
            single_f1=singles[single]["f1"] if single else None,
            single_score=singles[single]["score"] if single else None,
            score_threshold=candidate.metrics["score_threshold"] if candidate else None,
            **_metric_fields(candidate.metrics if candidate else None),
            error=error,
        ))
    ranked = sorted((r for r in rows if r.status == "ensembled"), key=lambda r: (-(r.score or 0.0), r.trial_id))
    others = sorted((r for r in rows if r.status != "ensembled"), key=lambda r: r.trial_id)
    rows = [LeaderboardRow(**{**asdict(r), "rank": i}) for i, r in enumerate(ranked, start=1)] + others
    empty = {f: None for f in LEADERBOARD_COLUMNS}
    if greedy is not None:
        rows.append(LeaderboardRow(**{**empty, "trial_id": GREEDY, "split": "selection", "status": "greedy ensemble",
                                      "num_models": len(greedy.spec.models), "detector": _detectors(greedy.spec),
                                      "score_threshold": greedy.metrics["score_threshold"],
                                      **_metric_fields(greedy.metrics)}))
    if final is not None:
        chosen = final["chosen"]
        rows.append(LeaderboardRow(**{**empty, "trial_id": "chosen", "split": "test",
                                      "status": f"chosen ensemble ({chosen.spec.name}"
                                                + (", flip TTA)" if chosen.spec.hflip_tta else ")"),
                                      "num_models": len(chosen.spec.models), "detector": _detectors(chosen.spec),
                                      "score_threshold": chosen.spec.score_threshold,
                                      **_metric_fields(chosen.metrics)}))
        single = final["single"]
        rows.append(LeaderboardRow(**{**empty, "trial_id": "best single model", "split": "test",
                                      "status": f"best single model ({best_single})", "num_models": 1,
                                      "single_model": best_single, "score_threshold": single["score_threshold"],
                                      **_metric_fields(single)}))
    return rows


def _detectors(spec: EnsembleSpec) -> str:
    return "+".join(sorted({f"{m.arch}/{m.backbone}" for m in spec.models}))


def _summary(winner: _Candidate, best_trial: _Candidate, greedy: _Candidate | None, final: Mapping[str, Any] | None,
             best_single: str, singles: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f"Selection split: best trial ensemble {best_trial.spec.name} score {best_trial.metrics['score']:.4f}; "
             + (f"greedy ensemble ({len(greedy.spec.models)} models, weights {list(greedy.spec.weights)}) score "
                f"{greedy.metrics['score']:.4f}; " if greedy else "no greedy ensemble; ")
             + f"best single model {best_single} score {singles[best_single]['score']:.4f}. "
             + f"Chosen: {winner.spec.name} (WBF iou_thr {winner.spec.iou_thr}, conf_type {winner.spec.conf_type}"
             + (", flip TTA" if winner.spec.hflip_tta else "") + ")."]
    if final is not None:
        c, s = final["chosen"].metrics, final["single"]
        lines.append(f"Test split (scored once): chosen ensemble map_50 {c['map_50']:.4f}, f1 {c['f1']:.4f} "
                     f"(threshold {winner.spec.score_threshold:.3f}), map {c['map']:.4f}; best single model "
                     f"map_50 {s['map_50']:.4f}, f1 {s['f1']:.4f}.")
        if final.get("bootstrap"):
            lines.append(bootstrap_line(final["bootstrap"]))
    return "\n".join(lines)


def bootstrap_line(boot: Mapping[str, Any]) -> str:
    """The paired bootstrap's intervals as one sentence (leaderboard.md and the report)."""
    from detection.bootstrap import format_interval as fmt

    a, b, d, share = boot["a"], boot["b"], boot["difference"], boot["share_a_ge_b"]
    return (f"Paired bootstrap over the {boot['images']} test images ({boot['samples']} resamples, "
            f"{100 * boot['level']:.0f}% intervals): chosen ensemble map_50 {fmt(a['map_50'])}, f1 {fmt(a['f1'])}; "
            f"best single model map_50 {fmt(b['map_50'])}, f1 {fmt(b['f1'])}; chosen minus single map_50 "
            f"{fmt(d['map_50'])}, f1 {fmt(d['f1'])}, score {fmt(d['score'])}; the chosen ensemble scores at least "
            f"the single model's map_50 in {100 * share['map_50']:.0f}% of resamples, its score in "
            f"{100 * share['score']:.0f}%.")


def _write_leaderboard(rows: Sequence[LeaderboardRow], experiment_dir: Path, *, summary: str) -> Path:
    csv_path = experiment_dir / LEADERBOARD_CSV
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LEADERBOARD_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    tmp.replace(csv_path)
    md_path = experiment_dir / LEADERBOARD_MD
    md_tmp = md_path.with_suffix(".md.tmp")
    md_tmp.write_text(format_leaderboard(rows) + "\n\n" + summary + "\n")
    md_tmp.replace(md_path)
    return csv_path


def format_leaderboard(rows: Sequence[LeaderboardRow]) -> str:
    """A Markdown table: per trial its detector, start, params, CV score, its best single fold model and its
    fused models on the selection split (the gain of fusion); then the greedy ensemble, and the chosen ensemble
    and best single model on the test split. Errors of trials that were not ensembled follow."""
    head = ("rank", "trial", "split", "status", "detector", "start", "lr", "batch", "CV score", "best single model",
            "single map_50", "single f1", "models", "thr", *ENSEMBLE_METRICS)
    lines = [markdown_table(head, (
        (str(r.rank or "-"), r.trial_id, r.split, r.status, r.detector or "-", r.start or "-",
         format_or_dash(r.lr, ".2e"), format_or_dash(r.batch_size, "d"), format_or_dash(r.cv_score, ".4f"),
         r.single_model or "-", format_or_dash(r.single_map_50, ".4f"), format_or_dash(r.single_f1, ".4f"),
         format_or_dash(r.num_models, "d"), format_or_dash(r.score_threshold, ".3f"),
         *(format_or_dash(getattr(r, m), ".4f") for m in ENSEMBLE_METRICS)) for r in rows))]
    for r in rows:
        if r.error:
            lines.append(f"\n{r.trial_id} ({r.status}): {r.error}")
    return "\n".join(lines)


def _write_best_ensemble(experiment_dir: Path, winner: _Candidate, *, split_hash: str,
                         test_metrics: Mapping[str, Any] | None, single: Mapping[str, Any],
                         test_bootstrap: Mapping[str, Any] | None = None) -> Path:
    """Copy the chosen ensemble's model files to `best_ensemble/` and write `best_ensemble.json` pointing at them."""
    folder = experiment_dir / BEST_ENSEMBLE_DIR
    if folder.exists():
        shutil.rmtree(folder)  # an earlier run's winner
    folder.mkdir(parents=True)
    models = []
    for m in winner.spec.models:
        target = folder / f"{m.trial_id}-fold-{m.fold}.pt"
        shutil.copy2(m.path, target)
        models.append(EnsembleModel(**{**asdict(m), "path": str(target.resolve())}))
    copied = replace(winner.spec, models=tuple(models))
    path = experiment_dir / BEST_ENSEMBLE_JSON
    _write_json(path, {**copied.to_json(), "split_hash": split_hash, "selection_metrics": dict(winner.metrics),
                       "test_metrics": dict(test_metrics) if test_metrics is not None else None,
                       "best_single_model": dict(single),
                       # a: the chosen ensemble, b: the best single model (detection/bootstrap.py)
                       "test_bootstrap": dict(test_bootstrap) if test_bootstrap is not None else None,
                       "sources": sorted({str(Path(m.path).parent.parent) for m in winner.spec.models})})
    return path
