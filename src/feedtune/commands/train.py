"""``feedtune train``: one tracked run of one configuration, resumable after a kill.

Under torchrun every process trains its share (``training.distributed``); rank 0 alone talks
to MLflow: it opens the one run, records it, writes the checkpoints and finishes the run. Its
post-training throughput probe measures rank 0's own loader share and model step; the
end-to-end ``train_samples_per_s`` counts the samples of all processes.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from feedtune.config import AUTO, AUTO_SETTINGS, Config, config_from_dict
from feedtune.feed.auto import resolve_auto
from feedtune.feed.feed import Feed, build_feed
from feedtune.sources.dataset_source import is_dataset_spec
from feedtune.sources.prepare import PreparedData, prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tracking.recording import (
    RunRecorder,
    download_resume,
    finish_run,
    relog_missing_epochs,
)
from feedtune.training.checkpoint import require_trusted_factory
from feedtune.training.distributed import Dist
from feedtune.training.run_context import RunContext, run_context
from feedtune.training.trainer import TrainOutcome, new_model, train_model


def _resumed_config(asked: Config, resume: dict, run_id: str) -> Config:
    """The configuration the resumed run was started with; settings asked for now that differ
    are named on stderr, since a resumed run cannot change what it trains. A run built by a
    factory is resumed only when ``asked`` names the same factory."""
    resumed = config_from_dict(resume["config"])
    require_trusted_factory(resumed.model.name, asked.model.name, where=f"run {run_id}")
    _require_trusted_dataset(resumed.data.path, asked.data.path, run_id=run_id)
    theirs = resumed.flat()
    # An auto setting asks for nothing in particular: the run recorded what auto chose.
    ignored = [
        f"{k}={v}"
        for k, v in asked.flat().items()
        if theirs.get(k) != v and not (k in AUTO_SETTINGS and v == AUTO)
    ]
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


def run_train(cfg: Config, *, resume_run_id: str | None = None, progress: bool = True) -> str:
    """One tracked run; returns the MLflow run id. ``resume_run_id``: continue that killed run
    from its last checkpoint, with the configuration it was started with.

    Under torchrun (``WORLD_SIZE`` > 1) this is one process of the run: the process group is
    started here and ended on return; every process returns the run id."""
    with run_context(cfg) as ctx:
        return _train(cfg, ctx, resume_run_id=resume_run_id, progress=progress)


def _resume(cfg: Config, dist: Dist, run_id: str, folder: Path) -> tuple[Config, dict[str, Any]]:
    """The killed run's configuration and last checkpoint (downloaded into ``folder`` by the
    main process, sent to the others)."""
    resume = download_resume(run_id, folder) if dist.is_main else None
    resume = dist.broadcast(resume)
    if resume is None:
        raise FileNotFoundError(
            f"run {run_id} has no checkpoints/last.pt to resume from; "
            "start a new run with `feedtune train`"
        )
    if dist.is_main:
        return _resumed_config(cfg, resume, run_id), resume
    resumed = config_from_dict(resume["config"])
    require_trusted_factory(resumed.model.name, cfg.model.name, where=f"run {run_id}")
    return resumed, resume


def _train(
    cfg: Config,
    ctx: RunContext,
    *,
    resume_run_id: str | None,
    progress: bool,
) -> str:
    """The run on this process's ``ctx.device``; the main process of ``ctx.dist`` records
    it."""
    dist, device = ctx.dist, ctx.device
    if dist.is_main:
        mlflow_store.setup(cfg.experiment)
        mlflow_store.close_dead_runs(cfg.experiment)
    resume = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        if resume_run_id:
            cfg, resume = _resume(cfg, dist, resume_run_id, folder)
        data = prepare_data(cfg, progress=progress and dist.is_main)
        dist.require_same_split(data.split.digest)
        cfg = resolve_auto(cfg, data)  # what the run records is what it ran
        with build_feed(cfg, data, device, rank=dist.rank, world_size=dist.world_size) as feed:
            model = new_model(cfg, len(data.classes))
            ctx.stop.check()  # a signal during the preparation: no run opened yet
            job = _Job(cfg, data, feed, model, folder, resume)
            if not dist.is_main:
                run_id = dist.broadcast(None)
                with _resume_hint(run_id):
                    job.train(ctx, progress=False)
                return run_id
            return _recorded(job, ctx, resume_run_id, progress=progress)


@dataclass
class _Job:
    """What this process trains, built once (the model included) and closed by ``_train``."""

    cfg: Config
    data: PreparedData
    feed: Feed
    model: nn.Module
    folder: Path
    resume: dict[str, Any] | None

    def train(self, ctx: RunContext, **kwargs: Any) -> TrainOutcome:
        return train_model(
            self.cfg,
            self.feed,
            model=self.model,
            folder=self.folder,
            resume=self.resume,
            dist=ctx.dist,
            stop=ctx.stop,
            **kwargs,
        )


def _recorded(job: _Job, ctx: RunContext, resume_run_id: str | None, *, progress: bool) -> str:
    """The main process's run: ``job`` trained inside the MLflow run opened (or reopened, to
    resume) here, then its results; the run id."""
    tags = {
        "feedtune.split_digest": job.data.split.digest,
        "feedtune.world_size": str(ctx.dist.world_size),
    }
    with mlflow_store.start_run("train", run_id=resume_run_id, tags=tags) as run:
        ctx.dist.broadcast(run.info.run_id)
        if job.resume is not None:
            relog_missing_epochs(run.info.run_id, job.resume)
        recorder = RunRecorder(job.cfg, job.data, job.feed, job.folder)
        with _resume_hint(run.info.run_id):
            outcome = job.train(ctx, progress=progress, callbacks=[recorder])
        finish_run(job.cfg, outcome, job.feed, job.model)
        return run.info.run_id


@contextlib.contextmanager
def _resume_hint(run_id: str) -> Iterator[None]:
    """A run ended by Ctrl-C or a lost peer (a RuntimeError) says how to resume it."""
    try:
        yield
    except (KeyboardInterrupt, RuntimeError) as exc:
        exc.resume_hint = f"feedtune train --resume {run_id}"  # type: ignore[attr-defined]
        raise
