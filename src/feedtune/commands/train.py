"""``feedtune train``: one tracked run of one configuration, resumable after a kill.

Under torchrun every process trains its share (``training.distributed``); rank 0 alone talks
to MLflow: it opens the one run, records it, writes the checkpoints and finishes the run. Its
post-training throughput probe measures rank 0's own loader share and model step; the
end-to-end ``train_samples_per_s`` counts the samples of all processes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from feedtune.config import Config, config_from_dict
from feedtune.feed.feed import build_feed
from feedtune.sources.dataset_source import is_dataset_spec
from feedtune.sources.prepare import PreparedData, prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tracking.recording import (
    RunRecorder,
    download_resume,
    finish_run,
    relog_missing_epochs,
)
from feedtune.training import stopping
from feedtune.training.checkpoint import require_trusted_factory
from feedtune.training.devices import resolve_device
from feedtune.training.distributed import Dist, init_from_env
from feedtune.training.trainer import train_model


def _resumed_config(asked: Config, resume: dict, run_id: str) -> Config:
    """The configuration the resumed run was started with; settings asked for now that differ
    are named on stderr, since a resumed run cannot change what it trains. A run built by a
    factory is resumed only when ``asked`` names the same factory."""
    resumed = config_from_dict(resume["config"])
    require_trusted_factory(resumed.model.name, asked.model.name, where=f"run {run_id}")
    _require_trusted_dataset(resumed.data.path, asked.data.path, run_id=run_id)
    theirs = resumed.flat()
    ignored = [f"{k}={v}" for k, v in asked.flat().items() if theirs.get(k) != v]
    if ignored:
        print(
            f"feedtune: --resume {run_id} continues with that run's own configuration; "
            f"ignored: {', '.join(ignored)}",
            file=sys.stderr,
        )
    return resumed


def _require_trusted_dataset(path: str | None, asked: str | None, *, run_id: str) -> None:
    """A run's ``data.path`` naming a Dataset callable is code: imported on resume only when
    the caller names the same one, as for a model factory."""
    if path and is_dataset_spec(path) and path != asked:
        raise ValueError(
            f"run {run_id} reads its data from the callable '{path}', code that runs only when "
            f"you name it: pass --set data.path={path} to trust it"
        )


def _same_data(dist: Dist, data: PreparedData) -> None:
    """Every process must split the same images alike, or their shares would not add up."""
    digests = dist.all_gather(data.split.digest)
    if len(set(digests)) > 1:
        raise ValueError(
            f"the {dist.world_size} processes split their data differently (split digests "
            f"{sorted(set(digests))}): every machine needs the same data.path contents"
        )


def run_train(cfg: Config, *, resume_run_id: str | None = None, progress: bool = True) -> str:
    """One tracked run; returns the MLflow run id. ``resume_run_id``: continue that killed run
    from its last checkpoint, with the configuration it was started with.

    Under torchrun (``WORLD_SIZE`` > 1) this is one process of the run: the process group is
    started here and ended on return; every process returns the run id."""
    device = resolve_device(cfg.train.device)
    dist = init_from_env(device, cfg.train.dist_timeout_s)
    try:
        return _train(
            cfg, dist, dist.device(device), resume_run_id=resume_run_id, progress=progress
        )
    finally:
        dist.destroy()


def _train(
    cfg: Config,
    dist: Dist,
    device: torch.device,
    *,
    resume_run_id: str | None,
    progress: bool,
) -> str:
    """The run on this process's ``device``; ``dist``'s main process records it."""
    if dist.is_main:
        mlflow_store.setup(cfg.experiment)
        mlflow_store.close_dead_runs(cfg.experiment)
    resume = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        if resume_run_id:
            if dist.is_main:
                resume = download_resume(resume_run_id, folder)
            resume = dist.broadcast(resume)
            if resume is None:
                raise FileNotFoundError(
                    f"run {resume_run_id} has no checkpoints/last.pt to resume from; "
                    "start a new run with `feedtune train`"
                )
            if dist.is_main:
                cfg = _resumed_config(cfg, resume, resume_run_id)
            else:
                resumed = config_from_dict(resume["config"])
                require_trusted_factory(
                    resumed.model.name, cfg.model.name, where=f"run {resume_run_id}"
                )
                cfg = resumed
        data = prepare_data(cfg, progress=progress and dist.is_main)
        _same_data(dist, data)
        feed = build_feed(cfg, data, device, rank=dist.rank, world_size=dist.world_size)
        stopping.current().check()  # a signal during the preparation: no run opened yet
        if not dist.is_main:
            run_id = dist.broadcast(None)
            try:
                train_model(cfg, feed, folder=folder, resume=resume, progress=False, dist=dist)
            except (KeyboardInterrupt, RuntimeError) as exc:  # RuntimeError: a lost peer
                exc.resume_hint = f"feedtune train --resume {run_id}"
                raise
            return run_id
        tags = {
            "feedtune.split_digest": data.split.digest,
            "feedtune.world_size": str(dist.world_size),
        }
        with mlflow_store.start_run("train", run_id=resume_run_id, tags=tags) as run:
            dist.broadcast(run.info.run_id)
            if resume is not None:
                relog_missing_epochs(run.info.run_id, resume)
            try:
                outcome = train_model(
                    cfg,
                    feed,
                    folder=folder,
                    resume=resume,
                    progress=progress,
                    callbacks=[RunRecorder(cfg, data, feed, folder)],
                    dist=dist,
                )
            except (KeyboardInterrupt, RuntimeError) as exc:  # RuntimeError: a lost peer
                exc.resume_hint = f"feedtune train --resume {run.info.run_id}"
                raise
            finish_run(cfg, outcome, feed)
            return run.info.run_id
