"""Hugging Face datasets on disk, parquet folders and a user's torch Dataset as data sources:
real files in tmp_path, the real ``datasets`` package, prepared as every command prepares
them. The same images must give the same split whatever holds them."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

from feedtune.config import ConfigError, load_config
from feedtune.sources.imageio import BadImageError
from feedtune.sources.prepare import prepare_data
from feedtune.sources.tables import DataSourceError
from tests.conftest import tiny_feed
from tests.sources.source_builders import (
    CLASSES,
    hf_dataset,
    make_images,
    pixel_hash,
    write_folder,
    write_hf,
    write_user_module,
)

datasets = pytest.importorskip("datasets")


def _prepare(path, *overrides: str):
    cfg = load_config(None, [f"data.path={path}", "augment.image_size=32", *overrides])
    return prepare_data(cfg, progress=False)


def _sides(data) -> dict[str, str]:
    """Pixel hash of every split item -> its side, each item decoded through its source."""
    out = {}
    for side, frame in (("train", data.split.train), ("val", data.split.val)):
        for ref in frame["path"]:
            out[pixel_hash(data.reader.decode(ref))] = side
    return out


@pytest.fixture
def images():
    return make_images(36)


@pytest.fixture
def folder_sides(tmp_path, images):
    return _sides(_prepare(write_folder(tmp_path / "folder", *images)))


def test_a_saved_hf_dataset_splits_its_images_as_the_folder_of_them_does(
    tmp_path, images, folder_sides
):
    data = _prepare(write_hf(tmp_path / "hf", *images))
    assert data.classes == CLASSES  # the ClassLabel names, in their order
    assert set(data.table["label"]) == set(CLASSES)
    assert data.table["path"].iloc[0].startswith(f"{tmp_path / 'hf'}#")
    sides = _sides(data)
    assert len(sides) == 36 and sides == folder_sides


def test_a_user_dataset_splits_its_images_as_the_folder_of_them_does(
    tmp_path, images, folder_sides, monkeypatch
):
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    spec = write_user_module(tmp_path / "mods", "userdata_split", *images)
    data = _prepare(spec, "split.grouped=false")
    assert data.classes == CLASSES and data.table["path"].iloc[0].startswith(f"{spec}#")
    assert _sides(data) == folder_sides
    # in-memory images: the decoder and the file-size limit cannot matter, so are inert
    assert {"data.decoder", "data.max_file_mb"} <= data.reader.inert
    # the Dataset's `groups` keep each group on one side
    grouped = _prepare(spec)
    groups = {
        side: set(frame["group"])
        for side, frame in grouped.split.__dict__.items()
        if side in ("train", "val")
    }
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]


def test_a_parquet_folder_reads_its_train_files(tmp_path, images, folder_sides, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    hf_dataset(*images).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    few = make_images(6, seed=5)
    hf_dataset(*few).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    data = _prepare(root)
    assert len(data.table) == 36 and data.classes == CLASSES
    assert _sides(data) == folder_sides


def test_a_dataset_dict_uses_its_train_split_or_names_the_splits(tmp_path, images):
    train = hf_dataset(*images)
    test = hf_dataset(*make_images(6, seed=3))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert len(_prepare(tmp_path / "dd").table) == 36
    datasets.DatasetDict({"dev": train, "test": test}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(DataSourceError, match=r"without a 'train' split \(splits: dev, test\)"):
        _prepare(tmp_path / "nt")


def test_a_missing_column_names_it_and_the_columns_present(tmp_path, images):
    root = write_hf(tmp_path / "hf", *images, groups=["p"] * 36)
    with pytest.raises(DataSourceError) as err:
        _prepare(root, "data.image_column=img")
    assert str(err.value) == (
        f"data.image_column: column 'img' not in {root}; columns present: image, label, person"
    )
    with pytest.raises(DataSourceError, match="data.group_column: column 'who'"):
        _prepare(root, "data.group_column=who")
    with pytest.raises(DataSourceError, match="data.image_column: column 'label' .* holds int"):
        _prepare(root, "data.image_column=label", "data.label_column=person")


def test_a_corrupt_image_item_is_reported_and_skipped(tmp_path, images):
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # a PNG header and nothing after it
    root = write_hf(tmp_path / "hf", *images, broken={4: broken})
    data = _prepare(root)
    ref = f"{root}#000004"
    assert data.bad["path"].tolist() == [ref] and "truncated PNG" in data.bad["reason"][0]
    assert ref in set(data.table["path"])
    assert ref not in set(data.split.train["path"]) | set(data.split.val["path"])
    assert len(data.split.train) + len(data.split.val) == 35
    with pytest.raises(BadImageError, match="#000004"):
        _prepare(root, "data.on_bad_image=raise")


def test_a_bad_user_item_is_skipped_and_a_dataset_without_classes_is_one_error(
    tmp_path, images, monkeypatch
):
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    spec = write_user_module(tmp_path / "mods", "userdata_bad", *images, broken=5)
    data = _prepare(spec)
    assert data.bad["path"].tolist() == [f"{spec}#000005"]
    assert "(H, W, 3) uint8" in data.bad["reason"][0]
    with pytest.raises(DataSourceError) as err:
        _prepare("userdata_bad:no_classes")
    assert "userdata_bad:no_classes() returned a Bare without a 'classes' attribute" in str(
        err.value
    )
    assert "\n" not in str(err.value)


def test_without_the_datasets_package_the_error_says_what_to_install(tmp_path, images, monkeypatch):
    root = write_hf(tmp_path / "hf", *images)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(
        DataSourceError, match=r'needs the datasets package: pip install "feedtune\[hf\]"'
    ):
        _prepare(root)


def test_workers_read_the_arrow_items_themselves(tmp_path, images):
    root = write_hf(tmp_path / "hf", *images)
    cfg, data, feed = tiny_feed(root, "loader.num_workers=2", "augment.policy=none")
    # What reaches a worker holds no opened Arrow table: each process maps the files itself.
    sent = pickle.loads(pickle.dumps(feed.train_set))
    assert sent.reader._tables is None
    ref = data.split.train["path"][0]
    assert pixel_hash(sent.reader.decode(ref)) == pixel_hash(data.reader.decode(ref))
    labels = np.concatenate([y.numpy() for _, y in feed.val])
    assert sorted(labels.tolist()) == sorted(feed.val_set.targets.tolist())
    assert sum(len(y) for _, y in feed.train) == len(data.split.train)


def test_the_column_keys_are_validated_by_name():
    with pytest.raises(ConfigError, match=r"^data.label_column: got an empty name"):
        load_config(None, ["data.label_column=' '"])
    with pytest.raises(ConfigError, match="each must name a different column"):
        load_config(None, ["data.group_column=image"])
    assert load_config(None, ["data.group_column=''"]).data.group_column is None
