"""A run's caches: one per dataset of its feed (``cache_datasets``), under one
``loader.cache_limit_mb``, and kept from one trial's feed to the next in one process
(``CacheMemo``), so a study decodes its images once per cache layout, not once per trial."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from feedtune.config import LoaderConfig
from feedtune.feed.cache import ImageCache, attach_cache, build_cache
from feedtune.feed.cache_sizing import SHM_PATH


class CacheMemo:
    """Caches kept from one pipeline to the next in one process (a study's trials): a dataset
    whose images, decoding, mode and layout match a kept cache's reuses it instead of decoding
    every image again. Only the caches the latest ``cache_datasets`` call used are kept, so
    the memory held is never more than one pipeline's."""

    def __init__(self) -> None:
        self._kept: dict[tuple, ImageCache | None] = {}
        self.reused: list[ImageCache] = []  # the latest call's caches that were not filled anew

    @staticmethod
    def key(dataset: Any, cfg: LoaderConfig, *, image_size: int, square: int | None) -> tuple:
        limits = (getattr(dataset, "max_pixels", None), getattr(dataset, "max_bytes", None))
        return (
            tuple(dataset.paths),
            getattr(dataset, "decoder", "pil"),
            getattr(dataset, "min_decode_size", None),
            limits,
            cfg.cache,
            cfg.cache_limit_mb,
            image_size,
            square,
        )

    def get(self, key: tuple) -> ImageCache | None:
        return self._kept.get(key)

    def keep(self, used: dict[tuple, ImageCache]) -> None:
        self._kept = dict(used)

    def cached(self, key: tuple, build: Callable[[], ImageCache | None]) -> ImageCache | None:
        """The cache kept under ``key``, or ``build``'s, kept from now on (None too: a cache
        that did not fit is not tried again). Unlike ``cache_datasets``, keeps every key: for
        one process that reads each cache many times (bench's grid)."""
        if key not in self._kept:
            self._kept[key] = build()
        return self._kept[key]


def cache_datasets(
    datasets: list[Any],
    cfg: LoaderConfig,
    *,
    image_size: int,
    progress: bool = False,
    shm_path: str | os.PathLike[str] | None = SHM_PATH,
    shm_margin_bytes: int | None = None,
    squares: list[int | None] | None = None,
    memo: CacheMemo | None = None,
) -> list[ImageCache]:
    """Build and attach a cache to each dataset; one ``loader.cache_limit_mb`` for them all.
    A dataset whose cache does not fit in shared memory (see ``build_cache``) stays uncached.
    ``squares[i]``: keep dataset ``i``'s images as working squares of that side (None: as
    images). ``memo``: reuse a matching cache of the previous call instead of filling one."""
    caches: list[ImageCache] = []
    used: dict[tuple, ImageCache] = {}
    reused: list[ImageCache] = []
    squares = squares if squares is not None else [None] * len(datasets)
    for dataset, square in zip(datasets, squares, strict=True):
        key = CacheMemo.key(dataset, cfg, image_size=image_size, square=square)
        cache = memo.get(key) if memo is not None and cfg.cache != "none" else None
        if cache is not None:
            reused.append(cache)
        else:
            cache = build_cache(
                dataset,
                cfg,
                image_size=image_size,
                progress=progress,
                reserved_bytes=sum(c.nbytes for c in caches),
                shm_path=shm_path,
                shm_margin_bytes=shm_margin_bytes,
                square=square,
            )
        if cache is not None:
            attach_cache(dataset, cache)
            caches.append(cache)
            used[key] = cache
    if memo is not None:
        memo.keep(used)
        memo.reused = reused
    return caches
