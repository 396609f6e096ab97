"""Search strategies on an equal wall budget, run by hand (results: BENCHMARKS.md, "A search
you can trust").

    .venv/bin/python benchmarks/search_strategies.py run --dataset shapes --repeat 1
    .venv/bin/python benchmarks/search_strategies.py run --dataset shapes-shift --repeat 1
    .venv/bin/python benchmarks/search_strategies.py table
    .venv/bin/python benchmarks/search_strategies.py rescore --dataset shapes-shift --budget 540 \
        --seeds 1003 1004 1005 1006

Each ``run`` is one repeat on one dataset: the strategies one after the other (their order
rotates with the repeat, so none always runs first), each a whole ``feedtune tune`` job (speed
stage, then quality stage) with the same ``--timeout`` and ``search.sampler_seed`` = the repeat,
in a fresh tracking store and Optuna journal:

- ``feedtune``: the default job (arms, calibration, trusted rungs, re-check on fresh seeds);
- ``tpe-hyperband``: Optuna's TPE with ``HyperbandPruner`` on the same space, the best trial
  recommended as it scored (no arms, no calibration, no re-check);
- ``tpe-median``: TPE with ``MedianPruner``, trials of the full length, the best as it scored;
- ``anchor``: no search, the fixed recipe (``search.anchors``' first entry) recommended.

Every recommendation (the study's ``study/best_params.json``; the anchor's overrides) is then
scored the same way: ``feedtune train`` of those settings with seeds 1001 and 1002 (each seed
also draws its own split), mean val macro-F1. Each row is appended to ``--out`` (JSON lines,
committed), so a table can be built over several sessions. Run nothing else meanwhile: the
budget is wall time.

Two seeds score a recommendation with the seed spread of one run over sqrt(2); where the
strategies' answers differ by less than that, ``rescore`` trains every row's recommendation
(of a dataset and budget) on more seeds, kept in the row's ``more_scores``. Identical settings
train identically on a seed, so each (settings, seed) is trained once.
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

STRATEGIES = {
    "feedtune": [],
    "tpe-hyperband": [
        "search.pruner=hyperband",
        "search.anchors=[]",
        "search.calibration_trials=0",
        "search.noise_seeds=0",
        "search.recheck_seeds=0",
    ],
    "tpe-median": [
        "search.pruner=median",
        "search.anchors=[]",
        "search.calibration_trials=0",
        "search.noise_seeds=0",
        "search.recheck_seeds=0",
    ],
    "anchor": None,  # no search
}
SCORE_SEEDS = (1001, 1002)
DEFAULT_OUT = REPO / "benchmarks" / "results" / "search_strategies.jsonl"


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        PYTHONPATH=str(REPO / "src"),
        FEEDTUNE_PROGRESS="lines",
    )
    return env


def _feedtune(tmp: Path, log: Path, *args: str) -> float:
    start = time.perf_counter()
    with log.open("a") as out:
        subprocess.run(
            [sys.executable, "-m", "feedtune", *args],
            cwd=REPO,
            env=_env(tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return time.perf_counter() - start


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def _study_outcome(tmp: Path, experiment: str) -> dict:
    """The parent run's recommendation and figures."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`feedtune.kind` = 'study'"
    )
    try:
        path = client.download_artifacts(parent.info.run_id, "study/best_params.json", str(tmp))
        settings = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - no trial finished in the budget: the start stands
        settings = {}
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    trials = [r for r in runs if r.data.tags.get("feedtune.stage") == "quality"]
    full = [r for r in trials if r.info.status == "FINISHED"]
    figures = {
        k: v
        for k, v in parent.data.metrics.items()
        if k.startswith(("rung_", "winner_minus", "recheck_", "noise_", "start_", "best_"))
        or k in ("speed_stage_s", "arms_s", "search_s", "search_trials")
    }
    rungs = {
        m: [(h.step, round(h.value, 3)) for h in client.get_metric_history(parent.info.run_id, m)]
        for m in ("rung_spearman", "rung_spearman_n", "rung_spearman_low")
    }
    return {
        "settings": {k: v for k, v in settings.items()},
        "configurations": len(trials),
        "finished_trials": len(full),
        "figures": figures,
        "rungs": rungs,
        "recommended": parent.data.tags.get("feedtune.recommended"),
        "winner_vs_start": parent.data.tags.get("feedtune.winner_vs_start"),
    }


def _train_score(tmp: Path, log: Path, dataset: str, settings: dict, seed: int, name: str) -> float:
    """``settings`` trained with ``seed`` (experiment ``name``): the run's best val macro-F1."""
    from mlflow.tracking import MlflowClient

    sets = [f"{k}={v}" for k, v in settings.items()]
    args = ["train", *_sets([f"data.name={dataset}", *sets, f"seed={seed}"])]
    _feedtune(tmp, log, *args, "--set", f"experiment={name}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1)
    return run.data.metrics["best_val_f1_macro"]


def _score(tmp: Path, log: Path, dataset: str, settings: dict) -> list[float]:
    """``settings`` trained with each score seed: the runs' best val macro-F1."""
    return [_train_score(tmp, log, dataset, settings, s, f"score-{s}") for s in SCORE_SEEDS]


def _score_more(rows: list[dict], dataset: str, seeds: list[int], logs: Path) -> None:
    """Each row's settings on each of ``seeds`` it lacks, in ``row["more_scores"]``."""
    trained = {
        (json.dumps(row["settings"], sort_keys=True), int(seed)): value
        for row in rows
        for seed, value in row.get("more_scores", {}).items()
    }
    log = logs / f"{dataset}-rescore.log"
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            key = json.dumps(row["settings"], sort_keys=True)
            more = row.setdefault("more_scores", {})
            for seed in seeds:
                if (key, seed) not in trained:
                    name = f"rescore-{len(trained)}"
                    score = _train_score(Path(tmp), log, dataset, row["settings"], seed, name)
                    trained[(key, seed)] = score
                more[str(seed)] = trained[(key, seed)]


def _anchor_settings() -> dict:
    from feedtune.config import load_config
    from feedtune.tuning.arms import config_arms

    cfg = load_config(REPO / "experiments" / "default.yaml")
    return dict(config_arms(cfg)[1].overrides)


def run_cell(strategy: str, dataset: str, repeat: int, budget: float, logs: Path) -> dict:
    log = logs / f"{dataset}-r{repeat}-{strategy}.log"
    row = {"strategy": strategy, "dataset": dataset, "repeat": repeat, "budget_s": budget}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if STRATEGIES[strategy] is None:
            settings = _anchor_settings()
            row.update(settings=settings, wall_s=0.0)
        else:
            experiment = f"{strategy}-{dataset}"
            sets = [
                f"data.name={dataset}",
                f"experiment={experiment}",
                f"search.sampler_seed={repeat}",
                *STRATEGIES[strategy],
            ]
            args = ["tune", "--timeout", str(budget), "--storage", f"journal:{tmp / 'o.journal'}"]
            wall = _feedtune(tmp, log, *args, "--study", strategy, *_sets(sets))
            row.update(_study_outcome(tmp, experiment), wall_s=round(wall, 1))
        row["scores"] = _score(tmp, log, dataset, row["settings"])
    row["score"] = statistics.mean(row["scores"])
    row["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    row["date"] = time.strftime("%Y-%m-%d")
    return row


def run(args: argparse.Namespace) -> None:
    names = list(STRATEGIES) if not args.strategies else args.strategies.split(",")
    shift = (args.repeat - 1) % len(names)
    order = names[shift:] + names[:shift]  # rotated per repeat: interleaved across repeats
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "feedtune", "data", "--name", args.dataset],
        cwd=REPO,
        env=_env(logs),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for strategy in order:
        row = run_cell(strategy, args.dataset, args.repeat, args.budget, logs)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _every_score(row: dict) -> list[float]:
    """A row's scores on the score seeds, then on the seeds ``rescore`` added."""
    return [*row["scores"], *row.get("more_scores", {}).values()]


def rescore(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = _rows(out)
    chosen = [r for r in rows if r["dataset"] == args.dataset and r["budget_s"] == args.budget]
    _score_more(chosen, args.dataset, args.seeds, Path(args.logs))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in chosen:
        every = _every_score(r)
        print(f"{r['strategy']} r{r['repeat']}: {statistics.mean(every):.3f} over {len(every)}")


def table(args: argparse.Namespace) -> None:
    rows = _rows(Path(args.out))
    print(
        "| dataset | strategy | repeat | budget | wall | configurations | recommended "
        "| score (seeds 1001, 1002) | more seeds (mean, n) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["dataset"], r["budget_s"], r["strategy"], r["repeat"])):
        rec = r.get("recommended") or (
            "best trial" if r["strategy"].startswith("tpe") else "anchor"
        )
        scores = ", ".join(f"{s:.3f}" for s in r["scores"])
        note = f" ({r['note']})" if r.get("note") else ""
        every = _every_score(r)
        more = f"{statistics.mean(every):.3f}, {len(every)}" if r.get("more_scores") else ""
        print(
            f"| {r['dataset']} | {r['strategy']}{note} | {r['repeat']} | {r['budget_s']:.0f} s "
            f"| {r['wall_s']:.0f} s | {r.get('configurations', 0)} | {rec} "
            f"| **{r['score']:.3f}** ({scores}) | {more} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--dataset", default="shapes", choices=["shapes", "shapes-shift"])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--budget", type=float, default=540.0)
    p.add_argument("--strategies", default="", help="comma-separated; default: all")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--logs", default="/tmp/search_strategies")
    p = sub.add_parser("rescore")
    p.add_argument("--dataset", default="shapes", choices=["shapes", "shapes-shift"])
    p.add_argument("--budget", type=float, default=540.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1003, 1004, 1005, 1006])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--logs", default="/tmp/search_strategies")
    p = sub.add_parser("table")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    {"run": run, "rescore": rescore, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
