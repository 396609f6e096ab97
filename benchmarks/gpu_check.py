"""``make gpu-check``: what only a CUDA machine can check, in one go, within 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py OUT_DIR [--budget-s 480]

The steps, each a subprocess with its own share of the budget:

1. ``data``: ``feedtune data`` writes the embedded dataset (nothing to do when it is there);
2. ``cuda-tests``: pytest on the test files holding a test skipped without CUDA
   (``reason="needs CUDA"``);
3. ``bench``: ``feedtune bench`` with a real model (resnet18 at 160 px, AMP, channels_last) on
   a small grid: no loader workers or several, the policy per sample or per batch (OpenCV
   decoding, no cache: filling one takes longer than the grid);
4. ``train-batch``: ``feedtune train`` for two epochs with ``augment.where: batch`` (uint8
   batches travel to the device, the policy runs there);
5. ``train-sample``: the same with ``augment.where: sample`` (the policy in the loader);
6. ``tune``: ``feedtune tune`` for three minutes.

After each step the metrics of its MLflow run are read back and one line is printed:
``data_wait_frac``, ``train_samples_per_s / model_samples_per_s`` (1 = the GPU is fed at the
rate it can eat) and the verdict (tag ``feedtune.bottleneck``). The bench reports its best
cell, the tune its best trial (else its last measured one).

OUT_DIR (new or empty) receives a fresh MLflow store (``mlflow.db``, artifacts in ``mlruns/``),
the Optuna journal, one log per step (``<step>.log``, stdout and stderr) and the summary
(``summary.json``, ``summary.md``), rewritten after every step.

A step that fails or runs out of its time is recorded as such and the next one runs. Exit
codes: 0 every step ran to the end, 1 some did not, 2 bad arguments (OUT_DIR not empty), 3 no
CUDA device is present (then nothing is measured and nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NO_CUDA_EXIT = 3
NO_CUDA_LINE = "gpu-check: no CUDA device is present; nothing measured"
# A test file belongs to the CUDA tests when it holds a test with this skip reason.
CUDA_TEST_MARK = 'reason="needs CUDA"'

# Planned seconds per step (with RESERVE_S, the 480 s budget): a step may use what is left
# but the time planned for the steps after it (see step_timeout).
PLAN: dict[str, float] = {
    "data": 40,  # ~3000 images the first time (~10 ms each, one process); then a second
    "cuda-tests": 30,
    "bench": 70,
    "train-batch": 50,
    "train-sample": 50,
    "tune": 220,  # TUNE_S of search, the process's start and close, GRACE_S
}
# Kept back from the steps for reading the runs and writing the summary.
RESERVE_S = 20.0
TUNE_S = 180.0
# What `feedtune tune` needs beyond its --timeout: imports, the data, registering the model.
TUNE_CLOSE_S = 30.0
# A step past its time gets SIGTERM (feedtune then ends its runs KILLED), then SIGKILL after
# this many seconds; both inside the step's share.
GRACE_S = 10.0
# A step whose share has fallen below this is skipped rather than started to be killed.
MIN_STEP_S = 10.0
# MLflow experiment of each step that records runs, and the kind of run that holds its figures.
EXPERIMENTS = {
    "bench": "gpu-check-bench",
    "train-batch": "gpu-check-train-batch",
    "train-sample": "gpu-check-train-sample",
    "tune": "gpu-check-tune",
}
KINDS = {"bench": "bench", "train-batch": "train", "train-sample": "train", "tune": "study"}
FIGURES = ("data_wait_frac", "train_samples_per_s", "model_samples_per_s")


def step_timeout(left_s: float, planned: list[float]) -> float:
    """The next step's time limit, from the ``left_s`` seconds left for it and the steps after
    it (``planned``, its own first): all of them but what the later steps are planned to take,
    so time an earlier step did not use goes to the next; with less left than planned in all
    (a smaller budget), each gets its planned share of what is left."""
    left, total = max(0.0, left_s), sum(planned)
    if total <= 0:
        return 0.0
    return max(left * planned[0] / total, left - (total - planned[0]))


def loader_workers(cpus: int) -> int:
    """Loader workers for a GPU job on ``cpus`` cores: one core stays with the main process
    (which drives the GPU and, with ``where: batch``, launches the policy's kernels) and one
    with the system; more than 8 only add start-up time on ~3000 images."""
    return max(1, min(8, cpus - 2))


def cpu_count() -> int:
    """Cores this process may use (a container's CPU set, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def model_settings(workers: int) -> list[str]:
    """The real model and the feed every measured step shares."""
    return [
        "model.name=resnet18",
        "augment.image_size=160",
        "train.amp=true",
        "train.channels_last=true",
        "train.device=cuda",
        f"loader.num_workers={workers}",
        f"loader.persistent_workers={'true' if workers else 'false'}",
        "loader.pin_memory=true",
    ]


def step_settings(step: str, workers: int) -> list[str]:
    """``--set`` values of a feedtune step: the shared ones, its own experiment, its own."""
    own = {
        "bench": [
            f"bench.num_workers=[0,{workers}]",
            "bench.cache=[none]",
            "bench.decoder=[opencv]",
            "bench.where=[sample,batch]",
            # A GPU step takes milliseconds: the default 6 steps would time mostly noise.
            "bench.train_steps=20",
        ],
        "train-batch": ["train.epochs=2", "augment.where=batch"],
        "train-sample": ["train.epochs=2", "augment.where=sample"],
        "tune": [],
    }[step]
    return [*model_settings(workers), f"experiment={EXPERIMENTS[step]}", *own]


def cuda_test_files(tests: Path) -> list[Path]:
    """Test files holding a test that runs only with CUDA."""
    return sorted(p for p in tests.rglob("test_*.py") if CUDA_TEST_MARK in p.read_text())


def tune_timeout(step_s: float) -> float:
    """``feedtune tune --timeout``: TUNE_S, or less when the step's share cannot hold it."""
    return max(1.0, min(TUNE_S, step_s - GRACE_S - TUNE_CLOSE_S))


def step_command(step: str, out: Path, workers: int, timeout_s: float) -> list[str]:
    """The subprocess of ``step``, run from the checkout."""
    if step == "data":
        return [sys.executable, "-m", "feedtune", "data", "--no-progress"]
    if step == "cuda-tests":
        files = [str(p.relative_to(REPO)) for p in cuda_test_files(REPO / "tests")]
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    args = [sys.executable, "-m", "feedtune", step.split("-")[0], "--no-progress"]
    for setting in step_settings(step, workers):
        args += ["--set", setting]
    if step == "tune":
        args += ["--timeout", f"{tune_timeout(timeout_s):.0f}"]
        args += ["--storage", f"journal:{out / 'optuna.journal'}", "--study", "gpu-check"]
    return args


def step_env(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    env["PYTHONUNBUFFERED"] = "1"  # the log keeps the order of what happened
    env.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`: the check's runs stay in its own store
    return env


def last_line(path: Path) -> str:
    """The log's last non-empty line without pytest's ``=`` rulers: a test tally, an error."""
    lines = [ln.strip(" =") for ln in path.read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:200] if lines else ""


def run_step(step: str, command: list[str], timeout_s: float, out: Path) -> dict[str, Any]:
    """Run ``command`` with its output in ``out/<step>.log``; SIGTERM to its process group
    after ``timeout_s - GRACE_S``, SIGKILL ``GRACE_S`` later (DataLoader workers included)."""
    log = out / f"{step}.log"
    start = time.monotonic()
    with log.open("w") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=step_env(out),
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        status = "ok"
        try:
            proc.wait(timeout=max(1.0, timeout_s - GRACE_S))
        except subprocess.TimeoutExpired:
            status = "timeout"
            _stop(proc)
        except BaseException:  # Ctrl-C: no step is left running behind the check
            _stop(proc)
            raise
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    seconds = time.monotonic() - start
    note = last_line(log) if status == "failed" or step == "cuda-tests" else ""
    if status == "timeout":
        note = f"stopped after {seconds:.0f} s (its share of the budget)"
    return {
        "step": step,
        "status": status,
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "timeout_s": round(timeout_s, 1),
        "log": log.name,
        "command": command,
        "note": note,
    }


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def figures(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, Any]:
    """What a run says about the feed: its wait for batches, end-to-end rate over the model's
    own, and the verdict (None where the run did not record it)."""
    out: dict[str, Any] = {key: metrics.get(key) for key in FIGURES}
    train, model = out["train_samples_per_s"], out["model_samples_per_s"]
    out["train_over_model"] = train / model if train is not None and model else None
    out["verdict"] = tags.get("feedtune.bottleneck")
    return out


def _client(out: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")


def read_runs(client: Any, step: str) -> dict[str, Any]:
    """The figures of ``step``'s MLflow run, its id, and a note on which run they come from."""
    exp = client.get_experiment_by_name(EXPERIMENTS[step])
    if exp is None:
        return {"note": "no MLflow run"}
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`feedtune.kind` = '{KINDS[step]}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return {"note": "no MLflow run"}
    run = runs[0]
    if step != "tune":
        return {"run_id": run.info.run_id, **figures(run.data.metrics, run.data.tags)}
    trials = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    extra = {
        "study_run_id": run.info.run_id,
        "trial_runs": len(trials),
        "best_val_f1_macro": run.data.metrics.get("best_val_f1_macro"),
        "speed_stage": run.data.tags.get("feedtune.speed_stage"),
    }
    best_id = run.data.tags.get("feedtune.best_run_id")
    measured = [t for t in trials if "model_samples_per_s" in t.data.metrics]
    if best_id:
        chosen, which = client.get_run(best_id), "best trial"
    elif measured:
        chosen, which = measured[0], "last measured trial (no best trial)"
    else:
        return {**extra, "note": f"{len(trials)} trial runs, none measured the model"}
    return {
        **extra,
        "run_id": chosen.info.run_id,
        "note": f"{which} of {len(trials)} trial runs",
        **figures(chosen.data.metrics, chosen.data.tags),
    }


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary_line(record: dict[str, Any]) -> str:
    """One printed line per step: status and time, then the feed's figures where it has any."""
    line = f"{record['step']:<13} {record['status']:<8} {record.get('seconds', 0):>4.0f} s"
    if record["step"] in EXPERIMENTS:
        line += (
            f"  data_wait_frac {_fmt(record.get('data_wait_frac'), '.3f')}"
            f"  train/model {_fmt(record.get('train_over_model'), '.2f')}"
            f"  verdict {record.get('verdict') or 'n/a'}"
        )
    if record.get("note"):
        line += f"  ({record['note']})"
    return line


def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the machine, the settings, one table row per step."""
    head = [
        "# gpu-check",
        "",
        f"{summary['device']}, torch {summary['torch']}, {summary['cpus']} CPUs; "
        f"budget {summary['budget_s']:.0f} s, took {summary['total_s']:.0f} s.",
        "",
        f"Shared settings: `{' '.join('--set ' + s for s in summary['settings'])}`",
        "",
        "| step | status | s | data_wait_frac | train/s | model/s | train/model | verdict | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in summary["steps"]:
        measured = r["step"] in EXPERIMENTS
        cells = [
            _fmt(r.get("data_wait_frac"), ".3f"),
            _fmt(r.get("train_samples_per_s"), ".0f"),
            _fmt(r.get("model_samples_per_s"), ".0f"),
            _fmt(r.get("train_over_model"), ".2f"),
            r.get("verdict") or "n/a",
        ]
        rows.append(
            f"| {r['step']} | {r['status']} | {r.get('seconds', 0):.0f} | "
            + " | ".join(cells if measured else [""] * len(cells))
            + f" | {r.get('note', '').replace('|', '/')} |"
        )
    return "\n".join([*head, *rows, ""])


def _write(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))


def check(out: Path, budget_s: float, device: str, torch_version: str) -> int:
    started = time.monotonic()
    deadline = started + budget_s - RESERVE_S
    cpus = cpu_count()
    workers = loader_workers(cpus)
    summary: dict[str, Any] = {
        "device": device,
        "torch": torch_version,
        "cpus": cpus,
        "budget_s": budget_s,
        "settings": model_settings(workers),
        "steps": [],
        "total_s": 0.0,
    }
    print(
        f"gpu-check: {device}, torch {torch_version}, {cpus} CPUs, loader.num_workers={workers}, "
        f"budget {budget_s:.0f} s; logs and summary in {out}",
        flush=True,
    )
    client = None
    steps = list(PLAN)
    for i, step in enumerate(steps):
        timeout = step_timeout(deadline - time.monotonic(), [PLAN[s] for s in steps[i:]])
        if timeout < MIN_STEP_S:
            record = {"step": step, "status": "skipped", "note": "no time left in the budget"}
        elif step == "cuda-tests" and not cuda_test_files(REPO / "tests"):
            # pytest without files would run the whole suite
            record = {"step": step, "status": "failed", "note": f"no test has {CUDA_TEST_MARK}"}
        else:
            record = run_step(step, step_command(step, out, workers, timeout), timeout, out)
        if step in EXPERIMENTS and record["status"] != "skipped":
            try:  # a stopped step may still have recorded runs
                client = client or _client(out)
                found = read_runs(client, step)
            except Exception as exc:  # the summary must still be written
                found = {"note": f"reading its runs failed: {type(exc).__name__}: {exc}"[:200]}
            note = "; ".join(n for n in (record.get("note"), found.pop("note", "")) if n)
            record.update(found, note=note)
        summary["steps"].append(record)
        summary["total_s"] = round(time.monotonic() - started, 1)
        _write(out, summary)
        print(summary_line(record), flush=True)
    ran = sum(r["status"] == "ok" for r in summary["steps"])
    print(
        f"gpu-check: {ran} of {len(steps)} steps ran to the end in {summary['total_s']:.0f} s; "
        f"{out / 'summary.md'}",
        flush=True,
    )
    return 0 if ran == len(steps) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="a new or empty folder")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, file=sys.stderr)
        return NO_CUDA_EXIT
    out = args.out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Its MLflow store and Optuna journal must start empty; nothing of yours is cleared.
        parser.error(f"{args.out} is not an empty folder: give a new or empty one")
    if args.budget_s < RESERVE_S + MIN_STEP_S * len(PLAN):
        parser.error(f"--budget-s {args.budget_s:g}: too small to run the steps")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    return check(out, args.budget_s, device, torch.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
