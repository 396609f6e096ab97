"""One training run of one configuration: data -> split -> loaders -> model -> fit, with
checkpoints every epoch and everything DESIGN's contract names logged to MLflow.

This module orchestrates; the loop (``engine``) knows nothing of MLflow, and every MLflow call
goes through ``tracking``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from feedtune.config import PROJECT_ROOT, Config, config_from_dict
from feedtune.data.augment import build_transform, save_sample_grid
from feedtune.data.cache import cache_datasets, working_size
from feedtune.data.dataset import ImageDataset, scan_images
from feedtune.data.embedded import dataset_root, ensure_dataset
from feedtune.data.imageio import decode_image
from feedtune.data.loader import build_loader
from feedtune.data.sampling import build_sampler, epoch_class_counts
from feedtune.data.sources import class_names, load_table
from feedtune.data.split import Split, make_split
from feedtune.tracking import mlflow_store as tracking
from feedtune.tracking.plots import confusion_matrix_figure
from feedtune.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from feedtune.training.engine import (
    Callback,
    EvalResult,
    TrainState,
    build_optimizer,
    evaluate,
    fit,
    resolve_device,
)
from feedtune.training.models import build_model, num_outputs

log = logging.getLogger(__name__)

EPOCH_METRICS = ("train_loss", "val_loss", "val_acc", "val_f1_macro", "lr")


@dataclass
class PreparedData:
    """The table, its bad files and the split: computed once, shared by a study's trials."""

    source: Path
    classes: list[str]
    split: Split
    bad: pd.DataFrame


def resolve_source(cfg: Config, *, progress: bool = True) -> Path:
    """``data.path`` if set, else the embedded dataset (written on first use)."""
    if cfg.data.path:
        path = Path(cfg.data.path).expanduser()
        return path if path.is_absolute() else (Path.cwd() / path)
    root = dataset_root(cfg.data.name, PROJECT_ROOT)
    ensure_dataset(cfg.data.name, root, seed=cfg.data.generator_seed, progress=progress)
    return root


def prepare_data(cfg: Config, *, progress: bool = True) -> PreparedData:
    source = resolve_source(cfg, progress=progress)
    table = load_table(source)
    scan = scan_images(table, on_bad_image=cfg.data.on_bad_image, progress=progress)
    split = make_split(scan.good, cfg.split, seed=cfg.seed)
    return PreparedData(source=source, classes=class_names(table), split=split, bad=scan.bad)


@dataclass
class Pipeline:
    """Datasets and loaders of one configuration."""

    train_set: ImageDataset
    val_set: ImageDataset
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any
    generators: list[torch.Generator] = field(default_factory=list)


def build_pipeline(
    cfg: Config, data: PreparedData, *, cuda: bool, progress: bool = False
) -> Pipeline:
    common = {
        "decoder": cfg.data.decoder,
        "on_bad_image": cfg.data.on_bad_image,
        # JPEGs >= 2x the working size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT
        # scaling); the transform resizes anyway, so output shapes do not change.
        "min_decode_size": working_size(cfg.augment.image_size),
    }
    train_set = ImageDataset(
        data.split.train, data.classes, build_transform(cfg.augment, train=True), **common
    )
    val_set = ImageDataset(
        data.split.val, data.classes, build_transform(cfg.augment, train=False), **common
    )
    # Both sets: val is read every epoch, and sees the same preprocessing as train.
    cache_datasets(
        [train_set, val_set], cfg.loader, image_size=cfg.augment.image_size, progress=progress
    )
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    sampler = build_sampler(cfg.sampler, targets=train_set.targets, generator=sampler_gen)
    train_loader = build_loader(train_set, cfg.loader, sampler=sampler, seed=cfg.seed, cuda=cuda)
    val_loader = build_loader(val_set, cfg.loader, seed=cfg.seed, cuda=cuda)
    return Pipeline(
        train_set=train_set,
        val_set=val_set,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        generators=[sampler_gen, train_loader.generator],
    )


class EpochSeeding(Callback):
    """Reseed the sampler and worker seeds from (seed, epoch): an epoch draws the same
    samples and augmentations whether or not the run was resumed before it."""

    def __init__(self, generators: Sequence[torch.Generator], seed: int) -> None:
        self.generators = generators
        self.seed = seed

    def on_epoch_start(self, epoch: int) -> None:
        for i, gen in enumerate(self.generators):
            gen.manual_seed(self.seed * 1_000_003 + epoch * 97 + i)


class CheckpointAndLog(Callback):
    """Each epoch: write ``last.pt`` (and ``best.pt`` when improved), upload them, then log the
    epoch's metrics. Checkpoint before metrics: a resumed run re-logs only unlogged epochs."""

    def __init__(
        self, cfg: Config, classes: list[str], folder: Path, *, track: bool = True
    ) -> None:
        self.cfg = cfg
        self.classes = classes
        self.folder = folder
        self.track = track

    def payload(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        metrics: dict[str, float],
    ) -> dict[str, Any]:
        return {
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
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
        last = save_checkpoint(payload, self.folder / "last.pt")
        if improved:
            best = save_checkpoint(payload, self.folder / "best.pt")
            if self.track:
                tracking.log_file(best, "checkpoints")
        if self.track:
            tracking.log_file(last, "checkpoints")
            tracking.log_metrics({k: metrics[k] for k in EPOCH_METRICS}, step=epoch)
            tracking.log_metrics(
                {
                    "best_val_f1_macro": max(h["val_f1_macro"] for h in state.history),
                    "best_val_acc": max(h["val_acc"] for h in state.history),
                }
            )


def train_state_from(payload: dict[str, Any]) -> TrainState:
    return TrainState(**payload["train_state"])


@dataclass
class TrainOutcome:
    state: TrainState
    best: EvalResult
    model: nn.Module
    checkpoint: Path
    pipeline: Pipeline


def log_run_inputs(cfg: Config, data: PreparedData, pipeline: Pipeline) -> None:
    """Artifacts that describe what a run trains on: config, split, augmentation, sampler."""
    tracking.log_config(cfg)
    tracking.log_split(data.split)
    tracking.log_bad_images(data.bad)
    transform = pipeline.train_set.transform
    tracking.log_json(transform.to_dict(), "augment/train.json")
    with tempfile.TemporaryDirectory() as tmp:
        transform.save(Path(tmp) / "train.yaml")
        tracking.log_file(Path(tmp) / "train.yaml", "augment")
        picks = np.linspace(
            0, len(pipeline.train_set) - 1, num=min(4, len(pipeline.train_set)), dtype=int
        )
        images = [
            decode_image(pipeline.train_set.paths[i], backend=cfg.data.decoder) for i in picks
        ]
        grid = save_sample_grid(
            images, transform, Path(tmp) / "samples.png", mean=cfg.augment.mean, std=cfg.augment.std
        )
        tracking.log_file(grid, "augment")
    counts = epoch_class_counts(pipeline.sampler, pipeline.train_set.targets, data.classes)
    tracking.log_dataframe(counts, "sampler/epoch_class_counts.csv")


def log_run_results(cfg: Config, outcome: TrainOutcome, classes: list[str]) -> None:
    best = outcome.best
    tracking.log_metrics(
        {
            "best_val_f1_macro": max(h["val_f1_macro"] for h in outcome.state.history),
            "best_val_acc": max(h["val_acc"] for h in outcome.state.history),
            "best_epoch": outcome.state.best_epoch,
            "epochs_run": outcome.state.epoch,
        }
    )
    tracking.log_dataframe(
        pd.DataFrame({"class": classes, "recall": best.per_class_recall}),
        "metrics/per_class_recall.csv",
    )
    tracking.log_figure(
        confusion_matrix_figure(
            best.confusion,
            classes,
            title=f"best epoch {outcome.state.best_epoch + 1}: val_f1_macro {best.f1_macro:.3f}",
        ),
        "plots/confusion_matrix.png",
    )
    example = next(b for b in outcome.pipeline.val_loader if b is not None)[0][:2].numpy()
    tracking.log_model(outcome.model.cpu(), example)


def train_model(
    cfg: Config,
    data: PreparedData,
    *,
    folder: Path,
    resume: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    track: bool = True,
    progress: bool = True,
    model: nn.Module | None = None,
    finetune: bool = False,
) -> TrainOutcome:
    """Train ``cfg`` on ``data``, checkpointing into ``folder``; ``resume`` is a checkpoint
    payload to continue from. Returns the best model (weights of the best epoch).

    ``model``: start from this model (already sized to ``data.classes`` and frozen as wanted)
    instead of a fresh ``build_model(cfg.model)``; ``finetune``: the backbone learns at
    ``train.lr * train.backbone_lr_scale`` (see ``finetune.py``)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    device = resolve_device(cfg.train.device)
    pipeline = build_pipeline(cfg, data, cuda=device.type == "cuda")
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
    if track and resume is None:
        log_run_inputs(cfg, data, pipeline)
    own = [
        EpochSeeding(pipeline.generators, cfg.seed),
        CheckpointAndLog(cfg, data.classes, folder, track=track),
    ]
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
    )
    best_path = folder / "best.pt"
    model.load_state_dict(load_checkpoint(best_path)["model_state"])
    best = evaluate(
        model,
        pipeline.val_loader,
        nn.CrossEntropyLoss(),
        device=device,
        num_classes=len(data.classes),
        progress=False,
    )
    return TrainOutcome(
        state=state,
        best=best,
        model=model,
        checkpoint=best_path,
        pipeline=pipeline,
    )


def run_train(cfg: Config, *, resume_run_id: str | None = None, progress: bool = True) -> str:
    """``feedtune train``: one tracked run. Returns the MLflow run id."""
    tracking.setup(cfg.experiment)
    resume = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        if resume_run_id:
            resume = download_resume(resume_run_id, folder)
            if resume is None:
                raise FileNotFoundError(
                    f"run {resume_run_id} has no checkpoints/last.pt to resume from; "
                    "start a new run with `feedtune train`"
                )
            cfg = config_from_dict(resume["config"])
        data = prepare_data(cfg, progress=progress)
        tags = {"feedtune.split_digest": data.split.digest}
        with tracking.start_run("train", run_id=resume_run_id, tags=tags) as run:
            if resume is not None:
                relog_missing_epochs(run.info.run_id, resume)
            try:
                outcome = train_model(cfg, data, folder=folder, resume=resume, progress=progress)
            except KeyboardInterrupt as exc:
                exc.resume_hint = f"feedtune train --resume {run.info.run_id}"
                raise
            log_run_results(cfg, outcome, data.classes)
            _after_training(cfg, outcome, data)
            return run.info.run_id


def download_resume(run_id: str, folder: Path) -> dict[str, Any] | None:
    """Fetch ``last.pt`` and ``best.pt`` of ``run_id`` into ``folder``; the ``last`` payload, or
    None when the run never finished an epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # MLflow downloads a single file into dst_path itself (no sub-folders).
        for name in ("last.pt", "best.pt"):
            tracking.download_artifact(run_id, f"checkpoints/{name}", folder)
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        return None
    return load_checkpoint(folder / "last.pt")


def relog_missing_epochs(run_id: str, payload: dict[str, Any]) -> None:
    """Log epochs that were checkpointed but whose metrics did not reach MLflow before a kill."""
    done = tracking.logged_steps(run_id, "val_f1_macro")
    for row in payload["train_state"]["history"]:
        if int(row["epoch"]) not in done:
            logged = {k: row[k] for k in EPOCH_METRICS if k in row}  # older checkpoints lack lr
            tracking.log_metrics(logged, step=int(row["epoch"]))


def _after_training(cfg: Config, outcome: TrainOutcome, data: PreparedData) -> None:
    """Hook for measurements that follow training (throughput); see ``throughput.py``."""
    from feedtune.training.throughput import measure_and_log

    measure_and_log(cfg, outcome.pipeline, outcome.model, progress=False)
