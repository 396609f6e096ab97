"""Hugging Face ``datasets`` as a data source: a ``Dataset`` saved with ``save_to_disk``, a
saved ``DatasetDict`` (its ``train`` split), or a folder of parquet or arrow files.

``datasets`` (the optional ``hf`` extra, imported only here and only for such a source) opens
the source once in the main process: it names the columns and features (``ClassLabel`` names
become the labels) and, for parquet, converts the files once to memory-mappable Arrow files in
its cache. The items themselves are read with pyarrow from those Arrow files, memory-mapped
lazily in each process that reads (each DataLoader worker after its fork or spawn), and their
encoded bytes are decoded there by ``imageio.decode_bytes``: images are never extracted to
files, and decoding costs what it costs a training run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from feedtune.sources.image_checks import check_bytes, check_image
from feedtune.sources.imageio import (
    BadImageError,
    bytes_header,
    decode_bytes,
    decode_image,
    jpeg_scale,
)
from feedtune.sources.items import ItemReader, Source, declared_classes, item_ref, ref_index
from feedtune.sources.tables import DataSourceError

log = logging.getLogger(__name__)

HF_INSTALL = 'pip install "feedtune[hf]"'
DATA_SUFFIXES = (".parquet", ".arrow")
_JPEG_MAGIC = b"\xff\xd8\xff"


def is_arrow_source(root: Path) -> bool:
    """A ``save_to_disk`` folder (Dataset or DatasetDict), or one holding parquet/arrow files
    (directly or in ``data/``, the Hugging Face hub's layout)."""
    if not root.is_dir():
        return False
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        return True
    return bool(_data_files(root))


def _data_files(root: Path) -> list[Path]:
    found = []
    for folder in (root, root / "data"):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file()]
    return sorted(p for p in found if not p.name.startswith("."))


def _import_datasets(root: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            f"data.path {root} is a Hugging Face dataset; reading it needs the datasets "
            f"package: {HF_INSTALL}"
        ) from None
    datasets.disable_progress_bars()  # one line per long step is feedtune's own job
    return datasets


def _open_dataset(root: Path) -> Any:
    """The ``datasets.Dataset`` at ``root`` (a DatasetDict's ``train`` split)."""
    datasets = _import_datasets(root)
    if (root / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(root))
        if "train" not in splits:
            names = ", ".join(splits)
            raise DataSourceError(
                f"data.path {root} is a DatasetDict without a 'train' split (splits: {names}); "
                f"point data.path at one split's folder, e.g. {root / next(iter(splits))}"
            )
        log.info("data.path %s: using the 'train' split of %s", root, ", ".join(splits))
        return splits["train"]
    if (root / "state.json").is_file():
        return datasets.load_from_disk(str(root))
    files = _data_files(root)
    kinds = {p.suffix for p in files}
    if len(kinds) > 1:
        raise DataSourceError(f"data.path {root} mixes parquet and arrow files; keep one kind")
    # A hub snapshot holds train-*/test-* files side by side: train only, as for a DatasetDict.
    train = [p for p in files if p.name.startswith("train")]
    if train and len(train) < len(files):
        log.info("data.path %s: using the %d train* file(s) of %d", root, len(train), len(files))
        files = train
    names = [str(p) for p in files]
    if ".parquet" in kinds:
        return datasets.Dataset.from_parquet(names)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(n) for n in names])


def _column(ds: Any, key: str, name: str, root: Path) -> None:
    if name not in ds.column_names:
        raise DataSourceError(
            f"{key}: column {name!r} not in {root}; columns present: {', '.join(ds.column_names)}"
        )


def load_arrow_source(
    root: Path, *, image_column: str, label_column: str, group_column: str | None
) -> Source:
    """One row per item: ``path`` = ``<root>#<index>``, ``label`` (ClassLabel names, else the
    values as strings) [, ``group``]."""
    ds = _open_dataset(root)
    if ds._indices is not None:  # a selection over the Arrow files: write it out once
        ds = ds.flatten_indices()
    _column(ds, "data.image_column", image_column, root)
    _column(ds, "data.label_column", label_column, root)
    if group_column:
        _column(ds, "data.group_column", group_column, root)
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise DataSourceError(f"data.path {root}: the dataset has no Arrow files to read from")
    reader = ArrowItems(files, image_column, root=str(root))
    reader.check_image_type()
    feature = ds.features[label_column]
    names = list(getattr(feature, "names", None) or [])
    raw = reader.columns([label_column] + ([group_column] if group_column else []))
    labels = raw[label_column]
    if labels.isna().any():
        raise DataSourceError(
            f"data.label_column: {int(labels.isna().sum())} item(s) of {root} have no "
            f"{label_column!r} value"
        )
    if names:
        codes = labels.astype(int).to_numpy()
        if (codes < 0).any() or (codes >= len(names)).any():
            raise DataSourceError(
                f"data.label_column: {int(((codes < 0) | (codes >= len(names))).sum())} item(s) "
                f"of {root} have no class ({label_column!r} outside 0..{len(names) - 1})"
            )
        labels = pd.Series(np.asarray(names, dtype=object)[codes])
    n = len(labels)
    table = pd.DataFrame(
        {"path": [item_ref(str(root), i, n) for i in range(n)], "label": labels.astype(str)}
    )
    if group_column:
        groups = raw[group_column]
        if groups.isna().any():
            raise DataSourceError(
                f"data.group_column: {int(groups.isna().sum())} item(s) of {root} have no "
                f"{group_column!r} value"
            )
        table["group"] = groups.astype(str).to_numpy()
    if n == 0:
        raise DataSourceError(f"data.path {root}: the dataset has no items")
    table = table.sort_values(["label", "path"], kind="mergesort").reset_index(drop=True)
    classes = declared_classes(names, table["label"], where=str(root)) if names else None
    return Source(table=table.astype(str), reader=reader, classes=classes)


class ArrowItems(ItemReader):
    """Items of Arrow files (in order, as ``datasets`` concatenates them): the encoded bytes
    of ``image_column`` (an ``Image()`` feature's ``bytes``, else its ``path``; or a plain
    binary column). The files are memory-mapped on first use in each process."""

    kind = "arrow"

    def __init__(self, files: list[str], image_column: str, *, root: str) -> None:
        self.files = list(files)
        self.image_column = image_column
        self.root = root
        self._tables: list[Any] | None = None
        self._starts: np.ndarray | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_tables=None, _starts=None, _pid=None)  # reopened where it is read
        return state

    def _open(self) -> list[Any]:
        if self._tables is None or self._pid != os.getpid():
            self._tables = [_read_arrow(f) for f in self.files]
            lengths = [t.num_rows for t in self._tables]
            self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._pid = os.getpid()
        return self._tables

    def columns(self, names: list[str]) -> pd.DataFrame:
        """Whole columns of every item, in item order (labels and groups for the table)."""
        import pyarrow as pa

        parts = [t.select(names) for t in self._open()]
        return pa.concat_tables(parts).to_pandas()

    def check_image_type(self) -> None:
        """The image column must hold encoded images (``Image()`` or binary)."""
        import pyarrow as pa

        tables = self._open()
        kind = tables[0].schema.field(self.image_column).type
        ok = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        ok = ok or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)
        if not ok:
            raise DataSourceError(
                f"data.image_column: column {self.image_column!r} of {self.root} holds {kind}, "
                "not images; expected a datasets Image() column or encoded image bytes"
            )

    def _stored(self, ref: str) -> bytes | str:
        """The item's encoded bytes, or the path of its file when only a path is stored."""
        import pyarrow as pa

        index = ref_index(ref)
        tables = self._open()
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        value = tables[part].column(self.image_column)[index - int(self._starts[part])]
        if pa.types.is_struct(value.type):
            data = value["bytes"]
            path = value["path"] if value.type.get_field_index("path") >= 0 else None
            if data.is_valid:
                return data.as_py()
            if path is not None and path.is_valid:
                found = path.as_py()
                return found if os.path.isabs(found) else os.path.join(self.root, found)
            return b""
        return value.as_py() if value.is_valid else b""

    def _decode(
        self, ref: str, backend: str, min_size: int | None, limits: dict[str, int | None]
    ) -> np.ndarray:
        stored = self._stored(ref)
        if isinstance(stored, str):
            return decode_image(stored, backend=backend, min_size=min_size, **limits)
        return decode_bytes(stored, name=ref, backend=backend, min_size=min_size, **limits)

    def check(
        self, ref: str, *, max_pixels: int | None = None, max_bytes: int | None = None
    ) -> str | None:
        stored = self._stored(ref)
        limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
        return (
            check_image(stored, **limits)
            if isinstance(stored, str)
            else check_bytes(stored, **limits)
        )

    def header(self, ref: str) -> tuple[int, int, str, str]:
        stored = self._stored(ref)
        if isinstance(stored, str):
            return super().header(stored)
        return bytes_header(stored, name=ref)

    def decoded_hw(self, ref: str, min_size: int | None) -> tuple[int, int]:
        stored = self._stored(ref)
        if isinstance(stored, str):
            return super().decoded_hw(stored, min_size)
        w, h, _, _ = bytes_header(stored, name=ref)
        if min_size is not None and stored.startswith(_JPEG_MAGIC):
            scale = jpeg_scale((w, h), min_size)
            w, h = math.ceil(w / scale), math.ceil(h / scale)
        return h, w

    def digest(self, ref: str) -> tuple[int, str]:
        try:
            stored = self._stored(ref)
        except (BadImageError, OSError):
            return 0, ""
        if isinstance(stored, str):
            return super().digest(stored)
        return len(stored), hashlib.sha256(stored).hexdigest()

    def describe(self) -> str:
        return f"arrow ({len(self.files)} file(s), column {self.image_column!r})"


def _read_arrow(path: str) -> Any:
    """A memory-mapped Arrow table: the stream format ``datasets`` writes, else the file
    format."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
