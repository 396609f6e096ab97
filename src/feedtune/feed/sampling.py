"""Which samples an epoch draws: random, sequential, or weighted against class imbalance."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from feedtune.config import SamplerConfig


def class_weights(targets: np.ndarray, power: float) -> np.ndarray:
    """Per-sample weight ``count(label) ** -power``: 0 = uniform, 1 = every class equally often."""
    counts = np.bincount(targets)
    return counts[targets].astype(np.float64) ** -power


class DistributedWeightedSampler(Sampler[int]):
    """One process's share of a class-weighted draw made for all processes together.

    Every process draws the same global sample (``torch.multinomial`` over ``weights`` with the
    same generator state, as ``WeightedRandomSampler`` draws it) and keeps every
    ``world_size``-th index from ``rank`` on, so the processes together see exactly the draw one
    process would. The draw is padded with its own first indices to a multiple of
    ``world_size``: every process gets the same number of samples, hence of batches, which the
    gradient averaging of each step needs. The generator must be seeded alike on every process
    before each epoch (the trainer reseeds it from the seed and the epoch)."""

    def __init__(
        self,
        weights: torch.Tensor,
        *,
        num_samples: int,
        replacement: bool,
        generator: torch.Generator,
        rank: int,
        world_size: int,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a job of {world_size} processes")
        self.weights = weights
        self.num_samples = num_samples
        self.replacement = replacement
        self.generator = generator
        self.rank = rank
        self.world_size = world_size

    def global_draw(self) -> list[int]:
        """The draw of all processes together, unpadded (what one process would draw)."""
        drawn = torch.multinomial(
            self.weights, self.num_samples, self.replacement, generator=self.generator
        )
        return drawn.tolist()

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[int]:
        indices = self.global_draw()
        padding = len(self) * self.world_size - len(indices)
        indices += indices[:padding]
        return iter(indices[self.rank :: self.world_size])


def build_sampler(
    cfg: SamplerConfig,
    *,
    targets: Sequence[int] | np.ndarray,
    generator: torch.Generator,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Sampler[int]:
    """Sampler for the training set; ``generator`` makes the draw reproducible.

    With ``world_size`` > 1 it yields process ``rank``'s share of each epoch: ``random`` and
    ``sequential`` through ``DistributedSampler`` (shuffled from ``seed``, by default the
    generator's initial seed, and the epoch given to its ``set_epoch``), ``weighted``
    through ``DistributedWeightedSampler``. Every share has the same length (padded with
    repeats), and together they cover the epoch."""
    targets = np.asarray(targets)
    if world_size > 1 and cfg.kind != "weighted":
        return DistributedSampler(
            range(len(targets)),
            num_replicas=world_size,
            rank=rank,
            shuffle=cfg.kind == "random",
            seed=generator.initial_seed() if seed is None else seed,
            drop_last=False,
        )
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
    if world_size > 1:
        return DistributedWeightedSampler(
            weights,
            num_samples=num_samples,
            replacement=cfg.replacement,
            generator=generator,
            rank=rank,
            world_size=world_size,
        )
    return WeightedRandomSampler(
        weights, num_samples=num_samples, replacement=cfg.replacement, generator=generator
    )


def epoch_draw(sampler: Sampler[int]) -> Iterable[int]:
    """One epoch's indices; for a process's share (the distributed samplers), the draw of all
    processes together, without the padding that evens out their shares."""
    if isinstance(sampler, DistributedWeightedSampler):
        return sampler.global_draw()
    if isinstance(sampler, DistributedSampler):
        shares = []
        for rank in range(sampler.num_replicas):
            share = copy.copy(sampler)
            share.rank = rank
            shares.append(list(share))
        interleaved = [i for row in zip(*shares, strict=True) for i in row]
        return interleaved[: len(sampler.dataset)]  # type: ignore[arg-type]
    return iter(sampler)


def epoch_class_counts(
    sampler: Sampler[int], targets: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """Per-class counts of one epoch's draw (of all processes) next to the dataset's own."""
    draw = epoch_draw(sampler)
    drawn = np.bincount(targets[np.fromiter(draw, dtype=np.int64)], minlength=len(classes))
    available = np.bincount(targets, minlength=len(classes))
    return pd.DataFrame(
        {
            "class": list(classes),
            "available": available,
            "drawn": drawn,
            "drawn_frac": drawn / max(1, drawn.sum()),
        }
    )
