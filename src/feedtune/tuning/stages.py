"""The two stages of a study, as Optuna objectives over one prepared dataset.

Speed trials run a fixed number of real training steps (no validation) and maximise
``train_samples_per_s``; the best speed settings are then fixed for the quality trials, which
train, maximise ``search.metric`` with pruning, and record their throughput too. Each objective
reads like the experiment: suggest, build the feed, train, report. Every trial is a nested
MLflow run; recording, pruning and the deadline reach the trainer as callbacks, and a stop
(:class:`StopTraining`) becomes Optuna's pruned state at the trial's edge.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from feedtune.config import Config, with_overrides
from feedtune.feed.cache_memo import CacheMemo
from feedtune.sources.prepare import PreparedData
from feedtune.tracking import mlflow_store
from feedtune.tracking.liveness import worker_info
from feedtune.tracking.recording import (
    RunRecorder,
    download_resume,
    finish_run,
    relog_missing_epochs,
)
from feedtune.training.distributed import group_failure
from feedtune.training.engine import Callback
from feedtune.training.stopping import StopTraining, signals_held
from feedtune.training.trainer import new_model, train_model
from feedtune.tuning import optuna_storage, optuna_study, space
from feedtune.tuning.arms import config_arms
from feedtune.tuning.rung_pruner import (
    ARM_OVERRIDES_ATTR,
    FULL_LENGTH_ATTR,
    OVERRIDES_ATTR,
    TrustedHalvingPruner,
    record_seed_curve,
)
from feedtune.tuning.trial_group import Order, TrialGroup, group_feed, speed_trial
from feedtune.tuning.trial_stops import PruneOnPlateau, StopAtDeadline

if TYPE_CHECKING:
    import torch

    from feedtune.feed.feed import Feed

STAGES = ("speed", "quality")
# When trials must end: ``time.monotonic()`` seconds, None (never), or a function of the trial
# about to run (None: the next one) that says it, for a deadline that moves with the study.
Deadline = float | None | Callable[[Any], float | None]


def deadline_at(deadline: Deadline, trial: Any) -> float | None:
    return deadline(trial) if callable(deadline) else deadline


# Trial user attribute: why the speed stage stopped after the start configuration's trial.
SKIPPED_ATTR = "speed_stage_skipped"


def trial_tags(stage: str, study_name: str, number: int, world_size: int = 1) -> dict[str, str]:
    return {
        "feedtune.stage": stage,
        "optuna.study_name": study_name,
        "optuna.trial_number": str(number),
        "feedtune.world_size": str(world_size),
    }


def claim(trial: Any, run_id: str) -> str | None:
    """Record which process and MLflow run work on ``trial``; returns the run of the attempt
    this one retries (None for a first attempt)."""
    previous = trial.user_attrs.get("mlflow_run_id")
    trial.set_user_attr("worker", worker_info())
    trial.set_user_attr("mlflow_run_id", run_id)
    return previous


def close_dead_trial_run(trial: Any) -> None:
    """A trial whose worker died must not leave its MLflow run RUNNING."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        mlflow_store.end_run_by_id(run_id, "KILLED")


@contextlib.contextmanager
def nested_run(name: str, tags: dict[str, str], *, system_metrics: bool = True) -> Iterator[Any]:
    """A run nested in the study's parent run (a trial, or a noise run of the start)."""
    with mlflow_store.start_run(
        "trial", nested=True, run_name=name, tags=tags, system_metrics=system_metrics
    ) as run:
        yield run


@contextlib.contextmanager
def trial_run(
    trial: Any, stage: str, study_name: str, *, world_size: int = 1, **kwargs: Any
) -> Iterator[Any]:
    """The trial's nested run, claimed in the study; a stop inside (pruned, deadline) ends the
    run KILLED and the trial pruned. ``world_size``: the processes that train it (torchrun)."""
    tags = trial_tags(stage, study_name, trial.number, world_size)
    try:
        with nested_run(f"{stage}-{trial.number}", tags, **kwargs) as run:
            claim(trial, run.info.run_id)
            yield run
    except StopTraining as stop:
        raise optuna_study.TrialPruned(str(stop)) from stop


class Tuner:
    """Objectives of both stages over one prepared dataset, on the run context's device,
    sharing the image caches of their feeds and the epoch timings the deadline needs.

    ``group``: under torchrun this is rank 0 of a process group; each trial is then sent to
    the other processes (``trial_group.follow``) and trained by all of them together."""

    def __init__(
        self,
        cfg: Config,
        data: PreparedData,
        study_base: str,
        *,
        progress: bool,
        device: torch.device,
        group: TrialGroup | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.study_base = study_base
        self.progress = progress
        self.group = group or TrialGroup()
        self.dist = self.group.dist
        self.settings = cfg.flat()  # the config's own values, dotted
        self.device = device  # the run context's: resolved once, at the command's edge
        # Trials with the same cache settings (every quality trial) share one filled cache.
        self.caches = CacheMemo()
        self.epoch_seconds: list[float] = []  # of every quality epoch run here
        self.full_run_seconds: list[float] = []  # of every full-length run outside a trial
        self.arms = config_arms(cfg)  # checked now: a bad anchor fails before any training

    def start_stage(
        self,
        study: Any,
        stage: str,
        *,
        speed_params: dict[str, Any] | None = None,
        deadline: Deadline = None,
    ) -> Callable[[Any], float]:
        """The objective of ``stage`` with the speed stage's winner (``speed_params``) and the
        ``deadline`` (``time.monotonic()`` seconds, or a function of the trial, None for the
        next one, that says it) fixed; a new study first gets the start configuration (and the
        quality stage's other arms) queued."""
        speed = stage == "speed"
        search = self.cfg.search
        stage_space = space.speed_space(search) if speed else space.quality_space(search)
        start = {**self.settings, **(speed_params or {})}
        if search.enqueue_config and speed:
            optuna_study.enqueue_values(study, stage_space, start)
        elif search.enqueue_config:
            optuna_study.enqueue_arms(study, stage_space, start, self.arms)
        if speed:
            objective: Callable[[Any], float] = self.speed_objective
        else:
            # A partial, not a lambda: no frame of its own between Optuna and the objective.
            objective = functools.partial(
                self.quality_objective, speed_params=speed_params or {}, deadline=deadline
            )
        if self.dist.enabled:
            return functools.partial(self._in_group, objective)
        return objective

    def _in_group(self, objective: Callable[[Any], float], trial: Any) -> float:
        """Under torchrun: a trial the group could not finish (a process died or stopped
        answering, torchrun's SIGTERM) is queued again, to resume from its last checkpoint in
        the next `tune` on the study; the error then ends this process (the others cannot go
        on without it, see ``optuna_study.optimize``'s ``stop_on_error``)."""
        try:
            return objective(trial)
        except (RuntimeError, KeyboardInterrupt) as exc:
            if isinstance(exc, KeyboardInterrupt) or group_failure(exc):
                with signals_held():
                    why = f"its process group was lost ({type(exc).__name__})"
                    optuna_storage.queue_again(trial.study, trial, why=why, reason=why)
            raise

    def planned_trials(self, stage: str, n_trials: int | None) -> int:
        search = self.cfg.search
        planned = search.n_trials_speed if stage == "speed" else search.n_trials_quality
        return planned if n_trials is None else n_trials

    def stop_before(self, deadline: Deadline, study: Any = None) -> Callable[[Any, Any], None]:
        """A study callback: no new trial when the time left would not let it reach the first
        rung where it could stop (the median epoch so far times that rung's epochs: the full
        length while the quality stage calibrates or trusts no rung)."""

        def stop(study_: Any, trial: Any) -> None:
            ends = deadline_at(deadline, None)
            if ends is None:
                return
            per_epoch = float(np.median(self.epoch_seconds)) if self.epoch_seconds else 0.0
            if time.monotonic() + per_epoch * self._first_stop(study) > ends:
                study_.stop()

        return stop

    def _first_stop(self, study: Any) -> int:
        """Epochs the next trial of ``study`` (None: the speed stage) runs at least."""
        search = self.cfg.search
        if study is None:
            return search.min_epochs
        if optuna_study.n_trials(study) < self._calibrating(study):
            return self.cfg.train.epochs
        if isinstance(study.pruner, TrustedHalvingPruner):
            return study.pruner.trusted_rung(study)
        return search.min_epochs

    def inert(self, speed_params: dict[str, Any]) -> space.Inert:
        """Keys that cannot matter in a trial (the speed stage's winner fixed)."""
        cuda = self.device.type == "cuda"
        source = self.data.reader.inert  # e.g. data.decoder for a Dataset of arrays
        return space.inert_given({**self.settings, **speed_params}, cuda=cuda, source=source)

    def speed_objective(self, trial: Any) -> float:
        params = optuna_study.suggest(trial, space.speed_space(self.cfg.search), self.inert({}))
        cfg = with_overrides(self.cfg, params)
        study_name = f"{self.study_base}-speed"
        world = self.dist.world_size
        with trial_run(trial, "speed", study_name, world_size=world, system_metrics=False):
            mlflow_store.log_config(cfg)
            steps = self.cfg.search.speed_steps
            self.group.send(
                Order("speed", params, study_name, "speed", trial.number, steps=steps), cfg
            )
            result = speed_trial(
                cfg, self.data, self.device, steps=steps, caches=self.caches, dist=self.dist
            )
            mlflow_store.log_metrics(result)
        for key, value in result.items():
            trial.set_user_attr(key, value)
        wait = result["data_wait_frac"]
        if (
            trial.user_attrs.get(optuna_study.START_ATTR)
            and wait < self.cfg.search.speed_skip_wait_frac
        ):
            # Model-bound: faster data cannot speed the job up; the time goes to quality trials.
            reason = f"model-bound: the start configuration waited {wait:.1%} of its time"
            trial.set_user_attr(SKIPPED_ATTR, reason)
            trial.study.stop()
        return result["train_samples_per_s"]

    def quality_overrides(
        self, speed_params: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        return space.consistent(self.settings, {**speed_params, **params})

    def quality_objective(
        self, trial: Any, *, speed_params: dict[str, Any], deadline: Deadline
    ) -> float:
        deadline = deadline_at(deadline, trial)
        started = time.monotonic()
        search_space = space.quality_space(self.cfg.search)
        params = optuna_study.suggest(trial, search_space, self.inert(speed_params))
        # An arm trains exactly its recipe, whatever part of it the space can express.
        arm_overrides = trial.user_attrs.get(ARM_OVERRIDES_ATTR)
        if arm_overrides is not None:
            params = {**params, **arm_overrides}
        overrides = self.quality_overrides(speed_params, params)
        self._mark_calibration(trial)
        trial.set_user_attr(OVERRIDES_ATTR, overrides)
        cfg = with_overrides(self.cfg, overrides)
        metric = self.cfg.search.metric
        previous = trial.user_attrs.get("mlflow_run_id")  # the attempt this one retries
        study_name = f"{self.study_base}-quality"
        world = self.dist.world_size
        with (
            trial_run(trial, "quality", study_name, world_size=world) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            mlflow_store.set_tags({"feedtune.split_digest": self.data.split.digest})
            resume = self._resume(trial, previous, run.info.run_id, Path(tmp))
            order = Order("train", overrides, study_name, "quality", trial.number, resume=resume)
            with self._ordered(order, cfg, Path(tmp)) as (feed, model, train):
                outcome = train(
                    resume=resume, callbacks=self._callbacks(cfg, feed, Path(tmp), deadline, trial)
                )
                speed = finish_run(cfg, outcome, feed, model)
        best = max(h[metric] for h in outcome.state.history)
        trial.set_user_attr(f"best_{metric}", best)
        if len(outcome.state.history) >= cfg.train.epochs and resume is None:
            self.full_run_seconds.append(time.monotonic() - started)
        if speed is not None:
            trial.set_user_attr("train_samples_per_s", speed.train_samples_per_s)
        return best

    @contextlib.contextmanager
    def _ordered(
        self, order: Order, cfg: Config, folder: Path
    ) -> Iterator[tuple[Feed, torch.nn.Module, Callable[..., Any]]]:
        """``order`` sent, then this process's feed (closed after the block), a new model and
        ``train_model`` bound to them: a partial, so the training runs in the caller's frame."""
        self.group.send(order, cfg)
        with group_feed(cfg, self.data, self.device, self.dist, self.caches) as feed:
            model = new_model(cfg, len(self.data.classes))
            train = functools.partial(
                train_model,
                cfg,
                feed,
                model=model,
                folder=folder,
                progress=self.progress,
                dist=self.dist,
            )
            yield feed, model, train

    def _callbacks(
        self, cfg: Config, feed: Any, folder: Path, deadline: float | None, trial: Any = None
    ) -> list[Callback]:
        """Recording, then pruning (a trial's), then the deadline: a stopped epoch is on
        record first."""
        callbacks: list[Callback] = [RunRecorder(cfg, self.data, feed, folder)]
        epochs = cfg.train.epochs
        if trial is not None:
            callbacks.append(PruneOnPlateau(trial, self.cfg.search.metric, epochs=epochs))
        callbacks.append(StopAtDeadline(deadline, self.epoch_seconds, epochs=epochs))
        return callbacks

    def _resume(
        self, trial: Any, previous: str | None, run_id: str, folder: Path
    ) -> dict[str, Any] | None:
        """A retried trial (its worker died) continues from the dead run (``previous``)'s last
        checkpoint; its epochs are re-logged where lost and reported to the pruner again."""
        if previous is None:
            return None
        resume = download_resume(previous, folder)
        if resume is None:
            return None
        mlflow_store.set_tags({"feedtune.resumed_from_run_id": previous})
        relog_missing_epochs(run_id, resume)
        for row in resume["train_state"]["history"]:  # the pruner sees every epoch
            trial.report(row[self.cfg.search.metric], int(row["epoch"]) + 1)
        return resume

    def _calibrating(self, study: Any) -> int:
        """How many of the study's first trials run the full length: the arms, then
        ``search.calibration_trials`` more."""
        return optuna_study.n_arm_trials(study) + self.cfg.search.calibration_trials

    def _mark_calibration(self, trial: Any) -> None:
        """The first trials after the arms run the full length: with the arms, their epoch
        curves show which rungs may prune (``rung_pruner``)."""
        if trial.number < self._calibrating(trial.study) and not trial.user_attrs.get(
            FULL_LENGTH_ATTR
        ):
            trial.set_user_attr(FULL_LENGTH_ATTR, "calibration")

    def seed_run(
        self,
        study: Any,
        name: str,
        overrides: dict[str, Any],
        seed: int,
        *,
        deadline: float | None,
    ) -> float | None:
        """``overrides`` (the speed stage's winner applied) trained at full length with
        ``seed``, as a nested run (``feedtune.stage=seed``, tag ``feedtune.arm=name``); its
        epoch curve is kept in ``study`` (``rung_pruner.record_seed_curve``). None when the
        deadline stopped it."""
        metric = self.cfg.search.metric
        study_name = f"{self.study_base}-quality"
        tags = {
            "feedtune.stage": "seed",
            "feedtune.arm": name,
            "optuna.study_name": study_name,
            "feedtune.world_size": str(self.dist.world_size),
        }
        cfg = with_overrides(self.cfg, {**overrides, "seed": seed})
        started = time.monotonic()
        try:
            with nested_run(f"{name}-seed-{seed}", tags), tempfile.TemporaryDirectory() as tmp:
                order = Order("train", {**overrides, "seed": seed}, study_name, "seed")
                with self._ordered(order, cfg, Path(tmp)) as (feed, model, train):
                    outcome = train(callbacks=self._callbacks(cfg, feed, Path(tmp), deadline))
                    finish_run(cfg, outcome, feed, model)
        except StopTraining:  # the deadline came first
            return None
        self.full_run_seconds.append(time.monotonic() - started)
        curve = {int(h["epoch"]) + 1: float(h[metric]) for h in outcome.state.history}
        record_seed_curve(study, name, seed, curve)
        return max(curve.values())
