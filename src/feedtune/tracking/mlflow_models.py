"""The MLflow calls about models: logging a run's model and the model registry (the ``best``
alias, versions). The rest of feedtune's MLflow calls live in ``mlflow_store``
and ``mlflow_search``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from feedtune.training import model_bundle
from feedtune.training.external_models import TIMM_PREFIX, is_factory


def log_model(payload: dict[str, Any], example_image: bytes) -> None:
    """The model of checkpoint ``payload`` as MLflow model ``model``: a pyfunc that answers
    encoded images with ``label`` and ``probabilities`` (``served_model``), logged as code.

    Its files are data: the weights as a ``state_dict`` (read with ``weights_only=True``) and
    a JSON of what rebuilds the network and preprocesses images (``training.model_bundle``); the
    code is this package's, so a ``module.path:callable`` network is rebuilt only where
    ``FEEDTUNE_ALLOWED_FACTORY`` names it. ``example_image`` (a small real JPEG) is the input
    example; MLflow checks at logging time that the model answers it."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    spec = model_bundle.serving_spec(payload)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, model_bundle.IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, model_bundle.LABEL_COLUMN),
                ColSpec(Array(DataType.double), model_bundle.PROBS_COLUMN),
            ]
        ),
    )
    name = spec["model_args"]["name"]
    with tempfile.TemporaryDirectory() as tmp, _factory_trusted(name):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("served_model.py")),
            artifacts=model_bundle.write_bundle(payload, Path(tmp)),
            signature=signature,
            input_example=pd.DataFrame({model_bundle.IMAGE_COLUMN: [example_image]}),
            # Given, so MLflow need not load the model in a subprocess to infer them.
            pip_requirements=_model_requirements(name),
            metadata={"classes": spec["classes"]},
        )


@contextlib.contextmanager
def _factory_trusted(name: str) -> Iterator[None]:
    """While the model is logged, MLflow loads it to check its input example: the factory the
    run was built by is trusted here (this run's own config named it), not where it is served."""
    if not is_factory(name):
        yield
        return
    before = os.environ.get(model_bundle.FACTORY_ENV)
    os.environ[model_bundle.FACTORY_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(model_bundle.FACTORY_ENV, None)
        else:
            os.environ[model_bundle.FACTORY_ENV] = before


def _model_requirements(model_name: str) -> list[str]:
    """What the served model imports, at the versions installed here. feedtune itself is not
    on PyPI: serve with ``--env-manager local`` from an environment where it is installed."""
    from importlib.metadata import PackageNotFoundError, version

    dists = ["torch", "torchvision", "numpy", "pandas", "pillow", "albumentations", "pyyaml"]
    dists += ["opencv-python-headless"]
    if model_name.startswith(TIMM_PREFIX):
        dists.append("timm")
    reqs = []
    for dist in dists:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def register_if_better(
    run_id: str, name: str, *, metric: str, alias: str = "best"
) -> tuple[bool, str | None]:
    """Register the run's model ``model`` as ``name`` and point ``alias`` at it, unless the run
    the alias already points at scored at least as well. Returns (moved, version)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    new_value = run.data.metrics.get(metric, float("-inf"))
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
    version = mlflow.register_model(_model_uri(client, run), name)
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, metric, str(new_value))
    return True, version.version


def _model_uri(client: MlflowClient, run: Run) -> str:
    """``models:/<model_id>`` of the model ``model`` that ``run`` logged (MLflow 3 keeps it
    outside the run's artifacts; registering ``runs:/<run_id>/model`` finds it too, with a
    warning in the log), the latest when it logged several; else ``runs:/<run_id>/model``."""
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        model = client.get_logged_model(output.model_id)
        if model.name == "model":
            return model.model_uri
    return f"runs:/{run.info.run_id}/model"


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
