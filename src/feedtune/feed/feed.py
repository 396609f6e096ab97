"""The feed of one configuration, assembled from prepared data (``sources.prepare``):
datasets -> cache -> sampler -> loaders (``build_pipeline``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from feedtune.config import Config
from feedtune.feed.augment.batch import build_batch_augment
from feedtune.feed.augment.mixing import AugmentingCollate, AugmentThenMix, MixingCollate, build_mix
from feedtune.feed.augment.per_sample import Transform, build_transform
from feedtune.feed.augment.squares import ToWorkingUint8
from feedtune.feed.cache import CacheMemo, cache_datasets
from feedtune.feed.dataset import ImageDataset
from feedtune.feed.geometry import working_size
from feedtune.feed.loader import build_loader
from feedtune.feed.sampling import build_sampler
from feedtune.sources.prepare import PreparedData, size_limits

# (uint8 images, aspect ratios, labels) on the device -> (the model's normalized float input,
# its targets: the labels, or soft targets [B, K] when ``augment.mix`` blends the batch).
BatchAugmentFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass
class Pipeline:
    """Datasets and loaders of one configuration.

    ``train_transform`` is the per-sample train pipeline (what ``augment.where: sample`` runs,
    and what describes the augmentation either way). With ``where: batch`` the dataset yields
    uint8 working squares and the policy runs on whole batches: on a CUDA device the train
    loader yields uint8 batches and ``batch_augment`` runs the policy on them after the
    transfer; on the CPU the loader's collate function runs it (in the workers, beside the
    model's step) and ``batch_augment`` is None. Either way ``augment.mix`` blends training
    batches after the policy (``data.mixing``)."""

    train_set: ImageDataset
    val_set: ImageDataset
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any
    train_transform: Transform
    batch_augment: BatchAugmentFn | None = None
    generators: list[torch.Generator] = field(default_factory=list)
    cache_fill_s: float = 0.0  # filling this pipeline's caches (0 for caches reused)

    def close(self) -> None:
        """Stop the loaders' persistent worker processes now.

        Left to the garbage collector, a loader caught in a reference cycle (an exception's
        traceback holds the training frames) can be finalized after its own queues: its
        workers never receive the order to stop, and each costs a 5 s join timeout before
        it is killed (measured: 20 s after every pruned trial with 2+2 workers). DataLoader
        has no public close, so this shuts down the iterator it keeps for persistent
        workers; the loaders still work afterwards (they start new workers)."""
        for loader in (self.train_loader, self.val_loader):
            iterator = getattr(loader, "_iterator", None)
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            if iterator is not None:
                loader._iterator = None


def build_pipeline(
    cfg: Config,
    data: PreparedData,
    *,
    cuda: bool,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    batch_augment_on: str | None = None,
    caches: CacheMemo | None = None,
) -> Pipeline:
    """The loaders of process ``rank`` of ``world_size``: its share of every training epoch
    (``build_sampler``) and the validation images ``rank, rank + world_size, ...`` in order,
    without the padding repeats of ``DistributedSampler``, so that the predictions of all
    processes together are the whole validation set exactly once. ``train_set`` and
    ``val_set`` stay whole.

    ``batch_augment_on`` (``augment.where: batch`` only): ``device`` or ``loader``; None picks
    ``device`` with CUDA and ``loader`` on the CPU, where the workers are the spare CPU.
    ``caches``: reuse the previous pipeline's image caches where they match (a study's
    trials), rather than decoding every image again for each."""
    on = batch_augment_on or ("device" if cuda else "loader")
    if on not in ("device", "loader"):
        raise ValueError(f"batch_augment_on: got {on!r}, allowed: device, loader")
    common = {
        "decoder": cfg.data.decoder,
        "on_bad_image": cfg.data.on_bad_image,
        # JPEGs >= 2x the working size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT
        # scaling); the transform resizes anyway, so output shapes do not change.
        "min_decode_size": working_size(cfg.augment.image_size),
        **size_limits(cfg),
    }
    train_transform = build_transform(cfg.augment, train=True)
    batch_augment, augment_gen = None, torch.Generator().manual_seed(cfg.seed + 1)
    per_sample: Any = train_transform
    mix = build_mix(cfg.augment, num_classes=len(data.classes))
    train_collate = None
    square = None
    if cfg.augment.where == "batch":
        augment = build_batch_augment(cfg.augment, train=True)
        batch_augment = AugmentThenMix(augment, generator=augment_gen, mix=mix)
        square = working_size(cfg.augment.image_size)
        per_sample = ToWorkingUint8(square)
        if on == "loader":
            train_collate, batch_augment = AugmentingCollate(batch_augment), None
    elif mix is not None:
        train_collate = MixingCollate(mix)
    train_set = ImageDataset(data.split.train, data.classes, per_sample, **common)
    val_set = ImageDataset(
        data.split.val, data.classes, build_transform(cfg.augment, train=False), **common
    )
    # Both sets: val is read every epoch, and sees the same preprocessing as train.
    filled = cache_datasets(
        [train_set, val_set],
        cfg.loader,
        image_size=cfg.augment.image_size,
        progress=progress,
        squares=[square, None],  # the train set of where=batch: kept squashed, ready to collate
        memo=caches,
    )
    reused = caches.reused if caches is not None else []
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    sampler = build_sampler(
        cfg.sampler,
        targets=train_set.targets,
        generator=sampler_gen,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
    )
    train_loader = build_loader(
        train_set,
        cfg.loader,
        sampler=sampler,
        seed=cfg.seed,
        cuda=cuda,
        collate_fn=train_collate,
    )
    val_share = (
        val_set if world_size <= 1 else Subset(val_set, range(rank, len(val_set), world_size))
    )
    val_loader = build_loader(val_share, cfg.loader, seed=cfg.seed, cuda=cuda)
    return Pipeline(
        train_set=train_set,
        val_set=val_set,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        train_transform=train_transform,
        batch_augment=batch_augment,
        generators=[sampler_gen, train_loader.generator, augment_gen],
        cache_fill_s=sum(c.fill_seconds for c in filled if all(c is not r for r in reused)),
    )
