"""One best-run rule: ``feedtune best`` and ``feedtune.load_best`` name the same run, and a
lookup creates nothing."""

from __future__ import annotations

import time

import mlflow
import torch
from mlflow.tracking import MlflowClient

import feedtune
from feedtune.cli import main
from feedtune.config import Config, with_overrides
from feedtune.training.checkpoint import save_checkpoint
from feedtune.training.models import build_model, model_args

CLASSES = ["a", "b"]


def _run(experiment: str, kind: str, f1: float, tmp_path) -> str:
    cfg = with_overrides(Config(), {"experiment": experiment, "model.width": 4, "model.depth": 2})
    model = build_model(cfg.model, num_classes=len(CLASSES))
    payload = {
        "model_state": model.state_dict(),
        "model_args": model_args(cfg.model),
        "classes": CLASSES,
        "config": cfg.to_dict(),
        "metrics": {"val_f1_macro": f1},
    }
    with mlflow.start_run() as run:
        mlflow.set_tag("feedtune.kind", kind)
        mlflow.log_metric("best_val_f1_macro", f1)
        path = save_checkpoint(payload, tmp_path / run.info.run_id / "best.pt")
        mlflow.log_artifact(str(path), artifact_path="checkpoints")
    time.sleep(0.01)  # distinct start times: the newer of two equal runs wins
    return run.info.run_id


def test_best_and_load_best_name_the_same_run(mlflow_store, tmp_path, capsys):
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("lookup")
    _run("lookup", "train", 0.70, tmp_path)
    newer = _run("lookup", "trial", 0.70, tmp_path)  # a tie: the newest
    _run("lookup", "study", 0.95, tmp_path)  # a study parent repeats its trial's metric
    _run("lookup", "train", 0.50, tmp_path)

    assert main(["best", "--experiment", "lookup", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"best run:    {newer}" in printed
    best = feedtune.load_best("lookup", mlflow_store)
    assert best.run_id == newer
    assert best.classes == CLASSES and not best.model.training
    x = torch.zeros(1, 3, 16, 16)
    assert best.model(x).shape == (1, 2)


def test_best_on_a_store_without_the_experiment_says_so_and_creates_nothing(mlflow_store, capsys):
    assert main(["best", "--experiment", "nowhere", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no experiment 'nowhere'" in err and "feedtune train" in err
    assert MlflowClient(mlflow_store).get_experiment_by_name("nowhere") is None
