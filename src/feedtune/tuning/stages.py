"""The two stages of a study, as Optuna objectives over one prepared dataset.

Speed trials run a fixed number of real training steps (no validation) and maximise
``train_samples_per_s``; the best speed settings are then fixed for the quality trials, which
train, maximise ``val_f1_macro`` with pruning, and record their throughput too. Every trial is
a nested MLflow run; recording and pruning reach the trainer as callbacks.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feedtune.config import Config, with_overrides
from feedtune.feed.cache import CacheMemo
from feedtune.feed.feed import build_pipeline
from feedtune.sources.prepare import PreparedData
from feedtune.tracking import mlflow_store
from feedtune.tracking.liveness import worker_info
from feedtune.tracking.recording import (
    RunRecorder,
    download_resume,
    finish_run,
    relog_missing_epochs,
)
from feedtune.training.devices import prepare_model, resolve_device
from feedtune.training.engine import Callback
from feedtune.training.models import build_model
from feedtune.training.throughput import measure_training
from feedtune.training.trainer import train_model
from feedtune.tuning import optuna_study, space

STAGES = ("speed", "quality")


class PruneOnPlateau(Callback):
    """Reports each epoch's metric to the Optuna trial; the pruner may stop the trial."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_epoch_end(self, epoch, metrics, **_: Any) -> None:
        optuna_study.report(self.trial, metrics[self.metric], epoch + 1)


class StopAtDeadline(Callback):
    """Stops a trial whose next epoch would end after the stage's deadline, recorded as
    pruned with the tag ``feedtune.stopped=deadline``; reports each epoch's seconds."""

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
            mlflow_store.set_tags({"feedtune.stopped": "deadline"})
            raise optuna_study.TrialPruned(f"stopped at the deadline after epoch {epoch + 1}")


def trial_tags(stage: str, study_name: str, number: int) -> dict[str, str]:
    return {
        "feedtune.stage": stage,
        "optuna.study_name": study_name,
        "optuna.trial_number": str(number),
    }


def speed_trial(
    cfg: Config, data: PreparedData, *, steps: int, caches: CacheMemo | None = None
) -> dict[str, float]:
    """A fixed number of real training steps with ``cfg``'s loader; no validation."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    pipeline = build_pipeline(cfg, data, cuda=device.type == "cuda", caches=caches)
    model = prepare_model(
        build_model(cfg.model, num_classes=len(data.classes)),
        device,
        channels_last=cfg.train.channels_last,
    )
    rate, wait_frac, startup = measure_training(
        model,
        pipeline.train_loader,
        device=device,
        steps=steps,
        train_cfg=cfg.train,
        augment=pipeline.batch_augment,
    )
    return {"train_samples_per_s": rate, "data_wait_frac": wait_frac, "train_startup_s": startup}


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


class Tuner:
    """Objectives of both stages over one prepared dataset, logging to nested runs.

    ``deadline`` (``time.monotonic()`` seconds, or None) bounds a stage, running trials
    included: no trial starts that could not reach its first rung before it, and a running
    trial stops at the last epoch that ends before it."""

    def __init__(self, cfg: Config, data: PreparedData, study_base: str, *, progress: bool) -> None:
        self.cfg = cfg
        self.data = data
        self.study_base = study_base
        self.progress = progress
        self.speed_params: dict[str, Any] = {}
        self.settings = cfg.flat()  # the config's own values, dotted
        self.cuda = resolve_device(cfg.train.device).type == "cuda"
        # Trials with the same cache settings (every quality trial) share one filled cache.
        self.caches = CacheMemo()
        self.deadline: float | None = None
        self.epoch_seconds: list[float] = []  # of every quality epoch run here
        self.speed_skipped = ""  # why the speed stage stopped after its first trial, if it did

    def optimize(
        self, study: Any, stage: str, *, n_trials: int | None, deadline: float | None = None
    ) -> None:
        """Run ``stage``'s trials on ``study`` until ``deadline``; a new study first tries the
        config's values."""
        search = self.cfg.search
        speed = stage == "speed"
        stage_space = space.speed_space(search) if speed else space.quality_space(search)
        planned = search.n_trials_speed if speed else search.n_trials_quality
        if search.enqueue_config:
            optuna_study.enqueue_values(study, stage_space, {**self.settings, **self.speed_params})
        self.deadline = deadline
        optuna_study.optimize(
            study,
            self.speed_objective if speed else self.quality_objective,
            n_trials=planned if n_trials is None else n_trials,
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
            progress=self.progress,
            callbacks=[self._stop_before_the_deadline],
        )

    def _stop_before_the_deadline(self, study: Any, trial: Any) -> None:
        """No new trial when the time left would not let it reach its first rung."""
        if self.deadline is None:
            return
        per_epoch = float(np.median(self.epoch_seconds)) if self.epoch_seconds else 0.0
        if time.monotonic() + per_epoch * self.cfg.search.min_epochs > self.deadline:
            study.stop()

    def inert(self) -> space.Inert:
        """Keys that cannot matter in this stage's trials (the speed stage's winner fixed)."""
        return space.inert_given({**self.settings, **self.speed_params}, cuda=self.cuda)

    def speed_objective(self, trial: Any) -> float:
        params = optuna_study.suggest(trial, space.speed_space(self.cfg.search), self.inert())
        tcfg = with_overrides(self.cfg, params)
        name = f"{self.study_base}-speed"
        with mlflow_store.start_run(
            "trial",
            nested=True,
            run_name=f"speed-{trial.number}",
            tags=trial_tags("speed", name, trial.number),
            system_metrics=False,
        ) as run:
            claim(trial, run.info.run_id)
            mlflow_store.log_config(tcfg)
            result = speed_trial(
                tcfg, self.data, steps=self.cfg.search.speed_steps, caches=self.caches
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
            self.speed_skipped = (
                f"model-bound: the start configuration waited {wait:.1%} of its time"
            )
            trial.study.stop()
        return result["train_samples_per_s"]

    def quality_cfg(self, params: dict[str, Any]) -> Config:
        return with_overrides(
            self.cfg, space.consistent(self.settings, {**self.speed_params, **params})
        )

    def quality_objective(self, trial: Any) -> float:
        params = optuna_study.suggest(trial, space.quality_space(self.cfg.search), self.inert())
        tcfg = self.quality_cfg(params)
        name = f"{self.study_base}-quality"
        metric = self.cfg.search.metric
        with (
            mlflow_store.start_run(
                "trial",
                nested=True,
                run_name=f"quality-{trial.number}",
                tags=trial_tags("quality", name, trial.number),
            ) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            previous = claim(trial, run.info.run_id)
            mlflow_store.set_tags({"feedtune.split_digest": self.data.split.digest})
            # A retried trial (its worker died) continues from the dead run's last checkpoint.
            resume = download_resume(previous, Path(tmp)) if previous else None
            if resume is not None:
                mlflow_store.set_tags({"feedtune.resumed_from_run_id": previous})
                relog_missing_epochs(run.info.run_id, resume)
                for row in resume["train_state"]["history"]:  # the pruner sees every epoch
                    trial.report(row[metric], int(row["epoch"]) + 1)
            best = self._train(tcfg, Path(tmp), resume, [PruneOnPlateau(trial, metric)])
            for key, value in best.items():
                trial.set_user_attr(key, value)
            return best[f"best_{metric}"]

    def _train(
        self, cfg: Config, folder: Path, resume: Any, callbacks: list[Callback]
    ) -> dict[str, float]:
        """Train ``cfg`` in the open run, recorded and bounded by the deadline; returns the
        best metrics and the throughput. Work only a finished run needs (model, results,
        throughput probe) happens only if it finishes."""
        metric = self.cfg.search.metric
        outcome = train_model(
            cfg,
            self.data,
            folder=folder,
            resume=resume,
            progress=self.progress,
            caches=self.caches,
            callbacks=[
                RunRecorder(cfg, self.data, folder),
                *callbacks,
                StopAtDeadline(self.deadline, self.epoch_seconds, epochs=cfg.train.epochs),
            ],
        )
        speed = finish_run(cfg, outcome, self.data.classes)
        out = {f"best_{metric}": max(h[metric] for h in outcome.state.history)}
        if speed is not None:
            out["train_samples_per_s"] = speed.train_samples_per_s
        return out

    def noise_runs(self, seeds: list[int]) -> list[float]:
        """The start configuration (the speed stage's winner applied) trained at full length
        with each of ``seeds``, as nested runs (``feedtune.stage=noise``): how much the score
        moves with the seed alone. Runs the deadline stops are left out."""
        metric = f"best_{self.cfg.search.metric}"
        scores = []
        for seed in seeds:
            cfg = with_overrides(self.quality_cfg({}), {"seed": seed})
            tags = {"feedtune.stage": "noise", "optuna.study_name": f"{self.study_base}-quality"}
            try:
                with (
                    mlflow_store.start_run(
                        "trial", nested=True, run_name=f"noise-seed-{seed}", tags=tags
                    ),
                    tempfile.TemporaryDirectory() as tmp,
                ):
                    scores.append(self._train(cfg, Path(tmp), None, [])[metric])
            except optuna_study.TrialPruned:  # the deadline came first
                break
        return scores
