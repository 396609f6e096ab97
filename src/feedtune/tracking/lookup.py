"""Finding runs to reuse: the one best-run rule (``feedtune best``, ``feedtune.load_best`` and
``feedtune finetune --from best`` all use it), sources named on the command line, and a run's
checkpoint. Reads the current store and creates nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feedtune.config import DEFAULT_EXPERIMENT
from feedtune.tracking import mlflow_models, mlflow_search, mlflow_store
from feedtune.tracking.urls import redact
from feedtune.training.checkpoint import CheckpointError, load_checkpoint

BEST_ALIAS = "best"
CHECKPOINT = "checkpoints/best.pt"
RANKING_METRIC = "best_val_f1_macro"


def find_best_run(experiment: str, *, metric: str = RANKING_METRIC) -> Any:
    """The run behind the registered model ``experiment`` alias ``best``, else the finished run
    that trained (not a study parent, which repeats its best trial's metric but holds no
    checkpoint) with the highest ``metric``, the newest on a tie.

    Raises:
        LookupError: the experiment does not exist, or holds no such run.
    """
    run_id = mlflow_models.alias_run_id(experiment, BEST_ALIAS)
    if run_id:
        return mlflow_search.get_run(run_id)
    store = mlflow_search.current_store()
    if mlflow_search.experiment_id(experiment) is None:
        raise LookupError(
            f"no registered model '{experiment}' with alias '{BEST_ALIAS}' and no experiment "
            f"'{experiment}' in store {redact(store)}; run `feedtune train` or "
            "`feedtune tune` first, or name another experiment"
        )
    runs = mlflow_search.search_runs(
        experiment,
        filter_string=(
            f"metrics.{metric} > -1 and attributes.status = 'FINISHED' "
            "and tags.`feedtune.kind` != 'study'"
        ),
        order_by=[f"metrics.{metric} DESC", "attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise LookupError(
            f"no registered model '{experiment}' with alias '{BEST_ALIAS}' and no finished run "
            f"with {metric} in experiment '{experiment}' of store {redact(store)}; "
            "run `feedtune train` or `feedtune tune` first"
        )
    return runs[0]


def resolve_run_id(source: str, *, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The run id that ``source`` names, in the current store.

    ``best``: ``find_best_run(experiment)``; ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``:
    the run that logged that model version; ``runs:/RUN_ID[/...]`` or a bare ``RUN_ID``: that
    run.
    """
    source = source.strip()
    if source == "best":
        return find_best_run(experiment).info.run_id
    if source.startswith("models:/"):
        ref = source[len("models:/") :].strip("/")
        if "@" in ref:
            name, alias = ref.rsplit("@", 1)
            run_id = mlflow_models.alias_run_id(name, alias)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            run_id = mlflow_models.model_version_run_id(name, version)
        else:
            raise LookupError(f"{source}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        if not run_id:
            raise LookupError(f"{source}: no such registered model version")
        return run_id
    run_id = source[len("runs:/") :].split("/", 1)[0] if source.startswith("runs:/") else source
    try:
        mlflow_search.get_run(run_id)
    except Exception as exc:  # MlflowException: unknown run id (or not a run id at all)
        raise LookupError(
            f"--from {source!r}: not 'best', models:/NAME@ALIAS, models:/NAME/VERSION, "
            f"or the id of a run in this store ({str(exc).splitlines()[0]})"
        ) from None
    return run_id


def fetch_checkpoint(run_id: str, folder: str | Path) -> dict[str, Any]:
    """Download ``checkpoints/best.pt`` of ``run_id`` into ``folder`` and load it safely
    (``weights_only=True``). Raises ``CheckpointError`` for a file that would need to run code."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow_store.download_artifact(run_id, CHECKPOINT, folder)
    except Exception as exc:  # MlflowException / OSError: the artifact is not there
        raise LookupError(
            f"run {run_id} has no {CHECKPOINT} artifact (only runs that train have one: "
            f"train, quality trials, finetune): {str(exc).splitlines()[0]}"
        ) from None
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"run {run_id}: {exc}") from exc
    missing = {"classes", "config"} - set(payload)
    if missing:
        raise CheckpointError(
            f"run {run_id}: {CHECKPOINT} lacks {', '.join(sorted(missing))}; not a feedtune "
            "checkpoint"
        )
    return payload
