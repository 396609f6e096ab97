"""Load a labelled image collection into one table: ``path``, ``label`` [, ``group``].

A source is one of:

- a CSV manifest ``path,label[,group]`` (paths relative to the CSV's folder, or absolute);
- a directory holding ``manifest.csv`` (that manifest is used, even if class folders exist);
- an ImageFolder directory: one sub-folder per class, images at any depth inside it.

The table has absolute ``path`` strings, ``label`` strings, a ``group`` column only when the
manifest has one, and is sorted by label then path, so the same files always give the same
table (and, downstream, the same split for a seed). Every problem raises ``DataSourceError``
naming the offending file, folder or column.

Hostile trees must not hang or multiply rows: symlinked folders are followed (datasets are
often assembled from them) but each real folder at most once per class, so a link to the folder
itself or to an ancestor cannot loop; image-named entries that are not regular files (FIFOs,
sockets, devices) are skipped with a warning, as reading a FIFO blocks forever. One file is one
row: rows are de-duplicated on their real path (``os.path.realpath``), so a file reached through
two links cannot land on both sides of a split; if its rows disagree on the label (or group),
that is an error naming both.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.csv"
# Folders that are never classes: macOS zip metadata (its files are "._x.jpg" copies).
_IGNORED_DIRS = {"__MACOSX"}
# How many offending paths an error message lists before it just counts.
_SHOW = 5

log = logging.getLogger(__name__)


class DataSourceError(ValueError):
    """A data source that cannot be loaded; the message names what is wrong and where."""


def load_table(source: str | Path) -> pd.DataFrame:
    """Read ``source`` (CSV manifest, directory with ``manifest.csv``, or ImageFolder tree).

    Returns a DataFrame with columns ``path`` (absolute), ``label`` and, for manifests with a
    group column, ``group``; all strings, sorted by label then path, index 0..n-1.
    """
    root = Path(os.path.abspath(Path(source).expanduser()))
    if not root.exists():
        raise DataSourceError(
            f"data path not found: {root} — set data.path to an ImageFolder directory "
            "or a CSV manifest"
        )
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataSourceError(
                f"data path {root} is a file but not a CSV manifest (.csv); "
                "give a manifest path,label[,group] or an ImageFolder directory"
            )
        return _load_manifest(root)
    if (root / MANIFEST_NAME).is_file():
        return _load_manifest(root / MANIFEST_NAME)
    return _load_image_folder(root)


def class_names(table: pd.DataFrame) -> list[str]:
    """Sorted label names of a table from ``load_table`` (index = class id)."""
    return sorted(table["label"].unique().tolist())


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _shown(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    """Identity of a folder whatever path (link) reaches it."""
    return st.st_dev, st.st_ino


def _load_image_folder(root: Path) -> pd.DataFrame:
    root_key = _dir_key(os.stat(root))
    classes = []
    for e in os.scandir(root):
        if not e.is_dir() or _is_hidden(e.name) or e.name in _IGNORED_DIRS:
            continue
        if _dir_key(e.stat()) == root_key:
            # A link back to the root (loop -> .) would relabel every image as its class.
            log.warning("ignored %s: a link back to the data folder, not a class", e.path)
            continue
        classes.append(e.name)
    classes.sort()
    if not classes:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and _is_image(e.name))
        hint = f" (found {loose} image(s) directly in it: put them in one folder per class)"
        raise DataSourceError(
            f"no class folders in {root}: expected an ImageFolder tree (class_name/image.jpg) "
            f"or a {MANIFEST_NAME}" + (hint if loose else "")
        )
    rows: list[tuple[str, str, str]] = []
    empty: list[str] = []
    special: list[str] = []
    for label in classes:
        found, odd = _images_under(root / label, skip={root_key})
        special.extend(odd)
        if not found:
            empty.append(label)
        rows.extend((path, label, real) for path, real in found)
    if special:
        log.warning(
            "skipped %d file(s) with image names under %s that are not regular files "
            "(FIFO, socket or device): %s",
            len(special),
            root,
            _shown(sorted(special)),
        )
    if empty:
        names = ", ".join(f"'{c}'" for c in empty)
        verb = "has" if len(empty) == 1 else "have"
        raise DataSourceError(
            f"class folder{'s' if len(empty) > 1 else ''} {names} in {root} {verb} no images "
            f"(looked for {' '.join(IMAGE_EXTENSIONS)}, any case, in sub-folders too)"
        )
    table = pd.DataFrame(rows, columns=["path", "label", "real"])
    # Sorted first, so that of two paths to one file the smaller is kept, whatever the walk order.
    table = table.sort_values(["label", "path"], kind="mergesort").reset_index(drop=True)
    paths = table["path"].tolist()
    return _finish(
        _one_row_per_file(table, where=f"ImageFolder {root}", describe=lambda i: paths[i])
    )


def _images_under(
    folder: Path, *, skip: set[tuple[int, int]]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Images under ``folder`` at any depth as ``(path, real path)``, and the image-named
    entries that are not regular files (FIFOs, sockets, devices), which are left out.

    Symlinked folders are followed, but each real folder (by ``st_dev, st_ino``) only once,
    and never one in ``skip`` (the data root): a link to ``.`` or to an ancestor cannot loop.
    When two paths reach one folder, the first in a fixed walk order is kept (plain folders
    before links). Hidden entries are ignored. A dangling link with an image name is kept, so
    that the image check reports it as missing instead of it vanishing. Real paths are built
    from each folder's real path, so only links cost an ``os.path.realpath`` call.
    """
    images: list[tuple[str, str]] = []
    special: list[str] = []
    try:
        visited = {*skip, _dir_key(os.stat(folder))}
    except OSError:
        return images, special
    stack = [(str(folder), os.path.realpath(folder))]
    while stack:
        current, current_real = stack.pop()
        try:
            with os.scandir(current) as it:
                # A fixed order makes the same path win when two reach one folder; plain
                # folders before links, so a link to a sibling does not hide its real path.
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))
        except OSError:
            continue  # an unreadable folder is skipped, as os.walk does
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            is_link = entry.is_symlink()
            real = (
                os.path.realpath(entry.path) if is_link else os.path.join(current_real, entry.name)
            )
            try:
                key = _dir_key(entry.stat()) if entry.is_dir() else None  # both follow links
            except OSError:
                key = None
            if key is not None:
                if key not in visited:
                    visited.add(key)
                    stack.append((entry.path, real))
            elif _is_image(entry.name):
                if entry.is_file() or (is_link and not os.path.exists(entry.path)):
                    images.append((entry.path, real))
                else:
                    special.append(entry.path)
    return images, special


def _load_manifest(csv: Path) -> pd.DataFrame:
    try:
        # All strings, no NaN guessing: a class called "NA" or "None" stays a class.
        raw = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataSourceError(
            f"manifest {csv} is empty: expected a header path,label[,group]"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"manifest {csv} is not a readable CSV: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in ("path", "label") if c not in raw.columns]
    if missing:
        found = ", ".join(f"'{c}'" for c in raw.columns)
        raise DataSourceError(
            f"manifest {csv} lacks column(s) {', '.join(repr(c) for c in missing)}; "
            f"found columns: {found}; expected path,label[,group]"
        )
    if len(raw) == 0:
        raise DataSourceError(f"manifest {csv} has a header but no rows")
    columns = ["path", "label"] + (["group"] if "group" in raw.columns else [])
    table = raw[columns].apply(lambda col: col.str.strip())
    for column in columns:
        blank = table.index[table[column] == ""]
        if len(blank):
            rows = ", ".join(str(i + 1) for i in blank[:_SHOW])
            raise DataSourceError(
                f"manifest {csv}: {len(blank)} row(s) with an empty {column!r} value "
                f"(data rows {rows}{', ...' if len(blank) > _SHOW else ''})"
            )
    base = csv.parent
    listed = table["path"].tolist()
    table["path"] = [os.path.abspath(os.path.join(base, p)) for p in listed]
    absent: list[str] = []
    special: list[str] = []
    for path in table["path"]:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                special.append(path)
        except OSError:
            absent.append(path)
    if absent:
        raise DataSourceError(
            f"manifest {csv}: {len(absent)} of {len(table)} listed files do not exist "
            f"(relative paths are resolved against {base}): {_shown(absent)}"
        )
    if special:
        # Reading a FIFO or device blocks or never ends: refuse them here, by name.
        raise DataSourceError(
            f"manifest {csv}: {len(special)} listed path(s) are not regular files "
            f"(folder, FIFO, socket or device): {_shown(special)}"
        )
    table["real"] = _real_paths(table["path"])
    table = _one_row_per_file(
        table,
        where=f"manifest {csv}",
        describe=lambda i: f"data row {i + 1} ({listed[i]})",
    )
    return _finish(table)


def _real_paths(paths: Iterable[str]) -> list[str]:
    """``os.path.realpath`` of each absolute path, resolving each folder only once."""
    folders: dict[str, str] = {}
    out: list[str] = []
    for path in paths:
        if os.path.islink(path):
            out.append(os.path.realpath(path))
            continue
        head, tail = os.path.split(path)
        if head not in folders:
            folders[head] = os.path.realpath(head)
        out.append(os.path.join(folders[head], tail))
    return out


def _one_row_per_file(
    table: pd.DataFrame, *, where: str, describe: Callable[[int], str]
) -> pd.DataFrame:
    """Keep the first row of each real file (column ``real``, dropped on return).

    A file with two rows could land in both train and val; rows that agree are merged with a
    warning, rows that disagree on the label (or group) are an error naming both, since either
    label could be the wrong one. ``describe(i)`` names row ``i`` in messages.
    """
    repeated = table["real"].duplicated()
    if repeated.any():
        copies = table[table["real"].duplicated(keep=False)]
        for column in [c for c in ("label", "group") if c in table.columns]:
            firsts = copies.groupby("real", sort=False)[column].transform("first")
            differs = copies.index[copies[column] != firsts]
            if len(differs):
                second = int(differs[0])
                real = table["real"].iat[second]
                first = int(copies.index[copies["real"] == real][0])
                raise DataSourceError(
                    f"{where}: {describe(first)} and {describe(second)} are the same file "
                    f"({real}) with different {column}s {table[column].iat[first]!r} and "
                    f"{table[column].iat[second]!r}; keep one of them"
                )
        dropped = [int(i) for i in table.index[repeated]]
        log.warning(
            "%s: %d repeated row(s) of the same file dropped (the first is kept): %s",
            where,
            len(dropped),
            _shown([describe(i) for i in dropped[: _SHOW + 1]]),
        )
    return table.loc[~repeated].drop(columns="real").reset_index(drop=True)


def _finish(table: pd.DataFrame) -> pd.DataFrame:
    # Stable sort on label then path: the same files always give the same row order.
    table = table.sort_values(["label", "path"], kind="mergesort").reset_index(drop=True)
    return table.astype(str)
