"""Both sides of the feed: how fast the loader supplies, how fast the model consumes, what the
job achieves end to end, and which side holds it back.

A training run's end-to-end rate and its wait for batches come from its own epochs (every step
timed, free). The two sides are probed apart, briefly: the loader alone, and the run's own
train step on a batch already on the device, interleaved over a few rounds so that a noisy
moment hits both, with medians. The model's rate is the probe's, but never below what the
run's epochs saw it consume between its waits for batches: the probe is short, and a noisy
moment must not make the model look slower than it demonstrably ran. Warm-up batches are
excluded from every rate and worker start-up is reported on its own: a loader that takes 3 s
to fork workers and then streams fast is not a slow loader.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import default_collate

from feedtune.config import TrainConfig
from feedtune.feed.device_loader import DeviceLoader
from feedtune.feed.feed import Feed
from feedtune.training.distributed import Dist
from feedtune.training.engine import build_optimizer, train_step
from feedtune.training.stopping import current


@dataclass
class Throughput:
    loader_samples_per_s: float
    model_samples_per_s: float
    train_samples_per_s: float
    data_wait_frac: float
    loader_startup_s: float
    train_startup_s: float
    measure_s: float = 0.0  # what the probes cost, beyond the training itself

    @property
    def predicted_samples_per_s(self) -> float:
        """The factory line's prediction: the job runs at the slower side's rate."""
        return min(self.loader_samples_per_s, self.model_samples_per_s)

    @property
    def feed_ratio(self) -> float:
        return (
            self.loader_samples_per_s / self.model_samples_per_s
            if self.model_samples_per_s
            else 0.0
        )

    @property
    def bottleneck(self) -> str:
        """The slower side, from the same two rates as ``predicted_samples_per_s`` (the
        factory line: the job runs at the slower side's rate). ``data_wait_frac`` says how much
        of the real run went to waiting, on its own."""
        return "loader" if self.loader_samples_per_s < self.model_samples_per_s else "model"

    def metrics(self) -> dict[str, float]:
        out = asdict(self)
        out["feed_ratio"] = self.feed_ratio
        out["predicted_samples_per_s"] = self.predicted_samples_per_s
        return out


def _steady_epochs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The timed epochs after the first (which pays for first-time set-up), or the only one."""
    rows = [h for h in history if "epoch_samples_per_s" in h]
    if not rows:
        raise ValueError("no timed epoch in the history")
    return rows[1:] or rows


def epoch_rates(history: list[dict[str, float]]) -> tuple[float, float]:
    """(samples/s end to end, share of time waiting for batches) of a run's own epochs: the
    median over the steady epochs."""
    steady = _steady_epochs(history)
    return (
        float(np.median([h["epoch_samples_per_s"] for h in steady])),
        float(np.median([h["epoch_data_wait_frac"] for h in steady])),
    )


def epoch_compute_rate(history: list[dict[str, float]]) -> float:
    """Samples/s of a run's own steps, their waits for batches left out: how fast the model
    consumed whenever it had data (median over the steady epochs)."""
    steady = _steady_epochs(history)
    return float(
        np.median(
            [h["epoch_samples_per_s"] / max(1.0 - h["epoch_data_wait_frac"], 1e-9) for h in steady]
        )
    )


def probe_sides(
    model: nn.Module,
    train: DeviceLoader,
    *,
    batches: int,
    rounds: int = 3,
    train_cfg: TrainConfig | None = None,
) -> tuple[float, float, float, float]:
    """(loader samples/s, model samples/s, loader start-up s, seconds spent) from ``rounds``
    interleaved rounds of ``batches`` batches each, medians of the rounds. ``train``: the
    feed's training batches; its host loader is the loader's side, its device step the
    model's."""
    start = time.perf_counter()
    it = _batches(train)
    batch = next(it)
    startup = time.perf_counter() - start
    step = _model_step(model, batch, train, train_cfg=train_cfg)
    step()  # warm-up
    loader_rates, model_rates = [], []
    for _ in range(rounds):
        loader_rates.append(_loader_rate(it, batches))
        model_rates.append(_model_rate(step, batches, train.device))
    it.close()
    spent = time.perf_counter() - start
    return float(np.median(loader_rates)), float(np.median(model_rates)), startup, spent


def measure_run(
    model: nn.Module,
    train: DeviceLoader,
    history: list[dict[str, float]],
    *,
    batches: int,
    train_cfg: TrainConfig | None = None,
) -> Throughput:
    """A trained run's feed: end to end and waiting from its epochs, the sides from probes."""
    train_rate, wait_frac = epoch_rates(history)
    loader_rate, model_rate, startup, spent = probe_sides(
        model, train, batches=batches, train_cfg=train_cfg
    )
    return Throughput(
        loader_samples_per_s=loader_rate,
        model_samples_per_s=max(model_rate, epoch_compute_rate(history)),
        train_samples_per_s=train_rate,
        data_wait_frac=wait_frac,
        loader_startup_s=startup,
        train_startup_s=0.0,
        measure_s=spent,
    )


def _batches(train: DeviceLoader) -> Iterator[Any]:
    """Cycle through ``train``'s host batches (re-iterating at the end of an epoch)."""
    while True:
        produced = False
        for batch in train.host_batches():
            produced = True
            yield batch
        if not produced:
            raise RuntimeError("the loader produced no usable batch (all images bad?)")


def _loader_rate(it: Iterator[Any], batches: int) -> float:
    """Samples/s of the next ``batches`` host batches of ``it``."""
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        samples += len(next(it)[1])
    return samples / (time.perf_counter() - start)


def _model_rate(step: Callable[[], int], steps: int, device: torch.device) -> float:
    """Samples/s of ``steps`` calls of a probe ``step`` (``_model_step``)."""
    _sync(device)
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        samples += step()
    _sync(device)
    return samples / (time.perf_counter() - start)


def measure_loader(train: DeviceLoader, *, batches: int, warmup: int = 2) -> tuple[float, float]:
    """(samples/s of ``train``'s host loader alone, start-up seconds until the first batch)."""
    t0 = time.perf_counter()
    it = _batches(train)
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        next(it)
    rate = _loader_rate(it, batches)
    it.close()
    return rate, startup


def first_batch(train: DeviceLoader) -> Any:
    """A host batch of ``train``, for ``measure_model``."""
    it = _batches(train)
    batch = next(it)
    it.close()
    return batch


def _probe_parts(
    model: nn.Module, device: torch.device, train_cfg: TrainConfig | None
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, bool]:
    """``model`` with the run's own optimizer and loss, so a probe's step costs what a
    training step costs. The probe's steps train ``model`` itself: the caller hands over a
    model it is done with (a trained run's, whose weights are in its checkpoint) or built for
    the measurement."""
    cfg = train_cfg or TrainConfig()
    model = model.to(device).train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return model, build_optimizer(model, cfg), loss_fn, cfg.amp and device.type == "cuda"


def _model_step(
    model: nn.Module, batch: Any, train: DeviceLoader, *, train_cfg: TrainConfig | None
) -> Callable[[], int]:
    """One probe step of the model's side, repeatable: the run's train step on host ``batch``
    moved to the device once. A batch policy on the device is device work, so with one each
    step runs it anew. Returns the samples it trained on."""
    model, optimizer, loss_fn, amp = _probe_parts(model, train.device, train_cfg)
    on_device = train.to_device(batch)

    def step() -> int:
        images, targets = on_device if train.device_step is None else train.to_device(batch)
        train_step(model, optimizer, loss_fn, images, targets, amp=amp)
        return len(targets)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_model(
    model: nn.Module,
    batch: Any,
    train: DeviceLoader,
    *,
    steps: int,
    warmup: int = 2,
    train_cfg: TrainConfig | None = None,
) -> float:
    """Samples/s of train steps on one host batch already moved to the device (the model's
    appetite; a batch policy on the device is part of it)."""
    step = _model_step(model, batch, train, train_cfg=train_cfg)
    for _ in range(warmup):
        step()
    return _model_rate(step, steps, train.device)


def measure_training(
    model: nn.Module,
    train: DeviceLoader,
    *,
    steps: int,
    warmup: int = 2,
    train_cfg: TrainConfig | None = None,
    dist: Dist | None = None,
) -> tuple[float, float, float]:
    """(samples/s end to end, share of time waiting for batches, start-up seconds).

    ``dist`` (under torchrun, ``train`` this process's share): the steps run in
    DistributedDataParallel, and the result is the job's: every process's samples over the
    slowest one's time, the longest wait and start-up (the processes wait for each other at
    every step). The command's stop request is checked after every step."""
    stop = current()
    model, optimizer, loss_fn, amp = _probe_parts(model, train.device, train_cfg)
    net = dist.wrap(model, train.device) if dist is not None else model
    t0 = time.perf_counter()
    it = _batches(train)
    batch = next(it)
    startup = time.perf_counter() - t0
    wait, samples, start = 0.0, 0, 0.0
    for i in range(warmup + steps):  # the first ``warmup`` steps are not timed
        if i == warmup:
            _sync(train.device)
            start = time.perf_counter()
        if i > 0:
            t = time.perf_counter()
            batch = next(it)
            wait += (time.perf_counter() - t) if i >= warmup else 0.0
        train_step(net, optimizer, loss_fn, *train.to_device(batch), amp=amp)
        samples += len(batch[1]) if i >= warmup else 0
        stop.check()
    _sync(train.device)
    elapsed = time.perf_counter() - start
    it.close()
    if dist is None or not dist.enabled:
        return samples / elapsed, wait / elapsed, startup
    rows = dist.all_gather((samples, elapsed, wait, startup))
    slowest = max(r[1] for r in rows)
    return (
        sum(r[0] for r in rows) / slowest,
        max(r[2] / r[1] for r in rows),
        max(r[3] for r in rows),
    )


def measure(
    model: nn.Module,
    train: DeviceLoader,
    *,
    batches: int,
    train_cfg: TrainConfig | None = None,
) -> Throughput:
    """All rates for one (model, feed) pair; ``batches`` timed batches per measurement."""
    loader_rate, loader_startup = measure_loader(train, batches=batches)
    model_rate = measure_model(model, first_batch(train), train, steps=batches, train_cfg=train_cfg)
    train_rate, wait_frac, train_startup = measure_training(
        model, train, steps=batches, train_cfg=train_cfg
    )
    return Throughput(
        loader_samples_per_s=loader_rate,
        model_samples_per_s=model_rate,
        train_samples_per_s=train_rate,
        data_wait_frac=wait_frac,
        loader_startup_s=loader_startup,
        train_startup_s=train_startup,
    )


def transform_costs(
    dataset: Any, *, samples: int = 32, batch_size: int = 64, seed: int = 0
) -> pd.DataFrame:
    """Milliseconds per sample of each pipeline step: decode, every transform step, collate.

    Runs in this process, one sample at a time, so each step is timed alone.
    """
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(samples, len(dataset)), replace=False)
    transform = dataset.transform
    steps = list(getattr(transform, "steps", [])) or [(type(transform).__name__, transform)]
    totals = {"decode": 0.0, **{name: 0.0 for name, _ in steps}}
    outputs = []
    for index in indices:
        t = time.perf_counter()
        x = dataset.load_image(int(index))
        totals["decode"] += time.perf_counter() - t
        for name, fn in steps:
            t = time.perf_counter()
            x = fn(x)
            totals[name] += time.perf_counter() - t
        outputs.append((x, 0))
    reps = max(1, batch_size // len(outputs))
    t = time.perf_counter()
    default_collate((outputs * reps)[:batch_size])
    collate_ms = (time.perf_counter() - t) * 1000 / min(batch_size, len(outputs) * reps)
    rows = [{"step": k, "ms_per_sample": v * 1000 / len(indices)} for k, v in totals.items()]
    rows.append({"step": "collate", "ms_per_sample": collate_ms})
    df = pd.DataFrame(rows)
    df["share"] = df["ms_per_sample"] / df["ms_per_sample"].sum()
    return df


def cache_metrics(feed: Feed) -> dict[str, float]:
    """``cache_fill_s`` (what filling them cost this run: 0 for caches a previous trial filled)
    and ``cache_mb`` of the decoded-image caches (train + val), if any."""
    caches = [ds.cache for ds in (feed.train_set, feed.val_set) if ds.cache is not None]
    if not caches:
        return {}
    return {
        "cache_fill_s": feed.cache_fill_s,
        "cache_mb": sum(c.nbytes for c in caches) / 2**20,
    }
