"""Reproducible train/val split: stratified by label, grouped when the table has groups.

Several images of one person/object must never sit on both sides, or validation measures
memory instead of generalisation; scikit-learn's splitters do the stratification.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

from feedtune.config import SplitConfig


@dataclass
class Split:
    train: pd.DataFrame
    val: pd.DataFrame
    summary: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.summary["digest"]

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``train.csv``, ``val.csv``, ``summary.json`` (paths relative to the data root)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        root = self.summary["root"]
        out = []
        for name, df in (("train", self.train), ("val", self.val)):
            rel = df.copy()
            rel["path"] = [os.path.relpath(p, root) for p in rel["path"]]
            path = folder / f"{name}.csv"
            rel.to_csv(path, index=False)
            out.append(path)
        summary_path = folder / "summary.json"
        summary_path.write_text(json.dumps(self.summary, indent=2, sort_keys=True))
        out.append(summary_path)
        return out


def _root_of(paths: pd.Series) -> str:
    if len(paths) == 0:
        return ""
    common = os.path.commonpath(list(paths))
    return common if os.path.isdir(common) else os.path.dirname(common)


def _digest(train: pd.DataFrame, val: pd.DataFrame, root: str) -> str:
    """Hash of (relative path, label, side): equal on every machine for the same split."""
    h = hashlib.sha256()
    for side, df in (("train", train), ("val", val)):
        for path, label in sorted(zip(df["path"], df["label"], strict=True)):
            h.update(f"{side}\t{os.path.relpath(path, root)}\t{label}\n".encode())
    return h.hexdigest()[:16]


def make_split(table: pd.DataFrame, cfg: SplitConfig, *, seed: int) -> Split:
    """Split ``table`` (columns path, label[, group]) into train and val.

    With a ``group`` column and ``cfg.grouped``, ``StratifiedGroupKFold`` keeps every group on
    one side; its fold count is ``round(1 / val_fraction)`` and the first fold is val.
    """
    table = table.sort_values(["label", "path"]).reset_index(drop=True)
    labels = table["label"].to_numpy()
    grouped = cfg.grouped and "group" in table.columns
    if grouped:
        n_splits = max(2, round(1 / cfg.val_fraction))
        n_groups = table["group"].nunique()
        if n_groups < n_splits:
            raise ValueError(
                f"split: {n_groups} groups cannot give val_fraction {cfg.val_fraction}; "
                "lower split.val_fraction or set split.grouped: false"
            )
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train_idx, val_idx = next(splitter.split(table, labels, groups=table["group"]))
    else:
        counts = table["label"].value_counts()
        if counts.min() < 2:
            raise ValueError(
                f"split: class '{counts.idxmin()}' has only {counts.min()} image; "
                "every class needs at least 2 to appear on both sides"
            )
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=cfg.val_fraction, random_state=seed)
        train_idx, val_idx = next(splitter.split(table, labels))
    train = table.iloc[np.sort(train_idx)].reset_index(drop=True)
    val = table.iloc[np.sort(val_idx)].reset_index(drop=True)
    root = _root_of(table["path"])
    summary: dict[str, Any] = {
        "seed": seed,
        "val_fraction": cfg.val_fraction,
        "grouped": grouped,
        "root": root,
        "n_train": len(train),
        "n_val": len(val),
        "class_counts": {
            "train": {k: int(v) for k, v in train["label"].value_counts().sort_index().items()},
            "val": {k: int(v) for k, v in val["label"].value_counts().sort_index().items()},
        },
        "digest": _digest(train, val, root),
    }
    if grouped:
        summary["n_groups"] = {
            "train": int(train["group"].nunique()),
            "val": int(val["group"].nunique()),
        }
    return Split(train=train, val=val, summary=summary)
