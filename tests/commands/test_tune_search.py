"""The quality search on a budget: rungs, a deadline that holds, a winner only beyond the noise,
and the speed stage skipped when the start configuration is model-bound (tiny real data)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from feedtune.cli import _verdict_line
from feedtune.commands.tune import TuneResult, run_tune, verdict
from feedtune.config import load_config
from feedtune.feed.dataset import single_torch_thread
from feedtune.training.stopping import StopTraining
from feedtune.tuning.stages import StopAtDeadline
from tests.conftest import artifact_paths, write_image_folder

TINY = """
experiment: {experiment}
augment: {{image_size: 24}}
loader: {{batch_size: 16}}
train: {{epochs: 3, measure_batches: 2, patience: 0}}
search:
  loader.num_workers: {{int: [0, 0]}}
  augment.policy: {{choice: [none, basic]}}
  train.lr: {{float: [1.0e-6, 1.0e-2], log: true}}
  n_trials_speed: 2
  speed_steps: 3
  min_epochs: 1
  reduction_factor: 3
  startup_trials: 20
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(
        tmp_path / "imgs", {"red": 24, "green": 18, "blue": 12}, size=(32, 28), groups_of=2
    )


def _tune(tmp_path, data, experiment, *overrides, **kwargs):
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(TINY.format(experiment=experiment))
    cfg = load_config(path, [f"data.path={data}", *overrides])
    with single_torch_thread():
        return run_tune(
            cfg,
            storage=f"journal:{tmp_path / 'optuna.journal'}",
            study_name=experiment,
            progress=False,
            **kwargs,
        )


def _runs(experiment):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_rungs_promote_only_the_top_and_the_winner_is_judged_against_the_noise(
    tmp_path, data, mlflow_store
):
    result = _tune(tmp_path, data, "rungs", "search.n_trials_quality=9", stage="quality")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    study = optuna.load_study(study_name="rungs-quality", storage=storage)
    full = [t for t in study.trials if max(t.intermediate_values, default=0) == 3]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(study.trials) == 9
    assert 1 <= len(full) <= 5 and len(pruned) >= 4  # about a third go on to the full length

    client, runs = _runs("rungs")
    by_number = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if r.data.tags.get("feedtune.stage") == "quality"
    }
    for trial in pruned:
        run = by_number[trial.number]
        assert run.info.status == "KILLED"
        epochs = client.get_metric_history(run.info.run_id, "val_f1_macro")
        assert len(epochs) == max(trial.intermediate_values)  # its epochs are kept
        paths = artifact_paths(client, run.info.run_id)
        assert not any(p.startswith("model") for p in paths)  # no model for a pruned trial
        assert "loader_samples_per_s" not in run.data.metrics  # nor a throughput probe
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}

    noise = [r for r in runs if r.data.tags.get("feedtune.stage") == "noise"]
    assert len(noise) == 1 and noise[0].data.params["seed"] == "43"
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    metrics, tags = parent.data.metrics, parent.data.tags
    assert {"start_val_f1_macro", "noise_val_f1_macro_sd", "best_val_f1_macro"} <= set(metrics)
    assert tags["feedtune.winner_vs_start"] == result.winner_vs_start
    margin = metrics["best_val_f1_macro"] - metrics["start_val_f1_macro"]
    better = margin > 2 * metrics["noise_val_f1_macro_sd"] and not result.winner_is_start
    assert tags["feedtune.winner_vs_start"] == ("better" if better else "within_noise")


def test_better_only_beyond_twice_the_noise():
    assert verdict(0.80, [0.70, 0.72]) == pytest.approx((0.71, 0.01414, "better"), abs=1e-4)
    assert verdict(0.73, [0.70, 0.72])[2] == "within_noise"
    assert verdict(0.99, [0.70])[1:] == (None, "within_noise")  # one run: no noise estimate
    # The start's own lucky seed wins no verdict over its unlucky ones.
    assert verdict(0.80, [0.80, 0.60, 0.62], best_is_start=True)[2] == "within_noise"


@pytest.mark.slow
def test_the_deadline_holds_with_running_trials_included(tmp_path, data, mlflow_store):
    start = time.monotonic()
    _tune(
        tmp_path,
        data,
        "deadline",
        "search.n_trials_quality=200",
        "search.noise_seeds=0",
        "train.epochs=1000",  # no trial can finish before the deadline
        "search.pruner=none",
        stage="quality",
        timeout=20,
    )
    elapsed = time.monotonic() - start
    assert elapsed < 20 + 12  # one epoch and the study's closing work past the deadline
    _, runs = _runs("deadline")
    assert "RUNNING" not in {r.info.status for r in runs}
    stopped = [r for r in runs if r.data.tags.get("feedtune.stopped") == "deadline"]
    assert len(stopped) == 1 and stopped[0].info.status == "KILLED"


@pytest.mark.slow
def test_a_model_bound_start_skips_the_speed_stage(tmp_path, data, mlflow_store):
    # Any waiting below 100% counts as model-bound here: the controlled case.
    result = _tune(
        tmp_path,
        data,
        "skip",
        "search.speed_skip_wait_frac=1.0",
        "search.n_trials_speed=4",
        stage="speed",
    )
    assert result.speed_skipped.startswith("model-bound")
    _, runs = _runs("skip")
    speed = [r for r in runs if r.data.tags.get("feedtune.stage") == "speed"]
    assert len(speed) == 1
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    assert parent.data.tags["feedtune.speed_stage"] == "skipped"


def test_the_deadline_never_stops_a_trial_after_its_last_epoch():
    seconds: list[float] = []
    past = StopAtDeadline(time.monotonic() - 1, seconds, epochs=3)
    past.on_epoch_start(2)
    past.on_epoch_end(2, {})  # the last epoch: its trial is complete, not stopped
    assert len(seconds) == 1
    with pytest.raises(StopTraining, match="deadline") as stopped:
        past.on_epoch_end(1, {})
    assert stopped.value.reason == "deadline"


def test_the_closing_line_says_when_the_start_itself_won():
    result = TuneResult("run", "s", "journal:x", "best", 0.8, {}, start_value=0.7, noise_sd=0.1)
    result.winner_vs_start, result.winner_is_start = "within_noise", True
    line = _verdict_line(result, "val_f1_macro")
    assert "the start configuration itself" in line and "keep your settings" in line
