import time

import torch
from torch import nn
from torch.utils.data import Dataset

from feedtune.config import LoaderConfig
from feedtune.data.loader import build_loader
from feedtune.training.throughput import measure


class _Slow(Dataset):
    def __init__(self, delay):
        self.delay = delay

    def __len__(self):
        return 256

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return torch.randn(3, 8, 8), i % 2


class _Model(nn.Module):
    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.fc = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.fc(x.flatten(1))


def _measure(item_delay, step_delay):
    loader = build_loader(_Slow(item_delay), LoaderConfig(batch_size=8, num_workers=1), seed=0)
    return measure(_Model(step_delay), loader, device=torch.device("cpu"), batches=6)


def test_slow_loader_is_the_bottleneck():
    result = _measure(item_delay=0.01, step_delay=0.0)  # ~80 ms per batch to load, ~0 to train
    assert result.bottleneck == "loader"
    assert result.data_wait_frac > 0.5
    assert result.feed_ratio < 1


def test_slow_model_is_the_bottleneck():
    result = _measure(item_delay=0.0, step_delay=0.05)  # loader instant, 50 ms per step
    assert result.bottleneck == "model"
    assert result.data_wait_frac < 0.15
    assert result.feed_ratio > 1
    assert result.loader_startup_s >= 0 and result.train_startup_s >= 0
