"""Commands run from a user's own folder on their own images: their runs are filed under the
data's name (not the embedded dataset's), ``best`` and ``load_best`` look there, and ``tune``
with nothing to search stops before it starts."""

from __future__ import annotations

import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import feedtune_in_process, write_image_folder

FEEDTUNE = [sys.executable, "-m", "feedtune"]


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_runs_on_a_folder_are_filed_under_its_name_and_best_looks_there(
    tmp_path, mlflow_store, monkeypatch
):
    write_image_folder(tmp_path / "my_images", {"a": 6, "b": 6}, size=(32, 32))
    monkeypatch.chdir(tmp_path)
    inspect = [*FEEDTUNE, "inspect", "--no-progress", "--set", "data.path=my_images"]
    proc = feedtune_in_process([*inspect, "--set", "augment.image_size=16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = _runs(client, "feedtune-my_images")
    assert run.data.tags["feedtune.kind"] == "inspect" and run.info.run_id in proc.stdout
    assert not _runs(client, "feedtune-shapes")

    # `feedtune best` and `load_best` without an experiment look in the same one: it holds
    # no trained run yet, and the error names it.
    best = feedtune_in_process([*FEEDTUNE, "best", "--no-progress", "--set=data.path=my_images"])
    assert best.returncode == 1 and "experiment 'feedtune-my_images'" in best.stderr
    import feedtune

    with pytest.raises(LookupError, match="experiment 'feedtune-my_images'"):
        feedtune.load_best(data_path="my_images")

    # An experiment named explicitly wins.
    proc = feedtune_in_process(
        [*inspect, "--set", "augment.image_size=16", "--set=experiment=mine"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_runs(client, "mine")) == 1 and len(_runs(client, "feedtune-my_images")) == 1


@pytest.mark.parametrize(
    ("search", "stage", "said"),
    [
        ("", "all", "search: no searched keys, "),
        ("search: {loader.num_workers: {int: [0, 1]}}\n", "quality", "for the quality stage"),
        ("search: {train.lr: {float: [1.0e-3, 1.0e-2]}}\n", "speed", "for the speed stage"),
    ],
)
def test_tune_with_nothing_to_search_is_a_config_error(tmp_path, mlflow_store, search, stage, said):
    config = tmp_path / "bare.yaml"
    config.write_text("train: {epochs: 1}\n" + search)
    data = write_image_folder(tmp_path / "imgs", {"a": 4, "b": 4}, size=(32, 32))
    cmd = [*FEEDTUNE, "tune", "--no-progress", "--config", str(config), "--stage", stage]
    proc = feedtune_in_process([*cmd, "--set", f"data.path={data}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("feedtune: config error: search: no searched keys")
    assert said in proc.stderr and "search section" in proc.stderr
    assert not _runs(MlflowClient(), "feedtune-imgs")  # stopped before any run
