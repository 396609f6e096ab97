import numpy as np
import torch

from feedtune.config import SamplerConfig
from feedtune.feed.sampling import build_sampler, epoch_class_counts


def _targets():
    return np.array([0] * 400 + [1] * 80 + [2] * 20)


def test_weighted_power_one_draws_classes_about_equally():
    targets = _targets()
    sampler = build_sampler(
        SamplerConfig(kind="weighted", weight_power=1.0),
        targets=targets,
        generator=torch.Generator().manual_seed(0),
    )
    counts = epoch_class_counts(sampler, targets, ["a", "b", "c"])
    frac = counts["drawn_frac"].to_numpy()
    assert np.all(np.abs(frac - 1 / 3) < 0.06), frac


def test_weighted_power_zero_is_like_random():
    targets = _targets()
    sampler = build_sampler(
        SamplerConfig(kind="weighted", weight_power=0.0),
        targets=targets,
        generator=torch.Generator().manual_seed(0),
    )
    frac = epoch_class_counts(sampler, targets, ["a", "b", "c"])["drawn_frac"].to_numpy()
    assert abs(frac[0] - 0.8) < 0.06


def test_num_samples_and_replacement():
    targets = _targets()
    cfg = SamplerConfig(kind="weighted", num_samples=120, replacement=False)
    idx = list(build_sampler(cfg, targets=targets, generator=torch.Generator().manual_seed(0)))
    assert len(idx) == 120 and len(set(idx)) == 120


def test_random_is_a_permutation_and_sequential_is_ordered():
    targets = _targets()
    rnd = list(
        build_sampler(
            SamplerConfig(kind="random"),
            targets=targets,
            generator=torch.Generator().manual_seed(0),
        )
    )
    assert sorted(rnd) == list(range(len(targets))) and rnd != sorted(rnd)
    seq = list(
        build_sampler(
            SamplerConfig(kind="sequential"), targets=targets, generator=torch.Generator()
        )
    )
    assert seq == list(range(len(targets)))


def test_same_generator_seed_same_draw():
    targets = _targets()
    cfg = SamplerConfig(kind="weighted")
    a = list(build_sampler(cfg, targets=targets, generator=torch.Generator().manual_seed(5)))
    b = list(build_sampler(cfg, targets=targets, generator=torch.Generator().manual_seed(5)))
    assert a == b
