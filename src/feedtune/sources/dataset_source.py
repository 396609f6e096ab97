"""A user's own map-style torch ``Dataset`` as a data source: ``data.path: module.path:callable``.

The callable (importable from ``PYTHONPATH`` or the current directory) is called without
arguments and returns a Dataset whose items are ``(image, label)``: ``image`` a file path, a
PIL image or an ``(H, W, 3) uint8`` array, ``label`` an int index into the Dataset's required
``classes`` attribute. An optional ``groups`` attribute (one value per item) groups the split.

Listing gets every item once in the main process (its label, and whether its image is sound:
the bad-item scan of this source); training gets items in the DataLoader workers through the
user's ``__getitem__``. The Dataset is not sent to spawned workers: each calls the callable
again (forked ones inherit it).
"""

from __future__ import annotations

import hashlib
import operator
import os
import sys
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from feedtune.config.callables import CALLABLE_NAME, import_callable
from feedtune.progress import progress_bar
from feedtune.sources.image_checks import DEFAULT_MAX_PIXELS, check_image
from feedtune.sources.imageio import BadImageError, decode_image
from feedtune.sources.items import ItemReader, Source, declared_classes, item_ref, ref_index
from feedtune.sources.pixels import pil_to_rgb
from feedtune.sources.tables import DataSourceError

# ``package.module:callable`` (the callable may be an attribute path, ``mod:Class.build``).
# Settings that only act on image files: inert when no item is a file path.
FILE_ONLY = frozenset({"data.decoder", "data.max_file_mb"})


def is_dataset_spec(text: str) -> bool:
    """``text`` names a callable (``module.path:callable``), not an existing file or folder."""
    return bool(CALLABLE_NAME.fullmatch(text)) and not os.path.exists(text)


def make_dataset(spec: str) -> Any:
    """Import ``spec`` and call it; the result must be a sized, indexable Dataset."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # "the current directory", as `python -m` would have it
    try:
        make = import_callable(spec, key="data.path", where="in the current directory")
    except ValueError as exc:
        raise DataSourceError(str(exc)) from None
    dataset = make()
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataSourceError(
            f"data.path: {spec}() returned a {type(dataset).__name__}, not a map-style "
            "Dataset (__getitem__ and __len__)"
        )
    if not hasattr(dataset, "classes"):
        raise DataSourceError(
            f"data.path: {spec}() returned a {type(dataset).__name__} without a 'classes' "
            "attribute: give it the list of class names its int labels index"
        )
    return dataset


def to_rgb(image: Any, *, name: str, **decode: Any) -> np.ndarray:
    """An item's image as ``(H, W, 3) uint8`` RGB: a path is decoded (``decode`` holds
    ``decode_image``'s settings), a PIL image converted, an array checked."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image(image, **decode)
    limit = decode.get("max_pixels") or DEFAULT_MAX_PIXELS
    if isinstance(image, Image.Image):
        if image.width * image.height > limit:
            raise BadImageError(name, f"{image.width}x{image.height} pixels, over {limit}")
        return np.array(pil_to_rgb(image), dtype=np.uint8, order="C")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = f"shape {image.shape} and dtype {image.dtype}"
            raise BadImageError(name, f"an array of {shape}, not (H, W, 3) uint8")
        if image.shape[0] * image.shape[1] > limit:
            raise BadImageError(name, f"{image.shape[1]}x{image.shape[0]} pixels, over {limit}")
        return np.array(image, order="C")  # a writable copy: transforms may work in place
    raise BadImageError(
        name,
        f"a {type(image).__name__}, not a file path, a PIL image or an (H, W, 3) uint8 array",
    )


class DatasetItems(ItemReader):
    """Items of a user's Dataset, got through its ``__getitem__`` in the process that reads.
    ``bad`` (index -> reason) and ``shapes`` (index -> (H, W) of in-memory images) come from
    listing; ``inert`` is ``FILE_ONLY`` when no item is a file path."""

    kind = "dataset"

    def __init__(self, spec: str, dataset: Any = None) -> None:
        self.spec = spec
        self._dataset = dataset
        self.bad: dict[int, str] = {}
        self.shapes: dict[int, tuple[int, int]] = {}
        self.inert = frozenset()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}  # spawned workers call the callable again

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = make_dataset(self.spec)
        return self._dataset

    def _image(self, ref: str) -> Any:
        try:
            item = self.dataset[ref_index(ref)]
            image, _ = item
        except BadImageError:
            raise
        except Exception as exc:
            raise BadImageError(ref, f"could not be read ({type(exc).__name__}: {exc})") from None
        return image

    def _decode(
        self, ref: str, backend: str, min_size: int | None, limits: dict[str, int | None]
    ) -> np.ndarray:
        image = self._image(ref)
        return to_rgb(image, name=ref, backend=backend, min_size=min_size, **limits)

    def check(
        self, ref: str, *, max_pixels: int | None = None, max_bytes: int | None = None
    ) -> str | None:
        return self.bad.get(ref_index(ref))

    def header(self, ref: str) -> tuple[int, int, str, str]:
        image = self._image(ref)
        if isinstance(image, (str, os.PathLike)):
            return super().header(os.fspath(image))
        if isinstance(image, Image.Image):
            return image.width, image.height, image.format or "PIL", image.mode
        h, w = to_rgb(image, name=ref).shape[:2]
        return w, h, "array", "RGB"

    def decoded_hw(self, ref: str, min_size: int | None) -> tuple[int, int]:
        shape = self.shapes.get(ref_index(ref))
        if shape is not None:
            return shape
        image = self._image(ref)
        if isinstance(image, (str, os.PathLike)):
            return super().decoded_hw(os.fspath(image), min_size)
        return to_rgb(image, name=ref).shape[:2]

    def digest(self, ref: str) -> tuple[int, str]:
        try:
            image = self._image(ref)
            if isinstance(image, (str, os.PathLike)):
                return super().digest(os.fspath(image))
            pixels = to_rgb(image, name=ref)
        except BadImageError:
            return 0, ""
        return pixels.nbytes, hashlib.sha256(pixels.tobytes()).hexdigest()

    def describe(self) -> str:
        return f"dataset {self.spec}"


def load_dataset_source(spec: str, *, progress: bool = True) -> Source:
    """One row per listed item: ``path`` = ``<spec>#<index>``, ``label`` = its class name,
    [``group``]. An item whose ``__getitem__`` fails has no label: it is reported as bad."""
    dataset = make_dataset(spec)
    classes = [str(c) for c in dataset.classes]
    n = len(dataset)
    groups = getattr(dataset, "groups", None)
    if groups is not None and len(groups) != n:
        raise DataSourceError(
            f"data.path: {spec}() has {len(groups)} groups for {n} items; give one per item"
        )
    reader = DatasetItems(spec, dataset)
    rows, unlisted, files = [], [], 0
    for i in progress_bar(range(n), desc="listing items", unit="item", enabled=progress):
        ref = item_ref(spec, i, n)
        try:
            image, label = dataset[i]
        except Exception as exc:
            unlisted.append((ref, "", f"could not be read ({type(exc).__name__}: {exc})"))
            continue
        rows.append((ref, _class_of(label, classes, spec=spec, index=i)))
        if isinstance(image, (str, os.PathLike)):
            files += 1
            reason = check_image(image)
        else:
            try:
                reader.shapes[i] = tuple(to_rgb(image, name=ref).shape[:2])
                reason = None
            except BadImageError as exc:
                reason = exc.reason
        if reason is not None:
            reader.bad[i] = reason
    if not rows:
        raise DataSourceError(f"data.path: {spec}() has no readable items (of {n})")
    if files == 0:
        reader.inert = FILE_ONLY
    table = pd.DataFrame(rows, columns=["path", "label"])
    if groups is not None:
        table["group"] = [str(groups[ref_index(ref)]) for ref in table["path"]]
    table = table.sort_values(["label", "path"], kind="mergesort").reset_index(drop=True)
    return Source(
        table=table.astype(str),
        reader=reader,
        classes=declared_classes(classes, table["label"], where=f"data.path {spec}"),
        unlisted=pd.DataFrame(unlisted, columns=["path", "label", "reason"]),
    )


def _class_of(label: Any, classes: list[str], *, spec: str, index: int) -> str:
    try:
        value = operator.index(label.item() if hasattr(label, "item") else label)
    except TypeError:
        value = -1
    if not 0 <= value < len(classes):
        raise DataSourceError(
            f"data.path: item {index} of {spec}() has label {label!r}; expected an int index "
            f"into its classes (0..{len(classes) - 1})"
        )
    return classes[value]
