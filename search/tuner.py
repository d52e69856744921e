"""The sweep driver: experiment folder, Ray, the Tuner (OptunaSearch + optional ASHA), resume and status.

Everything that can fail on a bad config or dataset runs before Ray starts: `prepare_experiment` reads the
dataset, makes the split once and writes `sweep.yaml` + `split.json`; only then `init_ray`, `build_tuner`
(or `restore_tuner`) and `Tuner.fit` (search/cli.py). Experiment folder (docs/INTERFACES.md):

    <storage>/<name>/sweep.yaml     resolved config (absolute data.path); `resume` and the ensemble read it
    <storage>/<name>/split.json     `detection.data.splits.Split`, shared by every trial and the ensemble
    <storage>/<name>/data_summary.json  the load summary: images, boxes kept/clipped/dropped, bad files left out
    <storage>/<name>/optuna.db      the Optuna study (SQLite), exported when the Tuner returns
    <storage>/<name>/tune/          the Ray Tune experiment (`Tuner.restore` reads it)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detection.config import ConfigError
from search.config import SweepConfig, load_sweep_config
from search.space import build_search_space
from search.formatting import finite_float, format_or_dash, markdown_table
from search.storage import Experiment, exists, is_uri, join_uri

if TYPE_CHECKING:
    from ray import tune
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_SUMMARY_JSON",
    "OPTUNA_DB",
    "SPLIT_JSON",
    "SWEEP_YAML",
    "TUNE_DIR",
    "TrialStatus",
    "build_run_config",
    "build_scheduler",
    "build_searcher",
    "build_trainable",
    "build_tuner",
    "format_status",
    "init_ray",
    "new_experiment_dir",
    "optuna_storage_url",
    "prepare_experiment",
    "restore_tuner",
    "sweep_status",
    "set_max_pending_trials",
    "sweep_trial",
    "write_optuna_db",
]

SWEEP_YAML = "sweep.yaml"
SPLIT_JSON = "split.json"
DATA_SUMMARY_JSON = "data_summary.json"  # detection.data.verify.summarize: the load summary, bad files left out
OPTUNA_DB = "optuna.db"
TUNE_DIR = "tune"  # RunConfig(storage_path=<experiment>, name=TUNE_DIR)

# Columns of the live progress table and of `detsweep status`.
PARAM_COLUMNS = {"detector": "detector", "lr": "lr", "batch_size": "batch", "score_threshold": "thr"}


# ------------------------------------------------------------------------------------ experiment folder


def new_experiment_dir(config: SweepConfig, *, storage: str | None = None, name: str | None = None) -> Experiment:
    """`<storage>/<name>`: `--storage`/`--name` override `storage`/`name` of the config; without `--name`
    the folder is `<config name>-<YYYYmmdd-HHMMSS>` so that repeated sweeps never collide. `storage` is a
    path (local, or shared on a cluster) or a URI such as `s3://bucket/prefix` (search/storage.py).

    Raises:
        ConfigError: when the folder already holds a Tune experiment, or the URI cannot be read.
    """
    storage = storage or config.storage
    folder = name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not folder or "/" in folder:
        raise ConfigError(f"`--name` must be a folder name without '/', got {folder!r}.")
    if is_uri(storage):
        experiment = Experiment.at(join_uri(storage, folder))
        try:
            taken = exists(experiment.join(TUNE_DIR))
        except (OSError, ValueError) as error:  # pyarrow: unknown scheme, bad options, no access
            raise ConfigError(f"`storage` {storage!r}: cannot use this URI ({error}).") from error
    else:
        experiment = Experiment.at(Path(storage).expanduser() / folder)
        taken = (experiment.local / TUNE_DIR).exists()
    if taken:
        raise ConfigError(f"{experiment} already holds a sweep; continue it with `detsweep resume {experiment}` "
                          "or choose another `--name`.")
    if experiment.uri and experiment.local.exists():
        shutil.rmtree(experiment.local)  # a stale mirror of an earlier experiment at this URI
    return experiment


def prepare_experiment(config: SweepConfig, *, experiment_dir: Path) -> Path:
    """Index the dataset, make the split once and write `sweep.yaml` and `split.json`. Runs before Ray.

    Every image is checked first (`detection.data.verify.check_dataset`: `data.verify`, `data.on_bad_image`)
    and the load summary is logged and saved as `data_summary.json`.

    Returns the path of `split.json`. Raises `detection.data.coco.DatasetError` on a malformed dataset or bad
    image files (all listed), `ConfigError` when `data.num_folds` exceeds the images left for the folds, and
    `detection.models.weights.WeightsNotFoundError` / `StartError` when a detector's start cannot be had here.
    """
    from detection.data.coco import load_dataset
    from detection.data.splits import make_split, unlearnable_labels
    from detection.data.verify import check_dataset, check_fold_count, default_cache_path
    from detection.metrics import class_name
    from detection.models.weights import check_start_available

    for choice in config.detectors:  # weights that cannot be had stop the sweep here, not in every fold worker
        model = config.detector_base(choice).model
        check_start_available(choice.arch, choice.backbone, model.start, model.weights_path)
    index = load_dataset(config.data.path, filter_empty=False)
    # Every image checked once here (cached per file), not by every fold of every trial.
    data = config.data
    checked, summary = check_dataset(index, mode=data.verify, on_bad_image=data.on_bad_image, path=data.path,
                                     cache_path=default_cache_path(index.root, experiment_dir))
    check_fold_count(index, num_folds=data.num_folds, selection_fraction=data.selection_fraction,
                     test_fraction=data.test_fraction, exclude=checked.excluded, where=data.path)
    split = make_split(index, num_folds=config.data.num_folds, selection_fraction=config.data.selection_fraction,
                       test_fraction=config.data.test_fraction, seed=config.seed, exclude=checked.excluded)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(experiment_dir / SWEEP_YAML)
    (experiment_dir / DATA_SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    split_path = experiment_dir / SPLIT_JSON
    split.to_json(split_path)
    logger.info("%s: %d images: %d in %d folds, %d selection, %d test (split %s).", config.data.path, len(index),
                len(split.pool_ids), split.num_folds, len(split.selection), len(split.test), split.hash[:12])
    for k in range(split.num_folds):
        unscored = unlearnable_labels(index, train_ids=split.train_ids(k), val_ids=split.val_ids(k))
        if unscored:
            logger.warning("%s: fold %d validates on %s, which no training image of the fold holds; the fold's "
                           "metrics (and so the CV score) leave %s out.", config.data.path, k,
                           ", ".join(class_name(label, index.class_names) for label in unscored),
                           "it" if len(unscored) == 1 else "them")
    return split_path


def optuna_storage_url(experiment_dir: Path) -> str:
    return f"sqlite:///{Path(experiment_dir).resolve() / OPTUNA_DB}"


# ---------------------------------------------------------------------------------------------- Ray


def init_ray(config: SweepConfig, *, address: str | None = None, dashboard: bool = True,
             dashboard_host: str = "127.0.0.1") -> None:
    """Connect to a cluster (`address="auto"`, or the RAY_ADDRESS that `ray job submit` sets) or start an
    embedded local Ray.

    Locally Ray gets all cores, and at least what one trial reserves (the coordinator bundle mostly waits:
    2 folds x 1 CPU + 0.1 coordinator CPUs = 2.1 tells Ray of 3 CPUs on a 2-core laptop rather than leaving
    the trial pending forever); the dashboard binds `dashboard_host` (loopback unless told otherwise).

    Raises:
        ConfigError: when a trial needs more GPUs than a local machine has (it would wait forever).
    """
    import ray

    # `ray job submit` sets RAY_ADDRESS for its entrypoint: the sweep then runs on that cluster.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=True)
        logger.info("Connected to the Ray cluster at %s (dashboard: %s).", address, context.dashboard_url or "none")
        return
    cores = os.cpu_count() or 1
    num_cpus = max(cores, math.ceil(config.trial_cpus))
    if num_cpus > cores:
        logger.warning("One trial reserves %.2f CPUs (resources.coordinator_cpus + data.num_folds x "
                       "resources.cpus_per_fold) on a %d-core machine: Ray is told %d CPUs.",
                       config.trial_cpus, cores, num_cpus)
    # address="local": always a new embedded Ray, never another process's cluster that ray.init() would find.
    # A local Ray gets the coordinators' custom resource (resources.coordinator_resource) for every concurrent
    # trial, as cluster.yaml's head advertises it; a cluster must advertise it itself.
    custom = config.resources.coordinator_resource
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                       dashboard_host=dashboard_host, log_to_driver=True,
                       resources={custom: float(config.search.max_concurrent_trials)} if custom else None)
    if context.dashboard_url:
        logger.info("Ray dashboard: http://%s", context.dashboard_url)
    have_gpus = ray.cluster_resources().get("GPU", 0.0)
    if config.trial_gpus > have_gpus:
        ray.shutdown()
        raise ConfigError(
            f"`resources.gpus_per_fold` = {config.resources.gpus_per_fold} x {config.data.num_folds} folds needs "
            f"{config.trial_gpus} GPUs per trial, but this machine has {have_gpus:g}; use gpus_per_fold: 0 on a "
            "CPU machine, or `--address auto` on a cluster that autoscales GPU workers.")


# --------------------------------------------------------------------------------------------- Tuner


def build_searcher(config: SweepConfig, *, study_name: str = "detsweep") -> Any:
    """OptunaSearch over the define-by-run space with a seeded multivariate TPE, in a ConcurrencyLimiter.

    The study lives in memory in the driver; Tune pickles the searcher with the experiment state
    (`tune/searcher-state-*.pkl`) and `resume` restores it, so the Optuna history is kept, also when
    the experiment folder has moved. `write_optuna_db` exports it to `<experiment>/optuna.db` (no SQLite
    writes on shared filesystems during the sweep).
    """
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from search.optuna_search import PruningAwareOptunaSearch, memory_constraint

    search = config.search
    with warnings.catch_warnings():
        # multivariate/group/constant_liar are marked experimental in Optuna 4.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group=True: TPE models the per-detector `lr_<arch>_<backbone>` params as conditional groups;
        # constant_liar: trials still running count as bad, so parallel trials spread out; memory_constraint:
        # a trial whose batch did not fit (the probe before its folds start) is learnt as infeasible.
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=search.n_startup_trials,
                                             constraints_func=memory_constraint)
    first = [{"detector": d.key} for d in config.detectors] if search.each_detector_first else None
    searcher = PruningAwareOptunaSearch(space=build_search_space(config=config), metric=search.metric,
                                        mode=search.mode, sampler=sampler, study_name=study_name,
                                        points_to_evaluate=first)
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent_trials)


def write_optuna_db(experiment_dir: Path, *, sweep_over: bool = True) -> Path:
    """Export the searcher's Optuna study (from Tune's saved searcher state) to `<experiment>/optuna.db`.

    Rewritten from scratch each time (after `sweep` and after each `resume`). Every trial carries the user
    attribute `tune_trial_id`; with `sweep_over`, trials the study still holds as RUNNING (their Tune trial
    ended without reporting back, e.g. a killed driver that was not resumed) are written as FAIL.

    Raises:
        ConfigError: when the Tune experiment has no saved searcher state.
    """
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    experiment_dir = Path(experiment_dir).resolve()
    searcher = OptunaSearch()
    try:
        searcher.restore_from_dir(str(experiment_dir / TUNE_DIR))
    except RuntimeError as error:
        raise ConfigError(f"{experiment_dir / TUNE_DIR}: no saved searcher state (searcher-state-*.pkl) to "
                          "export to optuna.db.") from error
    source = searcher._ot_study  # OptunaSearch has no public handle on its study
    tune_ids = {ot_trial.number: tune_id for tune_id, ot_trial in searcher._ot_trials.items()}

    path = experiment_dir / OPTUNA_DB
    path.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(optuna_storage_url(experiment_dir))
    target = optuna.create_study(storage=storage, study_name=source.study_name, directions=source.directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        target.set_metric_names([searcher.metric] if isinstance(searcher.metric, str) else list(searcher.metric))
    trials = []
    for trial in source.get_trials(deepcopy=True):
        if trial.number in tune_ids:
            trial.set_user_attr("tune_trial_id", tune_ids[trial.number])
        if sweep_over and trial.state == TrialState.RUNNING:
            trial = optuna.trial.create_trial(state=TrialState.FAIL, params=trial.params,
                                              distributions=trial.distributions,
                                              intermediate_values=trial.intermediate_values,
                                              user_attrs=trial.user_attrs, system_attrs=trial.system_attrs)
        trials.append(trial)
    target.add_trials(trials)
    storage.engine.dispose()
    return path


def build_scheduler(config: SweepConfig) -> Any:
    """ASHA on `training_iteration` (= epoch) when `search.scheduler` is "asha", else None (FIFO)."""
    if config.search.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = config.search.asha
    max_t = max(base.train.epochs for base in config.detector_bases.values())  # a detector may train longer
    return ASHAScheduler(time_attr="training_iteration", metric=config.search.metric, mode=config.search.mode,
                         max_t=max_t, grace_period=asha.grace_period, reduction_factor=asha.reduction_factor)


def sweep_trial(config: dict[str, Any], *, setup: Any) -> None:
    """The Tune trainable of a sweep: `trainables.trial.train_trial` with the trial params only.

    OptunaSearch puts every suggested value into the config, also the per-detector `lr_<arch>_<backbone>`
    (see search/space.py) whose value the space hands on as `lr`; `train_trial` takes `TRIAL_PARAMS`.
    A trial that Tune restarts after a deterministic failure fails again at once (search/failures.py).
    """
    from ray import tune

    from search.failures import refuse_retry
    from trainables.trial import TRIAL_PARAMS, train_trial

    refuse_retry(tune.get_context().get_trial_id())
    train_trial({k: v for k, v in config.items() if k in TRIAL_PARAMS}, setup=setup)


def build_trainable(config: SweepConfig, *, experiment_dir: Path, remote: str | None = None) -> Any:
    """`sweep_trial` with its TrialSetup bound and the trial's placement group (coordinator + K folds).

    The split travels inside the setup (Ray's object store), so trials need no access to split.json.
    """
    from ray import tune

    from detection.data.splits import Split
    from trainables.trial import TrialSetup, trial_resources

    local = Path(experiment_dir).resolve()
    summary = local / DATA_SUMMARY_JSON
    setup = TrialSetup(base=config.base, split=Split.from_json(local / SPLIT_JSON),
                       split_path=join_uri(remote, SPLIT_JSON) if remote else str(local / SPLIT_JSON),
                       resources=config.resources, detector_bases=config.detector_bases,
                       resume_every=config.checkpoint.resume_every,
                       metric=config.search.metric, mode=config.search.mode,
                       reuse_workers=config.search.reuse_actors,
                       data_summary=json.loads(summary.read_text()) if summary.is_file() else None)
    trainable = tune.with_parameters(sweep_trial, setup=setup)
    return tune.with_resources(trainable, trial_resources(config.data.num_folds, config.resources))


def _trial_dirname(trial: Trial) -> str:
    # Short, stable folder names: the default one spells out the params (with "/" from the detector key).
    return f"trial_{trial.trial_id}"


def build_run_config(config: SweepConfig, *, experiment_dir: Path, remote: str | None = None) -> tune.RunConfig:
    """Tune writes `<experiment>/tune`: into the folder, or straight to the experiment's URI (`remote`)."""
    from ray import tune

    from search.checkpoint_budget import CheckpointBudget
    from search.failures import FailurePolicy

    reporter = tune.CLIReporter(
        # Tune's reporter fails on a column the trial configs lack: the threshold only when it is sampled.
        parameter_columns={k: v for k, v in PARAM_COLUMNS.items()
                           if k != "score_threshold" or config.search.space.score_threshold is not None},
        metric_columns={"training_iteration": "epoch", "cv_score": "cv_score", "score_mean": "score",
                        "score_std": "+-", "map_50_mean": "map_50", "f1_mean": "f1"},
        metric=config.search.metric, mode=config.search.mode, sort_by_metric=True, max_report_frequency=30,
        max_column_length=28,  # "faster_rcnn/efficientnet_b3" whole
    )
    return tune.RunConfig(
        storage_path=remote or str(Path(experiment_dir).resolve()),
        name=TUNE_DIR,
        # The latest checkpoint (best models inside) and, when that one holds no fold states
        # (checkpoint.resume_every > 1), the latest that does: trainables/trial.py reports
        # resume_state_epoch = the epoch for a checkpoint with fold states, 0 for one without.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="resume_state_epoch",
                                                checkpoint_score_order="max"),
        # The experiment state (read by `detsweep status`) reaches storage at least this often, besides on
        # every checkpoint; it is a few small files.
        sync_config=tune.SyncConfig(sync_period=30),
        failure_config=tune.FailureConfig(max_failures=config.failure.max_failures),
        progress_reporter=reporter,
        verbose=2,
        # FailurePolicy: bad data stops the sweep, deterministic failures are not retried (search/failures.py);
        # CheckpointBudget: ended trials lose their resume states, and all but the best keep_trials their models.
        callbacks=[*_logger_callbacks(config), FailurePolicy(),
                   CheckpointBudget(metric=config.search.metric, mode=config.search.mode,
                                    keep_trials=config.checkpoint.keep_trials)],
    )


def _logger_callbacks(config: SweepConfig) -> list:
    """Ray Tune's own MLflow callback when `logging.mlflow_tracking_uri` is set (TensorBoard is Tune's default)."""
    if config.logging.mlflow_tracking_uri is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=config.logging.mlflow_tracking_uri,
                                 experiment_name=config.logging.mlflow_experiment or config.name,
                                 save_artifact=False)]


def _use_cli_reporter() -> None:
    # Ray's default "AIR" console output ignores a ProgressReporter; the classic one honours our columns.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


MAX_PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


def set_max_pending_trials(config: SweepConfig) -> int:
    """`TUNE_MAX_PENDING_TRIALS_PG` = `search.max_concurrent_trials` in this (the driver's) process.

    Tune reads the variable in the driver when `Tuner.fit` builds its TuneController
    (`ray.tune.execution.tune_controller._get_max_pending_trials`, again in `update_max_pending_trials`), and
    keeps at most that many trials' placement groups pending; the autoscaler only sees pending groups, so
    with one at a time a 30-GPU sweep would ramp up trial by trial. Set here, before the Tuner is built,
    it holds for `detsweep sweep|resume` run directly and as a `ray job submit` entrypoint alike (the
    entrypoint is the driver process; no runtime_env is needed). Returns the value set.
    """
    value = int(config.search.max_concurrent_trials)
    previous = os.environ.get(MAX_PENDING_ENV)
    if previous not in (None, str(value)):
        logger.info("%s was %s; set to search.max_concurrent_trials = %d.", MAX_PENDING_ENV, previous, value)
    os.environ[MAX_PENDING_ENV] = str(value)
    return value


def build_tuner(config: SweepConfig, *, experiment_dir: Path, remote: str | None = None) -> tune.Tuner:
    """The Tuner of a prepared experiment folder (see `prepare_experiment`); with `remote` (the experiment's
    URI, `experiment_dir` its local mirror) Tune stores the trials there. Sets `TUNE_MAX_PENDING_TRIALS_PG`
    (`set_max_pending_trials`)."""
    from ray import tune

    _use_cli_reporter()
    set_max_pending_trials(config)
    tune_config = tune.TuneConfig(
        search_alg=build_searcher(config, study_name=Path(experiment_dir).name),
        scheduler=build_scheduler(config),
        num_samples=config.search.num_samples,
        trial_dirname_creator=_trial_dirname,
        reuse_actors=config.search.reuse_actors,  # with TrialSetup.reuse_workers: fold processes too
    )
    return tune.Tuner(build_trainable(config, experiment_dir=experiment_dir, remote=remote), tune_config=tune_config,
                      run_config=build_run_config(config, experiment_dir=experiment_dir, remote=remote))


def restore_tuner(experiment_dir: Path, *, remote: str | None = None, retry_errored: bool = False) -> tune.Tuner:
    """`Tuner.restore` of `<experiment>/tune`: unfinished trials continue from their latest checkpoint,
    errored ones too when `retry_errored`; finished trials are kept as they are. The searcher (and with it
    the Optuna study and the count of trials still to sample) comes back from the experiment state.
    Without any Tune state yet, a new Tuner over the saved sweep.yaml and split.json. With `remote`
    (`experiment_dir` is then its local mirror), Tune's state is read from the URI."""
    from ray import tune

    experiment_dir = Path(experiment_dir).resolve()
    config = load_experiment(experiment_dir)
    tune_dir = join_uri(remote, TUNE_DIR) if remote else str(experiment_dir / TUNE_DIR)
    if not tune.Tuner.can_restore(tune_dir):
        # The driver died after writing sweep.yaml and split.json but before Tune saved any state.
        logger.info("%s: no Tune experiment state yet; starting the sweep from its saved config.", tune_dir)
        return build_tuner(config, experiment_dir=experiment_dir, remote=remote)
    _use_cli_reporter()
    set_max_pending_trials(config)
    trainable = build_trainable(config, experiment_dir=experiment_dir, remote=remote)
    return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=retry_errored,
                              restart_errored=False)


def load_experiment(experiment_dir: Path, *, validate: bool = True) -> SweepConfig:
    """The SweepConfig saved in an experiment folder (`validate=False`: read only, e.g. for `status`, without
    importing the model registry or checking the dataset).

    Raises:
        ConfigError: when the folder is not a detsweep experiment.
    """
    experiment_dir = Path(experiment_dir)
    for name in (SWEEP_YAML, SPLIT_JSON):
        if not (experiment_dir / name).is_file():
            raise ConfigError(f"{experiment_dir}: expected a detsweep experiment folder holding {SWEEP_YAML}, "
                              f"{SPLIT_JSON} and {TUNE_DIR}/, but {name} is missing.")
    return load_sweep_config(experiment_dir / SWEEP_YAML, validate=validate)


# -------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class TrialStatus:
    """One row of the leaderboard so far."""

    trial_id: str
    status: str  # PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    detector: str
    lr: float | None
    batch_size: int | None
    score_threshold: float | None  # the sampled one, else the F1-optimal one on the out-of-fold predictions
    epochs: int  # epochs reported so far (training_iteration)
    cv_score: float | None  # fold mean of each fold's best-epoch score (what the search is told)
    score_mean: float | None  # the last epoch's fold mean
    score_std: float | None
    best_fold_score: float | None  # the best fold's best-epoch score (max over folds)
    error: str | None = None


def sweep_status(experiment_dir: Path) -> list[TrialStatus]:
    """The trials of a running or finished sweep, best `cv_score` first (no Ray cluster needed; read by
    `search.trial_results.read_trials`)."""
    from search.trial_results import read_trials

    tune_dir = Path(experiment_dir).resolve() / TUNE_DIR
    if not tune_dir.is_dir():
        raise ConfigError(f"{experiment_dir}: no Tune experiment ({TUNE_DIR}/) yet; start one with `detsweep sweep`.")
    rows = []
    for trial in read_trials(tune_dir):
        last, config = trial.last, trial.params
        rows.append(TrialStatus(
            trial_id=trial.trial_id, status=trial.status, detector=str(config.get("detector", "?")),
            lr=config.get("lr"), batch_size=config.get("batch_size"),
            score_threshold=finite_float(config.get("score_threshold", last.get("oof_threshold"))),
            epochs=trial.epochs, cv_score=trial.cv_score,
            score_mean=finite_float(last.get("score_mean")),
            score_std=finite_float(last.get("score_std")),
            # results written before the rename call it best_score
            best_fold_score=finite_float(last.get("best_fold_score", last.get("best_score"))),
            error=trial.error_file_line if trial.status == "ERROR" else None,
        ))
    return sorted(rows, key=lambda r: (r.cv_score is None, -(r.cv_score or 0.0), r.trial_id))


def format_status(rows: list[TrialStatus], *, num_samples: int | None = None) -> str:
    """A Markdown table of `sweep_status` rows."""
    head = ("rank", "trial", "status", "detector", "lr", "batch", "thr", "epochs", "CV score",
            "last epoch score_mean +- std", "best fold")
    cells = []
    for rank, r in enumerate(rows, start=1):
        score = "-" if r.score_mean is None else f"{r.score_mean:.4f} +- {r.score_std or 0.0:.4f}"
        cells.append((str(rank), r.trial_id, r.status, r.detector, format_or_dash(r.lr, ".2e"),
                      format_or_dash(r.batch_size, "d"), format_or_dash(r.score_threshold, ".3f"), str(r.epochs),
                      format_or_dash(r.cv_score, ".4f"), score, format_or_dash(r.best_fold_score, ".4f")))
    lines = [markdown_table(head, cells)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    total = f"{len(rows)}/{num_samples}" if num_samples else str(len(rows))
    lines.append("")
    lines.append(f"{total} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    for r in rows:
        if r.error:
            lines.append(f"{r.trial_id} errored: {r.error}")
    return "\n".join(lines)
