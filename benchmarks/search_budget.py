"""The search on a budget, run by hand (results go to BENCHMARKS.md, "The search on a budget").

    .venv/bin/python benchmarks/search_budget.py job --runs 3    # `make tune`'s job, 3 times
    .venv/bin/python benchmarks/search_budget.py cold-start      # cold start vs the recipe

`job` runs the default `feedtune tune` job several times, each in a fresh tracking store and
Optuna storage, and reports per run its wall time, the quality configurations it evaluated,
how many reached the full length, `rung_spearman` and the verdict against the start.

`cold-start` trains the hand-found recipe (`experiments/default.yaml`) once with `feedtune
train`, then runs `feedtune tune --config experiments/cold-start.yaml` with three search seeds
(`search.sampler_seed`), and compares the search's best val macro-F1 with the recipe's on the
same split (checked from `feedtune.split_digest`).

Run nothing else meanwhile: the job's deadline is wall time, so a busy machine means fewer
configurations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from tune_benchmarks import _feedtune  # noqa: E402  (same subprocess runner)


def _client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def _study_run(client, experiment: str, study: str):
    """The parent run of ``study`` (``feedtune.kind=study``) in ``experiment``."""
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`feedtune.kind` = 'study' and tags.`optuna.study_name` = '{study}'",
    )[0]


def _trials(journal: Path, study: str, full_epochs: int) -> dict:
    import optuna

    from feedtune.tuning.optuna_storage import open_storage

    trials = optuna.load_study(
        study_name=f"{study}-quality", storage=open_storage(f"journal:{journal}")
    ).trials
    started = [t for t in trials if t.intermediate_values]
    return {
        "configurations": len(started),
        "full_length": sum(max(t.intermediate_values) >= full_epochs for t in started),
        "states": {
            s: sum(t.state.name == s for t in trials) for s in {t.state.name for t in trials}
        },
        "running_left": sum(t.state.name == "RUNNING" for t in trials),
    }


def _tune(tmp: Path, study: str, *args: str) -> dict:
    wall = _feedtune(
        tmp, "tune", "--storage", f"journal:{tmp / 'o.journal'}", "--study", study, *args
    )
    return {"wall_s": round(wall, 1)}


def bench_job(runs: int) -> list[dict]:
    from feedtune.config.loading import load_config

    cfg = load_config(REPO / "experiments/default.yaml")
    out = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            row = _tune(tmp, "job")
            run = _study_run(_client(tmp), cfg.experiment, "job")
            m, tags = run.data.metrics, run.data.tags
            row.update(_trials(tmp / "o.journal", "job", cfg.train.epochs))
            row.update(
                {
                    "best_val_f1_macro": m.get("best_val_f1_macro"),
                    "start_val_f1_macro": m.get("start_val_f1_macro"),
                    "noise_val_f1_macro_sd": m.get("noise_val_f1_macro_sd"),
                    "rung_spearman": m.get("rung_spearman"),
                    "winner_vs_start": tags.get("feedtune.winner_vs_start"),
                    "speed_stage": tags.get("feedtune.speed_stage"),
                    "study_run_status": run.info.status,
                }
            )
        print(f"run {i + 1}: {json.dumps(row)}", flush=True)
        out.append(row)
    return out


def bench_cold_start(seeds: list[int]) -> dict:
    from feedtune.config.loading import load_config

    recipe_cfg = load_config(REPO / "experiments/default.yaml")
    cold_cfg = load_config(REPO / "experiments/cold-start.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe_s = _feedtune(tmp, "train")
        client = _client(tmp)
        recipe = client.search_runs(
            [client.get_experiment_by_name(recipe_cfg.experiment).experiment_id]
        )[0]
        searches = []
        for seed in seeds:
            study = f"cold{seed}"
            row = _tune(
                tmp,
                study,
                "--config",
                "experiments/cold-start.yaml",
                "--set",
                f"search.sampler_seed={seed}",
            )
            run = _study_run(client, cold_cfg.experiment, study)
            best = client.get_run(run.data.tags["feedtune.best_run_id"])
            row.update(_trials(tmp / "o.journal", study, cold_cfg.train.epochs))
            row.update(
                {
                    "sampler_seed": seed,
                    "best_val_f1_macro": run.data.metrics.get("best_val_f1_macro"),
                    "start_val_f1_macro": run.data.metrics.get("start_val_f1_macro"),
                    "winner_vs_start": run.data.tags.get("feedtune.winner_vs_start"),
                    "same_split": best.data.tags.get("feedtune.split_digest")
                    == recipe.data.tags.get("feedtune.split_digest"),
                    "best_epochs": best.data.params.get("train.epochs"),
                    "best_settings": {
                        k: v
                        for k, v in best.data.params.items()
                        if k.startswith(("augment.", "sampler.", "loader.", "train.lr", "data."))
                    },
                }
            )
            print(f"seed {seed}: {json.dumps(row)}", flush=True)
            searches.append(row)
        recipe_f1 = recipe.data.metrics["best_val_f1_macro"]
        median = statistics.median(r["best_val_f1_macro"] for r in searches)
        return {
            "recipe_val_f1_macro": recipe_f1,
            "recipe_train_wall_s": round(recipe_s, 1),
            "searches": searches,
            "search_median_best_val_f1_macro": median,
            "median_minus_recipe": round(median - recipe_f1, 4),
            "target_met": median >= recipe_f1 - 0.03,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    job = sub.add_parser("job")
    job.add_argument("--runs", type=int, default=3)
    cold = sub.add_parser("cold-start")
    cold.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    start = time.perf_counter()
    result = bench_job(args.runs) if args.what == "job" else bench_cold_start(args.seeds)
    print(json.dumps({"result": result, "total_s": round(time.perf_counter() - start)}, indent=1))


if __name__ == "__main__":
    main()
