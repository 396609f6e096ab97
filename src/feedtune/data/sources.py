"""Load a labelled image collection into one table: ``path``, ``label`` [, ``group``].

A source is one of:

- a CSV manifest ``path,label[,group]`` (paths relative to the CSV's folder, or absolute);
- a directory holding ``manifest.csv`` (that manifest is used, even if class folders exist);
- an ImageFolder directory: one sub-folder per class, images at any depth inside it.

The table has absolute ``path`` strings, ``label`` strings, a ``group`` column only when the
manifest has one, and is sorted by label then path, so the same files always give the same
table (and, downstream, the same split for a seed). Every problem raises ``DataSourceError``
naming the offending file, folder or column.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.csv"
# Folders that are never classes: macOS zip metadata (its files are "._x.jpg" copies).
_IGNORED_DIRS = {"__MACOSX"}
# How many offending paths an error message lists before it just counts.
_SHOW = 5


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


def _load_image_folder(root: Path) -> pd.DataFrame:
    classes = sorted(
        e.name
        for e in os.scandir(root)
        if e.is_dir() and not _is_hidden(e.name) and e.name not in _IGNORED_DIRS
    )
    if not classes:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and _is_image(e.name))
        hint = f" (found {loose} image(s) directly in it: put them in one folder per class)"
        raise DataSourceError(
            f"no class folders in {root}: expected an ImageFolder tree (class_name/image.jpg) "
            f"or a {MANIFEST_NAME}" + (hint if loose else "")
        )
    rows: list[tuple[str, str]] = []
    empty: list[str] = []
    for label in classes:
        found = [(p, label) for p in _images_under(root / label)]
        if not found:
            empty.append(label)
        rows.extend(found)
    if empty:
        names = ", ".join(f"'{c}'" for c in empty)
        verb = "has" if len(empty) == 1 else "have"
        raise DataSourceError(
            f"class folder{'s' if len(empty) > 1 else ''} {names} in {root} {verb} no images "
            f"(looked for {' '.join(IMAGE_EXTENSIONS)}, any case, in sub-folders too)"
        )
    return _finish(pd.DataFrame(rows, columns=["path", "label"]))


def _images_under(folder: Path) -> list[str]:
    out: list[str] = []
    # followlinks: datasets are often assembled from symlinked folders.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]  # prune hidden sub-folders
        out.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return out


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
    table["path"] = [os.path.abspath(os.path.join(base, p)) for p in table["path"]]
    absent = [p for p in table["path"] if not os.path.isfile(p)]
    if absent:
        shown = ", ".join(absent[:_SHOW]) + (", ..." if len(absent) > _SHOW else "")
        raise DataSourceError(
            f"manifest {csv}: {len(absent)} of {len(table)} listed files do not exist "
            f"(relative paths are resolved against {base}): {shown}"
        )
    duplicated = table["path"][table["path"].duplicated()].unique().tolist()
    if duplicated:
        # A file listed twice could land in both train and val, or carry two labels.
        shown = ", ".join(duplicated[:_SHOW]) + (", ..." if len(duplicated) > _SHOW else "")
        raise DataSourceError(
            f"manifest {csv}: {len(duplicated)} file(s) listed more than once: {shown}"
        )
    return _finish(table)


def _finish(table: pd.DataFrame) -> pd.DataFrame:
    # Stable sort on label then path: the same files always give the same row order.
    table = table.sort_values(["label", "path"], kind="mergesort").reset_index(drop=True)
    return table.astype(str)
