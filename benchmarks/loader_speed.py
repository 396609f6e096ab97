"""Issue 4 loader-speed benchmarks, run by hand (results go to BENCHMARKS.md).

    PYTHONPATH=src .venv/bin/python benchmarks/loader_speed.py            # all four parts
    PYTHONPATH=src .venv/bin/python benchmarks/loader_speed.py --parts ab  # a subset

(a) the seed default (PIL decode + torchvision Compose of the same policy, num_workers=0, no
    cache) against feedtune's best speed settings: loader samples/s ratio;
(b) best speed settings against the machine's limit: the same per-sample work (same settings,
    num_workers=0, one torch thread) in one process, times the number of cores;
(c) repeatability: 5 repeats of one loader measurement per length, coefficient of variation;
(d) resize_first vs augment_first for the geometric and heavy policies, both libraries;
(e) (only with --parts e, slow on a CPU) repeatability of the whole ``throughput.measure``
    that every training run logs, at a few ``train.measure_batches``.

Every comparison is measured side by side in interleaved rounds of one invocation (medians of
the rounds), so the shared machine's noise hits both sides alike. The embedded dataset is used
(written on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from feedtune.config import Config, load_config, with_overrides  # noqa: E402
from feedtune.feed.augment.per_sample import build_transform  # noqa: E402
from feedtune.feed.cache import attach_cache, build_cache  # noqa: E402
from feedtune.feed.feed import build_feed  # noqa: E402
from feedtune.sources.prepare import PreparedData, prepare_data  # noqa: E402

CORES = len(os.sched_getaffinity(0))
# Speed settings tried for "best" (the transform policy stays the config's: speed settings must
# not change what the model learns); the fastest loader alone wins.
BEST_CANDIDATES = [
    {"loader.num_workers": w, "loader.cache": "resized", "data.decoder": "opencv"}
    for w in (0, 1, CORES, CORES + 1)
]


class SeedDataset(Dataset):
    """What a first script does: PIL open + convert, then the torchvision Compose."""

    def __init__(self, paths: list[str], targets: np.ndarray, transform: Any) -> None:
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as im:
            image = np.asarray(im.convert("RGB"))
        return self.transform(image), int(self.targets[i])


def seed_loader(cfg: Config, data: PreparedData) -> DataLoader:
    transform = build_transform(cfg.augment, train=True).pipeline  # the torchvision v2.Compose
    table = data.split.train
    index = {c: i for i, c in enumerate(data.classes)}
    targets = np.array([index[x] for x in table["label"]])
    dataset = SeedDataset(list(table["path"]), targets, transform)
    return DataLoader(dataset, batch_size=cfg.loader.batch_size, shuffle=True, num_workers=0)


_CACHES: dict[tuple[str, str], Any] = {}


def feedtune_loader(cfg: Config, data: PreparedData) -> DataLoader:
    """The train loader ``feedtune train`` would build for ``cfg``; caches are filled once per
    (mode, decoder) and shared, as ``feedtune bench`` does."""
    # persistent workers: repeated measurements reuse them (start-up is excluded anyway)
    plain = {"loader.persistent_workers": cfg.loader.num_workers > 0, "loader.cache": "none"}
    feed = build_feed(with_overrides(cfg, plain), data, torch.device("cpu"))
    if cfg.loader.cache != "none":
        key = (cfg.loader.cache, cfg.data.decoder)
        if key not in _CACHES:
            _CACHES[key] = build_cache(
                feed.train_set, cfg.loader, image_size=cfg.augment.image_size
            )
        attach_cache(feed.train_set, _CACHES[key])
    return feed.train.loader


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the workers)."""
    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def timed(loader: DataLoader, *, batches: int, warmup: int = 2) -> tuple[float, float]:
    """(samples/s, CPU cores our processes used meanwhile) over ``batches`` batches after
    ``warmup`` (the loop of ``throughput.measure_loader``, plus CPU accounting)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    samples, cpu0, t0 = 0, _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        samples += len(batch[1])
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    del it
    return samples / wall, cpu / wall


def side_by_side(
    loaders: dict[str, DataLoader], *, batches: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Loader samples/s and CPU cores used, of each loader, interleaved round by round."""
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    cores: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            rate, used = timed(loader, batches=batches)
            rates[name].append(rate)
            cores[name].append(used)
    return rates, cores


def median(values: list[float]) -> float:
    return statistics.median(values)


def _label(settings: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[1]}={v}" for k, v in settings.items())


def part_ab(cfg: Config, data: PreparedData, args: argparse.Namespace) -> dict[str, Any]:
    """Seed default, feedtune defaults and every candidate in the same interleaved rounds;
    the candidate with the best median is "best"; its num_workers=0 twin is "one process"."""
    seed_name = "seed default: PIL + torchvision Compose, num_workers=0, no cache"
    default_name = "feedtune defaults: num_workers=0, no cache"
    loaders = {seed_name: seed_loader(cfg, data), default_name: feedtune_loader(cfg, data)}
    for c in BEST_CANDIDATES:
        loaders[_label(c)] = feedtune_loader(with_overrides(cfg, c), data)
    rates, cores = side_by_side(loaders, batches=args.batches, rounds=args.rounds)
    med = {name: median(r) for name, r in rates.items()}
    used = {name: median(c) for name, c in cores.items()}
    best = max(BEST_CANDIDATES, key=lambda c: med[_label(c)])
    best_name = _label(best)
    one_name = _label({**best, "loader.num_workers": 0})
    print("\n### (a) seed default vs best speed settings; (b) vs the machine's limit\n")
    print("| loader | samples/s (median) | CPU cores used | CPU-ms / sample | rounds (samples/s) |")
    print("|---|---:|---:|---:|---|")
    for name in loaders:
        rounds = ", ".join(f"{r:.0f}" for r in rates[name])
        cost = used[name] / med[name] * 1e3
        mark = " **(best)**" if name == best_name else ""
        print(f"| {name}{mark} | {med[name]:.0f} | {used[name]:.2f} | {cost:.2f} | {rounds} |")
    seed, default, fast, one = (med[n] for n in (seed_name, default_name, best_name, one_name))
    cost_ratio = (used[seed_name] / seed) / (used[best_name] / fast)
    # CPU seconds per sample of the same work in one process: the machine's limit is
    # CORES / that; what a loader reaches of it also depends on the CPU other users leave it.
    cpu_per_sample = used[one_name] / one
    limit = CORES / cpu_per_sample
    got = used[best_name] / cpu_per_sample
    print(f"\nbest speed settings: {' '.join(f'--set {k}={v}' for k, v in best.items())}\n")
    print(f"- (a) best / seed default: **{fast / seed:.2f}x** (target >= 3x)")
    print(f"- (a') best / feedtune defaults: {fast / default:.2f}x")
    print(f"- (a'') CPU time per sample, seed default / best: {cost_ratio:.2f}x")
    print(
        f"- (b) best / (one process x {CORES} cores = {one * CORES:.0f}, wall clock): "
        f"**{fast / (one * CORES):.2f}** (target >= 0.85)"
    )
    print(
        f"- (b') best / ({CORES} cores / {cpu_per_sample * 1e3:.2f} CPU-ms per sample = "
        f"{limit:.0f}): {fast / limit:.2f}; best / (the {used[best_name]:.2f} cores it got / "
        f"CPU-ms per sample = {got:.0f}): {fast / got:.2f}"
    )
    one_settings = {**best, "loader.num_workers": 0}
    copies = parallel_copies(one_settings, copies=CORES, batches=args.batches * 4)
    together = sum(copies)
    print(
        f"- (b'') {CORES} independent copies of the one-process loader at once: "
        f"{' + '.join(f'{c:.0f}' for c in copies)} = {together:.0f} samples/s = "
        f"{together / one:.2f}x one copy alone: the machine's real limit for this work; "
        f"best / that: **{fast / together:.2f}**"
    )
    return best


def _copy_rate(settings: dict[str, Any], start_at: float, batches: int) -> float:
    """One independent copy of the one-process loader (run in its own process): its median
    samples/s over 3 measurements that start, in every copy, at ``start_at``."""
    cfg = with_overrides(load_config(REPO / "experiments" / "default.yaml"), settings)
    loader = feedtune_loader(cfg, prepare_data(cfg, progress=False))
    timed(loader, batches=5)  # warm: caches filled, kernels chosen
    time.sleep(max(0.0, start_at - time.time()))
    return median([timed(loader, batches=batches)[0] for _ in range(3)])


def parallel_copies(settings: dict[str, Any], *, copies: int, batches: int) -> list[float]:
    """Samples/s of ``copies`` independent one-process loaders running at once: what this
    machine's cores really deliver for this work (vCPUs that are hyperthreads of one physical
    core share its vector units, so numeric work does not double with two of them)."""
    import multiprocessing as mp

    start_at = time.time() + 40  # every copy has prepared its data and cache by then
    with mp.get_context("spawn").Pool(copies) as pool:
        return pool.starmap(_copy_rate, [(settings, start_at, batches)] * copies)


def part_c(cfg: Config, data: PreparedData, best: dict[str, Any], args: argparse.Namespace) -> None:
    loader = feedtune_loader(with_overrides(cfg, best), data)
    print("\n### (c) repeatability: 5 repeats of one loader measurement (best settings)\n")
    print(f"| batches (x{cfg.loader.batch_size} samples) | seconds each | mean samples/s | CV |")
    print("|---:|---:|---:|---:|")
    for length in args.lengths:
        rates, start = [], time.perf_counter()
        for _ in range(5):
            rates.append(timed(loader, batches=length)[0])
        each = (time.perf_counter() - start) / 5
        cv = statistics.stdev(rates) / statistics.mean(rates)
        print(f"| {length} | {each:.1f} | {statistics.mean(rates):.0f} | {cv:.1%} |")


def part_e(cfg: Config, data: PreparedData, args: argparse.Namespace) -> None:
    """CV of the whole ``throughput.measure`` (loader, model, end to end) that ``train`` logs."""
    from feedtune.feed.device_loader import DeviceLoader
    from feedtune.training.devices import resolve_device
    from feedtune.training.models import build_model
    from feedtune.training.throughput import measure

    model = build_model(cfg.model, num_classes=len(data.classes))
    # The CPU loader of (a)-(d) feeding the model on the training device, in the model's own
    # memory format (build_model's NCHW), with no step on the device: what this part measured.
    train = DeviceLoader(feedtune_loader(cfg, data), resolve_device(cfg.train.device))
    keys = ("loader_samples_per_s", "model_samples_per_s", "train_samples_per_s")
    print("\n### (e) repeatability of `throughput.measure` (train.measure_batches), defaults\n")
    print("| measure_batches | seconds each | " + " | ".join(f"CV {k}" for k in keys) + " |")
    print("|---:|---:|" + "---:|" * len(keys))
    for length in args.lengths_e:
        runs, start = [], time.perf_counter()
        for _ in range(5):
            runs.append(measure(model, train, batches=length).metrics())
        each = (time.perf_counter() - start) / 5
        cvs = [
            statistics.stdev(r[k] for r in runs) / statistics.mean(r[k] for r in runs) for k in keys
        ]
        print(f"| {length} | {each:.0f} | " + " | ".join(f"{cv:.1%}" for cv in cvs) + " |")


def part_d(cfg: Config, data: PreparedData, best: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n### (d) resize_first vs augment_first (loader samples/s, medians)\n")
    print("| policy | library | cache | resize_first | augment_first | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for policy in ("geometric", "heavy"):
        for library in ("torchvision", "albumentations"):
            for cache in ("none", "resized"):
                settings = {**best, "loader.cache": cache}
                settings |= {"augment.policy": policy, "augment.library": library}
                loaders = {
                    order: feedtune_loader(
                        with_overrides(cfg, {**settings, "augment.order": order}), data
                    )
                    for order in ("resize_first", "augment_first")
                }
                rates, _ = side_by_side(loaders, batches=args.batches_d, rounds=args.rounds_d)
                rf, af = median(rates["resize_first"]), median(rates["augment_first"])
                print(f"| {policy} | {library} | {cache} | {rf:.0f} | {af:.0f} | {rf / af:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="abcd", help="which of a(b), c, d, e to run")
    parser.add_argument("--batches", type=int, default=30, help="batches per measurement (a, b)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (a, b)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--lengths-e", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--batches-d", type=int, default=15)
    parser.add_argument("--rounds-d", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(REPO / "experiments" / "default.yaml")
    data = prepare_data(cfg, progress=False)
    print(
        f"## loader speed: {CORES} cores, torch {torch.__version__}, {len(data.split.train)} "
        f"train images, batch {cfg.loader.batch_size}, policy {cfg.augment.policy}, "
        f"{cfg.augment.library}, {cfg.augment.order}, image_size {cfg.augment.image_size}"
    )
    start = time.perf_counter()
    # c and d use the best settings of (a) when it ran, else the usual winner on a quiet machine
    best = {"loader.num_workers": CORES, "loader.cache": "resized", "data.decoder": "opencv"}
    if "a" in args.parts or "b" in args.parts:
        best = part_ab(cfg, data, args)
    if "c" in args.parts:
        part_c(cfg, data, best, args)
    if "d" in args.parts:
        part_d(cfg, data, best, args)
    if "e" in args.parts:
        part_e(cfg, data, args)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
