"""Decoded-image cache shared by the DataLoader workers (``loader.cache``).

``build_cache`` decodes every image of a dataset ONCE, in the main process, before the loader
starts, into one shared-memory ``uint8`` buffer plus an offsets/shapes table. Workers forked
(or spawned) afterwards map the same pages: ``get`` returns a read-only view, no copy, no
decode. Modes:

- ``decoded``: exactly what ``ImageDataset.load_image`` returns without a cache (same decoder,
  same reduced-size JPEG decoding), so training sees identical pixels.
- ``resized``: each image stored once with its shorter side scaled down to a working resolution
  (``working_size``: 1.25x the eval resize, never below the training size), FFCV's trick. Pixels
  change slightly (one extra area resize), shapes keep their aspect ratio; the transforms then
  run on small images. Images already smaller are stored as decoded (no upscaling).

With ``square=n`` (the training set of ``augment.where: batch``) either mode stores each image
squashed to the ``n x n`` working square with its aspect ratio (``feed.augment.squares``),
exactly what ``ToWorkingUint8`` makes of the decoded image per sample: the loader then only
slices memory.

The memory a cache will take is estimated from the image headers and checked against
``loader.cache_limit_mb`` before anything is decoded (over it: ``CacheTooLargeError``), then
against the free space of the shared-memory filesystem (``/dev/shm`` on Linux, 64 MB in a
default Docker container). Shared pages are only allocated when written, so a cache that does
not fit there would kill the process filling it (or a worker) with a bus error half-way; one
that does not fit is skipped with a warning and the dataset decodes per sample. A bad image
is marked bad in the table and ``get`` raises ``BadImageError`` for it, so the dataset skips
it as it would without cache.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch

from feedtune.config import LoaderConfig
from feedtune.feed.augment.squares import SquashedImage, squash
from feedtune.feed.cache_sizing import (
    MIB,
    SHM_PATH,
    CacheEstimate,
    check_limit,
    estimate_cache,
    fits_in_shm,
    resized_hw,
)
from feedtune.feed.geometry import working_size
from feedtune.progress import progress_bar
from feedtune.sources.imageio import BadImageError
from feedtune.sources.items import FILES

log = logging.getLogger(__name__)

MODES = ("none", "decoded", "resized")


class ImageCache:
    """Images of one dataset in one shared ``uint8`` buffer; ``get(i)`` is a read-only view.

    Attributes:
        mode: ``decoded`` or ``resized``.
        square: the side of the stored squares (``get`` returns ``SquashedImage``), or None.
        nbytes: bytes of pixel data held.
        fill_seconds: wall time of ``build_cache`` (header scan, decoding, copying).
        bad: index -> reason for the images that could not be decoded.
    """

    def __init__(
        self,
        buffer: torch.Tensor,
        offsets: np.ndarray,
        shapes: np.ndarray,
        *,
        paths: list[str],
        bad: dict[int, str],
        mode: str,
        fill_seconds: float,
        aspects: np.ndarray | None = None,
    ) -> None:
        self.buffer = buffer  # shared-memory tensor: pickles to workers by handle, not by value
        self.offsets = offsets
        self.shapes = shapes
        self.paths = paths
        self.bad = bad
        self.mode = mode
        self.fill_seconds = fill_seconds
        self.aspects = aspects  # width / height of each original image, when squares are kept
        self._view()

    def _view(self) -> None:
        self._pixels = self.buffer.numpy()
        self._pixels.flags.writeable = False  # a transform writing in place must not corrupt it

    @property
    def square(self) -> int | None:
        if self.aspects is None:
            return None
        return int(self.shapes[0, 0]) if len(self) else 0

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.shapes)

    def get(self, index: int) -> np.ndarray | SquashedImage:
        """The ``(H, W, 3) uint8`` image ``index`` (read-only view into the shared buffer), or
        for a cache of squares its ``SquashedImage`` (a ``[3, n, n]`` view: copy before
        writing to it, as collating does)."""
        reason = self.bad.get(index)
        if reason is not None:
            raise BadImageError(self.paths[index], reason)
        h, w = self.shapes[index]
        start = self.offsets[index]
        if self.aspects is not None:
            pixels = self.buffer[start : start + h * w * 3].view(3, h, w)
            return SquashedImage(pixels, float(self.aspects[index]))
        return self._pixels[start : start + h * w * 3].reshape(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers: torch's pickler sends the shared buffer's handle; rebuild the view.
        state = self.__dict__.copy()
        del state["_pixels"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._view()

    def __repr__(self) -> str:
        square = "" if self.aspects is None else f", square={self.square}"
        return (
            f"ImageCache(mode={self.mode!r}{square}, images={len(self)}, bad={len(self.bad)}, "
            f"mb={self.nbytes / MIB:.1f}, fill_seconds={self.fill_seconds:.2f})"
        )


def _decode_min_size(dataset: Any, *, mode: str, target: int) -> int | None:
    """``decoded`` decodes as the dataset does; ``resized`` may reduce down to ``target``."""
    return target if mode == "resized" else getattr(dataset, "min_decode_size", None)


def _shared_uint8(nbytes: int) -> torch.Tensor:
    """A 1-D uint8 tensor in shared memory, without touching its pages first."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # pragma: no cover - older/newer torch: copies zeros once
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(max(nbytes, 1)))[:nbytes]


def build_cache(
    dataset: Any,
    cfg: LoaderConfig,
    *,
    image_size: int,
    progress: bool = False,
    reserved_bytes: int = 0,
    shm_path: str | os.PathLike[str] | None = SHM_PATH,
    shm_margin_bytes: int | None = None,
    square: int | None = None,
) -> ImageCache | None:
    """Decode ``dataset``'s images into a shared cache (``cfg.cache``), or None for ``none``
    and for a cache that does not fit in shared memory (a warning says why and what to change).

    Args:
        dataset: an ``ImageDataset`` (``paths``, ``reader``, ``decoder``, ``min_decode_size``
            are used).
        cfg: ``cache`` (mode) and ``cache_limit_mb`` (refused above it, before decoding).
        image_size: the training resolution; ``resized`` keeps a shorter side of
            ``working_size(image_size)``.
        progress: show progress while filling (a bar on a terminal, a line in a log).
        reserved_bytes: bytes other caches of the same run already hold (counted in the limit;
            not in the shared-memory check, whose free space already excludes them).
        shm_path: a path on the filesystem that holds torch's shared memory, whose free space
            the estimate must fit in; None, or a path that does not exist, skips the check.
            Free space is read from a real filesystem rather than injected as a number, so
            tests run the same check on a real folder.
        shm_margin_bytes: bytes to leave free there for the loader's batches; default
            ``shm_margin(free)``. Tests set it from the folder's real free space to make a
            cache not fit without filling a disk.
        square: store every image squashed to this working square with its aspect ratio
            (``feed.augment.squares``); ``get`` then returns a ``SquashedImage``.

    Raises:
        CacheTooLargeError: the estimate exceeds ``loader.cache_limit_mb``.
    """
    if not _caching(cfg):
        return None
    start = time.perf_counter()
    paths = list(dataset.paths)
    target = working_size(image_size)
    estimate = _estimate_that_fits(
        dataset,
        cfg,
        paths,
        target=target,
        square=square,
        reserved_bytes=reserved_bytes,
        shm_path=shm_path,
        shm_margin_bytes=shm_margin_bytes,
    )
    if estimate is None:
        return None
    cache = _fill(
        dataset, paths, estimate, mode=cfg.cache, target=target, progress=progress, square=square
    )
    cache.fill_seconds = time.perf_counter() - start
    log.info("filled %r", cache)
    return cache


def _caching(cfg: LoaderConfig) -> bool:
    """Whether ``cfg.cache`` asks for a cache (a mode that is none of ``MODES`` is an error)."""
    if cfg.cache not in MODES:
        raise ValueError(f"loader.cache: got {cfg.cache!r}, allowed: {', '.join(MODES)}")
    return cfg.cache != "none"


def _estimate_that_fits(
    dataset: Any,
    cfg: LoaderConfig,
    paths: list[str],
    *,
    target: int,
    square: int | None,
    reserved_bytes: int,
    shm_path: str | os.PathLike[str] | None,
    shm_margin_bytes: int | None,
) -> CacheEstimate | None:
    """The cache's size from the headers, refused over the limit (``CacheTooLargeError``);
    None when it would not fit in shared memory (a warning says why)."""
    reader = getattr(dataset, "reader", FILES)
    estimate = estimate_cache(
        paths,
        mode=cfg.cache,
        min_decode_size=_decode_min_size(dataset, mode=cfg.cache, target=target),
        target=target,
        square=square,
        reader=reader,
    )
    check_limit(
        estimate, cfg, paths=paths, target=target, reserved_bytes=reserved_bytes, reader=reader
    )
    fits = fits_in_shm(
        estimate,
        cfg,
        paths=paths,
        target=target,
        path=shm_path,
        margin=shm_margin_bytes,
        reader=reader,
    )
    return estimate if fits else None


def _entry_loader(
    dataset: Any,
    paths: list[str],
    estimate: CacheEstimate,
    *,
    mode: str,
    target: int,
    square: int | None,
) -> Callable[[int], np.ndarray | tuple[np.ndarray, float] | str]:
    """What the cache stores for image ``i``: its pixels (with its aspect for squares), or the
    reason it is bad."""
    decoder = getattr(dataset, "decoder", "pil")
    reader = getattr(dataset, "reader", FILES)  # files, Arrow rows or a user's Dataset
    min_decode = _decode_min_size(dataset, mode=mode, target=target)
    # The dataset's own size limits: the cache must refuse exactly what the dataset refuses.
    limits = {
        "max_pixels": getattr(dataset, "max_pixels", None),
        "max_bytes": getattr(dataset, "max_bytes", None),
    }

    def load(i: int) -> np.ndarray | tuple[np.ndarray, float] | str:
        if i in estimate.bad:
            return estimate.bad[i]
        try:
            image = reader.decode(paths[i], backend=decoder, min_size=min_decode, **limits)
        except BadImageError as exc:
            return exc.reason
        if square is not None:
            pixels, aspect = squash(image, square)
            return np.ascontiguousarray(pixels.transpose(2, 0, 1)), aspect  # CHW: batch layout
        if mode == "resized":
            h, w = resized_hw(*image.shape[:2], target)
            if (h, w) != image.shape[:2]:
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        return image

    return load


def _fill(
    dataset: Any,
    paths: list[str],
    estimate: CacheEstimate,
    *,
    mode: str,
    target: int,
    progress: bool,
    square: int | None = None,
) -> ImageCache:
    load = _entry_loader(dataset, paths, estimate, mode=mode, target=target, square=square)
    buffer = _shared_uint8(estimate.nbytes)
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    shapes = np.zeros((len(paths), 2), dtype=np.int64)
    aspects = None if square is None else np.ones(len(paths), dtype=np.float64)
    bad: dict[int, str] = {}
    # Pillow, libjpeg and OpenCV release the GIL: threads decode in parallel in this process.
    threads = max(1, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(load, range(len(paths)))
        bar = progress_bar(
            results,
            total=len(paths),
            desc=f"cache ({mode})",
            unit="img",
            leave=False,
            enabled=progress,
        )
        pos = 0
        for i, result in enumerate(bar):
            if isinstance(result, str):
                bad[i] = result
                log.warning("bad image skipped: %s (%s)", paths[i], result)
            else:
                if aspects is not None:
                    result, aspects[i] = result
                size = result.size
                if pos + size > buffer.numel():  # header and decoder disagree: grow, copy once
                    bigger = _shared_uint8(max(pos + size, int(buffer.numel() * 1.25)))
                    bigger[:pos].copy_(buffer[:pos])
                    buffer = bigger
                buffer[pos : pos + size].numpy()[:] = result.reshape(-1)
                shapes[i] = result.shape[1:] if aspects is not None else result.shape[:2]
                pos += size
            offsets[i + 1] = pos
    if aspects is not None:
        shapes[:] = square  # bad images too: every entry describes an n x n square
    return ImageCache(
        buffer,
        offsets,
        shapes,
        paths=paths,
        bad=bad,
        mode=mode,
        fill_seconds=0.0,
        aspects=aspects,
    )


def attach_cache(dataset: Any, cache: ImageCache | None) -> None:
    """Make ``dataset.load_image`` read from ``cache`` (None detaches)."""
    if cache is not None and list(cache.paths) != list(dataset.paths):
        raise ValueError("this cache was built for a different list of images")
    dataset.cache = cache
