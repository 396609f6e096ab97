"""One process vs two (torchrun, gloo) training the same configuration at the same global batch.

usage: python benchmarks/ddp_vs_single.py [--rounds 2] [--epochs 3] [--batch 32]

Each round runs, alternating, `feedtune train` with `loader.batch_size=B` and `torchrun
--nproc-per-node 2 -m feedtune train` with `loader.batch_size=B/2` (the same global batch), on
the embedded dataset, into a throw-away MLflow store; prints per run `train_samples_per_s`
(the median epoch rate after the first: all processes' samples over the epoch's time) and
`best_val_f1_macro`, then the medians and the ratio two/one. On a 2-core CPU the two
processes share the cores the one process has.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(store: str, processes: int, batch: int, epochs: int, tag: str) -> dict[str, float]:
    sets = [
        f"loader.batch_size={batch // processes}",
        f"train.epochs={epochs}",
        "train.patience=0",
        "train.measure_batches=0",
        f"experiment=ddp-bench-{tag}",
    ]
    launcher = [sys.executable, "-m", "feedtune"]
    if processes > 1:
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)),
            *("--master-addr", "127.0.0.1", "--master-port", str(_free_port())),
            *("-m", "feedtune"),
        ]
    cmd = [*launcher, "train", "--no-progress", *(f"--set={s}" for s in sets)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": str(2 // processes)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name(f"ddp-bench-{tag}").experiment_id])
    # The epochs' own rate (all processes' samples over the epoch's time), the first epoch left
    # out as set-up: with train.measure_batches=0 no probe runs to log train_samples_per_s.
    epochs = sorted(client.get_metric_history(run.info.run_id, "epoch_samples_per_s"), key=_step)
    steady = [m.value for m in epochs[1:]] or [m.value for m in epochs]
    return {
        "train_samples_per_s": statistics.median(steady),
        "best_val_f1_macro": run.data.metrics["best_val_f1_macro"],
    }


def _step(metric) -> int:
    return metric.step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    subprocess.run([sys.executable, "-m", "feedtune", "data"], cwd=REPO, check=True)
    rows: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for processes in (1, 2):
                store = f"sqlite:///{Path(tmp) / f'{r}-{processes}.db'}"
                rows[processes].append(
                    _run(store, processes, a.batch, a.epochs, f"{r}-{processes}")
                )
                print(processes, "process(es), round", r, rows[processes][-1], flush=True)
    med = {p: {k: statistics.median(row[k] for row in rs) for k in rs[0]} for p, rs in rows.items()}
    print("medians:", med)
    rate = med[2]["train_samples_per_s"] / med[1]["train_samples_per_s"]
    print(f"two/one train_samples_per_s: {rate:.2f}")


if __name__ == "__main__":
    main()
