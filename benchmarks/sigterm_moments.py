"""SIGTERM at random moments of a tiny ``feedtune train``, run by hand:

    .venv/bin/python benchmarks/sigterm_moments.py [--runs 20] [--seed 0]

Every run is a fresh ``python -m feedtune train`` (3 epochs of 32 px images, batches of 8)
against one temporary SQLite MLflow store. One untouched run first measures how long the
command lives once its signal handler is set; each of the ``--runs`` runs then gets SIGTERM
at a moment drawn uniformly from that span (the start-up imports, the data preparation, the
epochs, the run's end). A run passes when it exits 130 and leaves no MLflow run RUNNING; one
that had already finished before its signal came is counted apart, and another run is drawn
in its place, so that ``--runs`` runs are signalled.

Before the handler is set (the interpreter starting, ``feedtune.cli`` imported: a fraction of
a second) SIGTERM is the operating system's: the process is killed outright. The moments are
drawn after it, found from /proc (Linux).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
experiment: {experiment}
augment: {{image_size: 32}}
loader: {{batch_size: 8}}
train: {{epochs: 3, measure_batches: 2, patience: 0}}
"""


def write_images(root: Path) -> Path:
    """Three classes of small JPEGs, in groups of two."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 210)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(30):
            shade = tuple(max(0, c - 3 * i) for c in rgb)
            Image.new("RGB", (48, 40), shade).save(root / name / f"g{i // 2}_{i}.jpg")
    return root


def catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt"))
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def start(tmp: Path, data: Path, experiment: str, env: dict[str, str]) -> subprocess.Popen:
    cfg = tmp / f"{experiment}.yaml"
    cfg.write_text(CONFIG.format(experiment=experiment))
    cmd = [sys.executable, "-m", "feedtune", "train", "--no-progress", "--config", str(cfg)]
    cmd += ["--set", f"data.path={data}"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_handler(proc: subprocess.Popen) -> float:
    """Waits until ``proc`` handles SIGTERM itself; the time it did (time.monotonic())."""
    while not catches_sigterm(proc.pid):
        if proc.poll() is not None:
            raise RuntimeError(f"feedtune ended before setting its handler: {proc.returncode}")
        time.sleep(0.002)
    return time.monotonic()


def running_runs(experiment: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    return sum(r.info.status == "RUNNING" for r in client.search_runs([exp.experiment_id]))


def one_run(tmp: Path, data: Path, env: dict[str, str], i: int, delay: float) -> dict:
    experiment = f"sigterm-{i}"
    proc = start(tmp, data, experiment, env)
    try:
        armed = wait_for_handler(proc)
        time.sleep(max(0.0, armed + delay - time.monotonic()))
        ended_first = proc.poll() is not None
        if not ended_first:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = running_runs(experiment)
    ok = proc.returncode == 130 and left == 0
    return {
        "i": i,
        "delay": delay,
        "code": proc.returncode,
        "running": left,
        "ok": ok,
        "ended_first": ended_first,
        "err": err.strip().splitlines()[-1:] if err else [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = write_images(tmp / "imgs")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        proc = start(tmp, data, "sigterm-calibration", env)
        armed = wait_for_handler(proc)
        proc.communicate(timeout=600)
        span = time.monotonic() - armed
        print(f"untouched run: exit {proc.returncode}, {span:.1f} s after its handler was set")
        rows: list[dict] = []
        # A run that ended before its moment came tested nothing: another is drawn, until
        # ``--runs`` runs got their signal (at most twice as many runs in all).
        while sum(not r["ended_first"] for r in rows) < args.runs and len(rows) < 2 * args.runs:
            i = len(rows)
            row = one_run(tmp, data, env, i, rng.uniform(0.0, span))
            rows.append(row)
            print(
                f"run {i:2d}: SIGTERM at {row['delay']:5.2f} s -> exit {row['code']}, "
                f"{row['running']} RUNNING"
                + (" (had ended before it)" if row["ended_first"] else "")
                + ("" if row["ok"] else f"  {row['err']}"),
                flush=True,
            )
    signalled = [r for r in rows if not r["ended_first"]]
    passed = sum(r["ok"] for r in signalled)
    print(
        f"{passed}/{len(signalled)} signalled runs exited 130 with no RUNNING run"
        f" ({len(rows) - len(signalled)} had ended before their signal)"
    )
    return 0 if passed == len(signalled) else 1


if __name__ == "__main__":
    raise SystemExit(main())
