"""``feedtune best``: the best run of an experiment, ready to reuse."""

from __future__ import annotations

from feedtune.commands.snippet import snippet_from_params
from feedtune.config import Config
from feedtune.tracking import mlflow_search, mlflow_store
from feedtune.tracking.lookup import find_best_run

SHOWN_METRICS = (
    "best_val_f1_macro",
    "best_val_acc",
    "train_samples_per_s",
    "loader_samples_per_s",
    "model_samples_per_s",
    "data_wait_frac",
    "feed_ratio",
)


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
    """The best run (``lookup.find_best_run``) as a few lines: id, metrics, checkpoint, model
    and the settings as a ready ``--set`` line. Reads the store; creates nothing."""
    with mlflow_store.use_store():
        run = find_best_run(experiment)
    metrics = run.data.metrics
    lines = [
        f"best run:    {run.info.run_id}  ({run.data.tags.get('feedtune.kind', '?')}, "
        f"{run.info.run_name})",
        "metrics:     " + ", ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN_METRICS if k in metrics),
        f"checkpoint:  {mlflow_search.checkpoint_uri(run)}",
        f"model:       runs:/{run.info.run_id}/model",
        f"settings:    {settings_line(run.data.params) or '(defaults)'}",
    ]
    return "\n".join(lines)


def emit_python(experiment: str) -> str:
    """The best run's data feeding (transforms, mix, sampler, DataLoader settings) as a
    standalone PyTorch script; per process, for a run trained under torchrun (its
    ``feedtune.world_size`` tag; runs without one trained as one process)."""
    with mlflow_store.use_store():
        run = find_best_run(experiment)
    world_size = int(run.data.tags.get("feedtune.world_size", "1"))
    return snippet_from_params(run.data.params, world_size=world_size)
