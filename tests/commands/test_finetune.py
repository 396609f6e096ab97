"""Transfer learning: ``feedtune.load_best`` and ``feedtune finetune`` (issue 6).

Runs train in-process on tiny images (32 px, 2 epochs); only the registry check runs in a fresh
process, because that is what it is about.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import feedtune
from feedtune.cli import main as feedtune_main
from feedtune.commands.finetune import prepare_model, run_finetune
from feedtune.commands.train import run_train
from feedtune.config import load_config, with_overrides
from feedtune.sources.imageio import decode_image
from feedtune.tracking import mlflow_models
from feedtune.tracking import mlflow_store as tracking
from feedtune.tracking.lookup import fetch_checkpoint, resolve_run_id
from feedtune.training.checkpoint import CheckpointError, load_checkpoint
from feedtune.training.engine import Callback, build_optimizer
from feedtune.training.models import head_parameters, set_backbone_trainable
from feedtune.training.trainer import train_model
from tests.commands.test_train import CONTRACT_ARTIFACTS, CONTRACT_METRICS
from tests.conftest import (
    REPO,
    feedtune_in_process,
    single_torch_thread,
    tiny_feed,
    write_image_folder,
)

TINY = [
    "augment.image_size=32",
    "train.epochs=2",
    "train.measure_batches=2",
    "train.patience=0",
    "loader.batch_size=16",
    "split.val_fraction=0.25",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty SQLite store: creating one costs seconds (schema migrations),
    copying one costs milliseconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(mlflow_store: str, empty_db: Path) -> str:
    shutil.copy(empty_db, mlflow_store[len("sqlite:///") :])
    return mlflow_store


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    return write_image_folder(
        # 120x100: large enough for reduced-scale JPEG decoding at image_size 32, which
        # predict must reproduce to agree with validation.
        tmp_path / "colours",
        {"red": 24, "green": 20, "blue": 20},
        size=(120, 100),
        groups_of=4,
    )


def _train(data: Path, experiment: str, *extra: str) -> str:
    """A source run; its throughput is not under test here, so it is not measured."""
    over = [*TINY, f"data.path={data}", f"experiment={experiment}", "train.measure_batches=0"]
    cfg = load_config(None, [*over, *extra])
    return run_train(cfg, progress=False)


def _val_images(run_id: str, dst: Path) -> pd.DataFrame:
    """The run's validation split with absolute paths."""
    folder = Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="split", dst_path=dst)
    )
    root = Path(json.loads((folder / "summary.json").read_text())["root"])
    val = pd.read_csv(folder / "val.csv")
    return val.assign(path=[str(root / p) for p in val["path"]])


def _val_acc_of_best_epoch(run_id: str) -> float:
    client = MlflowClient()
    best_epoch = int(client.get_run(run_id).data.metrics["best_epoch"])
    (acc,) = [m.value for m in client.get_metric_history(run_id, "val_acc") if m.step == best_epoch]
    return acc


# Run in a fresh interpreter: it imports first (while the test trains), then waits for the
# file names on stdin, loads the registered model through MLflow alone and predicts.
FRESH_PROCESS = """
import sys, numpy as np, pandas as pd, mlflow
list_path, out_path, uri = sys.stdin.readline().split()
model = mlflow.pyfunc.load_model(uri)  # code plus data (weights, JSON), no pickle inside
paths = open(list_path).read().splitlines()
np.save(out_path, np.stack(model.predict(pd.DataFrame({"image": paths}))["probabilities"]))
"""


@pytest.mark.slow
def test_load_best_finds_the_best_run_then_the_alias_and_a_fresh_process_agrees(
    store, colours, tmp_path
):
    # MLflow refuses any pickle with this set: the registered model must load without one.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    fresh = subprocess.Popen(
        [sys.executable, "-c", FRESH_PROCESS],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        good = _train(colours, "src")
        bad = _train(colours, "src", "train.lr=1.0e-8", "train.epochs=1")  # learns nothing
        client = MlflowClient()
        f1 = {r: client.get_run(r).data.metrics["best_val_f1_macro"] for r in (good, bad)}
        assert f1[good] > f1[bad]

        # No registered model: the finished run with the highest best_val_f1_macro.
        best = feedtune.load_best("src", store)
        assert best.run_id == good
        assert best.classes == ["blue", "green", "red"]
        assert not best.model.training and best.config.experiment == "src"

        # The alias wins over a better run.
        moved, _ = mlflow_models.register_if_better(bad, "src", metric="best_val_f1_macro")
        assert moved
        best = feedtune.load_best("src", store, device="cpu")
        assert best.run_id == bad

        # predict on the val images reproduces the logged val_acc of the checkpointed epoch.
        val = _val_images(bad, tmp_path / "dl")
        labels, probs = best.predict(list(val["path"]))
        assert probs.shape == (len(val), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        acc = float(np.mean(np.array(labels) == val["label"].to_numpy()))
        assert acc == pytest.approx(_val_acc_of_best_epoch(bad))
        assert 0 < acc < 1  # a real check, not a trivially perfect model

        # MLflow's own loader of models:/src@best, in a fresh process, predicts the same.
        (tmp_path / "x.txt").write_text("\n".join(val["path"]))
        line = f"{tmp_path / 'x.txt'} {tmp_path / 'p.npy'} models:/src@best\n"
        _, err = fresh.communicate(line, timeout=300)
        assert fresh.returncode == 0, err[-3000:]
        other = np.load(tmp_path / "p.npy")
        assert np.allclose(other, probs, atol=1e-5)
        assert [best.classes[i] for i in other.argmax(1)] == labels
    finally:
        if fresh.poll() is None:
            fresh.kill()
            fresh.wait()

    # PIL images of any mode are RGB arrays to predict; one path is a batch of one.
    arrays = [decode_image(p) for p in val["path"][:3]]
    pil = [Image.fromarray(a).convert("RGBA") for a in arrays]
    assert np.allclose(best.predict(pil)[1], best.predict(arrays)[1], atol=1e-6)
    assert best.predict(val["path"][0])[0] == labels[:1]

    # Every --from form names the same run.
    assert resolve_run_id("best", experiment="src") == bad
    assert resolve_run_id("models:/src@best") == bad
    assert resolve_run_id("models:/src/1") == bad
    assert resolve_run_id(f"runs:/{good}/model") == good
    with pytest.raises(LookupError, match="not 'best'"):
        resolve_run_id("no-such-run")
    with pytest.raises(LookupError, match="no registered model 'nothing'"):
        feedtune.load_best("nothing", store)


@pytest.mark.slow
def test_finetune_replaces_the_head_freezes_the_backbone_and_records_lineage(
    store, colours, tmp_path
):
    source = _train(colours, "src", "model.width=8", "model.depth=3")
    new_data = write_image_folder(
        tmp_path / "new", {"cyan": 20, "magenta": 20}, size=(48, 40), seed=1, groups_of=4
    )
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.path={new_data}",
            "experiment=ft",
            "model.freeze=backbone",
            "model.name=resnet18",  # ignored: the source's architecture wins
        ],  # and so do its width and depth (the config's defaults are 24 and 5)
    )
    run_id = run_finetune(cfg, source=source, progress=False)

    client = MlflowClient()
    run = client.get_run(run_id)
    arch = {k: run.data.params[f"model.{k}"] for k in ("name", "width", "depth")}
    assert arch == {"name": "small_cnn", "width": "8", "depth": "3"}
    assert run.info.status == "FINISHED"
    assert run.data.tags["feedtune.kind"] == "finetune"
    assert run.data.tags["feedtune.parent_model_run_id"] == source
    assert run.data.tags["feedtune.head_replaced"] == "true"
    assert CONTRACT_METRICS <= set(run.data.metrics)

    def artifacts(path=""):
        out = set()
        for item in client.list_artifacts(run_id, path):
            out |= artifacts(item.path) if item.is_dir else {item.path}
        return out

    assert CONTRACT_ARTIFACTS <= artifacts()
    assert client.list_artifacts(run_id, "model")  # the MLflow model too

    before = fetch_checkpoint(source, tmp_path / "src")
    after = fetch_checkpoint(run_id, tmp_path / "ft")
    assert after["classes"] == ["cyan", "magenta"]
    assert after["config"]["model"]["name"] == "small_cnn"
    # A new 2-class head on the source's features (3 classes before).
    features = before["model_state"]["classifier.1.weight"].shape[1]
    assert before["model_state"]["classifier.1.weight"].shape == (3, features)
    assert after["model_state"]["classifier.1.weight"].shape == (2, features)
    # Frozen: every backbone parameter is exactly the source's (BatchNorm statistics may move).
    backbone = [k for k in before["model_state"] if k.startswith("features.")]
    params = [k for k in backbone if k.endswith(("weight", "bias"))]
    assert params
    for key in params:
        assert torch.equal(after["model_state"][key], before["model_state"][key]), key

    # One step by hand: frozen parameters get no gradient and do not move; the head learns.
    start = prepare_model(before, cfg, ["cyan", "magenta"])
    model = start.model.train()
    assert start.head_replaced and start.source_classes == ["blue", "green", "red"]
    head = {id(p) for p in head_parameters(model)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in head}
    optimizer = build_optimizer(model, cfg.train, finetune=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.train.lr * cfg.train.backbone_lr_scale
    )
    loss = torch.nn.functional.cross_entropy(
        model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1] * 2)
    )
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if id(param) in head:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name
            assert torch.equal(param.detach(), frozen[name]), name

    # Same classes in the same order: the trained head is kept, and freeze=none trains it all.
    same = prepare_model(before, with_overrides(cfg, {"model.freeze": "none"}), before["classes"])
    assert not same.head_replaced
    assert torch.equal(
        same.model.classifier[1].weight, before["model_state"]["classifier.1.weight"]
    )
    assert all(p.requires_grad for p in same.model.parameters())


@pytest.mark.slow
def test_finetune_command_runs_with_its_default_config(store, colours, tmp_path, monkeypatch):
    """`feedtune finetune --from RUN_ID` with the parser's default config
    (experiments/finetune-shapes-shift.yaml) and only --set to point it at tiny new data."""
    source = _train(colours, "src", "model.width=8")
    new_data = write_image_folder(
        tmp_path / "new", {"cyan": 20, "magenta": 20}, size=(48, 40), seed=1, groups_of=4
    )
    settings = [
        f"data.path={new_data}",
        "train.epochs=1",
        "train.measure_batches=0",
        "augment.image_size=32",
    ]
    for leaked in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(leaked, raising=False)  # other tests' MLflow state must not steer it
    monkeypatch.chdir(REPO)  # where a user runs it: the default config's path is relative
    proc = feedtune_in_process(
        [sys.executable, "-m", "feedtune", "finetune", "--no-progress", "--from", source]
        + [f"--set={s}" for s in settings]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient()
    # The default config names no experiment: the runs are named after the data's folder.
    exp = client.get_experiment_by_name("feedtune-new")
    assert exp is not None, proc.stderr[-3000:]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["feedtune.kind"] == "finetune"
    assert run.data.tags["feedtune.parent_model_run_id"] == source
    assert run.info.run_id in proc.stdout
    # The default config's own settings, under the --set ones; the source's architecture.
    params = run.data.params
    assert params["model.freeze"] == "backbone" and params["train.unfreeze_after"] == "2"
    assert params["loader.batch_size"] == "16"
    assert params["data.path"] == str(new_data) and params["train.epochs"] == "1"
    assert params["model.width"] == "8"
    assert fetch_checkpoint(run.info.run_id, tmp_path / "ft")["classes"] == ["cyan", "magenta"]


def test_unfreeze_after_trains_the_backbone_from_that_epoch(colours, tmp_path):
    """train_model with a model prepared for finetuning: epoch 0 moves only the head, epoch 1
    the backbone too (at the lower finetuning learning rate)."""
    from feedtune.training.models import build_model

    cfg, _, feed = tiny_feed(
        colours, *TINY, "model.freeze=backbone", "train.unfreeze_after=1", "model.width=4"
    )
    model = build_model(cfg.model, num_classes=3)
    set_backbone_trainable(model, False)
    head = {id(p) for p in head_parameters(model)}

    class Moved(Callback):
        def __init__(self):
            self.last = self.snapshot()
            self.moved: list[tuple[bool, bool]] = []

        def snapshot(self):
            return [p.detach().clone() for p in model.parameters()]

        def on_epoch_end(self, epoch, metrics, **_):
            now = self.snapshot()
            changed = [not torch.equal(a, b) for a, b in zip(self.last, now, strict=True)]
            ids = [id(p) for p in model.parameters()]
            backbone = any(c for c, i in zip(changed, ids, strict=True) if i not in head)
            head_moved = any(c for c, i in zip(changed, ids, strict=True) if i in head)
            self.moved.append((backbone, head_moved))
            self.last = now

    moved = Moved()
    train_model(
        cfg, feed, folder=tmp_path, model=model, finetune=True, callbacks=[moved], progress=False
    )
    assert moved.moved == [(False, True), (True, True)]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(store, colours, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "best.pt"
    torch.save({"model_state": _Evil(marker), "classes": ["a"], "config": {}}, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil)
    tracking.setup("evil")
    with mlflow.start_run() as run:
        mlflow.set_tag("feedtune.kind", "train")
        mlflow.log_metric("best_val_f1_macro", 0.99)
        mlflow.log_artifact(str(evil), artifact_path="checkpoints")
    run_id = run.info.run_id

    with pytest.raises(CheckpointError, match=f"run {run_id}: refusing"):
        feedtune.load_best("evil", store)
    assert not marker.exists()

    cfg = load_config(None, [*TINY, f"data.path={colours}", "experiment=ft-evil"])
    with pytest.raises(CheckpointError, match="refusing"):
        run_finetune(cfg, source=run_id, progress=False)
    assert not marker.exists()
    assert MlflowClient().get_experiment_by_name("ft-evil") is None  # no run was opened

    # The command prints the reason and exits 1.
    argv = ["finetune", "--from", "best", "--source-experiment", "evil", "--no-progress"]
    argv += [f"--set={o}" for o in [*TINY, f"data.path={colours}", "experiment=ft-evil"]]
    assert feedtune_main(argv) == 1
    assert "refusing" in capsys.readouterr().err
    assert not marker.exists()
