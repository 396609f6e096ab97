"""The winner re-checked: the search's best configuration, the start and the best anchor
retrained on the same fresh seeds, and a recommendation only where the paired differences'
interval says so.

The winner is the search's best trial (the arms are compared with it, not candidates for it):
even when the start scored highest at the study's seed, the search's best gets fresh seeds, so
every verdict says by how much the search did or did not beat the start. It was chosen as the
maximum over many noisy trials at the study's seed, so its score there is biased upwards; only
seeds it was not chosen on (``seed + 1``, ...) judge it. The start and the anchors were not
chosen by the search, so every seed they ran counts. An arm or winner that falls behind the
start by more than the pruner's noise gap is raced out: not trained on the seeds left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feedtune.tuning import optuna_study
from feedtune.tuning.arms import START
from feedtune.tuning.evidence import PairedDifference, SeedSpread, paired_difference, seed_spread
from feedtune.tuning.rung_pruner import ARM_ATTR, NOISE_GAP, OVERRIDES_ATTR, seed_curves

# The verdict's two-sided level: its lower bound is the one-sided 90% bound. Simulated at the
# default job's seeds (benchmarks/verdict_level.py), 80% adopts a winner that is truly no
# better 10% of the time (at no loss: it scores the same), a worse one at most 3%, and keeps
# the largest expected loss to 0.65 of a seed's spread, where 90% loses up to 0.95 by keeping
# the start when the winner is 2-3 spreads better. Lower levels lose less still but adopt a
# no-better winner ever more often (50%: one time in four), and "better" must mean something.
VERDICT_CONFIDENCE = 0.80

# Runs one configuration (name, settings) at full length with a seed: its score, or None
# when the deadline stopped it.
SeedRun = Callable[[str, dict[str, Any], int], "float | None"]


@dataclass
class Verdict:
    """``recommended``: the name (``start``, ``anchor-<i>`` or ``trial-<n>``) whose settings
    the study hands the user; ``better`` when that is not the start."""

    winner: str
    anchor: str | None
    seeds: list[int]
    vs_start: PairedDifference | None
    vs_anchor: PairedDifference | None
    anchor_vs_start: PairedDifference | None
    spread: SeedSpread
    recommended: str
    scores: dict[str, dict[int, float]]

    @property
    def better(self) -> bool:
        return self.recommended != START

    def mean(self, name: str) -> float | None:
        values = [self.scores.get(name, {}).get(s) for s in self.seeds]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None


def trial_name(trial: Any) -> str:
    return trial.user_attrs.get(ARM_ATTR) or f"trial-{trial.number}"


def scores_by_seed(study: Any, base_seed: int) -> dict[str, dict[int, float]]:
    """name -> seed -> score: complete trials at the study's seed, seed runs at theirs."""
    scores: dict[str, dict[int, float]] = {}
    for t in optuna_study.complete_trials(study):
        scores.setdefault(trial_name(t), {})[base_seed] = float(t.value)
    for name, seed, curve in seed_curves(study):
        scores.setdefault(name, {})[seed] = max(curve.values())
    return scores


def best_anchor(scores: dict[str, dict[int, float]]) -> str | None:
    """The anchor with the highest mean over its seeds."""
    anchors = {n: s for n, s in scores.items() if n.startswith("anchor-") and s}
    if not anchors:
        return None
    return max(anchors, key=lambda n: sum(anchors[n].values()) / len(anchors[n]))


def run_missing(
    names: list[str],
    settings: dict[str, dict[str, Any]],
    seeds: list[int],
    scores: dict,
    run: SeedRun,
    raced_out: Callable[[str], bool] = lambda name: False,
) -> None:
    """Train each of ``names`` on each of ``seeds`` it lacks, seed by seed (so that a deadline
    leaves complete pairs), skipping a name once ``raced_out`` says so; stops at the first
    run the deadline stopped."""
    for seed in seeds:
        for name in names:
            if seed in scores.setdefault(name, {}) or raced_out(name):
                continue
            score = run(name, settings[name], seed)
            if score is None:
                return
            scores[name][seed] = score


def decide(
    scores: dict[str, dict[int, float]],
    winner: str,
    anchor: str | None,
    seeds: list[int],
    base_seed: int,
) -> Verdict:
    """The verdict from the scores: the winner only when the lower bounds of its differences
    with the start and with the best anchor are above 0; else the anchor when its difference
    with the start is; else the start."""
    # The winner's score at the study's seed is the maximum it was chosen as: left out.
    groups = [
        [v for s, v in by_seed.items() if not (name == winner and s == base_seed)]
        for name, by_seed in scores.items()
        if name in {winner, START, anchor}
    ]
    spread = seed_spread(groups)

    def diff(a: str | None, b: str | None) -> PairedDifference | None:
        if a is None or b is None or a == b:
            return None
        both = [s for s in seeds if s in scores.get(a, {}) and s in scores.get(b, {})]
        if not both:
            return None
        return paired_difference(
            [scores[a][s] for s in both],
            [scores[b][s] for s in both],
            spread,
            confidence=VERDICT_CONFIDENCE,
        )

    vs_start, vs_anchor, anchor_vs_start = (
        diff(winner, START),
        diff(winner, anchor),
        diff(anchor, START),
    )
    if winner != START and _above(vs_start) and (vs_anchor is None or vs_anchor.above_zero):
        recommended = winner
    elif anchor is not None and _above(anchor_vs_start):
        recommended = anchor
    else:
        recommended = START
    return Verdict(
        winner, anchor, seeds, vs_start, vs_anchor, anchor_vs_start, spread, recommended, scores
    )


def _above(diff: PairedDifference | None) -> bool:
    return diff is not None and diff.above_zero


@dataclass
class Plan:
    """What the re-check compares and still has to train: ``retrain`` (the names trained on
    the fresh ``seeds`` they lack, with their ``settings``)."""

    winner: str
    anchor: str | None
    seeds: list[int]
    retrain: list[str]
    settings: dict[str, dict[str, Any]]
    scores: dict[str, dict[int, float]]

    def missing(self) -> list[tuple[str, int]]:
        """(name, seed) of every run the re-check still has to train."""
        return [(n, s) for s in self.seeds for n in self.retrain if s not in self.scores.get(n, {})]

    def missing_runs(self) -> int:
        return len(self.missing())


def plan(study: Any, *, base_seed: int, n_seeds: int) -> Plan | None:
    """The re-check as the study stands; None without a complete start trial to compare with.
    The winner is the search's best trial (the best arm when the search has none). An anchor
    already behind the start (``behind_start``) is not retrained further, as a racing method
    drops an arm."""
    done = optuna_study.complete_trials(study)
    by_name = {trial_name(t): t for t in done}
    if not done or START not in by_name:
        return None
    searched = [t for t in done if not t.user_attrs.get(ARM_ATTR)]
    winner = trial_name(max(searched or done, key=lambda t: t.value))
    scores = scores_by_seed(study, base_seed)
    anchor = best_anchor(scores)
    seeds = [base_seed + 1 + i for i in range(n_seeds)]
    names = list(dict.fromkeys(n for n in (winner, START, anchor) if n is not None))
    if anchor is not None and anchor != winner and behind_start(scores, anchor):
        names.remove(anchor)
    settings = {
        n: dict(by_name[n].user_attrs.get(OVERRIDES_ATTR) or {}) for n in names if n in by_name
    }
    return Plan(winner, anchor, seeds, [n for n in names if n in settings], settings, scores)


def behind_start(
    scores: dict[str, dict[int, float]], arm: str, seeds: list[int] | None = None
) -> bool:
    """Whether ``arm`` trails the start, on the seeds both ran (of ``seeds``, when given: the
    fresh ones for the search's winner, whose score at the study's seed is a biased maximum),
    by more than ``NOISE_GAP`` seed spreads: the pruner's own rule, with the spread pooled
    over the two. One seed of each and one more of the start suffice, so a clearly worse
    anchor costs no further run."""
    counted = {s: v for s, v in scores.get(arm, {}).items() if seeds is None or s in seeds}
    both = sorted(set(counted) & set(scores.get(START, {})))
    spread = seed_spread([list(counted.values()), list(scores[START].values())])
    if not both or spread.sd is None:
        return False
    gap = sum(scores[START][s] - scores[arm][s] for s in both) / len(both)
    return gap > NOISE_GAP * spread.sd


def recheck(study: Any, *, base_seed: int, n_seeds: int, run: SeedRun) -> Verdict | None:
    """Retrain the winner, the start and the best anchor on ``n_seeds`` fresh seeds (those
    each lacks) and decide; None without a complete start trial to compare with."""
    todo = plan(study, base_seed=base_seed, n_seeds=n_seeds)
    if todo is None:
        return None

    def raced_out(name: str) -> bool:  # the winner is judged on the fresh seeds only
        fresh = todo.seeds if name == todo.winner else None
        return name != START and behind_start(todo.scores, name, fresh)

    run_missing(todo.retrain, todo.settings, todo.seeds, todo.scores, run, raced_out)
    return decide(todo.scores, todo.winner, todo.anchor, todo.seeds, base_seed)


def _signed(diff: PairedDifference) -> str:
    if diff.low is None:
        return f"{diff.mean:+.4f} (no interval: the seed noise was not measured)"
    level = round(VERDICT_CONFIDENCE * 100)
    return f"{diff.mean:+.4f} [{level}% interval {diff.low:+.4f}, {diff.high:+.4f}]"


def verdict_words(verdict: Verdict) -> str:
    """The verdict in plain words: what is recommended, and the figures behind it."""
    seeds = ", ".join(str(s) for s in verdict.seeds)
    figures = []
    if verdict.vs_start is not None:
        figures.append(f"winner - start {_signed(verdict.vs_start)}")
    if verdict.vs_anchor is not None:
        figures.append(f"winner - {verdict.anchor} {_signed(verdict.vs_anchor)}")
    if verdict.winner != verdict.anchor and verdict.anchor_vs_start is not None:
        figures.append(f"{verdict.anchor} - start {_signed(verdict.anchor_vs_start)}")
    elif verdict.anchor is not None and verdict.vs_anchor is None:
        figures.append(f"{verdict.anchor} not retrained: {NOISE_GAP:g}+ seed spreads behind start")
    on = f"on fresh seeds {seeds}" if verdict.seeds else "without fresh seeds"
    said = "; ".join(figures) if figures else "no paired runs finished before the deadline"
    if verdict.recommended == verdict.winner and verdict.better:
        head = f"the search's winner ({verdict.winner}) beats the start and the anchor: adopt it"
    elif verdict.better:
        head = (
            f"the anchor {verdict.recommended} beats your start configuration (the search's "
            f"winner, {verdict.winner}, did not beat both): adopt the anchor"
        )
    elif verdict.winner == START:
        head = "no configuration beat your start configuration: keep it"
    elif (
        verdict.vs_start is not None
        and verdict.vs_start.high is not None
        and verdict.vs_start.high < 0
    ):
        head = (
            f"the search's winner ({verdict.winner}) is worse than your start configuration "
            "when retrained: keep your settings"
        )
    else:
        head = (
            f"the search's winner ({verdict.winner}) is within the noise of your start "
            "configuration when retrained: keep your settings"
        )
    return f"{head} ({said}, {on}; the settings below are the recommended ones)"
