"""``feedtune inspect``: look at the configured data before training on it.

The table and split are built exactly as ``feedtune train`` builds them, so what is reported
(class counts per side, leaks across the split) is what a training run would see. One MLflow
run (``feedtune.kind=inspect``) holds the summary (``inspect/summary.json``), the figures
(``inspect/<name>.png``), the per-file table (``inspect/files.csv``, paths relative to the data
root) and the headline numbers as metrics; the report with its advice is printed.
"""

from __future__ import annotations

from typing import Any

from feedtune.config import Config, with_overrides
from feedtune.feed.geometry import working_size
from feedtune.sources.inspection import format_report, inspect_data
from feedtune.sources.prepare import prepare_data
from feedtune.tracking import mlflow_store
from feedtune.tracking.inspect_plots import inspection_figures

METRICS = (
    "n_images",
    "n_classes",
    "imbalance_ratio",
    "n_duplicate_files",
    "n_leaked_duplicates",
    "n_bad_images",
)


def metrics_of(summary: dict[str, Any]) -> dict[str, float]:
    """The run's metrics (``METRICS``) from an inspection summary."""
    return {
        "n_images": summary["n_images"],
        "n_classes": summary["n_classes"],
        "imbalance_ratio": summary["imbalance_ratio"],
        "n_duplicate_files": summary["duplicates"]["n_files"],
        "n_leaked_duplicates": summary["duplicates"]["n_leaked_sets"],
        "n_bad_images": summary["bad"]["n_bad"],
    }


def run_inspect(cfg: Config, *, progress: bool = True) -> str:
    """Inspect ``cfg``'s data, log it to MLflow, print the report; returns the run id.

    Bad files are always skipped here, even with ``data.on_bad_image=raise``: the point is to
    list all of them, not to stop at the first.
    """
    cfg = with_overrides(cfg, {"data.on_bad_image": "skip"})
    data = prepare_data(cfg, progress=progress)
    found = inspect_data(
        data.table,
        data.split,
        image_size=cfg.augment.image_size,
        working_size=working_size(cfg.augment.image_size),
        decoder=cfg.data.decoder,
        progress=progress,
        reader=data.reader,
    )
    mlflow_store.setup(cfg.experiment)
    tags = {"feedtune.split_digest": data.split.digest}
    with mlflow_store.start_run(
        "inspect", run_name="inspect", tags=tags, system_metrics=False
    ) as run:
        mlflow_store.log_config(cfg)
        mlflow_store.log_json(found.summary, "inspect/summary.json")
        for name, fig in inspection_figures(found).items():
            mlflow_store.log_figure(fig, f"inspect/{name}.png")
        files = found.files.assign(path=[found.relative(p) for p in found.files["path"]])
        mlflow_store.log_dataframe(files, "inspect/files.csv")
        mlflow_store.log_metrics(metrics_of(found.summary))
        run_id = run.info.run_id
    print(format_report(found))
    print(f"run {run_id} (experiment '{cfg.experiment}')")
    return run_id
