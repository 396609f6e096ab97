"""Batch mixing: training batches leave the feed with soft targets, wherever the policy runs;
validation keeps hard labels."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from feedtune.config import load_config
from feedtune.feed.augment.mixing import StepCollate
from feedtune.feed.feed import build_feed
from feedtune.sources.prepare import prepare_data
from feedtune.training.trainer import new_model, train_model
from feedtune.tuning.space import inert_settings, ordered, quality_space

SMALL = ["augment.image_size=32", "loader.batch_size=8", "seed=3"]
CPU = torch.device("cpu")


def _feed(folder, *overrides, on="device"):
    """``on``: where ``augment.where: batch`` runs (``device``: the CUDA path, on CPU tensors)."""
    cfg = load_config(None, [f"data.path={folder}", *SMALL, *overrides])
    data = prepare_data(cfg, progress=False)
    return cfg, data, build_feed(cfg, data, CPU, policy_on=on)


def _train_batches(feed):
    """Every training batch as the loader ships it and as the model receives it (the batch
    path augments on the device)."""
    for batch in feed.train.loader:
        if batch is not None:
            yield batch, feed.train.to_device(batch)


@pytest.mark.parametrize("where", ["sample", "batch"])
@pytest.mark.parametrize("mix", ["mixup", "cutmix", "mixup_or_cutmix"])
def test_training_batches_carry_soft_targets(tiny_folder, mix, where):
    torch.manual_seed(0)  # the v2 transforms draw from torch's global RNG
    _, data, feed = _feed(tiny_folder, f"augment.mix={mix}", f"augment.where={where}")
    k = len(data.classes)
    mixed_rows = 0
    for raw, (images, targets) in _train_batches(feed):
        b = len(images)
        assert images.dtype == torch.float32 and images.shape == (b, 3, 32, 32)
        assert targets.dtype == torch.float32 and targets.shape == (b, k)
        assert torch.allclose(targets.sum(1), torch.ones(b), atol=1e-5)
        assert (targets >= 0).all()
        mixed_rows += int((targets.max(1).values < 1 - 1e-6).sum())
        if where == "batch":
            # The loader still ships uint8 images and hard labels: mixing runs on the device,
            # and each soft row blends the labels of the two images it was made from.
            (uint8, _), labels = raw
            assert uint8.dtype == torch.uint8 and labels.dtype == torch.int64
            for i in range(b):
                support = set(targets[i].nonzero().flatten().tolist())
                assert support <= {int(labels[i]), int(labels[i - 1])}
        else:
            assert raw[1] is targets  # collated and mixed in the loader, moved as is on CPU
    assert mixed_rows > 0


def test_batch_path_mixes_the_augmented_floats_as_the_targets_say(tiny_folder):
    torch.manual_seed(0)
    _, _, feed = _feed(tiny_folder, "augment.mix=mixup", "augment.where=batch")
    (uint8, aspects), labels = next(iter(feed.train.loader))
    step = feed.train.device_step
    state = step.generator.get_state()
    images, targets = step((uint8, aspects), labels)
    # The same augmentation, unmixed: MixUp blends image i with image i - 1 at ratio lam.
    plain = step.policy(uint8, aspects, generator=torch.Generator().set_state(state))
    pairs = [i for i in range(len(labels)) if labels[i] != labels[i - 1]]
    assert pairs
    for i in pairs:
        lam = targets[i, labels[i]]
        assert torch.allclose(targets[i, labels[i - 1]], 1 - lam)
        assert torch.allclose(images[i], lam * plain[i] + (1 - lam) * plain[i - 1], atol=1e-5)


def test_batch_path_in_the_loader_workers_ships_soft_targets(tiny_folder):
    torch.manual_seed(0)
    _, data, feed = _feed(
        tiny_folder, "augment.mix=mixup", "augment.where=batch", "loader.num_workers=2", on="loader"
    )
    k, mixed_rows = len(data.classes), 0
    for images, targets in (b for b in feed.train.loader if b is not None):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert targets.dtype == torch.float32 and targets.shape == (len(images), k)
        assert torch.allclose(targets.sum(1), torch.ones(len(images)), atol=1e-5)
        mixed_rows += int((targets.max(1).values < 1 - 1e-6).sum())
    assert mixed_rows > 0
    collate = pickle.loads(pickle.dumps(feed.train.loader.collate_fn))  # spawned workers
    assert collate([None, None]) is None


def test_sample_path_collate_survives_pickling_for_spawned_workers(tiny_folder):
    _, _, feed = _feed(tiny_folder, "augment.mix=mixup", "augment.where=sample")
    collate = feed.train.loader.collate_fn
    assert isinstance(collate, StepCollate)
    copy = pickle.loads(pickle.dumps(collate))
    samples = [feed.train_set[i] for i in range(4)]
    images, targets = copy(samples)
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 3)
    assert copy([None, None]) is None  # a batch of bad images stays skippable


@pytest.mark.parametrize("where", ["sample", "batch"])
def test_no_mix_keeps_hard_labels(tiny_folder, where):
    _, _, feed = _feed(tiny_folder, "augment.mix=none", f"augment.where={where}")
    if where == "sample":
        assert not isinstance(feed.train.loader.collate_fn, StepCollate)
    _, (images, targets) = next(_train_batches(feed))
    assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
    assert targets.dtype == torch.int64 and targets.shape == (8,)


@pytest.mark.parametrize("where", ["sample", "batch"])
def test_validation_batches_are_never_mixed(tiny_folder, where):
    _, data, feed = _feed(tiny_folder, "augment.mix=mixup_or_cutmix", f"augment.where={where}")
    assert not isinstance(feed.val.loader.collate_fn, StepCollate)
    seen = []
    for images, targets in feed.val:
        assert images.dtype == torch.float32 and targets.dtype == torch.int64
        assert targets.dim() == 1
        seen.append(targets)
    assert torch.equal(torch.cat(seen), torch.as_tensor(feed.val_set.targets))
    assert len(data.classes) == 3


@pytest.mark.slow
@pytest.mark.parametrize("where", ["sample", "batch"])
def test_training_with_mixing_learns_from_soft_targets(
    tiny_folder, tmp_path, one_torch_thread, where
):
    cfg, _, feed = _feed(
        tiny_folder,
        "augment.mix=mixup_or_cutmix",
        "augment.mix_alpha=0.4",
        f"augment.where={where}",
        "train.epochs=1",
        "train.measure_batches=0",
    )
    outcome = train_model(
        cfg, feed, model=new_model(cfg, len(feed.classes)), folder=tmp_path, progress=False
    )
    assert outcome.state.epoch == 1
    row = outcome.state.history[0]
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert 0.0 <= row["val_f1_macro"] <= 1.0


def test_mix_alpha_is_inert_without_a_mix():
    assert "augment.mix_alpha" in inert_settings({"augment.mix": "none"}, cuda=False)
    assert "augment.mix_alpha" in inert_settings({}, cuda=False)  # the default mixes nothing
    for mix in ("mixup", "cutmix", "mixup_or_cutmix"):
        assert "augment.mix_alpha" not in inert_settings({"augment.mix": mix}, cuda=False)


def test_mix_is_drawn_before_the_alpha_it_decides():
    cfg = load_config(
        None,
        [
            "search.augment.mix_alpha={float: [0.2, 2.0]}",
            "search.augment.mix={choice: [none, mixup, cutmix, mixup_or_cutmix]}",
        ],
    )
    keys = [key for key, _ in ordered(quality_space(cfg.search))]
    assert keys.index("augment.mix") < keys.index("augment.mix_alpha")
