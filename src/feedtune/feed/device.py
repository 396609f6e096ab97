"""The last step of the feed: a host loader's batches moved to the training device, ready for
the model (timm's ``PrefetchLoader`` pattern). What runs there (the batch policy of
``augment.where: batch`` on a GPU, then the mix) lives here too, so the training loop only
iterates."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

# (images, targets) -> (the model's float input, its targets). ``images`` is a float batch, or
# ``(uint8 squares, aspect ratios)`` for the batch policy; targets leave as labels, or as soft
# targets [B, K] when ``augment.mix`` blends the batch (``augment.mixing.AugmentThenMix``).
BatchStep = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class DeviceLoader:
    """Iterates ``loader`` and yields ``(images, targets)`` on ``device``.

    Batches collated as ``(uint8, aspects)`` travel as uint8 (a quarter of float32's bytes)
    and ``device_step`` turns them into the model's input there. ``channels_last``: the
    model's memory format, which its input then shares. Batches that are None (every sample a
    bad image) are skipped. ``wait_s`` is how long the current (or last) pass has waited for
    the host loader: the feed's side of the time, apart from the device step, which is the
    model's side."""

    def __init__(
        self,
        loader: Iterable[Any],
        device: torch.device,
        *,
        device_step: BatchStep | None = None,
        channels_last: bool = False,
    ) -> None:
        self.loader = loader
        self.device = device
        self.device_step = device_step
        self.channels_last = channels_last
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.wait_s = 0.0
        iterator = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t0
            if batch is not None:
                yield self.to_device(batch)

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One host batch on the device, through the device step when there is one."""
        images, targets = batch
        non_blocking = self.device.type == "cuda"  # overlaps the copy when memory is pinned
        targets = targets.to(self.device, non_blocking=non_blocking)
        if isinstance(images, (list, tuple)):
            if self.device_step is None:
                raise ValueError("a batch of uint8 images needs a batch policy to run on it")
            uint8, aspects = images
            images, targets = self.device_step(
                (uint8.to(self.device, non_blocking=non_blocking), aspects), targets
            )
        else:
            images = images.to(self.device, non_blocking=non_blocking)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets


def on_device(
    batches: Iterable[Any], device: torch.device, *, channels_last: bool = False
) -> DeviceLoader:
    """``batches`` as a :class:`DeviceLoader` (returned as is when it is one already): lets the
    training loop take a plain DataLoader of float batches too."""
    if isinstance(batches, DeviceLoader):
        return batches
    return DeviceLoader(batches, device, channels_last=channels_last)
