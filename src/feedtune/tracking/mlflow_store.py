"""The MLflow store and what feedtune writes to it: experiments, runs, params, metrics,
artifacts, heartbeats, dead runs closed. Finding runs is in ``mlflow_search``, models in
``mlflow_models``.

The fluent API's active-run stack is thread-local in MLflow, so each trial thread that opens
its own run logs to it; everything else below takes explicit run ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow.tracking import MlflowClient

from feedtune.config import PROJECT_ROOT, Config
from feedtune.tracking.liveness import GRACE_S, HEARTBEAT_S, is_alive, worker_info
from feedtune.tracking.mlflow_search import experiment_id, search_runs
from feedtune.tracking.urls import redact
from feedtune.training.stopping import StopTraining, signals_held

log = logging.getLogger(__name__)

KIND_TAG = "feedtune.kind"
WORKER_TAG = "feedtune.worker"
SYSTEM_METRICS_LOGGER = "mlflow.system_metrics"
HEARTBEAT_TAG = "feedtune.heartbeat"
# MLflow caps a param value at 6000 characters; ours are short, but never fail a run on it.
_PARAM_LIMIT = 6000
# MLflow's UI (3.17) opens an experiment on its GenAI pages unless the address says
# workflowType=machine_learning (the mlflow.experimentKind tag no longer decides it), and its
# runs table shows no metric until one is chosen. A shared view, the experiment tag
# mlflow.sharedViewState.<key> opened with ?viewStateShareKey=<key>, chooses the columns for
# every browser: each experiment feedtune uses carries this one.
UI_VIEW_KEY = "feedtune"
_UI_VIEW_TAG = f"mlflow.sharedViewState.{UI_VIEW_KEY}"
_UI_VIEW = json.dumps(
    {
        "selectedColumns": [
            "metrics.`val_f1_macro`",
            "metrics.`train_samples_per_s`",
            "tags.`feedtune.bottleneck`",
        ]
    }
)
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` answers by default


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlruns/`` beside the database, as MLflow does by
    default from the project root, but independent of the current directory."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(urlparse(uri).path)
    return (db.parent / "mlruns").resolve().as_uri()


# SQLite stores this process has opened (and so created, where they were new).
_OPENED: set[str] = set()


def _open_store(uri: str) -> None:
    """Make ``uri`` the tracking URI. MLflow creates a new SQLite store's schema on first use,
    and two processes doing that at once race inside its migrations (one dies): the first use
    in each process therefore happens under a file lock beside the database."""
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return
    db = Path(urlparse(uri).path)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        MlflowClient(uri).search_experiments(max_results=1)
    _OPENED.add(uri)


def setup(experiment: str, tracking_uri: str | None = None) -> str:
    """Point MLflow at the store and return the experiment id (created when missing)."""
    uri = tracking_uri or default_tracking_uri()
    _open_store(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        exp_id = found.experiment_id
        if found.tags.get(_UI_VIEW_TAG) != _UI_VIEW:
            _set_ui_view(client, exp_id)
    else:
        try:
            exp_id = client.create_experiment(
                experiment,
                artifact_location=_sqlite_artifact_root(uri),
                tags={_UI_VIEW_TAG: _UI_VIEW},
            )
        except mlflow.exceptions.MlflowException:
            # Another worker created it a moment ago (several tune processes start together).
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    _leave_foreign_project_run(experiment, exp_id)
    return exp_id


def _set_ui_view(client: MlflowClient, exp_id: str) -> None:
    """The runs table's columns in MLflow's UI; a store that refuses the tag (a read-only
    permission) only costs the view."""
    try:
        client.set_experiment_tag(exp_id, _UI_VIEW_TAG, _UI_VIEW)
    except mlflow.exceptions.MlflowException as exc:
        log.debug("experiment %s: no UI view tag (%s)", exp_id, exc)


def ui_address(experiment: str) -> str | None:
    """Where to look at ``experiment`` in MLflow's UI: its runs table with ``val_f1_macro``,
    ``train_samples_per_s`` and ``feedtune.bottleneck`` as columns, on the tracking server, or
    on ``mlflow ui`` at its default address (with the command that starts it) for a store
    without a server. None when the experiment does not exist or the store is not one of those."""
    exp_id = experiment_id(experiment)
    uri = mlflow.get_tracking_uri()
    scheme = urlparse(uri).scheme
    if exp_id is None or scheme.startswith("databricks"):
        return None
    page = f"/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    page += f"&viewStateShareKey={UI_VIEW_KEY}"
    if scheme in ("http", "https"):
        return redact(uri).rstrip("/") + page
    return f"{LOCAL_UI}{page} (with `mlflow ui --backend-store-uri {redact(uri)}` running)"


def _leave_foreign_project_run(experiment: str, exp_id: str) -> None:
    """``mlflow run`` opens a run and passes it in MLFLOW_RUN_ID, which every ``start_run``
    then resumes. Without ``--experiment-name`` that run is in "Default", and MLflow refuses to
    resume it under the config's experiment; feedtune's runs then go to the config's experiment
    (where ``best``, ``load_best`` and the registry look) and the project run says so."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id and MlflowClient().get_run(run_id).info.experiment_id != exp_id:
        set_tags_by_id(run_id, {"feedtune.experiment": experiment})
        del os.environ["MLFLOW_RUN_ID"]


@contextlib.contextmanager
def start_run(
    kind: str,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    system_metrics: bool = True,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or reopen, with ``run_id``) a run tagged ``feedtune.kind``.

    An exception ends the run FAILED; Ctrl-C and ``StopTraining`` (a pruned trial, the job's
    deadline; tag ``feedtune.stopped``) end it KILLED: no run is left RUNNING.
    """
    if system_metrics:
        # The monitor logs two INFO lines per run (started, stopped): noise in a log of many
        # trials. Its warnings still show.
        logging.getLogger(SYSTEM_METRICS_LOGGER).setLevel(logging.WARNING)
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        nested=nested,
        log_system_metrics=system_metrics,
    )
    try:
        worker = {f"{WORKER_TAG}.{k}": str(v) for k, v in worker_info().items()}
        mlflow.set_tags({KIND_TAG: kind, **worker, **(tags or {})})
        yield run
    except KeyboardInterrupt:
        _end_run("KILLED", {"feedtune.error": "interrupted (Ctrl-C or SIGTERM)"})
        raise
    except StopTraining as stop:
        # Stopped on purpose (pruned, or the job's deadline): KILLED, with the reason.
        _end_run("KILLED", {"feedtune.stopped": stop.reason, "feedtune.error": str(stop)[:500]})
        raise
    except BaseException as exc:
        # One line in the UI saying why, e.g. a DataLoader worker that died or timed out.
        first = str(exc).splitlines()[0] if str(exc) else ""
        _end_run("FAILED", {"feedtune.error": f"{type(exc).__name__}: {first}"[:500]})
        raise
    else:
        _end_run("FINISHED", {})


def _end_run(status: str, tags: dict[str, str]) -> None:
    """Tag and end the active run with Ctrl-C and SIGTERM held back until it is ended: one
    arriving in between (torchrun stops the other processes with SIGTERM as soon as one fails)
    would leave the run RUNNING. A signal held back is handled right after."""
    with signals_held():
        if tags:
            mlflow.set_tags(tags)
        mlflow.end_run(status)


def log_params(flat: dict[str, Any]) -> None:
    params = {k: ("null" if v is None else str(v))[:_PARAM_LIMIT] for k, v in flat.items()}
    mlflow.log_params(params)


def log_config(cfg: Config) -> None:
    """Flattened params plus ``config/resolved.yaml`` (re-runnable with ``--config``)."""
    log_params(cfg.flat())
    mlflow.log_text(cfg.to_yaml(), "config/resolved.yaml")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_file(path: str | Path, artifact_dir: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def log_dataframe(df: pd.DataFrame, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        df.to_csv(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent) or None)


def log_json(obj: Any, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def log_figure(fig: Any, artifact_file: str) -> None:
    from feedtune.tracking.plots import close  # matplotlib: only when there is a figure

    mlflow.log_figure(fig, artifact_file)
    close(fig)


def log_split(split: Any) -> None:
    """``split/train.csv``, ``split/val.csv``, ``split/summary.json`` and the two datasets as
    MLflow inputs ``train`` / ``val`` (with the split digest, so runs can be compared)."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in split.write(tmp):
            mlflow.log_artifact(str(path), artifact_path="split")
    source = split.summary["root"]
    for name, df in (("train", split.train), ("val", split.val)):
        rel = df.assign(path=[os.path.relpath(p, source) for p in df["path"]])
        with warnings.catch_warnings():
            # A local folder matches two equivalent MLflow source types; either is right.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                rel, source=source, targets="label", name=name, digest=f"{split.digest}-{name}"
            )
        _log_input(dataset, context=name)


def _log_input(dataset: Any, context: str, attempts: int = 4) -> None:
    """``mlflow.log_input``, again when it fails: workers that start together log the same
    split, and MLflow's store checks for the dataset row before inserting it, so one of two
    simultaneous inserts fails (UNIQUE constraint); on the next try the row is there."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())


def log_bad_images(bad: pd.DataFrame) -> None:
    log_metrics({"n_bad_images": len(bad)})
    log_dataframe(bad, "data/bad_images.csv")


def logged_steps(run_id: str, metric: str) -> set[int]:
    """Steps already logged for ``metric`` (a resumed run logs only the missing epochs)."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, metric)}


def download_artifact(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
        )
    )


def end_run_by_id(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status)


def set_tags_by_id(run_id: str, tags: dict[str, Any]) -> None:
    """Tags on a run that is not the active one (e.g. in another experiment)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


@contextlib.contextmanager
def use_store(tracking_uri: str | None = None) -> Iterator[str]:
    """Read from the store ``tracking_uri`` (default: ``default_tracking_uri()``) and restore the
    previous URI afterwards; creates nothing, so a lookup never makes an empty experiment."""
    previous = mlflow.get_tracking_uri()
    uri = tracking_uri or default_tracking_uri()
    _open_store(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def heartbeat(run_id: str, *, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Refresh ``run_id``'s tag ``feedtune.heartbeat`` (unix time) every ``every_s`` seconds
    while the block runs, from a daemon thread: a worker on another machine that dies leaves
    a heartbeat that stops moving, which ``close_dead_runs`` anywhere can see."""
    stop = threading.Event()
    client = MlflowClient()

    def beat_once() -> None:
        try:
            client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
        except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the worker
            log.warning("heartbeat of run %s not written: %s", run_id, exc)

    def beat() -> None:
        while not stop.wait(every_s):
            beat_once()

    beat_once()  # on record before the block starts

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5)


def _is_dead(run: Any, grace_s: float) -> bool:
    """A run's worker is dead: its process on this machine is gone, or its heartbeat (a run
    from any machine that keeps one) is older than ``grace_s``."""
    tags = run.data.tags
    info = {k[len(WORKER_TAG) + 1 :]: v for k, v in tags.items() if k.startswith(WORKER_TAG)}
    if "host" in info and not is_alive(info):
        return True
    beat = tags.get(HEARTBEAT_TAG)
    return beat is not None and time.time() - float(beat) > grace_s


def close_dead_runs(experiment: str, *, grace_s: float = GRACE_S) -> list[str]:
    """Mark KILLED the RUNNING runs whose worker died (killed with SIGKILL, machine lost power):
    file stores have no heartbeat of their own, so feedtune checks at start-up: the process
    on this machine, or the run's own heartbeat (clocks of the machines in sync, as Optuna's
    RDB heartbeats assume). Every page of the search is read, not only the first."""
    # Every page first: closing runs while paging would shift the pages.
    running = search_runs(
        experiment, filter_string="attributes.status = 'RUNNING'", max_results=None
    )
    client = MlflowClient()
    closed = []
    for run in running:
        if not _is_dead(run, grace_s):
            continue
        client.set_tag(run.info.run_id, "feedtune.error", "worker process died")
        end_run_by_id(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed
