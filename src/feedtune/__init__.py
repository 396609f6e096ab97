"""feedtune: find how to feed a PyTorch image classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BestModel", "load_best"]

if TYPE_CHECKING:
    from feedtune.api import BestModel, load_best


def __getattr__(name: str) -> Any:
    # Lazy: `import feedtune` stays light (no torch, no mlflow) until load_best is used.
    if name in ("load_best", "BestModel"):
        from feedtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'feedtune' has no attribute {name!r}")
