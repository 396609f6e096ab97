"""The Feed: ``augment.where`` decides where the policy runs; batches arrive device-ready."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feedtune.config import load_config
from feedtune.feed.augment.mixing import AugmentThenMix, StepCollate
from feedtune.feed.feed import build_feed
from feedtune.feed.geometry import working_size
from feedtune.sources.prepare import prepare_data
from feedtune.training.engine import Callback
from tests.conftest import train_tiny

SMALL = ["augment.image_size=32", "loader.batch_size=8", "seed=3"]


CPU = torch.device("cpu")


def _feed(folder, *overrides, on=None):
    cfg = load_config(None, [f"data.path={folder}", *SMALL, *overrides])
    data = prepare_data(cfg, progress=False)
    return cfg, data, build_feed(cfg, data, CPU, policy_on=on)


@pytest.mark.parametrize("policy", ["none", "basic", "color", "geometric"])
def test_batch_where_moves_uint8_and_the_model_sees_normalized_floats(tiny_folder, policy):
    # The CUDA path (the policy after the transfer), run on CPU tensors.
    cfg, _, feed = _feed(
        tiny_folder, "augment.where=batch", f"augment.policy={policy}", on="device"
    )
    assert feed.policy_on == "device" and isinstance(feed.train.device_step, AugmentThenMix)
    (images, aspects), targets = next(iter(feed.train.loader))
    side = working_size(32)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, side, side)
    assert aspects.shape == (8,) and targets.shape == (8,)
    x, y = feed.train.to_device(((images, aspects), targets))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    # Normalized with the ImageNet statistics: the raw colours (0..255) are gone.
    assert x.abs().max() < 5 and x.mean().abs() < 2
    assert torch.equal(y, targets)
    # Validation stays on the per-sample eval path, floats at the training size.
    val_images, _ = next(iter(feed.val))
    assert val_images.dtype == torch.float32 and val_images.shape[1:] == (3, 32, 32)
    # What the training loop iterates: device-ready floats, the policy already applied.
    x, y = next(iter(feed.train))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and y.shape == (8,)


def _first_batches(feed, n=2):
    it = iter(feed.train.loader)
    return [next(it) for _ in range(n)]


def test_on_the_cpu_the_batch_policy_runs_in_the_loader_workers(tiny_folder):
    over = ["augment.where=batch", "augment.policy=basic", "loader.num_workers=2"]
    _, _, feed = _feed(tiny_folder, *over)
    assert feed.train.device_step is None  # nothing left for the training process to do
    assert isinstance(feed.train.loader.collate_fn, StepCollate)
    assert feed.describe()["batch_policy_on"] == "loader"
    batches = _first_batches(feed)
    for images, targets in batches:
        assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
        assert targets.dtype == torch.int64 and targets.shape == (8,)
        assert images.abs().max() < 5  # normalized
        x, y = feed.train.to_device((images, targets))
        assert torch.equal(x, images) and y is targets  # moved as is (memory format aside)
    # The workers draw from RNGs the loader seeds: the same seed repeats the same batches.
    again = _first_batches(_feed(tiny_folder, *over)[2])
    for (a, ya), (b, yb) in zip(batches, again, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    other = _first_batches(_feed(tiny_folder, *over, "seed=4")[2])
    assert not torch.equal(batches[0][0], other[0][0])


@pytest.mark.parametrize("cache", ["none", "decoded", "resized"])
def test_the_loader_path_gives_the_device_path_s_batches(tiny_folder, cache):
    # Policy none draws nothing: both paths, and every cache, must give the same pixels
    # (squares cached from the decoded images are what the per-sample squash makes).
    over = ["augment.where=batch", "augment.policy=none", "sampler.kind=random"]
    _, _, on_device = _feed(tiny_folder, *over, on="device")
    _, _, in_loader = _feed(tiny_folder, *over, f"loader.cache={cache}", on="loader")
    if cache != "none":
        assert in_loader.train_set.cache.square == working_size(32)
        assert in_loader.val_set.cache.square is None  # validation stays per sample
    want, labels = next(iter(on_device.train))
    got, got_labels = next(iter(in_loader.train))
    assert torch.equal(got_labels, labels)
    assert torch.allclose(got, want, atol=1e-5)


def test_batch_where_refuses_a_policy_it_cannot_draw(tiny_folder):
    with pytest.raises(ValueError, match="augment.policy"):
        _feed(tiny_folder, "augment.where=batch", "augment.policy=randaugment")


def test_batch_where_trains_and_repeats_with_the_seed(tiny_folder, tmp_path):
    losses = []
    for run in range(2):
        cfg, _, feed = _feed(
            tiny_folder, "augment.where=batch", "train.epochs=1", "train.measure_batches=0"
        )
        outcome = train_tiny(cfg, feed, tmp_path / str(run))
        assert outcome.state.epoch == 1
        losses.append(outcome.state.history[0]["train_loss"])
    assert np.isfinite(losses[0]) and losses[0] == losses[1]


def test_an_interrupted_training_stops_its_loader_workers_at_once(tiny_folder, tmp_path):
    # A pruned trial or a deadline ends training with an exception. Its traceback keeps the
    # loaders alive; their persistent workers must still stop now, not when the garbage
    # collector finds them (then each took a 5 s timeout to be killed): the feed's builder
    # closes it on the way out.
    cfg, _, feed = _feed(
        tiny_folder,
        "loader.num_workers=2",
        "loader.persistent_workers=true",
        "train.epochs=2",
        "train.measure_batches=0",
    )
    workers = []

    class Interrupt(Callback):
        def on_epoch_end(self, epoch, metrics, **_):
            for loader in (feed.train.loader, feed.val.loader):
                workers.extend(loader._iterator._workers)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped, feed:
        train_tiny(cfg, feed, tmp_path, callbacks=[Interrupt()])
    assert len(workers) == 4 and stopped.traceback  # the frames are still held here
    assert not any(w.is_alive() for w in workers)
