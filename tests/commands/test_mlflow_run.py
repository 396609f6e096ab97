"""The MLflow project itself: `mlflow run . -e train --env-manager local`, as users run it."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, env_with_src, write_image_folder

SETTINGS = "train.epochs=1;train.measure_batches=2;model.width=8;loader.batch_size=8"


def _mlflow_run_env(store: str) -> dict[str, str]:
    env = env_with_src()
    for leaked in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(leaked, None)  # set by other tests' mlflow.set_experiment/start_run
    env["MLFLOW_TRACKING_URI"] = store
    # `python` in the entry point's command must be this interpreter (make does the same).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def _mlflow_run(store: str, data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train"]
        + ["--env-manager", "local", "-P", f"set=data.path={data};experiment=mlrun;{SETTINGS}"]
        + list(args),
        cwd=REPO,
        env=_mlflow_run_env(store),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("own_experiment", [False, True])
def test_mlflow_run_train_lands_in_the_configs_experiment(tmp_path, own_experiment):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = write_image_folder(tmp_path / "imgs", {"red": 12, "blue": 12}, size=(40, 32))
    args = ["--experiment-name", "mlrun"] if own_experiment else []
    if own_experiment:
        # Made here with its artifacts in tmp_path: made by `mlflow run`, it would get MLflow's
        # default artifact root, ./mlruns of the checkout (the cwd), among the user's own runs.
        MlflowClient(tracking_uri=store).create_experiment(
            "mlrun", artifact_location=(tmp_path / "mlruns").as_uri()
        )
    proc = _mlflow_run(store, data, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("mlrun").experiment_id])
    (train,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "train"]
    assert train.info.status == "FINISHED"
    assert "best_val_f1_macro" in train.data.metrics
    if own_experiment:
        # The project run is the training run: one run, with the project's own tags too.
        assert len(runs) == 1 and train.data.tags.get("mlflow.project.entryPoint") == "train"
    else:
        # `mlflow run` without --experiment-name opens its run in "Default": it points to
        # where feedtune's run went, and is not left RUNNING.
        (project,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
        assert project.data.tags["feedtune.experiment"] == "mlrun"
        assert project.info.status == "FINISHED"


# The tune entry point's default config (experiments/default.yaml, what `make tune` runs) made
# tiny: one epoch at 32 px, no extra noise runs. Its start configuration lies in its own search
# space, so the one quality trial trains exactly these settings.
TUNE_SETTINGS = (
    "experiment=mlrun-tune;train.epochs=1;train.measure_batches=2;augment.image_size=32;"
    "model.width=8;loader.batch_size=8;search.noise_seeds=0;search.anchors=[];search.recheck_seeds=0"
)


@pytest.mark.slow
def test_mlflow_run_tune_leaves_a_study_in_the_configs_experiment(tmp_path):
    """`mlflow run . -e tune` (MLproject's `main` runs the same command, test_packaging checks
    that): the study's parent run and its trial land in the config's experiment, finished."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = write_image_folder(tmp_path / "imgs", {"red": 16, "blue": 16}, size=(40, 32))
    env = _mlflow_run_env(store)
    # The storage comes from the environment, as MLproject says (never the checkout's journal).
    env["FEEDTUNE_STORAGE"] = f"journal:{tmp_path / 'optuna.journal'}"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "tune", "--env-manager", "local"]
        + ["-P", f"set=data.path={data};{TUNE_SETTINGS}"]
        + ["-P", "stage=quality", "-P", "n_trials=1", "-P", "study=mlrun"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("mlrun-tune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    (trial,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "trial"]
    assert parent.info.status == "FINISHED" and trial.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == "mlrun"
    assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["feedtune.best_run_id"] == trial.info.run_id
    assert parent.data.params["train.epochs"] == "1"  # the -P set reached the config
    # The project run (in "Default": no --experiment-name) points to the config's experiment.
    (project,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert project.data.tags["mlflow.project.entryPoint"] == "tune"
    assert project.data.tags["feedtune.experiment"] == "mlrun-tune"
    assert project.info.status == "FINISHED"
    study = optuna.load_study(
        study_name="mlrun-quality",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
        ),
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
