"""``feedtune tune``: a speed stage then a quality stage (``tuning.stages``), under one parent
MLflow run that collects the study's table, plots and best trial."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from feedtune.config import PROJECT_ROOT, Config
from feedtune.data.pipeline import prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tuning import optuna_study
from feedtune.tuning.space import speed_space
from feedtune.tuning.stages import STAGES, Tuner, close_dead_trial_run

DEFAULT_STORAGE = PROJECT_ROOT / "optuna.journal"


@dataclass
class TuneResult:
    parent_run_id: str
    study_name: str
    storage: str
    best_run_id: str | None
    best_value: float | None
    best_params: dict[str, Any]


@contextlib.contextmanager
def _outer_project_run() -> Any:
    """Under ``mlflow run`` the project run is open in MLFLOW_RUN_ID: nest the study in it."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        # MLflow resumes MLFLOW_RUN_ID on every start_run while it is set, nested ones too:
        # take it out of the environment once the project run is open.
        with mlflow_store.start_run("project", run_id=run_id, system_metrics=False) as run:
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
    storage_url = storage or optuna_study.storage_url_for(DEFAULT_STORAGE)
    optuna_storage = optuna_study.open_storage(storage_url, on_dead_trial=close_dead_trial_run)
    base = study_name or cfg.experiment
    mlflow_store.setup(cfg.experiment)
    mlflow_store.close_dead_runs(cfg.experiment)
    data = prepare_data(cfg, progress=progress)
    tuner = Tuner(cfg, data, base, progress=progress)
    seed = cfg.search.sampler_seed if cfg.search.sampler_seed is not None else cfg.seed
    result = TuneResult("", base, mlflow_store.redact(storage_url), None, None, {})
    with (
        _outer_project_run() as project_run,
        mlflow_store.start_run(
            "study",
            run_name=base,
            nested=project_run is not None,
            tags={
                "optuna.study_name": base,
                "optuna.storage": mlflow_store.redact(storage_url),
                "feedtune.split_digest": data.split.digest,
            },
        ) as parent,
    ):
        result.parent_run_id = parent.info.run_id
        mlflow_store.log_config(cfg)
        mlflow_store.log_split(data.split)
        mlflow_store.log_bad_images(data.bad)
        speed_study = optuna_study.create_study(f"{base}-speed", optuna_storage, seed=seed)
        optuna_study.reap_dead_trials(speed_study, on_dead_trial=close_dead_trial_run)
        if "speed" in stages and speed_space(cfg.search):
            tuner.optimize(speed_study, "speed", n_trials=n_trials, timeout=timeout)
        best_speed = optuna_study.best_trial(speed_study)
        if best_speed is not None:
            tuner.speed_params = dict(best_speed.params)
            mlflow_store.log_metrics({"best_speed_train_samples_per_s": best_speed.value})
            mlflow_store.set_tags(
                {"feedtune.best_speed_run_id": best_speed.user_attrs.get("mlflow_run_id", "")}
            )
            mlflow_store.log_json(tuner.speed_params, "study/best_speed_params.json")
        _log_study(speed_study, "study/speed")
        if "quality" in stages:
            quality = optuna_study.create_study(
                f"{base}-quality",
                optuna_storage,
                seed=seed,
                pruner=cfg.search.pruner,
                startup_trials=cfg.search.pruner_startup_trials,
                warmup_epochs=cfg.search.pruner_warmup_epochs,
            )
            optuna_study.reap_dead_trials(quality, on_dead_trial=close_dead_trial_run)
            tuner.optimize(quality, "quality", n_trials=n_trials, timeout=timeout)
            _log_study(quality, "study", metric=f"best_{cfg.search.metric}")
            best = optuna_study.best_trial(quality)
            if best is not None:
                result.best_run_id = best.user_attrs.get("mlflow_run_id")
                result.best_value = best.value
                result.best_params = {**tuner.speed_params, **best.params}
                mlflow_store.set_tags({"feedtune.best_run_id": result.best_run_id})
                mlflow_store.log_metrics({f"best_{cfg.search.metric}": best.value})
                mlflow_store.log_json(result.best_params, "study/best_params.json")
                moved, version = mlflow_store.register_if_better(result.best_run_id, cfg.experiment)
                mlflow_store.set_tags(
                    {
                        "feedtune.registered_version": version or "",
                        "feedtune.alias_moved": str(moved).lower(),
                    }
                )
    return result


def _log_study(study: Any, folder: str, metric: str = "train_samples_per_s") -> None:
    if not study.get_trials(deepcopy=False):
        return
    mlflow_store.log_dataframe(optuna_study.trials_table(study), f"{folder}/trials.csv")
    figs = optuna_study.figures(study, pareto_x="train_samples_per_s", pareto_y=metric)
    if metric == "train_samples_per_s":
        figs.pop("pareto_front", None)  # speed vs itself says nothing
    for name, fig in figs.items():
        mlflow_store.log_figure(fig, f"{folder}/{name}.png")
