"""The MLflow project itself: `mlflow run . -e train --env-manager local`, as users run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, env_with_src, write_image_folder

SETTINGS = "train.epochs=1;train.measure_batches=2;model.width=8;loader.batch_size=8"


def _mlflow_run(store: str, data: Path, *args: str) -> subprocess.CompletedProcess:
    env = env_with_src()
    for leaked in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(leaked, None)  # set by other tests' mlflow.set_experiment/start_run
    env["MLFLOW_TRACKING_URI"] = store
    # `python` in the entry point's command must be this interpreter (make does the same).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train"]
        + ["--env-manager", "local", "-P", f"set=data.path={data};experiment=mlrun;{SETTINGS}"]
        + list(args),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("own_experiment", [False, True])
def test_mlflow_run_train_lands_in_the_configs_experiment(tmp_path, own_experiment):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = write_image_folder(tmp_path / "imgs", {"red": 12, "blue": 12}, size=(40, 32))
    args = ["--experiment-name", "mlrun"] if own_experiment else []
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
