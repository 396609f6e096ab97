"""The training loop's parts: one train step, one epoch, the learning-rate schedule and the
callbacks; ``trainer.train_model`` runs the epochs. Every stop (a signal, a callback's
``stopping.StopTraining``) goes through one ``stopping.StopRequest``, checked at step and
epoch boundaries.

It reports through callbacks and imports neither mlflow nor optuna, so the same loop serves
``train``, ``tune`` trials and ``finetune``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from feedtune.config import TrainConfig
from feedtune.feed.device_loader import DeviceLoader
from feedtune.progress import progress_bar
from feedtune.training.devices import autocast
from feedtune.training.distributed import Dist
from feedtune.training.evaluation import EvalResult
from feedtune.training.models import head_parameters, optimizer_head_parameters
from feedtune.training.stopping import STOP_REASONS, StopRequest, StopTraining, current

# Steps between updates of the progress bar's loss (each update waits for the device).
POSTFIX_EVERY = 20


@dataclass
class EpochStats:
    loss: float
    samples: int
    steps: int
    seconds: float
    data_wait_s: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_frac(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainState:
    """Everything training needs to continue where it stopped (stored in checkpoints)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    stopped: str = ""  # why training ended before train.epochs: patience, pruned, deadline

    def patience_spent(self, patience: int) -> bool:
        """Whether ``patience`` epochs (0: never) passed without improvement: early stopping."""
        return bool(patience) and self.stale_epochs >= patience

    def record(self, epoch: int, metrics: dict[str, float], metric: str) -> bool:
        """Add an epoch's metrics; whether it improved on the best ``metric`` so far."""
        value = metrics[metric]
        improved = value > self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.stale_epochs = value, epoch, 0
        else:
            self.stale_epochs += 1
        self.epoch = epoch + 1
        self.history.append({"epoch": epoch, **metrics})
        return improved


class Callback:
    """Hooks called by ``trainer.train_model``; override what you need."""

    def on_fit_start(self, *, resumed: bool) -> None:
        """Training is about to start (or resume)."""

    def on_epoch_start(self, epoch: int) -> None: ...

    def on_epoch_end(
        self,
        epoch: int,
        metrics: dict[str, float],
        *,
        state: TrainState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        evaluation: EvalResult,
        improved: bool,
    ) -> None: ...


def lr_factor(schedule: str, step: int, total_steps: int, warmup_frac: float) -> float:
    """Multiplier of each parameter group's base learning rate at ``step`` (0-based).

    A pure function of the step, so a resumed run continues on the same curve without any
    scheduler state in the checkpoint."""
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    warmup = int(round(warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class LrSchedule:
    """Sets ``lr = base_lr * lr_factor(...)`` for every group before each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def set(self, epoch: int, step: int) -> None:
        factor = lr_factor(
            self.cfg.lr_schedule,
            epoch * self.steps_per_epoch + step,
            self.cfg.epochs * self.steps_per_epoch,
            self.cfg.warmup_frac,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """One optimizer step on a batch already on the device; returns the (detached) loss.

    The one training step of feedtune: epochs and throughput probes both call it, so a probe
    measures exactly what training does."""
    device = images.device
    with autocast(device, amp):
        loss = loss_fn(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    batches: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "train",
    set_lr: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> EpochStats:
    """One pass over ``batches`` (device-ready); its ``wait_s`` is how long the pass waited
    for the host loader.

    ``set_lr(step)`` is called before each optimizer step (the learning-rate schedule);
    ``stop`` (default: the command's, ``stopping.current()``) is checked before the first
    step and after each one."""
    stop = stop or current()
    stop.check()
    model.train()
    device = batches.device
    loss_sum = torch.zeros((), device=device)
    samples, steps = 0, 0
    total = max_steps if max_steps is not None else len_or_none(batches)
    bar = progress_bar(
        total=total, desc=desc, unit="batch", enabled=progress, leave=False, bar_only=True
    )
    start = time.perf_counter()
    iterator = iter(batches)
    for images, targets in iterator:
        if set_lr is not None:
            set_lr(steps)
        loss = train_step(model, optimizer, loss_fn, images, targets, scaler=scaler, amp=amp)
        n = targets.shape[0]
        # Summed on the device: reading the loss every step (``.item()``) would make the host
        # wait for each step to finish before it fetches and hands over the next batch.
        loss_sum += loss.float() * n
        samples += n
        steps += 1
        bar.update(1)
        if steps % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / samples:.3f}")
        stop.check()
        if max_steps is not None and steps >= max_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()
    iterator.close()  # shuts non-persistent workers down now rather than at garbage collection
    return EpochStats(
        loss=loss_sum.item() / max(1, samples),
        samples=samples,
        steps=steps,
        seconds=seconds,
        data_wait_s=batches.wait_s,
    )


def len_or_none(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def combined_stats(stats: EpochStats, dist: Dist | None) -> EpochStats:
    """One epoch's stats for all processes together: every sample any process trained on,
    over the time of the slowest (the processes wait for each other at every step), and the
    longest wait for batches (a process that starves holds all the others)."""
    if dist is None or not dist.enabled:
        return stats
    rows = dist.all_gather((stats.loss, stats.samples, stats.seconds, stats.data_wait_s))
    samples = sum(r[1] for r in rows)
    return EpochStats(
        loss=sum(r[0] * r[1] for r in rows) / max(1, samples),
        samples=samples,
        steps=stats.steps,
        seconds=max(r[2] for r in rows),
        data_wait_s=max(r[3] for r in rows),
    )


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """``train.lr`` scaled by ``train.lr_scaling`` for a global batch ``world_size`` times the
    per-process ``loader.batch_size``."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}
    return cfg.lr * factor[cfg.lr_scaling]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, *, finetune: bool = False, world_size: int = 1
) -> torch.optim.Optimizer:
    """AdamW or SGD at ``scaled_lr`` (the processes' global batch); when finetuning, the
    backbone learns at that rate times ``backbone_lr_scale``.

    Frozen parameters stay in the optimizer (their grads are None, so they do not move) so that
    unfreezing later needs no new optimizer and resuming restores one consistent state.

    A model whose head feedtune cannot find by name (a user's ``nn.Sequential``) trains too:
    its last ``nn.Linear`` is the head group, or, with none, one group holds every parameter.
    Finetuning and ``train.unfreeze_after`` need the named head and say so.
    """
    head_ids = _head_ids(model, cfg, finetune=finetune)
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    lr = scaled_lr(cfg, world_size)
    scale = cfg.backbone_lr_scale if finetune else 1.0
    groups = [
        {"params": backbone, "lr": lr * scale, "name": "backbone"},
        {"params": head, "lr": lr, "name": "head"},
    ]
    if not head:
        groups = [{"params": backbone, "lr": lr, "name": "all"}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def _head_ids(model: nn.Module, cfg: TrainConfig, *, finetune: bool) -> set[int]:
    """Ids of the head group's parameters; the named head's where the run needs that one."""
    if not (finetune or cfg.unfreeze_after):
        return {id(p) for p in optimizer_head_parameters(model)}
    try:
        return {id(p) for p in head_parameters(model)}
    except ValueError as exc:
        why = "finetuning" if finetune else f"train.unfreeze_after={cfg.unfreeze_after}"
        raise ValueError(f"{why}: {exc}") from exc


def epoch_metrics(
    stats: EpochStats, result: EvalResult, optimizer: torch.optim.Optimizer
) -> dict[str, float]:
    return {
        "train_loss": stats.loss,
        "val_loss": result.loss,
        "val_acc": result.acc,
        "val_f1_macro": result.f1_macro,
        "epoch_samples_per_s": stats.samples_per_s,
        "epoch_data_wait_frac": stats.data_wait_frac,
        "lr": optimizer.param_groups[-1]["lr"],  # the head's, at the epoch's last step
    }


def end_epoch(
    callbacks: Sequence[Callback],
    epoch: int,
    metrics: dict[str, float],
    state: TrainState,
    improved: bool,
    context: dict[str, Any],
    dist: Dist,
) -> None:
    """Run the callbacks' ``on_epoch_end``; raise the stop one of them (on any process) asked
    for, on every process, through one :class:`StopRequest`.

    Every process learns of a stop (a collective), so none waits at the next epoch's first
    collective for a process that has left."""
    stop = StopRequest()
    try:
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics, state=state, improved=improved, **context)
    except StopTraining as exc:
        stop.request(exc.reason, str(exc))
    code = dist.all_reduce(float(STOP_REASONS.index(stop.reason)), "max")
    if code:
        stop.request(STOP_REASONS[int(code)], "another process stopped training")
        state.stopped = stop.reason
    stop.check()
