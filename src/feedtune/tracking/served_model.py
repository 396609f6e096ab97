"""The MLflow model ``model`` of a run, as ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` run it: images in, ``label`` and ``probabilities`` out.

Logged as code (MLflow's models-from-code): ``mlflow_models.log_model`` passes this file's path
and MLflow runs it when the model loads. It stays this short on purpose: the work is done by the
installed feedtune (``training.model_bundle``), so a served model answers as ``load_best`` does, and
the model's own files are data (weights, JSON), never pickles.

A request is a table with a column ``image``: encoded JPEG/PNG/WebP bytes (base64 over REST;
MLflow decodes binary columns), or, from Python, file paths or ``(H, W, 3)`` uint8 arrays.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from feedtune.training.model_bundle import (
    FACTORY_ENV,
    load_classifier,
    request_images,
    response_frame,
)


class FeedtuneImageModel(PythonModel):
    """A feedtune run's network with its decoder and eval transform."""

    def load_context(self, context: Any) -> None:
        self.classifier = load_classifier(
            context.artifacts["weights"],
            context.artifacts["spec"],
            allowed_factory=os.environ.get(FACTORY_ENV) or None,
        )

    # A DataFrame hint gives MLflow no signature to infer: the logged one (a binary ``image``
    # column) stays, and it is what makes the scoring server base64-decode the column.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Labels and probabilities of the request's images. A request feedtune cannot read (no
        ``image`` column, bytes that are no image, a wrong array) raises ``MlflowException``
        with the reason as its message: the scoring server answers 400 with that ``message``
        (any other exception would leave the reason only in the ``stack_trace``)."""
        try:
            labels, probs = self.classifier.predict(request_images(model_input))
        except (ValueError, TypeError) as exc:  # BadImageError is a ValueError
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        return response_frame(labels, probs)


mlflow.models.set_model(FeedtuneImageModel())
