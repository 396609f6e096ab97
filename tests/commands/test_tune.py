"""`feedtune tune` end to end: real Optuna journal storage, real MLflow store, real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    REPO,
    artifact_paths,
    env_with_src,
    feedtune_in_process,
    tune_command,
    write_image_folder,
)

pytestmark = pytest.mark.slow

TINY = """
experiment: {experiment}
augment: {{image_size: 32}}
loader: {{batch_size: 8}}
train: {{epochs: 3, measure_batches: 2, patience: 0}}
search:
  loader.num_workers: {{int: [0, 1]}}
  data.decoder: {{choice: [pil, opencv]}}
  augment.policy: {{choice: [none, basic]}}
  train.lr: {{float: [1.0e-7, 1.0e-2], log: true}}
  n_trials_speed: 2
  n_trials_quality: 3
  speed_steps: 3
  pruner_startup_trials: 2
  pruner_warmup_epochs: 0
  pruner: median
  noise_seeds: 0
  speed_skip_wait_frac: 0
"""


def _tune(
    tmp: Path,
    data: Path,
    *args: str,
    experiment: str = "tiny-tune",
    background=False,
    in_process=False,
    config: str = TINY,
    progress=False,
):
    """``feedtune tune`` in its own process; ``in_process`` runs the same command line in this
    one, for tests about what the study records rather than about processes (a fresh
    interpreter's imports cost several seconds). ``progress``: its lines in stderr (a pipe)."""
    cfg = tmp / "tiny.yaml"
    cfg.write_text(config.format(experiment=experiment))
    cmd = tune_command(cfg, data, "--storage", f"journal:{tmp / 'optuna.journal'}", *args)
    if progress:
        cmd.remove("--no-progress")
    if in_process:
        proc = feedtune_in_process(cmd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    if background:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env_with_src(), stderr=subprocess.PIPE, text=True
        )
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_with_src(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(
        tmp_path / "imgs", {"red": 48, "green": 32, "blue": 24}, size=(48, 40), groups_of=2
    )


def test_two_stage_study_is_tracked_and_registered(tmp_path, data, mlflow_store):
    # Queue a hopeless learning rate third, so the median pruner has something to stop.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    queued = optuna.create_study(study_name="S-quality", storage=storage, direction="maximize")
    for lr in (5e-3, 5e-3, 1e-7):
        queued.enqueue_trial({"augment.policy": "none", "train.lr": lr})
    # (the pruner compares each trial's best value so far, so the bad one must lose at epoch 0)

    proc = _tune(tmp_path, data, "--study", "S", progress=True)
    # The log says what a user needs; third-party chatter is silenced where it is raised.
    for noise in ("UserWarning", "No complete tensor", "system metrics"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    # MLflow's and Optuna's INFO lines stay out (FEEDTUNE_LOG=INFO lets them in: test_logs),
    # as do MLflow's download bars; the model is registered by its own models:/ URI.
    for chatter in ("Downloading artifacts", "Validating input example", "based on models:/"):
        assert chatter not in proc.stderr, proc.stderr[-3000:]
    assert not re.search(r"^\[I ", proc.stderr, re.M), proc.stderr[-3000:]
    # feedtune's own line per trial says what it ran (no start configuration in S-quality).
    line = r"^trial 2 PRUNED after epoch \d+ .*train\.lr=1e-07.* \(\d+\.\d s\)$"
    assert re.search(line, proc.stderr, re.M), proc.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny-tune")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("feedtune.kind") == "trial"]
    assert len(children) == 5
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    stages = sorted(r.data.tags["feedtune.stage"] for r in children)
    assert stages == ["quality"] * 3 + ["speed"] * 2
    for r in children:
        assert r.data.tags["optuna.study_name"] in {"S-speed", "S-quality"}
        assert r.data.params["augment.image_size"] == "32"  # the full resolved config

    quality = optuna.load_study(study_name="S-quality", storage=storage)
    by_number = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in children
        if r.data.tags["feedtune.stage"] == "quality"
    }
    states = {t.number: t.state for t in quality.trials}
    assert states[2] == optuna.trial.TrialState.PRUNED
    for number, state in states.items():
        expected = {"PRUNED": "KILLED", "COMPLETE": "FINISHED", "FAIL": "FAILED"}[state.name]
        assert by_number[number].info.status == expected

    assert parent.info.status == "FINISHED"
    best_id = parent.data.tags["feedtune.best_run_id"]
    assert best_id in {r.info.run_id for r in children}
    assert {
        "study/trials.csv",
        "study/history.png",
        "study/pareto_front.png",
        "split/summary.json",
        "study/speed/trials.csv",
    } <= artifact_paths(client, parent.info.run_id)
    assert parent.data.tags["optuna.storage"].startswith("journal:")
    version = client.get_model_version_by_alias("tiny-tune", "best")
    assert version.run_id == best_id
    assert best_id in proc.stdout
    # The closing lines say where the job's time went.
    time_line = (
        r"^time: speed stage \d+ s, arms and their seeds \d+ s, search \d+ s "
        r"\(3 configurations\), re-check \d+ s$"
    )
    assert re.search(time_line, proc.stdout, re.M), proc.stdout
    for name in ("speed_stage_s", "arms_s", "search_s", "recheck_s"):
        assert parent.data.metrics[name] >= 0

    best = feedtune_in_process(
        [sys.executable, "-m", "feedtune", "best", "--experiment", "tiny-tune"]
    )
    assert best.returncode == 0, best.stderr
    assert best_id in best.stdout and "--set" in best.stdout and "best.pt" in best.stdout


# Only the decoder is a speed setting, only the learning rate a quality one; one epoch each.
SPEED_THEN_QUALITY = """
experiment: {experiment}
augment: {{image_size: 32}}
loader: {{batch_size: 8}}
train: {{epochs: 1, measure_batches: 2, patience: 0}}
search:
  data.decoder: {{choice: [pil, opencv]}}
  train.lr: {{float: [1.0e-3, 1.0e-2], log: true}}
  n_trials_speed: 2
  n_trials_quality: 2
  speed_steps: 3
  pruner: none
  noise_seeds: 0
  recheck_seeds: 0
  speed_skip_wait_frac: 0
"""


def _runs(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _best_speed_params(client: MlflowClient, parent_run_id: str, tmp: Path) -> dict:
    path = client.download_artifacts(parent_run_id, "study/best_speed_params.json", str(tmp))
    return json.loads(Path(path).read_text())


def test_quality_trials_run_with_the_best_speed_settings(tmp_path, data, mlflow_store):
    # Both decoders get a speed trial (queued, so the sampler cannot draw the same one twice).
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    speed = optuna.create_study(study_name="D-speed", storage=storage, direction="maximize")
    for decoder in ("pil", "opencv"):
        speed.enqueue_trial({"data.decoder": decoder})
    _tune(
        tmp_path,
        data,
        "--study",
        "D",
        experiment="decoder",
        config=SPEED_THEN_QUALITY,
        in_process=True,
    )

    client = MlflowClient()
    runs = _runs(client, "decoder")
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("feedtune.kind") == "trial"]
    speed_runs = [r for r in trials if r.data.tags["feedtune.stage"] == "speed"]
    assert sorted(r.data.params["data.decoder"] for r in speed_runs) == ["opencv", "pil"]
    fastest = max(speed_runs, key=lambda r: r.data.metrics["train_samples_per_s"])
    winner = fastest.data.params["data.decoder"]
    assert _best_speed_params(client, parent.info.run_id, tmp_path / "a") == {
        "data.decoder": winner
    }
    assert parent.data.tags["feedtune.best_speed_run_id"] == fastest.info.run_id
    quality = [r for r in trials if r.data.tags["feedtune.stage"] == "quality"]
    assert len(quality) == 2
    assert [r.data.params["data.decoder"] for r in quality] == [winner, winner]

    # Whichever decoder won, it must not just be the config's own: the quality stage resumed
    # with the config set to the loser still trains with the winner.
    loser = {"pil": "opencv", "opencv": "pil"}[winner]
    _tune(
        tmp_path,
        data,
        *("--study", "D", "--stage", "quality", "--n-trials", "1"),
        *("--set", f"data.decoder={loser}"),
        experiment="decoder",
        config=SPEED_THEN_QUALITY,
        in_process=True,
    )
    again = [
        r for r in _runs(client, "decoder") if r.info.run_id not in {x.info.run_id for x in runs}
    ]
    (parent2,) = [r for r in again if r.data.tags.get("feedtune.kind") == "study"]
    (added,) = [r for r in again if r.data.tags.get("feedtune.kind") == "trial"]
    assert parent2.data.params["data.decoder"] == loser  # the config said so
    assert added.data.tags["feedtune.stage"] == "quality"
    assert added.data.params["data.decoder"] == winner  # the speed stage's winner trained
    assert _best_speed_params(client, parent2.info.run_id, tmp_path / "b") == {
        "data.decoder": winner
    }


# No speed stage; the start configuration (its own learning rate) is each study's one trial.
QUALITY_ONLY = """
experiment: {experiment}
augment: {{image_size: 32}}
loader: {{batch_size: 8}}
train: {{epochs: 3, measure_batches: 2, patience: 0}}
search:
  train.lr: {{float: [1.0e-7, 1.0e-2], log: true}}
  pruner: none
  noise_seeds: 0
  recheck_seeds: 0
  speed_skip_wait_frac: 0
"""


def test_the_best_alias_stays_when_a_later_study_does_worse(tmp_path, data, mlflow_store):
    def study(name: str, lr: str):
        _tune(
            tmp_path,
            data,
            *("--study", name, "--stage", "quality", "--n-trials", "1"),
            *("--set", f"train.lr={lr}"),
            experiment="alias",
            config=QUALITY_ONLY,
            in_process=True,
        )
        (parent,) = [
            r
            for r in _runs(client, "alias")
            if r.data.tags.get("feedtune.kind") == "study"
            and r.data.tags["optuna.study_name"] == name
        ]
        return parent

    client = MlflowClient()
    good = study("first", "5.0e-3")
    assert good.data.tags["feedtune.alias_moved"] == "true"
    kept = client.get_model_version_by_alias("alias", "best")
    assert kept.run_id == good.data.tags["feedtune.best_run_id"]
    assert good.data.tags["feedtune.registered_version"] == str(kept.version)

    worse = study("second", "1.0e-7")  # learns nothing in 3 epochs
    assert worse.data.metrics["best_val_f1_macro"] < good.data.metrics["best_val_f1_macro"]
    assert worse.data.tags["feedtune.alias_moved"] == "false"
    assert worse.data.tags["feedtune.registered_version"] == str(kept.version)
    now = client.get_model_version_by_alias("alias", "best")
    assert (now.version, now.run_id) == (kept.version, kept.run_id)
