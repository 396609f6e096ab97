"""``feedtune inspect`` against a throw-away SQLite MLflow store: one run, its artifacts and
metrics, and the printed report with its advice."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from feedtune.commands.inspect import METRICS, run_inspect
from feedtune.config import load_config
from tests.conftest import artifact_paths
from tests.sources.test_inspection import N_COPIES, write_leaky_folder


def test_inspect_logs_one_run_and_prints_the_advice(tmp_path, mlflow_store, capsys):
    root = write_leaky_folder(tmp_path / "imgs")
    cfg = load_config(
        None,
        [
            f"data.path={root}",
            "experiment=inspect-test",
            "augment.image_size=16",
            # inspect lists every bad file instead of stopping at the first
            "data.on_bad_image=raise",
        ],
    )
    run_id = run_inspect(cfg, progress=False)

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "inspect"
    assert run.data.tags["feedtune.kind"] == "inspect"
    exp = client.get_experiment_by_name("inspect-test")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]

    files = artifact_paths(client, run_id)
    assert {"inspect/summary.json", "inspect/files.csv", "inspect/class_counts.png"} <= files
    assert {"inspect/image_sizes.png", "inspect/aspect_ratios.png", "inspect/examples.png"} <= files

    local = client.download_artifacts(run_id, "inspect/summary.json", str(tmp_path))
    summary = json.loads(Path(local).read_text())
    assert summary["imbalance_ratio"] == 10.0 and summary["duplicates"]["n_leaked_sets"] == 1
    table = pd.read_csv(client.download_artifacts(run_id, "inspect/files.csv", str(tmp_path)))
    assert len(table) == 56 and "a/broken.jpg" in set(table["path"])

    metrics = run.data.metrics
    assert set(METRICS) <= set(metrics)
    assert metrics["n_images"] == 55 and metrics["n_classes"] == 2
    assert metrics["imbalance_ratio"] == 10.0 and metrics["n_bad_images"] == 1
    assert metrics["n_duplicate_files"] == N_COPIES + 1 and metrics["n_leaked_duplicates"] == 1

    out = capsys.readouterr().out
    pair = summary["duplicates"]["leaks"][0]
    assert "--set sampler.kind=weighted" in out and "--set loader.cache=resized" in out
    assert f"{pair['train']} (train) == {pair['val']} (val)" in out
    assert run_id in out
