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
        self._host: Iterator[Any] | None = None  # the host loader's iterator, for ``close``

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.host_batches():
            yield self.to_device(batch)

    def host_batches(self) -> Iterator[Any]:
        """One pass of the host loader's batches, not yet moved (``to_device`` moves one):
        the feed's side alone, as a probe times it. Empty batches are skipped; ``close``
        stops the workers of the pass."""
        self.wait_s = 0.0
        iterator = self._host = iter(self.loader)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self.wait_s += time.perf_counter() - t0
                if batch is not None:
                    yield batch
        finally:
            if not getattr(self.loader, "persistent_workers", False):
                # A pass's own workers stop with it (when its iterator is freed), not at close.
                self._host = iterator = None

    def close(self) -> None:
        """Stop the worker processes of the host iterator this loader started, now.

        Left to the garbage collector, a loader caught in a reference cycle (an exception's
        traceback holds the training frames) can be finalized after its own queues: its
        workers never receive the order to stop, and each costs a 5 s join timeout before it
        is killed (measured: 20 s after every pruned trial with 2+2 workers). DataLoader has
        no public close; its iterator's shutdown is the one that ``del`` would run. The
        persistent workers' iterator is the loader's own: a closed loader is not iterated
        again."""
        iterator, self._host = self._host, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

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
