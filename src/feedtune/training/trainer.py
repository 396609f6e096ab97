"""The trainer: one configuration trained on prepared data, checkpointed every epoch.

It knows nothing of MLflow or Optuna: recording and pruning reach it as callbacks (see
``engine.Callback``), run after the checkpoint of each epoch is on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from feedtune.config import Config
from feedtune.feed.cache import CacheMemo
from feedtune.feed.feed import Pipeline, build_pipeline
from feedtune.sources.prepare import PreparedData
from feedtune.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from feedtune.training.devices import resolve_device
from feedtune.training.distributed import Dist, unwrap
from feedtune.training.engine import Callback, TrainState, build_optimizer, fit
from feedtune.training.evaluation import EvalResult, evaluate
from feedtune.training.models import build_model, model_args, num_outputs

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
    state: TrainState
    best: EvalResult
    model: nn.Module
    checkpoint: Path
    pipeline: Pipeline


def train_model(
    cfg: Config,
    data: PreparedData,
    *,
    folder: Path,
    resume: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    model: nn.Module | None = None,
    finetune: bool = False,
    dist: Dist | None = None,
    caches: CacheMemo | None = None,
) -> TrainOutcome:
    """Train ``cfg`` on ``data``, checkpointing into ``folder``; ``resume`` is a checkpoint
    payload to continue from. Returns the best model (weights of the best epoch).

    ``callbacks`` run after each epoch's checkpoint is written (``on_fit_start`` once the data
    pipeline is built). ``model``: start from this model (already sized to ``data.classes``
    and frozen as wanted) instead of a fresh ``build_model(cfg.model)``; ``finetune``: the
    backbone learns at ``train.lr * train.backbone_lr_scale``.

    ``dist``: this process's place among several (torchrun). Each trains on its share of every
    epoch, on its own GPU when CUDA; only the main process writes checkpoints into ``folder``
    (the others' stays empty) and each receives the best weights from it at the end. Every
    process gets the same metrics, and the plain (unwrapped) model.

    ``caches``: image caches kept between calls (a study's trials; see ``build_pipeline``)."""
    dist = dist or Dist()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    device = dist.device(resolve_device(cfg.train.device))
    pipeline = build_pipeline(
        cfg,
        data,
        cuda=device.type == "cuda",
        rank=dist.rank,
        world_size=dist.world_size,
        caches=caches,
    )
    if model is None:
        model = build_model(cfg.model, num_classes=len(data.classes))
    elif num_outputs(model) != len(data.classes):
        raise ValueError(
            f"the model has {num_outputs(model)} outputs but the data has "
            f"{len(data.classes)} classes; replace its head first (models.replace_head)"
        )
    optimizer = build_optimizer(model, cfg.train, finetune=finetune)
    state = None
    if resume is not None:
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        state = train_state_from(resume)
        set_rng_state(resume["rng"])
    for cb in callbacks:
        cb.on_fit_start(pipeline, resumed=resume is not None)
    own: list[Callback] = [
        EpochSeeding(pipeline.generators, cfg.seed, sampler=pipeline.sampler, rank=dist.rank)
    ]
    if dist.is_main:
        own.append(Checkpointing(cfg, data.classes, folder))
    try:
        state = fit(
            model,
            pipeline.train_loader,
            pipeline.val_loader,
            cfg.train,
            num_classes=len(data.classes),
            optimizer=optimizer,
            device=device,
            state=state,
            callbacks=[*own, *callbacks],
            progress=progress,
            metric=cfg.search.metric,
            augment=pipeline.batch_augment,
            dist=dist,
        )
    except BaseException:
        # A pruned trial, a deadline, Ctrl-C: the exception's traceback keeps the loaders
        # alive in a reference cycle, so stop their workers now (see Pipeline.close).
        pipeline.close()
        raise
    best_path = folder / BEST
    best_state = load_checkpoint(best_path)["model_state"] if dist.is_main else None
    model.load_state_dict(dist.broadcast(best_state))
    best = evaluate(
        model,
        pipeline.val_loader,
        nn.CrossEntropyLoss(),
        device=device,
        num_classes=len(data.classes),
        progress=False,
        dist=dist,
    )
    return TrainOutcome(
        state=state,
        best=best,
        model=model,
        checkpoint=best_path,
        pipeline=pipeline,
    )
