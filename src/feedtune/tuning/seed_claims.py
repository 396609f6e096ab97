"""Several workers on one study share its seed runs: a worker claims a (configuration, seed)
before training it, and a worker that finds it claimed either leaves it (the arms' noise runs:
the search goes on) or waits for its curve (the re-check, whose verdict needs it).

A claim is a study user attribute, written then read back: the storages Optuna offers have no
compare-and-set, so two workers that claim within the same instant may both train one run
(harmless: the later curve replaces the earlier one). A claim older than ``stale_s`` whose
curve never came is a dead worker's, and is taken over.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from feedtune.tuning.rung_pruner import seed_curves

CLAIM = "seed_claim"
POLL_S = 2.0


def new_owner() -> str:
    """A worker's name in its claims."""
    return uuid.uuid4().hex[:12]


def _key(name: str, seed: int) -> str:
    return f"{CLAIM}:{name}:{seed}"


def claim(study: Any, name: str, seed: int, owner: str, *, stale_s: float) -> bool:
    """Whether this worker (``owner``) may train ``name`` on ``seed``: unclaimed, its own, or
    claimed more than ``stale_s`` seconds ago by a worker whose curve never came."""
    held = study.user_attrs.get(_key(name, seed))
    if held and held["owner"] != owner and time.time() - held["at"] < stale_s:
        return False
    study.set_user_attr(_key(name, seed), {"owner": owner, "at": time.time()})
    return study.user_attrs[_key(name, seed)]["owner"] == owner


def curve_score(study: Any, name: str, seed: int) -> float | None:
    """The best score of ``name``'s curve at ``seed``, once a worker has recorded it."""
    for held_name, held_seed, curve in seed_curves(study):
        if (held_name, held_seed) == (name, seed):
            return max(curve.values())
    return None


def wait_for_score(
    study: Any, name: str, seed: int, *, until: float | None, stale_s: float
) -> float | None:
    """Another worker's score of ``name`` at ``seed``: waits for its curve until the time
    ``until`` (monotonic; None: no limit) or until its claim is ``stale_s`` old. None if it did
    not come."""
    while until is None or time.monotonic() < until:
        score = curve_score(study, name, seed)
        if score is not None:
            return score
        held = study.user_attrs.get(_key(name, seed))
        if not held or time.time() - held["at"] >= stale_s:
            return None
        time.sleep(POLL_S)
    return None
