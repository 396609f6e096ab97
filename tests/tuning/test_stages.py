"""The stages on their own: real Optuna journal storage, real MLflow SQLite store, real images,
in this process (no CLI subprocess)."""

from __future__ import annotations

import inspect
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

import feedtune
from feedtune.cli import main as feedtune_main
from feedtune.config import load_config
from feedtune.sources.prepare import prepare_data
from feedtune.tracking import mlflow_store as tracking
from feedtune.training import engine, throughput
from feedtune.training.stopping import StopTraining
from feedtune.tuning.stages import Tuner, trial_run
from feedtune.tuning.trial_stops import PruneOnPlateau
from tests.conftest import TINY_RUN

SRC = str(Path(feedtune.__file__).parent)


def _journal(tmp_path: Path) -> optuna.storages.BaseStorage:
    path = str(tmp_path / "optuna.journal")
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def test_a_stop_inside_a_trial_run_prunes_the_trial_and_kills_its_run(tmp_path, mlflow_store):
    tracking.setup("stages-unit")
    study = optuna.create_study(study_name="s", storage=_journal(tmp_path), direction="maximize")

    def objective(trial):
        with trial_run(trial, "quality", "s-quality") as run:
            trial.set_user_attr("run", run.info.run_id)
            raise StopTraining("pruned", "pruned after epoch 1 (value 0.1000)")

    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = MlflowClient().get_run(trial.user_attrs["run"])
    assert run.info.status == "KILLED"
    assert run.data.tags["feedtune.stopped"] == "pruned"
    assert run.data.tags["optuna.trial_number"] == "0"
    assert trial.user_attrs["mlflow_run_id"] == run.info.run_id  # claimed in the study


def test_the_pruner_stops_training_with_the_one_stop_signal(tmp_path):
    pruner = optuna.pruners.ThresholdPruner(lower=0.5)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    trial = study.ask()
    prune = PruneOnPlateau(trial, "val_acc", epochs=3)
    prune.on_epoch_end(0, {"val_acc": 0.9})  # above the threshold: goes on
    with pytest.raises(StopTraining) as stopped:
        prune.on_epoch_end(1, {"val_acc": 0.1})
    assert stopped.value.reason == "pruned" and "after epoch 2" in str(stopped.value)


def test_a_trial_that_reached_its_last_epoch_is_never_pruned(tmp_path):
    # A rung equal to the full length: the trial trained to the end, so it is COMPLETE.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(0.5))
    trial = study.ask()
    PruneOnPlateau(trial, "val_acc", epochs=2).on_epoch_end(1, {"val_acc": 0.1})
    assert trial.should_prune()  # the pruner would have stopped it one epoch earlier
    assert study.trials[0].intermediate_values == {2: 0.1}  # reported, not pruned


def test_quality_trials_use_the_speed_winner_passed_in(tiny_folder, tmp_path, mlflow_store):
    cfg = load_config(
        None,
        [
            f"data.path={tiny_folder}",
            *TINY_RUN,
            "experiment=stages-quality",
            "train.epochs=1",
            "model.width=4",
            "search.augment.policy={choice: [none]}",
            "search.n_trials_quality=1",
            "search.anchors=[]",
            "search.recheck_seeds=0",
        ],
    )
    tracking.setup(cfg.experiment)
    data = prepare_data(cfg, progress=False)
    tuner = Tuner(cfg, data, "q", progress=False, device=torch.device("cpu"))
    study = optuna.create_study(direction="maximize", storage=_journal(tmp_path), study_name="q")
    speed = {"loader.num_workers": 1, "data.decoder": "opencv"}
    with tracking.start_run("study", run_name="q", system_metrics=False):
        study.optimize(tuner.start_stage(study, "quality", speed_params=speed), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.params["loader.num_workers"] == "1"
    assert run.data.params["data.decoder"] == "opencv"
    assert trial.value == pytest.approx(run.data.metrics["best_val_f1_macro"])


def test_tune_reaches_train_step_in_at_most_seven_feedtune_frames(
    tiny_folder, tmp_path, mlflow_store, monkeypatch, one_torch_thread
):
    depths: dict[str, int] = {}

    def counting(step):
        def train_step(*args, **kwargs):
            frames = [f for f in inspect.stack()[1:] if f.filename.startswith(SRC)]
            stage = "speed" if any(f.function == "measure_training" for f in frames) else "quality"
            depths[stage] = max(depths.get(stage, 0), len(frames) + 1)  # + train_step itself
            return step(*args, **kwargs)

        return train_step

    monkeypatch.setattr(engine, "train_step", counting(engine.train_step))
    monkeypatch.setattr(throughput, "train_step", counting(throughput.train_step))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "experiment: frames\n"
        "search:\n"
        "  loader.num_workers: {int: [0, 0]}\n"
        "  augment.policy: {choice: [none]}\n"
        "  n_trials_speed: 1\n  n_trials_quality: 1\n  speed_steps: 2\n  noise_seeds: 0\n"
        "  speed_skip_wait_frac: 0\n  anchors: []\n  recheck_seeds: 0\n"
    )
    overrides = [f"data.path={tiny_folder}", *TINY_RUN, "train.epochs=1", "model.width=4"]
    argv = ["tune", "--no-progress", "--config", str(config), "--storage"]
    argv += [f"journal:{tmp_path / 'optuna.journal'}", *(f"--set={o}" for o in overrides)]
    assert feedtune_main(argv) == 0
    while mlflow.active_run() is not None:
        mlflow.end_run()
    assert set(depths) == {"speed", "quality"}
    assert depths["quality"] <= 7 and depths["speed"] <= 7, depths
