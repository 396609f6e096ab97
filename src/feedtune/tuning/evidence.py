"""The figures a search is trusted by, from scores alone (no Optuna, no MLflow): how well a
rung's ranking predicts the final one, how much a score moves with the seed, and the interval of
a paired difference between two configurations trained on the same seeds.

Intervals are deterministic (no resampling), so the same scores give the same decision in every
process of a study: the rank correlation's through Fisher's z with Bonett and Wright's (2000)
standard error for Spearman's rho, a difference's through Student's t on the seeds' pooled
spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Two-sided level of every interval here; a decision reads its lower bound.
CONFIDENCE = 0.90
# Spearman's rho is clipped here before Fisher's z, which is infinite at +-1.
_RHO_CLIP = 0.995


@dataclass(frozen=True)
class RungEvidence:
    """How well the scores after ``epochs`` epochs rank configurations as the final scores do,
    over ``n`` configurations that ran the full length. ``low``/``high``: the interval of rho
    (None with fewer than 4, where no interval exists)."""

    epochs: int
    n: int
    rho: float | None
    low: float | None
    high: float | None

    def trusted(self, threshold: float) -> bool:
        """Whether the ranking at this rung may prune: the interval's lower bound is above
        ``threshold``."""
        return self.low is not None and self.low > threshold


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks on ties); None when either side has no
    spread or there are fewer than 3 pairs."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rung_evidence(epochs: int, pairs: Sequence[tuple[float, float]]) -> RungEvidence:
    """The evidence of one rung from (score after ``epochs``, final score) pairs."""
    if not pairs:
        return RungEvidence(epochs, 0, None, None, None)
    rung, final = zip(*pairs, strict=True)
    rho = spearman(rung, final)
    n = len(pairs)
    if rho is None or n < 4:
        return RungEvidence(epochs, n, rho, None, None)
    z = math.atanh(max(-_RHO_CLIP, min(_RHO_CLIP, rho)))
    se = math.sqrt((1 + rho * rho / 2) / (n - 3))
    half = _normal_quantile(0.5 + CONFIDENCE / 2) * se
    return RungEvidence(epochs, n, rho, math.tanh(z - half), math.tanh(z + half))


@dataclass(frozen=True)
class SeedSpread:
    """The standard deviation of a score across seeds, pooled over configurations trained with
    several seeds, and its degrees of freedom (runs minus configurations)."""

    sd: float | None
    df: int


def seed_spread(groups: Iterable[Sequence[float]]) -> SeedSpread:
    """Pooled within-configuration standard deviation of the scores in ``groups`` (one group a
    configuration, one score a seed)."""
    squares, df = 0.0, 0
    for scores in groups:
        if len(scores) < 2:
            continue
        mean = sum(scores) / len(scores)
        squares += sum((s - mean) ** 2 for s in scores)
        df += len(scores) - 1
    return SeedSpread(math.sqrt(squares / df) if df else None, df)


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over ``n`` seeds both were trained with: the mean and its interval."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def above_zero(self) -> bool:
        return self.low is not None and self.low > 0


def paired_difference(
    a: Sequence[float], b: Sequence[float], spread: SeedSpread, *, confidence: float = CONFIDENCE
) -> PairedDifference:
    """The mean of ``a[i] - b[i]`` (seed i for both) with a Student-t interval whose standard
    error is the seeds' pooled spread times sqrt(2/n): the spread of one run's score, for each
    side of a difference of means. Pairing the seeds can only shrink the true error when the
    seed moves both configurations alike, so the interval errs on the wide side; it exists only
    with a measured spread. ``confidence``: the interval's two-sided level."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n == 0:
        raise ValueError("a paired difference needs at least one seed both were trained with")
    mean = sum(diffs) / n
    if spread.sd is None or spread.df < 1:
        return PairedDifference(mean, None, None, n)
    half = _t_quantile(0.5 + confidence / 2, spread.df) * spread.sd * math.sqrt(2 / n)
    return PairedDifference(mean, mean - half, mean + half, n)


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def _t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))
