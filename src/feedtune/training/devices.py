"""Where tensors live: the training device, the model's memory format, and moving a batch
there (with its batch augmentation, when the loader delivers uint8 images)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but no CUDA device is available; use auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device`` in the memory format its batches will be given in."""
    model.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt)


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are NHWC (then batches are made NHWC too)."""
    for param in model.parameters():
        if param.dim() != 4:
            continue
        nhwc = param.is_contiguous(memory_format=torch.channels_last)
        if nhwc != param.is_contiguous():  # some kernels (1x1, one channel) are both: skip
            return nhwc
    return False


# Turns a batch of uint8 images, their original aspect ratios and their labels, already on the
# training device, into the model's normalized float input and its targets: the labels, or the
# soft targets [B, K] of a mixed batch (``data.mixing.AugmentThenMix``).
BatchAugment = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def to_device(
    batch: Any,
    device: torch.device,
    channels_last: bool,
    augment: BatchAugment | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images and targets on ``device``. Images collated as ``(uint8, aspects)``
    travel as uint8 (a quarter of float32's bytes) and are augmented there by ``augment``,
    which returns the targets too: a batch mixed on the device leaves with soft targets."""
    images, targets = batch
    non_blocking = device.type == "cuda"  # overlaps the copy with compute when memory is pinned
    if isinstance(images, (list, tuple)):
        images, aspects = images
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        if augment is None:
            raise ValueError("a batch of uint8 images needs a batch augmentation to run on it")
        images, targets = augment(images, aspects, targets)
    else:
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets
