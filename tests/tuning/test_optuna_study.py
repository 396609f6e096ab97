"""Reaping trials whose worker died, on a real journal storage with real killed processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from feedtune.tuning.optuna_storage import MAX_RETRIES, open_storage, reap_dead_trials
from tests.conftest import REPO, env_with_src

WORKER = """
import sys, time, optuna
from feedtune.tracking.liveness import worker_info
from feedtune.tuning.optuna_storage import open_storage
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
trial = study.ask()
if sys.argv[2] == "claim":
    trial.set_user_attr("worker", worker_info())
print("ready", flush=True)
time.sleep(300)
"""


def _die_in_a_trial(url: str, claim: bool) -> None:
    """A real worker process asks for a trial, maybe claims it, and is killed (SIGKILL)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, "claim" if claim else "no"],
        cwd=REPO,
        env=env_with_src(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_dead_workers_trial_is_retried_at_most_twice_then_left_failed(tmp_path):
    url = f"journal:{tmp_path / 'o.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    study.enqueue_trial({"x": 1.0})
    closed = []
    for attempt in range(MAX_RETRIES + 1):
        _die_in_a_trial(url, claim=True)
        reaped = reap_dead_trials(study, on_dead_trial=lambda t: closed.append(t.number))
        assert [t.number for t in reaped] == [attempt]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL] * (MAX_RETRIES + 1)  # no fourth attempt was queued
    retries = [t.user_attrs.get("retries", 0) for t in study.get_trials()]
    assert retries == [0, 1, 2]
    assert study.get_trials()[1].user_attrs["retry_reason"] == "worker died"
    assert closed == [0, 1, 2]  # each dead attempt's run was closed


def test_a_trial_killed_before_it_was_claimed_is_reaped_after_the_grace(tmp_path):
    url = f"journal:{tmp_path / 'o.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    study.enqueue_trial({"x": 2.0})
    _die_in_a_trial(url, claim=False)
    assert reap_dead_trials(study) == []  # within the grace a live worker may still claim it
    (reaped,) = reap_dead_trials(study, unclaimed_grace_s=0)
    assert reaped.state == TrialState.RUNNING  # as it was found
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].user_attrs["retries"] == 1
