"""Optuna storages that several workers share, and what keeps a shared study honest when a
worker dies: heartbeats (RDB) or liveness records (journal), dead trials failed and retried."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from feedtune.tracking.liveness import GRACE_S, HEARTBEAT_S, is_alive
from feedtune.tracking.urls import redact

log = logging.getLogger(__name__)

# An RDB worker that misses heartbeats this long is considered dead and its trial failed.
# A trial whose worker died is run again at most this often: one that kills its worker every
# time (out of memory, say) must not take every restart down with it.
MAX_RETRIES = 2
# Called with a trial whose worker died, before it is failed (e.g. to end its MLflow run).
DeadTrialHook = Callable[[FrozenTrial], None]


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Optuna flags its matplotlib plots and retry callback as experimental; they are what
    feedtune wants, so the warning is silenced where they are used, and nowhere else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_url_for(path: str | Path) -> str:
    return f"journal:{Path(path).resolve()}"


def open_storage(
    url: str, *, on_dead_trial: DeadTrialHook | None = None
) -> optuna.storages.BaseStorage:
    """``journal:PATH`` (default: a file several processes on one machine share through a file
    lock) or any SQLAlchemy URL (``postgresql://...``, ``sqlite:///...``) for an RDB storage
    with heartbeats, so a trial whose worker died is failed and retried (``on_dead_trial``
    first sees it)."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(
            JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        )
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            with experimental_ok():  # heartbeats are experimental in Optuna, and wanted
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=_retry_dead_trial(on_dead_trial),
                    engine_kwargs={"pool_pre_ping": True},
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Workers started together on a fresh database race to create Optuna's tables
            # ("type ... already exists", a duplicate version row): the loser tries again.
            if attempt == 5:
                raise ConnectionError(
                    f"cannot open Optuna storage {redact(url)!r}: {str(exc).splitlines()[0]}"
                ) from exc
            time.sleep(0.2 + random.random())
        except Exception as exc:  # sqlalchemy raises many kinds; the user needs one line
            raise ConnectionError(
                f"cannot open Optuna storage {redact(url)!r}: {str(exc).splitlines()[0]}"
            ) from exc
    raise AssertionError("unreachable")


def _retry_dead_trial(
    on_dead_trial: DeadTrialHook | None,
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """The RDB heartbeat callback: ``on_dead_trial``, then Optuna's retry with the same
    parameters and user attributes (so the retry finds the old run's checkpoint), at most
    ``MAX_RETRIES`` times."""
    with experimental_ok():
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if on_dead_trial is not None:
            on_dead_trial(trial)
        retry(study, trial)

    return callback


def _is_dead(trial: FrozenTrial, unclaimed_grace_s: float) -> bool:
    info = trial.user_attrs.get("worker")
    if info:
        return not is_alive(info)
    # Not yet claimed by a worker: dead if it stayed so longer than a live one takes to claim.
    started = trial.datetime_start
    return started is not None and (datetime.now() - started).total_seconds() > unclaimed_grace_s


def reap_dead_trials(
    study: optuna.Study,
    *,
    on_dead_trial: DeadTrialHook | None = None,
    unclaimed_grace_s: float = GRACE_S,
) -> list[FrozenTrial]:
    """File storages have no heartbeat: fail RUNNING trials whose worker process on this
    machine is gone (or that no worker claimed in ``GRACE_S``), and queue each again with the
    same parameters and user attributes (among them the MLflow run whose checkpoint the retry
    resumes from), unless it was already retried ``MAX_RETRIES`` times."""
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(trial, unclaimed_grace_s):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process reaped it first
        if on_dead_trial is not None:
            on_dead_trial(trial)
        worker = trial.user_attrs.get("worker", "never claimed")
        queue_again(study, trial, why=f"worker {worker} is gone", reason="worker died")
        reaped.append(trial)
    return reaped


def queue_again(study: optuna.Study, trial: Any, *, why: str, reason: str) -> bool:
    """Queue ``trial`` (a frozen trial, or the live one of an objective) again with the same
    parameters and user attributes (among them the MLflow run whose checkpoint the retry
    resumes from), unless it was already retried ``MAX_RETRIES`` times; whether it was.
    ``why`` goes to the warning, ``reason`` to the retry's ``retry_reason``."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRIES:
        log.warning(
            "trial %d of %s: %s; failed, not retried (it failed so %d times)",
            trial.number,
            study.study_name,
            why,
            retries + 1,
        )
        return False
    attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
    attrs.update(retry_of=trial.number, retries=retries + 1, retry_reason=reason)
    study.enqueue_trial(trial.params, user_attrs=attrs)
    log.warning(
        "trial %d of %s: %s; failed and queued again (retry %d of %d)",
        trial.number,
        study.study_name,
        why,
        retries + 1,
        MAX_RETRIES,
    )
    return True
