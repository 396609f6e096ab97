"""Tests of the embedded dataset generator (small datasets rendered into tmp_path)."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from feedtune.synthetic import embedded as shapes
from feedtune.synthetic.embedded import (
    EMBEDDED,
    class_counts,
    dataset_root,
    ensure_dataset,
    generate_dataset,
)

N_SMALL = 150  # enough for every class to have a few groups; renders in about a second
N_TINY = 40  # for the tests that render several datasets: each class keeps one group


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small `shapes` dataset, rendered once for the read-only tests."""
    root = tmp_path_factory.mktemp("shapes")
    return generate_dataset("shapes", root, seed=0, progress=False, n_images=N_SMALL)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"progress": False, "n_images": N_TINY}
    first = _digests(generate_dataset("shapes", tmp_path / "a", seed=0, **kwargs).parent)
    again = _digests(generate_dataset("shapes", tmp_path / "b", seed=0, **kwargs).parent)
    other = _digests(generate_dataset("shapes", tmp_path / "c", seed=1, **kwargs).parent)
    assert first == again
    assert len(first) == sum(class_counts("shapes", N_TINY).values()) + 2  # + manifest, marker
    shared = [k for k in first if k.startswith("images/") and k in other]
    assert len(shared) >= N_TINY // 2
    assert all(first[k] != other[k] for k in shared)


def test_smaller_dataset_keeps_the_first_groups(small: Path, tmp_path: Path) -> None:
    tiny = generate_dataset("shapes", tmp_path, seed=0, progress=False, n_images=N_TINY)
    big, few = _digests(small.parent), _digests(tiny.parent)
    same = [k for k, v in few.items() if k.startswith("images/") and big.get(k) == v]
    assert len(same) >= N_TINY // 2


def test_manifest_columns_and_paths(small: Path) -> None:
    rows = _rows(small)
    assert list(rows[0]) == ["path", "label", "group"]
    assert len(rows) == N_SMALL
    for row in rows:
        assert row["path"].startswith(f"images/{row['label']}/g")
        assert (small.parent / row["path"]).is_file()


def test_full_size_class_counts_are_long_tailed() -> None:
    counts = class_counts("shapes")
    assert len(counts) >= 8
    assert max(counts.values()) / min(counts.values()) >= 8
    assert 2700 <= sum(counts.values()) <= 3300
    shift = class_counts("shapes-shift")
    assert 5 <= len(shift) <= 8
    assert 500 <= sum(shift.values()) <= 700


def test_scaled_counts_keep_proportions_and_a_group_per_class() -> None:
    full, scaled = class_counts("shapes"), class_counts("shapes", 300)
    assert list(full) == list(scaled)
    assert sum(scaled.values()) == 300
    assert min(scaled.values()) >= shapes.MIN_GROUP
    order = sorted(full, key=full.get, reverse=True)
    assert [scaled[c] for c in order] == sorted(scaled.values(), reverse=True)


def test_groups_have_4_to_8_images_of_one_class(small: Path) -> None:
    by_group: dict[str, list[str]] = defaultdict(list)
    for row in _rows(small):
        by_group[row["group"]].append(row["label"])
    for group, labels in by_group.items():
        assert 4 <= len(labels) <= 8, group
        assert len(set(labels)) == 1, group
        assert group.startswith(f"shapes-{labels[0]}-")
    assert len(by_group) >= len(class_counts("shapes"))


def test_images_are_jpegs_of_varied_size(small: Path) -> None:
    sizes = set()
    for row in _rows(small):
        with Image.open(small.parent / row["path"]) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            w, h = im.size
        assert 128 <= w <= 400 and 128 <= h <= 400
        sizes.add((w, h))
    assert len(sizes) > N_SMALL // 2
    assert any(w != h for w, h in sizes)


def test_marker_records_the_parameters(small: Path) -> None:
    marker = json.loads((small.parent / "_complete.json").read_text())
    assert marker["name"] == "shapes"
    assert marker["seed"] == 0
    assert marker["n_images"] == N_SMALL
    assert marker["count"] == N_SMALL
    assert marker["manifest_sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()


def test_ensure_dataset_is_idempotent_and_repairs(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    kwargs = {"seed": 3, "progress": False, "n_images": N_TINY}
    manifest = ensure_dataset("shapes", root, **kwargs)
    before, digests = _mtimes(root), _digests(root)

    assert ensure_dataset("shapes", root, **kwargs) == manifest
    assert _mtimes(root) == before  # nothing rewritten

    victim = root / _rows(manifest)[7]["path"]
    victim.unlink()
    ensure_dataset("shapes", root, **kwargs)
    assert _digests(root) == digests  # the lost image comes back, identical
    untouched = {k: v for k, v in _mtimes(root).items() if k != str(victim.relative_to(root))}
    assert all(before[k] == v for k, v in untouched.items())  # and only it was written

    (root / "_complete.json").unlink()  # as after an interrupted generation
    ensure_dataset("shapes", root, **kwargs)
    assert (root / "_complete.json").is_file()
    assert _digests(root) == digests


def test_ensure_dataset_rebuilds_for_other_parameters(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    ensure_dataset("shapes", root, seed=0, progress=False, n_images=N_TINY + 20)
    ensure_dataset("shapes", root, seed=0, progress=False, n_images=N_TINY)
    rows = _rows(root / "manifest.csv")
    assert len(rows) == sum(class_counts("shapes", N_TINY).values())
    on_disk = {str(p.relative_to(root)) for p in (root / "images").rglob("*.jpg")}
    assert on_disk == {r["path"] for r in rows}  # no stale images of the first dataset
    assert json.loads((root / "_complete.json").read_text())["n_images"] == N_TINY


def test_shapes_shift_has_new_grouped_classes(tmp_path: Path) -> None:
    manifest = generate_dataset("shapes-shift", tmp_path, progress=False, n_images=80)
    rows = _rows(manifest)
    labels = {r["label"] for r in rows}
    assert labels == set(class_counts("shapes-shift"))
    assert not labels & set(class_counts("shapes"))
    by_group: dict[str, set[str]] = defaultdict(set)
    sizes: dict[str, int] = defaultdict(int)
    for r in rows:
        by_group[r["group"]].add(r["label"])
        sizes[r["group"]] += 1
    assert all(len(v) == 1 for v in by_group.values())
    assert all(4 <= n <= 8 for n in sizes.values())
    assert all(g.startswith("shapes-shift-") for g in by_group)


def test_unknown_name_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shapes-shift"):
        generate_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="shapes"):
        class_counts("nope")
    assert EMBEDDED == ("shapes", "shapes-shift")


def test_dataset_root() -> None:
    assert dataset_root("shapes", Path("/p")) == Path("/p/data/shapes")


def _ensure_in_subprocess(root: Path, *, seed: int, n_images: int) -> subprocess.Popen:
    code = (
        "import sys; from feedtune.synthetic.embedded import ensure_dataset; "
        f"ensure_dataset('shapes', sys.argv[1], seed={seed}, progress=False, n_images={n_images})"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(root)], stderr=subprocess.PIPE)


def test_data_command_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    (root / "images" / "cats").mkdir(parents=True)
    (root / "images" / "cats" / "001.jpg").write_bytes(b"my cat")
    (root / "manifest.csv").write_text("path,label\nimages/cats/001.jpg,cats\n")
    before, mtimes = _digests(root), _mtimes(root)

    done = subprocess.run(
        [sys.executable, "-m", "feedtune", "data", "--root", str(root), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert str(root) in done.stderr and "did not write" in done.stderr
    assert _digests(root) == before and _mtimes(root) == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.lock", "mine"]


def test_a_user_file_in_an_embedded_dataset_stops_its_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    ensure_dataset("shapes", root, seed=0, progress=False, n_images=N_TINY)
    notes = root / "images" / "circle" / "my-notes.txt"
    notes.write_text("keep me")
    with pytest.raises(shapes.DatasetFolderError, match="my-notes.txt"):
        ensure_dataset("shapes", root, seed=1, progress=False, n_images=N_TINY)
    assert notes.read_text() == "keep me"
    assert json.loads((root / "_complete.json").read_text())["seed"] == 0


def test_a_killed_rebuild_leaves_the_old_dataset_whole(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    ensure_dataset("shapes", root, seed=0, progress=False, n_images=N_TINY)
    old = _digests(root)
    proc = _ensure_in_subprocess(root, seed=1, n_images=3000)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".shapes.building-*/images/*/*.jpg")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert _digests(root) == old  # the old dataset, whole, while and after the rebuild died

    ensure_dataset("shapes", root, seed=1, progress=False, n_images=N_TINY)
    assert json.loads((root / "_complete.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock", "shapes"]


def test_two_processes_asking_at_once_build_one_whole_dataset(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    procs = [_ensure_in_subprocess(root, seed=5, n_images=N_SMALL) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    reference = generate_dataset(
        "shapes", tmp_path / "ref", seed=5, progress=False, n_images=N_SMALL
    )
    assert _digests(root) == _digests(reference.parent)
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name or ".old-" in p.name]
