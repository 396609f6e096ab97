"""The quality stage as a whole, on rank 0: the arms' seed runs (the noise), the search with
pruning only at trusted rungs, the winner re-checked on fresh seeds, and the figures that
explain the decision logged on the study's parent run.

The job's budget is split three ways: the arms' trials and their seed runs come first (they are
the answer when nothing beats them, and every pruning decision needs their noise), the search
gets what is left minus a reserve for the re-check (its runs for the search's best trial, each
as long as that configuration's trial took), and the re-check ends the job.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

from feedtune.config import Config
from feedtune.tracking import mlflow_store
from feedtune.tuning import optuna_study
from feedtune.tuning.arms import START
from feedtune.tuning.evidence import PairedDifference, RungEvidence
from feedtune.tuning.recheck import (
    Plan,
    Verdict,
    behind_start,
    plan,
    recheck,
    scores_by_seed,
    trial_name,
)
from feedtune.tuning.rung_pruner import (
    ARM_ATTR,
    OVERRIDES_ATTR,
    TrustedHalvingPruner,
    candidate_rungs,
)
from feedtune.tuning.rung_pruner import rung_report as _rung_report
from feedtune.tuning.seed_claims import claim, new_owner, wait_for_score
from feedtune.tuning.stages import Tuner

log = logging.getLogger(__name__)

# A seed run claimed by another worker this many full runs ago (or STALE_S seconds, before a
# full run was measured here) without its curve is a dead worker's, and is taken over.
STALE_RUNS = 3
STALE_S = 1800.0


@dataclass
class StageTimes:
    """Where this job spent its time, in seconds: the speed stage, then the quality stage's
    arms (their trials and seed runs), search (``search_trials`` trials, pruned ones included)
    and re-check. It says what the answer was worth: a search of two configurations rarely
    shows one better than the start."""

    speed: float = 0.0
    arms: float = 0.0
    search: float = 0.0
    recheck: float = 0.0
    search_trials: int = 0

    def count_trial(self, study: Any, trial: Any) -> None:
        """A study callback: the trial this job just ran, to the arms or the search."""
        if trial.duration is None:
            return
        seconds = trial.duration.total_seconds()
        if trial.user_attrs.get(ARM_ATTR):
            self.arms += seconds
        else:
            self.search += seconds
            self.search_trials += 1

    def metrics(self) -> dict[str, float]:
        return {
            "speed_stage_s": self.speed,
            "arms_s": self.arms,
            "search_s": self.search,
            "recheck_s": self.recheck,
            "search_trials": self.search_trials,
        }

    def words(self) -> str:
        trials = f"{self.search_trials} configuration{'s' * (self.search_trials != 1)}"
        return (
            f"time: speed stage {self.speed:.0f} s, arms and their seeds {self.arms:.0f} s, "
            f"search {self.search:.0f} s ({trials}), re-check {self.recheck:.0f} s"
        )


@dataclass
class QualityOutcome:
    """What the stage hands the command: the recommended trial (its run, score at the study's
    seed and settings), the verdict (None without a re-check), the rung figures and where the
    stage's time went."""

    run_id: str | None
    value: float | None
    settings: dict[str, Any]
    verdict: Verdict | None
    rungs: list[RungEvidence]
    rung_used: int
    times: StageTimes


def seed_runs(
    tuner: Tuner,
    study: Any,
    speed_params: dict[str, Any],
    *,
    deadline: float | None,
    owner: str,
) -> None:
    """Each arm on each of ``search.noise_seeds`` more seeds, those the study lacks and no
    other worker has claimed; the start first, so an anchor already behind it
    (``behind_start``) is spared its runs."""
    cfg = tuner.cfg
    seeds = [cfg.seed + 1 + i for i in range(cfg.search.noise_seeds)]
    for seed in seeds:
        for arm in sorted(tuner.arms, key=lambda a: a.name != START):
            held = scores_by_seed(study, cfg.seed)
            if seed in held.get(arm.name, {}) or (
                arm.name != START and START in held and behind_start(held, arm.name)
            ):
                continue
            if not claim(study, arm.name, seed, owner, stale_s=stale_after(tuner)):
                continue  # another worker trains it
            overrides = tuner.quality_overrides(speed_params, arm.overrides)
            if tuner.seed_run(study, arm.name, overrides, seed, deadline=deadline) is None:
                return


def stale_after(tuner: Tuner) -> float:
    """How old another worker's claim on a seed run may be before it counts as dead:
    ``STALE_RUNS`` full runs as measured here (none measured yet: ``STALE_S``)."""
    if not tuner.full_run_seconds:
        return STALE_S
    return STALE_RUNS * statistics.median(tuner.full_run_seconds)


def reserve_seconds(study: Any, todo: Plan, full_runs: list[float]) -> float:
    """The time the re-check's missing runs will take: each as long as its configuration's
    own trial took (a smaller batch or a slower policy runs longer than the typical full run),
    at least the median full run measured so far."""
    typical = statistics.median(full_runs)
    took = {
        trial_name(t): t.duration.total_seconds()
        for t in optuna_study.complete_trials(study)
        if t.duration is not None
    }
    return sum(max(typical, took.get(name, 0.0)) for name, _ in todo.missing())


class QualityStage:
    """The stage around the study's ``optimize`` (which the command calls itself, one frame
    nearer the training step): ``search_args`` for it (the arms' seed runs come in its
    callback), then ``finish``."""

    def __init__(
        self,
        tuner: Tuner,
        study: Any,
        speed_params: dict[str, Any],
        job_deadline: float | None,
        speed_seconds: float = 0.0,
    ) -> None:
        self.tuner = tuner
        self.study = study
        self.speed_params = speed_params
        self.job_deadline = job_deadline
        self.seeds_done = False
        self.owner = new_owner()  # this worker, in its claims on seed runs
        self.times = StageTimes(speed=speed_seconds)

    def seed_runs_after_arms(self, study: Any, trial: Any) -> None:
        """A study callback: once every arm has its trial, the arms' extra seeds (their noise
        is what later pruning gaps must exceed); the arms themselves come first, so a short
        budget still compares them."""
        if self.seeds_done or not self.tuner.cfg.search.enqueue_config:
            return
        arms = {t.user_attrs.get(ARM_ATTR) for t in optuna_study.complete_trials(study)}
        if len(arms - {None}) < optuna_study.n_arm_trials(study):
            return
        self.seeds_done = True
        started = time.monotonic()
        seed_runs(
            self.tuner, study, self.speed_params, deadline=self.job_deadline, owner=self.owner
        )
        self.times.arms += time.monotonic() - started

    def deadline(self, trial: Any) -> float | None:
        """When a quality trial (None: the next one) must end. The arms run to the job's
        deadline: they are the answer when nothing else is. Other trials leave the re-check
        its reserve: its runs for the search's best trial (``reserve_seconds``; no full run
        measured yet: no reserve)."""
        study, tuner = self.study, self.tuner
        if self.job_deadline is None:
            return None
        arm_next = trial is None and optuna_study.n_trials(study) < optuna_study.n_arm_trials(study)
        if arm_next or (trial is not None and trial.user_attrs.get(ARM_ATTR)):
            return self.job_deadline
        cfg = tuner.cfg
        todo = plan(study, base_seed=cfg.seed, n_seeds=cfg.search.recheck_seeds)
        if not tuner.full_run_seconds or todo is None:
            return self.job_deadline
        return self.job_deadline - reserve_seconds(study, todo, tuner.full_run_seconds)

    def search_args(
        self, n_trials: int | None, *, progress: bool, stop_on_error: bool
    ) -> dict[str, Any]:
        """``optuna_study.optimize``'s arguments: the search ends in time for the re-check."""
        tuner, study = self.tuner, self.study
        objective = tuner.start_stage(
            study, "quality", speed_params=self.speed_params, deadline=self.deadline
        )
        timeout = None if self.job_deadline is None else self.job_deadline - time.monotonic()
        return {
            "objective": objective,
            "n_trials": tuner.planned_trials("quality", n_trials),
            "timeout": None if timeout is None else max(0.0, timeout),
            "progress": progress,
            "callbacks": [
                self.times.count_trial,
                self.seed_runs_after_arms,
                tuner.stop_before(self.deadline, study),
            ],
            "stop_on_error": stop_on_error,
        }

    def finish(self) -> QualityOutcome:
        """The re-check (unless ``search.recheck_seeds`` is 0), then the outcome."""
        study, cfg = self.study, self.tuner.cfg
        verdict = None
        started = time.monotonic()
        if cfg.search.recheck_seeds:
            verdict = recheck(
                study, base_seed=cfg.seed, n_seeds=cfg.search.recheck_seeds, run=self._recheck_run
            )
        self.times.recheck += time.monotonic() - started
        return _outcome(cfg, study, verdict, self.speed_params, self.times)

    def _recheck_run(self, name: str, overrides: dict[str, Any], seed: int) -> float | None:
        """One run of the re-check: trained here, or, when another worker claimed it, its
        score once that worker records it (taken over if that worker died)."""
        tuner, study, stale = self.tuner, self.study, stale_after(self.tuner)
        if claim(study, name, seed, self.owner, stale_s=stale):
            return tuner.seed_run(study, name, overrides, seed, deadline=self.job_deadline)
        score = wait_for_score(study, name, seed, until=self.job_deadline, stale_s=stale)
        if score is None and claim(study, name, seed, self.owner, stale_s=stale):
            return tuner.seed_run(study, name, overrides, seed, deadline=self.job_deadline)
        return score


def _outcome(
    cfg: Config,
    study: Any,
    verdict: Verdict | None,
    speed_params: dict[str, Any],
    times: StageTimes,
) -> QualityOutcome:
    rungs = candidate_rungs(cfg.search.min_epochs, cfg.search.reduction_factor, cfg.train.epochs)
    trials = study.get_trials(deepcopy=False)
    evidence = _rung_report(trials, rungs=rungs, full_epochs=cfg.train.epochs)
    pruner = study.pruner
    used = (
        pruner.trusted_rung(study)
        if isinstance(pruner, TrustedHalvingPruner)
        else cfg.search.min_epochs
    )
    chosen = _recommended_trial(study, verdict)
    if chosen is None:
        return QualityOutcome(None, None, {}, verdict, evidence, used, times)
    settings = chosen.user_attrs.get(OVERRIDES_ATTR)
    if settings is None:  # a trial of a study from before this attribute
        settings = {**speed_params, **chosen.params}
    return QualityOutcome(
        chosen.user_attrs.get("mlflow_run_id"),
        chosen.value,
        dict(settings),
        verdict,
        evidence,
        used,
        times,
    )


def _recommended_trial(study: Any, verdict: Verdict | None) -> Any:
    best = optuna_study.best_trial(study)
    if verdict is None or best is None:
        return best
    for t in optuna_study.complete_trials(study):
        if trial_name(t) == verdict.recommended:
            return t
    return best


def log_outcome(outcome: QualityOutcome, cfg: Config) -> None:
    """The rung figures and the verdict on the study's parent run."""
    metric = cfg.search.metric
    for ev in outcome.rungs:
        figures = {"rung_spearman_n": ev.n}
        if ev.rho is not None:
            figures["rung_spearman"] = ev.rho
        if ev.low is not None:
            figures.update(rung_spearman_low=ev.low, rung_spearman_high=ev.high)
        mlflow_store.log_metrics(figures, step=ev.epochs)  # step: the rung's epochs
    mlflow_store.log_metrics({"rung_used": outcome.rung_used, **outcome.times.metrics()})
    verdict = outcome.verdict
    if verdict is None:
        return
    start = verdict.scores.get(START, {})
    metrics: dict[str, float] = {"recheck_seeds": _n_seeds(verdict)}
    if start:
        metrics[f"start_{metric}"] = sum(start.values()) / len(start)
    if verdict.spread.sd is not None:
        metrics[f"noise_{metric}_sd"] = verdict.spread.sd
    comparisons = (
        ("winner_minus_start", START, verdict.vs_start),
        ("winner_minus_anchor", verdict.anchor, verdict.vs_anchor),
    )
    for name, arm, diff in comparisons:
        if arm == verdict.winner:
            metrics[name] = 0.0  # the winner is that arm itself
        metrics.update(_diff_metrics(name, diff))
    mlflow_store.log_metrics(metrics)
    mlflow_store.set_tags(
        {
            "feedtune.winner_vs_start": "better" if verdict.better else "within_noise",
            "feedtune.winner": verdict.winner,
            "feedtune.recommended": verdict.recommended,
        }
    )


def _n_seeds(verdict: Verdict) -> int:
    diffs = [d for d in (verdict.vs_start, verdict.vs_anchor, verdict.anchor_vs_start) if d]
    return max((d.n for d in diffs), default=0)


def _diff_metrics(name: str, diff: PairedDifference | None) -> dict[str, float]:
    """``name`` (winner minus an arm; 0 when the winner is that arm) and its interval."""
    if diff is None:
        return {}
    out = {name: diff.mean}
    if diff.low is not None:
        out.update({f"{name}_low": diff.low, f"{name}_high": diff.high})
    return out
