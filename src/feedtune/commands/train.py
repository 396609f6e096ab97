"""``feedtune train``: one tracked run of one configuration, resumable after a kill."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from feedtune.config import Config, config_from_dict
from feedtune.data.pipeline import prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tracking.recording import (
    RunRecorder,
    download_resume,
    finish_run,
    relog_missing_epochs,
)
from feedtune.training.trainer import train_model


def _resumed_config(asked: Config, resume: dict, run_id: str) -> Config:
    """The configuration the resumed run was started with; settings asked for now that differ
    are named on stderr, since a resumed run cannot change what it trains."""
    resumed = config_from_dict(resume["config"])
    theirs = resumed.flat()
    ignored = [f"{k}={v}" for k, v in asked.flat().items() if theirs.get(k) != v]
    if ignored:
        print(
            f"feedtune: --resume {run_id} continues with that run's own configuration; "
            f"ignored: {', '.join(ignored)}",
            file=sys.stderr,
        )
    return resumed


def run_train(cfg: Config, *, resume_run_id: str | None = None, progress: bool = True) -> str:
    """One tracked run; returns the MLflow run id. ``resume_run_id``: continue that killed run
    from its last checkpoint, with the configuration it was started with."""
    mlflow_store.setup(cfg.experiment)
    mlflow_store.close_dead_runs(cfg.experiment)
    resume = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        if resume_run_id:
            resume = download_resume(resume_run_id, folder)
            if resume is None:
                raise FileNotFoundError(
                    f"run {resume_run_id} has no checkpoints/last.pt to resume from; "
                    "start a new run with `feedtune train`"
                )
            cfg = _resumed_config(cfg, resume, resume_run_id)
        data = prepare_data(cfg, progress=progress)
        tags = {"feedtune.split_digest": data.split.digest}
        with mlflow_store.start_run("train", run_id=resume_run_id, tags=tags) as run:
            if resume is not None:
                relog_missing_epochs(run.info.run_id, resume)
            try:
                outcome = train_model(
                    cfg,
                    data,
                    folder=folder,
                    resume=resume,
                    progress=progress,
                    callbacks=[RunRecorder(cfg, data, folder)],
                )
            except KeyboardInterrupt as exc:
                exc.resume_hint = f"feedtune train --resume {run.info.run_id}"
                raise
            finish_run(cfg, outcome, data.classes)
            return run.info.run_id
