"""``feedtune bench``: the loader benchmark grid, measured properly.

Every cell of ``bench.num_workers x bench.batch_size x bench.library x bench.order x
bench.cache`` (the config's ``bench`` section) is measured as ``throughput.measure`` does: the
loader alone (``bench.batches``), the model's appetite (once per batch size: it depends on
nothing else), real training steps end to end with the time spent waiting for batches
(``bench.train_steps``), and the verdict. A cache is filled once per mode and shared by the
cells (its fill time is reported, not timed into the rates). One MLflow run
(``feedtune.kind=bench``) holds the table (``bench/results.csv``), a plot of samples/s against
``num_workers`` per setting (``bench/samples_per_s.png``) and the best cell's metrics and
settings.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from typing import Any

import pandas as pd
import torch
from torch import nn

from feedtune.config import Config, with_overrides
from feedtune.feed.auto import resolve_auto
from feedtune.feed.cache import ImageCache, attach_cache, build_cache
from feedtune.feed.cache_memo import CacheMemo
from feedtune.feed.dataset import single_torch_thread
from feedtune.feed.feed import build_feed
from feedtune.feed.geometry import working_size
from feedtune.progress import progress_bar
from feedtune.sources.prepare import prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tracking.plots import samples_per_s_figure
from feedtune.training.devices import prepare_model
from feedtune.training.models import StandIn, build_model
from feedtune.training.run_context import RunContext, run_context
from feedtune.training.throughput import (
    Throughput,
    first_batch,
    measure_loader,
    measure_model,
    measure_training,
)

# Grid axis -> the config key it sets (the order of the table's first columns).
AXES = {
    "num_workers": "loader.num_workers",
    "cache": "loader.cache",
    "decoder": "data.decoder",
    "where": "augment.where",
    "batch_size": "loader.batch_size",
    "library": "augment.library",
    "order": "augment.order",
}
# Cells are ranked by what a training job gets: end-to-end samples per second.
RANK_BY = "train_samples_per_s"
# Settings that change what the model learns (quality settings): check them by score.
QUALITY_AXES = ("batch_size", "library", "order")


def grid(cfg: Config, inert: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The cells of ``cfg.bench``, num_workers varying fastest (one plot line per setting);
    an axis whose key the data source makes ``inert`` keeps the config's value."""
    values = {
        axis: ([] if key in inert else list(dict.fromkeys(getattr(cfg.bench, axis))))
        or [cfg.get(key)]
        for axis, key in AXES.items()
    }
    outer = [a for a in AXES if a != "num_workers"]
    cells = []
    for combo in itertools.product(*(values[a] for a in outer)):
        for workers in values["num_workers"]:
            cells.append({"num_workers": workers, **dict(zip(outer, combo, strict=True))})
    return cells


def cell_config(cfg: Config, cell: dict[str, Any]) -> Config:
    return with_overrides(cfg, {AXES[axis]: value for axis, value in cell.items()})


def _cache_for(
    mode: str, dataset: Any, cfg: Config, caches: CacheMemo, *, progress: bool
) -> ImageCache | None:
    """One cache per mode and image layout for the whole grid (``augment.where: batch`` keeps
    working squares): the time to read it does not depend on the other axes."""
    if mode == "none":
        return None
    square = working_size(cfg.augment.image_size) if cfg.augment.where == "batch" else None
    return caches.cached(
        (mode, square),
        functools.partial(
            build_cache,
            dataset,
            cfg.loader,
            image_size=cfg.augment.image_size,
            progress=progress,
            square=square,
        ),
    )


def measure_cell(
    cfg: Config,
    data: Any,
    cell: dict[str, Any],
    *,
    model: torch.nn.Module,
    device: torch.device,
    caches: CacheMemo,
    appetite: dict[tuple, float],
    progress: bool = False,
) -> dict[str, Any]:
    """One row of the table: the cell's settings, its rates, verdict and cache cost.

    ``caches`` (by (mode, square)) and ``appetite`` ((batch size, where) -> model
    samples/s) are filled on first use and shared by the cells: neither depends on the other
    axes.
    """
    ccfg = cell_config(cfg, cell)
    # Build without a cache, then attach the grid's shared one (filled once per mode).
    with build_feed(with_overrides(ccfg, {"loader.cache": "none"}), data, device) as feed:
        cache = _cache_for(ccfg.loader.cache, feed.train_set, ccfg, caches, progress=progress)
        attach_cache(feed.train_set, cache)
        start = time.perf_counter()
        loader_rate, loader_startup = measure_loader(feed.train, batches=cfg.bench.batches)
        eats = (ccfg.loader.batch_size, ccfg.augment.where)
        if eats not in appetite:
            batch = first_batch(feed.train)
            appetite[eats] = measure_model(
                model, batch, feed.train, steps=cfg.bench.train_steps, train_cfg=cfg.train
            )
        train_rate, wait_frac, train_startup = measure_training(
            model, feed.train, steps=cfg.bench.train_steps, warmup=1, train_cfg=cfg.train
        )
    result = Throughput(
        loader_samples_per_s=loader_rate,
        model_samples_per_s=appetite[eats],
        train_samples_per_s=train_rate,
        data_wait_frac=wait_frac,
        loader_startup_s=loader_startup,
        train_startup_s=train_startup,
    )
    return {
        **cell,
        **result.metrics(),
        "bottleneck": result.bottleneck,
        "cache_fill_s": cache.fill_seconds if cache is not None else 0.0,
        "cache_mb": cache.nbytes / 2**20 if cache is not None else 0.0,
        "cell_s": time.perf_counter() - start,
    }


def best_row(results: pd.DataFrame) -> pd.Series:
    return results.loc[results[RANK_BY].idxmax()]


def recommended_overrides(row: pd.Series) -> str:
    return " ".join(f"--set {AXES[axis]}={row[axis]}" for axis in AXES)


def report(results: pd.DataFrame) -> str:
    """The table (fastest end to end first) and the recommended ``--set`` line."""
    shown = results.sort_values(RANK_BY, ascending=False)
    columns = [*AXES, "loader_samples_per_s", "model_samples_per_s", RANK_BY]
    columns += ["data_wait_frac", "bottleneck"]
    table = shown[columns].rename(
        columns={
            "loader_samples_per_s": "loader/s",
            "model_samples_per_s": "model/s",
            RANK_BY: "train/s",
            "data_wait_frac": "wait",
        }
    )
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}" if v < 10 else f"{v:.0f}")
    best = best_row(results)
    quality = ", ".join(AXES[a] for a in QUALITY_AXES if results[a].nunique() > 1)
    lines = [
        text,
        "",
        f"best end to end: {best[RANK_BY]:.0f} samples/s "
        f"(loader alone {best['loader_samples_per_s']:.0f}, model {best['model_samples_per_s']:.0f}"
        f", bottleneck: {best['bottleneck']})",
        f"recommended: {recommended_overrides(best)}",
    ]
    if quality:
        lines.append(
            f"note: {quality} also change what the model learns; compare val_f1_macro "
            "(feedtune tune) before adopting them for speed"
        )
    return "\n".join(lines)


def run_bench(cfg: Config, *, progress: bool = True) -> pd.DataFrame:
    """Measure every cell of ``cfg.bench`` and log one ``feedtune.kind=bench`` MLflow run.

    Returns the results table, one row per cell (settings, rates, verdict, cache cost), and
    prints it with the recommended settings.
    """
    with run_context(cfg) as ctx:
        return _bench(cfg, ctx, progress=progress)


def _bench_model(cfg: Config, classes: int, device: torch.device) -> nn.Module:
    """The model every cell trains: ``model``, or a stand-in eating ``bench.model_rate``."""
    rate = cfg.bench.model_rate
    network = (
        build_model(cfg.model, num_classes=classes)
        if rate is None
        else StandIn(classes, samples_per_s=rate)
    )
    return prepare_model(network, device, channels_last=cfg.train.channels_last)


def _bench(cfg: Config, ctx: RunContext, *, progress: bool) -> pd.DataFrame:
    mlflow_store.setup(cfg.experiment)
    data = prepare_data(cfg, progress=progress)
    cfg = resolve_auto(cfg, data)  # an empty axis keeps the value a run would get
    torch.manual_seed(ctx.seed)
    rate = cfg.bench.model_rate
    model = _bench_model(cfg, len(data.classes), ctx.device)
    cells = grid(cfg, data.reader.inert)
    for cell in cells:  # a bad grid value fails now, naming its key, not after minutes
        cell_config(cfg, cell)
    caches = CacheMemo()
    appetite: dict[tuple, float] = {}
    rows = []
    shown = None if rate is None else (int(rate) if float(rate).is_integer() else rate)
    tags = {} if rate is None else {"feedtune.model": f"stand-in:{shown}"}
    with mlflow_store.start_run("bench", run_name="bench", tags=tags) as run:
        bar = progress_bar(cells, desc="bench", unit="cell", enabled=progress, per_item_lines=True)
        # A stand-in sleeps where a GPU computes: with one torch thread the main process does
        # not pay for waking idle OpenMP threads after every sleep (~15 ms a step here).
        threads = single_torch_thread() if rate is not None else contextlib.nullcontext()
        with threads:
            for cell in bar:
                bar.set_postfix_str(" ".join(str(v) for v in cell.values()))
                rows.append(
                    measure_cell(
                        cfg,
                        data,
                        cell,
                        model=model,
                        device=ctx.device,
                        caches=caches,
                        appetite=appetite,
                    )
                )
        results = pd.DataFrame(rows)
        _log_results(cfg, results)
        results.attrs["run_id"] = run.info.run_id
    print(report(results))
    print(f"MLflow run {results.attrs['run_id']} (experiment '{cfg.experiment}')")
    return results


def _log_results(cfg: Config, results: pd.DataFrame) -> None:
    """The bench run's table, figure, and the best cell's settings, metrics and verdict."""
    best = best_row(results)
    mlflow_store.log_config(cell_config(cfg, {a: _plain(best[a]) for a in AXES}))
    mlflow_store.log_dataframe(results, "bench/results.csv")
    mlflow_store.log_figure(
        samples_per_s_figure(results, series=[a for a in AXES if a != "num_workers"]),
        "bench/samples_per_s.png",
    )
    metrics = [
        "loader_samples_per_s",
        "model_samples_per_s",
        "train_samples_per_s",
        "data_wait_frac",
        "feed_ratio",
        "loader_startup_s",
        "train_startup_s",
        "cache_fill_s",
        "cache_mb",
    ]
    mlflow_store.log_metrics({**{m: best[m] for m in metrics}, "bench_cells": len(results)})
    mlflow_store.set_tags(
        {
            "feedtune.bottleneck": best["bottleneck"],
            "feedtune.best_cell": recommended_overrides(best),
        }
    )


def _plain(value: Any) -> Any:
    """numpy scalars from a DataFrame row -> Python values (config validation wants them)."""
    return value.item() if hasattr(value, "item") else value
