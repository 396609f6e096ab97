"""Shared fixtures: tiny real datasets on disk and a throw-away MLflow store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# Under pytest-xdist every core already runs a test: torch in each worker, and in the
# processes its tests start (they inherit the variable), gets one OpenMP thread, as more
# threads than free cores only spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tiny models on a busy 2-core VM: two OpenMP threads spin against each other (~10x slower
# steps), so tests that train run torch on one thread, with the library's own context manager.
from feedtune.feed.dataset import single_torch_thread

REPO = Path(__file__).resolve().parents[1]


def write_image_folder(
    root: Path, counts: dict[str, int], *, size=(96, 80), seed: int = 0, groups_of: int = 0
) -> Path:
    """Real JPEGs in ``root/<class>/``: each class a distinct colour + noise, learnable fast.
    With ``groups_of`` > 0 a ``manifest.csv`` with a group column is written too."""
    rng = np.random.default_rng(seed)
    rows = []
    palette = [
        (220, 40, 40),
        (40, 200, 60),
        (40, 60, 220),
        (230, 200, 30),
        (200, 40, 200),
        (30, 200, 200),
    ]
    for c, (label, n) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.array(palette[c % len(palette)], dtype=np.int16)
            img = np.clip(base + rng.integers(-40, 40, size=(size[1], size[0], 3)), 0, 255).astype(
                np.uint8
            )
            path = root / label / f"{label}_{i:03d}.jpg"
            Image.fromarray(img).save(path, quality=90)
            group = f"{label}-{i // groups_of}" if groups_of else ""
            rows.append({"path": f"{label}/{path.name}", "label": label, "group": group})
    if groups_of:
        pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def tiny_checkpoint(classes=("a", "b"), *overrides: str, seed: int = 0) -> dict:
    """A checkpoint payload as training writes one (weights, ``model_args``, classes, config)
    for an untrained 2-block small_cnn at 32 px: what ``mlflow_models.log_model`` logs,
    without training a run."""
    import torch

    from feedtune.config import load_config
    from feedtune.training.models import build_model, model_args

    over = ["augment.image_size=32", "model.width=4", "model.depth=2", *overrides]
    cfg = load_config(None, over)
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=len(classes))
    return {
        "model_state": model.state_dict(),
        "model_args": model_args(cfg.model),
        "classes": list(classes),
        "config": cfg.to_dict(),
    }


def encoded_image(size=(40, 30), *, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A real encoded image (noise) of ``size`` (width, height) in format ``fmt``."""
    import io

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "imgs", {"a": 24, "b": 12, "c": 8}, groups_of=4)


TINY_RUN = ["augment.image_size=32", "loader.batch_size=8", "train.measure_batches=0"]


def tiny_feed(folder: Path, *overrides: str, policy_on: str | None = None):
    """(config, prepared data, Feed on the CPU) for the images in ``folder``: 32 px, batches
    of 8, then ``overrides`` (dotted ``key=value``)."""
    import torch

    from feedtune.config import load_config
    from feedtune.feed.feed import build_feed
    from feedtune.sources.prepare import prepare_data

    cfg = load_config(None, [f"data.path={folder}", *TINY_RUN, *overrides])
    data = prepare_data(cfg, progress=False)
    return cfg, data, build_feed(cfg, data, torch.device("cpu"), policy_on=policy_on)


def train_tiny(cfg, feed, folder: Path, **kwargs):
    """``train_model`` of a new model for ``cfg`` on ``feed``, checkpoints in ``folder``,
    without progress; ``kwargs`` go to ``train_model``."""
    from feedtune.training.trainer import new_model, train_model

    model = new_model(cfg, len(feed.classes))
    return train_model(cfg, feed, model=model, folder=folder, progress=False, **kwargs)


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLflow's schema migrations take seconds: run them once, copy the file per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_mlflow_db: Path) -> str:
    """A temporary SQLite tracking store; artifacts land beside it in ``mlruns/``."""
    import shutil

    import mlflow

    shutil.copy(_empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run, as paths relative to its artifact root."""
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


def tune_command(config: Path, data: Path, *args: str) -> list[str]:
    """``feedtune tune`` on the images in ``data`` with the config file ``config``."""
    return [
        sys.executable,
        "-m",
        "feedtune",
        "tune",
        "--no-progress",
        "--config",
        str(config),
        "--set",
        f"data.path={data}",
        *args,
    ]


def feedtune_in_process(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a ``python -m feedtune ...`` command line) in this process, its exit code
    and output as ``subprocess.run`` returns them. For tests about what a command does and
    records rather than about processes: a fresh interpreter spends seconds importing torch,
    MLflow and the rest, the larger part of a tiny run's time here."""
    import io
    import logging
    import signal

    from feedtune import logs
    from feedtune.cli import main

    assert cmd[1:3] == ["-m", "feedtune"], cmd
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # main installs its own
    # main quiets MLflow and Optuna for its process: not for the tests that run after it.
    env = {k: os.environ.get(k) for k in (logs.MLFLOW_LEVEL_ENV, logs.MLFLOW_BARS_ENV)}
    levels = {name: logging.getLogger(name).level for name in logs.LIBRARIES}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with single_torch_thread():
                code = main(cmd[3:])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen) -> Iterator[list[subprocess.Popen]]:
    """Child processes that never outlive the block: whatever ends it (a failed assertion, a
    timeout, Ctrl-C), each one still running is killed (SIGKILL), then every one is waited for
    and its pipes are closed, so no test leaves a worker training in the background. Yields
    the list of ``procs``; processes started in the block are appended to it as they start, so
    one that fails to start does not leave those before it running."""
    children = list(procs)
    try:
        yield children
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
        for proc in children:
            try:
                proc.communicate(timeout=60)  # reaps it and drains, then closes, its pipes
            except (subprocess.TimeoutExpired, ValueError, OSError):
                proc.kill()
                proc.wait()


def env_with_src() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


# Real servers (PostgreSQL, mlflow server, Chromium) for the scale-out and browser tests.
from tests.servers import (  # noqa: E402, F401
    chromium_browser,
    mlflow_server,
    mlflow_server_store,
    postgres_server,
    postgres_url,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow end-to-end tests first, the rest after (stable within a module):
    with one module per xdist worker, the short modules then fill the workers' last minutes
    instead of one long module running alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)


def run_at_once(
    commands: list[list[str]], *, env: dict[str, str], timeout: float = 400
) -> list[str]:
    """Start every command at once (from the repository root), wait for all, and return each
    one's stderr; a command that fails fails the test with the end of its stderr."""
    with reaped() as procs:
        for cmd in commands:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=timeout) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-4000:]
    return [err for _, err in outputs]
