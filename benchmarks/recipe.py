"""Train one configuration on the embedded dataset without tracking; print its learning curve.

    .venv/bin/python benchmarks/recipe.py --set augment.policy=none --set loader.batch_size=16

How the default recipe (BENCHMARKS.md, "Default recipe") was chosen: one line per
configuration with val macro-F1 per epoch, the best, the last train loss and the wall time.
Early stopping is off so every curve has all its epochs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from feedtune.config import load_config  # noqa: E402
from feedtune.feed.feed import build_feed  # noqa: E402
from feedtune.sources.prepare import prepare_data  # noqa: E402
from feedtune.training.devices import resolve_device  # noqa: E402
from feedtune.training.trainer import train_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "experiments" / "default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["train.patience=0", "train.measure_batches=0", *args.overrides])
    data = prepare_data(cfg, progress=False)
    start = time.perf_counter()  # the wall time includes building the feed (cache filling)
    feed = build_feed(cfg, data, resolve_device(cfg.train.device))
    with tempfile.TemporaryDirectory() as folder:
        out = train_model(cfg, feed, folder=Path(folder), progress=False)
    curve = ", ".join(f"{h['val_f1_macro']:.3f}" for h in out.state.history)
    print(
        f"{' '.join(args.overrides) or '(config as is)'} | val_f1_macro per epoch [{curve}] | "
        f"best {out.state.best_metric:.3f} | train_loss {out.state.history[-1]['train_loss']:.3f}"
        f" | {time.perf_counter() - start:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
