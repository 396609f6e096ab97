"""Both sides of the feed: how fast the loader supplies, how fast the model consumes, what the
job achieves end to end, and which side holds it back.

Warm-up batches are excluded from every rate and worker start-up is reported on its own: a
loader that takes 3 s to fork workers and then streams fast is not a slow loader.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from feedtune.data.dataset import single_torch_thread
from feedtune.training.engine import is_channels_last, to_device

# Above this share of end-to-end time spent waiting for batches, the loader is the bottleneck.
LOADER_BOUND_WAIT_FRAC = 0.15


@dataclass
class Throughput:
    loader_samples_per_s: float
    model_samples_per_s: float
    train_samples_per_s: float
    data_wait_frac: float
    loader_startup_s: float
    train_startup_s: float

    @property
    def feed_ratio(self) -> float:
        return (
            self.loader_samples_per_s / self.model_samples_per_s
            if self.model_samples_per_s
            else 0.0
        )

    @property
    def bottleneck(self) -> str:
        """From the end-to-end run, not the isolated rates: on a CPU the workers and the model
        share the cores, so two isolated rates both overstate what they get together."""
        return "loader" if self.data_wait_frac > LOADER_BOUND_WAIT_FRAC else "model"

    def metrics(self) -> dict[str, float]:
        out = asdict(self)
        out["feed_ratio"] = self.feed_ratio
        return out


def _batches(loader: DataLoader) -> Iterator[Any]:
    """Cycle through the loader (re-iterating at the end of an epoch), skipping empty batches."""
    while True:
        produced = False
        for batch in loader:
            if batch is not None:
                produced = True
                yield batch
        if not produced:
            raise RuntimeError("the loader produced no usable batch (all images bad?)")


def measure_loader(loader: DataLoader, *, batches: int, warmup: int = 2) -> tuple[float, float]:
    """(samples/s of the loader alone, start-up seconds until the first batch)."""
    t0 = time.perf_counter()
    it = _batches(loader)
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        next(it)
    samples = 0
    start = time.perf_counter()
    for _ in range(batches):
        samples += len(next(it)[1])
    elapsed = time.perf_counter() - start
    it.close()
    return samples / elapsed, startup


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: nn.Module,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(images), targets).backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_model(
    model: nn.Module, batch: Any, *, device: torch.device, steps: int, warmup: int = 2
) -> float:
    """Samples/s of train steps on one batch already on the device (the model's appetite)."""
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    images, targets = to_device(batch, device, is_channels_last(model))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(warmup):
        _train_step(model, optimizer, images, targets, loss_fn)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(model, optimizer, images, targets, loss_fn)
    _sync(device)
    return steps * len(targets) / (time.perf_counter() - start)


def measure_training(
    model: nn.Module, loader: DataLoader, *, device: torch.device, steps: int, warmup: int = 2
) -> tuple[float, float, float]:
    """(samples/s end to end, share of time waiting for batches, start-up seconds)."""
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    channels_last = is_channels_last(model)
    t0 = time.perf_counter()
    it = _batches(loader)
    batch = next(it)
    startup = time.perf_counter() - t0
    for _ in range(warmup):
        _train_step(model, optimizer, *to_device(batch, device, channels_last), loss_fn)
        batch = next(it)
    _sync(device)
    wait, samples = 0.0, 0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        _train_step(model, optimizer, *to_device(batch, device, channels_last), loss_fn)
        samples += len(batch[1])
    _sync(device)
    elapsed = time.perf_counter() - start
    it.close()
    return samples / elapsed, wait / elapsed, startup


def measure(
    model: nn.Module, loader: DataLoader, *, device: torch.device, batches: int
) -> Throughput:
    """All rates for one (model, loader) pair; ``batches`` timed batches per measurement."""
    loader_rate, loader_startup = measure_loader(loader, batches=batches)
    batch = next(b for b in loader if b is not None)
    model_rate = measure_model(model, batch, device=device, steps=batches)
    train_rate, wait_frac, train_startup = measure_training(
        model, loader, device=device, steps=batches
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
    steps = list(getattr(dataset.transform, "steps", []))
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


def cache_metrics(pipeline: Any) -> dict[str, float]:
    """``cache_fill_s`` and ``cache_mb`` of the decoded-image caches (train + val), if any."""
    caches = [ds.cache for ds in (pipeline.train_set, pipeline.val_set) if ds.cache is not None]
    if not caches:
        return {}
    return {
        "cache_fill_s": sum(c.fill_seconds for c in caches),
        "cache_mb": sum(c.nbytes for c in caches) / 2**20,
    }


def measure_and_log(
    cfg: Any, pipeline: Any, model: nn.Module, *, progress: bool = False
) -> Throughput | None:
    """Measure a trained configuration and log the speed metrics, verdict and step costs."""
    from feedtune.tracking import mlflow_store as tracking
    from feedtune.tracking.plots import bar_figure
    from feedtune.training.engine import resolve_device

    if cfg.train.measure_batches <= 0:
        return None
    device = resolve_device(cfg.train.device)
    result = measure(model, pipeline.train_loader, device=device, batches=cfg.train.measure_batches)
    tracking.log_metrics({**result.metrics(), **cache_metrics(pipeline)})
    tracking.set_tags({"feedtune.bottleneck": result.bottleneck})
    with single_torch_thread():  # as the loader runs them (see ImageDataset.__getitems__)
        costs = transform_costs(pipeline.train_set, batch_size=cfg.loader.batch_size, seed=cfg.seed)
    tracking.log_dataframe(costs, "throughput/transform_costs.csv")
    tracking.log_figure(
        bar_figure(
            costs["step"],
            costs["ms_per_sample"],
            xlabel="ms per sample (one process)",
            title=f"train pipeline cost per step ({cfg.augment.library}, {cfg.augment.policy}, "
            f"{cfg.augment.order})",
        ),
        "throughput/transform_costs.png",
    )
    return result
