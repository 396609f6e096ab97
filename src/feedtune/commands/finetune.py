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

import argparse
import dataclasses
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedtune.config import PROJECT_ROOT, Config

if TYPE_CHECKING:
    from torch import nn

# torch, MLflow and the training modules are imported where used, so that building the CLI
# parser (add_parser) stays as light as the rest of cli.py.

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = Config().experiment
DEFAULT_FINETUNE_CONFIG = PROJECT_ROOT / "experiments" / "finetune-shapes-shift.yaml"

FROM_HELP = (
    "the model to start from: 'best' (the model registered as --source-experiment with alias "
    "'best', else that experiment's best finished run by best_val_f1_macro), "
    "models:/NAME@ALIAS, models:/NAME/VERSION, or a RUN_ID (default: best)"
)


@dataclass
class FinetuneStart:
    """The model a finetune starts from, ready for ``train.train_model(model=...)``."""

    model: nn.Module
    head_replaced: bool
    source_classes: list[str]


def effective_config(cfg: Config, payload: dict[str, Any]) -> Config:
    """``cfg`` with the source checkpoint's architecture (``model.name``, and ``width`` and
    ``depth`` for small_cnn): its weights fit no other, and the run's params must say what ran.

    ``model.pretrained`` becomes false: the weights come from the parent run (tag
    ``feedtune.parent_model_run_id``), not from torchvision."""
    from feedtune.api import architecture

    source = architecture(payload)
    for key in ("name", "width", "depth"):
        if getattr(cfg.model, key) != source[key]:
            log.warning(
                "model.%s %r ignored: finetuning keeps the source run's %r",
                key,
                getattr(cfg.model, key),
                source[key],
            )
    return cfg.replace({f"model.{key}": value for key, value in source.items()})


def prepare_model(payload: dict[str, Any], cfg: Config, classes: list[str]) -> FinetuneStart:
    """Rebuild the checkpoint's model, give it a new head when ``classes`` differ from the
    checkpoint's, and freeze the backbone when ``cfg.model.freeze == 'backbone'``.

    The architecture is the checkpoint's (name, width, depth); the other model settings (dropout)
    are ``cfg``'s. The new head's initial weights depend only on ``cfg.seed``."""
    import torch

    from feedtune.api import architecture, load_weights
    from feedtune.training.models import build_model, replace_head, set_backbone_trainable

    model_cfg = dataclasses.replace(cfg.model, **architecture(payload), freeze="none")
    source_classes = list(payload["classes"])
    model = load_weights(build_model(model_cfg, num_classes=len(source_classes)), payload)
    replaced = source_classes != list(classes)
    if replaced:
        torch.manual_seed(cfg.seed)
        replace_head(model, len(classes))
    # The head always trains; engine.fit unfreezes the backbone at train.unfreeze_after.
    set_backbone_trainable(model, cfg.model.freeze != "backbone")
    return FinetuneStart(model=model, head_replaced=replaced, source_classes=source_classes)


def run_finetune(
    cfg: Config,
    *,
    source: str = "best",
    source_experiment: str = DEFAULT_EXPERIMENT,
    progress: bool = True,
) -> str:
    """``feedtune finetune``: one tracked run in ``cfg.experiment``. Returns its run id.

    The source is resolved and its checkpoint loaded before any run opens, so a missing or
    refused checkpoint leaves no failed run behind."""
    from feedtune.api import fetch_checkpoint, resolve_run_id
    from feedtune.commands.train import _after_training, log_run_results, prepare_data, train_model
    from feedtune.tracking import mlflow_store as tracking

    with tempfile.TemporaryDirectory() as tmp:
        with tracking.use_store():
            parent_id = resolve_run_id(source, experiment=source_experiment)
            payload = fetch_checkpoint(parent_id, Path(tmp) / "source")
        cfg = effective_config(cfg, payload)
        tracking.setup(cfg.experiment)
        data = prepare_data(cfg, progress=progress)
        start = prepare_model(payload, cfg, data.classes)
        tags = {
            "feedtune.split_digest": data.split.digest,
            "feedtune.parent_model_run_id": parent_id,
            "feedtune.parent_source": source,
            "feedtune.head_replaced": str(start.head_replaced).lower(),
        }
        with tracking.start_run("finetune", tags=tags) as run:
            outcome = train_model(
                cfg,
                data,
                folder=Path(tmp) / "checkpoints",
                model=start.model,
                finetune=True,
                progress=progress,
            )
            log_run_results(cfg, outcome, data.classes)
            _after_training(cfg, outcome, data)
            return run.info.run_id


# --------------------------------------------------------------------------- command line


def add_parser(
    subparsers: Any, common: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """Add ``feedtune finetune``; ``common`` adds the shared --config/--set/--no-progress."""
    p = subparsers.add_parser(
        "finetune",
        help="transfer learning from a logged checkpoint to a new dataset",
        description=__doc__.split("\n\n")[1].replace("``", "'"),
    )
    p.add_argument("--from", dest="source", default="best", metavar="SOURCE", help=FROM_HELP)
    p.add_argument(
        "--source-experiment",
        default=DEFAULT_EXPERIMENT,
        metavar="NAME",
        help=f"experiment (and registered model name) that --from best reads "
        f"(default: {DEFAULT_EXPERIMENT}); the new run goes to the config's own experiment",
    )
    if common is not None:
        common(p)
    if DEFAULT_FINETUNE_CONFIG.is_file():
        p.set_defaults(config=str(DEFAULT_FINETUNE_CONFIG))
        for action in p._actions:
            if action.dest == "config":
                action.help = "YAML config (default: experiments/finetune-shapes-shift.yaml)"
    return p


def run_from_args(args: argparse.Namespace, cfg: Config, *, progress: bool = True) -> int:
    """The CLI action: run, print the run id, and turn a refused checkpoint into exit code 1."""
    from feedtune.training.checkpoint import CheckpointError

    try:
        run_id = run_finetune(
            cfg,
            source=args.source or "best",
            source_experiment=args.source_experiment or DEFAULT_EXPERIMENT,
            progress=progress,
        )
    except CheckpointError as exc:
        print(f"feedtune: error: {exc}", file=sys.stderr)
        return 1
    print(f"finetune run {run_id} finished (experiment '{cfg.experiment}', from {args.source})")
    return 0


__all__ = [
    "FinetuneStart",
    "add_parser",
    "effective_config",
    "prepare_model",
    "run_finetune",
    "run_from_args",
]
