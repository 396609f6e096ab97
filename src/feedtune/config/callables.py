"""``module.path:callable`` names in a config (a model factory, a Dataset source): the one
pattern they follow and the one way they are imported, with errors that name the key."""

from __future__ import annotations

import importlib
import re
from typing import Any

# ``package.module:callable``; the callable may be an attribute path (``mod:Class.build``).
CALLABLE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_callable(name: str, *, key: str, where: str) -> Any:
    """The callable ``name`` names. Errors (``ValueError``) start with ``key`` and, when the
    module cannot be imported, say where to put it (``where``)."""
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{key}: cannot import '{module_name}' ({exc}); put it on PYTHONPATH or {where}"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}: '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key}: '{name}' is not callable")
    return obj
