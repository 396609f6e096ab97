"""Cheap checks of an image file before (or instead of) decoding it: that it is a regular file
within the size limit, that its structure is complete (JPEG end marker, PNG IEND chunk, WebP
and BMP lengths), and that its header's pixel count is within the limit. Each problem is a
short reason string: ``check_image`` and ``check_bytes`` return it, and ``imageio``'s decoding,
which runs the same checks, raises it as a ``BadImageError`` naming the file."""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from feedtune.config import DataConfig

# Reasons shared by decode_image and check_image (tests and reports match on them).
EMPTY = "empty file"
NOT_FOUND = "file not found"
NOT_AN_IMAGE = "not an image"
TRUNCATED_JPEG = "truncated JPEG (no end-of-image marker)"
TRUNCATED_PNG = "truncated PNG (no IEND chunk)"
TRUNCATED_WEBP = "truncated WebP (file shorter than its RIFF header says)"
TRUNCATED_BMP = "truncated BMP (pixel data shorter than its header says)"
NOT_REGULAR = "not a regular file"

MIB = 1 << 20
# Limits used when a caller passes none: the defaults of data.max_pixels and data.max_file_mb.
DEFAULT_MAX_PIXELS: int = DataConfig.max_pixels
DEFAULT_MAX_BYTES: int = DataConfig.max_file_mb * MIB
# A FIFO swapped in between os.stat and open must not block the open (no-op for real files).
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A whole IEND chunk: zero length, type, CRC. 12 fixed bytes cannot occur by chance.
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Bytes read from the end of a file for the fast end-marker check (one disk page).
TAIL_BYTES = 4096
# Bytes read from the start: magic numbers and the BMP size fields.
HEAD_BYTES = 64
# JPEG markers with no length field (TEM, RST0-7, SOI, EOI).
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xDA)}


def resolve_limits(max_pixels: int | None, max_bytes: int | None) -> tuple[int, int]:
    """The limits to apply: None -> the config defaults; a limit below 1 is a caller bug."""
    limits = (
        DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
        DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
    )
    for name, value in zip(("max_pixels", "max_bytes"), limits, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return limits


def unreadable(exc: OSError) -> str:
    return f"unreadable ({exc.strerror or exc})"


def stat_problem(path: str | Path, max_bytes: int | None) -> str | None:
    """What ``os.stat`` alone says is wrong with ``path`` (it is not opened), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return NOT_FOUND
    except OSError as exc:
        return unreadable(exc)
    return file_problem(st, max_bytes)


def file_problem(st: os.stat_result, max_bytes: int | None) -> str | None:
    """Not a regular file, empty, or larger than ``max_bytes`` (None: no size limit)."""
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR
    if st.st_size == 0:
        return EMPTY
    if max_bytes is not None and st.st_size > max_bytes:
        return too_many_bytes(st.st_size, max_bytes)
    return None


def open_file(path: str | Path) -> io.BufferedReader:
    """Open for reading without blocking on a FIFO that replaced the file after ``os.stat``
    (the caller's ``fstat`` check then refuses it)."""
    return open(path, "rb", opener=lambda name, flags: os.open(name, flags | _O_NONBLOCK))


def _bytes_text(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


def too_many_bytes(size: int, max_bytes: int) -> str:
    return f"file is {_bytes_text(size)}, above data.max_file_mb = {_bytes_text(max_bytes)}"


def pixels_problem(size: tuple[int, int], max_pixels: int) -> str | None:
    """An image larger than ``max_pixels`` (from its header size), or None."""
    w, h = size
    if w * h <= max_pixels:
        return None
    return f"{w}x{h} = {w * h / 1e6:.1f} MP, above data.max_pixels = {max_pixels / 1e6:g} MP"


# --- structure checks ------------------------------------------------------------------------


def structure_problem(
    head: bytes, tail: bytes, size: int, read_all: Callable[[], bytes]
) -> str | None:
    """Missing end marker of JPEG/PNG, short WebP; ``read_all`` only if the tail looks wrong."""
    if head.startswith(JPEG_MAGIC):
        # Fast path: EOI at the very end, after optional 0x00/0xFF padding some cameras write.
        if tail.rstrip(b"\x00\xff").endswith(b"\xff\xd9") or _jpeg_has_eoi(read_all()):
            return None
        return TRUNCATED_JPEG
    if head.startswith(_PNG_MAGIC):
        if _PNG_IEND in tail or _png_has_iend(read_all()):
            return None
        return TRUNCATED_PNG
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        (riff_size,) = struct.unpack("<I", head[4:8])
        if size < riff_size + 8:
            return TRUNCATED_WEBP
    if head[:2] == b"BM" and len(head) >= 34:
        offset, header_size, width, height, _, bits, compression = struct.unpack(
            "<I I i i H H I", head[10:34]
        )
        # Uncompressed layouts only (BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS); rows are padded
        # to 4 bytes; a negative height means top-down rows.
        if header_size >= 40 and compression in (0, 3, 6) and width > 0 and bits > 0:
            if size < offset + (width * bits + 31) // 32 * 4 * abs(height):
                return TRUNCATED_BMP
    return None


def _jpeg_has_eoi(data: bytes) -> bool:
    """True if an end-of-image marker follows the first scan (trailing data allowed).

    Walks the header segments to the first start-of-scan, so that the EOI of an EXIF thumbnail
    (inside APP1) does not count; after that, byte stuffing guarantees that FF D9 can only be a
    real EOI.
    """
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break  # broken segment structure: be lenient and let the decoder judge
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return data.find(b"\xff\xd9", min(pos, n)) != -1


def _png_has_iend(data: bytes) -> bool:
    """Walk the PNG chunks to an IEND chunk (trailing data after it allowed)."""
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IEND":
            return True
        pos += 12 + length  # length, type, data, CRC
    return False


# --- decoding --------------------------------------------------------------------------------


def check_image(
    path: str | Path, *, max_pixels: int | None = None, max_bytes: int | None = None
) -> str | None:
    """Cheap structural check without decoding pixels: None if OK, else a short reason.

    ``os.stat`` comes first: a non-regular file is never opened (a FIFO would block the read)
    and a file over ``max_bytes`` is never read; an image over ``max_pixels`` is refused from
    its header. Both limits default (None) to those of ``decode_image``, so a file that passes
    here is not refused by ``decode_image`` for its size.

    Reads the header (Pillow identifies the format lazily) and the last few KiB (JPEG
    end-of-image marker, PNG IEND chunk; WebP and uncompressed BMP sizes from the header).
    Only a file whose end looks wrong is read whole, to look for an end marker followed by
    trailing data (e.g. camera padding or an appended motion-photo video). Truncated GIF and
    TIFF files, and files whose pixel data is corrupt inside, pass here and fail in
    ``decode_image``.
    """
    max_pixels, max_bytes = resolve_limits(max_pixels, max_bytes)
    problem = stat_problem(path, max_bytes)
    if problem:
        return problem
    try:
        with open_file(path) as f:
            st = os.fstat(f.fileno())
            problem = file_problem(st, max_bytes)
            if problem:
                return problem
            size = st.st_size
            head = f.read(HEAD_BYTES)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()

            def read_all() -> bytes:
                f.seek(0)
                return f.read()

            problem = structure_problem(head, tail, size, read_all)
            if problem:
                return problem
            f.seek(0)
            try:
                # Header only; closing the image leaves ``f`` open.
                with Image.open(f) as im:
                    dimensions = im.size
            except UnidentifiedImageError:
                return NOT_AN_IMAGE
            except Exception as exc:
                return f"bad header ({type(exc).__name__}: {exc})"
    except FileNotFoundError:
        return NOT_FOUND
    except OSError as exc:
        return unreadable(exc)
    return pixels_problem(dimensions, max_pixels)


def check_bytes(
    data: bytes, *, max_pixels: int | None = None, max_bytes: int | None = None
) -> str | None:
    """``check_image`` of an encoded image held in memory: None if OK, else a short reason."""
    max_pixels, max_bytes = resolve_limits(max_pixels, max_bytes)
    if not data:
        return EMPTY
    if len(data) > max_bytes:
        return too_many_bytes(len(data), max_bytes)
    problem = structure_problem(data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data), lambda: data)
    if problem:
        return problem
    try:
        with Image.open(io.BytesIO(data)) as im:
            dimensions = im.size
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except Exception as exc:
        return f"bad header ({type(exc).__name__}: {exc})"
    return pixels_problem(dimensions, max_pixels)
