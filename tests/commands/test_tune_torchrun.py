"""`torchrun -m feedtune tune`: a process group is one worker of the study (rank 0 owns it and
sends each trial to the others), with real `torchrun` processes on gloo, a real journal storage
and a real MLflow store."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, env_with_src, reaped, run_at_once, write_image_folder
from tests.training.test_distributed import _free_port, _rank_process

pytestmark = pytest.mark.slow

RECORD = "INFO feedtune.tuning.trial_group: trains "


def _config(tmp: Path, experiment: str, **train: object) -> Path:
    path = tmp / f"{experiment}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "experiment": experiment,
                "augment": {"image_size": 32},
                "loader": {"batch_size": 8},
                "train": {"epochs": 2, "patience": 0, "measure_batches": 0, **train},
                "search": {
                    "train.lr": {"float": [1.0e-7, 1.0e-2], "log": True},
                    "data.decoder": {"choice": ["pil", "opencv"]},
                    "speed_steps": 3,
                    # Optuna's median pruner: it decides on two trials, where feedtune's own
                    # needs a calibrated study (tests/tuning/test_trust.py); rank 0 asks either.
                    "pruner": "median",
                    "pruner_startup_trials": 1,
                    "pruner_warmup_epochs": 0,
                    "noise_seeds": 0,
                    "anchors": [],
                    "calibration_trials": 0,
                    "recheck_seeds": 0,
                    "speed_skip_wait_frac": 0,
                },
            }
        )
    )
    return path


def _torchrun_tune(config: Path, data: Path, storage: Path, *args: str) -> list[str]:
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(_free_port())),
        *("-m", "feedtune", "tune", "--no-progress", "--config", str(config)),
        *("--set", f"data.path={data}", "--storage", f"journal:{storage}", *args),
    ]


def _env(mlflow_store: str) -> dict[str, str]:
    # INFO: every rank logs what it trains each trial with (its own record).
    return {
        **env_with_src(),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": mlflow_store,
        "FEEDTUNE_LOG": "INFO",
    }


def _records(stderr: str) -> dict[int, dict[tuple[str, int | None], dict]]:
    """rank -> (study, trial number) -> the params that rank trained that trial with."""
    out: dict[int, dict] = collections.defaultdict(dict)
    for line in stderr.splitlines():
        if line.startswith(RECORD):
            row = json.loads(line[len(RECORD) :])
            assert row["world_size"] == 2
            key = (row["study"], row["trial"])
            assert key not in out[row["rank"]], f"rank {row['rank']} trained {key} twice"
            out[row["rank"]][key] = row["params"]
    return dict(out)


def _journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(
        tmp_path / "imgs", {"red": 48, "green": 32, "blue": 24}, size=(48, 40), groups_of=2
    )


def test_a_torchrun_group_runs_a_study_with_pruning(tmp_path, data, mlflow_store):
    """4 quality trials on 2 processes: hopeless learning rates queued 2nd and 4th fall below
    the median after the first epoch and are pruned on both ranks; every trial run is rank
    0's, tagged with the world size, and logs the global batch and the linearly scaled
    learning rate."""
    storage = tmp_path / "optuna.journal"
    queued = optuna.create_study(
        study_name="G-quality", storage=_journal(storage), direction="maximize"
    )
    for lr in (5e-3, 1e-7, 5e-3, 1e-7):  # the same seed: the two good ones tie at the rung
        queued.enqueue_trial({"train.lr": lr})
    config = _config(tmp_path, "ddp-tune", lr_scaling="linear")
    cmd = _torchrun_tune(config, data, storage, "--stage", "quality", "--n-trials", "4")
    cmd += ["--study", "G"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(mlflow_store), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]  # torchrun: every rank exited 0
    assert proc.stdout.count("parent run") == 1  # rank 0 alone reports

    trials = optuna.load_study(study_name="G-quality", storage=_journal(storage)).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"], states
    records = _records(proc.stderr)
    assert sorted(records) == [0, 1]
    for trial in trials:  # each rank's own record: the trial's parameters, on both
        key = ("G-quality", trial.number)
        assert records[0][key] == records[1][key] == trial.params, (key, records)

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ddp-tune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["feedtune.kind"] == "study"]
    children = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if r.data.tags["feedtune.kind"] == "trial"
    }
    assert sorted(children) == [0, 1, 2, 3]
    assert parent.data.tags["feedtune.world_size"] == "2"
    assert parent.info.status == "FINISHED"
    for trial in trials:
        run = children[trial.number]
        assert run.data.tags["feedtune.world_size"] == "2"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        assert run.info.status == expected
        params = run.data.params
        assert params["global_batch_size"] == "16"  # 2 processes x loader.batch_size 8
        assert float(params["lr_scaled"]) == pytest.approx(2 * trial.params["train.lr"])
    assert children[1].data.tags["feedtune.stopped"] == "pruned"


def _wait_for_trial_epoch(client: MlflowClient, experiment: str, agent: subprocess.Popen) -> str:
    """The id of the first trial run that has logged an epoch."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert agent.poll() is None, "torchrun ended before a trial logged an epoch"
        exp = client.get_experiment_by_name(experiment)
        for run in client.search_runs([exp.experiment_id]) if exp else []:
            trial = run.data.tags.get("feedtune.kind") == "trial"
            if trial and "val_f1_macro" in run.data.metrics:
                return run.info.run_id
        time.sleep(0.5)
    raise AssertionError("no trial epoch logged within 240 s")


def test_a_killed_rank_ends_the_group_and_the_next_tune_retries_its_trial(
    tmp_path, data, mlflow_store
):
    """Rank 1 killed mid-trial: rank 0 ends within train.dist_timeout_s (+ slack) with one
    line, the trial is failed (nothing left RUNNING) and queued again; the next `tune` on the
    study (here with 2 epochs) resumes it from the dead run's checkpoint."""
    timeout_s, slack_s = 20, 30
    storage = tmp_path / "optuna.journal"
    config = _config(tmp_path, "ddp-tune-kill", epochs=500, dist_timeout_s=timeout_s)
    cmd = _torchrun_tune(config, data, storage, "--stage", "quality", "--n-trials", "1")
    cmd += ["--study", "K", "--set", "search.pruner=none"]
    client = MlflowClient()
    err_path = tmp_path / "stderr.txt"
    workers: list[psutil.Process] = []
    with open(err_path, "w") as err, reaped() as procs:
        agent = subprocess.Popen(
            cmd, cwd=REPO, env=_env(mlflow_store), stdout=subprocess.DEVNULL, stderr=err
        )
        procs.append(agent)
        try:
            dead_run = _wait_for_trial_epoch(client, "ddp-tune-kill", agent)
            workers = psutil.Process(agent.pid).children()
            deadline = time.monotonic() + 60
            victim, main = (_rank_process(agent, rank, deadline) for rank in (1, 0))
            lost_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            main.wait(timeout=timeout_s + slack_s)
            took = time.monotonic() - lost_at
            code = agent.wait(timeout=60)
        finally:
            for worker in workers:  # whatever happened, no rank keeps training
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    worker.kill()
    stderr = err_path.read_text()
    assert code != 0 and took < timeout_s + slack_s, stderr[-4000:]
    said = [line for line in stderr.splitlines() if line.startswith("feedtune: ")]
    assert any(
        line.startswith(("feedtune: error: process group: another", "feedtune: interrupted"))
        for line in said
    ), stderr[-4000:]

    study = optuna.load_study(study_name="K-quality", storage=_journal(storage))
    failed, queued = study.trials
    assert (failed.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert queued.user_attrs["retry_of"] == failed.number
    exp_id = client.get_experiment_by_name("ddp-tune-kill").experiment_id
    assert not client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
    assert client.get_run(dead_run).info.status in ("FAILED", "KILLED")

    again = subprocess.run(
        [*_torchrun_tune(config, data, storage, "--stage", "quality", "--n-trials", "1")]
        + ["--study", "K", "--set", "search.pruner=none", "--set", "train.epochs=2"],
        cwd=REPO,
        env=_env(mlflow_store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    trials = optuna.load_study(study_name="K-quality", storage=_journal(storage)).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    assert retry.params == failed.params and retry.user_attrs["retry_of"] == failed.number
    resumed = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert resumed.info.status == "FINISHED" and resumed.info.run_id != dead_run
    assert resumed.data.tags["feedtune.resumed_from_run_id"] == dead_run
    records = _records(again.stderr)
    assert records[0][("K-quality", 1)] == records[1][("K-quality", 1)] == failed.params


def test_two_torchrun_groups_split_one_study(tmp_path, data, mlflow_store):
    """Two groups of 2 processes, 2 speed trials each, on one journal storage (two workers on
    one machine, whatever each is made of): the 4 trials are shared out without duplicates,
    each group's ranks train the same ones, and each trial's rate is the group's (both
    processes' samples)."""
    storage = tmp_path / "optuna.journal"
    config = _config(tmp_path, "ddp-tune-two")
    cmd = _torchrun_tune(config, data, storage, "--stage", "speed", "--n-trials", "2")
    cmd += ["--study", "W"]
    port = cmd.index("--master-port") + 1
    groups = [[*cmd[:port], str(_free_port()), *cmd[port + 1 :]] for _ in range(2)]
    errors = run_at_once(groups, env=_env(mlflow_store))

    trials = optuna.load_study(study_name="W-speed", storage=_journal(storage)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    per_group = []
    for err in errors:
        records = _records(err)
        assert records[0] == records[1]  # both ranks of a group trained the same trials
        per_group.append({number for _, number in records[0]})
    assert per_group[0].isdisjoint(per_group[1])
    assert per_group[0] | per_group[1] == {0, 1, 2, 3}
    assert [len(g) for g in per_group] == [2, 2]

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ddp-tune-two").experiment_id])
    parents = [r for r in runs if r.data.tags["feedtune.kind"] == "study"]
    children = [r for r in runs if r.data.tags["feedtune.kind"] == "trial"]
    assert len(parents) == 2 and len(children) == 4
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.data.tags["feedtune.world_size"] for r in runs} == {"2"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics["train_samples_per_s"] > 0 for r in children)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}


def test_under_torchrun_rank_0_runs_the_arms_seeds_and_recheck_on_every_rank(
    tmp_path, data, mlflow_store
):
    """The quality stage's own decisions under torchrun: the anchor is queued and trained in
    full, the arms' noise seeds and the re-check's fresh seeds are ordered by rank 0 and trained
    by both processes, and the verdict lands on the one parent run."""
    storage = tmp_path / "optuna.journal"
    config = _config(tmp_path, "ddp-arms")
    raw = yaml.safe_load(config.read_text())
    for key in ("pruner", "pruner_startup_trials", "pruner_warmup_epochs", "anchors"):
        raw["search"].pop(key)  # feedtune's own pruner and the default anchor
    raw["search"].update(noise_seeds=1, recheck_seeds=1)
    config.write_text(yaml.safe_dump(raw))
    cmd = _torchrun_tune(config, data, storage, "--stage", "quality", "--n-trials", "3")
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(mlflow_store), capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    orders: dict[int, list] = collections.defaultdict(list)
    for line in proc.stderr.splitlines():
        if line.startswith(RECORD):
            row = json.loads(line[len(RECORD) :])
            orders[row["rank"]].append((row["stage"], row["trial"], row["params"]))
    assert orders[0] == orders[1]  # every trial and seed run, trained by both processes
    seeds_ordered = [params["seed"] for stage, _, params in orders[0] if stage == "seed"]
    assert 43 in seeds_ordered
    anchor = [p for stage, n, p in orders[0] if stage == "quality" and n == 1]
    assert anchor and anchor[0]["augment.policy"] == "trivialaugment"

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ddp-arms").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["feedtune.kind"] == "study"]
    seed_runs = [r for r in runs if r.data.tags.get("feedtune.stage") == "seed"]
    assert len(seed_runs) == len(seeds_ordered)  # one run per order, rank 0's
    assert ("start", "43") in {
        (r.data.tags["feedtune.arm"], r.data.params["seed"]) for r in seed_runs
    }
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["feedtune.world_size"] for r in runs} == {"2"}
    assert parent.data.metrics["recheck_seeds"] == 1
    assert "winner_minus_start" in parent.data.metrics
    assert parent.data.tags["feedtune.recommended"] in {"start", "anchor-1", "trial-2"}
    assert "noise_val_f1_macro_sd" in parent.data.metrics
