"""``feedtune tune``: a speed stage then a quality stage (``tuning.stages``), under one parent
MLflow run that collects the study's table, plots and best trial.

Under torchrun the processes are one worker of the study: rank 0 owns the study and the MLflow
runs and sends each trial to the others (``tuning.trial_group``), which train their share."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from feedtune.config import PROJECT_ROOT, Config
from feedtune.feed.auto import resolve_auto
from feedtune.sources.prepare import PreparedData, prepare_data
from feedtune.tracking import mlflow_models, mlflow_store
from feedtune.tracking.urls import redact
from feedtune.training.distributed import Dist
from feedtune.training.run_context import RunContext, run_context
from feedtune.tuning import optuna_storage, optuna_study
from feedtune.tuning.quality_stage import QualityOutcome, QualityStage, StageTimes, log_outcome
from feedtune.tuning.recheck import Verdict
from feedtune.tuning.space import speed_space
from feedtune.tuning.stages import SKIPPED_ATTR, STAGES, Tuner, close_dead_trial_run
from feedtune.tuning.trial_group import Order, TrialGroup, follow

DEFAULT_STORAGE = PROJECT_ROOT / "optuna.journal"
log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """The study's answer: the recommended trial (``best_*``: its run, its score at the
    study's seed, its settings) and the re-check's verdict behind the recommendation."""

    parent_run_id: str
    study_name: str
    storage: str
    best_run_id: str | None
    best_value: float | None
    best_params: dict[str, Any]
    verdict: Verdict | None = None
    speed_skipped: str = ""
    times: StageTimes | None = None

    @property
    def winner_vs_start(self) -> str:
        """better | within_noise ("" without a re-check)."""
        if self.verdict is None:
            return ""
        return "better" if self.verdict.better else "within_noise"


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
    with run_context(cfg) as ctx:
        group = TrialGroup(ctx.dist)  # under torchrun, the job's process group; else one alone
        if not group.dist.is_main:
            _follow(cfg, group, ctx)
            return None
        job = _TuneJob.open(cfg, stage, timeout, storage, study_name, started, group, progress)
        cfg = job.cfg  # the start configuration's values, as its trials run and record them
        tuner = Tuner(cfg, job.data, job.base, progress=progress, group=group, device=ctx.device)
        ctx.stop.check()  # a signal during the preparation: no run opened yet
        in_group = group.dist.enabled  # a failed trial ends the group's job
        result = TuneResult("", job.base, redact(job.storage_url), None, None, {})
        with (
            _outer_project_run() as project_run,
            _study_run(job, nested=project_run is not None, dist=group.dist) as parent,
        ):
            result.parent_run_id = parent.info.run_id
            speed_started = time.monotonic()
            speed_study = job.study("speed")
            before = optuna_study.n_trials(speed_study)  # start_stage enqueues the start's trial
            speed_args = _speed_search_args(job, tuner, speed_study, n_trials, progress, in_group)
            if speed_args is not None:  # optimize called here: a frame fewer to the train step
                optuna_study.optimize(speed_study, **speed_args)
                result.speed_skipped = _log_speed_stage(speed_study, before)
            speed_params = _log_speed_study(speed_study)
            if "quality" in job.stages:
                quality = job.study("quality")
                speed_s = time.monotonic() - speed_started
                stage_q = QualityStage(tuner, quality, speed_params, job.deadline, speed_s)
                optuna_study.optimize(
                    quality,
                    **stage_q.search_args(n_trials, progress=progress, stop_on_error=in_group),
                )
                _log_quality_stage(result, quality, stage_q.finish(), cfg)
        group.send(Order("done"), cfg)  # the other processes end
    return result


@dataclass
class _TuneJob:
    """What rank 0's study job is set up with before any run opens: its stages and
    deadlines, the Optuna storage, the prepared data and the start configuration."""

    cfg: Config
    stages: tuple[str, ...]
    deadline: float | None
    speed_deadline: float | None
    storage_url: str
    storage: Any
    base: str
    data: PreparedData

    @classmethod
    def open(
        cls,
        cfg: Config,
        stage: str,
        timeout: float | None,
        storage: str | None,
        study_name: str | None,
        started: float,
        group: TrialGroup,
        progress: bool,
    ) -> _TuneJob:
        budget = timeout if timeout is not None else cfg.search.timeout_s
        deadline = None if budget is None else started + budget
        speed_deadline = None if budget is None else started + budget * cfg.search.speed_share
        storage_url = storage or optuna_storage.storage_url_for(DEFAULT_STORAGE)
        study_storage = optuna_storage.open_storage(storage_url, on_dead_trial=close_dead_trial_run)
        mlflow_store.setup(cfg.experiment)
        mlflow_store.close_dead_runs(cfg.experiment)
        data = prepare_data(cfg, progress=progress)
        group.agree(cfg, data.split.digest)
        return cls(
            cfg=resolve_auto(cfg, data),
            stages=STAGES if stage == "all" else (stage,),
            deadline=deadline,
            speed_deadline=speed_deadline,
            storage_url=storage_url,
            storage=study_storage,
            base=study_name or cfg.experiment,
            data=data,
        )

    def study(self, stage: str) -> Any:
        """The stage's study (created, or resumed with its dead trials failed)."""
        seed = self.cfg.search.sampler_seed
        seed = self.cfg.seed if seed is None else seed
        if stage == "quality":
            return _quality_study(self.cfg, self.base, self.storage, seed)
        study = optuna_study.create_study(f"{self.base}-speed", self.storage, seed=seed)
        optuna_storage.reap_dead_trials(study, on_dead_trial=close_dead_trial_run)
        return study


def _speed_search_args(
    job: _TuneJob,
    tuner: Tuner,
    study: Any,
    n_trials: int | None,
    progress: bool,
    stop_on_error: bool,
) -> dict[str, Any] | None:
    """``optuna_study.optimize``'s arguments for the speed stage; None when the job has no
    speed stage or the config searches no speed setting."""
    if "speed" not in job.stages or not speed_space(job.cfg.search):
        return None
    return {
        "objective": tuner.start_stage(study, "speed"),
        "n_trials": tuner.planned_trials("speed", n_trials),
        "timeout": _seconds_left(job.speed_deadline),
        "progress": progress,
        "callbacks": [tuner.stop_before(job.speed_deadline)],
        "stop_on_error": stop_on_error,
    }


def _follow(cfg: Config, group: TrialGroup, ctx: RunContext) -> None:
    """A process other than rank 0: the same data, then whatever rank 0 sends."""
    data = prepare_data(cfg, progress=False)
    group.agree(cfg, data.split.digest)
    cfg = resolve_auto(cfg, data)
    follow(cfg, data, group, ctx.device)


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextlib.contextmanager
def _study_run(job: _TuneJob, *, nested: bool, dist: Dist) -> Any:
    """The study's parent run, with what every trial shares: config, split, bad files, and
    how many processes train each trial."""
    tags = {
        "optuna.study_name": job.base,
        "optuna.storage": redact(job.storage_url),
        "feedtune.split_digest": job.data.split.digest,
        "feedtune.world_size": str(dist.world_size),
    }
    with (
        mlflow_store.start_run("study", run_name=job.base, nested=nested, tags=tags) as parent,
        mlflow_store.heartbeat(parent.info.run_id),
    ):
        mlflow_store.log_config(job.cfg)
        mlflow_store.log_split(job.data.split)
        mlflow_store.log_bad_images(job.data.bad)
        yield parent


def _log_speed_stage(study: Any, before: int) -> str:
    """Whether this job's speed stage stopped after the start (model-bound): the reason."""
    skipped = optuna_study.user_attr_since(study, SKIPPED_ATTR, before) or ""
    if skipped:
        print(f"feedtune: speed stage skipped after its first trial ({skipped})")
    mlflow_store.set_tags({"feedtune.speed_stage": "skipped" if skipped else "searched"})
    return skipped


def _log_speed_study(study: Any) -> dict[str, Any]:
    """The speed stage's winner's settings (empty when it ran no trial), then the study's
    table and plots, on the parent run."""
    params = _log_best_speed(study)
    _log_study(study, "study/speed")
    return params


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
        full_epochs=cfg.train.epochs,
        rung_trust=search.rung_trust,
    )
    optuna_storage.reap_dead_trials(study, on_dead_trial=close_dead_trial_run)
    return study


def _log_quality_stage(
    result: TuneResult, study: Any, outcome: QualityOutcome, cfg: Config
) -> None:
    """The study's table and plots, the rung figures, the verdict, and the recommended trial's
    model registered with alias ``best``."""
    metric = cfg.search.metric
    _log_study(study, "study", metric=f"best_{metric}")
    log_outcome(outcome, cfg)
    result.verdict, result.times = outcome.verdict, outcome.times
    if outcome.run_id is None:
        return
    result.best_run_id, result.best_value = outcome.run_id, outcome.value
    result.best_params = outcome.settings
    mlflow_store.set_tags({"feedtune.best_run_id": result.best_run_id})
    mlflow_store.log_metrics({f"best_{metric}": outcome.value})
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
