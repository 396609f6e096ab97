import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from feedtune.config import LoaderConfig
from feedtune.feed.loader import build_loader, collate_skipping_none


class _Numbers(Dataset):
    """Returns (random draw, index): shows which RNG state each worker had."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 3:
            return None  # a skipped bad image
        return torch.tensor([np.random.rand(), torch.rand(1).item()]), i


def test_every_option_reaches_the_dataloader():
    cfg = LoaderConfig(
        batch_size=5,
        num_workers=2,
        pin_memory=True,
        prefetch_factor=3,
        persistent_workers=True,
        drop_last=True,
        timeout=7.0,
    )
    loader = build_loader(_Numbers(), cfg, seed=0, cuda=True)
    assert loader.batch_size == 5 and loader.num_workers == 2 and loader.pin_memory is True
    assert loader.prefetch_factor == 3 and loader.persistent_workers is True
    assert loader.drop_last is True and loader.timeout == 7.0
    assert loader.worker_init_fn is not None and loader.generator is not None


def test_pin_memory_only_with_cuda_and_worker_options_only_with_workers():
    loader = build_loader(
        _Numbers(), LoaderConfig(pin_memory=True, num_workers=0, timeout=5), cuda=False
    )
    assert loader.pin_memory is False and loader.timeout == 0


def test_workers_are_seeded_reproducibly_and_differently():
    cfg = LoaderConfig(batch_size=4, num_workers=2)

    def draw(seed):
        return torch.cat([b[0] for b in build_loader(_Numbers(), cfg, seed=seed)])

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the two workers do not repeat each other's numpy stream
    assert len(set(a[:, 0].tolist())) == len(a)


def test_none_samples_are_dropped_from_batches():
    batches = list(build_loader(_Numbers(), LoaderConfig(batch_size=4), seed=0))
    indices = torch.cat([b[1] for b in batches]).tolist()
    assert 3 not in indices and len(indices) == 15
    assert collate_skipping_none([None, None]) is None


def test_worker_timeout_fails_clearly():
    class _Hang(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            import time

            time.sleep(30)
            return torch.zeros(1), i

    loader = build_loader(_Hang(), LoaderConfig(batch_size=2, num_workers=1, timeout=1.0))
    with pytest.raises(RuntimeError, match="timed out"):
        next(iter(loader))
