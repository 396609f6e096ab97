"""The MLflow calls about models: logging a run's model and the model registry (the ``best``
alias, versions). The rest of feedtune's MLflow calls live in ``mlflow_store``."""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient


def log_model(model: Any, input_example: np.ndarray) -> None:
    """The model as MLflow model ``model``, with a signature inferred from a real batch."""
    import torch
    from mlflow.models import infer_signature

    model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    signature = infer_signature(input_example, output)
    # torch.export's format (pt2), not a pickle: the graph and weights are data, so loading
    # ``models:/NAME@best`` from a shared server runs no code from the artifact (with
    # MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false MLflow checks that the archive holds no pickle).
    # It is exported in eval mode, for inference; to finetune, feedtune rebuilds the network
    # from the weights-only checkpoint. The requirements are given so MLflow need not re-load
    # the model in a subprocess to infer them.
    with warnings.catch_warnings():
        # torch.export's archive writer warns at every save of a model whose weights share
        # storage ("No complete tensor found in the group!"); the weights are on the CPU, the
        # case it says is safe.
        warnings.filterwarnings("ignore", message="No complete tensor found", category=UserWarning)
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=input_example,
            serialization_format="pt2",
            pip_requirements=_model_requirements(),
        )


def _model_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def register_if_better(
    run_id: str, name: str, *, metric: str, alias: str = "best"
) -> tuple[bool, str | None]:
    """Register ``runs:/<run_id>/model`` as ``name`` and point ``alias`` at it, unless the run
    the alias already points at scored at least as well. Returns (moved, version)."""
    client = MlflowClient()
    new_value = client.get_run(run_id).data.metrics.get(metric, float("-inf"))
    try:
        current = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None:
        if current.run_id == run_id:
            return False, current.version
        old = client.get_run(current.run_id).data.metrics.get(metric, float("-inf"))
        if old >= new_value:
            return False, current.version
    version = mlflow.register_model(f"runs:/{run_id}/model", name)
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, metric, str(new_value))
    return True, version.version


def alias_run_id(name: str, alias: str = "best") -> str | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias).run_id
    except mlflow.exceptions.MlflowException:
        return None


def model_version_run_id(name: str, version: str) -> str | None:
    """Run behind version ``version`` of the registered model ``name``, or None."""
    try:
        return MlflowClient().get_model_version(name, str(version)).run_id
    except mlflow.exceptions.MlflowException:
        return None
