"""The command line's log: MLflow's and Optuna's lines below WARNING only when FEEDTUNE_LOG asks
for them; their warnings always. (A tune's own log: tests/commands/test_tune.py.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import optuna
import pytest

from feedtune import logs


@pytest.fixture(autouse=True)
def _levels_kept() -> Iterator[None]:
    before = {name: logging.getLogger(name).level for name in logs.LIBRARIES}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def test_libraries_log_warnings_only_by_default():
    optuna.logging.get_logger("optuna.study")  # Optuna sets up its logger (INFO) on first use
    environ: dict[str, str] = {}
    logs.quiet_libraries(environ)
    assert environ == {
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for name in ("mlflow.pyfunc", "mlflow.tracking._model_registry.fluent", "optuna.study.study"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    # Optuna's warnings still reach the log through its own handler ("[W ...]").
    assert logging.getLogger("optuna").handlers


def test_feedtune_log_info_lets_their_info_lines_in():
    environ = {"FEEDTUNE_LOG": "info"}
    logs.quiet_libraries(environ)
    assert environ["MLFLOW_LOGGING_LEVEL"] == "INFO"  # read by MLflow when it is imported
    for name in ("mlflow.pyfunc", "optuna.study.study"):
        assert logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name


def test_the_users_mlflow_settings_win():
    environ = {"MLFLOW_LOGGING_LEVEL": "debug", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"}
    logs.quiet_libraries(environ)
    assert environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
    assert logging.getLogger("mlflow.pyfunc").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("optuna.study.study").isEnabledFor(logging.INFO)
