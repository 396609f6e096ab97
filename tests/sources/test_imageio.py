"""decode_image / check_image / image_size on real files of every odd kind, both backends."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from feedtune.config import ConfigError, DataConfig, load_config
from feedtune.feed.dataset import ImageDataset
from feedtune.sources.image_checks import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    EMPTY,
    MIB,
    NOT_AN_IMAGE,
    NOT_REGULAR,
    TRUNCATED_JPEG,
    TRUNCATED_PNG,
    check_image,
)
from feedtune.sources.imageio import (
    BadImageError,
    decode_bytes,
    decode_image,
    image_size,
)
from feedtune.sources.prepare import scan_images

BACKENDS = ["pil", "opencv"]
RED, WHITE, BLACK = (255, 0, 0), (255, 255, 255), (0, 0, 0)


def _halves(left, right, size=(40, 30), mode="RGB") -> Image.Image:
    """``size`` (w, h) image: left half one colour, right half another."""
    w, h = size
    im = Image.new(mode, size, left)
    im.paste(right, (w // 2, 0, w, h))
    return im


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise: compresses like a photo, not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64], axis=2)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _close(pixel, expected, tol=6) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(expected)) <= tol))


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


# --- odd kinds: each writer returns (path, [(row, col, expected_rgb, tolerance), ...]) --------


def gray_jpeg(d: Path):
    p = d / "gray.jpg"
    _halves(50, 200, mode="L").save(p, quality=95)
    return p, [(15, 5, (50, 50, 50), 4), (15, 35, (200, 200, 200), 4)]


def one_bit_png(d: Path):
    p = d / "bits.png"
    _halves(0, 1, mode="1").save(p)
    return p, [(15, 5, BLACK, 0), (15, 35, WHITE, 0)]


def rgba_png(d: Path):
    p = d / "rgba.png"
    im = _halves((255, 0, 0, 255), (0, 0, 0, 0), mode="RGBA")
    im.paste((0, 0, 255, 128), (0, 0, 10, 10))  # half-transparent blue over white
    im.save(p)
    return p, [(15, 5, RED, 0), (15, 35, WHITE, 0), (5, 5, (127, 127, 255), 1)]


def la_png(d: Path):
    p = d / "la.png"
    _halves((0, 255), (0, 0), mode="LA").save(p)
    return p, [(15, 5, BLACK, 0), (15, 35, WHITE, 0)]


def palette_png(d: Path):
    p = d / "palette.png"
    im = _halves(0, 1, mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # 0 = red, 1 = green
    im.save(p, transparency=1)  # green is transparent
    return p, [(15, 5, RED, 0), (15, 35, WHITE, 0)]


def gray_trns_png(d: Path):
    p = d / "gray_trns.png"
    _halves(0, 90, mode="L").save(p, transparency=0)  # black is transparent (tRNS)
    return p, [(15, 5, WHITE, 0), (15, 35, (90, 90, 90), 0)]


def cmyk_jpeg(d: Path):
    p = d / "cmyk.jpg"
    # Pillow writes Adobe (inverted) CMYK with an APP14 marker.
    _halves((0, 255, 255, 0), (0, 0, 0, 0), mode="CMYK").save(p, quality=95)
    assert "adobe" in Image.open(p).info
    return p, [(15, 5, RED, 8), (15, 35, WHITE, 8)]


def gray16_png(d: Path):
    p = d / "gray16.png"
    a = np.zeros((30, 40), np.uint16)
    a[:, :10], a[:, 10:20], a[:, 20:30] = 65535, 32768, 257
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    return p, [(5, 5, WHITE, 0), (5, 15, (128, 128, 128), 0), (5, 25, (1, 1, 1), 0)]


def rgb16_png(d: Path):
    p = d / "rgb16.png"
    a = np.zeros((30, 40, 3), np.uint16)
    a[:, :20] = (65535, 32768, 0)  # RGB
    a[:, 20:] = (0, 65535, 12850)
    assert cv2.imwrite(str(p), a[:, :, ::-1].copy())  # OpenCV writes BGR
    return p, [(5, 5, (255, 128, 0), 1), (5, 35, (0, 255, 50), 1)]


def exif_rotated_jpeg(d: Path):
    p = d / "rot6.jpg"
    # Stored 40 wide x 30 high with red in the stored top-left corner. Orientation 6 means
    # "rotate 90 degrees clockwise to display": 30 wide x 40 high, red in the top-RIGHT corner.
    im = Image.new("RGB", (40, 30), WHITE)
    im.paste(RED, (0, 0, 8, 8))
    im.save(p, exif=_exif(6), quality=95)
    return p, [(3, 26, RED, 10), (3, 3, WHITE, 10), (36, 26, WHITE, 10)]


ODD_KINDS = [
    gray_jpeg,
    one_bit_png,
    rgba_png,
    la_png,
    palette_png,
    gray_trns_png,
    cmyk_jpeg,
    gray16_png,
    rgb16_png,
    exif_rotated_jpeg,
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ODD_KINDS, ids=lambda f: f.__name__)
def test_odd_kinds_decode_to_correct_rgb(tmp_path, make, backend):
    path, expected = make(tmp_path)
    arr = decode_image(path, backend=backend)
    h, w = (40, 30) if make is exif_rotated_jpeg else (30, 40)
    _check_rgb(arr, h, w)
    for row, col, rgb, tol in expected:
        assert _close(arr[row, col], rgb, tol), (row, col, arr[row, col], rgb)
    assert image_size(path) == (w, h)
    assert check_image(path) is None


@pytest.mark.parametrize("make", ODD_KINDS, ids=lambda f: f.__name__)
def test_backends_agree_on_odd_kinds(tmp_path, make):
    path, _ = make(tmp_path)
    pil, cv = decode_image(path, backend="pil"), decode_image(path, backend="opencv")
    assert pil.shape == cv.shape
    assert np.abs(pil.astype(int) - cv).mean() < 1.5


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(_photo(64, 48)).save(path, exif=_exif(orientation), quality=95)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    for backend in BACKENDS:
        arr = decode_image(path, backend=backend)
        assert arr.shape == reference.shape
        assert np.abs(arr.astype(int) - reference).mean() < 1.5, backend
    assert image_size(path) == (reference.shape[1], reference.shape[0])


def test_backends_near_identical_on_ordinary_jpeg(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_photo(300, 250)).save(path, quality=90)
    pil, cv = decode_image(path, backend="pil"), decode_image(path, backend="opencv")
    _check_rgb(pil, 250, 300)
    _check_rgb(cv, 250, 300)
    assert np.abs(pil.astype(int) - cv).mean() < 1.0


# --- reduced-size JPEG decoding --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("min_size", "expected_hw"),
    [(128, (150, 200)), (150, (150, 200)), (151, (300, 400)), (300, (300, 400)), (301, (600, 800))],
)
def test_min_size_decodes_smaller_but_never_below(tmp_path, backend, min_size, expected_hw):
    path = tmp_path / "big.jpg"
    Image.fromarray(_photo(800, 600)).save(path, quality=90)
    arr = decode_image(path, backend=backend, min_size=min_size)
    _check_rgb(arr, *expected_hw)
    assert min(arr.shape[:2]) >= min_size


def test_min_size_backends_agree_and_resemble_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_photo(800, 600)).save(path, quality=90)
    pil = decode_image(path, backend="pil", min_size=128)
    cv = decode_image(path, backend="opencv", min_size=128)
    assert pil.shape == cv.shape == (150, 200, 3)
    assert np.abs(pil.astype(int) - cv).mean() < 1.5
    full = decode_image(path).reshape(150, 4, 200, 4, 3).mean(axis=(1, 3))
    assert np.abs(full - pil).mean() < 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_size_respects_exif_orientation(tmp_path, backend):
    path = tmp_path / "big_rot.jpg"
    img = np.full((600, 800, 3), 255, np.uint8)
    img[:200, :200] = RED  # stored top-left -> displayed top-right under orientation 6
    Image.fromarray(img).save(path, exif=_exif(6), quality=95)
    arr = decode_image(path, backend=backend, min_size=128)
    _check_rgb(arr, 200, 150)
    assert _close(arr[10, 140], RED, 12) and _close(arr[10, 10], WHITE, 12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_size_leaves_png_full_size(tmp_path, backend):
    path = tmp_path / "big.png"
    Image.fromarray(_photo(400, 300)).save(path)
    _check_rgb(decode_image(path, backend=backend, min_size=32), 300, 400)


# --- bad files -------------------------------------------------------------------------------


def _jpeg_bytes(tmp_path: Path, **save) -> bytes:
    p = tmp_path / "_source.jpg"
    Image.fromarray(_photo(120, 90)).save(p, quality=90, **save)
    return p.read_bytes()


def _png_bytes(tmp_path: Path) -> bytes:
    p = tmp_path / "_source.png"
    Image.fromarray(_photo(120, 90)).save(p)
    return p.read_bytes()


BAD_FILES = {
    "empty.jpg": (lambda t: b"", EMPTY),
    "text.jpg": (lambda t: b"hello, I am not a picture\n" * 20, NOT_AN_IMAGE),
    "half.jpg": (lambda t: (d := _jpeg_bytes(t))[: len(d) // 2], TRUNCATED_JPEG),
    "nearly.jpg": (lambda t: _jpeg_bytes(t)[:-2], TRUNCATED_JPEG),  # only the EOI missing
    "half.png": (lambda t: (d := _png_bytes(t))[: len(d) // 2], TRUNCATED_PNG),
    "no_iend.png": (lambda t: _png_bytes(t)[:-12], TRUNCATED_PNG),
    # An EOI inside the EXIF block (as an embedded thumbnail has) must not hide truncation.
    "thumb_eoi.jpg": (
        lambda t: (d := _jpeg_bytes(t, exif=b"Exif\x00\x00" + b"\xff\xd9" * 8))[: len(d) // 2],
        TRUNCATED_JPEG,
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_raise_and_are_reported(tmp_path, name):
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    assert check_image(path) == reason
    for backend in BACKENDS:
        with pytest.raises(BadImageError) as info:
            decode_image(path, backend=backend)
        assert name in str(info.value)
        assert info.value.reason == reason
        assert info.value.path == str(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ODD_KINDS, ids=lambda f: f.__name__)
def test_bytes_in_memory_decode_as_their_file_does(tmp_path, make, backend):
    """An upload (the served model's input) gets the file's orientation, modes and scale."""
    path, _ = make(tmp_path)
    for min_size in (None, 8):
        from_file = decode_image(path, backend=backend, min_size=min_size)
        from_bytes = decode_bytes(path.read_bytes(), backend=backend, min_size=min_size)
        assert np.array_equal(from_bytes, from_file)


def test_bad_bytes_name_the_input_and_the_reason(tmp_path):
    for name, (make, reason) in BAD_FILES.items():
        with pytest.raises(BadImageError) as info:
            decode_bytes(make(tmp_path), name=f"upload {name}")
        assert info.value.reason == reason and info.value.path == f"upload {name}"
    with pytest.raises(BadImageError, match="upload"):
        decode_bytes(_jpeg_bytes(tmp_path), name="upload", max_bytes=100)


def test_missing_file(tmp_path):
    path = tmp_path / "gone.jpg"
    assert check_image(path) == "file not found"
    with pytest.raises(BadImageError, match="gone.jpg: file not found"):
        decode_image(path)
    with pytest.raises(BadImageError, match="gone.jpg"):
        image_size(path)


@pytest.mark.parametrize(
    "trailer",
    [b"\x00" * 300, b"\xff" * 7, b"ftypmp42" + bytes(range(256)) * 40],
    ids=["zeros", "ff", "video"],
)
def test_jpeg_with_trailing_bytes_is_fine(tmp_path, trailer):
    # Camera padding, or a whole video appended (Android motion photos).
    path = tmp_path / "padded.jpg"
    path.write_bytes(_jpeg_bytes(tmp_path) + trailer)
    assert check_image(path) is None
    for backend in BACKENDS:
        _check_rgb(decode_image(path, backend=backend), 90, 120)


def test_png_with_trailing_bytes_is_fine(tmp_path):
    path = tmp_path / "padded.png"
    path.write_bytes(_png_bytes(tmp_path) + b"junk" * 2000)
    assert check_image(path) is None
    _check_rgb(decode_image(path), 90, 120)


OTHER_FORMATS = [
    (ext, mode)
    for ext in ("bmp", "gif", "webp", "tiff")
    for mode in ("RGB", "RGBA", "L", "1")
    if not (ext == "webp" and mode in ("L", "1"))  # WebP has no grayscale modes
]


@pytest.mark.parametrize(("ext", "mode"), OTHER_FORMATS)
def test_other_formats_pass(tmp_path, ext, mode):
    path = tmp_path / f"x.{ext}"
    Image.fromarray(_photo(41, 30)).convert(mode).save(path)  # odd width: padded BMP rows
    assert check_image(path) is None
    for backend in BACKENDS:
        _check_rgb(decode_image(path, backend=backend), 30, 41)


@pytest.mark.parametrize("ext", ["webp", "bmp", "gif", "tiff"])
def test_other_formats_truncated(tmp_path, ext):
    path = tmp_path / f"x.{ext}"
    Image.fromarray(_photo(120, 90)).save(path)
    path.write_bytes(path.read_bytes()[:-50])
    for backend in BACKENDS:
        with pytest.raises(BadImageError, match=f"x.{ext}"):
            decode_image(path, backend=backend)
    # The cheap check sees it where the header gives the size; GIF/TIFF need a decode.
    assert (check_image(path) is not None) == (ext in ("webp", "bmp"))


def test_unknown_backend_and_bad_min_size(tmp_path):
    path, _ = gray_jpeg(tmp_path)
    with pytest.raises(ValueError, match="pil, opencv"):
        decode_image(path, backend="turbojpeg")
    with pytest.raises(ValueError, match="min_size"):
        decode_image(path, min_size=0)


def test_bad_image_error_pickles():
    err = BadImageError("/x/y.jpg", TRUNCATED_JPEG)
    assert str(err) == f"bad image /x/y.jpg: {TRUNCATED_JPEG}"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is BadImageError
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))
    assert isinstance(back, ValueError)


def test_bad_image_error_from_dataloader_message():
    # torch's DataLoader re-raises a worker's exception as ``type(exc)(formatted_traceback)``.
    text = (
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nfeedtune.imageio.BadImageError: '
        f"bad image /data/cat/a b.jpg: {TRUNCATED_JPEG}\n"
    )
    err = BadImageError(text)
    assert str(err) == text
    assert (err.path, err.reason) == ("/data/cat/a b.jpg", TRUNCATED_JPEG)


def test_opencv_backend_decodes_plain_jpeg_only(tmp_path, monkeypatch):
    import feedtune.sources.imageio as imageio

    calls = []
    real = imageio._decode_opencv
    monkeypatch.setattr(imageio, "_decode_opencv", lambda *a: calls.append(a) or real(*a))
    plain = tmp_path / "plain.jpg"
    Image.fromarray(_photo(40, 30)).save(plain)
    for make in (cmyk_jpeg, rgba_png, gray16_png, palette_png):
        decode_image(make(tmp_path)[0], backend="opencv")
    assert calls == []  # the Pillow path handled all of them
    decode_image(plain, backend="opencv")
    decode_image(plain, backend="pil")
    assert len(calls) == 1


# --- hostile files: FIFOs, huge headers, huge files ------------------------------------------


def _flat_png(path: Path, w: int, h: int) -> Path:
    """A valid, fully decodable 1-bit black PNG of any size, streamed row by row: a few KiB on
    disk and in memory even at 9000x9000 (Pillow would build the whole image first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)  # filter byte 0, then w bits of black
    idat = b"".join(packer.compress(row) for _ in range(h)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.timeout(20)
def test_fifo_is_not_a_regular_file(tmp_path):
    path = tmp_path / "x.jpg"
    os.mkfifo(path)  # nobody writes: opening it for reading would block forever
    assert check_image(path) == NOT_REGULAR
    for backend in BACKENDS:
        with pytest.raises(BadImageError, match="x.jpg: not a regular file"):
            decode_image(path, backend=backend)
    with pytest.raises(BadImageError, match="x.jpg: not a regular file"):
        image_size(path)
    table = pd.DataFrame({"path": [str(path)], "label": ["a"]})
    scan = scan_images(table, progress=False)
    assert scan.good.empty and scan.bad["reason"].tolist() == [NOT_REGULAR]


@pytest.mark.timeout(60)
def test_image_over_default_max_pixels_is_refused_from_its_header(tmp_path):
    # 81 MP: under Pillow's own warning limit (~89 MP), over data.max_pixels (64 MP).
    path = _flat_png(tmp_path / "huge.png", 9000, 9000)
    assert path.stat().st_size < 100_000
    reason = "9000x9000 = 81.0 MP, above data.max_pixels = 64 MP"
    assert check_image(path) == reason
    for backend in BACKENDS:
        with pytest.raises(BadImageError) as info:
            decode_image(path, backend=backend, min_size=64)
        assert info.value.reason == reason
        assert str(path) in str(info.value) and "data.max_pixels = 64 MP" in str(info.value)
    # The file itself is sound: at a limit it does not exceed, the header check passes.
    assert check_image(path, max_pixels=81_000_000) is None
    assert image_size(path) == (9000, 9000)


def test_max_pixels_threads_through_scan_and_dataset(tmp_path):
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(_photo(300, 200)).save(big)
    Image.fromarray(_photo(100, 100)).save(small)
    table = pd.DataFrame({"path": [str(big), str(small)], "label": ["a", "a"]})
    reason = "300x200 = 0.1 MP, above data.max_pixels = 0.05 MP"

    scan = scan_images(table, max_pixels=50_000, progress=False)
    assert scan.good["path"].tolist() == [str(small)]
    assert scan.bad[["path", "reason"]].values.tolist() == [[str(big), reason]]
    with pytest.raises(BadImageError, match="big.png: 300x200 = 0.1 MP, above data.max_pixels"):
        scan_images(table, on_bad_image="raise", max_pixels=50_000, progress=False)
    assert scan_images(table, progress=False).bad.empty  # the default limit is far above

    skipping = ImageDataset(table, ["a"], None, max_pixels=50_000)
    assert skipping[0] is None and skipping[1][0].shape == (100, 100, 3)
    raising = ImageDataset(table, ["a"], None, on_bad_image="raise", max_pixels=50_000)
    with pytest.raises(BadImageError, match="big.png") as info:
        raising[0]
    assert info.value.reason == reason


@pytest.mark.timeout(20)
def test_file_over_max_bytes_is_refused_before_reading(tmp_path):
    # 1 TiB on paper, a few bytes on disk: reading it would exhaust memory, not finish in time.
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(1 << 40)
    reason = "file is 1048576 MiB, above data.max_file_mb = 100 MiB"
    assert check_image(huge) == reason
    for backend in BACKENDS:
        with pytest.raises(BadImageError, match="huge.png") as info:
            decode_image(huge, backend=backend)
        assert info.value.reason == reason

    small = tmp_path / "small.png"
    Image.fromarray(_photo(120, 90)).save(small)
    size = small.stat().st_size
    reason = f"file is {size} bytes, above data.max_file_mb = 1000 bytes"
    assert size > 1000 and check_image(small, max_bytes=1000) == reason
    with pytest.raises(BadImageError, match="small.png") as info:
        decode_image(small, max_bytes=1000)
    assert info.value.reason == reason
    table = pd.DataFrame({"path": [str(small)], "label": ["a"]})
    assert scan_images(table, max_bytes=1000, progress=False).bad["reason"].tolist() == [reason]
    assert check_image(small, max_bytes=size) is None
    _check_rgb(decode_image(small, max_bytes=size), 90, 120)


def test_limits_must_be_positive(tmp_path):
    path, _ = gray_jpeg(tmp_path)
    for kwargs in ({"max_pixels": 0}, {"max_bytes": -1}, {"max_pixels": True}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            decode_image(path, **kwargs)
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            check_image(path, **kwargs)


def test_limit_config_keys(tmp_path):
    defaults = load_config(None).data
    assert defaults.max_pixels == 64_000_000 and defaults.max_file_mb == 100
    assert (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES) == (64_000_000, 100 * MIB)
    assert DataConfig().max_file_mb * MIB == DEFAULT_MAX_BYTES
    cfg = load_config(None, ["data.max_pixels=1000000", "data.max_file_mb=5"])
    assert (cfg.data.max_pixels, cfg.data.max_file_mb) == (1_000_000, 5)
    for override, expected in [
        ("data.max_pixels=0", r"data.max_pixels: got 0, allowed range \[1, inf\]"),
        ("data.max_file_mb=lots", "data.max_file_mb: got 'lots', expected an integer"),
        ("data.max_file_mb=1.5", "data.max_file_mb"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [override])
