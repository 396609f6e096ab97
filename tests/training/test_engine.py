"""The training loop: the learning-rate schedule's shape, and that training follows it per
step, keeps the finetuning ratio and the model's memory format; the stop signal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from feedtune.config import TrainConfig
from feedtune.training.devices import is_channels_last
from feedtune.training.engine import (
    STOP_REASONS,
    Callback,
    StopTraining,
    build_optimizer,
    lr_factor,
    scaled_lr,
)
from feedtune.training.models import SmallCNN, set_backbone_trainable
from feedtune.training.trainer import new_model, train_model
from tests.conftest import tiny_feed, train_tiny


def test_cosine_warms_up_then_decays_to_zero():
    total = 200
    factors = [lr_factor("cosine", s, total, 0.1) for s in range(total)]
    warmup = factors[:20]
    assert warmup == sorted(warmup) and warmup[0] < 0.1
    assert max(factors) == pytest.approx(1.0)
    decay = factors[20:]
    assert decay == sorted(decay, reverse=True)
    assert decay[-1] < 0.01
    assert lr_factor("constant", 150, total, 0.1) == 1.0


class LastOptimizer(Callback):
    def on_epoch_end(self, epoch, metrics, *, optimizer, **_):
        self.groups = [dict(g) for g in optimizer.param_groups]


def _train(folder, tmp_path, *overrides, model=None, finetune=False):
    """``train_model`` on the tiny images; (history, the optimizer's groups at the end, feed)."""
    cfg, _, feed = tiny_feed(folder, "train.patience=0", *overrides)
    last = LastOptimizer()
    outcome = train_model(
        cfg,
        feed,
        model=model if model is not None else new_model(cfg, len(feed.classes)),
        folder=tmp_path,
        finetune=finetune,
        progress=False,
        callbacks=[last],
    )
    return outcome.state.history, last.groups, feed


def test_training_follows_the_schedule_per_step(tiny_folder, tmp_path, one_torch_thread):
    over = ["train.epochs=3", "train.lr=0.01", "train.lr_schedule=cosine", "train.warmup_frac=0"]
    history, _, feed = _train(tiny_folder, tmp_path, *over)
    lrs = [row["lr"] for row in history]
    steps = len(feed.train)  # each epoch ends at its last step, with the cosine's value there
    want = [0.01 * lr_factor("cosine", (e + 1) * steps - 1, 3 * steps, 0.0) for e in range(3)]
    assert lrs == pytest.approx(want)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.001

    over = ["train.epochs=2", "train.lr=0.01", "train.lr_schedule=constant"]
    assert [row["lr"] for row in _train(tiny_folder, tmp_path, *over)[0]] == [0.01, 0.01]


def test_finetune_backbone_keeps_its_lower_rate_under_the_schedule(
    tiny_folder, tmp_path, one_torch_thread
):
    over = ["train.epochs=2", "train.lr=0.01", "train.backbone_lr_scale=0.1"]
    _, (backbone, head), _ = _train(tiny_folder, tmp_path, *over, finetune=True)
    assert 0 < head["lr"] < 0.01
    assert backbone["lr"] == pytest.approx(0.1 * head["lr"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_model_and_batches(
    tiny_folder, tmp_path, one_torch_thread, channels_last
):
    model = SmallCNN(3, width=4, depth=2)
    over = ["train.epochs=1", f"train.channels_last={channels_last}"]
    history, _, feed = _train(tiny_folder, tmp_path, *over, model=model)
    assert is_channels_last(model) is channels_last
    images, _ = next(iter(feed.train))
    assert images.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert history[0]["train_loss"] > 0


def test_a_stop_from_a_callback_ends_training_after_that_epoch(
    tiny_folder, tmp_path, one_torch_thread
):
    class Prune(Callback):
        def on_epoch_end(self, epoch, metrics, *, state, **_):
            self.state = state
            if epoch == 1:
                raise StopTraining("pruned", "pruned after epoch 2")

    cfg, _, feed = tiny_feed(tiny_folder, "train.epochs=4", "train.patience=0")
    prune = Prune()
    with pytest.raises(StopTraining) as stopped:
        train_tiny(cfg, feed, tmp_path, callbacks=[prune])
    assert stopped.value.reason == "pruned" and str(stopped.value) == "pruned after epoch 2"
    assert prune.state.epoch == 2 and prune.state.stopped == "pruned"
    assert (tmp_path / "last.pt").exists()  # the stopped epoch is checkpointed


def test_patience_ends_training_normally_and_says_so(tiny_folder, tmp_path, one_torch_thread):
    # lr 0: nothing improves after the first epoch, so patience 1 stops after the second.
    cfg, _, feed = tiny_feed(tiny_folder, "train.epochs=5", "train.patience=1", "train.lr=1e-8")
    outcome = train_tiny(cfg, feed, tmp_path)
    assert outcome.state.epoch < 5 and outcome.state.stopped == "patience"


def test_only_known_stop_reasons():
    assert set(STOP_REASONS[1:]) == {"pruned", "deadline"}
    with pytest.raises(ValueError, match="reason 'bored'"):
        StopTraining("bored")


@pytest.mark.parametrize(("scaling", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scales_with_the_global_batch_as_configured(scaling, factor):
    cfg = TrainConfig(lr=0.001, lr_scaling=scaling)
    assert scaled_lr(cfg, 4) == pytest.approx(0.001 * factor)
    assert scaled_lr(cfg, 1) == pytest.approx(0.001)  # one process: nothing to scale
    backbone, head = build_optimizer(SmallCNN(2, width=4, depth=1), cfg, world_size=4).param_groups
    assert head["lr"] == pytest.approx(0.001 * factor) == backbone["lr"]


def test_a_model_without_a_named_head_trains_its_last_linear_as_the_head(caplog):
    conv, linear = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    with caplog.at_level("INFO", logger="feedtune.training.models"):
        backbone, head = build_optimizer(net, TrainConfig()).param_groups
    assert head["params"] == list(linear.parameters())
    assert backbone["params"] == list(conv.parameters())
    assert "last nn.Linear '4' is taken as the head" in caplog.text

    # No linear layer at all: one group.
    (group,) = build_optimizer(nn.Sequential(nn.Conv2d(3, 2, 1)), TrainConfig()).param_groups
    assert group["name"] == "all" and len(group["params"]) == 2

    # Where the head matters, the missing name is an error that says what to name.
    for train, finetune in [(TrainConfig(), True), (TrainConfig(unfreeze_after=1), False)]:
        with pytest.raises(ValueError, match="name it classifier, fc, head or heads"):
            build_optimizer(net, train, finetune=finetune)
    with pytest.raises(ValueError, match="cannot find the classification head of Sequential"):
        set_backbone_trainable(net, False)
