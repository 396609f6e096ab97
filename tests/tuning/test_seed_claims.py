"""Seed runs shared by the workers of one study (a real journal storage, two study handles as
two workers would hold)."""

from __future__ import annotations

import time

import optuna

from feedtune.tuning.optuna_storage import open_storage
from feedtune.tuning.rung_pruner import record_seed_curve
from feedtune.tuning.seed_claims import claim, wait_for_score


def _two_handles(tmp_path):
    storage = f"journal:{tmp_path / 'optuna.journal'}"
    first = optuna.create_study(study_name="s", storage=open_storage(storage))
    return first, optuna.load_study(study_name="s", storage=open_storage(storage))


def test_a_claimed_seed_run_is_left_to_its_worker_and_its_score_is_shared(tmp_path):
    mine, theirs = _two_handles(tmp_path)
    assert claim(theirs, "start", 43, "them", stale_s=60)
    assert not claim(mine, "start", 43, "me", stale_s=60)  # theirs, and fresh
    assert claim(mine, "start", 44, "me", stale_s=60)  # another seed is free
    record_seed_curve(theirs, "start", 43, {1: 0.5, 2: 0.7})
    assert wait_for_score(mine, "start", 43, until=time.monotonic() + 5, stale_s=60) == 0.7


def test_a_dead_workers_claim_goes_stale_and_is_taken_over(tmp_path):
    mine, theirs = _two_handles(tmp_path)
    assert claim(theirs, "trial-3", 43, "them", stale_s=60)
    started = time.monotonic()
    assert wait_for_score(mine, "trial-3", 43, until=None, stale_s=0.5) is None
    assert time.monotonic() - started < 10
    assert claim(mine, "trial-3", 43, "me", stale_s=0.5)
    assert wait_for_score(mine, "trial-3", 44, until=time.monotonic() + 1, stale_s=60) is None
