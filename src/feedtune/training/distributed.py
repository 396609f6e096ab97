"""One training run on several processes (``torchrun``): the process group and its collectives.

Every collective the trainer needs goes through a ``Dist``; with one process (``Dist()``, or
``init_from_env`` outside torchrun) each of them is a no-op returning its input, so the trainer
runs the same code either way. No MLflow, no Optuna: rank 0 is told apart by ``is_main`` and the
commands decide what only it does (tracking, checkpoint files).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from feedtune.training.stopping import PeerLost

# What torchrun sets in every process it starts.
WORLD_SIZE_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"
# NCCL's error handling (read when the group starts): 2 aborts the communicators of a
# collective that failed or outlived the group's timeout (the watchdog thread checks every one,
# DDP's gradient all-reduces included) without killing the process, so the next collective or
# wait raises in Python and the command ends with one line and a FAILED run. Torch's default, 3,
# kills the process from the watchdog instead (rank 0's run would stay RUNNING), and
# TORCH_NCCL_BLOCKING_WAIT would make the host wait for every collective (no overlap of the
# step with the GPU) and turns the watchdog's handling off. A value set by the user is kept.
# Only a job on several GPUs exercises this path.
NCCL_ERROR_HANDLING_ENV, NCCL_CLEAN_UP_ONLY = "TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"
# What gloo's errors say (plain RuntimeErrors, raised from gloo's sources) when a peer process
# died (its sockets closed) or did not answer within the group's timeout.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out")
# Gloo's own words when a peer stopped answering, without naming gloo (its pair timed out).
_GLOO_PAIR_LOST = ("application timeout caused pair closure",)

ReduceOp = Literal["sum", "max", "min"]
_OPS = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}


def env_world_size() -> int:
    """How many processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get(WORLD_SIZE_ENV, "1") or 1)


def env_rank() -> int:
    """This process's rank in the torchrun job (0 outside torchrun)."""
    return int(os.environ.get(RANK_ENV, "0") or 0)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``backend`` is None when there is no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints and talks to the tracking store."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """This process's own GPU (``cuda:LOCAL_RANK``) when ``device`` is CUDA: each process
        of a node drives one GPU."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def _tensor(self, value: float) -> torch.Tensor:
        # NCCL reduces CUDA tensors only; gloo CPU tensors.
        where = torch.device("cuda", self.local_rank) if self.backend == "nccl" else "cpu"
        return torch.tensor([value], dtype=torch.float64, device=where)

    def all_reduce(self, value: float, op: ReduceOp = "sum") -> float:
        """``value`` combined over all processes (every process gets the result)."""
        if not self.enabled:
            return float(value)
        tensor = self._tensor(float(value))
        tdist.all_reduce(tensor, op=_OPS[op])
        return float(tensor.item())

    def all_gather(self, obj: Any, group: Any = None) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process (``group``:
        one made by ``cpu_group``, else the job's own)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=group)
        return out

    def require_same_split(self, split_digest: str, group: Any = None) -> None:
        """Every process must split the same images alike, or their shares would not add up
        (``group`` as in ``all_gather``)."""
        digests = self.all_gather(split_digest, group=group)
        if len(set(digests)) > 1:
            raise ValueError(
                f"the {self.world_size} processes split their data differently (split digests "
                f"{sorted(set(digests))}): every machine needs the same data.path contents"
            )

    def broadcast(self, obj: Any, src: int = 0, group: Any = None) -> Any:
        """Rank ``src``'s ``obj`` (picklable) on every process (``group`` as in
        ``all_gather``)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def broadcast_buffers(self, model: nn.Module, src: int = 0) -> None:
        """Rank ``src``'s buffers (BatchNorm running statistics) into every process's ``model``.

        ``DistributedDataParallel`` broadcasts them at the start of each training forward, so
        after an epoch each process holds its own last batch's update; the evaluation of all
        processes and rank 0's checkpoint must see one and the same model."""
        if not self.enabled:
            return
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=src)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def destroy(self) -> None:
        """End the process group (a no-op without one, or when it is already gone)."""
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` (already on ``device``, in its final memory format) as a
        ``DistributedDataParallel``: gradients are averaged over the processes at each step.
        Parameters frozen now are left out of that averaging, so wrap again after unfreezing.
        Unchanged with one process."""
        if not self.enabled:
            return model
        if device.type == "cuda":
            return DistributedDataParallel(
                model, device_ids=[device.index], output_device=device.index
            )
        return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps (its state_dict keys carry no
    ``module.`` prefix, so checkpoints load into a plain model); other models as they are."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def init_from_env(device: torch.device, timeout_s: float = 120) -> Dist:
    """The job's ``Dist``: under torchrun (``WORLD_SIZE`` > 1) the process group is started
    (``nccl`` for CUDA, on ``cuda:LOCAL_RANK``; ``gloo`` on the CPU), once per process: a second
    call returns the group already running. Outside torchrun: one process, no group.

    ``timeout_s`` (``train.dist_timeout_s``) bounds every collective: a process whose peer died
    or hangs gets an error (``group_failure`` words it) instead of waiting forever. Gloo applies
    it to each send and receive, and fails at once when a peer's socket closes; NCCL through
    its watchdog (``NCCL_ERROR_HANDLING_ENV``)."""
    world_size = env_world_size()
    if world_size <= 1:
        return Dist()
    rank = int(os.environ[RANK_ENV])
    local_rank = int(os.environ.get(LOCAL_RANK_ENV, "0"))
    if tdist.is_initialized():
        return Dist(rank, world_size, local_rank, tdist.get_backend())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # object collectives use the current device
        os.environ.setdefault(NCCL_ERROR_HANDLING_ENV, NCCL_CLEAN_UP_ONLY)
    tdist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return Dist(rank, world_size, local_rank, backend)


def cpu_group(dist: Dist, timeout_s: float) -> Any:
    """A gloo group of every process of the job with its own timeout, for Python objects
    passed between pieces of work (CPU tensors, whatever the job's backend): a wait there may
    outlast ``train.dist_timeout_s``. None without a process group. Every process must call
    it, in the same order."""
    if not dist.enabled:
        return None
    return tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def group_failure(exc: BaseException) -> str | None:
    """One line saying that another process of the job died or stopped answering, when
    ``exc`` is how torch.distributed reports that (a ``DistError``; gloo's ``RuntimeError`` on
    a closed connection or a timeout; the training loop's :class:`PeerLost`); None for any
    other error, and outside torchrun."""
    world_size = env_world_size()
    if world_size <= 1 or not isinstance(exc, RuntimeError):
        return None
    if isinstance(exc, PeerLost):  # the training loop's stop, already worded here
        return str(exc)
    text = str(exc)
    lower = text.lower()
    from_gloo = ("gloo" in text and any(p in lower for p in _PEER_LOST)) or any(
        p in lower for p in _GLOO_PAIR_LOST
    )
    if not (isinstance(exc, tdist.DistError) or from_gloo):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # Gloo's messages start with its source position and go on with advice after the cause.
    said = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0] or type(exc).__name__
    return (
        f"process group: another process died or stopped responding (rank {env_rank()} of "
        f"{world_size} got {type(exc).__name__}: {said}); the first error in torchrun's output "
        "says which and why"
    )
