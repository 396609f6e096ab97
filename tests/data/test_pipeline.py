"""The assembled data side: ``augment.where`` decides where the policy runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feedtune.config import load_config
from feedtune.data.cache import working_size
from feedtune.data.pipeline import build_pipeline, prepare_data
from feedtune.training.devices import to_device
from feedtune.training.trainer import train_model

SMALL = ["augment.image_size=32", "loader.batch_size=8", "seed=3"]


def _pipeline(folder, *overrides):
    cfg = load_config(None, [f"data.path={folder}", *SMALL, *overrides])
    data = prepare_data(cfg, progress=False)
    return cfg, data, build_pipeline(cfg, data, cuda=False)


@pytest.mark.parametrize("policy", ["none", "basic", "color", "geometric"])
def test_batch_where_moves_uint8_and_the_model_sees_normalized_floats(tiny_folder, policy):
    cfg, _, pipeline = _pipeline(tiny_folder, "augment.where=batch", f"augment.policy={policy}")
    (images, aspects), targets = next(iter(pipeline.train_loader))
    side = working_size(32)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, side, side)
    assert aspects.shape == (8,) and targets.shape == (8,)
    x, y = to_device(
        ((images, aspects), targets), torch.device("cpu"), False, pipeline.batch_augment
    )
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    # Normalized with the ImageNet statistics: the raw colours (0..255) are gone.
    assert x.abs().max() < 5 and x.mean().abs() < 2
    assert torch.equal(y, targets)
    # Validation stays on the per-sample eval path, floats at the training size.
    val_images, _ = next(iter(pipeline.val_loader))
    assert val_images.dtype == torch.float32 and val_images.shape[1:] == (3, 32, 32)


def test_batch_where_refuses_a_policy_it_cannot_draw(tiny_folder):
    with pytest.raises(ValueError, match="augment.policy"):
        _pipeline(tiny_folder, "augment.where=batch", "augment.policy=randaugment")


def test_batch_where_trains_and_repeats_with_the_seed(tiny_folder, tmp_path):
    losses = []
    for run in range(2):
        cfg, data, _ = _pipeline(
            tiny_folder, "augment.where=batch", "train.epochs=1", "train.measure_batches=0"
        )
        outcome = train_model(cfg, data, folder=tmp_path / str(run), progress=False)
        assert outcome.state.epoch == 1
        losses.append(outcome.state.history[0]["train_loss"])
    assert np.isfinite(losses[0]) and losses[0] == losses[1]
