"""``feedtune best --emit python``: a configuration's data feeding as a standalone script.

The script needs only torch, torchvision, numpy and pillow (plus albumentations and OpenCV when
that library is chosen), so tuned settings can be pasted into any training code without
depending on feedtune. Its transforms are not a second description of the policies: the ops
classes of ``augment_policies`` run with their library names (``A``, ``v2``, ``cv2``, ...)
bound to recorders, and ``build_stages`` lays the recorded calls out. The script therefore holds
the very constructor calls, arguments and order feedtune trains with, and stays so when the
policies change. Batch mixing (``augment.mix``) is recorded the same way from ``build_mix``.

A run trained under torchrun (``world_size`` > 1) gets each process's share of every epoch:
``DistributedSampler``, or for the weighted sampler feedtune's ``DistributedWeightedSampler``
written out in the script (PyTorch has none).

This module assembles the script; ``snippet_code`` records and writes out the transform and
mix calls, ``snippet_loader`` writes the training DataLoader and its sampler.
"""

from __future__ import annotations

import textwrap

from feedtune.commands.snippet_code import TRIVIAL_CLASS_SOURCE, WIDTH, transform_source
from feedtune.commands.snippet_loader import (
    DISTRIBUTED_WEIGHTED_SOURCE,
    RANK_SOURCE,
    loader_source,
    mix_collate_source,
    seed_worker_source,
)
from feedtune.config import Config, ConfigError, parse_override, with_overrides
from feedtune.feed.geometry import working_size
from feedtune.tuning.space import inert_settings

__all__ = ["config_from_params", "feeding_snippet", "snippet_from_params"]


# Speed settings of feedtune's own loader, with their plain values: the script feeds the same
# data without them (a cache shared by workers; augmenting whole batches on the device).
_SPEED_ONLY = {"loader.cache": "none", "augment.where": "sample", "loader.cache_limit_mb": None}


def _header(cfg: Config, *, world_size: int) -> str:
    """Comment naming the settings the script reproduces (inert ones left out)."""
    values = cfg.flat()
    # cuda=True keeps pin_memory, which the script applies when the user has a GPU; the script
    # augments per sample, where the library always matters.
    inert = inert_settings({**values, "augment.where": "sample"}, cuda=True) | set(_SPEED_ONLY)
    if cfg.augment.mix == "none":
        inert.add("augment.mix")  # the plain value: nothing to reproduce, nothing to show
    shown = [
        f"{k}={'null' if v is None else str(v).replace(' ', '')}"
        for k, v in values.items()
        if (k == "seed" or k.split(".")[0] in ("augment", "sampler", "loader")) and k not in inert
    ]
    skipped = [
        f"{k}={values[k]}"
        for k, plain in _SPEED_ONLY.items()
        if plain is not None and values.get(k, plain) != plain
    ]
    libs = "torch, torchvision, numpy, pillow"
    if cfg.augment.library == "albumentations":
        libs += ", albumentations, opencv-python"
    intro = f"Data feeding tuned with feedtune, standalone: needs only {libs}."
    lines = [intro, "Reproduces: " + "  ".join(shown)]
    if world_size > 1:
        share = (
            "DistributedWeightedSampler" if cfg.sampler.kind == "weighted" else "DistributedSampler"
        )
        lines.append(
            f"Trained under torchrun on {world_size} processes: each loads its share of every "
            f"epoch ({share}), batch_size is per process."
        )
    if skipped:
        lines.append(f"Not reproduced (speed settings of feedtune's loader): {', '.join(skipped)}")
    wrapped = [
        textwrap.fill(
            line, WIDTH, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False
        )
        for line in lines
    ]
    return "\n".join(wrapped) + "\n"


def _imports(cfg: Config, *, workers: bool, world_size: int) -> str:
    albumentations = cfg.augment.library == "albumentations"
    mixed = cfg.augment.mix != "none"
    weighted = cfg.sampler.kind == "weighted"
    stdlib = ["import os"] if world_size > 1 else []
    stdlib += ["import random"] if workers and albumentations else []
    lines = [*stdlib, ""] if stdlib else []
    if albumentations:
        lines += ["import albumentations as A", "import cv2"]
    lines += ["import numpy as np", "import torch"]
    if albumentations:
        lines.append("from albumentations.pytorch import ToTensorV2")
    lines.append("from PIL import Image, ImageOps")
    wanted = {
        "DataLoader": True,
        "Dataset": True,
        "DistributedSampler": world_size > 1 and not weighted,
        "Sampler": world_size > 1 and weighted,  # the base of DistributedWeightedSampler
        "WeightedRandomSampler": world_size <= 1 and weighted,
        "default_collate": mixed,
    }
    lines.append(f"from torch.utils.data import {', '.join(k for k, v in wanted.items() if v)}")
    if not albumentations or mixed:
        lines.append("from torchvision.transforms import v2")
    return "\n".join(lines) + "\n"


def _dataset(cfg: Config) -> str:
    size = working_size(cfg.augment.image_size)
    apply = "transform(image)"
    if cfg.augment.library == "albumentations":
        apply = 'transform(image=image)["image"]'
    return textwrap.dedent(f'''
        class ImageDataset(Dataset):
            """Image files and integer labels -> (transformed image tensor, label)."""

            def __init__(self, paths, labels, transform):
                self.paths, self.labels, self.transform = list(paths), list(labels), transform

            def __len__(self):
                return len(self.paths)

            def __getitem__(self, index):
                with Image.open(self.paths[index]) as im:
                    im.draft(im.mode, ({size}, {size}))  # large JPEGs: decode at 1/2-1/8 scale
                    image = np.array(ImageOps.exif_transpose(im).convert("RGB"))
                return self.{apply}, int(self.labels[index])
        ''')


_MAIN = """
if __name__ == "__main__":
    paths, labels = [], []  # your image files and integer labels (0 .. n_classes - 1)
    if paths:
        images, targets = next(iter(make_loader(paths, labels)))
        print(f"one batch: {tuple(images.shape)} {images.dtype}, labels {targets.tolist()}")
    else:
        print("Fill in paths and labels, then run again.")
"""


def feeding_snippet(cfg: Config, world_size: int = 1) -> str:
    """Standalone PyTorch source that feeds images as ``cfg`` does (see the module docstring),
    in each of ``world_size`` processes when the run was trained under torchrun.

    The script defines ``train_transform``, ``eval_transform``, ``ImageDataset`` and
    ``make_loader(paths, labels)`` (``MixCollate`` and a ``num_classes=None`` argument with a
    mix); run as printed it only asks for its placeholders.
    """
    train = transform_source("train_transform", cfg, train=True)
    evaluation = transform_source("eval_transform", cfg, train=False)
    workers = cfg.loader.num_workers > 0
    trivial = "TrivialAugmentWideUpTo(" in train
    distributed = world_size > 1
    imports = _imports(cfg, workers=workers, world_size=world_size)
    # isort's layout: one blank line after the imports, two when a definition follows.
    head = _header(cfg, world_size=world_size) + "\n" + imports + ("\n\n" if trivial else "\n")
    parts = [
        TRIVIAL_CLASS_SOURCE if trivial else "",
        train,
        "# Validation images: no randomness, same size and normalisation.\n" + evaluation,
        _dataset(cfg),
        mix_collate_source(cfg) if cfg.augment.mix != "none" else "",
        RANK_SOURCE if distributed else "",
        DISTRIBUTED_WEIGHTED_SOURCE if distributed and cfg.sampler.kind == "weighted" else "",
        seed_worker_source(cfg) if workers else "",
        loader_source(cfg, world_size=world_size),
        _MAIN,
    ]
    return head + "\n\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def config_from_params(params: dict[str, str]) -> Config:
    """The Config behind an MLflow run's flat params (dotted keys, values as logged strings).

    Keys that are not settings (tags-like extras, keys of other versions) are skipped. A value
    is read as YAML, like ``--set``; a string setting whose text YAML reads as another type
    (an experiment named ``2024``) falls back to the text itself.
    """
    cfg = Config()
    settable = set(cfg.flat())
    for key in sorted(params):
        if key not in settable:
            continue
        raw = params[key]
        _, value = parse_override(f"{key}={raw}")
        try:
            cfg = with_overrides(cfg, {key: value})
        except ConfigError:
            if value == raw:
                raise
            cfg = with_overrides(cfg, {key: raw})
    return cfg


def snippet_from_params(params: dict[str, str], *, world_size: int = 1) -> str:
    """``feeding_snippet`` of the configuration an MLflow run logged as params; ``world_size``:
    the processes it trained on (its ``feedtune.world_size`` tag)."""
    return feeding_snippet(config_from_params(params), world_size=world_size)
