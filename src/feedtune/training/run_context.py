"""What one command runs with, made once at the command's edge and passed down: the device
this process trains on, its place in a torchrun job, the seed and the stop request.

Nothing below ``commands/`` resolves a device or starts a process group again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from feedtune.config import Config
from feedtune.training.devices import resolve_device
from feedtune.training.distributed import Dist, init_from_env
from feedtune.training.stopping import StopRequest, current


@dataclass(frozen=True)
class RunContext:
    """One command's process: ``device`` (under torchrun, this process's own GPU), ``dist``
    (its place in the job; one process alone outside torchrun), ``seed`` (the config's) and
    ``stop`` (the command's stop request: SIGINT, SIGTERM)."""

    device: torch.device
    dist: Dist
    seed: int
    stop: StopRequest


@contextlib.contextmanager
def run_context(cfg: Config, *, stop: StopRequest | None = None) -> Iterator[RunContext]:
    """The context of a command that trains ``cfg``: ``train.device`` resolved (``auto``:
    CUDA when available), under torchrun the process group started (and ended on leaving),
    ``stop`` (default: the command's, ``stopping.current()``)."""
    device = resolve_device(cfg.train.device)
    dist = init_from_env(device, cfg.train.dist_timeout_s)
    try:
        yield RunContext(dist.device(device), dist, cfg.seed, stop or current())
    finally:
        dist.destroy()
