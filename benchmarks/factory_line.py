"""The factory line of two model sizes on the same images: `small_cnn` at 64 px vs a ResNet-18
at 160 px, each with `feedtune bench` at the config's batch and a short speed stage.

usage: python benchmarks/factory_line.py [--workers 0 1 2] [--speed-trials 4]
                                         [--big resnet18] [--big-size 160]

For each model, in one process and one run (so the two are measured on the same machine state,
the small model first, then the big, then the small again, whose two figures bound the noise):
`feedtune bench` over `loader.num_workers` (model rate, best loader rate, best end-to-end rate,
verdict), then `feedtune tune --stage speed` for `--speed-trials` trials on the default search
space, and which speed settings it chose. Everything goes to a throw-away MLflow store; the
embedded dataset is written on first use (no network: the big model starts untrained).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def _feedtune(store: str, *args: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.run(
        [sys.executable, "-m", "feedtune", *args, "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"feedtune {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _bench(store: str, model: list[str], workers: list[int], tag: str) -> dict:
    experiment = f"factory-bench-{tag}"
    sets = [*model, f"experiment={experiment}", f"bench.num_workers={workers}"]
    # The speed stage searches the decoder and where the policy runs; the grid keeps to the
    # workers and the cache, so a big model's slow steps stay affordable on a CPU.
    sets += ["bench.cache=[none, resized]", "bench.decoder=[pil]", "bench.where=[sample]"]
    _feedtune(store, "bench", *(f"--set={s}" for s in sets))
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    table = client.download_artifacts(run.info.run_id, "bench/results.csv", tempfile.mkdtemp())
    import pandas as pd

    results = pd.read_csv(table)
    best = results.loc[results["train_samples_per_s"].idxmax()]
    return {
        "model/s": float(results["model_samples_per_s"].median()),
        "best loader/s": float(results["loader_samples_per_s"].max()),
        "best train/s": float(best["train_samples_per_s"]),
        "at num_workers": int(best["num_workers"]),
        "wait": float(best["data_wait_frac"]),
        "verdict": str(best["bottleneck"]),
    }


def _speed_stage(store: str, model: list[str], trials: int, tag: str) -> dict:
    experiment = f"factory-speed-{tag}"
    journal = Path(tempfile.mkdtemp()) / "optuna.journal"
    args = ["tune", "--stage", "speed", "--n-trials", str(trials), "--study", tag]
    args += ["--storage", f"journal:{journal}"]
    _feedtune(store, *args, *(f"--set={s}" for s in [*model, f"experiment={experiment}"]))
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("feedtune.kind") == "study"
    ]
    path = client.download_artifacts(
        parent.info.run_id, "study/best_speed_params.json", tempfile.mkdtemp()
    )
    return json.loads(Path(path).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--speed-trials", type=int, default=4)
    ap.add_argument("--big", default="resnet18")
    ap.add_argument("--big-size", type=int, default=160)
    args = ap.parse_args()

    models = {
        "small_cnn@64": ["model.name=small_cnn", "augment.image_size=64"],
        f"{args.big}@{args.big_size}": [
            f"model.name={args.big}",
            f"augment.image_size={args.big_size}",
        ],
    }
    order = [*models, next(iter(models))]  # small, big, small again
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        benches: dict[str, list[dict]] = {}
        for i, name in enumerate(order):
            tag = f"{name.replace('@', '-')}-{i}"
            benches.setdefault(name, []).append(_bench(store, models[name], args.workers, tag))
            print(name, json.dumps(benches[name][-1]), flush=True)
        for name, model in models.items():
            tag = name.replace("@", "-")
            chosen = _speed_stage(store, model, args.speed_trials, tag)
            print(name, "speed stage chose", json.dumps(chosen), flush=True)
    small, big = list(models)
    ratio = benches[big][0]["model/s"] / benches[small][0]["model/s"]
    print(f"model rate {big} / {small}: {ratio:.3f}")


if __name__ == "__main__":
    main()
