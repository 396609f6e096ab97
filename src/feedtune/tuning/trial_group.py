"""A study's trials on a torchrun process group: rank 0 owns the study, the others follow.

Rank 0 asks Optuna for each trial, opens its MLflow run, then sends an :class:`Order` to every
process (``broadcast_object_list`` on a gloo CPU group); every process then builds the same
feed (its own share) and model and trains in DistributedDataParallel, as ``feedtune train``
does. A prune or the deadline, decided on rank 0, reaches the others through the trainer's stop
(``engine.end_epoch``). No MLflow, no Optuna here: only rank 0 records, in ``stages``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from feedtune.config import Config, with_overrides
from feedtune.feed.cache_memo import CacheMemo
from feedtune.feed.feed import Feed, build_feed
from feedtune.sources.prepare import PreparedData
from feedtune.training.devices import prepare_model
from feedtune.training.distributed import Dist, cpu_group
from feedtune.training.models import build_model
from feedtune.training.stopping import StopTraining
from feedtune.training.throughput import measure_training
from feedtune.training.trainer import new_model, train_model

log = logging.getLogger(__name__)

# How long the other processes wait for rank 0's next order. Between trials rank 0 alone works
# (the model's upload, plots, the sampler, a remote store), which may outlast
# train.dist_timeout_s; a rank 0 that died closes its sockets and ends the wait at once.
ORDER_WAIT_S = 3600.0


@dataclass(frozen=True)
class Order:
    """What rank 0 tells every process to do next: a speed trial (``steps`` timed training
    steps), a training (a quality trial or a seed run, from ``resume`` when it retries one),
    or ``done``. ``overrides``: dotted keys applied to the job's own config."""

    kind: Literal["speed", "train", "done"]
    overrides: dict[str, Any] = field(default_factory=dict)
    study: str = ""
    stage: str = ""  # speed | quality | seed
    number: int | None = None  # the trial's number (None: a seed run)
    steps: int = 0
    resume: dict[str, Any] | None = None


class TrialGroup:
    """This process's place in the job (``dist``) and the channel rank 0's orders travel on.
    With one process (no torchrun) sending is a no-op."""

    def __init__(self, dist: Dist | None = None, *, order_wait_s: float = ORDER_WAIT_S) -> None:
        self.dist = dist or Dist()
        self._orders = cpu_group(self.dist, order_wait_s)

    def send(self, order: Order, cfg: Config) -> None:
        """Rank 0: tell the others what to train next (``cfg``: the order's config, which rank
        0 trains too), and record it."""
        if not self.dist.enabled:
            return
        if order.kind != "done":
            record(order, cfg, self.dist)
        self.dist.broadcast(order, group=self._orders)

    def receive(self) -> Order:
        return self.dist.broadcast(None, group=self._orders)

    def agree(self, cfg: Config, split_digest: str) -> None:
        """Every process must run the same configuration on the same split, or the orders
        (overrides of each process's own config) would train different things."""
        if not self.dist.enabled:
            return
        mine = {**cfg.flat(), "search": cfg.to_dict()["search"]}
        rows = self.dist.all_gather(mine, group=self._orders)
        differ = sorted({k for row in rows for k in row if row.get(k) != rows[0].get(k)})
        if differ:
            raise ValueError(
                f"the {self.dist.world_size} processes of `feedtune tune` differ in "
                f"{', '.join(differ[:5])}: start every one with the same --config, --set and "
                "data.path contents"
            )
        self.dist.require_same_split(split_digest, group=self._orders)


def record(order: Order, cfg: Config, dist: Dist) -> None:
    """One log line per process and piece of work: what this process trains, with the
    values of the order's keys as its own config holds them."""
    what = {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "study": order.study,
        "stage": order.stage,
        "trial": order.number,
        "params": {key: cfg.get(key) for key in sorted(order.overrides)},
    }
    log.info("trains %s", json.dumps(what, sort_keys=True, default=str))


def group_feed(
    cfg: Config, data: PreparedData, device: torch.device, dist: Dist, caches: CacheMemo
) -> Feed:
    """This process's share of ``cfg``'s feed."""
    return build_feed(cfg, data, device, caches=caches, rank=dist.rank, world_size=dist.world_size)


def speed_trial(
    cfg: Config,
    data: PreparedData,
    device: torch.device,
    *,
    steps: int,
    caches: CacheMemo | None = None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """A fixed number of real training steps with ``cfg``'s feed; no validation. Under
    torchrun (``dist``) each process steps through its share in DistributedDataParallel and
    the rate is the job's: all processes' samples over the slowest one's time."""
    dist = dist or Dist()
    torch.manual_seed(cfg.seed)
    with group_feed(cfg, data, device, dist, caches or CacheMemo()) as feed:
        model = prepare_model(
            build_model(cfg.model, num_classes=len(data.classes)),
            device,
            channels_last=cfg.train.channels_last,
        )
        rate, wait_frac, startup = measure_training(
            model, feed.train, steps=steps, train_cfg=cfg.train, dist=dist
        )
    return {"train_samples_per_s": rate, "data_wait_frac": wait_frac, "train_startup_s": startup}


def follow(cfg: Config, data: PreparedData, group: TrialGroup, device: torch.device) -> int:
    """A process other than rank 0: train what rank 0 orders, on this process's share, until
    it says ``done``; returns how many orders it ran. A stop (pruned, deadline) ends a
    training here as on rank 0; any other error ends the process (the group cannot go on)."""
    caches = CacheMemo()
    done = 0
    while (order := group.receive()).kind != "done":
        job = with_overrides(cfg, order.overrides)
        record(order, job, group.dist)
        if order.kind == "speed":
            speed_trial(job, data, device, steps=order.steps, caches=caches, dist=group.dist)
        else:
            _train(job, data, device, group.dist, caches, order.resume)
        done += 1
    return done


def _train(
    cfg: Config,
    data: PreparedData,
    device: torch.device,
    dist: Dist,
    caches: CacheMemo,
    resume: dict[str, Any] | None,
) -> None:
    with (
        group_feed(cfg, data, device, dist, caches) as feed,
        tempfile.TemporaryDirectory() as tmp,  # rank 0 alone writes checkpoints
        contextlib.suppress(StopTraining),  # a stop ends this training, as on rank 0
    ):
        model = new_model(cfg, len(data.classes))
        train_model(
            cfg, feed, model=model, folder=Path(tmp), resume=resume, progress=False, dist=dist
        )
