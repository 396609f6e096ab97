"""What a feedtune command's log carries: feedtune's own lines from level ``$FEEDTUNE_LOG`` up
(WARNING by default), and MLflow's and Optuna's at the same threshold, so their lines below
WARNING stay out unless ``FEEDTUNE_LOG=INFO`` (or DEBUG) asks for them. Per trial, those lines
repeat feedtune's own (``[I ...] Trial 3 finished``) or say nothing a user acts on
(``Validating input example against model signature``). MLflow's artifact download bars are
off too, unless ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` says otherwise; ``MLFLOW_LOGGING_LEVEL``,
when set, still sets MLflow's level.

For the command line's process only: the Python API leaves its caller's logging alone.
Warnings keep their own handlers (Optuna's ``[W ...]`` lines, MLflow's own format).

This module imports nothing from feedtune, nor MLflow or Optuna: it sets their loggers by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

ENV_VAR = "FEEDTUNE_LOG"
DEFAULT_LEVEL = "WARNING"
FORMAT = "%(levelname)s %(name)s: %(message)s"
# Read by MLflow when it is imported (its loggers' level) and at each download (its bars).
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"
MLFLOW_BARS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
LIBRARIES = ("mlflow", "optuna")


def log_level(environ: MutableMapping[str, str] | None = None) -> str:
    """The level ``$FEEDTUNE_LOG`` names (any case), WARNING when unset."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_VAR, "").strip().upper() or DEFAULT_LEVEL


def configure(environ: MutableMapping[str, str] | None = None) -> None:
    """The command line's logging, before anything else runs: feedtune's format and level,
    then ``quiet_libraries``."""
    environ = os.environ if environ is None else environ
    logging.basicConfig(level=log_level(environ), format=FORMAT)
    quiet_libraries(environ)


def quiet_libraries(environ: MutableMapping[str, str] | None = None) -> None:
    """MLflow's and Optuna's loggers at ``$FEEDTUNE_LOG``'s level, and MLflow's download bars
    off, unless the environment already says otherwise. Call it again once the command's
    modules are imported: importing Optuna sets its logger back to INFO (MLflow reads
    ``MLFLOW_LOGGING_LEVEL``, set here, when it is imported)."""
    environ = os.environ if environ is None else environ
    level = log_level(environ)
    environ.setdefault(MLFLOW_LEVEL_ENV, level)
    environ.setdefault(MLFLOW_BARS_ENV, "false")
    logging.getLogger("mlflow").setLevel(environ[MLFLOW_LEVEL_ENV].strip().upper() or level)
    logging.getLogger("optuna").setLevel(level)
