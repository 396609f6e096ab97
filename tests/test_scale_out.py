"""Several workers on one study, as on several machines: a real PostgreSQL server as the Optuna
storage and a real ``mlflow server`` as the tracking URI (README "Scaling out")."""

from __future__ import annotations

import collections
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, env_with_src, reaped, tune_command, write_image_folder
from tests.test_reliability import _wait_for_epoch

pytestmark = pytest.mark.slow

WORKERS, TRIALS = 3, 4
# Speed-stage trials: a few real training steps each, no validation, no DataLoader worker
# processes (the machine running the tests may have 2 cores): a second or two per trial.
TINY = """
experiment: {experiment}
augment: {{image_size: 32}}
loader: {{batch_size: 8}}
train: {{epochs: 2, measure_batches: 2, patience: 0}}
search:
  data.decoder: {{choice: [pil, opencv]}}
  speed_steps: 3
  speed_skip_wait_frac: 0
  noise_seeds: 0
  anchors: []
  recheck_seeds: 0
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(
        tmp_path / "imgs", {"red": 16, "green": 12, "blue": 12}, size=(40, 32)
    )


def scale_out_command(tmp: Path, data: Path, experiment: str, *args: str) -> list[str]:
    cfg = tmp / f"{experiment}.yaml"
    cfg.write_text(TINY.format(experiment=experiment))
    return tune_command(cfg, data, *args)


def run_workers(workers: list[tuple[list[str], dict[str, str]]]) -> tuple[list[int], list[str]]:
    """Start the workers (command, extra environment) together; each must exit 0 without a
    traceback. Returns their pids and what each printed (stdout, then stderr)."""
    # One OpenMP thread each: several workers on a 2-core machine would otherwise spin against
    # each other (10x slower steps), as several jobs sharing one real machine would.
    env = {**env_with_src(), "OMP_NUM_THREADS": "1"}
    with reaped() as procs:  # on any failure, every worker started so far is killed and reaped
        for command, more_env in workers:
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env={**env, **more_env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        printed = []
        for p in procs:
            out, err = p.communicate(timeout=540)
            assert p.returncode == 0, err[-3000:]
            assert "Traceback" not in err, err[-3000:]
            printed.append(out + err)
        return [p.pid for p in procs], printed


def assert_shared_study(storage: str, study: str, experiment: str, pids: list[int]) -> list:
    """12 unique COMPLETE trials, 4 per worker, one FINISHED child run each; returns the runs."""
    speed = optuna.load_study(study_name=f"{study}-speed", storage=storage)
    trials = speed.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(WORKERS * TRIALS))
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    per_worker = collections.Counter(t.user_attrs["worker"]["pid"] for t in trials)
    assert per_worker == dict.fromkeys(pids, TRIALS)

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("feedtune.kind") == "trial"]
    assert len(parents) == WORKERS  # one parent run per worker, all on the same study
    assert {r.data.tags["optuna.study_name"] for r in parents} == {study}
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert numbers == list(range(WORKERS * TRIALS))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {r.info.run_id for r in parents}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing left RUNNING
    return children


def test_workers_on_postgres_log_to_an_mlflow_server(
    tmp_path, data, postgres_url, mlflow_server_store
):
    """3 workers x 4 trials on one PostgreSQL study, tracked by a real ``mlflow server``: the
    setup of several machines (one test for all of it: each worker costs seconds of start-up).

    Two workers reach the database with a password (in the URL's user-info on the command
    line, in its query through $FEEDTUNE_STORAGE): it reaches no param, tag, artifact, log
    line or printed line."""
    server = mlflow_server_store
    secret = "pw-s3cret-x"  # the test cluster trusts any password; the URL still carries it
    user_info = postgres_url.replace("feedtune@", f"feedtune:{secret}@", 1)
    in_query = f"{postgres_url}?password={secret}"
    command = scale_out_command(
        tmp_path, data, "scale-out", "--stage", "speed", "--n-trials", str(TRIALS)
    ) + ["--study", "shared"]
    logged = {"FEEDTUNE_LOG": "INFO"}  # every line a worker logs is searched for the password
    pids, printed = run_workers(
        [
            ([*command, "--storage", user_info], logged),
            (command, {**logged, "FEEDTUNE_STORAGE": in_query}),
            ([*command, "--storage", postgres_url], logged),
        ]
    )
    children = assert_shared_study(postgres_url, "shared", "scale-out", pids)
    assert not [text for text in printed if secret in text]
    assert all("***" in text for text in printed[:2])  # the redacted URL is printed

    # Artifacts went through the server: the client sees only mlflow-artifacts:/ URIs, and the
    # files lie in the server's --artifacts-destination.
    client = MlflowClient()
    run = children[0]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    got = Path(client.download_artifacts(run.info.run_id, "config/resolved.yaml", str(tmp_path)))
    (on_server,) = server.artifacts.glob(f"*/{run.info.run_id}/artifacts/config/resolved.yaml")
    assert got.read_text() == on_server.read_text()
    assert "image_size: 32" in got.read_text()

    runs = client.search_runs([client.get_experiment_by_name("scale-out").experiment_id])
    for run in runs:
        assert secret not in repr(run.data.params) + repr(run.data.tags)
    for path in server.artifacts.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".json", ".csv", ".txt", ""}:
            assert secret.encode() not in path.read_bytes(), path


def test_unreachable_storage_is_a_one_line_error(tmp_path, data):
    command = scale_out_command(
        tmp_path, data, "scale-bad", "--storage", "postgresql://u:p@127.0.0.1:1/x", "--study", "x"
    )
    proc = subprocess.run(
        command, cwd=REPO, env=env_with_src(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("feedtune: error: cannot open Optuna storage"), lines[0]
    assert "127.0.0.1" in lines[0]
    assert "Traceback" not in proc.stderr


# Quality trials long enough that a SIGKILL after the first epoch always lands mid-trial
# (~0.3 s an epoch here); the retry resumes from the checkpoint and trains only the rest.
HEARTBEAT_EPOCHS = 10
HEARTBEAT_CONFIG = """
experiment: {experiment}
augment: {{image_size: 32}}
loader: {{batch_size: 8}}
train: {{epochs: {epochs}, measure_batches: 2, patience: 0}}
search:
  train.lr: {{float: [1.0e-3, 1.0e-2], log: true}}
  pruner: none
  noise_seeds: 0
  anchors: []
  recheck_seeds: 0
  speed_skip_wait_frac: 0
"""
ELSEWHERE = "another-machine.example"


def test_a_dead_worker_is_failed_by_its_missed_heartbeats_and_its_trial_retried(
    tmp_path, postgres_url, mlflow_store
):
    """README "Scaling out": a worker that dies stops sending heartbeats; three beats after
    the last one, the next worker to start a trial fails it, queues it again with the same
    parameters (Optuna's retry callback) and ends its MLflow run KILLED; the retry resumes from
    the dead run's checkpoint.

    Both workers run here, so feedtune's own check (is that pid alive on this machine?) would
    find the dead one at once, without heartbeats. The dead worker's records are therefore
    rewritten to name another machine, whose processes cannot be looked up from here: only the
    missed heartbeats can tell that it died, as on a real second machine."""
    data = write_image_folder(
        tmp_path / "imgs", {"red": 60, "green": 40, "blue": 30}, size=(48, 40), groups_of=2
    )
    cfg = tmp_path / "heartbeat.yaml"
    cfg.write_text(HEARTBEAT_CONFIG.format(experiment="heartbeat", epochs=HEARTBEAT_EPOCHS))
    command = tune_command(
        cfg, data, "--stage", "quality", "--storage", postgres_url, "--study", "H"
    ) + ["--n-trials", "1"]
    # Beats 3 s apart, so a worker silent for 9 s is dead: the same rule as the default 10/30 s,
    # sooner.
    heartbeat_s = 3
    env = {**env_with_src(), "OMP_NUM_THREADS": "1", "FEEDTUNE_HEARTBEAT_S": str(heartbeat_s)}
    client = MlflowClient()

    with reaped(subprocess.Popen(command, cwd=REPO, env=env)) as (first,):
        dead_run = _wait_for_epoch(client, "heartbeat", first, "trial")
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = time.monotonic()  # its last heartbeat was at most heartbeat_s before this

    storage = optuna.storages.RDBStorage(postgres_url)  # no heartbeat of its own
    (dead,) = optuna.load_study(study_name="H-quality", storage=storage).get_trials()
    assert dead.state == optuna.trial.TrialState.RUNNING  # nobody could end it
    assert dead.user_attrs["mlflow_run_id"] == dead_run
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("H-quality"), dead.number
    )
    storage.set_trial_user_attr(
        trial_id, "worker", {**dead.user_attrs["worker"], "host": ELSEWHERE}
    )
    exp_id = client.get_experiment_by_name("heartbeat").experiment_id
    running = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
    assert dead_run in {r.info.run_id for r in running}  # its worker's study run is too
    for run in running:
        client.set_tag(run.info.run_id, "feedtune.worker.host", ELSEWHERE)

    # Past the grace period of three beats.
    time.sleep(max(0.0, killed_at + 3 * heartbeat_s + 2 - time.monotonic()))
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]

    trials = optuna.load_study(study_name="H-quality", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    failed, retry = trials
    assert failed.number == dead.number
    # Queued again by the heartbeat's retry callback (a local reap would set retry_of instead).
    assert retry.system_attrs["failed_trial"] == dead.number
    assert "retry_of" not in retry.user_attrs
    assert retry.params == dead.params
    assert client.get_run(dead_run).info.status == "KILLED"
    resumed = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert resumed.info.run_id != dead_run and resumed.info.status == "FINISHED"
    assert resumed.data.tags["feedtune.resumed_from_run_id"] == dead_run
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(HEARTBEAT_EPOCHS))  # the dead run's epochs, then the rest
