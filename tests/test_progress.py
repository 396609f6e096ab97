"""Progress in a log: one line per epoch when stderr is a pipe, tqdm's bar only when asked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optuna
import pytest

from feedtune.progress import LineProgress, progress_bar
from feedtune.tuning import optuna_study
from tests.conftest import REPO, env_with_src, write_image_folder

# ``train_model`` for 3 epochs on tiny images, once per mode, each run's stderr after a marker
# line. One process for all modes: importing torch costs seconds.
FIT_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import tempfile
    from pathlib import Path

    from tests.conftest import tiny_feed
    from feedtune.training.trainer import new_model, train_model

    cfg, _, feed = tiny_feed(sys.argv[1], "train.epochs=3", "train.patience=0", "model.width=4")
    for name, forced, progress in [
        ("auto", None, True), ("bar", "bar", True), ("disabled", None, False)
    ]:
        os.environ.pop("FEEDTUNE_PROGRESS", None)
        if forced:
            os.environ["FEEDTUNE_PROGRESS"] = forced
        print(f"=== {name}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            model = new_model(cfg, len(feed.classes))
            train_model(cfg, feed, model=model, folder=Path(tmp), progress=progress)
    """
)


@pytest.fixture(scope="module")
def fit_stderr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each mode's stderr from a real process whose stderr is a pipe (not a terminal)."""
    images = write_image_folder(tmp_path_factory.mktemp("progress"), {"a": 12, "b": 12})
    env = {k: v for k, v in env_with_src().items() if k != "FEEDTUNE_PROGRESS"}
    done = subprocess.run(
        [sys.executable, "-c", FIT_SCRIPT, str(images)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,  # bytes: text mode would turn tqdm's '\r' into '\n'
        env=env,
        timeout=120,
        check=True,
    )
    parts = done.stderr.decode().split("=== ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts}


def test_a_pipe_gets_one_line_per_epoch(fit_stderr: dict[str, str]):
    out = fit_stderr["auto"]
    assert "\r" not in out
    lines = out.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert len(lines) <= 3 + 2
    for i, line in enumerate(epoch_lines, start=1):
        assert line.startswith(f"epoch {i}/3 ")
        assert "val_f1=" in line and "best=" in line and line.endswith(" s)")


def test_forced_bar_redraws_and_disabled_prints_nothing(fit_stderr: dict[str, str]):
    assert fit_stderr["bar"].count("\r") > 3
    assert fit_stderr["disabled"] == ""


def test_line_progress_prints_one_summary_at_close(capsys: pytest.CaptureFixture[str]):
    bar = LineProgress(total=5, desc="scan", unit="file")
    for _ in range(5):
        bar.update()
    assert capsys.readouterr().err == ""
    bar.close()
    bar.close()  # a second close writes nothing more
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scan: 5 files in ")
    assert bar.n == 5


def test_iteration_closes_and_bar_only_stays_silent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("FEEDTUNE_PROGRESS", "lines")
    assert list(progress_bar(range(3), desc="cache", unit="img")) == [0, 1, 2]
    assert list(progress_bar(range(3), desc="val", unit="batch", bar_only=True)) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[0].startswith("cache: 3 imgs in ")
    monkeypatch.setenv("FEEDTUNE_PROGRESS", "off")
    assert list(progress_bar(range(3), desc="cache", unit="img")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("FEEDTUNE_PROGRESS", "loud")
    with pytest.raises(ValueError, match="FEEDTUNE_PROGRESS"):
        progress_bar(range(3), desc="cache", unit="img")


def test_per_item_lines_report_an_item_left_by_break(capsys: pytest.CaptureFixture[str]):
    bar = LineProgress(range(1, 4), total=4, desc="epochs", unit="epoch", per_item_lines=True)
    bar.n = 1  # resumed after one epoch, as tqdm's ``initial``
    for epoch in bar:
        bar.set_postfix(val_f1="0.500")
        if epoch == 2:
            break
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 2/4", "epoch 3/4"]
    assert all("val_f1=0.500" in line for line in lines)


def test_optuna_writes_one_line_per_trial(capsys: pytest.CaptureFixture[str]):
    study = optuna.create_study(direction="maximize")
    outcomes = iter(["complete", "pruned", "fail"])

    def objective(trial: optuna.Trial) -> float:
        outcome = next(outcomes)
        if outcome == "pruned":
            trial.report(0.1, 1)  # steps are epochs done
            trial.report(0.2, 2)
            raise optuna.TrialPruned()
        if outcome == "fail":
            raise RuntimeError("boom")
        return 0.61234

    optuna_study.optimize(study, objective, n_trials=3, timeout=None, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial ")]
    assert [line.rsplit(" (", 1)[0] for line in lines] == [
        "trial 0 COMPLETE value=0.6123",
        "trial 1 PRUNED after epoch 2",
        "trial 2 FAIL",
    ]
    assert all(line.endswith(" s)") for line in lines)
    optuna_study.optimize(study, lambda t: 0.5, n_trials=1, timeout=None, progress=False)
    assert "trial " not in capsys.readouterr().err


def test_a_trial_line_says_what_the_trial_ran():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {
        "augment.policy": CategoricalDistribution(["none", "color"]),
        "train.lr": FloatDistribution(1e-6, 1e-2, log=True),
    }

    def trial(number: int, params: dict, **attrs) -> optuna.trial.FrozenTrial:
        frozen = optuna.trial.create_trial(
            params=params, distributions=dists, value=0.71234, user_attrs=attrs
        )
        frozen.number = number
        return frozen

    start = trial(0, {"augment.policy": "none", "train.lr": 1e-3}, start_config=True)
    lines = [
        optuna_study.trial_line(t, start)
        for t in (
            start,
            trial(1, {"augment.policy": "color", "train.lr": 1e-3}, arm="anchor-1"),
            trial(5, {"augment.policy": "color", "train.lr": 0.0021234}),
            trial(6, {"augment.policy": "none", "train.lr": 1e-3}),
        )
    ]
    assert [line.rsplit(" (", 1)[0] for line in lines] == [
        "trial 0 COMPLETE value=0.7123 start",
        "trial 1 COMPLETE value=0.7123 arm anchor-1",
        "trial 5 COMPLETE value=0.7123 augment.policy=color train.lr=0.002123",
        "trial 6 COMPLETE value=0.7123 as start",
    ]
    # Without a start configuration in the study: every parameter.
    alone = optuna_study.trial_line(trial(2, {"augment.policy": "none", "train.lr": 1e-3}))
    assert alone.startswith("trial 2 COMPLETE value=0.7123 augment.policy=none train.lr=0.001 (")
