"""Issue 5 benchmarks, run by hand (results go to BENCHMARKS.md).

    .venv/bin/python benchmarks/tune_benchmarks.py main       # make-tune wall time vs baseline
    .venv/bin/python benchmarks/tune_benchmarks.py speed      # TPE (<=12 trials) vs exhaustive grid
    .venv/bin/python benchmarks/tune_benchmarks.py overhead   # trial with vs without MLflow

Every comparison is measured side by side in one invocation, in a throw-away tracking store
and Optuna storage, so the machine's noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    return env


def _feedtune(tmp: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "feedtune", *args, "--no-progress"],
        cwd=REPO,
        env=_env(tmp),
        check=True,
    )
    return time.perf_counter() - start


def _quality_trials(journal: Path, study_name: str) -> list[str]:
    """One line per quality trial: number, state, value, epochs run, the settings it drew."""
    import optuna

    from feedtune.tuning.optuna_storage import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(f"journal:{journal}"))
    lines = []
    for t in study.trials:
        value = t.value if t.value is not None else max(t.intermediate_values.values(), default=0)
        lines.append(
            f"#{t.number} {t.state.name} {value:.3f} after {len(t.intermediate_values)} epochs: "
            + " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()
            )
        )
    return lines


def bench_main() -> dict:
    """`make tune`'s job (default config) and the baseline configuration, same split/epochs."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tune_s = _feedtune(
            tmp, "tune", "--storage", f"journal:{tmp / 'o.journal'}", "--study", "bench"
        )
        baseline = [
            "--set",
            "augment.policy=none",
            "--set",
            "sampler.kind=random",
            "--set",
            "loader.num_workers=0",
            "--set",
            "experiment=baseline",
        ]
        base_s = _feedtune(tmp, "train", *baseline)
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
        tuned = client.search_runs(
            [client.get_experiment_by_name("feedtune-shapes").experiment_id],
            filter_string="tags.`feedtune.kind` = 'study'",
        )[0]
        best = client.get_run(tuned.data.tags["feedtune.best_run_id"])
        base = client.search_runs([client.get_experiment_by_name("baseline").experiment_id])[0]
        return {
            "quality_trials": _quality_trials(tmp / "o.journal", "bench-quality"),
            "tune_wall_s": round(tune_s, 1),
            "baseline_train_wall_s": round(base_s, 1),
            "best_trial_val_f1_macro": best.data.metrics["best_val_f1_macro"],
            "baseline_val_f1_macro": base.data.metrics["best_val_f1_macro"],
            "same_split": best.data.tags["feedtune.split_digest"]
            == base.data.tags["feedtune.split_digest"],
            "best_settings": {
                k: v
                for k, v in best.data.params.items()
                if k.startswith(("augment.", "sampler.", "loader.", "train.lr"))
            },
        }


def bench_speed(trials: int = 12) -> dict:
    """Best train_samples_per_s found by TPE in <= `trials` vs the exhaustive grid's best."""
    import optuna

    from feedtune.config import load_config, with_overrides
    from feedtune.sources.prepare import prepare_data
    from feedtune.training.devices import resolve_device
    from feedtune.tuning import optuna_study as studies
    from feedtune.tuning.space import grid as space_grid
    from feedtune.tuning.space import inert_given, speed_space
    from feedtune.tuning.stages import speed_trial

    cfg = load_config(REPO / "experiments" / "default.yaml")
    data = prepare_data(cfg, progress=False)
    space = speed_space(cfg.search)
    steps = cfg.search.speed_steps
    device = resolve_device(cfg.train.device)  # not searched: the same for every trial

    def objective(params: dict) -> float:
        result = speed_trial(with_overrides(cfg, params), data, device, steps=steps)
        return result["train_samples_per_s"]

    inert = inert_given(cfg.flat(), cuda=device.type == "cuda")
    grid = space_grid(space, inert)  # cells that differ only in inert settings count once
    start = time.perf_counter()
    grid_values = [objective(p) for p in grid]
    grid_s = time.perf_counter() - start
    study = optuna.create_study(
        direction="maximize",
        sampler=studies.build_trial_sampler(cfg.seed),
    )
    study.optimize(lambda t: objective(studies.suggest(t, space, inert)), n_trials=trials)
    # The winner is re-measured beside the grid's winner: one noisy draw must not decide.
    best_grid = grid[max(range(len(grid)), key=grid_values.__getitem__)]
    remeasured = {
        "tpe": [objective(study.best_params) for _ in range(5)],
        "grid": [objective(best_grid) for _ in range(5)],
    }
    ratio = statistics.median(remeasured["tpe"]) / statistics.median(remeasured["grid"])
    return {
        "grid_cells": len(grid),
        "grid_wall_s": round(grid_s, 1),
        "tpe_trials": trials,
        "tpe_best_params": study.best_params,
        "grid_best_params": best_grid,
        "tpe_over_grid": round(ratio, 3),
        "remeasured": remeasured,
    }


def bench_overhead(repeats: int = 2) -> dict:
    """Wall time of one quality trial (the default config's epochs) with MLflow logging vs the
    same trial without, interleaved."""
    import mlflow

    from feedtune.config import load_config
    from feedtune.feed.feed import build_feed
    from feedtune.sources.prepare import prepare_data
    from feedtune.tracking import mlflow_store as tracking
    from feedtune.tracking.recording import RunRecorder, log_run_results
    from feedtune.training.devices import resolve_device
    from feedtune.training.trainer import train_model

    cfg = load_config(REPO / "experiments" / "default.yaml")
    data = prepare_data(cfg, progress=False)
    device = resolve_device(cfg.train.device)
    times = {"tracked": [], "untracked": []}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        tracking.setup("overhead", f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        for _ in range(repeats):
            for mode in ("untracked", "tracked"):
                with tempfile.TemporaryDirectory() as ck:
                    # Building the feed (and filling its caches) is timed, as it was when
                    # train_model built it.
                    start = time.perf_counter()
                    if mode == "tracked":
                        with tracking.start_run("trial", system_metrics=True):
                            feed = build_feed(cfg, data, device)
                            recorder = RunRecorder(cfg, data, feed, Path(ck))
                            out = train_model(
                                cfg, feed, folder=Path(ck), progress=False, callbacks=[recorder]
                            )
                            log_run_results(out, feed)
                    else:
                        feed = build_feed(cfg, data, device)
                        train_model(cfg, feed, folder=Path(ck), progress=False)
                    times[mode].append(time.perf_counter() - start)
    tracked, untracked = statistics.median(times["tracked"]), statistics.median(times["untracked"])
    return {
        "tracked_s": round(tracked, 2),
        "untracked_s": round(untracked, 2),
        "overhead_frac": round(tracked / untracked - 1, 4),
        "runs": times,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["main", "speed", "overhead"])
    which = parser.parse_args().which
    result = {"main": bench_main, "speed": bench_speed, "overhead": bench_overhead}[which]()
    print(json.dumps(result, indent=2, default=str))
