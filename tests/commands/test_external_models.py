"""timm and user-factory models through the commands: ``feedtune train``, a two-trial
``feedtune tune`` that registers the best, ``load_best`` and ``feedtune finetune``, and a
source run whose factory the caller did not name."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import feedtune
from feedtune.cli import main as feedtune_main
from feedtune.commands.train import run_train
from feedtune.config import load_config
from feedtune.training.checkpoint import CheckpointError
from tests.conftest import single_torch_thread, write_image_folder
from tests.training.test_external_models import FACTORY_MODULE

pytest.importorskip("timm")

TINY = [
    "augment.image_size=32",
    "train.epochs=1",
    "train.measure_batches=0",
    "train.patience=0",
    "loader.batch_size=16",
    "split.val_fraction=0.25",
]


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    return write_image_folder(
        tmp_path / "colours", {"red": 16, "green": 16, "blue": 16}, size=(48, 40), groups_of=4
    )


@pytest.fixture
def new_data(tmp_path: Path) -> Path:
    return write_image_folder(
        tmp_path / "new", {"cyan": 16, "magenta": 16}, size=(48, 40), seed=1, groups_of=4
    )


# Two quality trials (the learning rate only), no speed stage, no pruning: what `tune`
# registers as the experiment's `best` is then reloaded and finetuned.
TWO_TRIALS = """
experiment: {experiment}
search:
  train.lr: {{float: [1.0e-3, 1.0e-2], log: true}}
  n_trials_quality: 2
  pruner: none
  noise_seeds: 0
  anchors: []
  recheck_seeds: 0
  speed_skip_wait_frac: 0
"""


def _tune_two_trials(tmp_path: Path, experiment: str, *settings: str) -> str:
    """A two-trial quality study in this process; the run id the `best` alias points at."""
    config = tmp_path / f"{experiment}.yaml"
    config.write_text(TWO_TRIALS.format(experiment=experiment))
    argv = ["tune", "--no-progress", "--config", str(config), "--stage", "quality"]
    argv += ["--storage", f"journal:{tmp_path / 'optuna.journal'}", "--study", experiment]
    with single_torch_thread():
        assert feedtune_main([*argv, *[f"--set={s}" for s in settings]]) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    trials = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("feedtune.kind") == "trial"
    ]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    return client.get_model_version_by_alias(experiment, "best").run_id


@pytest.mark.slow
def test_a_timm_model_trains_reloads_and_finetunes_end_to_end(
    mlflow_store, colours, new_data, tmp_path
):
    settings = [*TINY, f"data.path={colours}"]
    settings += ["model.name=timm/test_resnet", "model.kwargs={drop_rate: 0.1}"]
    registered = _tune_two_trials(tmp_path, "timm-src", *settings)

    best = feedtune.load_best("timm-src", mlflow_store, device="cpu")
    assert best.run_id == registered
    assert type(best.model).__name__ == "ResNet" and best.model.drop_rate == 0.1
    labels, probs = best.predict(sorted(colours.rglob("*.jpg"))[:4])
    assert probs.shape == (4, 3) and set(labels) <= {"red", "green", "blue"}
    params = MlflowClient().get_run(best.run_id).data.params
    assert params["model.name"] == "timm/test_resnet" and params["model.kwargs.drop_rate"] == "0.1"

    tuned = [*TINY, f"data.path={new_data}", "experiment=timm-new", "model.freeze=backbone"]
    # In this process: a second interpreter's imports would double the test's time.
    with single_torch_thread():
        argv = ["finetune", "--no-progress", "--from", best.run_id]
        assert feedtune_main([*argv, *[f"--set={s}" for s in tuned]]) == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("timm-new").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["feedtune.head_replaced"] == "true"
    assert run.data.params["model.name"] == "timm/test_resnet"
    assert feedtune.load_best("timm-new", mlflow_store).classes == ["cyan", "magenta"]


@pytest.mark.slow
def test_finetune_from_a_factory_run_needs_the_caller_to_name_the_factory(
    mlflow_store, colours, new_data, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "pkgs"
    folder.mkdir()
    module = folder / f"ftzoo_{tmp_path.name.replace('-', '_')}.py"
    module.write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    factory = f"{module.stem}:make"
    try:
        with single_torch_thread():
            cfg = load_config(
                None, [*TINY, f"data.path={colours}", "experiment=fac", f"model.name={factory}"]
            )
            trained = run_train(cfg, progress=False)
            assert MlflowClient().get_run(trained).info.status == "FINISHED"
        source = _tune_two_trials(
            tmp_path, "fac", *TINY, f"data.path={colours}", f"model.name={factory}"
        )
        with single_torch_thread():
            argv = ["finetune", "--no-progress", "--from", source]
            argv += [f"--set={s}" for s in [*TINY, f"data.path={new_data}", "experiment=ft"]]
            assert feedtune_main(argv) == 1
            # One line (above it only MLflow's download bar).
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith("feedtune: error: the source checkpoint is built by")
            assert f"--set model.name={factory}" in err
            assert MlflowClient().get_experiment_by_name("ft") is None  # no run was opened

            # Resuming the run is the same: its checkpoint names the factory, the caller not.
            resume = ["train", "--no-progress", "--resume", trained, f"--set=data.path={colours}"]
            assert feedtune_main(resume) == 1
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith("feedtune: error:") and f"model.name={factory}" in err

            assert feedtune_main([*argv, f"--set=model.name={factory}"]) == 0
        with pytest.raises(CheckpointError, match="allowed_factory"):
            feedtune.load_best("fac", mlflow_store)
        best = feedtune.load_best("fac", mlflow_store, allowed_factory=factory)
        assert np.allclose(best.predict(sorted(colours.rglob("*.jpg"))[:2])[1].sum(1), 1)
    finally:
        sys.modules.pop(module.stem, None)
        shutil.rmtree(folder, ignore_errors=True)
