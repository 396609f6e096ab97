"""What the user's images are, read once per command: source -> table -> bad-file scan ->
split. A study's trials share the result; the feed builds its datasets from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from feedtune.config import PROJECT_ROOT, Config
from feedtune.progress import progress_bar
from feedtune.sources.arrow_source import is_arrow_source, load_arrow_source
from feedtune.sources.dataset_source import is_dataset_spec, load_dataset_source
from feedtune.sources.imageio import BadImageError
from feedtune.sources.items import FILES, ItemReader, Source
from feedtune.sources.split import Split, make_split
from feedtune.sources.tables import class_names, load_table
from feedtune.synthetic.embedded import dataset_root, ensure_dataset

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    good: pd.DataFrame
    bad: pd.DataFrame  # columns path, label, reason


def scan_images(
    table: pd.DataFrame,
    *,
    on_bad_image: str = "skip",
    progress: bool = True,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    reader: ItemReader = FILES,
) -> ScanResult:
    """Cheap structural check of every item (header + end marker, no decoding), read through
    the source's ``reader`` (files by default).

    ``skip`` drops and reports bad files; ``raise`` raises ``BadImageError`` for the first.
    Files that are not regular, larger than ``max_bytes`` or with more than ``max_pixels``
    pixels are bad files too (None: ``check_image``'s defaults, those of the config).
    """
    reasons: list[str | None] = []
    for path in progress_bar(
        table["path"], desc="checking images", unit="img", enabled=progress, leave=False
    ):
        reason = reader.check(path, max_pixels=max_pixels, max_bytes=max_bytes)
        if reason is not None and on_bad_image == "raise":
            raise BadImageError(path, reason)
        reasons.append(reason)
    mask = np.array([r is None for r in reasons], dtype=bool)
    bad = table.loc[~mask, ["path", "label"]].copy()
    bad["reason"] = [r for r in reasons if r is not None]
    for path, reason in zip(bad["path"], bad["reason"], strict=True):
        log.warning("bad image skipped: %s (%s)", path, reason)
    return ScanResult(good=table.loc[mask].reset_index(drop=True), bad=bad.reset_index(drop=True))


@dataclass
class PreparedData:
    """The table, its bad files and the split: computed once, shared by a study's trials."""

    source: Path | str  # a folder or file, or a Dataset's module.path:callable
    classes: list[str]
    split: Split
    bad: pd.DataFrame
    table: pd.DataFrame  # every listed item, the bad ones too (as read from the source)
    reader: ItemReader = FILES  # how the items of ``table`` are read


def resolve_source(cfg: Config, *, progress: bool = True) -> Path | str:
    """``data.path`` if set (a Dataset's ``module.path:callable`` as it is), else the embedded
    dataset (written on first use)."""
    if cfg.data.path and is_dataset_spec(cfg.data.path):
        return cfg.data.path
    if cfg.data.path:
        path = Path(cfg.data.path).expanduser()
        return path if path.is_absolute() else (Path.cwd() / path)
    root = dataset_root(cfg.data.name, PROJECT_ROOT)
    ensure_dataset(cfg.data.name, root, seed=cfg.data.generator_seed, progress=progress)
    return root


def size_limits(cfg: Config) -> dict[str, int]:
    """The file-size and pixel limits every image check and decode applies."""
    return {"max_pixels": cfg.data.max_pixels, "max_bytes": cfg.data.max_file_mb * 2**20}


def load_source(source: Path | str, cfg: Config, *, progress: bool = True) -> Source:
    """The table and reader of ``source``: a Dataset callable, a Hugging Face dataset or
    parquet/arrow folder, else image files (ImageFolder tree or CSV manifest)."""
    if isinstance(source, str):
        return load_dataset_source(source, progress=progress)
    if is_arrow_source(source):
        return load_arrow_source(
            source,
            image_column=cfg.data.image_column,
            label_column=cfg.data.label_column,
            group_column=cfg.data.group_column,
        )
    return Source(table=load_table(source))


def prepare_data(cfg: Config, *, progress: bool = True) -> PreparedData:
    source = resolve_source(cfg, progress=progress)
    loaded = load_source(source, cfg, progress=progress)
    table, reader = loaded.table, loaded.reader
    if len(loaded.unlisted) and cfg.data.on_bad_image == "raise":
        first = loaded.unlisted.iloc[0]
        raise BadImageError(first["path"], first["reason"])
    scan = scan_images(
        table,
        on_bad_image=cfg.data.on_bad_image,
        progress=progress,
        reader=reader,
        **size_limits(cfg),
    )
    for path, reason in zip(loaded.unlisted["path"], loaded.unlisted["reason"], strict=True):
        log.warning("bad image skipped: %s (%s)", path, reason)
    bad = scan.bad
    if len(loaded.unlisted):
        bad = pd.concat([bad, loaded.unlisted], ignore_index=True)
    split = make_split(scan.good, cfg.split, seed=cfg.seed)
    return PreparedData(
        source=source,
        classes=loaded.classes or class_names(table),
        split=split,
        bad=bad,
        table=table,
        reader=reader,
    )
