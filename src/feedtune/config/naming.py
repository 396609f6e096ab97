"""The default experiment name: runs are filed under the data they learn from.

``feedtune-<data>``, where ``<data>`` is the embedded dataset's name (``shapes``,
``shapes-shift``) when ``data.path`` is unset, else the folder's name, a CSV manifest's file
stem (the folder's name for a ``manifest.csv``, so a folder and its manifest name the same
experiment), or a Dataset callable's ``module.path.callable``. An explicit ``experiment``
always wins. The name is also the registered model's, so it keeps to letters, digits, ``_``,
``.`` and ``-`` (MLflow refuses ``/`` and ``:`` in a model name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from feedtune.config.callables import CALLABLE_NAME

PREFIX = "feedtune-"
# The manifest a folder source is read from (sources.tables.MANIFEST_NAME).
FOLDER_MANIFEST = "manifest.csv"
_UNSAFE = re.compile(r"[^\w.-]+")


def experiment_for(path: str | None, name: str = "shapes") -> str:
    """The experiment of runs on ``data.path`` = ``path`` (``data.name`` = ``name``, the
    embedded dataset used when ``path`` is unset); relative paths are read from the current
    directory, as the data source reads them."""
    safe = _UNSAFE.sub("-", _data_name(path, name)).strip("-.")
    return PREFIX + (safe or "data")


def _data_name(path: str | None, name: str) -> str:
    if not path:
        return name
    text = path.strip()
    if CALLABLE_NAME.fullmatch(text) and not os.path.exists(text):
        return text.replace(":", ".")
    where = Path(os.path.abspath(os.path.expanduser(text)))
    if where.name.lower() == FOLDER_MANIFEST:
        return where.parent.name
    if where.suffix.lower() == ".csv" or where.is_file():
        return where.stem
    return where.name
