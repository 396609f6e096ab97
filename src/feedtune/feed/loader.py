"""DataLoader factory: batching and parallelism, seeded so that a run is reproducible."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from feedtune.config import LoaderConfig


def collate_skipping_none(batch: list[Any]) -> Any:
    """Default collation without the samples a dataset skipped as bad (returned as None)."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    return default_collate(kept)


def seed_worker(worker_id: int) -> None:
    """Seed every RNG a transform may use from the worker's torch seed, and stop thread
    oversubscription: each worker is already one of several processes on few cores."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(0)  # OpenCV's own thread pool would fight the other workers
    except ImportError:  # pragma: no cover - opencv is a dependency, but keep workers alive
        pass
    info = torch.utils.data.get_worker_info()
    transform = getattr(getattr(info, "dataset", None), "transform", None)
    if hasattr(transform, "reseed"):
        transform.reseed(seed)


def loader_kwargs(cfg: LoaderConfig, *, cuda: bool) -> dict[str, Any]:
    """The DataLoader keyword arguments that ``cfg`` asks for (options that need workers
    are only passed when there are workers, as DataLoader requires)."""
    kwargs: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "pin_memory": cfg.pin_memory and cuda,
        "drop_last": cfg.drop_last,
        "timeout": cfg.timeout if cfg.num_workers > 0 else 0,
    }
    if cfg.num_workers > 0:
        kwargs["prefetch_factor"] = cfg.prefetch_factor
        kwargs["persistent_workers"] = cfg.persistent_workers
    return kwargs


def build_loader(
    dataset: Dataset,
    cfg: LoaderConfig,
    *,
    sampler: Sampler[int] | None = None,
    seed: int = 0,
    cuda: bool = False,
    shuffle: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """DataLoader over ``dataset`` with ``cfg``'s batching and worker settings.

    ``seed`` feeds the loader's generator, from which each worker's seed is drawn per epoch.
    ``collate_fn`` replaces ``collate_skipping_none`` (e.g. to mix training batches); it must
    skip None samples itself.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        collate_fn=collate_fn if collate_fn is not None else collate_skipping_none,
        worker_init_fn=seed_worker,
        generator=generator,
        **loader_kwargs(cfg, cuda=cuda),
    )
