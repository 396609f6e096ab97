"""The decoded-image cache: same pixels, smaller resized copies, memory limit, shared by real
DataLoader workers, bad images still skipped, skipped when shared memory is short; and the
main-process thread setting."""

from __future__ import annotations

import io
import re
import shutil
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory pickling
from PIL import Image

from feedtune.config import AugmentConfig, LoaderConfig, load_config, with_overrides
from feedtune.feed import cache_memo
from feedtune.feed.augment.per_sample import build_transform
from feedtune.feed.augment.squares import SquashedImage, ToWorkingUint8
from feedtune.feed.cache import attach_cache, build_cache
from feedtune.feed.cache_memo import cache_datasets
from feedtune.feed.cache_sizing import (
    CacheTooLargeError,
    estimate_cache,
    shm_free_bytes,
    shm_margin,
)
from feedtune.feed.dataset import ImageDataset
from feedtune.feed.feed import build_feed
from feedtune.feed.geometry import working_size
from feedtune.feed.loader import build_loader
from feedtune.sources import items as items_mod
from feedtune.sources.imageio import BadImageError, decode_image
from feedtune.sources.prepare import prepare_data
from feedtune.training.throughput import cache_metrics
from tests.conftest import write_image_folder

IMAGE_SIZE = 16  # working size 23: JPEGs with a shorter side >= 46 decode reduced


def _rgb(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 90.0)], axis=2)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def _mixed_folder(root: Path) -> pd.DataFrame:
    """JPEGs of odd sizes (one EXIF-rotated, one too small to reduce) and a PNG."""
    root.mkdir(parents=True)
    rows = []
    specs = [(203, 151, "jpg", 1), (120, 260, "jpg", 1), (201, 97, "jpg", 6)]
    specs += [(40, 30, "jpg", 1), (90, 70, "png", 1)]
    for i, (w, h, ext, orientation) in enumerate(specs):
        path = root / f"img{i}.{ext}"
        im = Image.fromarray(_rgb(w, h, i))
        if ext == "jpg":
            exif = Image.Exif()
            exif[0x0112] = orientation
            im.save(path, quality=90, exif=exif.tobytes())
        else:
            im.save(path)
        rows.append({"path": str(path), "label": "ab"[i % 2]})
    return pd.DataFrame(rows)


def _dataset(table: pd.DataFrame, *, min_decode_size=None, transform=None, decoder="pil"):
    return ImageDataset(
        table, ["a", "b"], transform, decoder=decoder, min_decode_size=min_decode_size
    )


def _cfg(mode: str, **kw) -> LoaderConfig:
    return LoaderConfig(cache=mode, **kw)


@pytest.mark.parametrize("min_decode_size", [None, working_size(IMAGE_SIZE)])
@pytest.mark.parametrize("decoder", ["pil", "opencv"])
def test_decoded_cache_returns_the_same_pixels_as_decoding(tmp_path, min_decode_size, decoder):
    ds = _dataset(_mixed_folder(tmp_path / "m"), min_decode_size=min_decode_size, decoder=decoder)
    cache = build_cache(ds, _cfg("decoded"), image_size=IMAGE_SIZE, progress=False)
    assert len(cache) == len(ds) and not cache.bad and cache.fill_seconds > 0
    for i, path in enumerate(ds.paths):
        expected = decode_image(path, backend=decoder, min_size=min_decode_size)
        got = cache.get(i)
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
        assert not got.flags.writeable  # shared pages: a transform cannot corrupt them
    # the header-only estimate is exact (so the limit check is honest and nothing is regrown)
    est = estimate_cache(ds.paths, mode="decoded", min_decode_size=min_decode_size, target=23)
    assert est.nbytes == cache.nbytes == sum(cache.get(i).nbytes for i in range(len(ds)))
    attach_cache(ds, cache)
    assert np.array_equal(ds.load_image(2), decode_image(ds.paths[2], min_size=min_decode_size))


def test_resized_cache_keeps_working_resolution_and_aspect(tmp_path):
    ds = _dataset(_mixed_folder(tmp_path / "m"), min_decode_size=working_size(IMAGE_SIZE))
    cache = build_cache(ds, _cfg("resized"), image_size=IMAGE_SIZE, progress=False)
    target = working_size(IMAGE_SIZE)
    assert target >= IMAGE_SIZE / 0.875
    for i, path in enumerate(ds.paths):
        full = decode_image(path)
        got = cache.get(i)
        h, w = full.shape[:2]
        if min(h, w) <= target:  # already small: stored as decoded, never upscaled
            assert np.array_equal(got, full)
            continue
        assert min(got.shape[:2]) == target
        assert abs(got.shape[0] / got.shape[1] - h / w) < 0.03
        # close to an area resize of the full image (the JPEG reduction is the only extra step)
        ref = np.asarray(Image.fromarray(full).resize(got.shape[1::-1], Image.Resampling.BOX))
        assert np.abs(ref.astype(int) - got.astype(int)).mean() < 12
    est = estimate_cache(ds.paths, mode="resized", min_decode_size=target, target=target)
    assert est.nbytes == cache.nbytes
    assert cache.nbytes < build_cache(ds, _cfg("decoded"), image_size=IMAGE_SIZE).nbytes


@pytest.mark.parametrize("mode", ["decoded", "resized"])
def test_a_cache_of_squares_holds_what_the_per_sample_squash_makes(tmp_path, mode):
    side = working_size(IMAGE_SIZE)
    ds = _dataset(_mixed_folder(tmp_path / "m"), min_decode_size=side)
    cache = build_cache(ds, _cfg(mode), image_size=IMAGE_SIZE, progress=False, square=side)
    assert cache.square == side and f"square={side}" in repr(cache)
    to_square = ToWorkingUint8(side)
    for i, path in enumerate(ds.paths):
        got = cache.get(i)
        assert isinstance(got, SquashedImage)
        expected, aspect = to_square(decode_image(path, min_size=side))
        assert got.pixels.dtype == torch.uint8 and torch.equal(got.pixels, expected)
        assert got.aspect == aspect  # the original shape, not the square's
        # through the dataset's own transform: passed as is, ready to collate
        pixels, kept = to_square(got)
        assert pixels is got.pixels and kept == aspect
    assert cache.nbytes == len(ds) * 3 * side * side
    est = estimate_cache(ds.paths, mode=mode, min_decode_size=side, target=side, square=side)
    assert est.nbytes == cache.nbytes
    # the squares travel to spawned workers by handle, as the images do
    copy = ForkingPickler.loads(ForkingPickler.dumps(cache))
    assert torch.equal(copy.get(1).pixels, cache.get(1).pixels) and copy.get(1).aspect < 1


def test_a_cache_of_squares_refuses_a_square_of_another_side(tmp_path):
    side = working_size(IMAGE_SIZE)
    ds = _dataset(_mixed_folder(tmp_path / "m"), min_decode_size=side)
    cache = build_cache(ds, _cfg("resized"), image_size=IMAGE_SIZE, square=side)
    with pytest.raises(ValueError, match=rf"expected \(3, {side + 1}, {side + 1}\)"):
        ToWorkingUint8(side + 1)(cache.get(0))


def test_estimate_over_the_limit_refuses_before_decoding(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "big", {"a": 3, "b": 3}, size=(700, 600))
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    ds = _dataset(pd.DataFrame({"path": paths, "label": ["a"] * 3 + ["b"] * 3}))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before checking the limit")

    monkeypatch.setattr(items_mod, "decode_image", no_decoding)
    with pytest.raises(CacheTooLargeError, match=r"loader\.cache_limit_mb=7") as err:
        build_cache(ds, _cfg("decoded", cache_limit_mb=7), image_size=IMAGE_SIZE)
    assert "~7 MiB" in str(err.value) and "loader.cache=resized" in str(err.value)
    # already-held bytes count too (train + val share one limit)
    with pytest.raises(CacheTooLargeError, match="already cached"):
        build_cache(
            ds,
            _cfg("resized", cache_limit_mb=7),
            image_size=IMAGE_SIZE,
            reserved_bytes=7 * 2**20,
        )
    assert build_cache(ds, _cfg("none"), image_size=IMAGE_SIZE) is None


def test_workers_read_the_cache_and_produce_the_same_batches(tiny_folder):
    table = pd.DataFrame({"path": sorted(str(p) for p in tiny_folder.rglob("*.jpg")), "label": "a"})
    transform = build_transform(AugmentConfig(image_size=IMAGE_SIZE), train=False)
    loader_cfg = LoaderConfig(batch_size=8, num_workers=2, cache="decoded")

    def batches(cached: bool) -> list[torch.Tensor]:
        ds = ImageDataset(table, ["a"], transform)
        if cached:
            cache = build_cache(ds, loader_cfg, image_size=IMAGE_SIZE)
            attach_cache(ds, cache)
            assert cache.buffer.is_shared()
        return [b[0] for b in build_loader(ds, loader_cfg, seed=0)]

    plain, cached = batches(False), batches(True)
    assert len(plain) == len(cached) == 6
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))


def test_spawned_workers_get_a_handle_not_the_pixels(tmp_path):
    ds = _dataset(_mixed_folder(tmp_path / "m"))
    cache = build_cache(ds, _cfg("decoded"), image_size=IMAGE_SIZE)
    buf = io.BytesIO()
    ForkingPickler(buf).dump(cache)  # what DataLoader does for spawn/forkserver workers
    assert len(buf.getvalue()) < cache.nbytes / 4
    back = ForkingPickler.loads(buf.getvalue())
    assert all(np.array_equal(back.get(i), cache.get(i)) for i in range(len(ds)))


def test_bad_image_is_marked_and_skipped(tmp_path):
    table = _mixed_folder(tmp_path / "m")
    truncated = tmp_path / "m" / "cut.jpg"
    good = Path(table["path"][0]).read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    (tmp_path / "m" / "text.jpg").write_text("not an image")
    extra = [{"path": str(truncated), "label": "a"}, {"path": str(tmp_path / "m/text.jpg")}]
    table = pd.concat([table, pd.DataFrame(extra).fillna("b")], ignore_index=True)
    transform = build_transform(AugmentConfig(image_size=IMAGE_SIZE), train=False)
    ds = _dataset(table, transform=transform)
    cache = build_cache(ds, _cfg("resized"), image_size=IMAGE_SIZE)
    assert sorted(cache.bad) == [5, 6]
    with pytest.raises(BadImageError, match="truncated JPEG") as err:
        cache.get(5)
    assert err.value.path == str(truncated)
    attach_cache(ds, cache)
    assert ds[5] is None and ds[6] is None and ds[0] is not None
    batches = list(build_loader(ds, LoaderConfig(batch_size=4, num_workers=2), seed=0))
    assert sum(len(b[1]) for b in batches) == len(table) - 2


def test_cache_of_another_table_is_refused(tmp_path):
    table = _mixed_folder(tmp_path / "m")
    cache = build_cache(_dataset(table), _cfg("decoded"), image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="different list of images"):
        attach_cache(_dataset(table.iloc[::-1]), cache)


def test_the_feed_caches_train_and_val_and_reports_cost(tiny_folder):
    cfg = load_config(
        None,
        [f"data.path={tiny_folder}", "loader.cache=resized", f"augment.image_size={IMAGE_SIZE}"],
    )
    data = prepare_data(cfg, progress=False)
    feed = build_feed(cfg, data, torch.device("cpu"))
    assert feed.train_set.min_decode_size == working_size(IMAGE_SIZE)
    caches = [feed.train_set.cache, feed.val_set.cache]
    assert all(c is not None and c.mode == "resized" for c in caches)
    metrics = cache_metrics(feed)
    assert metrics["cache_mb"] == pytest.approx(sum(c.nbytes for c in caches) / 2**20)
    assert metrics["cache_fill_s"] > 0
    x, y = next(iter(feed.train))
    assert x.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and len(x) == len(y) > 1
    plain = build_feed(with_overrides(cfg, {"loader.cache": "none"}), data, torch.device("cpu"))
    assert plain.train_set.cache is None and cache_metrics(plain) == {}


def test_main_process_transforms_run_on_one_torch_thread(tiny_folder):
    seen = []

    def transform(image):
        seen.append(torch.get_num_threads())
        return torch.zeros(1)

    table = pd.DataFrame({"path": sorted(map(str, tiny_folder.rglob("*.jpg")))[:6], "label": "a"})
    ds = ImageDataset(table, ["a"], transform)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = next(iter(build_loader(ds, LoaderConfig(batch_size=3, num_workers=0))))
        assert torch.get_num_threads() == 2  # restored for the model
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1] and len(batch[1]) == 3


def _big_table(root: Path) -> pd.DataFrame:
    """Six 700x600 JPEGs: ~7 MiB decoded, far more than the free space a test can drift by."""
    folder = write_image_folder(root, {"a": 3, "b": 3}, size=(700, 600))
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    return pd.DataFrame({"path": paths, "label": ["a"] * 3 + ["b"] * 3})


def _batches(ds: ImageDataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(b) for b in build_loader(ds, LoaderConfig(batch_size=4, num_workers=0))]


# decoded at full size: ~7 MiB; resized to working_size(224) = 320: ~2 MiB
@pytest.mark.parametrize(("mode", "image_size"), [("decoded", IMAGE_SIZE), ("resized", 224)])
def test_cache_that_does_not_fit_in_shared_memory_is_skipped_with_a_warning(
    tmp_path, caplog, mode, image_size
):
    table = _big_table(tmp_path / "big")
    transform = build_transform(AugmentConfig(image_size=image_size), train=False)
    ds = _dataset(table, transform=transform)
    target = working_size(image_size)
    min_decode = target if mode == "resized" else None
    need = estimate_cache(ds.paths, mode=mode, min_decode_size=min_decode, target=target).nbytes
    assert need > 2 * 2**20
    # A real folder's real free space, all of it kept for the loader: no cache fits there.
    free = shutil.disk_usage(tmp_path).free
    with caplog.at_level("WARNING", logger="feedtune.feed.cache_sizing"):
        caches = cache_datasets(
            [ds], _cfg(mode), image_size=image_size, shm_path=tmp_path, shm_margin_bytes=free
        )
    assert caches == [] and ds.cache is None
    text = caplog.text
    assert f"loader.cache={mode} needs ~{need / 2**20:.1f} MiB" in text and str(tmp_path) in text
    said_free = float(re.search(r"has ([\d.]+) MiB free", text).group(1))
    assert said_free == pytest.approx(free / 2**20, abs=64)
    assert "--shm-size" in text and "augment.image_size" in text
    assert ("or use loader.cache=resized (~" in text) == (mode == "decoded")
    # no cache: the dataset decodes per sample and yields the same batches as with none
    plain = _dataset(table, transform=transform)
    got, expected = _batches(ds), _batches(plain)
    assert len(got) == len(expected) == 2
    for (x, y), (x0, y0) in zip(got, expected, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_cache_is_built_when_shared_memory_has_room(tmp_path, caplog):
    table = _mixed_folder(tmp_path / "m")
    expected = build_cache(_dataset(table), _cfg("decoded"), image_size=IMAGE_SIZE)  # /dev/shm
    assert expected is not None
    missing = tmp_path / "no-shm-here"  # e.g. macOS: nothing to check, cache as before
    assert shm_free_bytes(missing) is None
    free = shm_free_bytes(tmp_path)
    assert free is not None and free == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.01)
    for shm_path in (tmp_path, missing, None):
        ds = _dataset(table)
        with caplog.at_level("WARNING", logger="feedtune.feed.cache_sizing"):
            caches = cache_datasets([ds], _cfg("decoded"), image_size=IMAGE_SIZE, shm_path=shm_path)
        assert caches == [ds.cache] and ds.cache.nbytes == expected.nbytes
        assert all(np.array_equal(ds.cache.get(i), expected.get(i)) for i in range(len(ds)))
    assert "shared memory" not in caplog.text
    assert shm_margin(64 * 2**20) == 16 * 2**20 and shm_margin(10 * 2**30) == 2**30


def test_cache_limit_is_checked_before_shared_memory(tmp_path):
    ds = _dataset(_big_table(tmp_path / "big"))
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CacheTooLargeError, match=r"loader\.cache_limit_mb=1"):
        build_cache(
            ds,
            _cfg("decoded", cache_limit_mb=1),
            image_size=IMAGE_SIZE,
            shm_path=tmp_path,
            shm_margin_bytes=free,
        )


def test_a_memo_reuses_a_matching_cache_and_keeps_only_the_latest(tmp_path, monkeypatch):
    side = working_size(IMAGE_SIZE)
    table = _mixed_folder(tmp_path / "m")
    ds = _dataset(table, min_decode_size=side)
    memo = cache_memo.CacheMemo()
    (first,) = cache_datasets([ds], _cfg("resized"), image_size=IMAGE_SIZE, memo=memo)
    assert memo.reused == []

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    # The next trial with the same images and cache settings decodes nothing...
    with monkeypatch.context() as patch:
        patch.setattr(items_mod, "decode_image", no_decoding)
        again = _dataset(table, min_decode_size=side)
        (second,) = cache_datasets([again], _cfg("resized"), image_size=IMAGE_SIZE, memo=memo)
    assert second is first and memo.reused == [first] and again.cache is first
    # ...another layout fills its own, and the memo lets the old one go.
    (squares,) = cache_datasets(
        [ds], _cfg("resized"), image_size=IMAGE_SIZE, memo=memo, squares=[side]
    )
    assert squares is not first and squares.square == side and memo.reused == []
    (third,) = cache_datasets([ds], _cfg("resized"), image_size=IMAGE_SIZE, memo=memo)
    assert third is not first


def test_a_feed_that_reuses_a_cache_reports_no_fill_time(tiny_folder):
    cfg = load_config(
        None, [f"data.path={tiny_folder}", "augment.image_size=32", "loader.cache=resized"]
    )
    data = prepare_data(cfg, progress=False)
    memo = cache_memo.CacheMemo()
    first = build_feed(cfg, data, torch.device("cpu"), caches=memo)
    second = build_feed(
        with_overrides(cfg, {"train.lr": 0.01}), data, torch.device("cpu"), caches=memo
    )
    assert second.train_set.cache is first.train_set.cache
    assert second.val_set.cache is first.val_set.cache
    assert cache_metrics(first)["cache_fill_s"] > 0 and cache_metrics(second)["cache_fill_s"] == 0
    assert cache_metrics(second)["cache_mb"] == cache_metrics(first)["cache_mb"]
