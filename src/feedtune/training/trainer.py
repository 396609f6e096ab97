"""The trainer: one configuration trained from its Feed, checkpointed every epoch.

It knows nothing of MLflow or Optuna: recording and pruning reach it as callbacks (see
``engine.Callback``), run after the checkpoint of each epoch is on disk.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from feedtune.config import Config, TrainConfig
from feedtune.feed.feed import Feed
from feedtune.progress import progress_bar
from feedtune.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from feedtune.training.devices import prepare_model
from feedtune.training.distributed import Dist, group_failure, unwrap
from feedtune.training.engine import (
    Callback,
    EpochStats,
    LrSchedule,
    TrainState,
    build_optimizer,
    combined_stats,
    end_epoch,
    epoch_metrics,
    len_or_none,
    train_one_epoch,
)
from feedtune.training.evaluation import EvalResult, evaluate
from feedtune.training.models import build_model, model_args, num_outputs, set_backbone_trainable
from feedtune.training.stopping import LOST_PEER, PATIENCE, PeerLost, StopRequest, current

LAST, BEST = "last.pt", "best.pt"


class EpochSeeding(Callback):
    """Reseed the sampler and worker seeds from (seed, epoch): an epoch draws the same
    samples and augmentations whether or not the run was resumed before it.

    With several processes the first generator (the sampler's) is seeded alike on all of them,
    since they share one draw per epoch; the others (workers', batch augmentation's) are
    offset by ``rank``, so that no two processes augment with the same random stream. A
    ``sampler`` that shuffles by epoch itself (``DistributedSampler``) is given the epoch."""

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        seed: int,
        *,
        sampler: Any = None,
        rank: int = 0,
    ) -> None:
        self.generators = generators
        self.seed = seed
        self.sampler = sampler
        self.rank = rank

    def on_epoch_start(self, epoch: int) -> None:
        for i, gen in enumerate(self.generators):
            offset = self.rank * 100_003 if i else 0
            gen.manual_seed(self.seed * 1_000_003 + epoch * 97 + i + offset)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class Checkpointing(Callback):
    """Each epoch: write ``last.pt``, and ``best.pt`` when the epoch improved, into ``folder``.

    A checkpoint holds what reuse needs (weights, ``model_args``, classes, config, metrics) and
    what resuming needs (optimizer, training state, RNG states)."""

    def __init__(self, cfg: Config, classes: list[str], folder: Path) -> None:
        self.cfg = cfg
        self.classes = classes
        self.folder = folder

    def payload(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        metrics: dict[str, float],
    ) -> dict[str, Any]:
        state_dict = unwrap(model).state_dict()  # no ``module.`` prefix: loads into a plain model
        return {
            "model_state": {k: v.detach().cpu() for k, v in state_dict.items()},
            "model_args": model_args(self.cfg.model),
            "classes": self.classes,
            "config": self.cfg.to_dict(),
            "epoch": state.epoch,
            "metrics": metrics,
            "optimizer_state": optimizer.state_dict(),
            "train_state": {
                "epoch": state.epoch,
                "history": state.history,
                "best_metric": state.best_metric,
                "best_epoch": state.best_epoch,
                "stale_epochs": state.stale_epochs,
            },
            "rng": rng_state(),
        }

    def on_epoch_end(self, epoch, metrics, *, state, model, optimizer, evaluation, improved):
        payload = self.payload(model, optimizer, state, metrics)
        save_checkpoint(payload, self.folder / LAST)
        if improved:
            save_checkpoint(payload, self.folder / BEST)


def train_state_from(payload: dict[str, Any]) -> TrainState:
    return TrainState(**payload["train_state"])


@dataclass
class TrainOutcome:
    """How training went; the caller's model now holds the best epoch's weights."""

    state: TrainState
    best: EvalResult
    checkpoint: Path
    # ``best.pt`` as read once to restore the best weights (the main process's; None on the
    # others): what the recording logs as the model, without reading the file again.
    payload: dict[str, Any] | None = None


def train_model(
    cfg: Config,
    feed: Feed,
    *,
    model: nn.Module,
    folder: Path,
    resume: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    finetune: bool = False,
    dist: Dist | None = None,
    stop: StopRequest | None = None,
) -> TrainOutcome:
    """Train ``model`` (the caller's: ``new_model``, or one sized to the feed's classes and
    frozen as wanted, after ``seed_run``) with ``cfg`` on ``feed`` (``resume``: a checkpoint
    payload to continue from), evaluating and checkpointing into ``folder`` every epoch; it
    ends with the best epoch's weights on ``search.metric`` (patience follows it too).

    ``callbacks`` run after each epoch's checkpoint is written; one raising
    :class:`StopTraining` ends training on every process and propagates (the caller closes
    the feed). ``finetune``: the backbone learns at ``train.lr * train.backbone_lr_scale``.
    ``dist``: this process's place under torchrun, ``feed`` its share; the model trains in
    ``DistributedDataParallel``, only the main process writes checkpoints, every process sees
    the same metrics and gets the best weights. ``stop`` (default: ``stopping.current()``)
    is checked at every step and epoch boundary; a lost peer becomes its ``lost_peer``."""
    dist = dist or Dist()
    stop = stop or current()
    run = _start(cfg, feed, model, resume, finetune=finetune, dist=dist)
    callbacks = [*_own_callbacks(cfg, feed, folder, dist), *callbacks]
    for cb in callbacks:
        cb.on_fit_start(resumed=resume is not None)
    train_cfg, state = cfg.train, run.state
    epochs = _epochs_bar(state, train_cfg, progress=progress)
    try:
        for epoch in epochs:
            stop.check()
            _start_epoch(run, epoch, callbacks, train_cfg, dist, feed.device)
            stats = train_one_epoch(
                run.net,
                feed.train,
                run.optimizer,
                run.loss_fn,
                scaler=run.scaler,
                amp=run.amp,
                max_steps=train_cfg.max_steps_per_epoch,
                progress=progress,
                desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                set_lr=functools.partial(run.schedule.set, epoch),
                stop=stop,
            )
            result = _close_epoch(run, cfg, feed, epoch, stats, callbacks, dist, progress=progress)
            epochs.set_postfix(val_f1=f"{result.f1_macro:.3f}", best=f"{state.best_metric:.3f}")
            if _ends_here(state, cfg, stop):
                break
    except RuntimeError as exc:
        _stop_on_lost_peer(stop, exc)
        raise
    finally:
        epochs.close()
    return _finish(run, feed, folder, dist)


def _stop_on_lost_peer(stop: StopRequest, exc: RuntimeError) -> None:
    """A collective of the loop (a step's gradients, an epoch's metrics or stop) failed
    because another process died or stopped answering: ``stop`` says so (``lost_peer``) and
    raises :class:`PeerLost`, caused by that error. Any other error is left to propagate."""
    lost = group_failure(exc)
    if not lost or isinstance(exc, PeerLost):
        return
    stop.request(LOST_PEER, lost)
    try:
        stop.check()
    except PeerLost as peer:
        raise peer from exc


def _ends_here(state: TrainState, cfg: Config, stop: StopRequest) -> bool:
    """At an epoch's end (checkpointed and recorded): ``train.patience`` spent asks ``stop``
    for a normal end; any other stop asked for (a signal's) is raised here. Whether training
    ends normally now."""
    if state.patience_spent(cfg.train.patience):
        stop.request(PATIENCE, f"no better {cfg.search.metric} in {cfg.train.patience} epochs")
    stop.check()
    if not stop.finished:
        return False
    state.stopped = stop.reason
    stop.clear()  # a normal end: the command's request serves what runs next (a study's trial)
    return True


def _epochs_bar(state: TrainState, cfg: TrainConfig, *, progress: bool) -> Any:
    return progress_bar(
        range(state.epoch, cfg.epochs),
        desc="epochs",
        unit="epoch",
        initial=state.epoch,
        total=cfg.epochs,
        enabled=progress,
        per_item_lines=True,
    )


@dataclass
class _Run:
    """What the epochs of one training share."""

    model: nn.Module
    net: nn.Module  # ``model``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    state: TrainState
    schedule: LrSchedule
    loss_fn: nn.Module
    amp: bool
    scaler: torch.amp.GradScaler | None


def _start(
    cfg: Config,
    feed: Feed,
    model: nn.Module,
    resume: dict[str, Any] | None,
    *,
    finetune: bool,
    dist: Dist,
) -> _Run:
    model = _starting_model(model, len(feed.classes), finetune=finetune)
    optimizer = build_optimizer(model, cfg.train, finetune=finetune, world_size=dist.world_size)
    state = TrainState()
    if resume is not None:
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        state = train_state_from(resume)
        set_rng_state(resume["rng"])
    prepare_model(model, feed.device, channels_last=cfg.train.channels_last)
    amp = cfg.train.amp and feed.device.type == "cuda"
    return _Run(
        model=model,
        net=dist.wrap(model, feed.device),
        optimizer=optimizer,
        state=state,
        schedule=LrSchedule(optimizer, cfg.train, _steps_per_epoch(feed.train, cfg.train)),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        amp=amp,
        scaler=torch.amp.GradScaler("cuda") if amp else None,
    )


def _steps_per_epoch(train: Any, cfg: TrainConfig) -> int:
    steps = len_or_none(train) or 0
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps or cfg.max_steps_per_epoch, cfg.max_steps_per_epoch)
    return steps


def _own_callbacks(cfg: Config, feed: Feed, folder: Path, dist: Dist) -> list[Callback]:
    own: list[Callback] = [
        EpochSeeding(feed.generators, cfg.seed, sampler=feed.sampler, rank=dist.rank)
    ]
    if dist.is_main:
        own.append(Checkpointing(cfg, feed.classes, folder))
    return own


def _start_epoch(
    run: _Run,
    epoch: int,
    callbacks: Sequence[Callback],
    cfg: TrainConfig,
    dist: Dist,
    device: torch.device,
) -> None:
    if cfg.unfreeze_after and epoch == cfg.unfreeze_after:
        set_backbone_trainable(run.model, True)
        run.net = dist.wrap(run.model, device)  # the new trainable parameters join the averaging
    for cb in callbacks:
        cb.on_epoch_start(epoch)


def _close_epoch(
    run: _Run,
    cfg: Config,
    feed: Feed,
    epoch: int,
    stats: EpochStats,
    callbacks: Sequence[Callback],
    dist: Dist,
    *,
    progress: bool,
) -> EvalResult:
    """Validate the epoch, record it in the state and run the callbacks (checkpoint first;
    one may stop training); the epoch's evaluation."""
    result = _validate(run, feed, dist, progress=progress)
    metrics = epoch_metrics(combined_stats(stats, dist), result, run.optimizer)
    improved = run.state.record(epoch, metrics, cfg.search.metric)
    context = {"model": run.model, "optimizer": run.optimizer, "evaluation": result}
    end_epoch(callbacks, epoch, metrics, run.state, improved, context, dist)  # may stop
    return result


def _validate(run: _Run, feed: Feed, dist: Dist, *, progress: bool) -> EvalResult:
    """The epoch's evaluation of the whole validation set (every process's share gathered)."""
    dist.broadcast_buffers(run.model)
    return evaluate(
        run.model,
        feed.val,
        nn.CrossEntropyLoss(),
        device=feed.device,
        num_classes=len(feed.classes),
        amp=run.amp,
        progress=progress,
        dist=dist,
    )


def _finish(run: _Run, feed: Feed, folder: Path, dist: Dist) -> TrainOutcome:
    """The best epoch's weights (from ``best.pt``, on every process) and their evaluation."""
    best_path = folder / BEST
    payload = load_checkpoint(best_path) if dist.is_main else None
    run.model.load_state_dict(dist.broadcast(payload["model_state"] if payload else None))
    best = evaluate(
        run.model,
        feed.val,
        nn.CrossEntropyLoss(),
        device=feed.device,
        num_classes=len(feed.classes),
        progress=False,
        dist=dist,
    )
    return TrainOutcome(state=run.state, best=best, checkpoint=best_path, payload=payload)


def seed_run(cfg: Config) -> None:
    """Seed torch and numpy from ``cfg.seed``: a run's random stream starts here, before its
    model is built (``new_model``) or after a given one is prepared."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)


def new_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model a run of ``cfg`` trains from scratch, for ``train_model(model=...)``: built
    first on the run's seeded stream, which training then continues."""
    seed_run(cfg)
    return build_model(cfg.model, num_classes=num_classes)


def _starting_model(model: nn.Module, num_classes: int, *, finetune: bool) -> nn.Module:
    """``model``, checked when it comes from another run (finetuning): a head sized for other
    classes must be replaced first. A new model is sized by ``new_model``, and may have no
    head that ``num_outputs`` can name (a factory's plain Sequential)."""
    if finetune and num_outputs(model) != num_classes:
        raise ValueError(
            f"the model has {num_outputs(model)} outputs but the data has {num_classes} "
            "classes; replace its head first (models.replace_head)"
        )
    return model
