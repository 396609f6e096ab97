"""Which trial's model the ``best`` alias points at: the study's own metric decides."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from feedtune.commands.tune import register_best
from feedtune.config import load_config
from feedtune.tracking import mlflow_models
from feedtune.tracking import mlflow_store as tracking
from tests.conftest import encoded_image, tiny_checkpoint


def _run_with_model(scores: dict[str, float]) -> str:
    with tracking.start_run("trial", system_metrics=False) as run:
        tracking.log_metrics(scores)
        mlflow_models.log_model(tiny_checkpoint(), encoded_image())
    return run.info.run_id


@pytest.mark.parametrize(("metric", "winner"), [("val_acc", "accurate"), ("val_f1_macro", "fair")])
def test_the_best_alias_follows_the_search_metric(mlflow_store, metric, winner):
    cfg = load_config(None, ["experiment=reg", f"search.metric={metric}"])
    tracking.setup(cfg.experiment)
    runs = {
        "accurate": _run_with_model({"best_val_acc": 0.9, "best_val_f1_macro": 0.5}),
        "fair": _run_with_model({"best_val_acc": 0.6, "best_val_f1_macro": 0.8}),
    }
    assert register_best(runs["accurate"], cfg)[0]
    register_best(runs["fair"], cfg)
    assert MlflowClient().get_model_version_by_alias("reg", "best").run_id == runs[winner]
