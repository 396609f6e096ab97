"""Feed benchmarks, run by hand (results go to BENCHMARKS.md, "Feeding at the model's speed").

    .venv/bin/python benchmarks/feed_speed.py loader      # (a) best settings vs the seed loader
    .venv/bin/python benchmarks/feed_speed.py standin     # (b) bench --model-rate 5000
    .venv/bin/python benchmarks/feed_speed.py repeat      # (c, d) 10 measurements of one setting
    .venv/bin/python benchmarks/feed_speed.py cost        # (e) measure_s / a default train's time
    .venv/bin/python benchmarks/feed_speed.py default     # (f) the default feed vs bench's best

(a) Loader alone, policy ``basic``, the same images: the seed's loader (PIL + torchvision
    Compose, no workers) against feedtune's loaders (resized cache, OpenCV, 0-2 workers, per
    sample or per batch). On the CPU ``augment.where: batch`` runs the batch augmentation in
    the loader's collate function (in the workers), so every side delivers the same
    normalized float batches. Interleaved rounds, medians.
(b) ``feedtune bench --model-rate 5000``: a stand-in model that eats 5,000 samples/s without the
    CPU; the grid includes the seed default (no workers, no cache, PIL, per sample).
(c, d) One setting (the default recipe with the best loader), measured 10 times as a training
    run measures itself: a short real training (its epochs give train_samples_per_s) and the
    probes (loader, model). Reports train / model and |predicted - measured| / measured.
(e) One default ``feedtune train``: ``measure_s`` over the run's wall time.
(f) The default recipe trained as it is (``loader.cache`` and ``augment.where`` at ``auto``),
    with ``feedtune bench``'s best cell on this machine (``--best``, default: workers 0, resized
    cache, PIL, per batch) and with the former defaults (no cache, per sample) as the
    baseline: interleaved rounds of one short epoch each, a run's own measurement (epochs end
    to end, probes for the model), medians of train / model and of train / baseline's train.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from loader_speed import SeedDataset  # noqa: E402

from feedtune.config import load_config, with_overrides  # noqa: E402
from feedtune.feed.augment.per_sample import build_transform  # noqa: E402
from feedtune.feed.feed import build_feed  # noqa: E402
from feedtune.sources.prepare import prepare_data  # noqa: E402
from feedtune.training.devices import resolve_device  # noqa: E402
from feedtune.training.throughput import measure_loader, measure_run  # noqa: E402
from feedtune.training.trainer import train_model  # noqa: E402

DEFAULT = REPO / "experiments" / "default.yaml"


def _seed_loader(cfg, data) -> DataLoader:
    transform = build_transform(cfg.augment, train=True).pipeline
    table = data.split.train
    index = {c: i for i, c in enumerate(data.classes)}
    targets = np.array([index[x] for x in table["label"]])
    dataset = SeedDataset(list(table["path"]), targets, transform)
    return DataLoader(dataset, batch_size=cfg.loader.batch_size, shuffle=True, num_workers=0)


def bench_loader(rounds: int = 5, batches: int = 30, batch_size: int = 64) -> dict:
    # The yardstick's loader runs on one torch thread, as its script sets; feedtune's on the
    # torch threads its training process has (the default: one per core).
    threads = torch.get_num_threads()
    cfg = load_config(DEFAULT, ["augment.policy=basic", f"loader.batch_size={batch_size}"])
    data = prepare_data(cfg, progress=False)
    loaders = {"seed": _seed_loader(cfg, data)}
    for workers in (0, 1, 2):
        for where in ("sample", "batch"):
            over = {
                "loader.num_workers": workers,
                "loader.persistent_workers": workers > 0,
                "loader.cache": "resized",
                "data.decoder": "opencv",
                "augment.where": where,
            }
            feed = build_feed(with_overrides(cfg, over), data, torch.device("cpu"))
            # On the CPU every loader delivers normalized floats: where=batch augments in it.
            loaders[f"w{workers}-{where}"] = feed.train.loader
    rates = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            torch.set_num_threads(1 if name == "seed" else threads)
            rates[name].append(measure_loader(loader, batches=batches)[0])
    medians = {k: statistics.median(v) for k, v in rates.items()}
    best = max((k for k in medians if k != "seed"), key=medians.get)
    return {
        "batch_size": cfg.loader.batch_size,
        "torch_threads": {"seed": 1, "feedtune": threads},
        "median_samples_per_s": {k: round(v) for k, v in medians.items()},
        "best": best,
        "best_over_seed": round(medians[best] / medians["seed"], 2),
        "rounds": {k: [round(x) for x in v] for k, v in rates.items()},
    }


def bench_standin(rate: float = 5000) -> dict:
    from feedtune.commands.bench import run_bench
    from feedtune.tracking import mlflow_store

    cfg = load_config(DEFAULT, [f"bench.model_rate={rate}", "bench.train_steps=40"])
    with tempfile.TemporaryDirectory() as tmp:
        mlflow_store.setup("bench-standin", f"sqlite:///{tmp}/mlflow.db")
        results = run_bench(cfg, progress=False)
    best = results.loc[results["train_samples_per_s"].idxmax()]
    seed = results[
        (results["num_workers"] == 0)
        & (results["cache"] == "none")
        & (results["decoder"] == "pil")
        & (results["where"] == "sample")
    ].iloc[0]
    keep = ["num_workers", "cache", "decoder", "where", "train_samples_per_s", "bottleneck"]
    return {
        "model_rate": rate,
        "best_cell": {k: (v.item() if hasattr(v, "item") else v) for k, v in best[keep].items()},
        "best_over_rate": round(float(best["train_samples_per_s"]) / rate, 3),
        "seed_default_train_samples_per_s": round(float(seed["train_samples_per_s"])),
        "seed_default_over_rate": round(float(seed["train_samples_per_s"]) / rate, 3),
    }


def bench_repeat(repeats: int = 10, steps: int = 60, extra: list[str] | None = None) -> dict:
    over = [
        "loader.num_workers=1",
        "loader.persistent_workers=true",
        "loader.cache=resized",
        "data.decoder=opencv",
        "augment.where=batch",
        f"train.max_steps_per_epoch={steps}",
        "train.epochs=2",
        *(extra or []),
    ]
    cfg = load_config(DEFAULT, over)
    data = prepare_data(cfg, progress=False)
    device = resolve_device(cfg.train.device)
    rows = []
    for _ in range(repeats):
        feed = build_feed(cfg, data, device)
        with tempfile.TemporaryDirectory() as tmp:
            out = train_model(cfg, feed, folder=Path(tmp), progress=False)
        # The probes run on the feed the run trained from, as log_throughput does.
        result = measure_run(
            out.model,
            feed.train,
            out.state.history,
            batches=cfg.train.measure_batches,
            train_cfg=cfg.train,
        )
        feed.close()
        rows.append(result)
    ratio = [r.train_samples_per_s / r.model_samples_per_s for r in rows]
    error = [
        abs(r.predicted_samples_per_s - r.train_samples_per_s) / r.train_samples_per_s for r in rows
    ]
    return {
        "settings": over,
        "train_over_model": [round(x, 3) for x in ratio],
        "train_le_1_05_model": sum(x <= 1.05 for x in ratio),
        "predicted_error": [round(x, 3) for x in error],
        "predicted_within_15pct": sum(x <= 0.15 for x in error),
        "median_train_over_model": round(statistics.median(ratio), 3),
        "bottleneck": [r.bottleneck for r in rows],
    }


BENCH_BEST = [
    "loader.num_workers=0",
    "loader.cache=resized",
    "data.decoder=pil",
    "augment.where=batch",
]


def bench_default(rounds: int = 5, steps: int = 60, best: list[str] | None = None) -> dict:
    from feedtune.feed.auto import resolve_auto

    short = [f"train.max_steps_per_epoch={steps}", "train.epochs=1"]
    arms = {
        "former default": ["loader.cache=none", "augment.where=sample"],
        "default": [],
        "bench best": best or BENCH_BEST,
    }
    data = prepare_data(load_config(DEFAULT), progress=False)
    device = resolve_device("auto")
    cfgs = {k: resolve_auto(load_config(DEFAULT, [*v, *short]), data) for k, v in arms.items()}
    feeds = {k: build_feed(c, data, device) for k, c in cfgs.items()}  # caches filled once
    train = {k: [] for k in arms}
    model = {k: [] for k in arms}
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            torch.manual_seed(cfg.seed)
            with tempfile.TemporaryDirectory() as tmp:
                out = train_model(cfg, feeds[name], folder=Path(tmp), progress=False)
            result = measure_run(
                out.model,
                feeds[name].train,
                out.state.history,
                batches=cfg.train.measure_batches,
                train_cfg=cfg.train,
            )
            train[name].append(result.train_samples_per_s)
            model[name].append(result.model_samples_per_s)
            print(name, round(train[name][-1]), round(model[name][-1]), file=sys.stderr)
    for feed in feeds.values():
        feed.close()
    med = statistics.median
    base = train["former default"]
    return {
        "rounds": rounds,
        "steps": steps,
        "resolved": {
            k: {"loader.cache": c.loader.cache, "augment.where": c.augment.where}
            for k, c in cfgs.items()
        },
        "bench_best": best or BENCH_BEST,
        "median_train_samples_per_s": {k: round(med(v)) for k, v in train.items()},
        "median_model_samples_per_s": {k: round(med(v)) for k, v in model.items()},
        "median_train_over_model": {
            k: round(med([t / m for t, m in zip(train[k], model[k], strict=True)]), 3) for k in arms
        },
        "median_train_over_baseline": {
            k: round(med([t / b for t, b in zip(train[k], base, strict=True)]), 2) for k in arms
        },
        "train_samples_per_s": {k: [round(x) for x in v] for k, v in train.items()},
    }


def bench_cost() -> dict:
    from mlflow.tracking import MlflowClient

    from feedtune.commands.train import run_train
    from feedtune.tracking import mlflow_store

    cfg = load_config(DEFAULT)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow_store.setup(cfg.experiment, uri)
        start = time.perf_counter()
        run_id = run_train(cfg, progress=False)
        wall = time.perf_counter() - start
        metrics = MlflowClient(uri).get_run(run_id).data.metrics
    keys = ("measure_s", "train_samples_per_s", "model_samples_per_s", "loader_samples_per_s")
    return {
        "wall_s": round(wall, 1),
        **{k: round(metrics[k], 2) for k in keys},
        "measure_share": round(metrics["measure_s"] / wall, 4),
        "train_over_model": round(
            metrics["train_samples_per_s"] / metrics["model_samples_per_s"], 3
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["loader", "standin", "repeat", "cost", "default"])
    parser.add_argument("--batch-size", type=int, default=64, help="loader: both sides' batch")
    parser.add_argument("--set", action="append", default=[], help="repeat: another setting")
    parser.add_argument("--best", action="append", default=[], help="default: bench's best")
    parser.add_argument("--rounds", type=int, default=5, help="default: interleaved rounds")
    args = parser.parse_args()
    which = args.which
    fn = {
        "loader": lambda: bench_loader(batch_size=args.batch_size),
        "standin": bench_standin,
        "repeat": lambda: bench_repeat(extra=args.set),
        "default": lambda: bench_default(rounds=args.rounds, best=args.best or None),
    }
    result = {**fn, "cost": bench_cost}[which]()
    print(json.dumps(result, indent=2, default=str))
