"""Which samples an epoch draws: random, sequential, or weighted against class imbalance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import RandomSampler, Sampler, SequentialSampler, WeightedRandomSampler

from feedtune.config import SamplerConfig


def class_weights(targets: np.ndarray, power: float) -> np.ndarray:
    """Per-sample weight ``count(label) ** -power``: 0 = uniform, 1 = every class equally often."""
    counts = np.bincount(targets)
    return counts[targets].astype(np.float64) ** -power


def build_sampler(
    cfg: SamplerConfig, *, targets: Sequence[int] | np.ndarray, generator: torch.Generator
) -> Sampler[int]:
    """Sampler for the training set; ``generator`` makes the draw reproducible."""
    targets = np.asarray(targets)
    if cfg.kind == "sequential":
        return SequentialSampler(range(len(targets)))
    if cfg.kind == "random":
        return RandomSampler(range(len(targets)), generator=generator)
    weights = torch.as_tensor(class_weights(targets, cfg.weight_power), dtype=torch.double)
    num_samples = cfg.num_samples or len(targets)
    if not cfg.replacement and num_samples > len(targets):
        raise ValueError(
            f"sampler.num_samples={num_samples} exceeds the {len(targets)} training images; "
            "allowed without replacement: at most the training set size"
        )
    return WeightedRandomSampler(
        weights, num_samples=num_samples, replacement=cfg.replacement, generator=generator
    )


def epoch_class_counts(
    sampler: Sampler[int], targets: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """Per-class counts of one epoch's draw next to the dataset's own counts."""
    drawn = np.bincount(targets[np.fromiter(iter(sampler), dtype=np.int64)], minlength=len(classes))
    available = np.bincount(targets, minlength=len(classes))
    return pd.DataFrame(
        {
            "class": list(classes),
            "available": available,
            "drawn": drawn,
            "drawn_frac": drawn / max(1, drawn.sum()),
        }
    )
