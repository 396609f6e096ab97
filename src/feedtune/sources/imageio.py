"""Decode one image (a file or bytes) to an RGB ``uint8`` array; read its size from its header.

``decode_image`` is what the Dataset calls per sample: it always returns a C-contiguous,
writable ``(H, W, 3) uint8`` RGB array, whatever the file holds:

- grayscale (``L``, 1-bit) is replicated to three channels;
- alpha (``RGBA``, ``LA``, palette or ``tRNS`` transparency) is composited on **white**:
  transparent areas become white, as they look in a browser or file viewer;
- 16-bit PNG is scaled to 8 bit (65535 -> 255, 32768 -> 128), not clipped;
- CMYK JPEG (also Adobe's inverted CMYK) is converted by Pillow;
- the EXIF orientation is applied (the same table as ``PIL.ImageOps.exif_transpose``).

No colour management: embedded ICC profiles are ignored, as OpenCV does.

Two backends with the same semantics: ``pil`` (the reference) and ``opencv``. OpenCV is used
only where it is both faster and right: plain (non-CMYK) JPEG. Everything else goes through
the Pillow path in both backends, so the choice of backend is a pure speed setting.

A file that cannot be decoded raises ``BadImageError`` naming the file and the reason. JPEG and
PNG files are checked for their end marker first, because OpenCV decodes a truncated JPEG
"successfully" (grey fill, a warning on stderr) and Pillow accepts a PNG with no IEND chunk.

Hostile files are refused cheaply, in this order: anything that is not a regular file (FIFO,
socket, device) from ``os.stat`` without being opened, since reading a FIFO blocks forever; a
file larger than ``max_bytes`` from its size, before it is read; an image with more than
``max_pixels`` pixels from its header, before its pixels are decoded. The default limits are
those of the ``data.max_file_mb`` and ``data.max_pixels`` config keys.

Global Pillow state (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``) is left at its defaults.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from feedtune.sources.image_checks import (
    EMPTY,
    HEAD_BYTES,
    JPEG_MAGIC,
    NOT_AN_IMAGE,
    NOT_FOUND,
    TAIL_BYTES,
    file_problem,
    open_file,
    pixels_problem,
    resolve_limits,
    stat_problem,
    structure_problem,
    too_many_bytes,
    unreadable,
)
from feedtune.sources.pixels import decode_opencv as _decode_opencv
from feedtune.sources.pixels import pil_to_rgb

__all__ = [
    "BACKENDS",
    "BadImageError",
    "bytes_header",
    "decode_bytes",
    "decode_image",
    "image_size",
    "jpeg_scale",
]

BACKENDS = ("pil", "opencv")


_ORIENTATION_TAG = 0x0112


class BadImageError(ValueError):
    """A file that is not a decodable image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        if reason is None:
            # One-argument form: torch's DataLoader re-raises a worker's exception as
            # ``type(exc)(formatted_traceback)``; recover path and reason from that text so
            # ``except BadImageError`` and ``.path`` still work in the main process.
            message = str(path)
            found = re.findall(r"bad image (.+?): (.+)", message)
            path, reason = found[-1] if found else ("", message)
        else:
            message = f"bad image {path}: {reason}"
        super().__init__(message)
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Default exception pickling replays ``args`` (the message only); replay both fields.
        return (type(self), (self.path, self.reason))


def decode_image(
    path: str | Path,
    *,
    backend: str = "pil",
    min_size: int | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Decode ``path`` to a C-contiguous, writable ``(H, W, 3) uint8`` RGB array.

    Args:
        path: the image file.
        backend: ``"pil"`` or ``"opencv"``; same result (OpenCV decodes plain JPEG only, the
            rest falls back to Pillow).
        min_size: if set and the file is a JPEG whose shorter side is at least
            ``2 * min_size``, decode at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, much
            cheaper than decode-then-resize), the smallest that keeps the shorter side
            ``>= min_size``. Other formats are decoded at full size.
        max_pixels: refuse an image whose header gives more pixels (width * height) than
            this, before decoding it; None means ``DEFAULT_MAX_PIXELS`` (data.max_pixels).
        max_bytes: refuse a file larger than this, before reading it; None means
            ``DEFAULT_MAX_BYTES`` (data.max_file_mb).

    Raises:
        BadImageError: empty, missing, unreadable, not a regular file, over a limit,
            truncated, or not an image.
        ValueError: unknown ``backend``, or a ``min_size`` or limit below 1.
    """
    max_pixels, max_bytes = _decode_limits(backend, min_size, max_pixels, max_bytes)
    problem = stat_problem(path, max_bytes)
    if problem:
        raise BadImageError(path, problem)
    try:
        with open_file(path) as f:
            st = os.fstat(f.fileno())
            problem = file_problem(st, max_bytes)
            if problem:
                raise BadImageError(path, problem)
            # The size just checked, even if the file grows meanwhile (read(n) allocates n).
            data = f.read(st.st_size)
    except FileNotFoundError:
        raise BadImageError(path, NOT_FOUND) from None
    except OSError as exc:
        raise BadImageError(path, unreadable(exc)) from None
    return decode_bytes(
        data,
        name=path,
        backend=backend,
        min_size=min_size,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
    )


def decode_bytes(
    data: bytes,
    *,
    name: str | Path = "<bytes>",
    backend: str = "pil",
    min_size: int | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """``decode_image`` of an encoded image held in memory (an upload, an Arrow dataset's image
    bytes): the same checks, limits and result; ``name`` is what a ``BadImageError`` names."""
    max_pixels, max_bytes = _decode_limits(backend, min_size, max_pixels, max_bytes)
    data = bytes(data)
    if len(data) > max_bytes:
        raise BadImageError(name, too_many_bytes(len(data), max_bytes))
    if not data:
        raise BadImageError(name, EMPTY)
    problem = structure_problem(data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data), lambda: data)
    if problem:
        raise BadImageError(name, problem)
    try:
        im = Image.open(io.BytesIO(data))  # header only: format, mode, size, EXIF
    except UnidentifiedImageError:
        raise BadImageError(name, NOT_AN_IMAGE) from None
    except Exception as exc:  # Pillow raises many types (SyntaxError, struct.error, ...)
        raise BadImageError(name, f"bad header ({type(exc).__name__}: {exc})") from None
    problem = pixels_problem(im.size, max_pixels)
    if problem:
        raise BadImageError(name, problem)
    try:
        orientation = _orientation(im)
        scale = jpeg_scale(im.size, min_size) if data.startswith(JPEG_MAGIC) else 1
        if backend == "opencv" and data.startswith(JPEG_MAGIC) and im.mode != "CMYK":
            rgb = _decode_opencv(data, scale)
            if rgb is None:
                raise BadImageError(name, "OpenCV could not decode it")
        else:
            if scale > 1:
                # Pillow keeps the size >= the request and picks the largest scale that fits.
                w, h = im.size
                im.draft(im.mode, (w // scale, h // scale))
            im.load()
            rgb = pil_to_rgb(im)
    except BadImageError:
        raise
    except Exception as exc:
        raise BadImageError(name, f"decode failed ({type(exc).__name__}: {exc})") from None
    return _orient(rgb, orientation)


def _decode_limits(
    backend: str, min_size: int | None, max_pixels: int | None, max_bytes: int | None
) -> tuple[int, int]:
    """The limits to apply, after refusing a bad ``backend`` or ``min_size`` (caller bugs)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown image backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if min_size is not None and (isinstance(min_size, bool) or min_size < 1):
        raise ValueError(f"min_size must be a positive integer or None, got {min_size!r}")
    return resolve_limits(max_pixels, max_bytes)


def bytes_header(data: bytes, *, name: str | Path) -> tuple[int, int, str, str]:
    """``(width, height, format, mode)`` of an encoded image in memory, from its header
    (width and height as ``decode_bytes`` returns them without ``min_size``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if _orientation(im) >= 5:  # 5-8 swap width and height
                w, h = h, w
            return w, h, im.format or "", im.mode
    except UnidentifiedImageError:
        raise BadImageError(name, NOT_AN_IMAGE) from None
    except Exception as exc:
        raise BadImageError(name, f"bad header ({type(exc).__name__}: {exc})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as ``decode_image`` returns it without ``min_size`` (EXIF
    orientation applied), from the header only. An orientation stored in a PNG eXIf chunk
    after the pixel data (rare) is not seen without decoding and is ignored here. A
    non-regular file is refused from ``os.stat`` without being opened (a FIFO would block).
    """
    problem = stat_problem(path, None)
    if problem:
        raise BadImageError(path, problem)
    try:
        with open_file(path) as f, Image.open(f) as im:
            w, h = im.size
            if _orientation(im) >= 5:  # 5-8 swap width and height
                w, h = h, w
    except FileNotFoundError:
        raise BadImageError(path, NOT_FOUND) from None
    except UnidentifiedImageError:
        raise BadImageError(path, NOT_AN_IMAGE) from None
    except Exception as exc:
        raise BadImageError(path, f"bad header ({type(exc).__name__}: {exc})") from None
    return w, h


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8 from the header (1 if absent or unreadable)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # Pillow would decode the whole PNG to look for a late eXIf chunk
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (same table as ``ImageOps.exif_transpose``)."""
    ops: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
        6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90 degrees clockwise)
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
        8: lambda a: np.rot90(a, 1),  # ROTATE_90
    }
    if orientation in ops:
        rgb = ops[orientation](rgb)
    if not (rgb.flags.c_contiguous and rgb.flags.writeable):
        # Views from the flips and Pillow's read-only buffers: callers may write in place.
        rgb = rgb.copy(order="C")
    return rgb


def jpeg_scale(size: tuple[int, int], min_size: int | None) -> int:
    """Largest DCT scale 8/4/2 that keeps the shorter side >= ``min_size``, else 1."""
    if min_size is None:
        return 1
    shorter = min(size)
    for scale in (8, 4, 2):
        if shorter >= scale * min_size:  # decoded side is ceil(shorter / scale) >= min_size
            return scale
    return 1
