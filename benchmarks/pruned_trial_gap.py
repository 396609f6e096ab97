"""What a pruned trial leaves behind, run by hand (BENCHMARKS.md, "The search on a budget").

    .venv/bin/python benchmarks/pruned_trial_gap.py [--set KEY=VALUE ...]

One Optuna trial trains the default recipe with 2 persistent loader workers for 5 steps and
is pruned at the end of its epoch, as successive halving prunes; then the garbage collection
Optuna runs after every trial is timed. Before ``Feed.close`` (then ``Pipeline.close``) it took
~20 s (each worker waited out a 5 s join timeout); it should take well under a second.

The callback stops training with ``StopTraining("pruned")`` and the objective turns that into
``optuna.TrialPruned`` at the trial's edge, as ``tuning.stages`` does.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from feedtune.config import load_config  # noqa: E402
from feedtune.feed.feed import build_feed  # noqa: E402
from feedtune.sources.prepare import prepare_data  # noqa: E402
from feedtune.training.devices import resolve_device  # noqa: E402
from feedtune.training.engine import Callback, StopTraining  # noqa: E402
from feedtune.training.trainer import train_model  # noqa: E402

SETTINGS = [
    "loader.num_workers=2",
    "loader.persistent_workers=true",
    "loader.cache=decoded",
    "augment.where=batch",
    "train.epochs=1",
    "train.max_steps_per_epoch=5",
    "train.measure_batches=0",
]


class PruneAtEpochEnd(Callback):
    def on_epoch_end(self, epoch, metrics, **_):
        raise StopTraining("pruned", f"pruned after epoch {epoch + 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="another setting")
    args = parser.parse_args()
    cfg = load_config(REPO / "experiments" / "default.yaml", [*SETTINGS, *args.set])
    data = prepare_data(cfg, progress=False)
    device = resolve_device(cfg.train.device)

    def objective(trial: optuna.Trial) -> float:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                feed = build_feed(cfg, data, device)
                train_model(
                    cfg, feed, folder=Path(tmp), progress=False, callbacks=[PruneAtEpochEnd()]
                )
        except StopTraining as stop:
            raise optuna.TrialPruned(str(stop)) from stop
        return 0.0

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    start = time.perf_counter()
    study.optimize(objective, n_trials=1, gc_after_trial=False)
    trained = time.perf_counter()
    gc.collect()
    collected = time.perf_counter() - trained
    print(f"trial {trained - start:.2f} s, garbage collection after it {collected:.2f} s")


if __name__ == "__main__":
    main()
