"""``feedtune.load_best``: the best model of an experiment, ready to predict or to finetune.

    best = feedtune.load_best("feedtune-shapes")
    labels, probs = best.predict(["a.jpg", "b.png"])

The model is rebuilt from ``checkpoints/best.pt`` of the chosen run, read with
``weights_only=True``: a checkpoint is data (tensors, names, numbers), never code, so a
tampered file is refused instead of executed. The same helpers resolve the source of
``feedtune finetune --from``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from feedtune.config import Config, config_from_dict
from feedtune.data.augment import Transform, build_transform
from feedtune.data.cache import working_size
from feedtune.data.imageio import decode_image
from feedtune.tracking import mlflow_store as tracking
from feedtune.training.checkpoint import CheckpointError, load_checkpoint
from feedtune.training.engine import resolve_device
from feedtune.training.models import build_model

DEFAULT_EXPERIMENT = Config().experiment
BEST_ALIAS = "best"
CHECKPOINT = "checkpoints/best.pt"


def find_best_run_id(experiment: str, *, metric: str = "best_val_f1_macro") -> str:
    """The run behind the registered model ``experiment`` alias ``best``, else the finished
    training run with the highest ``metric``. Reads the current store; creates nothing."""
    run_id = tracking.alias_run_id(experiment, BEST_ALIAS)
    if run_id:
        return run_id
    run = tracking.best_checkpoint_run(experiment, metric=metric)
    if run is None:
        raise LookupError(
            f"no registered model '{experiment}' with alias '{BEST_ALIAS}' and no finished run "
            f"with {metric} in experiment '{experiment}' of store {tracking.current_store()}; "
            "run `feedtune train` or `feedtune tune` first"
        )
    return run.info.run_id


def resolve_run_id(source: str, *, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The run id that ``source`` names, in the current store.

    ``best``: alias ``best`` of the model registered as ``experiment``, else that experiment's
    best run; ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the run that logged that model
    version; ``runs:/RUN_ID[/...]`` or a bare ``RUN_ID``: that run.
    """
    source = source.strip()
    if source == "best":
        return find_best_run_id(experiment)
    if source.startswith("models:/"):
        ref = source[len("models:/") :].strip("/")
        if "@" in ref:
            name, alias = ref.rsplit("@", 1)
            run_id = tracking.alias_run_id(name, alias)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            run_id = tracking.model_version_run_id(name, version)
        else:
            raise LookupError(f"{source}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        if not run_id:
            raise LookupError(f"{source}: no such registered model version")
        return run_id
    run_id = source[len("runs:/") :].split("/", 1)[0] if source.startswith("runs:/") else source
    try:
        tracking.get_run(run_id)
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
        path = tracking.download_artifact(run_id, CHECKPOINT, folder)
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


def load_weights(model: nn.Module, payload: dict[str, Any]) -> nn.Module:
    """``payload["model_state"]`` into ``model``; a mismatch is a ``CheckpointError``."""
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"the checkpoint's weights do not fit a {type(model).__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model


def model_from_checkpoint(payload: dict[str, Any]) -> tuple[nn.Module, Config]:
    """The checkpoint's model (architecture from its config, weights from its state) and config.

    ``model.pretrained`` is ignored: the weights come from the checkpoint, so no torchvision
    weight file is needed."""
    cfg = config_from_dict(payload["config"])
    model_cfg = dataclasses.replace(cfg.model, **architecture(payload))
    model = build_model(model_cfg, num_classes=len(payload["classes"]))
    return load_weights(model, payload), cfg


# small_cnn had 4 blocks before `model.depth` existed; checkpoints of that time do not say so.
_DEPTH_BEFORE_THE_KEY = 4


def architecture(payload: dict[str, Any]) -> dict[str, Any]:
    """The model settings that shape the checkpoint's weights (``ModelConfig`` fields), so its
    state dict loads; ``pretrained`` is off because the weights come from the checkpoint."""
    saved = payload["config"].get("model", {})
    model = config_from_dict(payload["config"]).model
    depth = saved.get("depth", _DEPTH_BEFORE_THE_KEY)
    return {"name": model.name, "width": model.width, "depth": depth, "pretrained": False}


@dataclass
class BestModel:
    """A logged model ready for inference.

    Attributes:
        model: the network, in eval mode, on ``device``.
        eval_transform: the run's deterministic eval transform (resize, centre crop, normalize).
        classes: class names; output ``i`` of the model is ``classes[i]``.
        config: the run's full configuration.
        run_id: the MLflow run the checkpoint came from.
        metrics: the metrics stored in the checkpoint (its best epoch).
    """

    model: nn.Module
    eval_transform: Transform
    classes: list[str]
    config: Config
    run_id: str
    device: torch.device
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def _array(self, image: Any) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            # Decoded as train.build_pipeline decodes validation images (large JPEGs at reduced
            # scale), so a file gets the prediction it got during validation.
            return decode_image(
                image,
                backend=self.config.data.decoder,
                min_size=working_size(self.config.augment.image_size),
            )
        if isinstance(image, np.ndarray):
            return image
        if hasattr(image, "convert"):  # a PIL image, any mode
            return np.array(image.convert("RGB"))
        raise TypeError(
            f"predict: expected paths, PIL images or (H, W, 3) uint8 arrays, got "
            f"{type(image).__name__}"
        )

    @staticmethod
    def _as_list(images: Any) -> list[Any]:
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            return [images]
        if isinstance(images, np.ndarray) and images.ndim == 3:
            return [images]
        return list(images)

    def preprocess(self, images: Any) -> torch.Tensor:
        """The model's input for ``images`` (``[n, 3, S, S]`` float, on the CPU): decoded and
        passed through ``eval_transform`` exactly as validation images are. Also the input of
        the MLflow model ``runs:/<run_id>/model``."""
        items = self._as_list(images)
        size = self.config.augment.image_size
        if not items:
            return torch.zeros((0, 3, size, size))
        return torch.stack([self.eval_transform(self._array(im)) for im in items])

    @torch.inference_mode()
    def predict(self, images: Any, *, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Labels and class probabilities ``[n, n_classes]`` (rows sum to 1).

        ``images``: a sequence of (or one) image path, PIL image (any mode) or ``(H, W, 3)``
        uint8 RGB array; each goes through ``preprocess``, as validation images do."""
        items = self._as_list(images)
        probs = np.zeros((len(items), len(self.classes)), dtype=np.float32)
        for start in range(0, len(items), batch_size):
            batch = self.preprocess(items[start : start + batch_size])
            logits = self.model(batch.to(self.device))
            probs[start : start + len(batch)] = torch.softmax(logits.float(), 1).cpu().numpy()
        labels = [self.classes[i] for i in probs.argmax(1)]
        return labels, probs

    def __repr__(self) -> str:
        return (
            f"BestModel(run_id={self.run_id!r}, model={self.config.model.name!r}, "
            f"classes={len(self.classes)}, device={self.device})"
        )


def load_best(
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    *,
    device: str = "auto",
) -> BestModel:
    """The best model of ``experiment``: the registered model ``experiment`` alias ``best``,
    else the finished run with the highest ``best_val_f1_macro``.

    Args:
        experiment: MLflow experiment name (also the registered model's name).
        tracking_uri: the store; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` at
            the project root, as for every feedtune command.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        LookupError: no such model or run, or the run has no checkpoint.
        CheckpointError: the checkpoint holds more than tensors and plain data (it could run
            code when unpickled) or cannot be read; nothing in it is executed.
    """
    with tracking.use_store(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        run_id = find_best_run_id(experiment)
        payload = fetch_checkpoint(run_id, tmp)
    model, cfg = model_from_checkpoint(payload)
    dev = resolve_device(device)
    return BestModel(
        model=model.to(dev).eval(),
        eval_transform=build_transform(cfg.augment, train=False),
        classes=list(payload["classes"]),
        config=cfg,
        run_id=run_id,
        device=dev,
        metrics=dict(payload.get("metrics") or {}),
    )
