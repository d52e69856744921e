"""`detsweep`: the command line.

    detsweep sweep  [--config X.yaml] [--address auto] [--storage PATH_OR_URI] [--name NAME] [--smoke-test]
    detsweep resume PATH [--retry-errored]
    detsweep status PATH
    detsweep report PATH
    detsweep predict --ensemble PATH/best_ensemble.json INPUT... --out preds.json [--draw DIR]
    detsweep export-best PATH --out best.yaml
    detsweep train --config X.yaml [--fold K] [--all-data]
    detsweep data deepforest --out DIR
    detsweep data check PATH [--config X.yaml]
    detsweep ensemble PATH [--trial ID ...] [--address auto]

PATH is an experiment folder or URI (`s3://bucket/prefix/<name>`, see search/storage.py: a URI's files are
pulled into a local mirror, worked on there, and the driver's outputs pushed back).

Each command is a small `cmd_<name>(args) -> int`; Ray and Optuna are imported inside the commands that
use them, so commands without Ray (`train`) work on a machine that has torch but no Ray. Bad configs and
datasets are reported as one line naming the file and key (exit status 2), before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detection.config import ConfigError

__all__ = ["DEMO_CONFIG", "build_parser", "cmd_ensemble", "cmd_resume", "cmd_status", "cmd_sweep", "main"]

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # the embedded default

logger = logging.getLogger("detsweep")


# ------------------------------------------------------------------------------------------ commands


def cmd_sweep(args: argparse.Namespace) -> int:
    """Validate the config, write the experiment folder, run the Tuner, then the ensemble job."""
    from search.config import load_sweep_config
    from search.tuner import build_tuner, init_ray, new_experiment_dir, prepare_experiment

    config = load_sweep_config(args.config)
    if args.smoke_test:
        config = config.smoke_test().validate(str(args.config))
    experiment = new_experiment_dir(config, storage=args.storage, name=args.name)
    prepare_experiment(config, experiment_dir=experiment.local)
    experiment.push()
    _say(f"experiment: {experiment}\n  watch:  detsweep status {experiment}\n  resume: detsweep resume {experiment}")

    init_ray(config, address=args.address, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host)
    tuner = build_tuner(config, experiment_dir=experiment.local, remote=experiment.uri)
    return _finish(tuner, experiment, config=config, ensemble=not args.no_ensemble)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a killed or failed sweep from its experiment folder, then run the ensemble job."""
    from search.tuner import init_ray, load_experiment, restore_tuner

    experiment = _open(args.path, exclude=("tune",))  # Tune reads its own state from the URI
    config = load_experiment(experiment.local)
    _check_images(config, experiment.local)  # data fixed since the sweep stopped? (cached: cheap)
    init_ray(config, address=args.address, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host)
    tuner = restore_tuner(experiment.local, remote=experiment.uri, retry_errored=args.retry_errored)
    return _finish(tuner, experiment, config=config, ensemble=not args.no_ensemble)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the leaderboard so far of a running or finished sweep (reads files only; starts no Ray)."""
    from search.tuner import format_status, load_experiment, sweep_status

    experiment = _open(args.path, exclude=("checkpoint_*",))  # results and trial states only
    config = load_experiment(experiment.local, validate=False)
    rows = sweep_status(experiment.local)
    _say(f"{experiment} (metric {config.search.metric}, {config.train.epochs} epochs, "
         f"{config.data.num_folds} folds)\n" + format_status(rows, num_samples=config.search.num_samples))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Run the final ensemble job on a sweep's folder and print the leaderboard (see search/ensemble.py)."""
    import ray

    from search.ensemble import run_ensemble
    from search.ensemble_models import EnsembleError
    from search.tuner import load_experiment

    experiment = _open(args.path)
    load_experiment(experiment.local)  # a folder that is not a sweep's is reported before Ray starts
    if args.address:
        ray.init(address=args.address, log_to_driver=True)
    try:
        leaderboard = run_ensemble(experiment.local, trial_ids=args.trial)
    except EnsembleError as error:
        print(f"detsweep ensemble: error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.address:
            ray.shutdown()
    experiment.push()
    _say(leaderboard.with_suffix(".md").read_text() + f"\nleaderboard: {leaderboard}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one fold (or all labelled data) in-process, without Ray; a sweep YAML's base config works too."""
    from detection.config import read_yaml
    from detection.train import run_config

    if "search" in read_yaml(args.config):  # a sweep YAML: train its base config
        from search.config import load_sweep_config

        config = load_sweep_config(args.config).base
    else:
        from detection.config import load_experiment_config

        config = load_experiment_config(args.config)
    return run_config(config, args)


def _check_images(config, experiment_dir: Path) -> None:
    """Check the images of an experiment's split again before Ray starts (`DatasetError` lists the bad ones)."""
    from detection.data.coco import load_dataset
    from detection.data.splits import Split
    from detection.data.verify import bad_images_error, default_cache_path, verify_images
    from search.tuner import SPLIT_JSON

    index = load_dataset(config.data.path, filter_empty=False)
    excluded = {image_id for image_id, _, _ in Split.from_json(experiment_dir / SPLIT_JSON).excluded}
    report = verify_images([r for r in index.images if r.image_id not in excluded], mode=config.data.verify,
                           cache_path=default_cache_path(index.root, experiment_dir))
    if report.bad:
        raise bad_images_error(report, dataset=config.data.path)


def cmd_data(args: argparse.Namespace) -> int:
    """Write a bundled real dataset as a Roboflow-style COCO export, or check one (`data check PATH`)."""
    from detection.data.coco import load_dataset
    from detection.data.deepforest import write_deepforest_coco

    if args.dataset == "check":
        return _cmd_data_check(args)
    if args.out is None:
        raise ConfigError("`detsweep data deepforest` needs `--out DIR`, the folder to write.")
    root = write_deepforest_coco(args.out, tile_size=args.tile_size, seed=args.seed)
    _say(f"wrote {root}\n{load_dataset(root).summary()}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    """`detsweep data check PATH [--config X]`: the sweep's data check alone (no Ray): the load summary, every
    bad file, and `data.num_folds` against the images left for the folds. Exit status 2 on what would stop a
    sweep (bad files under `data.on_bad_image: error`, too many folds), else 0."""
    import dataclasses

    from detection.config import DataConfig, read_yaml
    from detection.data.coco import load_dataset
    from detection.data.verify import (
        bad_images_error,
        check_fold_count,
        default_cache_path,
        format_summary,
        summarize,
        verify_images,
    )

    data = DataConfig(path="")
    if args.config is not None:
        if "search" in read_yaml(args.config):
            from search.config import load_sweep_config

            data = load_sweep_config(args.config, check_data=args.path is None).data
        else:
            from detection.config import load_experiment_config

            data = load_experiment_config(args.config).data
    if args.path is not None:
        data = dataclasses.replace(data, path=str(args.path))
    if not data.path:
        raise ConfigError("`detsweep data check` needs PATH (a COCO .json or Roboflow folder) or `--config X.yaml`.")
    index = load_dataset(data.path, filter_empty=False)
    report = verify_images(index.images, mode=data.verify, cache_path=default_cache_path(index.root))
    _say(format_summary(summarize(index, report, path=data.path)))
    if report.bad and data.on_bad_image == "error":
        raise bad_images_error(report, dataset=data.path)
    for bad in report.bad:
        _say(f"  left out (data.on_bad_image: skip): {bad.describe()}")
    pool = check_fold_count(index, num_folds=data.num_folds, selection_fraction=data.selection_fraction,
                            test_fraction=data.test_fraction, exclude=report.excluded,
                            where=str(args.config or data.path))
    _say(f"{pool} images for {data.num_folds} folds: a sweep can start.")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the experiment's self-contained HTML report (leaderboard, Optuna, curves, best ensemble)."""
    from search.report import write_report

    # The page needs one checkpoint (the best trial's manifest): fetched on its own, not every trial's mirrored.
    experiment = _open(args.path, exclude=("checkpoint_*",))
    report = write_report(experiment.local, out=args.out, max_images=args.max_images, fetch=experiment.fetch)
    experiment.push()
    _say(f"report: {report}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Run the best ensemble on images; unreadable images are reported on stderr and skipped."""
    from search.ensemble_models import EnsembleError
    from search.predict import PredictError, predict_images

    try:
        summary = predict_images(args.ensemble, args.inputs, out=args.out, draw_dir=args.draw, device=args.device,
                                 batch_size=args.batch_size, score_threshold=args.score_threshold)
    except (PredictError, EnsembleError) as error:
        print(f"detsweep predict: error: {error}", file=sys.stderr)
        return 2
    _say(f"{summary.num_images} images, {summary.num_detections} boxes (score >= {summary.score_threshold:.3g}) "
         f"-> {summary.out}, images in {summary.images}"
         + (f"; drawn to {args.draw}" if args.draw else "")
         + (f"; {len(summary.skipped)} unreadable image(s) skipped" if summary.skipped else ""))
    return 0 if summary.num_images else 1


def cmd_export_best(args: argparse.Namespace) -> int:
    """Write the best trial's full training config as a training YAML."""
    from search.export import export_best_config

    out = export_best_config(_open(args.path, exclude=("checkpoint_*",)).local, args.out)  # reads no checkpoint
    _say(f"wrote {out}; retrain on every labelled image with: detsweep train --config {out} --all-data")
    return 0


def _open(path: str, *, exclude: tuple[str, ...] = ("folds",)):
    """The experiment at a folder or URI; a URI's files (but `exclude`d ones) are pulled into its mirror."""
    from search.storage import Experiment

    experiment = Experiment.at(path)
    try:
        experiment.pull(exclude=exclude)
    except (OSError, ValueError) as error:  # pyarrow: unknown scheme, no such bucket, no access
        raise ConfigError(f"{path}: cannot read the experiment ({error}).") from error
    return experiment


def _finish(tuner, experiment, *, config, ensemble: bool) -> int:
    """Run the Tuner, export optuna.db, run the ensemble job, print the leaderboard, write the report.
    `experiment` is a `search.storage.Experiment`: with a URI, Tune's results are pulled into the local
    mirror first and the driver's outputs pushed back at the end."""
    import ray

    from search.failures import take_stop
    from search.tuner import format_status, sweep_status, write_optuna_db

    experiment_dir = experiment.local
    try:
        take_stop()  # nothing stale from an earlier Tuner in this process
        results = tuner.fit()
        stop = take_stop()  # search.failures.FailurePolicy stopped the sweep (bad data in a fold)
        # The ensemble job reads the trials' best models; without it, results and trial states suffice.
        experiment.pull(exclude=("folds",) if ensemble else ("checkpoint_*",))
        rows = sweep_status(experiment_dir)
        _say("\n" + format_status(rows, num_samples=config.search.num_samples))
        unfinished = [r for r in rows if r.status not in ("TERMINATED", "ERROR")]
        write_optuna_db(experiment_dir, sweep_over=not unfinished)
        if stop is not None:
            from detection.data.coco import DatasetError

            raise DatasetError(f"{stop['message']}\nThe sweep stopped (trial {stop['trial_id']}; no retry, no further "
                               f"trials); fix the data, then continue with `detsweep resume {experiment}`.")
        if unfinished:  # Ctrl-C: Tune saved the state and returned
            _say(f"sweep interrupted with {len(unfinished)} trials unfinished; continue it with "
                 f"`detsweep resume {experiment}`")
            return 130
        if not any(r.status == "TERMINATED" and r.epochs > 0 for r in rows):
            _say(f"no trial finished ({results.num_errors} errored); see {experiment}/tune/*/error.txt")
            return 1
        if ensemble:
            from search.ensemble import run_ensemble

            leaderboard = Path(run_ensemble(experiment_dir))
            md = leaderboard.with_suffix(".md")
            _say("\n" + (md if md.is_file() else leaderboard).read_text())
            _write_report(experiment_dir)
    finally:
        ray.shutdown()
        _push(experiment)
    _say(f"experiment: {experiment}")
    return 0


def _push(experiment) -> None:
    """Upload the driver's files of a URI experiment; a failed upload is reported, not raised over the
    sweep's own outcome (the files stay in the local mirror: `detsweep report <uri>` pushes them again)."""
    try:
        experiment.push()
    except OSError:
        logger.exception("Uploading %s to %s failed; the files are in %s.", experiment.local, experiment.uri,
                         experiment.local)


def _write_report(experiment_dir: Path) -> None:
    """The HTML report (search/report.py); a failure here must not fail a finished sweep."""
    from search.report import write_report

    try:
        _say(f"report: {write_report(experiment_dir)}")
    except Exception:  # noqa: BLE001 - the sweep's results are all on disk; the report can be redone
        logger.exception("The report failed; write it again with `detsweep report %s`.", experiment_dir)


def _say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------- parser


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster address ('auto' under `ray job submit`); default: an embedded local Ray")
    parser.add_argument("--dashboard-host", default="127.0.0.1",
                        help="interface the local Ray dashboard binds (default 127.0.0.1: this machine only)")
    parser.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    parser.add_argument("--no-ensemble", action="store_true", help="skip the final ensemble job and report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detsweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sweep", help="run a hyperparameter sweep (Ray Tune + Optuna), then the ensemble job")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG, help=f"sweep YAML (default {DEMO_CONFIG.name})")
    p.add_argument("--storage", default=None,
                   help="experiments folder or URI, e.g. s3://bucket/sweeps (overrides `storage`; shared on a cluster)")
    p.add_argument("--name", default=None, help="experiment folder name (default: <config name>-<timestamp>)")
    p.add_argument("--smoke-test", action="store_true", help="the same sweep, small: 2 trials x 1 epoch")
    _add_ray_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("resume", help="continue an interrupted sweep (finished trials are kept)")
    p.add_argument("path", help="experiment folder or URI (<storage>/<name>)")
    p.add_argument("--retry-errored", action="store_true", help="also resume errored trials from their checkpoints")
    _add_ray_options(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="the leaderboard so far of a running or finished sweep")
    p.add_argument("path", help="experiment folder or URI (<storage>/<name>)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ensemble", help="WBF-fuse each finished trial's best models on the held-out split; rank")
    p.add_argument("path", help="experiment folder or URI (<storage>/<name>)")
    p.add_argument("--trial", action="append", default=None, metavar="TRIAL_ID",
                   help="only this trial (repeatable); default: every finished trial")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto' under `ray job submit`); default: an embedded local Ray")
    p.set_defaults(func=cmd_ensemble)

    from detection.train import add_train_arguments

    p = sub.add_parser("train", help="train one fold in-process without Ray (debugging, GPU benchmarks)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="write a bundled real dataset as COCO (train/ valid/ test/), or check one")
    p.add_argument("dataset", choices=["deepforest", "check"],
                   help="deepforest: write NEON aerial tree crowns (DATA.md); check: check PATH as a sweep would")
    p.add_argument("path", nargs="?", type=Path, default=None,
                   help="check: the COCO .json or Roboflow folder (default: data.path of --config)")
    p.add_argument("--config", type=Path, default=None,
                   help="check: sweep or training YAML whose data.verify, on_bad_image and num_folds apply")
    p.add_argument("--out", type=Path, default=None, help="deepforest: folder to write")
    p.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid/test assignment")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("report", help="write the experiment's self-contained HTML report")
    p.add_argument("path", help="experiment folder or URI (<storage>/<name>)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default <experiment>/report.html)")
    p.add_argument("--max-images", type=int, default=8, help="held-out images shown with the best ensemble's boxes")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="run the best ensemble on image files or folders (COCO JSON out)")
    p.add_argument("--ensemble", type=Path, required=True, help="<experiment>/best_ensemble.json")
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True,
                   help="COCO results file to write (a list of {image_id, category_id, bbox, score}); the images "
                        "and categories go beside it in <out stem>.images.json")
    p.add_argument("--draw", type=Path, default=None, help="folder for PNGs with the predicted boxes drawn")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="write boxes at or above this score (default: the ensemble's own threshold; 0: every box)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-best", help="write the best trial's training config (for `detsweep train`)")
    p.add_argument("path", help="experiment folder or URI (<storage>/<name>)")
    p.add_argument("--out", type=Path, required=True, help="training YAML to write, e.g. best.yaml")
    p.set_defaults(func=cmd_export_best)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as error:
        parser.exit(2, f"detsweep {args.command}: error: {error}\n")
    except ValueError as error:
        from detection.data.coco import DatasetError
        from detection.models.weights import StartError, WeightsNotFoundError

        if isinstance(error, (DatasetError, StartError, WeightsNotFoundError)):
            parser.exit(2, f"detsweep {args.command}: error: {error}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
