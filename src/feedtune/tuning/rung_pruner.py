"""Successive halving that prunes only where this job has shown its rungs can be trusted.

Optuna's ``SuccessiveHalvingPruner`` fixes its rungs up front and prunes on any difference.
Here a rung (``min_epochs`` x ``reduction_factor``^k epochs, short of the full length) prunes
only when (a) the trials that ran the full length show that the rung's ranking predicts the
final one (the lower bound of the rank correlation's interval above ``search.rung_trust``), and
(b) the trial trails the promotion line (the best 1/``reduction_factor`` of the trials at that
rung) by more than ``NOISE_GAP`` standard deviations of the seed noise measured at that rung.
Everything is read from the study, so every worker of a study, and rank 0 under torchrun,
decides alike; the evidence grows as trials finish.

The seed noise comes from the arms (the start configuration and the anchors), each trained
with several seeds: their trials at the study's seed, and their other seeds' epoch curves,
kept as study user attributes (``record_seed_curve``).
"""

from __future__ import annotations

from collections.abc import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from feedtune.tuning.evidence import RungEvidence, SeedSpread, rung_evidence, seed_spread

# Trial user attributes: the arm a trial trains ("start", "anchor-1", ...), and why a trial
# runs the full length whatever its rungs say (an arm, or one that calibrates the rungs).
ARM_ATTR = "arm"
FULL_LENGTH_ATTR = "full_length"
# An arm trial's settings (dotted, on top of the start), and every quality trial's settings as
# trained (the speed stage's winner included): what a recommendation hands the user.
ARM_OVERRIDES_ATTR = "arm_overrides"
OVERRIDES_ATTR = "overrides"
# Study user attribute prefix of one arm's epoch curve at another seed: "seed_curve:ARM:SEED".
SEED_CURVE = "seed_curve"
# A trial is pruned only when it trails the promotion line by more than this many standard
# deviations of the seed noise at that rung: a difference two seeds of one configuration
# show about one time in twenty is no reason to stop it.
NOISE_GAP = 2.0


def candidate_rungs(min_epochs: int, reduction_factor: int, full_epochs: int) -> list[int]:
    """The rungs short of the full length: ``min_epochs`` x ``reduction_factor``^k."""
    rungs, epochs = [], min_epochs
    while epochs < full_epochs:
        rungs.append(epochs)
        epochs *= reduction_factor
    return rungs


def full_length_pairs(
    trials: list[FrozenTrial], *, rung_epochs: int, full_epochs: int
) -> list[tuple[float, float]]:
    """(score after ``rung_epochs``, final score) of every complete trial that ran all
    ``full_epochs``."""
    return [
        (t.intermediate_values[rung_epochs], t.value)
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.intermediate_values
        and max(t.intermediate_values) >= full_epochs
        and rung_epochs in t.intermediate_values
    ]


def rung_report(
    trials: list[FrozenTrial], *, rungs: list[int], full_epochs: int
) -> list[RungEvidence]:
    """The evidence of each rung, from the study's full-length trials."""
    return [
        rung_evidence(r, full_length_pairs(trials, rung_epochs=r, full_epochs=full_epochs))
        for r in rungs
    ]


def record_seed_curve(study: optuna.Study, arm: str, seed: int, curve: dict[int, float]) -> None:
    """Keep one arm's epoch scores at another seed in the study, for the seed noise."""
    study.set_user_attr(f"{SEED_CURVE}:{arm}:{seed}", {str(k): v for k, v in curve.items()})


def seed_curves(study: optuna.Study) -> Iterator[tuple[str, int, dict[int, float]]]:
    """(name, seed, epoch -> score) of every curve ``record_seed_curve`` kept in ``study``."""
    for key, curve in study.user_attrs.items():
        if key.startswith(f"{SEED_CURVE}:") and curve:
            _, name, seed = key.split(":")
            yield name, int(seed), {int(k): float(v) for k, v in curve.items()}


def arm_curves(study: optuna.Study, trials: list[FrozenTrial]) -> dict[str, list[dict[int, float]]]:
    """Each arm's epoch curves, one per seed: its trial's, then those of its other seeds."""
    curves: dict[str, list[dict[int, float]]] = {}
    for t in trials:
        arm = t.user_attrs.get(ARM_ATTR)
        if arm and t.state == TrialState.COMPLETE and t.intermediate_values:
            curves.setdefault(arm, []).append(dict(t.intermediate_values))
    for arm, _, curve in seed_curves(study):
        curves.setdefault(arm, []).append(curve)
    return curves


def noise_at(curves: dict[str, list[dict[int, float]]], epochs: int) -> SeedSpread:
    """The seed noise of the score after ``epochs`` epochs, pooled over the arms."""
    return seed_spread([c[epochs] for c in arm if epochs in c] for arm in curves.values())


class TrustedHalvingPruner(optuna.pruners.BasePruner):
    """Asynchronous successive halving at the rungs the job has shown it can trust (see the
    module's docstring); never prunes a trial marked ``FULL_LENGTH_ATTR`` nor one that has
    reached ``full_epochs``."""

    def __init__(
        self,
        *,
        min_epochs: int,
        reduction_factor: int,
        full_epochs: int,
        trust: float,
    ) -> None:
        self.rungs = candidate_rungs(min_epochs, reduction_factor, full_epochs)
        self.reduction_factor = reduction_factor
        self.full_epochs = full_epochs
        self.trust = trust

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.rungs or trial.user_attrs.get(FULL_LENGTH_ATTR):
            return False
        trials = study.get_trials(deepcopy=False)
        pairs = full_length_pairs(trials, rung_epochs=step, full_epochs=self.full_epochs)
        if not rung_evidence(step, pairs).trusted(self.trust):
            return False
        noise = noise_at(arm_curves(study, trials), step)
        if noise.sd is None:
            return False  # no measured noise: no gap can be shown to exceed it
        line = self._promotion_line(trials, trial, step)
        return line is not None and line - trial.intermediate_values[step] > NOISE_GAP * noise.sd

    def _promotion_line(
        self, trials: list[FrozenTrial], trial: FrozenTrial, step: int
    ) -> float | None:
        """The lowest score at ``step`` that is still among the best 1/reduction_factor of
        the trials that reached it (this one included); None while too few reached it."""
        scores = sorted(
            (t.intermediate_values[step] for t in trials if step in t.intermediate_values),
            reverse=True,
        )
        if len(scores) < self.reduction_factor:
            return None
        return scores[len(scores) // self.reduction_factor - 1]

    def trusted_rung(self, study: optuna.Study) -> int:
        """The lowest rung that may prune now; the full length when none may."""
        trials = study.get_trials(deepcopy=False)
        for evidence in rung_report(trials, rungs=self.rungs, full_epochs=self.full_epochs):
            if evidence.trusted(self.trust):
                return evidence.epochs
        return self.full_epochs
