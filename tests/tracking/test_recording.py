"""The run recorder on its own: a real feed, a real MLflow SQLite store, no CLI."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from feedtune.tracking import mlflow_store as tracking
from feedtune.tracking.recording import RunRecorder, finish_run
from feedtune.training.trainer import new_model, train_model
from tests.conftest import artifact_paths, tiny_feed


def test_a_recorded_run_logs_its_inputs_epochs_results_and_feed(
    tiny_folder, tmp_path, mlflow_store, one_torch_thread
):
    over = ["train.epochs=2", "train.patience=0", "train.measure_batches=2", "model.width=4"]
    cfg, data, feed = tiny_feed(tiny_folder, *over, "experiment=rec")
    tracking.setup(cfg.experiment)
    with tracking.start_run("train", system_metrics=False) as run:
        recorder = RunRecorder(cfg, data, feed, tmp_path)
        model = new_model(cfg, len(feed.classes))
        outcome = train_model(
            cfg, feed, model=model, folder=tmp_path, progress=False, callbacks=[recorder]
        )
        finish_run(cfg, outcome, feed, model)
    client = MlflowClient()
    paths = artifact_paths(client, run.info.run_id)
    assert {
        "config/resolved.yaml",
        "split/summary.json",
        "augment/train.yaml",
        "augment/samples.png",
        "feed/feed.json",
        "sampler/epoch_class_counts.csv",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "plots/confusion_matrix.png",
    } <= paths
    history = client.get_metric_history(run.info.run_id, "val_f1_macro")
    assert [m.step for m in history] == [0, 1]  # one value per epoch, step = epoch
    rates = client.get_metric_history(run.info.run_id, "epoch_samples_per_s")
    assert [m.step for m in rates] == [0, 1] and all(m.value > 0 for m in rates)
    waits = client.get_metric_history(run.info.run_id, "epoch_data_wait_frac")
    assert all(0 <= m.value <= 1 for m in waits) and len(waits) == 2
    local = client.download_artifacts(run.info.run_id, "feed/feed.json", str(tmp_path))
    described = json.loads(Path(local).read_text())
    assert described["device"] == "cpu" and described["world_size"] == 1
    assert described["global_batch_size"] == 8 and described["train_batches"] == len(feed.train)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"best_val_f1_macro", "train_samples_per_s", "loader_samples_per_s"} <= set(metrics)
