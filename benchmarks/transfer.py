"""Transfer learning on ``shapes-shift``: finetuning the best ``shapes`` model vs the same model
trained from scratch, same data, epochs and settings, several seeds, one invocation.

    python benchmarks/transfer.py                 # temp store: trains the shapes source first
    python benchmarks/transfer.py --tracking-uri sqlite:///mlflow.db   # reuse feedtune-shapes@best

Each seed gives both arms the same split (the split follows ``seed``), so the comparison is
paired. Both arms run every epoch (``train.patience=0``); throughput is not measured
(``train.measure_batches=0``) since it is not what is compared. Results go to BENCHMARKS.md,
section "## Transfer learning (issue 6)" (replaced if present, other sections untouched).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from feedtune.commands.finetune import run_finetune  # noqa: E402
from feedtune.commands.train import run_train  # noqa: E402
from feedtune.config import load_config  # noqa: E402
from feedtune.tracking import mlflow_models  # noqa: E402
from feedtune.tracking import mlflow_store as tracking  # noqa: E402
from feedtune.tracking.lookup import find_best_run  # noqa: E402

SECTION = "## Transfer learning (issue 6)"
SOURCE_EXPERIMENT = "feedtune-shapes"
FINETUNE_CONFIG = REPO / "experiments" / "finetune-shapes-shift.yaml"
FAIR = ["train.patience=0", "train.measure_batches=0"]


def source_run(args: argparse.Namespace) -> tuple[str, bool]:
    """The registered shapes model, or a fresh `feedtune train` (defaults) registered as best."""
    with tracking.use_store():
        try:
            return find_best_run(SOURCE_EXPERIMENT).info.run_id, False
        except LookupError:
            pass
    print("no shapes model in this store: training one with `feedtune train` defaults ...")
    cfg = load_config(
        REPO / "experiments" / "default.yaml", ["train.measure_batches=0", *args.source_overrides]
    )
    run_id = run_train(cfg, progress=args.progress)
    mlflow_models.register_if_better(run_id, SOURCE_EXPERIMENT, metric="best_val_f1_macro")
    return run_id, True


def metrics(run_id: str) -> dict[str, float]:
    with tracking.use_store():
        return dict(tracking.get_run(run_id).data.metrics)


def arm(name: str, fn, cfg) -> dict[str, float]:
    start = time.perf_counter()
    run_id = fn(cfg)
    seconds = time.perf_counter() - start
    m = metrics(run_id)
    row = {
        "f1": m["best_val_f1_macro"],
        "acc": m["best_val_acc"],
        "epochs": m["epochs_run"],
        "seconds": seconds,
        "run_id": run_id,
    }
    print(
        f"  {name:9s} best_val_f1_macro={row['f1']:.3f} best_val_acc={row['acc']:.3f} "
        f"({seconds:.0f} s, run {run_id})"
    )
    return row


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def report(args, source_id, trained, source_metrics, rows, total_s) -> str:
    ft = [r["finetune"] for r in rows]
    sc = [r["scratch"] for r in rows]
    gains = [a["f1"] - b["f1"] for a, b in zip(ft, sc, strict=True)]
    wins = sum(g > 0 for g in gains)
    overrides = " ".join(args.overrides) or "(none)"
    lines = [
        SECTION,
        "",
        f"`python benchmarks/transfer.py {shlex.join(args.argv)}`".replace(" `", "`")
        + ", one invocation. "
        f"Machine: {args.machine}; torch {torch.__version__.split('+')[0]}, "
        f"{torch.get_num_threads()} torch thread(s), CPU, Python {platform.python_version()}. "
        f"Total {total_s / 60:.1f} min.",
        "",
        f"- Source: `feedtune-shapes` run `{source_id}` "
        + (
            "(trained by this script: `feedtune train`, experiments/default.yaml, "
            + (
                "overrides `" + " ".join(args.source_overrides) + "`"
                if args.source_overrides
                else "no overrides"
            )
            + "), "
            if trained
            else "(the registered `best` of the store), "
        )
        + f"best_val_f1_macro {source_metrics.get('best_val_f1_macro', float('nan')):.3f} "
        f"on `shapes` after {source_metrics.get('epochs_run', float('nan')):.0f} epochs.",
        f"- Target: `shapes-shift` (6 new classes, ~600 images, grouped split 80/20). Both arms "
        "use `experiments/finetune-shapes-shift.yaml` with the same seed (hence the same "
        f"split), lr, augmentation and epochs; every epoch runs (`{' '.join(FAIR)}`); extra "
        f"overrides: {overrides}.",
        "- **finetune**: `run_finetune(--from best)`: source weights, new 6-class head, "
        "backbone frozen for `train.unfreeze_after` epochs, then trained at "
        "`lr * backbone_lr_scale`.",
        "- **scratch**: `run_train` of the same model (small_cnn) from random weights, "
        "nothing frozen, one learning rate.",
        "",
        "| seed | finetune f1 | scratch f1 | gain | finetune acc | scratch acc "
        "| finetune s | scratch s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in zip(args.seeds, rows, strict=True):
        f, s = r["finetune"], r["scratch"]
        lines.append(
            f"| {seed} | {f['f1']:.3f} | {s['f1']:.3f} | {f['f1'] - s['f1']:+.3f} "
            f"| {f['acc']:.3f} | {s['acc']:.3f} | {f['seconds']:.0f} | {s['seconds']:.0f} |"
        )
    lines += [
        f"| **mean ± sd** | **{mean_sd([r['f1'] for r in ft])}** | "
        f"**{mean_sd([r['f1'] for r in sc])}** | **{statistics.mean(gains):+.3f}** "
        f"| {mean_sd([r['acc'] for r in ft])} | {mean_sd([r['acc'] for r in sc])} "
        f"| {statistics.mean(r['seconds'] for r in ft):.0f} "
        f"| {statistics.mean(r['seconds'] for r in sc):.0f} |",
        "",
        f"Finetuning beat scratch on {wins} of {len(gains)} seeds "
        f"(mean gain {statistics.mean(gains):+.3f} macro-F1, smallest {min(gains):+.3f}).",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace our section if present (up to the next ``## ``), else append; one write."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--tracking-uri", default=None, help="default: a temporary SQLite store")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra override for both arms, e.g. train.epochs=8",
    )
    p.add_argument(
        "--source-set",
        dest="source_overrides",
        action="append",
        default=[],
        help="override for training the shapes source (only a quick check needs it)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--machine", default="2-core shared CPU VM")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    else:
        tmp = tempfile.TemporaryDirectory(prefix="feedtune-transfer-")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp.name) / 'mlflow.db'}"
    print(f"store: {os.environ['MLFLOW_TRACKING_URI']}")
    start = time.perf_counter()
    source_id, trained = source_run(args)
    source_metrics = metrics(source_id)
    print(
        f"source run {source_id}: best_val_f1_macro "
        f"{source_metrics.get('best_val_f1_macro', float('nan')):.3f}"
    )
    rows = []
    for seed in args.seeds:
        base = [f"seed={seed}", *FAIR, *args.overrides]
        ft_cfg = load_config(FINETUNE_CONFIG, base)
        sc_cfg = load_config(
            FINETUNE_CONFIG,
            [
                *base,
                "experiment=feedtune-shapes-shift-scratch",
                "model.freeze=none",
                "train.unfreeze_after=0",
            ],
        )
        print(f"seed {seed}:")
        rows.append(
            {
                "finetune": arm(
                    "finetune",
                    lambda c: run_finetune(
                        c,
                        source="best",
                        source_experiment=SOURCE_EXPERIMENT,
                        progress=args.progress,
                    ),
                    ft_cfg,
                ),
                "scratch": arm("scratch", lambda c: run_train(c, progress=args.progress), sc_cfg),
            }
        )
    section = report(args, source_id, trained, source_metrics, rows, time.perf_counter() - start)
    print()
    print(section)
    if not args.no_write:
        write_section(Path(args.output), section)
        print(f"written to {args.output}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
