"""Checkpoints: written atomically, read with ``weights_only=True`` and nothing else.

A checkpoint holds what a user needs to reuse the model (state, class names, config, epoch,
metrics) and what a killed run needs to resume (optimizer, training state, RNG states).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from feedtune.config import Config, config_from_dict
from feedtune.training.external_models import is_factory
from feedtune.training.models import ARCHITECTURE_KEYS, build_model

FORMAT_VERSION = 1
# small_cnn had 4 blocks before `model.depth` existed; checkpoints of that time do not say so.
_DEPTH_BEFORE_THE_KEY = 4


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely; the message names the file."""


def rng_state() -> dict[str, Any]:
    """RNG states in types that ``weights_only`` loading accepts (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {
            "algo": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["algo"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(x) for x in obj]
    return obj


def _lists_to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(x) for x in obj)
    return obj


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: a killed writer leaves the previous file intact.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over
    the final name (``os.replace`` is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_tensors(path: str | Path, *, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only. A file that
    needs arbitrary unpickling is refused, an unreadable one named (``what`` says what it is)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain data, "
            f"so loading it could run code ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc}") from exc


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load with ``weights_only=True``; a file that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = load_tensors(path, what="checkpoint", map_location=map_location)
    if not isinstance(payload, dict) or "model_state" not in payload:
        raise CheckpointError(f"{path} is not a feedtune checkpoint (no model_state)")
    return payload


def model_args_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The architecture-deciding model settings of a checkpoint (``ARCHITECTURE_KEYS``).

    Checkpoints carry them as ``model_args``; older ones are read from their config, with the
    depth small_cnn had before it was a setting and no kwargs (they came later too)."""
    if "model_args" in payload:
        saved = payload["model_args"]
        args = {key: saved[key] for key in ARCHITECTURE_KEYS if key in saved}
        return {"kwargs": {}, **args}
    saved = payload["config"].get("model", {})
    model = config_from_dict(payload["config"]).model
    return {
        "name": model.name,
        "width": model.width,
        "depth": saved.get("depth", _DEPTH_BEFORE_THE_KEY),
        "kwargs": dict(model.kwargs),
    }


def require_trusted_factory(
    name: str, allowed: str | None, *, where: str, how: str | None = None
) -> None:
    """Refuse to import the factory ``name`` that ``where`` (a checkpoint, a run) asks for
    unless the caller named the same one: a file from elsewhere must not choose the code that
    runs here. timm and torchvision names import only those libraries, so they pass. ``how``
    tells the caller how to name it (default: the command line and ``load_best``'s way)."""
    if is_factory(name) and name != allowed:
        how = how or f"pass --set model.name={name} (allowed_factory='{name}' from Python)"
        raise CheckpointError(
            f"{where} is built by the factory '{name}', code that runs only when you name it: "
            f"{how} to trust it, with its module on PYTHONPATH or installed"
        )


def load_weights(model: nn.Module, payload: dict[str, Any]) -> nn.Module:
    """``payload["model_state"]`` into ``model``; a mismatch is a ``CheckpointError``."""
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"the checkpoint's weights do not fit a {type(model).__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model


def model_from_checkpoint(
    payload: dict[str, Any],
    *,
    num_classes: int | None = None,
    allowed_factory: str | None = None,
    **model_overrides: Any,
) -> tuple[nn.Module, Config]:
    """The checkpoint's model with its weights, and its config.

    The architecture comes from ``model_args_of(payload)`` alone; ``pretrained`` is off because
    the weights come from the checkpoint (no torchvision or timm weight file is needed). A
    checkpoint built by a ``module.path:callable`` factory is rebuilt only when
    ``allowed_factory`` names that factory (``require_trusted_factory``).
    ``model_overrides`` set other model settings (e.g. ``dropout``, ``freeze``)."""
    args = model_args_of(payload)
    require_trusted_factory(args["name"], allowed_factory, where="the checkpoint")
    cfg = config_from_dict(payload["config"])
    model_cfg = dataclasses.replace(cfg.model, **model_overrides, **args, pretrained=False)
    model = build_model(model_cfg, num_classes=num_classes or len(payload["classes"]))
    return load_weights(model, payload), cfg
