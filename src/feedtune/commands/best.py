"""``feedtune best``: the best run of an experiment, ready to reuse."""

from __future__ import annotations

from typing import Any

from feedtune.config import Config
from feedtune.tracking import mlflow_store as tracking

SHOWN_METRICS = (
    "best_val_f1_macro",
    "best_val_acc",
    "train_samples_per_s",
    "loader_samples_per_s",
    "model_samples_per_s",
    "data_wait_frac",
    "feed_ratio",
)


def find_best_run(experiment: str, *, metric: str = "best_val_f1_macro") -> Any:
    """The run behind the registered alias ``best``, else the run with the highest ``metric``."""
    tracking.setup(experiment)
    run_id = tracking.alias_run_id(experiment)
    if run_id:
        return tracking.get_run(run_id)
    runs = tracking.search_runs(
        experiment,
        # Study parent runs repeat their best trial's metric but hold no checkpoint.
        filter_string=f"metrics.{metric} > -1 and attributes.status = 'FINISHED' "
        "and tags.`feedtune.kind` != 'study'",
        order_by=[f"metrics.{metric} DESC"],
        max_results=1,
    )
    if not runs:
        raise LookupError(
            f"experiment '{experiment}' has no finished run with metric {metric}; "
            "run `feedtune train` or `feedtune tune` first"
        )
    return runs[0]


def settings_line(params: dict[str, str]) -> str:
    """``--set`` flags for every setting that differs from the defaults."""
    defaults = {k: ("null" if v is None else str(v)) for k, v in Config().flat().items()}
    flags = [
        f"--set {k}={v}"
        for k, v in sorted(params.items())
        if k in defaults and defaults[k] != v and k not in ("experiment",)
    ]
    return " ".join(flags)


def describe_best(experiment: str) -> str:
    run = find_best_run(experiment)
    metrics = run.data.metrics
    lines = [
        f"best run:    {run.info.run_id}  ({run.data.tags.get('feedtune.kind', '?')}, "
        f"{run.info.run_name})",
        "metrics:     " + ", ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN_METRICS if k in metrics),
        f"checkpoint:  {tracking.checkpoint_uri(run)}",
        f"model:       runs:/{run.info.run_id}/model",
        f"settings:    {settings_line(run.data.params) or '(defaults)'}",
    ]
    return "\n".join(lines)
