"""The ``auto`` speed settings: the fastest values that are safe for this data on this machine,
chosen once per run before its feed is built (``resolve_auto``). The run's config then holds
the values that ran, so what MLflow records of it (params, ``config/resolved.yaml``,
checkpoints) reproduces it.

- ``augment.where: auto``: ``batch`` where the policy has a batch version (the same transforms,
  drawn per sample), else ``sample``.
- ``loader.cache: auto``: ``resized`` when the run's caches (train and val, as the feed will lay
  them out) fit under ``loader.cache_limit_mb`` and in the free shared memory less the margin
  kept for the loader's batches, estimated from the image headers; else ``none``, with a
  warning that says what to change.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from feedtune.config import AUTO, AugmentConfig, Config, with_overrides
from feedtune.feed.augment.batch import has_batch_version
from feedtune.feed.cache_sizing import MIB, SHM_PATH, estimate_cache, shm_free_bytes, shm_margin
from feedtune.feed.geometry import working_size
from feedtune.sources.prepare import PreparedData

log = logging.getLogger(__name__)


def resolve_auto(
    cfg: Config,
    data: PreparedData,
    *,
    shm_path: str | os.PathLike[str] | None = SHM_PATH,
    shm_margin_bytes: int | None = None,
) -> Config:
    """``cfg`` with each ``auto`` setting replaced by its value for ``data`` here, each choice
    logged with its reason; ``cfg`` itself when none is ``auto``.

    ``shm_path``/``shm_margin_bytes``: the shared-memory filesystem a cache must fit in and
    what to leave free there, as in ``cache.build_cache``."""
    chosen: dict[str, Any] = {}
    where = cfg.augment.where
    if where == AUTO:
        where, why = _where(cfg.augment)
        chosen["augment.where"] = where
        log.info("augment.where=auto: %s (%s)", where, why)
    if cfg.loader.cache == AUTO:
        cache, why = _cache(cfg, data, where=where, shm_path=shm_path, margin=shm_margin_bytes)
        chosen["loader.cache"] = cache
        (log.info if cache != "none" else log.warning)("loader.cache=auto: %s (%s)", cache, why)
    return with_overrides(cfg, chosen) if chosen else cfg


def _where(aug: AugmentConfig) -> tuple[str, str]:
    if has_batch_version(aug.policy, aug.order):
        return "batch", f"policy {aug.policy} has a batch version"
    order = " with order augment_first" if aug.policy == "geometric" else ""
    return "sample", f"policy {aug.policy}{order} has no batch version"


def _cache(
    cfg: Config,
    data: PreparedData,
    *,
    where: str,
    shm_path: str | os.PathLike[str] | None,
    margin: int | None,
) -> tuple[str, str]:
    target = working_size(cfg.augment.image_size)
    # The layouts the feed will fill: where=batch keeps the training images as working squares.
    layouts = [(data.split.train, target if where == "batch" else None), (data.split.val, None)]
    need = n = 0
    for table, square in layouts:
        paths = [str(p) for p in table["path"]]
        n += len(paths)
        need += estimate_cache(
            paths,
            mode="resized",
            min_decode_size=target,
            target=target,
            square=square,
            reader=data.reader,
        ).nbytes
    size = f"a resized cache of {n} images needs ~{need / MIB:.1f} MiB"
    limit = cfg.loader.cache_limit_mb
    if need > limit * MIB:
        return "none", f"{size}, over loader.cache_limit_mb={limit}; raise it to cache"
    free = None if shm_path is None else shm_free_bytes(shm_path)
    if free is None:
        return "resized", f"{size}, under loader.cache_limit_mb={limit}"
    keep = shm_margin(free) if margin is None else margin
    room = (
        f"{os.fspath(shm_path)} has {free / MIB:.0f} MiB free, {keep / MIB:.0f} MiB of it "
        "kept for the loader's batches"
    )
    if need > free - keep:
        return "none", f"{size}, but {room}; to cache, give it more (docker run --shm-size)"
    return "resized", f"{size}, under loader.cache_limit_mb={limit}; {room}"
