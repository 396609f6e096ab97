"""Batch mixing (MixUp, CutMix): pairs of training images and their labels blended into one
image and a soft target, with torchvision's v2 batch transforms.

Mixing needs a whole batch, so it runs after collation, after the policy, on the normalized
float images the model is fed: in the loader's collate function when the policy runs per
sample (``augment.where: sample``), and right after the batch augmentation when it runs per
batch (``augment.where: batch``: on the device, or in the collate function on a CPU). Only
training batches are mixed: validation keeps hard labels, which its metrics need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import get_worker_info
from torchvision.transforms import v2

from feedtune.config import AugmentConfig
from feedtune.feed.loader import collate_skipping_none

# (float images [B, C, H, W], int64 labels [B]) -> (mixed images, float soft targets [B, K]).
Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_mix(cfg: AugmentConfig, *, num_classes: int) -> Mix | None:
    """The v2 batch transform ``cfg.mix`` names, or None for ``none``.

    ``num_classes`` is the width of the soft targets: the v2 transforms one-hot the labels
    with it, so a batch that happens to miss a class still yields rows the loss can take."""
    if cfg.mix == "none":
        return None
    kinds = {
        "mixup": lambda: v2.MixUp(alpha=cfg.mix_alpha, num_classes=num_classes),
        "cutmix": lambda: v2.CutMix(alpha=cfg.mix_alpha, num_classes=num_classes),
    }
    if cfg.mix == "mixup_or_cutmix":
        # One of the two per batch, with equal odds: each batch is wholly one kind.
        return v2.RandomChoice([kinds["mixup"](), kinds["cutmix"]()])
    if cfg.mix not in kinds:
        raise ValueError(f"augment.mix: unknown kind {cfg.mix!r}")
    return kinds[cfg.mix]()


class AugmentThenMix:
    """The batch step of ``augment.where: batch``: ``policy`` turns uint8 working squares into
    the model's normalized floats, then ``mix`` (when set) blends them and their labels.

    ``((uint8, aspects), targets) -> (images, targets)``, so that soft targets leave with the
    images they describe; ``generator`` draws the policy's per-sample parameters, except in a
    loader worker, where the worker's RNG does (the DataLoader seeds it from its generator, so
    a run repeats)."""

    def __init__(
        self,
        policy: Callable[..., torch.Tensor],
        *,
        generator: torch.Generator | None = None,
        mix: Mix | None = None,
    ):
        self.policy = policy
        self.generator = generator
        self.mix = mix

    def __call__(
        self, images: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        uint8, aspects = images
        generator = None if get_worker_info() is not None else self.generator
        floats = self.policy(uint8, aspects, generator=generator)
        if self.mix is not None:
            return self.mix(floats, targets)
        return floats, targets

    def __repr__(self) -> str:
        return f"AugmentThenMix(policy={self.policy!r}, mix={self.mix!r})"


class StepCollate:
    """A DataLoader ``collate_fn`` that collates, then runs ``step`` on the whole batch, in the
    loader's workers: a mix (``augment.where: sample``) or an :class:`AugmentThenMix` (``where:
    batch`` on the CPU, where the workers are the spare CPU beside the model's step).

    A class, not a closure, so that worker processes started by ``spawn`` can unpickle it;
    the step then draws from the worker's RNG, which ``loader.seed_worker`` seeds."""

    def __init__(
        self,
        step: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        base_collate: Callable[[list[Any]], Any] = collate_skipping_none,
    ):
        self.step = step
        self.base_collate = base_collate

    def __call__(self, batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        collated = self.base_collate(batch)
        if collated is None:  # every sample of the batch was a bad image
            return None
        images, targets = collated
        return self.step(images, targets)

    def __repr__(self) -> str:
        return f"StepCollate(step={self.step!r})"
