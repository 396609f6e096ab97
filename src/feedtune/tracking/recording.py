"""Recording a training run in MLflow: a callback for the trainer, and what a run logs before
its first epoch and after its last. Every MLflow call goes through ``mlflow_store``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from feedtune.config import Config
from feedtune.feed.augment.per_sample import save_sample_grid
from feedtune.feed.dataset import single_torch_thread
from feedtune.feed.feed import Feed
from feedtune.feed.sampling import epoch_class_counts
from feedtune.sources.prepare import PreparedData
from feedtune.tracking import mlflow_models, mlflow_store
from feedtune.tracking.plots import bar_figure, confusion_matrix_figure
from feedtune.training.checkpoint import load_checkpoint
from feedtune.training.engine import Callback, scaled_lr
from feedtune.training.model_bundle import example_image
from feedtune.training.throughput import Throughput, cache_metrics, measure_run, transform_costs
from feedtune.training.trainer import BEST, LAST, TrainOutcome

# Per epoch, with its step; the rate and the waiting share show a feed that slows down.
EPOCH_METRICS = (
    "train_loss",
    "val_loss",
    "val_acc",
    "val_f1_macro",
    "lr",
    "epoch_samples_per_s",
    "epoch_data_wait_frac",
)


class RunRecorder(Callback):
    """Records a training run in the active MLflow run: its inputs (``data`` and the ``feed``
    built from it) when training starts, then each epoch the checkpoints the trainer just
    wrote into ``folder`` and the epoch's metrics. Checkpoints go first: a resumed run re-logs
    only the epochs whose metrics were lost."""

    def __init__(self, cfg: Config, data: PreparedData, feed: Feed, folder: Path) -> None:
        self.cfg = cfg
        self.data = data
        self.feed = feed
        self.folder = folder

    def on_fit_start(self, *, resumed: bool) -> None:
        if not resumed:
            log_run_inputs(self.cfg, self.data, self.feed)

    def on_epoch_end(self, epoch, metrics, *, state, model, optimizer, evaluation, improved):
        if improved:
            mlflow_store.log_file(self.folder / BEST, "checkpoints")
        mlflow_store.log_file(self.folder / LAST, "checkpoints")
        mlflow_store.log_metrics({k: metrics[k] for k in EPOCH_METRICS}, step=epoch)
        mlflow_store.log_metrics(_best_so_far(state.history))


def _best_so_far(history: list[dict[str, float]]) -> dict[str, float]:
    return {
        "best_val_f1_macro": max(h["val_f1_macro"] for h in history),
        "best_val_acc": max(h["val_acc"] for h in history),
    }


def log_run_inputs(cfg: Config, data: PreparedData, feed: Feed) -> None:
    """Artifacts that describe what a run trains on: config, split, feed, augmentation,
    sampler."""
    mlflow_store.log_config(cfg)
    mlflow_store.log_split(data.split)
    mlflow_store.log_bad_images(data.bad)
    mlflow_store.log_json(feed.describe(), "feed/feed.json")
    # The batch an optimizer step sees over all processes, the rate it learns at, and the
    # metric that chooses best.pt and stops early (config params leave out the search section).
    lr = scaled_lr(cfg.train, feed.world_size)
    mlflow_store.log_params(
        {
            "global_batch_size": feed.global_batch_size,
            "lr_scaled": lr,
            "search.metric": cfg.search.metric,
        }
    )
    transform = feed.train_transform
    mlflow_store.log_json(transform.to_dict(), "augment/train.json")
    with tempfile.TemporaryDirectory() as tmp:
        transform.save(Path(tmp) / "train.yaml")
        mlflow_store.log_file(Path(tmp) / "train.yaml", "augment")
        picks = np.linspace(0, len(feed.train_set) - 1, num=min(4, len(feed.train_set)), dtype=int)
        read = feed.train_set.reader.decode
        images = [read(feed.train_set.paths[i], backend=cfg.data.decoder) for i in picks]
        grid = save_sample_grid(
            images, transform, Path(tmp) / "samples.png", mean=cfg.augment.mean, std=cfg.augment.std
        )
        mlflow_store.log_file(grid, "augment")
    counts = epoch_class_counts(feed.sampler, feed.train_set.targets, data.classes)
    mlflow_store.log_dataframe(counts, "sampler/epoch_class_counts.csv")


def log_run_results(outcome: TrainOutcome, feed: Feed) -> None:
    """The best epoch's metrics, per-class recall, confusion matrix and the model."""
    best, classes = outcome.best, feed.classes
    mlflow_store.log_metrics(
        {
            **_best_so_far(outcome.state.history),
            "best_epoch": outcome.state.best_epoch,
            "epochs_run": outcome.state.epoch,
        }
    )
    mlflow_store.log_dataframe(
        pd.DataFrame({"class": classes, "recall": best.per_class_recall}),
        "metrics/per_class_recall.csv",
    )
    mlflow_store.log_figure(
        confusion_matrix_figure(
            best.confusion,
            classes,
            title=f"best epoch {outcome.state.best_epoch + 1}: val_f1_macro {best.f1_macro:.3f}",
        ),
        "plots/confusion_matrix.png",
    )
    # The model served is the best checkpoint's, as load_best rebuilds it (the payload the
    # trainer read to restore it); its input example is a real validation image, shrunk.
    payload = outcome.payload or load_checkpoint(outcome.checkpoint)
    config = payload["config"]
    example = example_image(
        feed.val_set.paths,
        image_size=config["augment"]["image_size"],
        decoder=config["data"]["decoder"],
        reader=feed.val_set.reader,
    )
    mlflow_models.log_model(payload, example)


def log_throughput(
    cfg: Config, outcome: TrainOutcome, feed: Feed, model: nn.Module
) -> Throughput | None:
    """The run's feed: end to end from its epochs, the two sides from short probes (whose
    steps train ``model``, the run's own: its training is over); logs the speed metrics, the
    verdict and the cost of each pipeline step."""
    if cfg.train.measure_batches <= 0:
        return None
    result = measure_run(
        model,
        feed.train,
        outcome.state.history,
        batches=cfg.train.measure_batches,
        train_cfg=cfg.train,
    )
    mlflow_store.log_metrics({**result.metrics(), **cache_metrics(feed)})
    mlflow_store.set_tags({"feedtune.bottleneck": result.bottleneck})
    with single_torch_thread():  # as the loader runs them (see ImageDataset.__getitems__)
        costs = transform_costs(feed.train_set, batch_size=cfg.loader.batch_size, seed=cfg.seed)
    mlflow_store.log_dataframe(costs, "throughput/transform_costs.csv")
    mlflow_store.log_figure(
        bar_figure(
            costs["step"],
            costs["ms_per_sample"],
            xlabel="ms per sample (one process)",
            title=f"train pipeline cost per step ({cfg.augment.library}, {cfg.augment.policy}, "
            f"{cfg.augment.order})",
        ),
        "throughput/transform_costs.png",
    )
    return result


def finish_run(
    cfg: Config, outcome: TrainOutcome, feed: Feed, model: nn.Module
) -> Throughput | None:
    """What every run that trained ``model`` to the end logs: results, the model, then its
    throughput."""
    log_run_results(outcome, feed)
    return log_throughput(cfg, outcome, feed, model)


def download_resume(run_id: str, folder: Path) -> dict[str, Any] | None:
    """Fetch ``last.pt`` and ``best.pt`` of ``run_id`` into ``folder``; the ``last`` payload, or
    None when the run never finished an epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # MLflow downloads a single file into dst_path itself (no sub-folders).
        for name in (LAST, BEST):
            mlflow_store.download_artifact(run_id, f"checkpoints/{name}", folder)
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        return None
    return load_checkpoint(folder / LAST)


def relog_missing_epochs(run_id: str, payload: dict[str, Any]) -> None:
    """Log epochs that were checkpointed but whose metrics did not reach MLflow before a kill."""
    done = mlflow_store.logged_steps(run_id, "val_f1_macro")
    for row in payload["train_state"]["history"]:
        if int(row["epoch"]) not in done:
            logged = {k: row[k] for k in EPOCH_METRICS if k in row}  # older checkpoints lack lr
            mlflow_store.log_metrics(logged, step=int(row["epoch"]))
