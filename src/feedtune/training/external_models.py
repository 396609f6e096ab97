"""Models from outside feedtune: ``timm/<name>`` (the optional timm package) and a user's
``module.path:callable`` factory. ``models.build_model`` picks the source from ``model.name``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feedtune.config.callables import CALLABLE_NAME, import_callable

TIMM_PREFIX = "timm/"
# Weight files timm publishes on the Hugging Face hub, preferred first (safetensors holds no code).
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_factory(name: str) -> bool:
    """``name`` names a user's factory (``module.path:callable``), code feedtune would import."""
    return ":" in name


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ValueError(
            'model.name: timm/<name> models need timm: pip install "feedtune[timm]"'
        ) from exc
    return timm


def _hf_cache_dir() -> Path:
    """Hugging Face's hub cache, located as huggingface_hub locates it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / (
        "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_hf_file(repo_id: str) -> Path | None:
    """A weight file of ``repo_id`` in the local hub cache (the ``main`` snapshot), or None."""
    repo = _hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snapshots += sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    for snapshot in snapshots:
        for filename in _HF_WEIGHT_FILES:
            if (snapshot / filename).is_file():
                return snapshot / filename
    return None


def _cached_timm_weights(timm: Any, arch: str) -> Path:
    """The local file of ``arch``'s pretrained weights (hub cache, else torch cache), or an
    error saying where to put it: feedtune never downloads."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"model.pretrained: timm has no pretrained weights for '{arch}'")
    if cfg.hf_hub_id:
        found = _cached_hf_file(cfg.hf_hub_id)
        if found is not None:
            return found
        where = (
            f"{_HF_WEIGHT_FILES[0]} of the Hugging Face repo {cfg.hf_hub_id} in {_hf_cache_dir()} "
            f"(`huggingface-cli download {cfg.hf_hub_id} {_HF_WEIGHT_FILES[0]}` where there is "
            "a network, then copy the cache)"
        )
    elif cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if path.is_file():
            return path
        where = f"{path} (from {cfg.url})"
    else:
        raise ValueError(f"model.pretrained: timm has no pretrained weights for '{arch}'")
    raise FileNotFoundError(
        f"model.pretrained: weights for 'timm/{arch}' are not in the local cache; feedtune "
        f"never downloads: put {where} or set model.pretrained: false"
    )


def build_timm(
    name: str, *, num_classes: int, pretrained: bool, kwargs: dict[str, Any]
) -> nn.Module:
    """``timm/<arch>``: timm sizes the head itself; pretrained weights come from a local file
    only (timm drops the checkpoint's classifier when ``num_classes`` differs)."""
    timm = _import_timm()
    arch = name[len(TIMM_PREFIX) :]
    if not arch or not timm.models.is_model(arch):
        raise ValueError(
            f"model.name: unknown timm model '{arch}'; allowed: timm/<name> with a name from "
            "timm.list_models(), e.g. timm/resnet18, timm/convnext_tiny"
        )
    extra: dict[str, Any] = {}
    if pretrained:
        # A file overlay makes timm read this file (weights_only) instead of reaching the hub.
        extra["pretrained_cfg_overlay"] = {"file": str(_cached_timm_weights(timm, arch))}
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, **extra, **kwargs
        )
    except TypeError as exc:
        raise ValueError(f"model.kwargs: timm/{arch} refused them: {exc}") from exc


def _import_factory(name: str) -> Any:
    if not CALLABLE_NAME.fullmatch(name):
        raise ValueError(
            f"model.name: '{name}' is not module.path:callable (e.g. mypkg.nets:make_net)"
        )
    return import_callable(name, key="model.name", where="install its package")


def build_factory(name: str, *, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``module.path:callable``, called as ``callable(num_classes=..., **model.kwargs)``."""
    factory = _import_factory(name)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(
            f"model.name: {name}(num_classes=..., **model.kwargs) failed: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model.name: {name} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model
