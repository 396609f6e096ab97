"""Predicting with a trained network: images in, class names and probabilities out.

One path for every caller (``feedtune.load_best(...).predict`` and the served MLflow model), so
a file gets the same answer from Python as from ``mlflow models serve``, and the answer it got
during validation: each image is decoded by feedtune's own decoder (EXIF orientation, alpha on
white, 16-bit PNG, large JPEGs at reduced scale, as the feed decodes validation images), then
passed through the run's eval transform (``build_transform(train=False)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from feedtune.config import Config
from feedtune.feed.augment.per_sample import Transform, build_transform
from feedtune.feed.geometry import working_size
from feedtune.sources.imageio import decode_bytes, decode_image
from feedtune.training.devices import resolve_device

ENCODED = (bytes, bytearray, memoryview)


def _is_one_image(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, *ENCODED)) or hasattr(images, "convert"):
        return True
    return isinstance(images, np.ndarray) and images.ndim == 3


def as_image_list(images: Any) -> list[Any]:
    """``images`` as a list: one image (path, encoded bytes, PIL image, ``(H, W, 3)`` array)
    is a batch of one."""
    return [images] if _is_one_image(images) else list(images)


def image_array(image: Any, *, decoder: str, image_size: int, index: int = 0) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array of ``image``: a path or encoded bytes (JPEG, PNG,
    WebP, ...) decoded as the feed decodes validation images, a PIL image (any mode) converted
    to RGB, or an array passed through. ``index`` names the image in errors."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image(image, backend=decoder, min_size=working_size(image_size))
    if isinstance(image, ENCODED):
        return decode_bytes(
            image,
            name=f"#{index} ({len(image)} bytes)",
            backend=decoder,
            min_size=working_size(image_size),
        )
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image #{index}: expected an RGB (H, W, 3) uint8 array, got shape "
                f"{image.shape} dtype {image.dtype}"
            )
        return image
    if hasattr(image, "convert"):  # a PIL image
        return np.array(image.convert("RGB"))
    raise TypeError(
        f"image #{index}: expected a path, encoded image bytes, a PIL image or an (H, W, 3) "
        f"uint8 array, got {type(image).__name__}"
    )


@dataclass
class ImageClassifier:
    """A network in eval mode with what it needs to answer images.

    Attributes:
        model: the network, in eval mode, on ``device``.
        eval_transform: the run's deterministic eval transform (resize, centre crop, normalize).
        classes: class names; output ``i`` of the model is ``classes[i]``.
        decoder: the run's ``data.decoder`` (``pil`` or ``opencv``).
        device: where the network runs.
    """

    model: nn.Module
    eval_transform: Transform
    classes: list[str]
    decoder: str
    device: torch.device

    @classmethod
    def for_network(
        cls, model: nn.Module, cfg: Config, classes: Sequence[str], *, device: str, **more: Any
    ) -> Self:
        """``model`` in eval mode on ``device`` (``auto``: CUDA when available) with the eval
        transform and decoder of ``cfg``, the run's configuration; ``more``: the fields a
        subclass adds."""
        dev = resolve_device(device)
        return cls(
            model=model.to(dev).eval(),
            eval_transform=build_transform(cfg.augment, train=False),
            classes=[str(c) for c in classes],
            decoder=cfg.data.decoder,
            device=dev,
            **more,
        )

    def preprocess(self, images: Any, *, first_index: int = 0) -> torch.Tensor:
        """The model's input for ``images`` (``[n, 3, S, S]`` float, on the CPU), decoded and
        transformed exactly as validation images are; errors number images from
        ``first_index``."""
        items = as_image_list(images)
        size = self.eval_transform.image_size
        if not items:
            return torch.zeros((0, 3, size, size))
        arrays = [
            image_array(im, decoder=self.decoder, image_size=size, index=first_index + i)
            for i, im in enumerate(items)
        ]
        return torch.stack([self.eval_transform(a) for a in arrays])

    @torch.inference_mode()
    def predict(self, images: Any, *, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Labels and class probabilities ``[n, n_classes]`` (float32, rows sum to 1).

        ``images``: a sequence of (or one) image path, encoded image bytes (JPEG, PNG, WebP,
        ...), PIL image (any mode) or ``(H, W, 3)`` uint8 RGB array; each goes through
        ``preprocess``, as validation images do. The served model (``mlflow models serve -m
        models:/<experiment>@best``) answers through this same method."""
        items = as_image_list(images)
        probs = np.zeros((len(items), len(self.classes)), dtype=np.float32)
        for start in range(0, len(items), batch_size):
            batch = self.preprocess(items[start : start + batch_size], first_index=start)
            logits = self.model(batch.to(self.device))
            probs[start : start + len(batch)] = torch.softmax(logits.float(), 1).cpu().numpy()
        return label_of(probs, self.classes), probs


def label_of(probs: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [classes[i] for i in probs.argmax(1)]
