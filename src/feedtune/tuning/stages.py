"""The two stages of a study, as Optuna objectives over one prepared dataset.

Speed trials run a fixed number of real training steps (no validation) and maximise
``train_samples_per_s``; the best speed settings are then fixed for the quality trials, which
train, maximise ``val_f1_macro`` with pruning, and record their throughput too. Every trial is
a nested MLflow run; recording and pruning reach the trainer as callbacks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from feedtune.config import Config
from feedtune.data.pipeline import PreparedData, build_pipeline
from feedtune.tracking import mlflow_store
from feedtune.tracking.liveness import worker_info
from feedtune.tracking.recording import (
    RunRecorder,
    download_resume,
    finish_run,
    relog_missing_epochs,
)
from feedtune.training.engine import Callback, prepare_model, resolve_device
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
        optuna_study.report(self.trial, metrics[self.metric], epoch)


def trial_tags(stage: str, study_name: str, number: int) -> dict[str, str]:
    return {
        "feedtune.stage": stage,
        "optuna.study_name": study_name,
        "optuna.trial_number": str(number),
    }


def speed_trial(cfg: Config, data: PreparedData, *, steps: int) -> dict[str, float]:
    """A fixed number of real training steps with ``cfg``'s loader; no validation."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    pipeline = build_pipeline(cfg, data, cuda=device.type == "cuda")
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
    """Objectives of both stages over one prepared dataset, logging to nested runs."""

    def __init__(self, cfg: Config, data: PreparedData, study_base: str, *, progress: bool) -> None:
        self.cfg = cfg
        self.data = data
        self.study_base = study_base
        self.progress = progress
        self.speed_params: dict[str, Any] = {}
        self.settings = cfg.flat()  # the config's own values, dotted
        self.cuda = resolve_device(cfg.train.device).type == "cuda"

    def optimize(
        self, study: Any, stage: str, *, n_trials: int | None, timeout: float | None
    ) -> None:
        """Run ``stage``'s trials on ``study``; a new study first tries the config's values."""
        search = self.cfg.search
        speed = stage == "speed"
        stage_space = space.speed_space(search) if speed else space.quality_space(search)
        planned = search.n_trials_speed if speed else search.n_trials_quality
        if search.enqueue_config:
            optuna_study.enqueue_values(study, stage_space, {**self.settings, **self.speed_params})
        optuna_study.optimize(
            study,
            self.speed_objective if speed else self.quality_objective,
            n_trials=planned if n_trials is None else n_trials,
            timeout=timeout,
            progress=self.progress,
        )

    def inert(self) -> space.Inert:
        """Keys that cannot matter in this stage's trials (the speed stage's winner fixed)."""
        return space.inert_given({**self.settings, **self.speed_params}, cuda=self.cuda)

    def speed_objective(self, trial: Any) -> float:
        params = optuna_study.suggest(trial, space.speed_space(self.cfg.search), self.inert())
        tcfg = self.cfg.replace(params)
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
            result = speed_trial(tcfg, self.data, steps=self.cfg.search.speed_steps)
            mlflow_store.log_metrics(result)
            for key, value in result.items():
                trial.set_user_attr(key, value)
            return result["train_samples_per_s"]

    def quality_objective(self, trial: Any) -> float:
        params = optuna_study.suggest(trial, space.quality_space(self.cfg.search), self.inert())
        tcfg = self.cfg.replace(space.consistent(self.settings, {**self.speed_params, **params}))
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
                    trial.report(row[metric], int(row["epoch"]))
            outcome = train_model(
                tcfg,
                self.data,
                folder=Path(tmp),
                resume=resume,
                progress=self.progress,
                callbacks=[
                    RunRecorder(tcfg, self.data, Path(tmp)),
                    PruneOnPlateau(trial, metric),
                ],
            )
            speed = finish_run(tcfg, outcome, self.data.classes)
            best = max(h[metric] for h in outcome.state.history)
            trial.set_user_attr(f"best_{metric}", best)
            if speed is not None:
                trial.set_user_attr("train_samples_per_s", speed.train_samples_per_s)
            return best
