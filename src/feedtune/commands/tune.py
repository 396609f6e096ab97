"""``feedtune tune``: a speed stage then a quality stage, every trial a nested MLflow run.

Speed trials run a fixed number of real training steps (no validation) and maximise
``train_samples_per_s``; the best speed settings are then fixed for the quality trials, which
train, maximise ``val_f1_macro`` with pruning, and record their throughput too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from feedtune.commands.train import (
    PreparedData,
    build_pipeline,
    download_resume,
    log_run_results,
    prepare_data,
    relog_missing_epochs,
    train_model,
)
from feedtune.config import PROJECT_ROOT, Config
from feedtune.data import augment, loader, sampling
from feedtune.tracking import mlflow_store as tracking
from feedtune.tracking.liveness import worker_info
from feedtune.training.engine import Callback, prepare_model, resolve_device
from feedtune.training.models import build_model
from feedtune.training.throughput import measure_and_log, measure_training
from feedtune.tuning import optuna_study as studies

STAGES = ("speed", "quality")
DEFAULT_STORAGE = PROJECT_ROOT / "optuna.journal"


class PruneOnPlateau(Callback):
    """Reports each epoch's metric to the Optuna trial; the pruner may stop the trial."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_epoch_end(self, epoch, metrics, **_: Any) -> None:
        studies.report(self.trial, metrics[self.metric], epoch)


@dataclass
class TuneResult:
    parent_run_id: str
    study_name: str
    storage: str
    best_run_id: str | None
    best_value: float | None
    best_params: dict[str, Any]


def _trial_tags(stage: str, study_name: str, number: int) -> dict[str, str]:
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
        model, pipeline.train_loader, device=device, steps=steps
    )
    return {"train_samples_per_s": rate, "data_wait_frac": wait_frac, "train_startup_s": startup}


def inert_settings(values: dict[str, Any], *, cuda: bool) -> set[str]:
    """Dotted keys that cannot change a trial given the other ``values`` (all settings)."""
    return (
        loader.inert_settings(values, cuda=cuda)
        | sampling.inert_settings(values)
        | augment.inert_settings(values)
    )


def inert_given(settings: dict[str, Any], *, cuda: bool) -> studies.Inert:
    """The ``inert`` callback of ``studies.suggest``/``grid`` for a trial whose settings, apart
    from the values drawn, are ``settings`` (a config's ``flat()``)."""
    return lambda values: inert_settings({**settings, **values}, cuda=cuda)


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
        space = search.speed_space() if speed else search.quality_space()
        planned = search.n_trials_speed if speed else search.n_trials_quality
        if search.enqueue_config:
            studies.enqueue_values(study, space, {**self.settings, **self.speed_params})
        studies.optimize(
            study,
            self.speed_objective if speed else self.quality_objective,
            n_trials=planned if n_trials is None else n_trials,
            timeout=timeout,
            progress=self.progress,
        )

    def inert(self) -> studies.Inert:
        """Keys that cannot matter in this stage's trials (the speed stage's winner fixed)."""
        return inert_given({**self.settings, **self.speed_params}, cuda=self.cuda)

    def speed_objective(self, trial: Any) -> float:
        params = studies.suggest(trial, self.cfg.search.speed_space(), self.inert())
        tcfg = self.cfg.replace(params)
        name = f"{self.study_base}-speed"
        with tracking.start_run(
            "trial",
            nested=True,
            run_name=f"speed-{trial.number}",
            tags=_trial_tags("speed", name, trial.number),
            system_metrics=False,
        ) as run:
            _claim(trial, run.info.run_id)
            tracking.log_config(tcfg)
            result = speed_trial(tcfg, self.data, steps=self.cfg.search.speed_steps)
            tracking.log_metrics(result)
            for key, value in result.items():
                trial.set_user_attr(key, value)
            return result["train_samples_per_s"]

    def quality_objective(self, trial: Any) -> float:
        params = studies.suggest(trial, self.cfg.search.quality_space(), self.inert())
        tcfg = self.cfg.replace({**self.speed_params, **params})
        name = f"{self.study_base}-quality"
        metric = self.cfg.search.metric
        with (
            tracking.start_run(
                "trial",
                nested=True,
                run_name=f"quality-{trial.number}",
                tags=_trial_tags("quality", name, trial.number),
            ) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            previous = _claim(trial, run.info.run_id)
            tracking.set_tags({"feedtune.split_digest": self.data.split.digest})
            # A retried trial (its worker died) continues from the dead run's last checkpoint.
            resume = download_resume(previous, Path(tmp)) if previous else None
            if resume is not None:
                tracking.set_tags({"feedtune.resumed_from_run_id": previous})
                relog_missing_epochs(run.info.run_id, resume)
                for row in resume["train_state"]["history"]:  # the pruner sees every epoch
                    trial.report(row[metric], int(row["epoch"]))
            outcome = train_model(
                tcfg,
                self.data,
                folder=Path(tmp),
                resume=resume,
                progress=self.progress,
                callbacks=[PruneOnPlateau(trial, metric)],
            )
            log_run_results(tcfg, outcome, self.data.classes)
            speed = measure_and_log(tcfg, outcome.pipeline, outcome.model)
            best = max(h[metric] for h in outcome.state.history)
            trial.set_user_attr(f"best_{metric}", best)
            if speed is not None:
                trial.set_user_attr("train_samples_per_s", speed.train_samples_per_s)
            return best


def _claim(trial: Any, run_id: str) -> str | None:
    """Record which process and MLflow run work on ``trial``; returns the run of the attempt
    this one retries (None for a first attempt)."""
    previous = trial.user_attrs.get("mlflow_run_id")
    trial.set_user_attr("worker", worker_info())
    trial.set_user_attr("mlflow_run_id", run_id)
    return previous


def _close_dead_trial_run(trial: Any) -> None:
    """A trial whose worker died must not leave its MLflow run RUNNING."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        tracking.end_run_by_id(run_id, "KILLED")


@contextlib.contextmanager
def _outer_project_run() -> Any:
    """Under ``mlflow run`` the project run is open in MLFLOW_RUN_ID: nest the study in it."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        # MLflow resumes MLFLOW_RUN_ID on every start_run while it is set, nested ones too:
        # take it out of the environment once the project run is open.
        with tracking.start_run("project", run_id=run_id, system_metrics=False) as run:
            yield run
    else:
        yield None


def run_tune(
    cfg: Config,
    *,
    stage: str = "all",
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = True,
) -> TuneResult:
    """Run the requested stages; returns the parent run and the best quality trial."""
    if stage not in (*STAGES, "all"):
        raise ValueError(f"--stage {stage!r}: allowed: speed, quality, all")
    stages = STAGES if stage == "all" else (stage,)
    storage_url = storage or studies.storage_url_for(DEFAULT_STORAGE)
    studies.on_dead_trial = _close_dead_trial_run
    optuna_storage = studies.open_storage(storage_url)
    base = study_name or cfg.experiment
    tracking.setup(cfg.experiment)
    tracking.close_dead_runs(cfg.experiment)
    data = prepare_data(cfg, progress=progress)
    tuner = Tuner(cfg, data, base, progress=progress)
    seed = cfg.search.sampler_seed if cfg.search.sampler_seed is not None else cfg.seed
    result = TuneResult("", base, storage_url, None, None, {})
    with (
        _outer_project_run() as project_run,
        tracking.start_run(
            "study",
            run_name=base,
            nested=project_run is not None,
            tags={
                "optuna.study_name": base,
                "optuna.storage": studies.redact(storage_url),
                "feedtune.split_digest": data.split.digest,
            },
        ) as parent,
    ):
        result.parent_run_id = parent.info.run_id
        tracking.log_config(cfg)
        tracking.log_split(data.split)
        tracking.log_bad_images(data.bad)
        speed_study = studies.create_study(f"{base}-speed", optuna_storage, seed=seed)
        studies.reap_dead_trials(speed_study)
        if "speed" in stages and cfg.search.speed_space():
            tuner.optimize(speed_study, "speed", n_trials=n_trials, timeout=timeout)
        best_speed = studies.best_trial(speed_study)
        if best_speed is not None:
            tuner.speed_params = dict(best_speed.params)
            tracking.log_metrics({"best_speed_train_samples_per_s": best_speed.value})
            tracking.set_tags(
                {"feedtune.best_speed_run_id": best_speed.user_attrs.get("mlflow_run_id", "")}
            )
            tracking.log_json(tuner.speed_params, "study/best_speed_params.json")
        _log_study(speed_study, "study/speed")
        if "quality" in stages:
            quality = studies.create_study(
                f"{base}-quality",
                optuna_storage,
                seed=seed,
                pruner=cfg.search.pruner,
                startup_trials=cfg.search.pruner_startup_trials,
                warmup_epochs=cfg.search.pruner_warmup_epochs,
            )
            studies.reap_dead_trials(quality)
            tuner.optimize(quality, "quality", n_trials=n_trials, timeout=timeout)
            _log_study(quality, "study", metric=f"best_{cfg.search.metric}")
            best = studies.best_trial(quality)
            if best is not None:
                result.best_run_id = best.user_attrs.get("mlflow_run_id")
                result.best_value = best.value
                result.best_params = {**tuner.speed_params, **best.params}
                tracking.set_tags({"feedtune.best_run_id": result.best_run_id})
                tracking.log_metrics({f"best_{cfg.search.metric}": best.value})
                tracking.log_json(result.best_params, "study/best_params.json")
                moved, version = tracking.register_if_better(result.best_run_id, cfg.experiment)
                tracking.set_tags(
                    {
                        "feedtune.registered_version": version or "",
                        "feedtune.alias_moved": str(moved).lower(),
                    }
                )
    return result


def _log_study(study: Any, folder: str, metric: str = "train_samples_per_s") -> None:
    if not study.get_trials(deepcopy=False):
        return
    tracking.log_dataframe(studies.trials_table(study), f"{folder}/trials.csv")
    figs = studies.figures(study, pareto_x="train_samples_per_s", pareto_y=metric)
    if metric == "train_samples_per_s":
        figs.pop("pareto_front", None)  # speed vs itself says nothing
    for name, fig in figs.items():
        tracking.log_figure(fig, f"{folder}/{name}.png")
