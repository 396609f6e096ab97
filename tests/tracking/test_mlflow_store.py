"""The MLflow adapter: first use of a fresh store by several processes, URL redaction."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from feedtune.tracking.urls import redact
from tests.conftest import REPO, env_with_src

SETUP = (
    "import sys; from feedtune.tracking import mlflow_store; mlflow_store.setup('x', sys.argv[1])"
)


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_together_all_succeed(tmp_path):
    # Without a lock, two processes race inside MLflow's schema migrations and one dies.
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SETUP, uri], cwd=REPO, env=env_with_src(), stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    assert sorted(e.name for e in MlflowClient(uri).search_experiments()) == ["Default", "x"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@db:5432/d", "postgresql://u:***@db:5432/d"),
        ("postgresql://u:p@ss:w@db/d", "postgresql://u:***@db/d"),
        (
            "postgresql://db/d?user=u&password=s3cret&sslmode=require",
            "postgresql://db/d?user=u&password=***&sslmode=require",
        ),
        ("http://u:s3cret@mlflow-host:5000", "http://u:***@mlflow-host:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("journal:/tmp/optuna.journal", "journal:/tmp/optuna.journal"),
        ("postgresql://u@db/d", "postgresql://u@db/d"),
    ],
)
def test_redact_hides_passwords_in_user_info_and_query(url, shown):
    assert redact(url) == shown


def test_every_experiment_carries_the_runs_view_its_ui_address_opens(mlflow_store):
    from feedtune.tracking import mlflow_store as store

    assert store.ui_address("absent") is None
    client = MlflowClient()
    older = client.create_experiment("older")  # made before feedtune kept a view in it
    exp_id = store.setup("new")
    for eid in (exp_id, store.setup("older")):
        view = client.get_experiment(eid).tags["mlflow.sharedViewState.feedtune"]
        assert "metrics.`val_f1_macro`" in view and "tags.`feedtune.bottleneck`" in view
    assert store.setup("older") == older
    address = store.ui_address("new")
    assert address == (
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey=feedtune (with `mlflow ui --backend-store-uri {mlflow_store}` running)"
    )
