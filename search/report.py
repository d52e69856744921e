"""`detsweep report PATH`: one self-contained HTML page that says what won a sweep and why.

The page (`<experiment>/report.html`, every figure a base64 PNG data URI, no script, no external
file) has, in order:

1. the leaderboard (`leaderboard.csv` of the ensemble job): each trial's detector, the weights it started
   from, lr, batch size, its cross-validation score (fold mean of each fold's best epoch), its best single
   fold model and its fused models on the selection split side by side (the gain of fusion), then the
   greedy cross-trial ensemble, and the chosen ensemble and best single model on the test split;
2. Optuna's optimization history and parameter importances, from the study in `<experiment>/optuna.db`
   (`optuna.visualization.matplotlib`, `optuna.importance.get_param_importances`); with too few
   completed trials the page says so instead;
3. learning curves: per trial the fold-mean score per epoch with a +-std band and each fold's score,
   from the trials' Tune result files (`<experiment>/tune/<trial>/result.json`);
4. the chosen ensemble on the test split (scored once, never used for a choice): per-class AP,
   precision-recall curves, and a grid of test images with its boxes (magenta) against the ground truth
   (green);
5. reproducibility: the best trial's manifest (dataset and split hashes, seeds, package versions, git
   commit) and what differs from today, plus the commands to look further (TensorBoard,
   optuna-dashboard, predict, export-best).

Every section reads its own files; a missing input (e.g. no ensemble job yet) is said in its section,
so the page can be written for a sweep that is still running.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.formatting import html_table
from search.trial_results import TrialResult, read_trials

__all__ = ["REPORT_FILE", "build_report", "write_report"]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
_THUMB_SIZE = 420  # longest side of an image in the grid, pixels


# ------------------------------------------------------------------------------------------ inputs


def _number(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: expected JSON, but line {error.lineno} column {error.colno}: "
                         f"{error.msg}.") from error


# ------------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float):
    # A bare Figure (no pyplot): no global state, no GUI backend, safe inside a running sweep.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _data_uri(figure_or_png: Any) -> str:
    """`data:image/png;base64,...` of a matplotlib figure or of PNG bytes."""
    if isinstance(figure_or_png, bytes):
        png = figure_or_png
    else:
        buffer = io.BytesIO()
        figure_or_png.savefig(buffer, format="png")
        png = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(uri: str, alt: str, *, css: str = "") -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}"{f" class={css!r}" if css else ""}>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# ------------------------------------------------------------------------------------------ leaderboard


def _fmt(value: Any, spec: str) -> str:
    value = _number(value)
    return "&ndash;" if math.isnan(value) else format(value, spec)


def _text(value: Any) -> str:
    """A cell's text, escaped; a missing value is a dash (the entity itself, not escaped again)."""
    return html.escape(str(value)) if value not in (None, "") else "&ndash;"


def _leaderboard_rows(runs: Sequence[TrialResult], experiment_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(rows in rank order, the best trial id).

    After the ensemble job: `leaderboard.csv` as it wrote it (trials ranked by their fused selection-split
    score, then the greedy and the test-split rows) and the name of the chosen ensemble (`best_ensemble.json`:
    a trial id or `greedy`). Before it: every trial ranked by its cross-validation score, and no best.
    """
    from search.ensemble import BEST_ENSEMBLE_JSON, LEADERBOARD_CSV

    board = experiment_dir / LEADERBOARD_CSV
    if board.is_file():
        with board.open(newline="") as handle:
            rows = [{k: (None if v == "" else v) for k, v in row.items()} for row in csv.DictReader(handle)]
        best_file = experiment_dir / BEST_ENSEMBLE_JSON
        best = str(_read_json(best_file)["name"]) if best_file.is_file() else None
        return rows, best
    rows = []
    for run in runs:
        rows.append({
            "rank": None, "trial_id": run.trial_id, "split": "selection", "status": "not ensembled",
            "detector": run.params.get("detector"), "lr": run.params.get("lr"),
            "batch_size": run.params.get("batch_size"), "cv_score": run.cv_score, "epochs": run.epochs,
        })
    rows.sort(key=lambda r: (r["cv_score"] is None, -(r["cv_score"] or 0.0), r["trial_id"]))
    return rows, None


def _section_leaderboard(rows: list[dict[str, Any]], best: str | None) -> str:
    if not rows:
        return _note("No trial has reported yet.")
    head = ("rank", "trial", "split", "arch/backbone", "start", "lr", "batch", "epochs", "CV score",
            "best single model", "single map_50", "single f1", "models", "thr", "map", "map_50", "f1", "score",
            "status")
    body = [(_fmt(r.get("rank"), ".0f"), f"<code>{html.escape(str(r['trial_id']))}</code>",
             html.escape(str(r.get("split") or "")), _text(r.get("detector")), _text(r.get("start")),
             _fmt(r.get("lr"), ".2e"), _fmt(r.get("batch_size"), ".0f"), _text(r.get("epochs") or None),
             _fmt(r.get("cv_score"), ".4f"), f"<code>{_text(r.get('single_model'))}</code>",
             _fmt(r.get("single_map_50"), ".4f"), _fmt(r.get("single_f1"), ".4f"), _fmt(r.get("num_models"), ".0f"),
             _fmt(r.get("score_threshold"), ".3f"), *(_fmt(r.get(m), ".4f") for m in ("map", "map_50", "f1", "score")),
             html.escape(str(r.get("status") or ""))) for r in rows]
    # The chosen ensemble's row and its test-split row are highlighted.
    chosen = ["best" if r["trial_id"] == best or (r.get("trial_id") == "chosen" and best is not None) else None
              for r in rows]
    note = ("Trials are ranked by their fold models fused with WBF on the selection split (score = 0.5 &middot; "
            "map_50 + 0.5 &middot; f1, f1 at the threshold that is best on those selection predictions), beside "
            "their best single fold model on the same images: the gain of fusion. CV score: the fold mean of each "
            "fold's best-epoch validation score, what the search was told. The greedy row is the cross-trial "
            "ensemble; the winner on the selection split is the only ensemble scored on the test split "
            "(highlighted), beside the best single model, at the thresholds the selection split chose.")
    return html_table(head, body, table_class="board", row_classes=chosen) + f'<p class="note">{note}</p>'


# ------------------------------------------------------------------------------------------ optuna


def _load_study(experiment_dir: Path):
    import optuna

    from search.tuner import OPTUNA_DB, optuna_storage_url

    if not (experiment_dir / OPTUNA_DB).is_file():
        return None, f"No Optuna study: {experiment_dir / OPTUNA_DB} does not exist."
    storage = optuna.storages.RDBStorage(optuna_storage_url(experiment_dir))
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if not summaries:
        return None, f"{experiment_dir / OPTUNA_DB} holds no study."
    # The driver names the study after the experiment folder; else take the one with most trials.
    named = [s for s in summaries if s.study_name == experiment_dir.name]
    summary = named[0] if named else max(summaries, key=lambda s: s.n_trials)
    return optuna.load_study(study_name=summary.study_name, storage=storage), None


def _section_optuna(experiment_dir: Path) -> str:
    import optuna
    from optuna.trial import TrialState

    study, problem = _load_study(experiment_dir)
    if study is None:
        return _note(problem)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    parts = [f"<p>Study <code>{html.escape(study.study_name)}</code> ({study.direction.name.lower()}): "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". Open it with "
             f"<code>optuna-dashboard sqlite:///{html.escape(str(experiment_dir / 'optuna.db'))}</code>.</p>"]
    if not complete:
        parts.append(_note("No completed Optuna trial yet: no optimization history."))
        return "".join(parts)
    from optuna.visualization import matplotlib as optuna_mpl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # The study's own metric name (the sweep's `search.metric`, e.g. cv_score), as the dashboard shows it.
        target = (study.metric_names or ["value"])[0]
        axes = optuna_mpl.plot_optimization_history(study, target_name=target)
        parts.append(_img(_data_uri(_close(axes)), "Optuna optimization history", css="half"))
        try:
            # Seeded fANOVA: the same study gives the same importances in the table and the plot.
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as error:
            # Optuna's own reasons: "only a single trial", "zero total variance" (all scores equal), ...
            parts.append(_note(f"Parameter importances are not available with {len(complete)} completed trial(s): "
                               f"{error} They need at least 2 completed trials with different scores."))
        else:
            if importances:
                axes = optuna_mpl.plot_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
                parts.append(_img(_data_uri(_close(axes)), "Optuna parameter importances", css="half"))
                parts.append(html_table(("parameter", "importance (fANOVA)"),
                                        [(html.escape(name), f"{value:.3f}") for name, value in importances.items()]))
            else:
                parts.append(_note("Parameter importances are empty: no parameter was sampled in every "
                                   "completed trial."))
    return "".join(parts)


def _close(axes: Any):
    """The figure of Optuna's matplotlib Axes (or array of Axes), detached from pyplot so it is freed."""
    import matplotlib.pyplot as plt

    axes = np.asarray(axes, dtype=object).reshape(-1)[0]
    figure = axes.figure
    figure.set_size_inches(6.4, 4.0)
    figure.set_layout_engine("constrained")
    plt.close(figure)
    return figure


# ------------------------------------------------------------------------------------------ learning curves


def _section_curves(runs: Sequence[TrialResult], order: Sequence[str], *, max_trials: int) -> str:
    runs = [r for r in runs if r.rows]
    if not runs:
        return _note("No trial has reported an epoch yet.")
    rank = {trial_id: i for i, trial_id in enumerate(order)}
    runs = sorted(runs, key=lambda r: (rank.get(r.trial_id, len(rank)), r.trial_id))
    shown = runs[:max_trials]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    figure = _figure(3.6 * cols, 2.8 * rows)
    axes = np.asarray(figure.subplots(rows, cols, squeeze=False, sharey=True)).reshape(-1)
    for ax, run in zip(axes, shown):
        epochs = run.series("training_iteration").astype(np.int64)  # Tune sets it on every report
        mean, std = run.series("score_mean"), run.series("score_std")
        for k in range(run.num_folds):
            ax.plot(epochs, run.series(f"fold{k}/score"), lw=1.0, ls="--", color=f"C{k + 1}", label=f"fold {k}")
        ax.fill_between(epochs, mean - np.nan_to_num(std), mean + np.nan_to_num(std), color="C0", alpha=0.25,
                        label="mean ± std")
        ax.plot(epochs, mean, "o-", color="C0", lw=1.8, ms=3, label="fold mean")
        ax.set_title(f"{run.trial_id}  {run.params.get('detector', '')}\n"
                     f"lr {_number(run.params.get('lr')):.1e}, batch {run.params.get('batch_size')}, "
                     f"thr {_number(run.params.get('score_threshold')):.2f}", fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_xticks(epochs if len(epochs) <= 10 else np.linspace(epochs[0], epochs[-1], 6).round())
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (0.5 map_50 + 0.5 f1)", fontsize=8)
    axes[0].legend(fontsize=7, loc="best")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    note = "" if len(runs) <= max_trials else _note(f"Showing the {max_trials} best of {len(runs)} trials.")
    return _img(_data_uri(figure), "learning curves: score per epoch, fold mean with a std band") + note


# ------------------------------------------------------------------------------------------ ensemble


@dataclass
class _SplitResult:
    class_names: tuple[str, ...]
    records: list[Any]  # detection.data.coco.ImageRecord, in prediction order
    preds: list[dict[str, Any]]  # boxes float32 [N, 4] xyxy absolute, scores [N], labels int64 [N] in 1..C
    targets: list[dict[str, Any]]  # boxes [M, 4] xyxy absolute, labels [M], iscrowd [M]
    score_threshold: float


def _load_split_result(experiment_dir: Path, name: str) -> _SplitResult:
    """Fused predictions the ensemble job saved (`ensemble/<name>.json`: a trial's on the selection split, or
    `test`, the chosen ensemble's on the test split) with their ground truth."""
    import torch

    from detection.data.coco import load_dataset
    from search.ensemble import ENSEMBLE_DIR
    from search.ensemble_models import predictions_from_coco
    from search.tuner import load_experiment

    config = load_experiment(experiment_dir)
    index = load_dataset(config.data.path, filter_empty=False)
    path = experiment_dir / ENSEMBLE_DIR / f"{name}.json"
    result = _read_json(path)
    spec = result["ensemble"]
    if list(spec["category_ids"]) != list(index.category_ids):
        raise ValueError(f"{path}: category ids {spec['category_ids']} differ from the dataset's "
                         f"{list(index.category_ids)} ({config.data.path}); expected the sweep's own dataset.")
    image_ids = [int(i) for i in result["image_ids"]]
    preds = predictions_from_coco(result["predictions"], image_ids, spec["category_ids"])
    records = index.records(image_ids)
    targets = [{"boxes": torch.as_tensor(r.boxes).reshape(-1, 4), "labels": torch.as_tensor(r.labels),
                "iscrowd": torch.as_tensor(r.iscrowd)} for r in records]
    return _SplitResult(class_names=tuple(index.class_names), records=records, preds=preds, targets=targets,
                    score_threshold=float(spec["score_threshold"]))


def _section_per_class(shown: _SplitResult) -> str:
    from detection.metrics import mean_average_precision, precision_recall_curve

    ap = mean_average_precision(shown.preds, shown.targets, class_names=shown.class_names)
    gt_counts = {name: 0 for name in shown.class_names}
    for target in shown.targets:
        for label in target["labels"].tolist():
            gt_counts[shown.class_names[label - 1]] += 1
    table = html_table(("class", "boxes", "AP@[.5:.95]", "AP@0.5"),
                       [(html.escape(name), str(gt_counts[name]), f"{ap[f'ap/{name}']:.4f}",
                         f"{ap[f'ap_50/{name}']:.4f}") for name in shown.class_names],
                       footer=("all", str(sum(gt_counts.values())), f"{ap['map']:.4f}", f"{ap['map_50']:.4f}"))

    figure = _figure(5.2, 4.0)
    ax = figure.subplots()
    curves = [(None, "all classes")] + [(label, name) for label, name in enumerate(shown.class_names, start=1)]
    for i, (label, name) in enumerate(curves):
        precision, recall, thresholds = precision_recall_curve(shown.preds, shown.targets, label=label)
        if len(precision) == 0:
            continue
        style = dict(lw=2.2, color="black") if label is None else dict(lw=1.2, color=f"C{i}")
        ax.plot(recall, precision, label=f"{name} ({gt_counts.get(name, sum(gt_counts.values()))} gt)", **style)
        if label is None:  # the operating point: the trial's score threshold
            at = np.flatnonzero(thresholds >= shown.score_threshold)
            if len(at):
                ax.plot(recall[at[-1]], precision[at[-1]], "o", color="black", ms=6,
                        label=f"score ≥ {shown.score_threshold:.2f}")
    ax.set_xlabel("recall (IoU 0.5)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "the ensemble predicted no boxes", ha="center", va="center", transform=ax.transAxes)
    return ('<div class="row">' + table + _img(_data_uri(figure), "precision-recall curves of the best ensemble",
                                               css="half") + "</div>")


def _section_images(shown: _SplitResult, *, max_images: int) -> str:
    from PIL import Image

    from detection.data.coco import read_image
    from detection.drawing import draw_detections

    if not shown.records:
        return _note("The split is empty: no images to show.")
    # The images with the most ground truth first: where a reader sees the ensemble work hardest.
    order = sorted(range(len(shown.records)), key=lambda i: (-len(shown.records[i].boxes), i))[:max_images]
    cells = []
    with tempfile.TemporaryDirectory(prefix="detsweep-report-") as tmp:
        for i in order:
            record, pred, target = shown.records[i], shown.preds[i], shown.targets[i]
            drawn = draw_detections(read_image(record), pred, target, class_names=shown.class_names,
                                    score_threshold=shown.score_threshold, out_path=Path(tmp) / f"{i}.png")
            with Image.open(drawn) as image:
                image.thumbnail((_THUMB_SIZE, _THUMB_SIZE))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", optimize=True)
            kept = int((pred["scores"] >= shown.score_threshold).sum())
            caption = f"{record.path.name}: {len(record.boxes)} ground truth, {kept} predicted"
            cells.append(f"<figure>{_img(_data_uri(buffer.getvalue()), caption)}"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    legend = ('<p class="note"><span class="gt">green</span>: ground truth; <span class="pred">magenta</span>: '
              f"the ensemble's boxes with score &ge; {shown.score_threshold:.2f} (the threshold chosen on the selection split).</p>")
    more = "" if len(shown.records) <= max_images else _note(
        f"Showing {max_images} of {len(shown.records)} images (most ground-truth boxes first).")
    return legend + f'<div class="grid">{"".join(cells)}</div>' + more


# ------------------------------------------------------------------------------------------ reproducibility


def _section_reproducibility(experiment_dir: Path, best_run: TrialResult | None,
                             fetch: Callable[[Path], Any] | None = None) -> str:
    from search.reproducibility import check_manifest, read_trial_manifest

    commands = [
        f"tensorboard --logdir {experiment_dir / 'tune'}",
        f"optuna-dashboard sqlite:///{experiment_dir / 'optuna.db'}",
        f"detsweep predict --ensemble {experiment_dir / 'best_ensemble.json'} IMAGES... --out preds.json --draw drawn/",
        f"detsweep export-best {experiment_dir} --out best.yaml && detsweep train --config best.yaml --all-data",
    ]
    parts = ["<pre>" + html.escape("\n".join(commands)) + "</pre>"]
    if best_run is None:
        parts.append(_note("No best trial yet: the ensemble job picks it; its manifest is shown here then."))
        return "".join(parts)
    if fetch is not None and best_run.checkpoint is not None:
        fetch(Path(best_run.checkpoint))  # a URI's mirror holds no checkpoints: bring this one
    manifest = read_trial_manifest(best_run.checkpoint)
    if manifest is None:
        parts.append(_note("The best trial has no manifest.json in its checkpoint."))
        return "".join(parts)
    rows = [
        *((name, f"{html.escape(manifest[name]['path'])}<br><code>sha256 {manifest[name]['sha256']}</code>")
          for name in ("dataset", "split")),
        ("seeds", f"<code>{html.escape(json.dumps(manifest.get('seeds', {})))}</code>"),
        ("git commit", f"<code>{html.escape(str(manifest.get('git', {}).get('commit')))}</code>"
                       + (" (uncommitted changes)" if manifest.get("git", {}).get("dirty") else "")),
        ("packages", ", ".join(f"{html.escape(k)} {html.escape(str(v))}"
                               for k, v in manifest.get("packages", {}).items())),
        ("written", html.escape(str(manifest.get("created")))),
    ]
    parts.append(html_table(None, rows, header_column=True))
    drift = check_manifest(manifest)
    parts.append(_note("A rerun today starts from the same data, split, packages and commit.") if not drift else
                 '<p class="warn">Differs from today:</p><ul>' + "".join(f"<li>{html.escape(d)}</li>" for d in drift)
                 + "</ul>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ page


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1500px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:nth-child(2), td:nth-child(3) { text-align: left; }
tr.best td { background: #fff3c4; font-weight: 600; }
img { max-width: 100%; height: auto; } img.half { max-width: 48%; vertical-align: top; margin-right: 1%; }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; overflow-wrap: anywhere; }
.note { color: #555; font-size: 13px; } .warn { color: #a40000; font-weight: 600; }
.gt { color: #008a00; font-weight: 600; } .pred { color: #c000c0; font-weight: 600; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; } code { font-size: 12px; }
"""


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _guarded(title: str, builder, *args, **kwargs) -> str:
    """A section whose input files are missing says so; other errors propagate (they are bugs)."""
    try:
        return builder(*args, **kwargs)
    except FileNotFoundError as error:
        return _note(f"{title}: not available yet ({error}).")


def build_report(experiment_dir: str | Path, *, max_images: int = 8, max_curves: int = 24,
                 fetch: Callable[[Path], Any] | None = None) -> str:
    """The report page of an experiment folder as an HTML string (see the module docstring)."""
    from search.tuner import TUNE_DIR, load_experiment

    experiment_dir = Path(experiment_dir).resolve()
    config = load_experiment(experiment_dir)  # ConfigError when this is not an experiment folder
    runs = read_trials(experiment_dir / TUNE_DIR)
    rows, best = _leaderboard_rows(runs, experiment_dir)
    # The trial of the chosen ensemble's first model (a greedy ensemble may mix trials).
    best_file = experiment_dir / "best_ensemble.json"
    first_trial = _read_json(best_file)["models"][0]["trial_id"] if best_file.is_file() else None
    best_run = next((r for r in runs if r.trial_id == first_trial), None)

    sections = [
        _section("Leaderboard", "leaderboard", _section_leaderboard(rows, best)),
        _section("Optuna: optimization history and parameter importances", "optuna",
                 _guarded("Optuna", _section_optuna, experiment_dir)),
        _section("Learning curves", "curves",
                 _section_curves(runs, [r["trial_id"] for r in rows], max_trials=max_curves)),
    ]
    has_ensemble = best is not None and (experiment_dir / "ensemble" / "test.json").is_file()
    if has_ensemble:
        shown = _load_split_result(experiment_dir, "test")
        sections += [
            _section(f"Chosen ensemble ({best}) on the test split: per-class AP and precision-recall", "per-class",
                     _section_per_class(shown)),
            _section("Test images: ensemble boxes against ground truth", "images",
                     _section_images(shown, max_images=max_images)),
        ]
    else:
        sections.append(_section("Best ensemble", "per-class", _note(
            f"No ensemble results yet: run `detsweep ensemble {experiment_dir}`.")))
    sections.append(_section("Reproducibility and next steps", "reproducibility",
                             _section_reproducibility(experiment_dir, best_run, fetch)))

    summary = (f"{len(runs)} trials of {config.search.num_samples}, {config.data.num_folds} folds, "
               f"{config.train.epochs} epochs at {config.train.image_size} px; metric "
               f"<code>{html.escape(config.search.metric)}</code> ({config.search.mode}). Data: "
               f"<code>{html.escape(config.data.path)}</code>.")
    if best is not None:
        top = next((r for r in rows if r["trial_id"] == "chosen"), None)
        if top is not None:
            summary += (f" <b>Chosen ensemble: <code>{html.escape(best)}</code> "
                        f"({html.escape(str(top.get('detector')))}, {_fmt(top.get('num_models'), '.0f')} models); on "
                        f"the test split map_50 {_fmt(top.get('map_50'), '.4f')}, f1 {_fmt(top.get('f1'), '.4f')}, "
                        f"score {_fmt(top.get('score'), '.4f')}.</b>")
        boot = _read_json(best_file).get("test_bootstrap") if best_file.is_file() else None
        if boot:
            from search.ensemble import bootstrap_line

            summary += " " + html.escape(bootstrap_line(boot))
    written = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    title = f"detsweep report: {experiment_dir.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{summary}</p><p class=\"note\">{html.escape(str(experiment_dir))}, "
            f"written {written}.</p>" + "".join(sections) + "</body></html>\n")


def write_report(experiment_dir: str | Path, *, out: str | Path | None = None, max_images: int = 8,
                 max_curves: int = 24, fetch: Callable[[Path], Any] | None = None) -> Path:
    """Write the report page of an experiment folder; returns its path (default `<experiment>/report.html`).

    Raises:
        detection.config.ConfigError: when `experiment_dir` is not a detsweep experiment folder.
    """
    experiment_dir = Path(experiment_dir).resolve()
    page = build_report(experiment_dir, max_images=max_images, max_curves=max_curves, fetch=fetch)
    path = Path(out) if out is not None else experiment_dir / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
