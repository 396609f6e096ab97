"""Finding what the MLflow store holds: an experiment's id, a run, the runs a filter selects
(every page when asked), a run's checkpoint address. Reads only: creates nothing."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient


def experiment_id(name: str) -> str | None:
    """The id of the live experiment ``name``, or None; creates nothing."""
    found = MlflowClient().get_experiment_by_name(name)
    return None if found is None or found.lifecycle_stage == "deleted" else found.experiment_id


def current_store() -> str:
    """The tracking URI MLflow uses now."""
    return mlflow.get_tracking_uri()


def get_run(run_id: str) -> Any:
    return MlflowClient().get_run(run_id)


def search_runs(
    experiment: str,
    *,
    filter_string: str = "",
    order_by: list[str] | None = None,
    max_results: int | None = 1000,
) -> list[Any]:
    """Runs of ``experiment`` (none when it does not exist); ``max_results=None`` reads every
    page of the search."""
    exp_id = experiment_id(experiment)
    if exp_id is None:
        return []
    client = MlflowClient()
    found, token = [], None
    while True:
        page = client.search_runs(
            [exp_id],
            filter_string=filter_string,
            order_by=order_by or [],
            max_results=max_results or 1000,
            page_token=token,
        )
        found += page
        token = page.token
        if max_results is not None or not token:
            return found


def checkpoint_uri(run: Any, name: str = "best.pt") -> str:
    return f"{run.info.artifact_uri.rstrip('/')}/checkpoints/{name}"
