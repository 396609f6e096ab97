"""A study's parent run keeps a heartbeat: a worker on another machine that is SIGKILLed
leaves a run whose heartbeat stops, and the next worker closes it after the grace."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from mlflow.tracking import MlflowClient

from feedtune.tracking import mlflow_store as tracking
from tests.conftest import REPO, env_with_src, reaped

# A worker that looks remote (another host name: its pid cannot be checked from here) opens a
# study run with a fast heartbeat and waits to be killed.
REMOTE_WORKER = textwrap.dedent(
    """
    import socket, sys, time
    socket.gethostname = lambda: "another-machine"
    from feedtune.tracking import mlflow_store
    mlflow_store.setup("beats")
    with mlflow_store.start_run("study", run_name="s", system_metrics=False) as run:
        with mlflow_store.heartbeat(run.info.run_id, every_s=0.3):
            print(run.info.run_id, flush=True)
            time.sleep(120)
    """
)


def _heartbeat(client: MlflowClient, run_id: str) -> float:
    return float(client.get_run(run_id).data.tags["feedtune.heartbeat"])


def test_a_killed_remote_workers_parent_run_is_closed_after_the_grace(mlflow_store):
    env = {**env_with_src(), "MLFLOW_TRACKING_URI": mlflow_store}
    worker = subprocess.Popen(
        [sys.executable, "-c", REMOTE_WORKER],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient()
    with reaped(worker):
        run_id = worker.stdout.readline().strip()
        first = _heartbeat(client, run_id)
        time.sleep(1.0)
        assert _heartbeat(client, run_id) > first  # the worker keeps it moving
        tracking.setup("beats")
        assert tracking.close_dead_runs("beats", grace_s=3.0) == []  # alive: left alone
        worker.kill()
        worker.wait()
    assert client.get_run(run_id).info.status == "RUNNING"  # its pid says nothing here
    assert tracking.close_dead_runs("beats", grace_s=3.0) == []  # within the grace
    time.sleep(3.5)
    assert tracking.close_dead_runs("beats", grace_s=3.0) == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["feedtune.error"] == "worker process died"


def test_a_finished_block_stops_its_heartbeat(mlflow_store):
    tracking.setup("beats-stop")
    with tracking.start_run("study", system_metrics=False) as run:
        with tracking.heartbeat(run.info.run_id, every_s=0.2):
            time.sleep(0.5)
        client = MlflowClient()
        last = _heartbeat(client, run.info.run_id)
        time.sleep(0.6)
        assert _heartbeat(client, run.info.run_id) == last
