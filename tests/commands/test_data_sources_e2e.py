"""`feedtune inspect`, `train` and `tune` on a Hugging Face dataset saved to disk and on a
user's torch Dataset (module.path:callable): in this process through ``cli.main``, against a
throw-away MLflow store and a real Optuna journal, with DataLoader workers reading the items."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from feedtune.cli import main as feedtune_main
from tests.conftest import artifact_paths, single_torch_thread
from tests.sources.source_builders import make_images, write_hf, write_user_module

pytest.importorskip("datasets")
pytestmark = pytest.mark.slow

TINY = [
    "augment.image_size=32",
    "loader.batch_size=8",
    "train.measure_batches=0",
    "train.patience=0",
    "model.width=8",
]
TUNE = """
experiment: {experiment}
search:
  loader.num_workers: {{int: [0, 1]}}
  data.decoder: {{choice: [pil, opencv]}}
  train.lr: {{float: [1.0e-3, 1.0e-2], log: true}}
  n_trials_speed: 1
  n_trials_quality: 1
  speed_steps: 3
  noise_seeds: 0
  anchors: []
  recheck_seeds: 0
  speed_skip_wait_frac: 0
"""


def _main(*argv: str) -> None:
    with single_torch_thread():
        code = feedtune_main(list(argv))
    while mlflow.active_run() is not None:
        mlflow.end_run()
    assert code == 0


def _sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in (*TINY, *overrides)]


def _runs(experiment: str) -> list:
    client = MlflowClient()
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _check_commands(tmp_path: Path, path: str, name: str, *, decoder_searched: bool) -> None:
    """inspect, a two-epoch train with a worker, and a two-trial tune on ``path``."""
    data = f"data.path={path}"
    _main("inspect", "--no-progress", *_sets(data, f"experiment={name}-inspect"))
    (run,) = _runs(f"{name}-inspect")
    assert run.data.metrics["n_images"] == 35 and run.data.metrics["n_bad_images"] == 1
    client = MlflowClient()
    summary = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "inspect/summary.json", str(tmp_path))
        ).read_text()
    )
    assert summary["classes"] == ["blue", "green", "red"] and summary["bad"]["n_bad"] == 1

    train = [data, f"experiment={name}-train", "train.epochs=2", "loader.num_workers=1"]
    train += ["augment.where=batch"]  # uint8 squares from the cache, the policy on batches
    _main("train", "--no-progress", *_sets(*train, "loader.cache=resized"))
    (run,) = _runs(f"{name}-train")
    assert run.info.status == "FINISHED" and run.data.metrics["n_bad_images"] == 1
    assert run.data.metrics["best_val_acc"] > 0.5  # colours: learnt in two epochs
    assert {"split/train.csv", "augment/samples.png", "checkpoints/best.pt"} <= artifact_paths(
        client, run.info.run_id
    )
    bad = pd.read_csv(
        client.download_artifacts(run.info.run_id, "data/bad_images.csv", str(tmp_path))
    )
    assert bad["path"].str.endswith("#000005").all() and len(bad) == 1

    config = tmp_path / f"{name}.yaml"
    config.write_text(TUNE.format(experiment=f"{name}-tune"))
    journal = f"journal:{tmp_path / 'optuna.journal'}"
    argv = ["tune", "--no-progress", "--config", str(config), "--storage", journal]
    _main(*argv, "--study", name, *_sets(data, "train.epochs=1"))
    trials = [r for r in _runs(f"{name}-tune") if r.data.tags.get("feedtune.kind") == "trial"]
    assert sorted(r.data.tags["feedtune.stage"] for r in trials) == ["quality", "speed"]
    assert all(r.info.status == "FINISHED" for r in trials)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    (speed,) = optuna.load_study(study_name=f"{name}-speed", storage=storage).trials
    assert ("data.decoder" in speed.params) == decoder_searched


def test_a_saved_hf_dataset_goes_through_inspect_train_and_tune(tmp_path, mlflow_store):
    broken = b"\xff\xd8\xff\xe0" + b"\x00" * 60  # a JPEG start and no end: truncated
    root = write_hf(tmp_path / "hf", *make_images(36), broken={5: broken})
    _check_commands(tmp_path, str(root), "hf", decoder_searched=True)


def test_a_user_dataset_goes_through_inspect_train_and_tune(
    tmp_path, mlflow_store, monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    spec = write_user_module(tmp_path / "mods", "userdata_e2e", *make_images(36), broken=5)
    # arrays and PIL images: nothing for data.decoder to decode, so the speed stage skips it
    _check_commands(tmp_path, spec, "user", decoder_searched=False)
    # A run's callable is code: resuming it imports it only when the caller names it too.
    (run,) = _runs("user-train")
    capsys.readouterr()
    assert feedtune_main(["train", "--no-progress", "--resume", run.info.run_id]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("feedtune: error: run ") and f"--set data.path={spec}" in err
