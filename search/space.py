"""The search space as an Optuna define-by-run function.

Ray Tune's `OptunaSearch` calls the space once per new trial with an `optuna.Trial`; it must only
`suggest_*` (no work: it runs in the driver between trials). What it suggests becomes the trial config
that `trainables.trial.train_trial` reads:

    "detector"        "<arch>/<backbone>", categorical over the configured detectors
    "lr"              log-uniform in the detector's own range when it has one, else `search.space.lr`
    "batch_size"      categorical, e.g. {4, 8}
    "score_threshold" uniform

With more than one detector each detector's learning rate is its own Optuna parameter
(`lr_<arch>_<backbone>`, in the detector's range when it has one): a good learning rate depends on the
detector, and TPE (with `group=True`) models such conditional parameters on the trials that have them.
(Optuna would let one name `lr` change its range between trials, but TPE then models one name as one
distribution and silently falls back to independent sampling when a proposal leaves the current range.)
The space returns `{"lr": value}` so that the trial config always has `lr` (OptunaSearch merges the
returned dict over the suggested values); `search.tuner.sweep_trial` hands only `trainables.trial.TRIAL_PARAMS` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search.config import DetectorChoice, FloatRange, SweepConfig

if TYPE_CHECKING:
    import optuna

__all__ = ["DetectorSpace", "build_search_space", "lr_param_name"]


def lr_param_name(choice: DetectorChoice, *, num_detectors: int) -> str:
    """The Optuna parameter that holds a detector's learning rate: `lr` when the sweep searches one detector,
    else `lr_<arch>_<backbone>`."""
    return "lr" if num_detectors == 1 else f"lr_{choice.arch}_{choice.backbone}"


@dataclass(frozen=True)
class DetectorSpace:
    """Define-by-run space: `space(trial) -> {"lr": float}`; the other keys are captured from `suggest_*`.

    A frozen dataclass rather than a closure so that Tune can pickle the searcher (experiment resume).
    """

    detectors: tuple[DetectorChoice, ...]
    lr: FloatRange
    batch_sizes: tuple[int, ...]
    score_threshold: FloatRange | None  # None: not searched (chosen on out-of-fold predictions)

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("DetectorSpace needs at least one detector, got an empty tuple.")

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        choices = {d.key: d for d in self.detectors}
        detector = trial.suggest_categorical("detector", list(choices))
        choice = choices[detector]
        lr_range = choice.lr or self.lr
        name = lr_param_name(choice, num_detectors=len(self.detectors))
        lr = trial.suggest_float(name, lr_range.low, lr_range.high, log=True)
        trial.suggest_categorical("batch_size", list(self.batch_sizes))
        if self.score_threshold is not None:
            trial.suggest_float("score_threshold", self.score_threshold.low, self.score_threshold.high)
        return {"lr": lr}


def build_search_space(*, config: SweepConfig) -> DetectorSpace:
    """The define-by-run space of a validated sweep config."""
    space = config.search.space
    return DetectorSpace(detectors=config.detectors, lr=space.lr, batch_sizes=tuple(space.batch_size),
                         score_threshold=space.score_threshold)
