"""``inspect_data`` on small real ImageFolders: counts, duplicates and leaks, bad files, advice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feedtune.config import SplitConfig
from feedtune.feed.geometry import working_size
from feedtune.sources.inspection import COLUMNS, EXCLUDED, Inspection, format_report, inspect_data
from feedtune.sources.prepare import scan_images
from feedtune.sources.split import make_split
from feedtune.sources.tables import load_table
from tests.conftest import write_image_folder

N_COPIES = 5


def write_leaky_folder(root: Path) -> Path:
    """Class ``a``: 45 JPEGs, 5 byte-exact copies of ``a_000.jpg`` and one truncated JPEG;
    class ``b``: 4 JPEGs and one RGBA PNG. 50:5 usable images, a 10:1 imbalance; with six
    identical files in ``a``, the split at seed 42 puts some in train and some in val."""
    write_image_folder(root, {"a": 45, "b": 4})
    for i in range(N_COPIES):
        shutil.copy(root / "a" / "a_000.jpg", root / "a" / f"copy_{i}.jpg")
    rgba = np.full((80, 96, 4), 120, dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "b" / "b_alpha.png")
    (root / "a" / "broken.jpg").write_bytes((root / "a" / "a_001.jpg").read_bytes()[:400])
    return root


def _inspect(root: Path, *, image_size: int = 16, val_fraction: float = 0.2) -> Inspection:
    table = load_table(root)
    scan = scan_images(table, progress=False)
    split = make_split(scan.good, SplitConfig(val_fraction=val_fraction), seed=42)
    return inspect_data(
        table,
        split,
        image_size=image_size,
        working_size=working_size(image_size),
        progress=False,
    )


@pytest.fixture
def leaky(tmp_path: Path) -> Inspection:
    return _inspect(write_leaky_folder(tmp_path / "imgs"))


def test_summary_counts_classes_formats_and_bad_files(leaky):
    s = leaky.summary
    assert s["n_files"] == 56 and s["n_images"] == 55 and s["n_classes"] == 2
    assert s["class_counts"]["all"] == {"a": 51, "b": 5}
    assert s["class_counts"]["used"] == {"a": 50, "b": 5}
    assert s["n_train"] + s["n_val"] == 55
    assert s["class_counts"]["val"]["b"] == 1
    assert s["imbalance_ratio"] == 10.0
    assert s["formats"] == {"JPEG": 54, "PNG": 1}
    assert s["modes"] == {"RGB": 54, "RGBA": 1}
    assert s["sizes"]["shorter_side"]["median"] == 80 and s["sizes"]["aspect_ratio"]["max"] == 1.2
    assert s["sizes"]["working_size"] == 23 and s["groups"] is None
    assert s["bad"]["n_bad"] == 1
    assert s["bad"]["examples"][0]["path"] == "a/broken.jpg"
    assert "truncated JPEG" in s["bad"]["examples"][0]["reason"]
    json.dumps(s, allow_nan=False)  # strict JSON: what summary.json holds


def test_exact_duplicates_and_the_leak_across_the_split(leaky):
    dup = leaky.summary["duplicates"]
    assert dup["n_sets"] == 1 and dup["n_files"] == N_COPIES + 1
    assert dup["n_leaked_sets"] == 1 and dup["n_conflicting_labels"] == 0
    pair = dup["leaks"][0]
    side = dict(zip(leaky.files["path"], leaky.files["side"], strict=True))
    assert side[str(Path(leaky.root) / pair["train"])] == "train"
    assert side[str(Path(leaky.root) / pair["val"])] == "val"
    copies = leaky.files[leaky.files["path"].str.contains("copy_|a_000")]
    assert copies["sha256"].nunique() == 1


def test_files_table_has_one_row_per_file(leaky):
    files = leaky.files
    assert list(files.columns) == COLUMNS and len(files) == 56
    broken = files[files["path"].str.endswith("broken.jpg")].iloc[0]
    assert broken["side"] == EXCLUDED and broken["bad"] and broken["format"] == ""
    png = files[files["path"].str.endswith(".png")].iloc[0]
    assert (png["width"], png["height"], png["format"], png["mode"]) == (96, 80, "PNG", "RGBA")
    assert len(leaky.good) == 55 and set(leaky.good["side"]) == {"train", "val"}
    examples = leaky.examples(3)
    assert list(examples) == ["a", "b"] and all(len(p) == 3 for p in examples.values())


def test_advice_names_sampler_cache_leak_thin_val_and_bad_files(leaky):
    text = "\n".join(leaky.advice)
    assert "class imbalance 10.0:1" in text and "--set sampler.kind=weighted" in text
    assert "--set loader.cache=resized" in text and "1 non-JPEG image" in text
    pair = leaky.summary["duplicates"]["leaks"][0]
    assert f"{pair['train']} (train) == {pair['val']} (val)" in text
    assert "fewer than 10 val images" in text and "'b' 1" in text
    assert "1 bad file(s) will be skipped" in text and "a/broken.jpg" in text
    assert leaky.summary["advice"] == leaky.advice


def test_no_cache_advice_when_images_are_near_the_working_size(tmp_path):
    found = _inspect(write_leaky_folder(tmp_path / "imgs"), image_size=64)
    assert found.summary["sizes"]["working_size"] == 91
    assert not any("loader.cache" in line for line in found.advice)


def test_clean_balanced_data_gets_no_advice(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 20, "b": 20})
    found = _inspect(root, image_size=64, val_fraction=0.5)
    assert found.advice == []
    assert format_report(found).endswith("advice: none, the data looks ready")


def test_groups_are_summarised(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 24, "b": 12, "c": 8}, groups_of=4)
    groups = _inspect(root).summary["groups"]
    assert groups["n_groups"] == 11
    assert groups["groups_per_class"] == {"a": 6, "b": 3, "c": 2}
    assert groups["images_per_group"] == {"min": 4.0, "median": 4.0, "max": 4.0}
    assert groups["n_groups_train"] + groups["n_groups_val"] == 11


def test_report_lists_counts_sizes_formats_duplicates_then_advice(leaky):
    report = format_report(leaky)
    lines = report.splitlines()
    assert lines[0].startswith("data: 55 images in 2 classes")
    assert "classes: a 50, b 5 (imbalance 10.0:1)" in report
    assert "shorter side median 80 px" in report and "formats: JPEG 54, PNG 1" in report
    assert "1 set(s) of identical files (6 files), 1 across the split" in report
    assert lines.index("advice:") == len(lines) - len(leaky.advice) - 1
