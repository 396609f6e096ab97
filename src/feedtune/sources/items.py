"""How the images of a table's rows are read, whatever holds them.

A table row's ``path`` is its item's key: the image file itself for ImageFolder and CSV
sources, or a reference ``<source>#<index>`` (the index zero-padded, so keys sort in item
order) for an Arrow dataset or a user's torch ``Dataset``. Everything downstream (the split,
the bad-item scan, ``inspect``, the caches, the Dataset) reads items through the source's
``ItemReader``, so each works unchanged on every source.

A reader is picklable and small: what it opens (an Arrow file, a user's Dataset) is opened
lazily in each process that reads, never sent to DataLoader workers.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from feedtune.sources.image_checks import JPEG_MAGIC, check_image
from feedtune.sources.imageio import (
    BadImageError,
    decode_image,
    image_size,
    jpeg_scale,
)

# The separator of an item reference: ``<source>#<index>``.
REF_SEP = "#"


def item_ref(source: str, index: int, count: int) -> str:
    """Key of item ``index`` of ``count``: zero-padded so that keys sort in item order."""
    width = max(6, len(str(max(count - 1, 0))))
    return f"{source}{REF_SEP}{index:0{width}d}"


def ref_index(ref: str) -> int:
    """The item index of a reference from ``item_ref``."""
    return int(ref.rsplit(REF_SEP, 1)[1])


class ItemReader:
    """Reads the items of one source; this base reads image files (``path`` is the file).

    ``kind`` names the source in messages and ``feed/feed.json``; ``inert`` holds the config
    keys that cannot change anything for this source (not searched, not benchmarked).
    """

    kind = "files"
    inert: frozenset[str] = frozenset()

    def decode(
        self,
        ref: str,
        *,
        backend: str = "pil",
        min_size: int | None = None,
        max_pixels: int | None = None,
        max_bytes: int | None = None,
    ) -> np.ndarray:
        """The item's ``(H, W, 3) uint8`` RGB pixels; ``BadImageError`` naming ``ref``."""
        limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
        return self._decode(ref, backend, min_size, limits)

    def _decode(
        self, ref: str, backend: str, min_size: int | None, limits: dict[str, int | None]
    ) -> np.ndarray:
        """``decode`` for this source: here the item is the image file ``ref``."""
        return decode_image(ref, backend=backend, min_size=min_size, **limits)

    def check(
        self, ref: str, *, max_pixels: int | None = None, max_bytes: int | None = None
    ) -> str | None:
        """Cheap check before training: None if the item looks sound, else the reason."""
        return check_image(ref, max_pixels=max_pixels, max_bytes=max_bytes)

    def decoded_hw(self, ref: str, min_size: int | None) -> tuple[int, int]:
        """(H, W) that ``decode(ref, min_size=min_size)`` returns, from the header where it
        can (a cache's size is estimated from these before anything is decoded)."""
        w, h = image_size(ref)
        if min_size is not None:
            with open(ref, "rb") as f:
                is_jpeg = f.read(3) == JPEG_MAGIC
            scale = jpeg_scale((w, h), min_size) if is_jpeg else 1
            w, h = math.ceil(w / scale), math.ceil(h / scale)
        return h, w

    def header(self, ref: str) -> tuple[int, int, str, str]:
        """``(width, height, format, mode)`` as decoded (EXIF orientation applied), from the
        header where it can; ``BadImageError`` if it cannot be read."""
        from PIL import Image  # the header only: format and mode

        try:
            with Image.open(ref) as im:
                fmt, mode = im.format or "", im.mode
        except Exception as exc:
            raise BadImageError(ref, f"bad header ({type(exc).__name__}: {exc})") from None
        w, h = image_size(ref)
        return w, h, fmt, mode

    def digest(self, ref: str) -> tuple[int, str]:
        """``(bytes, sha256)`` of the item's stored form; ``(0, "")`` when unreadable."""
        try:
            with open(ref, "rb") as f:
                return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return 0, ""

    def describe(self) -> str:
        return self.kind


FILES = ItemReader()


@dataclass
class Source:
    """A loaded data source: one row per item (``path`` = its key, ``label`` [, ``group``]),
    its reader, and the classes when the source declares them (in its order; else the sorted
    labels). ``unlisted`` holds items that could not even be listed (no label could be read):
    they are reported with the bad items (columns path, label, reason)."""

    table: pd.DataFrame
    reader: ItemReader = FILES
    classes: list[str] | None = None
    unlisted: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["path", "label", "reason"])
    )


def declared_classes(declared: list[str], labels: pd.Series, *, where: str) -> list[str]:
    """``declared`` (a source's class names, in its order) restricted to those with items: a
    class without any would only drag macro-F1 down. Labels not declared are an error."""
    present = set(labels)
    unknown = sorted(present - set(declared))
    if unknown:
        raise ValueError(f"{where}: labels not among its classes: {', '.join(unknown[:5])}")
    return [c for c in declared if c in present]
