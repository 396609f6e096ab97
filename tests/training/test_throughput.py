import time

import torch
from torch import nn
from torch.utils.data import Dataset

from feedtune.config import LoaderConfig
from feedtune.feed.device_loader import DeviceLoader
from feedtune.feed.loader import build_loader
from feedtune.training.throughput import measure

CPU = torch.device("cpu")


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


def _measure(item_delay, step_delay, *, num_workers, batches=6):
    loader = build_loader(
        _Slow(item_delay), LoaderConfig(batch_size=8, num_workers=num_workers), seed=0
    )
    return measure(_Model(step_delay), DeviceLoader(loader, CPU), batches=batches)


# The controlled costs are sleeps, far larger than the real work (a few 8x3x8x8 tensors and a
# linear layer: well under a millisecond), so a busy machine cannot move the verdict: the
# waiting share is ~0.9 with the slow loader and ~0.01 with the slow model, far from the 0.15
# threshold either way.


def test_slow_loader_is_the_bottleneck():
    # 400 ms to load a batch (in a worker process), no model cost: the step waits for almost
    # all of the time. The margin is wide because on a loaded machine a tiny step can still
    # take tens of milliseconds (at 160 ms a batch, a loaded CI run measured a share of 0.43).
    result = _measure(item_delay=0.05, step_delay=0.0, num_workers=1, batches=4)
    assert result.bottleneck == "loader"
    assert result.data_wait_frac > 0.5
    assert result.feed_ratio < 1


def test_slow_model_is_the_bottleneck():
    # An instant loader in the main process (no worker to be starved of CPU time), 100 ms per
    # step: the step hardly ever waits.
    result = _measure(item_delay=0.0, step_delay=0.1, num_workers=0)
    assert result.bottleneck == "model"
    assert result.data_wait_frac < 0.15
    assert result.feed_ratio > 1
    assert result.loader_startup_s >= 0 and result.train_startup_s >= 0


def test_a_run_is_measured_from_its_own_epochs_and_short_probes():
    from feedtune.training.throughput import measure_run

    loader = DeviceLoader(build_loader(_Slow(0.0), LoaderConfig(batch_size=8), seed=0), CPU)
    history = [
        {"epoch": 0, "epoch_samples_per_s": 50.0, "epoch_data_wait_frac": 0.9},  # set-up
        {"epoch": 1, "epoch_samples_per_s": 200.0, "epoch_data_wait_frac": 0.1},
        {"epoch": 2, "epoch_samples_per_s": 220.0, "epoch_data_wait_frac": 0.3},
        {"epoch": 3, "epoch_samples_per_s": 210.0, "epoch_data_wait_frac": 0.2},
    ]
    result = measure_run(_Model(0.0), loader, history, batches=4)
    assert result.train_samples_per_s == 210.0 and result.data_wait_frac == 0.2  # medians
    slower = "loader" if result.loader_samples_per_s < result.model_samples_per_s else "model"
    assert result.bottleneck == slower  # the verdict follows the same two rates
    assert result.loader_samples_per_s > 0 and result.model_samples_per_s > 0
    assert result.predicted_samples_per_s == min(
        result.loader_samples_per_s, result.model_samples_per_s
    )
    assert 0 < result.measure_s < 30
    assert {"predicted_samples_per_s", "measure_s", "feed_ratio"} <= set(result.metrics())


def test_the_model_is_never_slower_than_the_epochs_saw_it_consume():
    from feedtune.training.throughput import measure_run

    # The probe finds the model at ~1/0.05 s x 8 = ~160 samples/s; the epochs saw it consume
    # 400 samples/s between its waits (300 samples/s with a quarter of the time waiting).
    loader = DeviceLoader(build_loader(_Slow(0.0), LoaderConfig(batch_size=8), seed=0), CPU)
    history = [
        {"epoch": 0, "epoch_samples_per_s": 30.0, "epoch_data_wait_frac": 0.9},
        {"epoch": 1, "epoch_samples_per_s": 300.0, "epoch_data_wait_frac": 0.25},
    ]
    result = measure_run(_Model(0.05), loader, history, batches=3)
    assert result.model_samples_per_s == 400.0
    assert result.train_samples_per_s <= result.model_samples_per_s
    # A probe faster than what the epochs saw (a loader took CPU from the model) stands.
    crowded = [{**h, "epoch_samples_per_s": h["epoch_samples_per_s"] / 300} for h in history]
    quick = measure_run(_Model(0.0), loader, crowded, batches=3)
    assert quick.model_samples_per_s > 4 / 3  # what the epochs saw: 1 / 0.75
