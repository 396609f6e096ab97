"""``feedtune data``: write an embedded dataset if it is missing."""

from __future__ import annotations

from pathlib import Path

from feedtune.config import PROJECT_ROOT
from feedtune.synthetic.embedded import dataset_root, ensure_dataset


def run_data(name: str, *, root: str | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Write dataset ``name`` to ``root`` (default ``data/<name>`` in the project) unless it is
    there already; returns the manifest path. A folder holding other files is refused."""
    folder = Path(root) if root else dataset_root(name, PROJECT_ROOT)
    return ensure_dataset(name, folder, seed=seed, progress=progress)
