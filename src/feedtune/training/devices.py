"""Where tensors live: the training device and the model's memory format (moving batches there
is the feed's last step, ``feed.device_loader``)."""

from __future__ import annotations

import contextlib

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
