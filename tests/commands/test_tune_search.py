"""The quality search on a budget: arms, a deadline that holds, a winner only beyond the noise,
and the speed stage skipped when the start configuration is model-bound (tiny real data)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from feedtune.cli import _verdict_line
from feedtune.commands.tune import TuneResult, run_tune
from feedtune.config import load_config
from feedtune.feed.dataset import single_torch_thread
from feedtune.training.stopping import StopTraining
from feedtune.tuning.recheck import decide
from feedtune.tuning.trial_stops import StopAtDeadline
from tests.conftest import env_with_src, run_at_once, write_image_folder

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
def test_the_anchor_runs_in_full_and_every_arm_is_rechecked_on_the_same_fresh_seeds(
    tmp_path, data, mlflow_store
):
    result = _tune(tmp_path, data, "arms", "search.n_trials_quality=6", stage="quality")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    study = optuna.load_study(study_name="arms-quality", storage=storage)
    by_arm = {t.user_attrs.get("arm"): t for t in study.trials}
    assert {"start", "anchor-1"} <= set(by_arm)
    for arm in ("start", "anchor-1"):  # trained to the full length, finished
        assert by_arm[arm].state == optuna.trial.TrialState.COMPLETE
        assert max(by_arm[arm].intermediate_values) == 3
    # The two arms and the two calibration trials run every epoch, whatever the pruner says.
    protected = [t for t in study.trials if t.user_attrs.get("full_length")]
    assert len(protected) == 4
    assert all(max(t.intermediate_values) == 3 for t in protected)

    _, runs = _runs("arms")
    by_number = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if r.data.tags.get("feedtune.stage") == "quality"
    }
    anchor_params = by_number[by_arm["anchor-1"].number].data.params
    assert anchor_params["augment.policy"] == "trivialaugment"  # outside the space, still run
    assert anchor_params["sampler.kind"] == "random"
    seeds: dict[str, set[str]] = {}
    for r in runs:
        if r.data.tags.get("feedtune.stage") == "seed":
            seeds.setdefault(r.data.tags["feedtune.arm"], set()).add(r.data.params["seed"])
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    metrics, tags = parent.data.metrics, parent.data.tags
    winner = tags["feedtune.winner"]
    for name in {winner, "start", "anchor-1"}:  # all on the same fresh seeds
        assert seeds[name] == {"43", "44"}
    assert metrics["recheck_seeds"] == 2
    assert {"winner_minus_start", "winner_minus_anchor"} <= set(metrics)
    # The rung used is the lowest whose interval's lower bound is above 0, else the full length.
    client = MlflowClient()
    lows = {
        m.step: m.value for m in client.get_metric_history(parent.info.run_id, "rung_spearman_low")
    }
    assert metrics["rung_used"] == min([r for r, low in lows.items() if low > 0] or [3])
    assert "rung_spearman_n" in metrics
    assert tags["feedtune.winner_vs_start"] == result.winner_vs_start
    recommended = tags["feedtune.recommended"]
    assert (recommended != "start") == (result.winner_vs_start == "better")
    if recommended == "start":  # the recommendation is the start trial's own run
        start_run = by_number[by_arm["start"].number]
        assert tags["feedtune.best_run_id"] == start_run.info.run_id == result.best_run_id
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}

    # Where the time went, on the parent run: each trial to the arms or to the search, the
    # arms' seed runs to the arms, the fresh seeds to the re-check.
    def took(trials):
        return sum(t.duration.total_seconds() for t in trials)

    done = [t for t in study.trials if t.duration is not None]
    searched = [t for t in done if not t.user_attrs.get("arm")]
    assert metrics["search_trials"] == len(searched) == 4
    assert metrics["search_s"] == pytest.approx(took(searched), abs=0.01)
    assert metrics["arms_s"] > took([t for t in done if t.user_attrs.get("arm")]) + 0.5
    assert metrics["recheck_s"] > 0.5
    assert result.times.words().startswith("time: speed stage ")


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


def test_the_closing_line_says_what_to_adopt_and_why():
    scores = {
        "start": {42: 0.70, 43: 0.71, 44: 0.69},
        "anchor-1": {42: 0.66, 43: 0.69, 44: 0.68},
        "trial-7": {42: 0.78, 43: 0.715, 44: 0.70},
    }
    result = TuneResult("run", "s", "journal:x", "best", 0.7, {})
    result.verdict = decide(scores, "trial-7", "anchor-1", [43, 44], 42)
    line = _verdict_line(result)
    assert "within the noise" in line and "keep your settings" in line
    assert "winner - start +0.0075 [80% interval" in line and "fresh seeds 43, 44" in line
    result.verdict = decide(scores, "start", "anchor-1", [43, 44], 42)
    assert "no configuration beat your start configuration: keep it" in _verdict_line(result)


@pytest.mark.slow
def test_two_workers_on_one_study_train_each_arm_and_seed_run_once(tmp_path, data, mlflow_store):
    """Two `feedtune tune` workers started at once on one journal: the arms are queued once,
    no seed run is trained twice, and each worker's parent run holds a verdict."""
    config = tmp_path / "two.yaml"
    config.write_text(TINY.format(experiment="two"))
    cmd = [
        *(sys.executable, "-m", "feedtune", "tune", "--no-progress", "--config", str(config)),
        *("--set", f"data.path={data}", "--storage", f"journal:{tmp_path / 'optuna.journal'}"),
        *("--study", "two", "--stage", "quality", "--n-trials", "2"),
        *("--set", "search.recheck_seeds=2", "--set", "search.calibration_trials=0"),
    ]
    env = {**env_with_src(), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_store}
    run_at_once([cmd, cmd], env=env)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    trials = optuna.load_study(study_name="two-quality", storage=storage).trials
    arms = [t.user_attrs["arm"] for t in trials if t.user_attrs.get("arm")]
    assert sorted(arms) == ["anchor-1", "start"], [
        (t.number, t.state, t.user_attrs) for t in trials
    ]
    _, runs = _runs("two")
    seed_runs = [
        (r.data.tags["feedtune.arm"], r.data.params["seed"])
        for r in runs
        if r.data.tags.get("feedtune.stage") == "seed"
    ]
    assert len(seed_runs) == len(set(seed_runs)), seed_runs
    parents = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    assert len(parents) == 2
    assert all("feedtune.recommended" in p.data.tags for p in parents)
