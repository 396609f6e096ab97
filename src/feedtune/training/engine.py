"""Training loop: one train step, one epoch, and ``fit`` (train, evaluate, early stopping).

It reports through callbacks and imports neither mlflow nor optuna, so the same loop serves
``train``, ``tune`` trials and ``finetune``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from feedtune.config import TrainConfig
from feedtune.progress import progress_bar
from feedtune.training.devices import (
    BatchAugment,
    autocast,
    is_channels_last,
    prepare_model,
    to_device,
)
from feedtune.training.distributed import Dist
from feedtune.training.evaluation import EvalResult, evaluate
from feedtune.training.models import head_parameters, set_backbone_trainable

# Steps between updates of the progress bar's loss (each update waits for the device).
POSTFIX_EVERY = 20


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a callback to end ``fit`` early (e.g. a pruned trial)."""


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
    """Everything ``fit`` needs to continue where it stopped (stored in checkpoints)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0


class Callback:
    """Hooks called by ``fit`` (and ``on_fit_start`` by ``trainer.train_model``); override
    what you need."""

    def on_fit_start(self, pipeline: Any, *, resumed: bool) -> None:
        """The data pipeline is built and training is about to start (or resume)."""

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
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "train",
    set_lr: Callable[[int], None] | None = None,
    augment: BatchAugment | None = None,
) -> EpochStats:
    """One pass over ``loader``; times how long each step waited for its batch.

    ``set_lr(step)`` is called before each optimizer step (the learning-rate schedule)."""
    model.train()
    channels_last = is_channels_last(model)
    loss_sum = torch.zeros((), device=device)
    samples, steps, wait = 0, 0, 0.0
    total = max_steps if max_steps is not None else _len_or_none(loader)
    bar = progress_bar(
        total=total, desc=desc, unit="batch", enabled=progress, leave=False, bar_only=True
    )
    start = time.perf_counter()
    iterator = iter(loader)
    while max_steps is None or steps < max_steps:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        if batch is None:  # every sample of the batch was a bad image
            continue
        images, targets = to_device(batch, device, channels_last, augment)
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()
    del iterator  # shuts non-persistent workers down now rather than at garbage collection
    return EpochStats(
        loss=loss_sum.item() / max(1, samples),
        samples=samples,
        steps=steps,
        seconds=seconds,
        data_wait_s=wait,
    )


def _len_or_none(loader: Iterable[Any]) -> int | None:
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


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, *, finetune: bool = False
) -> torch.optim.Optimizer:
    """AdamW or SGD; when finetuning, the backbone learns at ``lr * backbone_lr_scale``.

    Frozen parameters stay in the optimizer (their grads are None, so they do not move) so that
    unfreezing later needs no new optimizer and resuming restores one consistent state.
    """
    head_ids = {id(p) for p in head_parameters(model)}
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    scale = cfg.backbone_lr_scale if finetune else 1.0
    groups = [
        {"params": backbone, "lr": cfg.lr * scale, "name": "backbone"},
        {"params": head, "lr": cfg.lr, "name": "head"},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    cfg: TrainConfig,
    *,
    num_classes: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    state: TrainState | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    metric: str = "val_f1_macro",
    augment: BatchAugment | None = None,
    dist: Dist | None = None,
) -> TrainState:
    """Train for ``cfg.epochs`` from ``state.epoch``, early-stopping on ``metric``.

    ``augment``: the batch augmentation for train loaders that deliver uint8 batches.
    ``dist``: one of several processes (torchrun); ``model`` then trains wrapped in
    ``DistributedDataParallel`` on this process's share of each epoch, ``train_loader`` and
    ``val_loader`` being its shares, and every process sees the same metrics: the epoch's
    samples of all processes and the evaluation of the whole validation set. Callbacks get the
    plain ``model`` either way."""
    state = state or TrainState()
    dist = dist or Dist()
    prepare_model(model, device, channels_last=cfg.channels_last)
    net = dist.wrap(model, device)
    amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    epochs = progress_bar(
        range(state.epoch, cfg.epochs),
        desc="epochs",
        unit="epoch",
        initial=state.epoch,
        total=cfg.epochs,
        enabled=progress,
        per_item_lines=True,
    )
    steps_per_epoch = _len_or_none(train_loader) or 0
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch or cfg.max_steps_per_epoch, cfg.max_steps_per_epoch)
    schedule = LrSchedule(optimizer, cfg, steps_per_epoch)
    for epoch in epochs:
        if cfg.unfreeze_after and epoch == cfg.unfreeze_after:
            set_backbone_trainable(model, True)
            net = dist.wrap(model, device)  # the new trainable parameters join the averaging
        for cb in callbacks:
            cb.on_epoch_start(epoch)
        stats = train_one_epoch(
            net,
            train_loader,
            optimizer,
            loss_fn,
            device=device,
            scaler=scaler,
            amp=amp,
            max_steps=cfg.max_steps_per_epoch,
            progress=progress,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            set_lr=functools.partial(schedule.set, epoch),
            augment=augment,
        )
        stats = combined_stats(stats, dist)
        dist.broadcast_buffers(model)
        result = evaluate(
            model,
            val_loader,
            eval_loss,
            device=device,
            num_classes=num_classes,
            amp=amp,
            progress=progress,
            dist=dist,
        )
        metrics = {
            "train_loss": stats.loss,
            "val_loss": result.loss,
            "val_acc": result.acc,
            "val_f1_macro": result.f1_macro,
            "epoch_samples_per_s": stats.samples_per_s,
            "epoch_data_wait_frac": stats.data_wait_frac,
            "lr": optimizer.param_groups[-1]["lr"],  # the head's, at the epoch's last step
        }
        value = metrics[metric]
        improved = value > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.stale_epochs = value, epoch, 0
        else:
            state.stale_epochs += 1
        state.epoch = epoch + 1
        state.history.append({"epoch": epoch, **metrics})
        epochs.set_postfix(val_f1=f"{result.f1_macro:.3f}", best=f"{state.best_metric:.3f}")
        stop = False
        try:
            for cb in callbacks:
                cb.on_epoch_end(
                    epoch,
                    metrics,
                    state=state,
                    model=model,
                    optimizer=optimizer,
                    evaluation=result,
                    improved=improved,
                )
        except StopTraining:
            stop = True
        if dist.all_reduce(float(stop), "max"):  # one process's stop ends them all
            break
        if cfg.patience and state.stale_epochs >= cfg.patience:
            break
    epochs.close()
    return state
