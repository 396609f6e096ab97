"""What the served model is made of, and its request and response tables.

A run's model is served from two files, both data:

- ``weights.pt``: the network's ``state_dict``, read back with ``torch.load(weights_only=True)``
  (tensors only; a file that needs more is refused, never unpickled);
- ``feedtune_model.json``: what rebuilds the network (``model_args`` as the checkpoint records
  them), the class names, and the run's eval transform and decoder settings.

The network is rebuilt by ``models.build_model`` from ``model_args``, as ``load_best`` and
``finetune`` rebuild it from a checkpoint, and images go through ``inference.ImageClassifier``,
the path ``load_best(...).predict`` takes: a file gets the same answer from both.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from feedtune.config import config_from_dict
from feedtune.feed.geometry import working_size
from feedtune.sources.imageio import BadImageError
from feedtune.sources.items import FILES, ItemReader
from feedtune.training.checkpoint import (
    CheckpointError,
    load_tensors,
    load_weights,
    model_args_of,
    require_trusted_factory,
)
from feedtune.training.inference import ImageClassifier
from feedtune.training.models import ARCHITECTURE_KEYS, build_model

SPEC_FILE = "feedtune_model.json"
WEIGHTS_FILE = "weights.pt"
SPEC_FORMAT = 1
# The request column: encoded image bytes (base64 over REST), file paths or (H, W, 3) arrays.
IMAGE_COLUMN = "image"
# The response columns: the class name, and the probabilities in the order of ``classes``.
LABEL_COLUMN = "label"
PROBS_COLUMN = "probabilities"
# Names the one ``module.path:callable`` factory that a served model may import; whoever
# starts the server (or loads the model) sets it, never the model's own files.
FACTORY_ENV = "FEEDTUNE_ALLOWED_FACTORY"
# The settings the eval transform reads (``build_stages(train=False)``): resize to
# ``image_size / 0.875``, centre crop ``image_size``, normalize with ``mean`` and ``std``.
EVAL_TRANSFORM_KEYS = ("library", "image_size", "mean", "std")


def serving_spec(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a served model, from a checkpoint ``payload`` (``checkpoints/best.pt``)."""
    cfg = config_from_dict(payload["config"])
    return {
        "format_version": SPEC_FORMAT,
        "model_args": dict(payload.get("model_args") or model_args_of(payload)),
        "classes": list(payload["classes"]),
        "eval_transform": {key: getattr(cfg.augment, key) for key in EVAL_TRANSFORM_KEYS},
        "decoder": cfg.data.decoder,
    }


def write_bundle(payload: dict[str, Any], folder: Path) -> dict[str, str]:
    """``weights.pt`` and ``feedtune_model.json`` of ``payload`` in ``folder``; returns them
    by artifact name (``weights``, ``spec``), as ``mlflow.pyfunc.log_model`` takes them."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in payload["model_state"].items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(json.dumps(serving_spec(payload), indent=2))
    return {"weights": str(folder / WEIGHTS_FILE), "spec": str(folder / SPEC_FILE)}


def read_spec(path: str | Path) -> dict[str, Any]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the served model's {path}: {exc}") from exc
    if not isinstance(spec, dict) or spec.get("format_version") != SPEC_FORMAT:
        got = spec.get("format_version") if isinstance(spec, dict) else spec
        raise CheckpointError(
            f"{path}: format_version {got!r} is not {SPEC_FORMAT}, the one this feedtune reads"
        )
    return spec


def load_classifier(
    weights: str | Path,
    spec_path: str | Path,
    *,
    allowed_factory: str | None = None,
    device: str = "auto",
) -> ImageClassifier:
    """The served model's ``ImageClassifier`` from its two files.

    A network built by a ``module.path:callable`` factory is rebuilt only when
    ``allowed_factory`` names that factory (the rule of ``checkpoint.require_trusted_factory``).
    """
    spec = read_spec(spec_path)
    saved = spec["model_args"]
    args = {key: saved[key] for key in ARCHITECTURE_KEYS if key in saved}
    require_trusted_factory(
        args["name"],
        allowed_factory,
        where=f"the served model ({spec_path})",
        how=f"set {FACTORY_ENV}={args['name']} where the model is served or loaded",
    )
    cfg = config_from_dict(
        {
            "model": {**args, "pretrained": False},
            "augment": spec["eval_transform"],
            "data": {"decoder": spec["decoder"]},
        }
    )
    model = build_model(cfg.model, num_classes=len(spec["classes"]))
    state = load_tensors(weights, what="the served model's weights")
    load_weights(model, {"model_state": state})
    return ImageClassifier.for_network(model, cfg, spec["classes"], device=device)


def request_images(model_input: Any) -> list[Any]:
    """The images of a request: the ``image`` column of a DataFrame (or of a dict of
    columns), else a list of images."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"expected a column '{IMAGE_COLUMN}' (encoded image bytes, base64 over REST), "
                f"got columns {list(model_input.columns)}"
            )
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, (list, tuple, pd.Series)):
        return list(model_input)
    raise TypeError(
        f"expected a DataFrame with a column '{IMAGE_COLUMN}', got {type(model_input).__name__}"
    )


def response_frame(labels: list[str], probs: np.ndarray) -> pd.DataFrame:
    """``label`` and ``probabilities`` (a list per row, in the order of the classes)."""
    return pd.DataFrame(
        {LABEL_COLUMN: labels, PROBS_COLUMN: [[float(p) for p in row] for row in probs]}
    )


def example_image(
    paths: Sequence[str | Path],
    *,
    image_size: int,
    decoder: str = "pil",
    reader: ItemReader = FILES,
) -> bytes:
    """A small real JPEG for the model's input example: the first of ``paths`` (items of
    ``reader``'s source) that decodes, decoded as feedtune decodes it and shrunk to the working
    size (kilobytes)."""
    side = 2 * working_size(image_size)
    for path in paths:
        try:
            rgb = reader.decode(str(path), backend=decoder, min_size=working_size(image_size))
        except BadImageError:
            continue  # a bad image the run skipped
        im = Image.fromarray(rgb)
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue()
    raise ValueError(f"no decodable image among {len(paths)} for the model's input example")
