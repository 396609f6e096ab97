"""The trainer on its own: real images, real loader, no MLflow and no Optuna."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from feedtune.config import load_config
from feedtune.feed.feed import build_feed
from feedtune.sources.prepare import prepare_data
from feedtune.training.checkpoint import load_checkpoint
from feedtune.training.trainer import BEST, new_model, train_model

CPU = torch.device("cpu")


def _cfg(data: Path, **overrides):
    return load_config(
        None,
        [
            f"data.path={data}",
            "augment.image_size=32",
            "loader.batch_size=8",
            "train.epochs=4",
            "train.patience=0",
            "train.measure_batches=0",
            *(f"{k}={v}" for k, v in overrides.items()),
        ],
    )


@pytest.mark.parametrize("metric", ["val_acc", "val_f1_macro"])
def test_the_search_metric_picks_the_best_epoch_and_checkpoint(
    tiny_folder, tmp_path, one_torch_thread, metric
):
    cfg = _cfg(tiny_folder, **{"search.metric": metric, "train.lr": 0.003})
    feed = build_feed(cfg, prepare_data(cfg, progress=False), CPU)
    outcome = train_model(
        cfg,
        feed,
        model=new_model(cfg, len(feed.classes)),
        folder=tmp_path,
        progress=False,
    )
    history = outcome.state.history
    scores = [h[metric] for h in history]
    assert outcome.state.best_metric == max(scores)
    assert outcome.state.best_epoch == scores.index(max(scores))
    assert load_checkpoint(tmp_path / BEST)["metrics"][metric] == max(scores)
