"""Reaping trials whose worker died, on a real journal storage with real killed processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from feedtune.tuning.optuna_storage import MAX_RETRIES, open_storage, reap_dead_trials
from feedtune.tuning.optuna_study import rung_pairs, rung_spearman
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


def _trial(values: dict[int, float], state=TrialState.COMPLETE):
    final = values[max(values)] if state == TrialState.COMPLETE else None
    return optuna.trial.create_trial(
        state=state,
        value=final,
        params={"lr": 0.1},
        distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0)},
        intermediate_values=values,
    )


def test_rung_spearman_ranks_the_first_rung_against_the_full_length(tmp_path):
    study = optuna.create_study(
        storage=open_storage(f"journal:{tmp_path / 'j.log'}"), direction="maximize"
    )
    # Pruned trials and those stopped after 3 epochs do not count: only full-length ones.
    study.add_trial(_trial({1: 0.9, 3: 0.2}, TrialState.PRUNED))
    study.add_trial(_trial({1: 0.1, 3: 0.4}))
    for rung, final in [(0.1, 0.5), (0.2, 0.6)]:
        study.add_trial(_trial({1: rung, 3: 0.3, 8: final}))
    epochs = {"rung_epochs": 1, "full_epochs": 8}
    assert rung_pairs(study, **epochs) == [(0.1, 0.5), (0.2, 0.6)]
    assert rung_spearman(study, **epochs) is None  # two trials rank nothing
    study.add_trial(_trial({1: 0.3, 3: 0.3, 8: 0.7}))
    assert rung_spearman(study, **epochs) == pytest.approx(1.0)
    study.add_trial(_trial({1: 0.4, 3: 0.3, 8: 0.2}))  # best at the rung, worst at the end
    assert rung_spearman(study, **epochs) == pytest.approx(-0.2)


def test_rung_spearman_of_tied_scores_is_none_without_a_scipy_warning(tmp_path, recwarn):
    # Three trials that all reach a perfect score at the end: nothing to rank, and the user's
    # log must not get scipy's ConstantInputWarning.
    study = optuna.create_study(
        storage=open_storage(f"journal:{tmp_path / 'j.log'}"), direction="maximize"
    )
    for rung in (0.2, 0.5, 0.9):
        study.add_trial(_trial({1: rung, 3: 1.0}))
    assert rung_spearman(study, rung_epochs=1, full_epochs=3) is None
    assert not [w for w in recwarn if "constant" in str(w.message).lower()]
