"""The Feed: the one object a run trains from, built once per run from prepared data
(``sources.prepare``) on a device resolved once: datasets -> cache -> sampler -> loaders ->
device-ready batches (``build_feed``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Subset

from feedtune.config import Config
from feedtune.feed.augment.batch import build_batch_policy
from feedtune.feed.augment.mixing import AugmentThenMix, StepCollate, build_mix
from feedtune.feed.augment.per_sample import Transform, build_transform
from feedtune.feed.augment.squares import ToWorkingUint8
from feedtune.feed.auto import resolve_auto
from feedtune.feed.cache_memo import CacheMemo, cache_datasets
from feedtune.feed.dataset import ImageDataset
from feedtune.feed.device_loader import DeviceLoader
from feedtune.feed.geometry import working_size
from feedtune.feed.loader import build_loader
from feedtune.feed.sampling import build_sampler
from feedtune.sources.prepare import PreparedData, size_limits

POLICY_PLACES = ("device", "loader")


@dataclass
class Feed:
    """Datasets, loaders and device step of one configuration; ``train`` and ``val`` yield
    device-ready ``(images, targets)``.

    ``train_transform`` is the per-sample train pipeline (what ``augment.where: sample`` runs,
    and what describes the augmentation either way). With ``where: batch`` the dataset yields
    uint8 working squares and the policy runs on whole batches (``policy_on``): on the device
    after the uint8 transfer (CUDA), or in the loader's collate function (the CPU, where the
    workers are the spare CPU beside the model's step). Either way ``augment.mix`` blends
    training batches after the policy (``augment.mixing``).

    Whoever builds a feed closes it (``with build_feed(...) as feed:``), which stops its
    loaders' workers at once, however the block ends."""

    device: torch.device
    train: DeviceLoader
    val: DeviceLoader
    train_set: ImageDataset
    val_set: ImageDataset
    sampler: Any
    train_transform: Transform
    policy_on: str = "loader"  # where the batch policy runs (where=batch): device | loader
    generators: list[torch.Generator] = field(default_factory=list)
    world_size: int = 1  # processes that each train on their share of every epoch
    cache_fill_s: float = 0.0  # filling this feed's caches (0 for caches reused)

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all processes (``loader.batch_size`` is per process)."""
        return self.train.loader.batch_size * self.world_size  # type: ignore[attr-defined]

    @property
    def classes(self) -> list[str]:
        return self.train_set.classes

    def describe(self) -> dict[str, Any]:
        """What the run's log and MLflow say of the feed beyond its config."""
        return {
            "device": str(self.device),
            "train_batches": len(self.train),
            "val_batches": len(self.val),
            "batch_policy_on": self.policy_on,
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "train_collate": repr(self.train.loader.collate_fn),
            "source": self.train_set.reader.describe(),
            "cache_fill_s": round(self.cache_fill_s, 3),
        }

    def close(self) -> None:
        """Stop the loaders' worker processes now (``DeviceLoader.close``): the feed is done."""
        self.train.close()
        self.val.close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_feed(
    cfg: Config,
    data: PreparedData,
    device: torch.device,
    *,
    caches: CacheMemo | None = None,
    rank: int = 0,
    world_size: int = 1,
    policy_on: str | None = None,
    progress: bool = False,
) -> Feed:
    """The feed of process ``rank`` of ``world_size`` on ``device``: its share of every training
    epoch (``build_sampler``) and the validation images ``rank, rank + world_size, ...`` in
    order, without the padding repeats of ``DistributedSampler``, so that the predictions of
    all processes together are the whole validation set exactly once. ``train_set`` and
    ``val_set`` stay whole.

    ``caches``: reuse the previous feed's image caches where they match (a study's trials),
    rather than decoding every image again for each. ``policy_on`` (``augment.where: batch``
    only): ``device`` or ``loader``; None picks ``device`` with CUDA and ``loader`` on the
    CPU.

    ``auto`` settings are chosen here when the caller has not (``feed.auto.resolve_auto``); a
    command that records the run resolves them first, so that its record holds the values."""
    cfg = resolve_auto(cfg, data)
    cuda = device.type == "cuda"
    on = policy_on or ("device" if cuda else "loader")
    if on not in POLICY_PLACES:
        raise ValueError(f"policy_on: got {on!r}, allowed: {', '.join(POLICY_PLACES)}")
    aug = _augmentation(cfg, len(data.classes), on)
    train_set, val_set = _datasets(cfg, data, aug)
    fill_s = _fill_caches(cfg, train_set, val_set, aug, caches, progress=progress)
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    sampler = build_sampler(
        cfg.sampler,
        targets=train_set.targets,
        generator=sampler_gen,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
    )
    train_loader, val_loader = _loaders(
        cfg, train_set, val_set, sampler, aug, cuda=cuda, rank=rank, world_size=world_size
    )
    channels_last = cfg.train.channels_last
    return Feed(
        device=device,
        train=DeviceLoader(
            train_loader, device, device_step=aug.device_step, channels_last=channels_last
        ),
        val=DeviceLoader(val_loader, device, channels_last=channels_last),
        train_set=train_set,
        val_set=val_set,
        sampler=sampler,
        train_transform=aug.train_transform,
        policy_on=on if cfg.augment.where == "batch" else "none",
        generators=[sampler_gen, train_loader.generator, aug.generator],
        world_size=world_size,
        cache_fill_s=fill_s,
    )


def _loaders(
    cfg: Config,
    train_set: ImageDataset,
    val_set: ImageDataset,
    sampler: Any,
    aug: _Augmentation,
    *,
    cuda: bool,
    rank: int,
    world_size: int,
) -> tuple[Any, Any]:
    """The host loaders of process ``rank``: its sampler's share of training, and every
    ``world_size``-th validation image from ``rank`` on."""
    train_loader = build_loader(
        train_set, cfg.loader, sampler=sampler, seed=cfg.seed, cuda=cuda, collate_fn=aug.collate
    )
    val_share = (
        val_set if world_size <= 1 else Subset(val_set, range(rank, len(val_set), world_size))
    )
    return train_loader, build_loader(val_share, cfg.loader, seed=cfg.seed, cuda=cuda)


def _datasets(
    cfg: Config, data: PreparedData, aug: _Augmentation
) -> tuple[ImageDataset, ImageDataset]:
    common = {
        "decoder": cfg.data.decoder,
        "on_bad_image": cfg.data.on_bad_image,
        # JPEGs >= 2x the working size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT
        # scaling); the transform resizes anyway, so output shapes do not change.
        "min_decode_size": working_size(cfg.augment.image_size),
        "reader": data.reader,  # how this source's items are read: files, Arrow, a Dataset
        **size_limits(cfg),
    }
    train_set = ImageDataset(data.split.train, data.classes, aug.per_sample, **common)
    val_transform = build_transform(cfg.augment, train=False)
    return train_set, ImageDataset(data.split.val, data.classes, val_transform, **common)


def _fill_caches(
    cfg: Config,
    train_set: ImageDataset,
    val_set: ImageDataset,
    aug: _Augmentation,
    caches: CacheMemo | None,
    *,
    progress: bool,
) -> float:
    """Cache both sets (val is read every epoch, with the same preprocessing as train); the
    seconds this feed paid for it (0 for caches a previous feed filled)."""
    filled = cache_datasets(
        [train_set, val_set],
        cfg.loader,
        image_size=cfg.augment.image_size,
        progress=progress,
        squares=[aug.square, None],  # where=batch's train set: kept squashed, ready to collate
        memo=caches,
    )
    reused = caches.reused if caches is not None else []
    return sum(c.fill_seconds for c in filled if all(c is not r for r in reused))


@dataclass
class _Augmentation:
    """The training set's augmentation, split between the samples and whole batches."""

    train_transform: Transform  # the per-sample pipeline (what describes the policy either way)
    per_sample: Any  # what the dataset applies to each image
    square: int | None  # where=batch: the working square images are kept at
    device_step: Any  # what runs on each batch on the device (where=batch on CUDA), or None
    collate: StepCollate | None  # what runs on each batch in the loader, or None
    generator: torch.Generator  # draws the batch policy's parameters (outside workers)


def _augmentation(cfg: Config, num_classes: int, on: str) -> _Augmentation:
    train_transform = build_transform(cfg.augment, train=True)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    mix = build_mix(cfg.augment, num_classes=num_classes)
    if cfg.augment.where != "batch":
        collate = StepCollate(mix) if mix is not None else None
        return _Augmentation(train_transform, train_transform, None, None, collate, generator)
    policy = build_batch_policy(cfg.augment, train=True)
    step = AugmentThenMix(policy, generator=generator, mix=mix)
    square = working_size(cfg.augment.image_size)
    on_device = on == "device"
    return _Augmentation(
        train_transform=train_transform,
        per_sample=ToWorkingUint8(square),
        square=square,
        device_step=step if on_device else None,
        collate=None if on_device else StepCollate(step),
        generator=generator,
    )
