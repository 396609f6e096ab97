"""``feedtune bench`` on a tiny generated ImageFolder: one MLflow run, one row per cell."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from feedtune.commands.bench import grid, report, run_bench
from feedtune.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(folder, *extra):
    return load_config(
        None,
        [
            "experiment=bench-test",
            f"data.path={folder}",
            "augment.image_size=16",
            "bench.num_workers=[0]",
            "bench.batch_size=[8]",
            "bench.library=[torchvision]",
            "bench.order=[resize_first]",
            "bench.cache=[none, resized]",
            "bench.decoder=[pil]",
            "bench.where=[sample]",
            "bench.batches=2",
            "bench.train_steps=2",
            *extra,
        ],
    )


def test_grid_varies_num_workers_fastest(tiny_folder):
    cfg = _cfg(tiny_folder, "bench.num_workers=[0, 2]", "bench.order=[resize_first, augment_first]")
    cells = grid(cfg)
    assert len(cells) == 2 * 2 * 2
    assert [c["num_workers"] for c in cells[:2]] == [0, 2]
    assert {c["order"] for c in cells[:2]} == {"resize_first"}


def test_an_axis_the_source_makes_inert_keeps_the_configs_value(tiny_folder):
    cfg = _cfg(tiny_folder, "bench.decoder=[pil, opencv]", "data.decoder=opencv")
    assert {c["decoder"] for c in grid(cfg)} == {"pil", "opencv"}
    # a Dataset of in-memory images: nothing for a decoder to do, one column of cells
    cells = grid(cfg, frozenset({"data.decoder"}))
    assert {c["decoder"] for c in cells} == {"opencv"} and len(cells) == len(grid(cfg)) // 2


def test_bench_logs_one_run_with_results_plot_and_best_cell(tiny_folder, mlflow_store, tmp_path):
    cfg = _cfg(tiny_folder)
    results = run_bench(cfg, progress=False)
    assert len(results) == 2 and list(results["cache"]) == ["none", "resized"]
    assert (results["loader_samples_per_s"] > 0).all()
    assert set(results["bottleneck"]) <= {"loader", "model"}
    # the model's appetite depends on the batch size only: measured once, shared by the cells
    assert results["model_samples_per_s"].nunique() == 1
    assert results.loc[1, "cache_mb"] > 0 and results.loc[0, "cache_mb"] == 0

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == results.attrs["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["feedtune.kind"] == "bench"
    assert run.data.tags["feedtune.bottleneck"] in ("loader", "model")
    best = results.loc[results["train_samples_per_s"].idxmax()]
    for name in ("loader_samples_per_s", "model_samples_per_s", "train_samples_per_s"):
        assert run.data.metrics[name] == float(best[name])
    assert "data_wait_frac" in run.data.metrics and run.data.metrics["bench_cells"] == 2
    assert run.data.params["loader.cache"] == best["cache"]
    assert run.data.params["loader.batch_size"] == "8"

    files = {f.path for f in client.list_artifacts(run.info.run_id, "bench")}
    assert files == {"bench/results.csv", "bench/samples_per_s.png"}
    local = client.download_artifacts(run.info.run_id, "bench/results.csv", str(tmp_path))
    logged = pd.read_csv(local)
    assert len(logged) == 2 and {"num_workers", "cache", "train_samples_per_s"} <= set(logged)

    text = report(results)
    assert "recommended: --set loader.num_workers=0" in text
    assert f"--set loader.cache={best['cache']}" in text


def test_a_stand_in_model_eats_at_its_rate_and_names_the_slow_side(tiny_folder, mlflow_store):
    # A fast loader (resized cache, tiny images) keeps a 100 samples/s stand-in fed...
    fed = run_bench(
        _cfg(tiny_folder, "bench.cache=[resized]", "bench.model_rate=100", "bench.train_steps=6"),
        progress=False,
    ).iloc[0]
    assert 0.75 * 100 < fed["model_samples_per_s"] < 1.1 * 100
    assert 0.6 * 100 < fed["train_samples_per_s"] < 1.1 * 100
    assert fed["bottleneck"] == "model"
    # ...but not one that eats a million samples/s: then the loader is the bottleneck.
    starved = run_bench(
        _cfg(tiny_folder, "bench.cache=[none]", "bench.model_rate=1000000"), progress=False
    ).iloc[0]
    assert starved["bottleneck"] == "loader"
    assert starved["train_samples_per_s"] < 0.5 * starved["model_samples_per_s"]
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("bench-test").experiment_id]
    )
    assert {r.data.tags["feedtune.model"] for r in runs} == {"stand-in:100", "stand-in:1000000"}
