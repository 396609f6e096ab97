"""The re-check's confidence level, chosen by simulation (results: BENCHMARKS.md, "A search you
can trust"), run by hand:

    .venv/bin/python benchmarks/verdict_level.py --sd 0.027 0.078

The re-check as the default job runs it: the start on seeds 42 (its search trial), 43 and 44,
the search's winner on 43 and 44 (its score at 42 is the maximum it was chosen as, left out),
the anchor on 42 and 43 (raced out before 44), scores normal around each configuration's true
score with the same seed spread ``sd``. The winner is adopted when the lower bound of the paired
difference's interval (``feedtune.tuning.evidence.paired_difference``) is above 0. For each
level and true gain (winner minus start, in units of ``sd``) it prints how often the winner is
adopted and the expected loss against always choosing the truly better of the two.

``--seeds N ...`` adds, at the verdict's level, the same by the number of fresh seeds N (the
start then on 42..42+N, the winner on 43..42+N), and how far below a strategy that always takes
the winner the re-check's answer falls on average: gain x P(not adopted), in seed spreads.
That is the price of never adopting a winner the seeds do not show better, when the search's
winner truly is better.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from feedtune.tuning.evidence import paired_difference, seed_spread  # noqa: E402

GAINS = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0)  # winner - start, in seed sds
LEVELS = (0.50, 0.80, 0.90, 0.95)


def adopted(
    rng: np.random.Generator, gain: float, level: float, draws: int, seeds: int = 2
) -> float:
    hits = 0
    for _ in range(draws):
        start = rng.normal(0.0, 1.0, seeds + 1)  # seeds 42, 43, ...
        winner = rng.normal(gain, 1.0, seeds)  # the fresh seeds 43, ...
        anchor = rng.normal(-3.0, 1.0, 2)  # seeds 42, 43
        spread = seed_spread([list(start), list(winner), list(anchor)])
        diff = paired_difference(list(winner), list(start[1:]), spread, confidence=level)
        hits += diff.above_zero
    return hits / draws


def _by_seeds(rng: np.random.Generator, counts: list[int], draws: int) -> None:
    from feedtune.tuning.recheck import VERDICT_CONFIDENCE

    gains = [g for g in GAINS if g > 0]
    print(f"\nAt {VERDICT_CONFIDENCE:.0%}: P(adopt) | gain x P(not adopted), by fresh seeds:")
    print(
        "seeds  "
        + "  ".join(f"{g:+5.1f}" for g in gains)
        + "  |  "
        + "  ".join(f"{g:+5.1f}" for g in gains)
    )
    for n in counts:
        row = [adopted(rng, g, VERDICT_CONFIDENCE, draws, n) for g in gains]
        cost = [g * (1 - p) for g, p in zip(gains, row, strict=True)]
        print(
            f"{n:5d}  "
            + "  ".join(f"{p:5.2f}" for p in row)
            + "  |  "
            + "  ".join(f"{c:5.2f}" for c in cost)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", type=float, nargs="+", default=[0.027])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rates = {(lv, g): adopted(rng, g, lv, args.draws) for lv in LEVELS for g in GAINS}
    print("P(adopt the winner) by true gain (in seed sds):")
    print("level  " + "  ".join(f"{g:+5.1f}" for g in GAINS) + "   max loss / sd")
    for lv in LEVELS:
        row = [rates[(lv, g)] for g in GAINS]
        # loss: a truly worse winner adopted, or a truly better one missed
        loss = max(abs(g) * (p if g < 0 else 1 - p) for g, p in zip(GAINS, row, strict=True))
        print(f"{lv:.2f}   " + "  ".join(f"{p:5.2f}" for p in row) + f"   {loss:.2f}")
    if args.seeds:
        _by_seeds(rng, args.seeds, args.draws)
    for sd in args.sd:
        print(f"sd {sd}: a gain of 1 sd is {sd:.3f}, of 2 sds {2 * sd:.3f}")


if __name__ == "__main__":
    main()
