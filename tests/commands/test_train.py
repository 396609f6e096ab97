"""`feedtune train` end to end: real CLI process, real MLflow store, real images and workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import (
    REPO,
    artifact_paths,
    env_with_src,
    feedtune_in_process,
    write_image_folder,
)

pytestmark = pytest.mark.slow

CONTRACT_METRICS = {
    "train_loss",
    "val_loss",
    "val_acc",
    "val_f1_macro",
    "best_val_acc",
    "best_val_f1_macro",
    "loader_samples_per_s",
    "model_samples_per_s",
    "train_samples_per_s",
    "data_wait_frac",
    "feed_ratio",
    "n_bad_images",
}
CONTRACT_ARTIFACTS = {
    "split/train.csv",
    "split/val.csv",
    "split/summary.json",
    "config/resolved.yaml",
    "augment/train.yaml",
    "augment/samples.png",
    "checkpoints/best.pt",
    "plots/confusion_matrix.png",
    "sampler/epoch_class_counts.csv",
    "data/bad_images.csv",
    "throughput/transform_costs.csv",
}


def _train_command(data: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "feedtune",
        "train",
        "--no-progress",
        "--set",
        f"data.path={data}",
        "--set",
        "experiment=e2e",
        "--set",
        "augment.image_size=32",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "train.measure_batches=3",
        "--set",
        "loader.batch_size=16",
        "--set",
        "loader.num_workers=1",
        "--set",
        "train.patience=0",
        *extra,
    ]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "imgs", {"red": 40, "green": 20, "blue": 12}, groups_of=4)


def test_train_logs_the_whole_contract_and_repeats_it_with_the_same_seed(
    data, mlflow_store, tmp_path
):
    # Two DataLoader worker processes and albumentations (its own generators, reseeded per
    # sample): the settings where a repeat is hardest to get exactly.
    cmd = _train_command(
        data,
        *("--set", "augment.library=albumentations", "--set", "sampler.kind=weighted"),
        *("--set", "loader.num_workers=2", "--set", "augment.where=sample"),
    )
    # One OpenMP thread, as in this process below: the same arithmetic, bit for bit.
    env = {**env_with_src(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["feedtune.kind"] == "train"
    assert run.data.tags["feedtune.bottleneck"] in {"loader", "model"}
    assert CONTRACT_METRICS <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1_macro")] == [0, 1]
    assert run.data.metrics["best_val_f1_macro"] > 0.5  # three colours: easy
    assert run.data.params["augment.library"] == "albumentations"
    # What chose best.pt (and early stopping) is on record, though a train run searches nothing.
    assert run.data.params["search.metric"] == "val_f1_macro"
    assert CONTRACT_ARTIFACTS <= artifact_paths(client, run.info.run_id)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"train", "val"}

    ckpt_path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints/best.pt", dst_path=str(tmp_path)
    )
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["classes"] == ["blue", "green", "red"]
    assert {"model_state", "config", "epoch", "metrics"} <= set(ckpt)

    # The logged MLflow model answers image files as the checkpoint's network does.
    import pandas as pd

    import feedtune

    files = sorted(str(p) for p in data.rglob("*.jpg"))[::12]
    logged = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    out = logged.predict(pd.DataFrame({"image": files}))
    labels, probs = feedtune.load_best("e2e", device="cpu").predict(files)
    assert list(out["label"]) == labels
    assert np.allclose(np.stack(out["probabilities"]), probs, atol=1e-5)

    # The same command again, in another process (this one): the same split, the same losses.
    again = feedtune_in_process(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    assert {r.data.tags["feedtune.split_digest"] for r in runs} == {
        run.data.tags["feedtune.split_digest"]
    }
    losses = [[m.value for m in client.get_metric_history(r.info.run_id, "val_loss")] for r in runs]
    assert losses[0] == losses[1]


def test_a_default_run_records_the_feed_settings_auto_chose(data, mlflow_store):
    # loader.cache and augment.where left at auto: the run records, and reruns with, what ran.
    cmd = _train_command(data, "--set", "train.measure_batches=0", epochs=1)
    proc = feedtune_in_process(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.data.params["loader.cache"] == "resized"
    assert run.data.params["augment.where"] == "batch"
    resolved = yaml.safe_load(
        mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/resolved.yaml")
    )
    assert resolved["loader"]["cache"] == "resized" and resolved["augment"]["where"] == "batch"


# A user's model as a newcomer writes it: no attribute named classifier, fc, head or heads.
SEQUENTIAL_FACTORY = """
from torch import nn


def make_net(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )
"""


def test_a_factory_s_plain_sequential_trains_without_a_named_head(
    data, mlflow_store, tmp_path, monkeypatch
):
    name = f"seqzoo_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "pkgs"
    folder.mkdir()
    (folder / f"{name}.py").write_text(SEQUENTIAL_FACTORY)
    monkeypatch.syspath_prepend(str(folder))
    cmd = _train_command(data, "--set", f"model.name={name}:make_net", epochs=1)
    try:
        proc = feedtune_in_process([*cmd, "--set", "train.measure_batches=0"])
    finally:
        sys.modules.pop(name, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val_f1_macro" in run.data.metrics
    assert run.data.params["model.name"] == f"{name}:make_net"
