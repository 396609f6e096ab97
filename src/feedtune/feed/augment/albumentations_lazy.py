"""albumentations, imported on first use.

Importing it costs over a second of CPU at every start (it imports scipy and pydantic models),
and most runs never touch it: torchvision is the default library. ``A`` is the module itself
once any of its attributes is read, so code writes ``A.Compose`` as usual; ``ToTensorV2``
builds ``albumentations.pytorch.ToTensorV2``, importing it then.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any


def _lazy(name: str) -> ModuleType:
    """``name`` as a module whose code runs at its first attribute access (the standard
    library's ``LazyLoader``); the module itself if something imported it already."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


A = _lazy("albumentations")


def ToTensorV2(**kwargs: Any) -> Any:  # the class's name: policies read as albumentations code
    from albumentations.pytorch import ToTensorV2 as to_tensor

    return to_tensor(**kwargs)
