"""Every ``feedtune`` command's argument parser, one adder per command (``feedtune.cli`` runs
what they parse)."""

from __future__ import annotations

import argparse
from pathlib import Path

from feedtune.config import DEFAULT_CONFIG_PATH, DEFAULT_EXPERIMENT, DEFAULT_FINETUNE_CONFIG_PATH

# Workers can take the Optuna storage URL (which may hold a password) from the environment
# instead of the command line, where `ps`, shell history and `mlflow run` params would show it.
STORAGE_ENV = "FEEDTUNE_STORAGE"

FROM_HELP = (
    "the model to start from: 'best' (the model registered as --source-experiment with alias "
    "'best', else that experiment's best finished run by best_val_f1_macro), "
    "models:/NAME@ALIAS, models:/NAME/VERSION, or a RUN_ID (default: best)"
)


def _common(parser: argparse.ArgumentParser, *, default_config: Path = DEFAULT_CONFIG_PATH) -> None:
    # The project's experiments/<file>, else the copy installed with feedtune: always a file.
    where = f"YAML config (default: {default_config})"
    parser.add_argument("--config", default=str(default_config), help=where)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted, repeatable or ';'-separated "
        "(e.g. loader.num_workers=2)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feedtune",
        description="Find how to feed a PyTorch image classifier: augmentation, sampler and "
        "DataLoader settings, tuned with Optuna and tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # The order here is the order `feedtune --help` lists the commands in.
    for add in (
        _add_data,
        _add_train,
        _add_tune,
        _add_bench,
        _add_finetune,
        _add_inspect,
        _add_best,
    ):
        add(sub)
    return parser


def _add_data(sub: Subparsers) -> None:
    p = sub.add_parser("data", help="write the embedded dataset (data/<name>/) if missing")
    p.add_argument("--name", default="shapes", choices=["shapes", "shapes-shift"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--root", default=None, help="an empty or new folder to write to (default: data/<name>)"
    )
    p.add_argument("--no-progress", action="store_true")


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="one run of one configuration")
    _common(p)
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        default=None,
        help="continue a killed run from its last checkpoint, with that run's configuration",
    )


def _add_tune(sub: Subparsers) -> None:
    p = sub.add_parser("tune", help="Optuna study: speed stage, then quality stage")
    _common(p)
    p.add_argument("--stage", default="all", choices=["speed", "quality", "all"])
    p.add_argument(
        "--n-trials",
        type=float,
        default=None,
        help="trials per stage (default: search.n_trials_speed / n_trials_quality)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds for the whole job, running trials included (default: search.timeout_s)",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: an RDB URL (postgresql://...) or journal:PATH (default: "
        f"${STORAGE_ENV} if set, else the journal file optuna.journal here); keep passwords "
        f"out of it with PGPASSFILE or ${STORAGE_ENV}",
    )
    p.add_argument(
        "--study",
        default=None,
        help="study name; an existing study is resumed (default: the experiment name)",
    )


def _add_bench(sub: Subparsers) -> None:
    p = sub.add_parser(
        "bench",
        help="loader benchmark grid (num_workers x cache x decoder x where, by default)",
    )
    p.add_argument(
        "--model-rate",
        type=float,
        default=None,
        metavar="N",
        help="what-if: a stand-in model that eats N samples/s without using the CPU, as a GPU "
        "does (sets bench.model_rate)",
    )
    _common(p)


def _add_finetune(sub: Subparsers) -> None:
    p = sub.add_parser(
        "finetune", help="transfer learning from a logged checkpoint to a new dataset"
    )
    p.add_argument("--from", dest="source", default="best", metavar="SOURCE", help=FROM_HELP)
    p.add_argument(
        "--source-experiment",
        default=DEFAULT_EXPERIMENT,
        metavar="NAME",
        help=f"experiment (and registered model name) that --from best reads "
        f"(default: {DEFAULT_EXPERIMENT}); the new run goes to the config's own experiment",
    )
    _common(p, default_config=DEFAULT_FINETUNE_CONFIG_PATH)


def _add_inspect(sub: Subparsers) -> None:
    p = sub.add_parser(
        "inspect",
        help="look at the data before training: classes, groups, sizes, formats, duplicates, "
        "leaks across the split, bad files; logged as one MLflow run, with advice",
    )
    _common(p)


def _add_best(sub: Subparsers) -> None:
    p = sub.add_parser("best", help="print the best run of an experiment")
    p.add_argument("--experiment", default=None, help="default: the config's, or feedtune-<data>")
    p.add_argument(
        "--emit",
        choices=["text", "python"],
        default="text",
        help="python: print the best run's data feeding as a runnable PyTorch snippet",
    )
    _common(p)
