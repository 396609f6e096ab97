"""``feedtune finetune``: carry a logged model to a new dataset (transfer learning).

The source run's ``checkpoints/best.pt`` (read with ``weights_only=True``) gives the
architecture and the weights; the new configuration gives everything else: the dataset, the
augmentation, the loader, ``model.freeze``, ``train.unfreeze_after`` and the learning rates
(the backbone learns at ``train.lr * train.backbone_lr_scale``). The head is replaced when the
new dataset's classes differ from the source's (same names in the same order keep it). The run
is a normal training run (every artifact of ``feedtune train``) tagged ``feedtune.kind=finetune``
and ``feedtune.parent_model_run_id=<source run>``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feedtune.config import DEFAULT_EXPERIMENT, Config, with_overrides
from feedtune.feed.auto import resolve_auto
from feedtune.feed.feed import build_feed
from feedtune.sources.prepare import prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tracking.lookup import fetch_checkpoint, resolve_run_id
from feedtune.tracking.recording import RunRecorder, finish_run
from feedtune.training.checkpoint import (
    model_args_of,
    model_from_checkpoint,
    require_trusted_factory,
)
from feedtune.training.models import replace_head, set_backbone_trainable
from feedtune.training.run_context import run_context
from feedtune.training.trainer import seed_run, train_model

log = logging.getLogger(__name__)


@dataclass
class FinetuneStart:
    """The model a finetune starts from, ready for ``trainer.train_model(model=...)``."""

    model: nn.Module
    head_replaced: bool
    source_classes: list[str]


def effective_config(cfg: Config, payload: dict[str, Any]) -> Config:
    """``cfg`` with the source checkpoint's architecture (``model_args``): its weights fit no
    other, and the run's params must say what ran.

    ``model.pretrained`` becomes false: the weights come from the parent run (tag
    ``feedtune.parent_model_run_id``), not from torchvision or timm. A source built by a
    factory is refused unless ``cfg`` names the same factory: this is where the checkpoint's
    name would replace the caller's."""
    source = model_args_of(payload)
    require_trusted_factory(source["name"], cfg.model.name, where="the source checkpoint")
    for key, value in source.items():
        if getattr(cfg.model, key) != value:
            log.warning(
                "model.%s %r ignored: finetuning keeps the source run's %r",
                key,
                getattr(cfg.model, key),
                value,
            )
    overrides = {f"model.{key}": value for key, value in source.items()}
    return with_overrides(cfg, {**overrides, "model.pretrained": False})


def prepare_model(payload: dict[str, Any], cfg: Config, classes: list[str]) -> FinetuneStart:
    """Rebuild the checkpoint's model, give it a new head when ``classes`` differ from the
    checkpoint's, and freeze the backbone when ``cfg.model.freeze == 'backbone'``.

    The architecture is the checkpoint's; the other model settings (dropout) are ``cfg``'s. The
    new head's initial weights depend only on ``cfg.seed``."""
    model, _ = model_from_checkpoint(
        payload, allowed_factory=cfg.model.name, dropout=cfg.model.dropout, freeze="none"
    )
    source_classes = list(payload["classes"])
    replaced = source_classes != list(classes)
    if replaced:
        torch.manual_seed(cfg.seed)
        replace_head(model, len(classes))
    # The head always trains; train_model unfreezes the backbone at train.unfreeze_after.
    set_backbone_trainable(model, cfg.model.freeze != "backbone")
    return FinetuneStart(model=model, head_replaced=replaced, source_classes=source_classes)


def run_finetune(
    cfg: Config,
    *,
    source: str = "best",
    source_experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = True,
) -> str:
    """One tracked run in ``cfg.experiment``; returns its run id.

    The source is resolved and its checkpoint loaded before any run opens, so a missing or
    refused checkpoint leaves no failed run behind."""
    with tempfile.TemporaryDirectory() as tmp:
        with mlflow_store.use_store():
            parent_id = resolve_run_id(source, experiment=source_experiment)
            payload = fetch_checkpoint(parent_id, Path(tmp) / "source")
        cfg = effective_config(cfg, payload)
        mlflow_store.setup(cfg.experiment)
        mlflow_store.close_dead_runs(cfg.experiment)
        data = prepare_data(cfg, progress=progress)
        cfg = resolve_auto(cfg, data)  # what the run records is what it ran
        start = prepare_model(payload, cfg, data.classes)
        tags = {
            "feedtune.split_digest": data.split.digest,
            "feedtune.parent_model_run_id": parent_id,
            "feedtune.parent_source": source,
            "feedtune.head_replaced": str(start.head_replaced).lower(),
        }
        folder = Path(tmp) / "checkpoints"
        with run_context(cfg) as ctx, mlflow_store.start_run("finetune", tags=tags) as run:
            with build_feed(cfg, data, ctx.device) as feed:
                seed_run(cfg)  # the prepared model's training starts on the run's seeded stream
                outcome = train_model(
                    cfg,
                    feed,
                    model=start.model,
                    folder=folder,
                    finetune=True,
                    progress=progress,
                    callbacks=[RunRecorder(cfg, data, feed, folder)],
                    stop=ctx.stop,
                )
                finish_run(cfg, outcome, feed, start.model)
            return run.info.run_id
