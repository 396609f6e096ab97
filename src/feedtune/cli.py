"""``feedtune <command>``: the parsers come from ``feedtune.commands.parser``; each command is
one plain function in ``feedtune.commands``, imported only when it runs so that ``--help``
stays fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from feedtune import logs
from feedtune.commands.parser import STORAGE_ENV, build_parser
from feedtune.config import (
    DEFAULT_EXPERIMENT,
    Config,
    ConfigError,
    load_config,
    with_overrides,
)

if TYPE_CHECKING:  # the feedtune.training package imports torch: for the type checker only
    from feedtune.training.stopping import StopRequest


def _config(args: argparse.Namespace) -> Config:
    # MLproject passes all overrides as one parameter, separated by ';'.
    overrides = [part.strip() for o in args.overrides for part in o.split(";") if part.strip()]
    return load_config(args.config, overrides)


def _positive_or_none(value: float | None) -> float | None:
    """MLproject passes -1 for 'not given'."""
    return None if value is None or value < 0 else value


def _verdict_line(result: Any) -> str:
    """The study's answer in words: what to adopt, and the re-check's figures behind it."""
    from feedtune.tuning.recheck import verdict_words

    if result.verdict is None:
        return "no re-check (search.recheck_seeds: 0): the best trial as it scored, unconfirmed"
    return verdict_words(result.verdict)


def _storage(args: argparse.Namespace) -> str | None:
    return args.storage or os.environ.get(STORAGE_ENV) or None


UNDER_TORCHRUN = ("train", "tune")


def _refuse_under_torchrun(command: str) -> None:
    """Under torchrun, ``train`` shares one run and ``tune`` one study worker; any other
    command would run once in each process."""
    from feedtune.training.distributed import env_world_size

    world = env_world_size()
    if world > 1 and command not in UNDER_TORCHRUN:
        raise ValueError(
            f"`feedtune {command}` does not run under torchrun (WORLD_SIZE={world}); launch "
            f"`feedtune train` or `feedtune tune` under torchrun, `feedtune {command}` alone"
        )


@dataclass
class Call:
    """A command ready to run: ``report(run(**kwargs))`` prints its result, returns the exit
    code. ``main`` calls ``run`` itself, so a command's work starts one frame below ``main``."""

    run: Callable[..., Any]
    kwargs: dict[str, Any]
    report: Callable[[Any], None] = lambda result: None


def _call(args: argparse.Namespace) -> Call:
    """The command's function (imported only now: each pulls in torch, MLflow or Optuna) and
    its arguments."""
    progress = not args.no_progress
    _refuse_under_torchrun(args.command)
    if args.command == "data":
        from feedtune.commands.data import run_data

        def said(manifest: Any) -> None:
            print(f"dataset '{args.name}' ready: {manifest}")

        kwargs = {"name": args.name, "root": args.root, "seed": args.seed, "progress": progress}
        return Call(run_data, kwargs, said)
    cfg = _config(args)
    maker = {
        "train": _train_call,
        "tune": _tune_call,
        "bench": _bench_call,
        "finetune": _finetune_call,
        "inspect": _inspect_call,
        "best": _best_call,
    }[args.command]  # argparse rejects unknown commands
    return maker(args, cfg, progress)


def _train_call(args: argparse.Namespace, cfg: Config, progress: bool) -> Call:
    from feedtune.commands.train import run_train
    from feedtune.training.distributed import env_rank

    def said(run_id: str) -> None:
        if env_rank() == 0:  # under torchrun, one line for the job, not one per process
            print(f"run {run_id} finished (experiment '{cfg.experiment}')")

    kwargs = {"cfg": cfg, "resume_run_id": args.resume or None, "progress": progress}
    return Call(run_train, kwargs, said)


def _tune_call(args: argparse.Namespace, cfg: Config, progress: bool) -> Call:
    from feedtune.commands.tune import run_tune
    from feedtune.tuning.space import require_space

    require_space(cfg.search, args.stage)
    n_trials = _positive_or_none(args.n_trials)
    kwargs = {
        "cfg": cfg,
        "stage": args.stage,
        "n_trials": int(n_trials) if n_trials is not None else None,
        "timeout": _positive_or_none(args.timeout),
        "storage": _storage(args),
        "study_name": args.study or None,
        "progress": progress,
    }
    return Call(
        run_tune, kwargs, lambda result: _report_tune(result, cfg.search.metric, cfg.experiment)
    )


def _report_tune(result: Any, metric: str, experiment: str) -> None:
    if result is None:  # under torchrun, a process other than rank 0: rank 0 reports
        return
    print(
        f"study '{result.study_name}' (storage {result.storage}), parent run {result.parent_run_id}"
    )
    if result.best_run_id:
        print(f"recommended run {result.best_run_id}: {metric} = {result.best_value:.4f}")
        print(_verdict_line(result))
        if result.times is not None:
            print(result.times.words())
        print("settings: " + " ".join(f"--set {k}={v}" for k, v in result.best_params.items()))
    from feedtune.tracking.mlflow_store import ui_address

    address = ui_address(experiment)
    if address:
        print(f"MLflow UI: {address}")


def _bench_call(args: argparse.Namespace, cfg: Config, progress: bool) -> Call:
    from feedtune.commands.bench import run_bench

    if _positive_or_none(args.model_rate) is not None:
        cfg = with_overrides(cfg, {"bench.model_rate": args.model_rate})
    return Call(run_bench, {"cfg": cfg, "progress": progress})


def _finetune_call(args: argparse.Namespace, cfg: Config, progress: bool) -> Call:
    from feedtune.commands.finetune import run_finetune

    def said(run_id: str) -> None:
        print(f"finetune run {run_id} finished (experiment '{cfg.experiment}', from {args.source})")

    kwargs = {
        "cfg": cfg,
        "source": args.source or "best",
        "source_experiment": args.source_experiment or DEFAULT_EXPERIMENT,
        "progress": progress,
    }
    return Call(run_finetune, kwargs, said)


def _inspect_call(args: argparse.Namespace, cfg: Config, progress: bool) -> Call:
    from feedtune.commands.inspect import run_inspect

    return Call(run_inspect, {"cfg": cfg, "progress": progress})


def _best_call(args: argparse.Namespace, cfg: Config, progress: bool) -> Call:
    from feedtune.commands.best import describe_best, emit_python

    show = emit_python if args.emit == "python" else describe_best
    return Call(show, {"experiment": args.experiment or cfg.experiment}, print)


def _resume_hint(args: argparse.Namespace, exc: BaseException) -> str:
    hint = getattr(exc, "resume_hint", None)
    if hint:
        return f"the last checkpoint is saved: resume with `{hint}`"
    if args.command == "tune":
        from feedtune.tracking.urls import redact

        storage = redact(args.storage) if args.storage else None
        if storage is None:
            storage = f"${STORAGE_ENV}" if os.environ.get(STORAGE_ENV) else "journal:optuna.journal"
        study = args.study or "<experiment name>"
        return (
            f"completed trials are kept: resume with `feedtune tune --study {study} "
            f"--storage {storage}` (add the same --config/--set)"
        )
    return "nothing was lost that had been saved"


def _lost_group(exc: BaseException | None) -> str | None:
    """Under torchrun, the one-line error when ``exc`` says another process of the job died
    or stopped answering, with the resume command when the run has one; else None."""
    if not isinstance(exc, RuntimeError):
        return None
    from feedtune.training.distributed import group_failure

    lost = group_failure(exc)
    hint = getattr(exc, "resume_hint", None)
    if lost and hint:
        return f"{lost}; the last checkpoint is saved: resume with `{hint}`"
    return lost


def entry(argv: Sequence[str] | None = None) -> int:
    """The process's entry point (the ``feedtune`` script, ``python -m feedtune``): ``main``,
    with a signal that comes while the process starts or winds down ending it 130 too."""
    from feedtune.training.stopping import StopRequest, exit_130_on_late_signals

    stop = StopRequest()
    ended = exit_130_on_late_signals(stop)
    ended.append(main(argv, stop=stop))
    return ended[0]


def main(argv: Sequence[str] | None = None, *, stop: StopRequest | None = None) -> int:
    """One command, its exit code; ``stop``: the request signals set (a new one if None)."""
    logs.configure()  # $FEEDTUNE_LOG; MLflow's and Optuna's lines below WARNING only on request
    args = build_parser().parse_args(argv)
    from feedtune.training.stopping import LOST_PEER, StopRequest, stop_on_signals

    stop = stop or StopRequest()
    try:
        # SIGINT and SIGTERM (a scheduler, `kill`) become one stop request, honoured at the
        # next safe point: after the imports, at a training step or epoch boundary, between
        # trials, at worst once the command is done. It ends like Ctrl-C: runs marked KILLED,
        # checkpoints kept, exit code 130.
        with stop_on_signals(stop):
            call = _call(args)
            logs.quiet_libraries()  # again: importing Optuna (with the command) set it to INFO
            stop.check()  # a signal during the imports
            result = call.run(**call.kwargs)
            call.report(result)
            stop.check()  # a signal while the command ended
        return 0
    except ConfigError as exc:
        print(f"feedtune: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Under torchrun, the agent's SIGTERM can come while this process is already ending on
        # a lost peer: that is the cause (the stop request's, or the error being handled).
        lost = stop.detail if stop.reason == LOST_PEER else _lost_group(exc.__context__)
        if lost:
            print(f"feedtune: error: {lost}", file=sys.stderr)
            return 1
        print(f"feedtune: interrupted; {_resume_hint(args, exc)}", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, ConnectionError, LookupError) as exc:
        print(f"feedtune: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from feedtune.training.checkpoint import CheckpointError

        if isinstance(exc, CheckpointError):  # refused or unreadable; names its file
            print(f"feedtune: error: {exc}", file=sys.stderr)
            return 1
        lost = _lost_group(exc)
        if lost:
            print(f"feedtune: error: {lost}", file=sys.stderr)
            return 1
        # MLflow server unreachable and the like: one line, plus where to look for more.
        if type(exc).__module__.split(".")[0] not in ("mlflow", "optuna", "sqlalchemy"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"feedtune: error ({type(exc).__name__}): {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(entry())
