"""``feedtune.load_best``: the best model of an experiment, ready to predict or to finetune.

    best = feedtune.load_best("feedtune-shapes")  # or load_best(data_path="my_images")
    labels, probs = best.predict(["a.jpg", "b.png"])  # as the served model answers them

The model is rebuilt from ``checkpoints/best.pt`` of the chosen run, read with
``weights_only=True``: a checkpoint is data (tensors, names, numbers), never code, so a
tampered file is refused instead of executed. The run is chosen by ``tracking.lookup``'s one
best-run rule, the same as ``feedtune best`` and ``feedtune finetune --from best``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass

from feedtune.config import Config, experiment_for
from feedtune.tracking import mlflow_store
from feedtune.tracking.lookup import fetch_checkpoint, find_best_run
from feedtune.training.checkpoint import model_from_checkpoint
from feedtune.training.inference import ImageClassifier


@dataclass(repr=False)
class BestModel(ImageClassifier):
    """A logged model ready for inference: the classifier of its run (``predict``,
    ``preprocess``: the path the served MLflow model ``runs:/<run_id>/model`` takes) and where
    it came from.

    Attributes:
        model: the network, in eval mode, on ``device``.
        eval_transform: the run's deterministic eval transform (resize, centre crop, normalize).
        classes: class names; output ``i`` of the model is ``classes[i]``.
        decoder: the run's ``data.decoder``.
        config: the run's full configuration.
        run_id: the MLflow run the checkpoint came from.
        metrics: the metrics stored in the checkpoint (its best epoch).
    """

    config: Config
    run_id: str
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"BestModel(run_id={self.run_id!r}, model={self.config.model.name!r}, "
            f"classes={len(self.classes)}, device={self.device})"
        )


def load_best(
    experiment: str | None = None,
    tracking_uri: str | None = None,
    *,
    data_path: str | None = None,
    device: str = "auto",
    allowed_factory: str | None = None,
) -> BestModel:
    """The best model of ``experiment``: the registered model ``experiment`` alias ``best``,
    else the finished run with the highest ``best_val_f1_macro``.

    Args:
        experiment: MLflow experiment name (also the registered model's name). Default: the
            name feedtune's commands give runs on ``data_path`` when their config names no
            experiment: ``feedtune-<folder name>`` for an ImageFolder or Hugging Face folder,
            ``feedtune-<file stem>`` for a CSV manifest (the folder's name for a
            ``manifest.csv``), ``feedtune-<module.path.callable>`` for a Dataset callable;
            without ``data_path``, the embedded dataset's ``feedtune-shapes``.
        data_path: the ``data.path`` the model was trained on, to name the experiment.
        tracking_uri: the store; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` at
            the project root, as for every feedtune command.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        allowed_factory: the ``module.path:callable`` you trust to rebuild the network when
            the run's model came from a factory; a factory not named here is never imported.

    Raises:
        LookupError: no such model or run, or the run has no checkpoint.
        CheckpointError: the checkpoint holds more than tensors and plain data (it could run
            code when unpickled) or cannot be read, or it names a factory other than
            ``allowed_factory``; nothing in it is executed.
    """
    experiment = experiment or experiment_for(data_path)
    with mlflow_store.use_store(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        run_id = find_best_run(experiment).info.run_id
        payload = fetch_checkpoint(run_id, tmp)
    model, cfg = model_from_checkpoint(payload, allowed_factory=allowed_factory)
    metrics = dict(payload.get("metrics") or {})
    return BestModel.for_network(
        model, cfg, payload["classes"], device=device, config=cfg, run_id=run_id, metrics=metrics
    )
