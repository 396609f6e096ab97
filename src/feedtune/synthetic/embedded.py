"""Deterministic generator of the embedded image-classification datasets.

Two datasets, written as real JPEG files plus a ``manifest.csv`` (``path,label,group``, paths
relative to the dataset folder, e.g. ``images/triangle/g0012_3.jpg``):

- ``shapes`` (~3000 images): 10 shape classes with long-tailed counts (largest / smallest = 10).
- ``shapes-shift`` (~600 images): 6 *new* classes made of the same primitives in new
  arrangements (``two_circles``, ``circle_in_square``, ...), for the transfer-learning demo.

Every image belongs to a *group*: one object with a fixed identity (colour, fill pattern,
aspect ratio, outline, shape proportions, size, favourite position, rotation, mirroring,
background palette) rendered 4-8 times with jitter in pose, lighting and background. A split
that ignores groups therefore leaks near-duplicates. Colour is a per-group identity, never a
class cue. Width and height vary per image between 128 and 400 px (aspect ratio up to 1.6),
backgrounds are cluttered (gradients, clouds, noise, thin strokes, partial arcs, small blobs),
objects are sometimes small, occluded, blurred, low-contrast or cut by the frame, and the JPEG
quality varies between 70 and 95.

Generation is byte-identical for a given seed: every random draw comes from
``numpy.random.default_rng([seed, dataset, class, group, ...])``, so an image depends only on
its own coordinates (a smaller ``n_images`` keeps the first groups of each class stable), and
images are encoded with PIL at a fixed quality with ``optimize=False``.

``ensure_dataset`` is idempotent: a ``_complete.json`` marker records the parameters and the
manifest digest, so a different generation is rebuilt and a deleted image is re-rendered on its
own. A dataset is built beside its folder and renamed into place under a lock, and a folder
holding anything feedtune did not write is refused, never cleared.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from feedtune.progress import progress_bar
from feedtune.synthetic.shapes_render import PlannedImage, render

__all__ = [
    "EMBEDDED",
    "DatasetFolderError",
    "class_counts",
    "dataset_root",
    "ensure_dataset",
    "generate_dataset",
]

EMBEDDED: tuple[str, ...] = ("shapes", "shapes-shift")

# Bumped whenever the rendering changes, so that ensure_dataset rebuilds stale datasets.
GENERATOR_VERSION = 2  # bump when rendering changes: existing datasets are rebuilt
MANIFEST_NAME = "manifest.csv"
MARKER_NAME = "_complete.json"
IMAGE_DIR = "images"

MIN_GROUP, MAX_GROUP = 4, 8  # renders per group (object)


@dataclass(frozen=True)
class _Spec:
    """What a dataset is made of: its classes (in order), total size and long-tail ratio."""

    classes: tuple[str, ...]
    n_images: int
    imbalance: float  # largest class / smallest class


_SPECS: dict[str, _Spec] = {
    "shapes": _Spec(
        classes=(
            "circle",
            "square",
            "triangle",
            "star",
            "cross",
            "hexagon",
            "ring",
            "arrow",
            "crescent",
            "heart",
        ),
        n_images=3000,
        imbalance=10.0,
    ),
    "shapes-shift": _Spec(
        classes=(
            "two_circles",
            "circle_in_square",
            "triangle_pair",
            "star_in_ring",
            "cross_in_circle",
            "house",
        ),
        n_images=600,
        imbalance=2.0,
    ),
}


def dataset_root(name: str, project_root: Path) -> Path:
    """Folder of the embedded dataset ``name`` inside a project: ``project_root/data/name``."""
    return Path(project_root) / "data" / name


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown embedded dataset {name!r}; allowed: {', '.join(EMBEDDED)}")
    return _SPECS[name]


def class_counts(name: str, n_images: int | None = None) -> dict[str, int]:
    """Planned number of images per class (in class order), without rendering anything.

    Counts decay geometrically from the first class to the last so that largest / smallest
    equals the dataset's imbalance ratio; they sum exactly to ``n_images`` (default: the full
    size) except that every class keeps at least one group (``MIN_GROUP`` images).
    """
    spec = _spec(name)
    total = spec.n_images if n_images is None else int(n_images)
    if total < 1:
        raise ValueError(f"n_images must be >= 1, got {total}")
    k = len(spec.classes)
    decay = spec.imbalance ** (-1.0 / (k - 1))
    weights = decay ** np.arange(k)
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    # Largest remainder (ties broken by class order) so the counts sum exactly to `total`.
    for i in sorted(range(k), key=lambda i: (-(raw[i] - counts[i]), i))[: total - counts.sum()]:
        counts[i] += 1
    counts = np.maximum(counts, MIN_GROUP)
    return {c: int(n) for c, n in zip(spec.classes, counts, strict=True)}


def _group_sizes(count: int, rng: np.random.Generator) -> list[int]:
    """Split ``count`` images into groups of MIN_GROUP..MAX_GROUP renders (about 6 on average)."""
    lo, hi = math.ceil(count / MAX_GROUP), count // MIN_GROUP
    n_groups = min(max(round(count / 6), lo), hi)
    sizes = np.full(n_groups, MIN_GROUP)
    for _ in range(count - MIN_GROUP * n_groups):
        free = np.flatnonzero(sizes < MAX_GROUP)
        sizes[free[rng.integers(len(free))]] += 1
    return [int(s) for s in sizes]


def _plan(name: str, seed: int, n_images: int | None) -> list[PlannedImage]:
    _spec(name)  # validates the name
    ds = EMBEDDED.index(name)
    items = []
    for ci, (label, count) in enumerate(class_counts(name, n_images).items()):
        sizes = _group_sizes(count, np.random.default_rng([seed, ds, ci, 0xC0FFEE]))
        for gi, size in enumerate(sizes):
            group = f"{name}-{label}-{gi:04d}"
            for ri in range(size):
                path = f"{IMAGE_DIR}/{label}/g{gi:04d}_{ri}.jpg"
                items.append(PlannedImage(path, label, group, ds, ci, gi, ri))
    return items


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _manifest_bytes(items: Iterable[PlannedImage]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "group"])
    for it in items:
        writer.writerow([it.path, it.label, it.group])
    return buf.getvalue().encode()


def _marker(
    name: str, seed: int, n_images: int | None, items: list[PlannedImage], digest: str
) -> dict:
    return {
        "name": name,
        "seed": seed,
        "n_images": n_images,
        "count": len(items),
        "manifest_sha256": digest,
        "generator_version": GENERATOR_VERSION,
    }


def _write_images(
    seed: int, root: Path, items: list[PlannedImage], progress: bool, desc: str
) -> None:
    for it in progress_bar(items, desc=desc, unit="img", enabled=progress):
        path = root / it.path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic, so that a reader never scans a half-written JPEG as a bad image.
        _atomic_write(path, render(seed, it))


class DatasetFolderError(ValueError):
    """The target folder holds files feedtune did not write; nothing in it was touched."""


def _lock(root: Path) -> FileLock:
    # Beside the folder, not in it: the folder itself is replaced by a rename.
    return FileLock(str(root.parent / f".{root.name}.lock"))


def _listed_paths(manifest: Path) -> set[str] | None:
    try:
        with manifest.open(newline="") as f:
            return {row["path"] for row in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return None


def _foreign_file(root: Path, expected_manifest: bytes) -> Path | None:
    """The first file in ``root`` that feedtune did not write, or None if all are feedtune's.

    A folder is feedtune's when it carries a generator marker or exactly the manifest this
    generation would write, and every file in it is that marker, the manifest, an image the
    manifest lists or a leftover of an atomic write. Symbolic links are never feedtune's.
    """
    manifest = root / MANIFEST_NAME
    files = sorted(
        Path(folder, name)
        for folder, dirs, names in os.walk(root)  # does not follow links
        for name in names + [d for d in dirs if Path(folder, d).is_symlink()]
    )
    if not files:
        return None
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
        marked = isinstance(marker, dict) and "generator_version" in marker
    except (OSError, ValueError):
        marked = False
    try:
        same_manifest = manifest.read_bytes() == expected_manifest
    except OSError:
        same_manifest = False
    listed = _listed_paths(manifest) if marked or same_manifest else None
    if listed is None:
        return next((p for p in files if p.name == MANIFEST_NAME), files[0])
    ours = listed | {MANIFEST_NAME, MARKER_NAME}
    for path in files:
        rel = path.relative_to(root).as_posix()
        leftover = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_symlink() or not (rel in ours or leftover):
            return path
    return None


def _replace_folder(built: Path, root: Path) -> None:
    """Move the finished ``built`` folder to ``root``; an old ``root`` goes only afterwards."""
    if not root.exists():
        os.replace(built, root)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, old / root.name)
    os.replace(built, root)
    shutil.rmtree(old)


def _generate_locked(
    name: str,
    root: Path,
    seed: int,
    progress: bool,
    n_images: int | None,
    items: list[PlannedImage],
) -> Path:
    manifest = _manifest_bytes(items)
    if root.exists() and not root.is_dir():
        raise DatasetFolderError(f"{root} is a file, not a folder; choose another --root")
    foreign = _foreign_file(root, manifest) if root.is_dir() else None
    if foreign is not None:
        raise DatasetFolderError(
            f"{root} holds files feedtune did not write (e.g. {foreign}); nothing was changed. "
            "Choose an empty or new folder for the embedded dataset."
        )
    # Builds of a process killed mid-way; only the holder of the lock builds, so none is live.
    for stale in root.parent.glob(f".{root.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    built = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _write_images(seed, built, items, progress, name)
        (built / MANIFEST_NAME).write_bytes(manifest)
        digest = hashlib.sha256(manifest).hexdigest()
        info = _marker(name, seed, n_images, items, digest)
        (built / MARKER_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _replace_folder(built, root)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return root / MANIFEST_NAME


def generate_dataset(
    name: str,
    root: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    n_images: int | None = None,
) -> Path:
    """Write the embedded dataset ``name`` into ``root`` and return the manifest path.

    The dataset is built in a hidden sibling folder and renamed into place, under a lock file
    beside ``root``: a reader sees the old dataset or the new one, never half of one, and
    several processes asking at once build it once.

    Args:
        name: one of ``EMBEDDED`` (``"shapes"`` or ``"shapes-shift"``).
        root: the dataset's own folder, e.g. ``data/shapes``; created if missing. It must be
            missing, empty or an earlier feedtune dataset, which is replaced.
        seed: generator seed; the same seed gives byte-identical files.
        progress: show progress (a bar on a terminal, a line in a log).
        n_images: scale the dataset down (or up) to about this many images, keeping the class
            proportions; ``None`` = the full size (3000 for shapes, 600 for shapes-shift).

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names).
        DatasetFolderError: ``root`` holds files feedtune did not write (it names one).
    """
    items = _plan(name, seed, n_images)
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        return _generate_locked(name, root, seed, progress, n_images, items)


def _intact(root: Path, marker: dict, expected_manifest: bytes) -> bool:
    try:
        found = json.loads((root / MARKER_NAME).read_text())
        return found == marker and (root / MANIFEST_NAME).read_bytes() == expected_manifest
    except (OSError, ValueError):
        return False


def ensure_dataset(
    name: str,
    root: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    n_images: int | None = None,
) -> Path:
    """Make sure ``root`` holds the complete dataset; return the manifest path.

    Idempotent: a complete dataset with the same parameters is left untouched (no file is
    rewritten, no lock taken). Missing images of an otherwise complete dataset are re-rendered
    alone (byte-identical to the originals); a missing or different marker (other seed, size
    or generator version) or a changed manifest means a full rebuild, as ``generate_dataset``.
    Arguments and errors as for ``generate_dataset``.
    """
    items = _plan(name, seed, n_images)
    root = Path(root).absolute()
    expected = _manifest_bytes(items)
    marker = _marker(name, seed, n_images, items, hashlib.sha256(expected).hexdigest())
    if _intact(root, marker, expected) and all(_nonempty(root / it.path) for it in items):
        return root / MANIFEST_NAME
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):  # checked again: another process may have built it while we waited
        if not _intact(root, marker, expected):
            return _generate_locked(name, root, seed, progress, n_images, items)
        missing = [it for it in items if not _nonempty(root / it.path)]
        if missing:
            _write_images(seed, root, missing, progress, f"{name} (repair)")
    return root / MANIFEST_NAME


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False
