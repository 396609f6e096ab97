"""The two ways a quality trial stops early, as trainer callbacks: the pruner's word after an
epoch, and the job's deadline before an epoch that would end after it."""

from __future__ import annotations

import time
from typing import Any

from feedtune.training.engine import Callback
from feedtune.training.stopping import StopTraining
from feedtune.tuning import optuna_study
from feedtune.tuning.rung_pruner import FULL_LENGTH_ATTR


class PruneOnPlateau(Callback):
    """Reports each epoch's metric to the Optuna trial; stops training when the pruner says.
    The last epoch, and every epoch of a trial that must run the full length (an arm, a
    calibration trial), is reported without asking: a trial that finished is COMPLETE."""

    def __init__(self, trial: Any, metric: str, *, epochs: int) -> None:
        self.trial = trial
        self.metric = metric
        self.epochs = epochs
        self.full_length = bool(trial.user_attrs.get(FULL_LENGTH_ATTR))

    def on_epoch_end(self, epoch, metrics, **_: Any) -> None:
        value = metrics[self.metric]
        if self.full_length or epoch + 1 >= self.epochs:
            self.trial.report(value, epoch + 1)
        elif optuna_study.report(self.trial, value, epoch + 1):
            raise StopTraining("pruned", f"pruned after epoch {epoch + 1} (value {value:.4f})")


class StopAtDeadline(Callback):
    """Stops a trial whose next epoch would end after the job's deadline (``time.monotonic()``
    seconds, or None); appends each epoch's seconds to ``epoch_seconds``."""

    def __init__(self, deadline: float | None, epoch_seconds: list[float], *, epochs: int) -> None:
        self.deadline = deadline
        self.epoch_seconds = epoch_seconds
        self.epochs = epochs  # after the last one there is nothing left to stop
        self.started = time.monotonic()

    def on_epoch_start(self, epoch: int) -> None:
        self.started = time.monotonic()

    def on_epoch_end(self, epoch, metrics, **_: Any) -> None:
        seconds = time.monotonic() - self.started
        self.epoch_seconds.append(seconds)
        last = epoch + 1 >= self.epochs
        if self.deadline is not None and not last and time.monotonic() + seconds > self.deadline:
            raise StopTraining("deadline", f"stopped at the deadline after epoch {epoch + 1}")
