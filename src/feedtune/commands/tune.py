"""``feedtune tune``: a speed stage then a quality stage (``tuning.stages``), under one parent
MLflow run that collects the study's table, plots and best trial.

Under torchrun the processes are one worker of the study: rank 0 owns the study and the MLflow
runs and sends each trial to the others (``tuning.trial_group``), which train their share."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from feedtune.config import PROJECT_ROOT, Config
from feedtune.sources.prepare import PreparedData, prepare_data
from feedtune.tracking import mlflow_models, mlflow_store
from feedtune.tracking.urls import redact
from feedtune.training.devices import resolve_device
from feedtune.training.distributed import Dist, init_from_env
from feedtune.tuning import optuna_storage, optuna_study
from feedtune.tuning.space import covers, quality_space, speed_space
from feedtune.tuning.stages import SKIPPED_ATTR, STAGES, Tuner, close_dead_trial_run
from feedtune.tuning.trial_group import Order, TrialGroup, follow

DEFAULT_STORAGE = PROJECT_ROOT / "optuna.journal"
log = logging.getLogger(__name__)
# Below this rank correlation the low-budget ranking did not predict the full one.
RUNG_SPEARMAN_WARN = 0.5


# A winner must beat the start configuration by more than this many noise standard deviations.
NOISE_MARGIN_SD = 2.0


@dataclass
class TuneResult:
    parent_run_id: str
    study_name: str
    storage: str
    best_run_id: str | None
    best_value: float | None
    best_params: dict[str, Any]
    start_value: float | None = None
    noise_sd: float | None = None
    winner_vs_start: str = ""  # better | within_noise
    winner_is_start: bool = False  # the best trial is the start configuration's own
    speed_skipped: str = ""


def verdict(
    best: float, start_scores: list[float], *, best_is_start: bool = False
) -> tuple[float, float | None, str]:
    """(start score, noise sd, better|within_noise): ``better`` only when the best beats the
    start configuration's mean by more than ``NOISE_MARGIN_SD`` standard deviations of the
    start configuration's own runs (at least two needed), and is not one of those runs
    (``best_is_start``: a lucky seed of the start is no reason to change anything)."""
    start = float(np.mean(start_scores))
    sd = float(np.std(start_scores, ddof=1)) if len(start_scores) >= 2 else None
    better = not best_is_start and sd is not None and best - start > NOISE_MARGIN_SD * sd
    return start, sd, "better" if better else "within_noise"


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
) -> TuneResult | None:
    """Run the requested stages within ``timeout`` seconds (default ``search.timeout_s``; the
    speed stage gets at most ``search.speed_share`` of it); returns the parent run, the best
    quality trial and how it compares with the start configuration.

    Under torchrun (``WORLD_SIZE`` > 1) this is one process of the group: rank 0 runs the study
    and returns its result, the others train the trials it sends and return None."""
    started = time.monotonic()
    if stage not in (*STAGES, "all"):
        raise ValueError(f"--stage {stage!r}: allowed: speed, quality, all")
    with _process_group(cfg) as group:
        if not group.dist.is_main:
            _follow(cfg, group)
            return None
        stages = STAGES if stage == "all" else (stage,)
        budget = timeout if timeout is not None else cfg.search.timeout_s
        job_deadline = None if budget is None else started + budget
        speed_deadline = None if budget is None else started + budget * cfg.search.speed_share
        storage_url = storage or optuna_storage.storage_url_for(DEFAULT_STORAGE)
        study_storage = optuna_storage.open_storage(storage_url, on_dead_trial=close_dead_trial_run)
        base = study_name or cfg.experiment
        mlflow_store.setup(cfg.experiment)
        mlflow_store.close_dead_runs(cfg.experiment)
        data = prepare_data(cfg, progress=progress)
        group.agree(cfg, data.split.digest)
        tuner = Tuner(cfg, data, base, progress=progress, group=group)
        in_group = group.dist.enabled  # a failed trial ends the group's job
        seed = cfg.search.sampler_seed if cfg.search.sampler_seed is not None else cfg.seed
        result = TuneResult("", base, redact(storage_url), None, None, {})
        with (
            _outer_project_run() as project_run,
            _study_run(
                cfg, base, storage_url, data, nested=project_run is not None, dist=group.dist
            ) as parent,
        ):
            result.parent_run_id = parent.info.run_id
            speed_study = optuna_study.create_study(f"{base}-speed", study_storage, seed=seed)
            optuna_storage.reap_dead_trials(speed_study, on_dead_trial=close_dead_trial_run)
            if "speed" in stages and speed_space(cfg.search):
                before = optuna_study.n_trials(speed_study)
                optuna_study.optimize(
                    speed_study,
                    tuner.start_stage(speed_study, "speed"),
                    n_trials=tuner.planned_trials("speed", n_trials),
                    timeout=_seconds_left(speed_deadline),
                    progress=progress,
                    callbacks=[tuner.stop_before(speed_deadline)],
                    stop_on_error=in_group,
                )
                result.speed_skipped = _log_speed_stage(speed_study, before)
            speed_params = _log_best_speed(speed_study)
            _log_study(speed_study, "study/speed")
            if "quality" in stages:
                quality = _quality_study(cfg, base, study_storage, seed)
                noise = tuner.noise_runs(
                    _noise_seeds(cfg), speed_params=speed_params, deadline=job_deadline
                )
                optuna_study.optimize(
                    quality,
                    tuner.start_stage(
                        quality, "quality", speed_params=speed_params, deadline=job_deadline
                    ),
                    n_trials=tuner.planned_trials("quality", n_trials),
                    timeout=_seconds_left(job_deadline),
                    progress=progress,
                    callbacks=[tuner.stop_before(job_deadline)],
                    stop_on_error=in_group,
                )
                _log_quality_stage(result, quality, noise, cfg, speed_params)
        group.send(Order("done"), cfg)  # the other processes end
    return result


@contextlib.contextmanager
def _process_group(cfg: Config) -> Iterator[TrialGroup]:
    """Under torchrun, the job's process group (started here, ended on leaving); else one
    process alone."""
    dist = init_from_env(resolve_device(cfg.train.device), cfg.train.dist_timeout_s)
    try:
        yield TrialGroup(dist)
    finally:
        dist.destroy()


def _follow(cfg: Config, group: TrialGroup) -> None:
    """A process other than rank 0: the same data, then whatever rank 0 sends."""
    data = prepare_data(cfg, progress=False)
    group.agree(cfg, data.split.digest)
    device = group.dist.device(resolve_device(cfg.train.device))
    follow(cfg, data, group, device)


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextlib.contextmanager
def _study_run(
    cfg: Config, base: str, storage_url: str, data: PreparedData, *, nested: bool, dist: Dist
) -> Any:
    """The study's parent run, with what every trial shares: config, split, bad files, and
    how many processes train each trial."""
    tags = {
        "optuna.study_name": base,
        "optuna.storage": redact(storage_url),
        "feedtune.split_digest": data.split.digest,
        "feedtune.world_size": str(dist.world_size),
    }
    with (
        mlflow_store.start_run("study", run_name=base, nested=nested, tags=tags) as parent,
        mlflow_store.heartbeat(parent.info.run_id),
    ):
        mlflow_store.log_config(cfg)
        mlflow_store.log_split(data.split)
        mlflow_store.log_bad_images(data.bad)
        yield parent


def _log_speed_stage(study: Any, before: int) -> str:
    """Whether this job's speed stage stopped after the start (model-bound): the reason."""
    skipped = optuna_study.user_attr_since(study, SKIPPED_ATTR, before) or ""
    if skipped:
        print(f"feedtune: speed stage skipped after its first trial ({skipped})")
    mlflow_store.set_tags({"feedtune.speed_stage": "skipped" if skipped else "searched"})
    return skipped


def _log_best_speed(study: Any) -> dict[str, Any]:
    """The speed stage's winner (empty when it ran no trial), on the parent run."""
    best = optuna_study.best_trial(study)
    if best is None:
        return {}
    params = dict(best.params)
    mlflow_store.log_metrics({"best_speed_train_samples_per_s": best.value})
    mlflow_store.set_tags({"feedtune.best_speed_run_id": best.user_attrs.get("mlflow_run_id", "")})
    mlflow_store.log_json(params, "study/best_speed_params.json")
    return params


def _quality_study(cfg: Config, base: str, storage: Any, seed: int) -> Any:
    search = cfg.search
    study = optuna_study.create_study(
        f"{base}-quality",
        storage,
        seed=seed,
        pruner=search.pruner,
        sampler_startup_trials=search.startup_trials,
        startup_trials=search.pruner_startup_trials,
        warmup_epochs=search.pruner_warmup_epochs,
        min_epochs=search.min_epochs,
        reduction_factor=search.reduction_factor,
    )
    optuna_storage.reap_dead_trials(study, on_dead_trial=close_dead_trial_run)
    return study


def _noise_seeds(cfg: Config) -> list[int]:
    """Seeds the start configuration is trained with besides the trials: ``search.noise_seeds``
    more, and its own first when no trial can run the start values."""
    seeds = [cfg.seed + 1 + i for i in range(cfg.search.noise_seeds)]
    if not covers(quality_space(cfg.search), cfg.flat()):
        seeds.insert(0, cfg.seed)
    return seeds


def _log_quality_stage(
    result: TuneResult, study: Any, noise: list[float], cfg: Config, speed_params: dict[str, Any]
) -> None:
    """The study's table and plots, the rung correlation, the verdict, and the best trial's
    model registered with alias ``best``."""
    metric = cfg.search.metric
    _log_study(study, "study", metric=f"best_{metric}")
    _log_rung_spearman(study, cfg)
    best = optuna_study.best_trial(study)
    if best is None:
        return
    _log_verdict(result, best, study, noise, metric)
    result.best_run_id = best.user_attrs.get("mlflow_run_id")
    result.best_value = best.value
    result.best_params = {**speed_params, **best.params}
    mlflow_store.set_tags({"feedtune.best_run_id": result.best_run_id})
    mlflow_store.log_metrics({f"best_{metric}": best.value})
    mlflow_store.log_json(result.best_params, "study/best_params.json")
    moved, version = register_best(result.best_run_id, cfg)
    mlflow_store.set_tags(
        {"feedtune.registered_version": version or "", "feedtune.alias_moved": str(moved).lower()}
    )


def register_best(run_id: str, cfg: Config) -> tuple[bool, str | None]:
    """Register ``run_id``'s model under the experiment's name with alias ``best`` unless the
    run the alias points at scored at least as well on the study's own metric."""
    return mlflow_models.register_if_better(
        run_id, cfg.experiment, metric=f"best_{cfg.search.metric}"
    )


def _log_study(study: Any, folder: str, metric: str = "train_samples_per_s") -> None:
    if not study.get_trials(deepcopy=False):
        return
    mlflow_store.log_dataframe(optuna_study.trials_table(study), f"{folder}/trials.csv")
    figs = optuna_study.figures(study, pareto_x="train_samples_per_s", pareto_y=metric)
    if metric == "train_samples_per_s":
        figs.pop("pareto_front", None)  # speed vs itself says nothing
    for name, fig in figs.items():
        mlflow_store.log_figure(fig, f"{folder}/{name}.png")


def _log_rung_spearman(study: Any, cfg: Config) -> None:
    epochs = {"rung_epochs": cfg.search.min_epochs, "full_epochs": cfg.train.epochs}
    n = len(optuna_study.rung_pairs(study, **epochs))
    rho = optuna_study.rung_spearman(study, **epochs)
    if rho is None:
        log.info(
            "rung_spearman not computed: %d trial(s) ran all %d epochs, it needs 3 with "
            "different scores (a longer --timeout promotes more)",
            n,
            cfg.train.epochs,
        )
        return
    mlflow_store.log_metrics({"rung_spearman": rho})
    if rho < RUNG_SPEARMAN_WARN:
        log.warning(
            "the ranking after %d epoch(s) predicted the final one poorly (Spearman %.2f over "
            "%d trials): raise search.min_epochs",
            cfg.search.min_epochs,
            rho,
            n,
        )


def _log_verdict(
    result: TuneResult, best: Any, study: Any, noise: list[float], metric: str
) -> None:
    """Start score, noise and whether the winner (``best``, a trial) beat the start
    configuration, on the parent run and in ``result``."""
    start = optuna_study.start_trial(study)
    scores = ([start.value] if start is not None else []) + noise
    if not scores:
        return
    result.winner_is_start = start is not None and best.number == start.number
    result.start_value, result.noise_sd, result.winner_vs_start = verdict(
        best.value, scores, best_is_start=result.winner_is_start
    )
    metrics = {f"start_{metric}": result.start_value}
    if result.noise_sd is not None:
        metrics[f"noise_{metric}_sd"] = result.noise_sd
    mlflow_store.log_metrics(metrics)
    mlflow_store.set_tags({"feedtune.winner_vs_start": result.winner_vs_start})
