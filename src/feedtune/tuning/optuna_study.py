"""Every Optuna call feedtune makes lives here: storages, studies, samplers, pruners,
suggestions from the config's search space, and the study's plots and table."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from feedtune.config import ParamSpec
from feedtune.progress import progress_mode, write_line
from feedtune.tracking.plots import pareto_figure
from feedtune.training import stopping
from feedtune.tuning.arms import START, Arm
from feedtune.tuning.optuna_storage import experimental_ok
from feedtune.tuning.rung_pruner import (
    ARM_ATTR,
    ARM_OVERRIDES_ATTR,
    FULL_LENGTH_ATTR,
    TrustedHalvingPruner,
)
from feedtune.tuning.space import Inert, inside, ordered

log = logging.getLogger(__name__)

TrialPruned = optuna.TrialPruned
# User attribute of the trial that runs the configuration's own values (queued first).
START_ATTR = "start_config"


def _importances_figure(study: optuna.Study) -> Any:
    """PED-ANOVA's importances plot. On a small study it warns (a UserWarning per parameter
    with few trials in a regime, or "importances will be equal"), once per trial in a log:
    the caveat goes to the debug log instead, where ``FEEDTUNE_LOG=DEBUG`` shows it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        figure = optuna.visualization.matplotlib.plot_param_importances(study).figure
    for warning in caught:
        log.debug("parameter importances: %s", warning.message)
    return figure


def build_pruner(
    kind: str,
    *,
    startup_trials: int = 2,
    warmup_epochs: int = 2,
    min_epochs: int = 1,
    reduction_factor: int = 3,
    full_epochs: int | None = None,
    rung_trust: float = 0.0,
) -> optuna.pruners.BasePruner:
    """The pruner ``kind``; steps are epochs completed (1 after the first epoch).
    ``successive_halving`` prunes only at the rungs this study has shown it can trust
    (``rung_pruner.TrustedHalvingPruner``)."""
    if kind == "successive_halving":
        if full_epochs is None:
            raise ValueError("successive_halving needs full_epochs: its rungs are shorter")
        return TrustedHalvingPruner(
            min_epochs=min_epochs,
            reduction_factor=reduction_factor,
            full_epochs=full_epochs,
            trust=rung_trust,
        )
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_epochs, reduction_factor=reduction_factor
        )
    return optuna.pruners.NopPruner()


def build_trial_sampler(
    seed: int | None, *, startup_trials: int = 4
) -> optuna.samplers.BaseSampler:
    """Seeded multivariate TPE after ``startup_trials`` random (space-covering) ones; ``group``
    because the space is conditional (see ``suggest``)."""
    with experimental_ok():  # multivariate and group are experimental in Optuna
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup_trials, multivariate=True, group=True
        )


def create_study(
    name: str,
    storage: optuna.storages.BaseStorage,
    *,
    seed: int | None,
    pruner: str = "none",
    sampler_startup_trials: int = 4,
    **pruner_args: Any,
) -> optuna.Study:
    """Create or load (resume) the study ``name``; seeded TPE so runs repeat. ``pruner_args``
    go to ``build_pruner``."""
    sampler = build_trial_sampler(seed, startup_trials=sampler_startup_trials)
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=build_pruner(pruner, **pruner_args),
        load_if_exists=True,
    )


def enqueue_values(
    study: optuna.Study, space: dict[str, ParamSpec], values: dict[str, Any]
) -> bool:
    """Queue a first trial at ``values`` (those of the space's keys that lie inside it), unless
    the study already has trials; returns whether one was queued."""
    if study.get_trials(deepcopy=False):
        return False
    fixed = {k: values[k] for k, spec in space.items() if k in values and inside(spec, values[k])}
    if not fixed:
        return False
    # Only a trial that runs exactly the configuration's values is its start configuration.
    start = {START_ATTR: True} if len(fixed) == len(space) else {}
    study.enqueue_trial(fixed, user_attrs=start, skip_if_exists=True)
    return True


def enqueue_arms(
    study: optuna.Study, space: dict[str, ParamSpec], start: dict[str, Any], arms: list[Arm]
) -> None:
    """Queue one trial per arm (the start, then the anchors) that the study does not hold
    yet, with the values the space can express; the objective trains the arm's own settings
    (``ARM_OVERRIDES_ATTR``), at full length (``FULL_LENGTH_ATTR``)."""
    held = {t.user_attrs.get(ARM_ATTR) for t in study.get_trials(deepcopy=False)}
    if study.get_trials(deepcopy=False) and START not in held:
        return  # a study from before arms: its start trial is its own
    for arm in arms:
        if arm.name in held:
            continue
        values = {**start, **arm.overrides}
        fixed = {k: values[k] for k, s in space.items() if k in values and inside(s, values[k])}
        # Every searched key at the arm's value, inside the space or not, and its overrides.
        trained = {**{k: values[k] for k in space if k in values}, **arm.overrides}
        attrs = {ARM_ATTR: arm.name, FULL_LENGTH_ATTR: "arm", ARM_OVERRIDES_ATTR: trained}
        if arm.is_start:
            attrs[START_ATTR] = True
        study.enqueue_trial(fixed, user_attrs=attrs)


def n_arm_trials(study: optuna.Study) -> int:
    """How many of the study's trials train an arm (the start, the anchors)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(ARM_ATTR))


def suggest(
    trial: optuna.Trial, space: dict[str, ParamSpec], inert: Inert | None = None
) -> dict[str, Any]:
    """Dotted key -> suggested value, from the config's search space.

    ``inert(values so far)`` names keys that cannot matter given those values (e.g. the
    prefetch factor without workers): they are not suggested, a conditional space in Optuna's
    define-by-run style, so trials are not spent on settings that change nothing."""
    out: dict[str, Any] = {}
    for key, spec in ordered(space):
        if inert is not None and key in inert(out):
            continue
        if spec.kind == "choice":
            out[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.kind == "int":
            out[key] = trial.suggest_int(
                key, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1)
            )
        else:
            out[key] = trial.suggest_float(
                key, float(spec.low), float(spec.high), log=spec.log, step=spec.step
            )
    return out


def report(trial: optuna.Trial, value: float, epochs_done: int) -> bool:
    """Report the value after ``epochs_done`` epochs; whether the pruner says stop."""
    trial.report(value, epochs_done)
    return trial.should_prune()


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int | None,
    timeout: float | None,
    progress: bool = True,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    stop_on_error: bool = False,
) -> None:
    """Exceptions other than pruning mark the trial FAIL and the study goes on; with
    ``stop_on_error`` (trials run by a torchrun group, whose other processes cannot go on
    without this one) the failed trial's error ends the loop and propagates. A stop the
    command was asked for (SIGINT, SIGTERM: ``stopping.current()``) that came outside a
    trial's training ends the loop after the trial, as Ctrl-C."""
    # Optuna's bar only in bar mode; in a log, one line per finished trial instead.
    mode = progress_mode() if progress else "off"
    quiet = _NoTraceback() if stop_on_error else None
    if quiet is not None:
        _OPTIMIZE_LOG.addFilter(quiet)
    try:
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=timeout,
            catch=() if stop_on_error else (Exception,),
            show_progress_bar=mode == "bar",
            callbacks=[  # the trial's line first: a callback may start runs of its own
                *([_write_trial_line] if mode == "lines" else []),
                *(callbacks or []),
                _stop_if_asked,
            ],
            gc_after_trial=True,
        )
    finally:
        if quiet is not None:
            _OPTIMIZE_LOG.removeFilter(quiet)


def _stop_if_asked(study: optuna.Study, trial: FrozenTrial) -> None:
    """Between two trials: the command's stop request, if any, raised (KeyboardInterrupt)."""
    stopping.current().check()


# Where Optuna says that a trial failed, with the error's traceback.
_OPTIMIZE_LOG = logging.getLogger("optuna.study._optimize")


class _NoTraceback(logging.Filter):
    """Optuna's line about a failed trial without the traceback: the error propagates, and
    the command's own one-line error says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def trial_line(trial: FrozenTrial, start: FrozenTrial | None = None) -> str:
    """``trial 3 COMPLETE value=0.6123 augment.policy=basic train.lr=0.0021 (41.0 s)``: a
    finished trial as one line of a log, with what it ran: its arm's name (``arm anchor-1``),
    ``start`` for the start configuration, else its parameters that differ from ``start``'s
    (all of them without a ``start``)."""
    words = [f"trial {trial.number}", trial.state.name]
    if trial.state == TrialState.COMPLETE and trial.values:
        values = ",".join(f"{v:.4f}" for v in trial.values)
        words.append(f"value{'s' if len(trial.values) > 1 else ''}={values}")
    elif trial.state == TrialState.PRUNED and trial.intermediate_values:
        words.append(f"after epoch {max(trial.intermediate_values)}")  # steps: epochs done
    if trial.user_attrs.get(ARM_ATTR):
        words.append(f"arm {trial.user_attrs[ARM_ATTR]}")
    elif trial.user_attrs.get(START_ATTR):
        words.append("start")
    elif trial.params:
        before = start.params if start is not None else {}
        changed = [(k, v) for k, v in trial.params.items() if k not in before or before[k] != v]
        words += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed]
        words += [] if changed else ["as start"]
    if trial.duration is not None:
        words.append(f"({trial.duration.total_seconds():.1f} s)")
    return " ".join(words)


def _write_trial_line(study: optuna.Study, trial: FrozenTrial) -> None:
    trials = study.get_trials(deepcopy=False)
    start = next((t for t in trials if t.user_attrs.get(START_ATTR)), None)
    write_line(trial_line(trial, start))


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def n_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False))


def user_attr_since(study: optuna.Study, key: str, first: int) -> Any:
    """The last value of user attribute ``key`` among trials numbered ``first`` and later."""
    found = [
        t.user_attrs[key] for t in study.get_trials(deepcopy=False)[first:] if key in t.user_attrs
    ]
    return found[-1] if found else None


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = complete_trials(study)
    return max(done, key=lambda t: t.value) if done else None


def trials_table(study: optuna.Study) -> pd.DataFrame:
    return study.trials_dataframe(
        attrs=("number", "value", "state", "params", "user_attrs", "datetime_start", "duration")
    )


def figures(study: optuna.Study, *, pareto_x: str, pareto_y: str) -> dict[str, Any]:
    """Optimization history, parameter importances (with >= 2 complete trials) and the
    accuracy/throughput Pareto front from trial user attributes."""
    out: dict[str, Any] = {}
    done = complete_trials(study)
    if not done:
        return out
    with experimental_ok():
        out["history"] = optuna.visualization.matplotlib.plot_optimization_history(study).figure
        varied = {
            k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1
        }
        if len(done) >= 2 and varied:
            try:
                out["importances"] = _importances_figure(study)
            except (RuntimeError, ValueError) as exc:  # too few distinct values to rank
                log.info("no parameter importances: %s", exc)
    points = [(t.user_attrs.get(pareto_x), t.user_attrs.get(pareto_y), t.number) for t in done]
    points = [p for p in points if p[0] is not None and p[1] is not None and not math.isnan(p[0])]
    if points:
        out["pareto_front"] = pareto_figure(points, xlabel=pareto_x, ylabel=pareto_y)
    for fig in out.values():
        fig.set_size_inches(8, 5)
    return out
