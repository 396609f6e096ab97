"""``feedtune.load_best``: the best model of an experiment, ready to predict or to finetune.

    best = feedtune.load_best("feedtune-shapes")
    labels, probs = best.predict(["a.jpg", "b.png"])

The model is rebuilt from ``checkpoints/best.pt`` of the chosen run, read with
``weights_only=True``: a checkpoint is data (tensors, names, numbers), never code, so a
tampered file is refused instead of executed. The run is chosen by ``tracking.lookup``'s one
best-run rule, the same as ``feedtune best`` and ``feedtune finetune --from best``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from feedtune.config import DEFAULT_EXPERIMENT, Config
from feedtune.feed.augment.per_sample import Transform, build_transform
from feedtune.feed.geometry import working_size
from feedtune.sources.imageio import decode_image
from feedtune.tracking import mlflow_store
from feedtune.tracking.lookup import fetch_checkpoint, find_best_run
from feedtune.training.checkpoint import model_from_checkpoint
from feedtune.training.devices import resolve_device


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
            # Decoded as the feed decodes validation images (large JPEGs at reduced scale), so
            # a file gets the prediction it got during validation.
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
    allowed_factory: str | None = None,
) -> BestModel:
    """The best model of ``experiment``: the registered model ``experiment`` alias ``best``,
    else the finished run with the highest ``best_val_f1_macro``.

    Args:
        experiment: MLflow experiment name (also the registered model's name).
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
    with mlflow_store.use_store(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        run_id = find_best_run(experiment).info.run_id
        payload = fetch_checkpoint(run_id, tmp)
    model, cfg = model_from_checkpoint(payload, allowed_factory=allowed_factory)
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
