"""How big a decoded-image cache will be, from image headers alone, and whether it fits:
under ``loader.cache_limit_mb`` and in the free shared memory (``/dev/shm`` on Linux, 64 MB in
a default Docker container), where pages are only allocated when written, so a cache that
does not fit would kill the process filling it with a bus error half-way."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np

from feedtune.config import LoaderConfig
from feedtune.sources.imageio import BadImageError
from feedtune.sources.items import FILES, ItemReader

log = logging.getLogger(__name__)

MIB = 2**20
# Where torch's shared memory lives on Linux (shm_open); absent on macOS, where it is not checked.
SHM_PATH = "/dev/shm"
# Left free in shared memory for what the DataLoader passes through it (each worker's batches):
# this fraction of the free space, and at least SHM_MIN_MARGIN bytes.
SHM_MARGIN_FRACTION = 0.1
SHM_MIN_MARGIN = 16 * MIB
_JPEG_MAGIC = b"\xff\xd8\xff"


class CacheTooLargeError(ValueError):
    """The estimated cache does not fit under ``loader.cache_limit_mb``."""


def shm_free_bytes(path: str | os.PathLike[str] = SHM_PATH) -> int | None:
    """Free bytes of the filesystem holding ``path``, or None where there is no such path."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def shm_margin(free: int) -> int:
    """Bytes of ``free`` shared memory a cache must leave to the loader's batches."""
    return max(SHM_MIN_MARGIN, int(free * SHM_MARGIN_FRACTION))


@dataclass
class CacheEstimate:
    """Predicted shapes (0 x 0 for unreadable headers) and total bytes of a cache."""

    shapes: np.ndarray  # (n, 2) int64: height, width
    bad: dict[int, str]

    @property
    def nbytes(self) -> int:
        return int((self.shapes[:, 0] * self.shapes[:, 1] * 3).sum())


def resized_hw(h: int, w: int, target: int) -> tuple[int, int]:
    """Shorter side scaled down to ``target`` (aspect kept); smaller images unchanged."""
    shorter = min(h, w)
    if shorter <= target:
        return h, w
    if h <= w:
        return target, max(target, round(w * target / h))
    return max(target, round(h * target / w)), target


def estimate_cache(
    paths: list[str],
    *,
    mode: str,
    min_decode_size: int | None,
    target: int,
    square: int | None = None,
    reader: ItemReader = FILES,
) -> CacheEstimate:
    """Shapes each image will have in the cache, from headers only (no decoding) where the
    source's ``reader`` can read them."""
    shapes = np.zeros((len(paths), 2), dtype=np.int64)
    bad: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            h, w = reader.decoded_hw(path, min_decode_size)
        except (BadImageError, OSError) as exc:
            bad[i] = getattr(exc, "reason", None) or str(exc)
            continue
        if square is not None:
            shapes[i] = (square, square)
        else:
            shapes[i] = resized_hw(h, w, target) if mode == "resized" else (h, w)
    return CacheEstimate(shapes=shapes, bad=bad)


def resized_hint(mode: str, paths: list[str], *, target: int, reader: ItemReader = FILES) -> str:
    """``, or use loader.cache=resized (~N MiB)`` for a ``decoded`` cache, else empty."""
    if mode != "decoded":
        return ""
    small = estimate_cache(
        paths, mode="resized", min_decode_size=target, target=target, reader=reader
    )
    return f", or use loader.cache=resized (~{small.nbytes / MIB:.0f} MiB)"


def check_limit(
    estimate: CacheEstimate,
    cfg: LoaderConfig,
    *,
    paths: list[str],
    target: int,
    reserved_bytes: int = 0,
    reader: ItemReader = FILES,
) -> None:
    """Raise ``CacheTooLargeError`` when ``estimate`` plus what other caches of the run hold
    (``reserved_bytes``) is over ``loader.cache_limit_mb``, saying what to change."""
    if estimate.nbytes + reserved_bytes <= cfg.cache_limit_mb * MIB:
        return
    hint = resized_hint(cfg.cache, paths, target=target, reader=reader)
    held = f" + {reserved_bytes / MIB:.0f} MiB already cached" if reserved_bytes else ""
    raise CacheTooLargeError(
        f"loader.cache={cfg.cache} needs ~{estimate.nbytes / MIB:.0f} MiB for "
        f"{len(paths)} images{held}, over loader.cache_limit_mb={cfg.cache_limit_mb}; "
        f"raise loader.cache_limit_mb{hint}, or set loader.cache=none"
    )


def fits_in_shm(
    estimate: CacheEstimate,
    cfg: LoaderConfig,
    *,
    paths: list[str],
    target: int,
    path: str | os.PathLike[str] | None,
    margin: int | None,
    reader: ItemReader = FILES,
) -> bool:
    """Whether ``estimate`` fits in the free shared memory at ``path`` less a margin; if not,
    warn with the numbers and the settings to change. True where it cannot be checked."""
    free = None if path is None else shm_free_bytes(path)
    if free is None:
        return True
    keep = shm_margin(free) if margin is None else margin
    if estimate.nbytes <= free - keep:
        return True
    short = estimate.nbytes + keep - free
    log.warning(
        "loader.cache=%s needs ~%.1f MiB of shared memory for %d images, but %s has %.1f MiB "
        "free (%.1f MiB of it kept for the loader's batches): not caching, images are decoded "
        "per sample as with loader.cache=none. To cache, give it at least %.0f MiB more "
        "(docker run --shm-size), or lower augment.image_size%s",
        cfg.cache,
        estimate.nbytes / MIB,
        len(paths),
        os.fspath(path),
        free / MIB,
        keep / MIB,
        math.ceil(short / MIB),
        resized_hint(cfg.cache, paths, target=target, reader=reader),
    )
    return False
