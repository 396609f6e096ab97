"""The figures a search is trusted by, on real Optuna studies in a journal file: rung evidence,
a pruner that prunes only at a rung the job has shown it can trust and only beyond the seed
noise, and the re-check's verdict from paired seeds."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from feedtune.tuning.evidence import paired_difference, rung_evidence, seed_spread, spearman
from feedtune.tuning.optuna_storage import open_storage
from feedtune.tuning.recheck import behind_start, decide, plan, recheck, verdict_words
from feedtune.tuning.rung_pruner import (
    ARM_ATTR,
    FULL_LENGTH_ATTR,
    TrustedHalvingPruner,
    full_length_pairs,
    record_seed_curve,
    rung_report,
)

FULL = 9  # epochs of a full-length trial; rungs at 1 and 3


def _study(tmp_path, pruner=None) -> optuna.Study:
    storage = open_storage(f"journal:{tmp_path / 'j.log'}")
    return optuna.create_study(storage=storage, direction="maximize", pruner=pruner)


def _trial(values: dict[int, float], state=TrialState.COMPLETE, **attrs):
    final = max(values.values()) if state == TrialState.COMPLETE else None
    return optuna.trial.create_trial(
        state=state,
        value=final,
        params={"lr": 0.1},
        distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0)},
        intermediate_values=values,
        user_attrs=attrs,
    )


def _curve(at_1: float, at_3: float, final: float) -> dict[int, float]:
    return {1: at_1, 3: at_3, FULL: final}


def test_rung_evidence_counts_only_full_length_trials_and_has_an_interval_from_four():
    pairs = [(0.1, 0.5), (0.2, 0.6), (0.3, 0.7)]
    three = rung_evidence(1, pairs)
    assert (three.n, three.rho, three.low) == (3, pytest.approx(1.0), None)  # no interval yet
    four = rung_evidence(1, [*pairs, (0.4, 0.2)])  # best at the rung, worst at the end
    assert four.rho == pytest.approx(-0.2)
    assert four.low < -0.9 and four.high > 0.8  # four points say almost nothing
    assert not four.trusted(0.0)
    many = rung_evidence(1, [(i / 10, i / 10 + 0.3) for i in range(10)])
    assert many.rho == pytest.approx(1.0) and many.trusted(0.0)
    assert spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]) is None  # no spread: nothing to rank


def test_full_length_pairs_leave_out_pruned_and_short_trials(tmp_path):
    study = _study(tmp_path)
    study.add_trial(_trial({1: 0.9, 3: 0.2}, TrialState.PRUNED))
    study.add_trial(_trial({1: 0.1, 3: 0.4}))  # complete, but stopped at 3 epochs
    study.add_trial(_trial(_curve(0.1, 0.3, 0.5)))
    trials = study.get_trials()
    assert full_length_pairs(trials, rung_epochs=1, full_epochs=FULL) == [(0.1, 0.5)]
    (ev1, ev3) = rung_report(trials, rungs=[1, 3], full_epochs=FULL)
    assert (ev1.epochs, ev1.n, ev3.epochs) == (1, 1, 3)


def _calibrated(tmp_path, *, reversed_at_1: bool) -> optuna.Study:
    """Six full-length trials (two arms, each also with a second seed, for the noise) whose
    ranking after 3 epochs is the final one, and after 1 epoch is reversed or the same."""
    pruner = TrustedHalvingPruner(min_epochs=1, reduction_factor=3, full_epochs=FULL, trust=0.0)
    study = _study(tmp_path, pruner)
    finals = [0.40, 0.50, 0.60, 0.70, 0.80, 0.90]
    for i, final in enumerate(finals):
        at_1 = (1.0 - final) / 4 if reversed_at_1 else final / 4
        arm = {0: "start", 1: "anchor-1"}.get(i)
        attrs = {ARM_ATTR: arm, FULL_LENGTH_ATTR: "arm"} if arm else {}
        study.add_trial(_trial(_curve(at_1, final - 0.2, final), **attrs))
    # The arms at a second seed: the noise is 0.005-0.01 at every epoch.
    record_seed_curve(study, "start", 43, _curve((1 - 0.40) / 4 + 0.01, 0.21, 0.41))
    record_seed_curve(study, "anchor-1", 43, _curve((1 - 0.50) / 4 - 0.01, 0.29, 0.49))
    if not reversed_at_1:
        record_seed_curve(study, "start", 43, _curve(0.40 / 4 + 0.01, 0.21, 0.41))
        record_seed_curve(study, "anchor-1", 43, _curve(0.50 / 4 - 0.01, 0.29, 0.49))
    return study


def _ask_with(study: optuna.Study, scores: dict[int, float]) -> bool:
    """A new trial that reports ``scores`` (epoch -> value): whether it is pruned at the last."""
    trial = study.ask()
    for epoch, value in scores.items():
        trial.report(value, epoch)
    pruned = trial.should_prune()
    study.tell(trial, state=TrialState.PRUNED if pruned else TrialState.FAIL)
    return pruned


def test_a_rung_whose_ranking_is_reversed_does_not_prune_but_a_trusted_one_does(tmp_path):
    study = _calibrated(tmp_path / "reversed", reversed_at_1=True)
    pruner = study.pruner
    assert pruner.trusted_rung(study) == 3  # epoch 1 ranks backwards: the rung moved up
    assert not _ask_with(study, {1: 0.0})  # far below everyone at epoch 1, still not pruned
    assert _ask_with(study, {1: 0.2, 2: 0.2, 3: 0.05})  # far below the line at a trusted rung

    same = _calibrated(tmp_path / "same", reversed_at_1=False)
    assert same.pruner.trusted_rung(same) == 1
    assert _ask_with(same, {1: 0.0})


def test_no_pruning_inside_the_seed_noise_nor_at_the_full_length(tmp_path):
    study = _calibrated(tmp_path, reversed_at_1=True)
    # The promotion line at epoch 3 is the 2nd best of 7 (0.6): 0.59 trails it by less than
    # two noise sds.
    assert not _ask_with(study, {1: 0.2, 2: 0.2, 3: 0.59})
    last = study.ask()
    for epoch in range(1, FULL + 1):
        last.report(0.0, epoch)
    assert not last.should_prune()  # a trial that reached the full length is finished
    protected = study.ask()
    protected.set_user_attr(FULL_LENGTH_ATTR, "calibration")
    protected.report(0.0, 3)
    assert not protected.should_prune()


def test_paired_difference_uses_the_pooled_seed_spread():
    spread = seed_spread([[0.70, 0.72], [0.60, 0.62, 0.64]])
    assert spread.df == 3 and spread.sd == pytest.approx(0.01826, abs=1e-4)
    diff = paired_difference([0.80, 0.82], [0.70, 0.71], spread)
    assert diff.mean == pytest.approx(0.105) and diff.n == 2
    assert diff.low > 0 and diff.above_zero
    tie = paired_difference([0.71, 0.70], [0.70, 0.71], spread)
    assert tie.low < 0 < tie.high and not tie.above_zero
    assert paired_difference([0.9], [0.1], seed_spread([])).low is None  # no noise, no interval


def test_a_tie_inside_the_noise_is_within_noise_and_recommends_the_start():
    scores = {
        "start": {42: 0.70, 43: 0.71, 44: 0.69},
        "anchor-1": {42: 0.66, 43: 0.69, 44: 0.68},
        "trial-7": {42: 0.78, 43: 0.715, 44: 0.70},  # a lucky maximum at seed 42
    }
    verdict = decide(scores, "trial-7", "anchor-1", [43, 44], 42)
    assert verdict.recommended == "start" and not verdict.better
    assert verdict.vs_start.n == 2 and verdict.vs_start.low < 0
    clear = {**scores, "trial-7": {42: 0.80, 43: 0.79, 44: 0.80}}
    verdict = decide(clear, "trial-7", "anchor-1", [43, 44], 42)
    assert verdict.recommended == "trial-7" and verdict.better
    anchor_wins = {**scores, "anchor-1": {42: 0.80, 43: 0.80, 44: 0.81}}
    verdict = decide(anchor_wins, "anchor-1", "anchor-1", [43, 44], 42)
    assert verdict.recommended == "anchor-1" and verdict.vs_start.above_zero


def test_the_recheck_runs_every_arm_on_the_same_fresh_seeds(tmp_path):
    study = _study(tmp_path)
    study.add_trial(_trial(_curve(0.1, 0.3, 0.6), arm="start", overrides={"a": 1}))
    study.add_trial(_trial(_curve(0.1, 0.3, 0.59), arm="anchor-1", overrides={"a": 2}))
    study.add_trial(_trial(_curve(0.1, 0.3, 0.8), overrides={"a": 3}))
    record_seed_curve(study, "start", 43, {FULL: 0.62})  # the noise run of the start
    ran = []

    def run(name, overrides, seed):
        ran.append((name, overrides["a"], seed))
        return {"start": 0.6, "anchor-1": 0.5, "trial-2": 0.61}[name] + (seed - 43) * 0.01

    verdict = recheck(study, base_seed=42, n_seeds=2, run=run)
    assert {(n, a) for n, a, _ in ran} == {("trial-2", 3), ("start", 1), ("anchor-1", 2)}
    seeds = {}
    for name, _, seed in ran:
        seeds.setdefault(name, set()).add(seed)
    assert seeds == {"trial-2": {43, 44}, "start": {44}, "anchor-1": {43, 44}}
    assert verdict.seeds == [43, 44] and verdict.winner == "trial-2"
    for name in ("trial-2", "start", "anchor-1"):
        assert {43, 44} <= set(verdict.scores[name])  # every arm on the same fresh seeds
    assert verdict.recommended == "start"  # 0.61 vs 0.62: no better


def test_an_anchor_already_shown_worse_than_the_start_is_not_retrained(tmp_path):
    study = _study(tmp_path)
    study.add_trial(_trial(_curve(0.1, 0.3, 0.70), arm="start", overrides={"a": 1}))
    study.add_trial(_trial(_curve(0.1, 0.2, 0.45), arm="anchor-1", overrides={"a": 2}))
    study.add_trial(_trial(_curve(0.1, 0.3, 0.74), overrides={"a": 3}))
    record_seed_curve(study, "start", 43, {FULL: 0.71})
    record_seed_curve(study, "anchor-1", 43, {FULL: 0.46})  # 0.25 behind on both seeds
    todo = plan(study, base_seed=42, n_seeds=2)
    assert todo.anchor == "anchor-1" and todo.retrain == ["trial-2", "start"]
    assert todo.missing_runs() == 3  # the winner at 43 and 44, the start at 44
    ran = []
    verdict = recheck(study, base_seed=42, n_seeds=2, run=lambda n, o, s: ran.append(n) or 0.7)
    assert sorted(ran) == ["start", "trial-2", "trial-2"]
    assert verdict.vs_anchor.n == 1  # compared on the fresh seed it has


def test_an_anchor_behind_the_start_by_twice_the_noise_is_raced_out_before_its_seed_runs():
    start = {42: 0.70, 43: 0.72}  # one noise run of the start: a spread of ~0.014
    assert behind_start({"start": start, "anchor-1": {42: 0.50}}, "anchor-1")
    assert not behind_start({"start": start, "anchor-1": {42: 0.69}}, "anchor-1")
    assert not behind_start({"start": {42: 0.70}, "anchor-1": {42: 0.50}}, "anchor-1")
    scores = {"start": {**start, 44: 0.71}, "anchor-1": {42: 0.50}, "trial-3": {43: 0.8, 44: 0.8}}
    verdict = decide(scores, "trial-3", "anchor-1", [43, 44], 42)
    assert verdict.recommended == "trial-3" and verdict.vs_anchor is None
    assert "anchor-1 not retrained" in verdict_words(verdict)


def test_the_searchs_best_is_rechecked_even_when_the_start_scored_highest(tmp_path):
    study = _study(tmp_path)
    study.add_trial(_trial(_curve(0.1, 0.3, 0.72), arm="start", overrides={"a": 1}))
    study.add_trial(_trial(_curve(0.1, 0.3, 0.69), overrides={"a": 3}))
    study.add_trial(_trial(_curve(0.1, 0.3, 0.60), overrides={"a": 4}))
    record_seed_curve(study, "start", 43, {FULL: 0.70})
    todo = plan(study, base_seed=42, n_seeds=2)
    assert todo.winner == "trial-1" and todo.retrain == ["trial-1", "start"]
    ran = []

    def run(name, overrides, seed):
        ran.append((name, seed))
        return {"start": 0.70, "trial-1": 0.75}[name]

    verdict = recheck(study, base_seed=42, n_seeds=2, run=run)
    assert sorted(ran) == [("start", 44), ("trial-1", 43), ("trial-1", 44)]
    # The verdict gives the search's difference with the start, on both fresh seeds.
    assert verdict.vs_start.n == 2 and verdict.vs_start.mean == pytest.approx(0.05)
    words = verdict_words(verdict)
    assert "winner - start +0.0500 [80% interval" in words and "fresh seeds 43, 44" in words


def test_a_winner_behind_the_start_by_twice_the_noise_on_a_fresh_seed_is_raced_out(tmp_path):
    study = _study(tmp_path)
    study.add_trial(_trial(_curve(0.1, 0.3, 0.70), arm="start", overrides={"a": 1}))
    study.add_trial(_trial(_curve(0.1, 0.3, 0.74), overrides={"a": 3}))
    record_seed_curve(study, "start", 43, {FULL: 0.71})  # a spread of ~0.007
    ran = []

    def run(name, overrides, seed):
        ran.append((name, seed))
        return {"start": 0.71, "trial-1": 0.60}[name]  # the winner's 0.74 was luck

    verdict = recheck(study, base_seed=42, n_seeds=2, run=run)
    assert ("trial-1", 44) not in ran and ran[0] == ("trial-1", 43)
    assert verdict.recommended == "start" and verdict.vs_start.n == 1
    assert "worse than your start configuration when retrained" in verdict_words(verdict)
