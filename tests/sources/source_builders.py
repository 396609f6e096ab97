"""The same labelled images written as each kind of data source: an ImageFolder tree, a
Hugging Face dataset saved to disk, a parquet folder, and a user module whose callable returns
a torch Dataset. Real files in a temporary folder; nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["red", "green", "blue"]
_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def make_images(n: int = 36, *, size=(40, 32), seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """``n`` RGB images and their class indices, classes interleaved in item order (so item
    order is not class order), each class a colour plus noise: learnable in an epoch."""
    rng = np.random.default_rng(seed)
    labels = [int(i % 3 != 0) + int(i % 3 == 2) for i in range(n)]  # 0,1,2,0,1,2,...
    images = []
    for label in labels:
        base = np.array(_COLOURS[label], dtype=np.int16)
        noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images, labels


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def pixel_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def write_folder(root: Path, images: list[np.ndarray], labels: list[int]) -> Path:
    """ImageFolder tree; item ``i`` is ``<class>/<i:06d>.png``, so that within a class the
    files sort in item order, as the other sources' item keys do."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return root


def hf_dataset(
    images: list[np.ndarray],
    labels: list[int],
    *,
    image_column: str = "image",
    groups: list[str] | None = None,
    broken: dict[int, bytes] | None = None,
):
    """A ``datasets.Dataset`` with an ``Image()`` column of PNG bytes and ``ClassLabel``
    labels; ``broken``: item index -> bytes stored instead of that item's PNG."""
    import datasets

    stored = [{"bytes": png_bytes(im), "path": None} for im in images]
    for i, data in (broken or {}).items():
        stored[i] = {"bytes": data, "path": None}
    columns = {image_column: stored, "label": labels}
    if groups is not None:
        columns["person"] = groups
    ds = datasets.Dataset.from_dict(columns)
    ds = ds.cast_column(image_column, datasets.Image())
    return ds.cast_column("label", datasets.ClassLabel(names=CLASSES))


def write_hf(root: Path, images: list[np.ndarray], labels: list[int], **kwargs) -> Path:
    hf_dataset(images, labels, **kwargs).save_to_disk(str(root))
    return root


USER_MODULE = '''
"""A user's own Dataset: items (image, label), images as arrays and PIL images."""
import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class Arrays(Dataset):
    classes = {classes!r}

    def __init__(self):
        found = np.load({npz!r})
        self.images, self.labels = found["images"], found["labels"]
        self.groups = [f"g{{i // 3}}" for i in range(len(self.labels))]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if i == {broken}:
            image = image[:, :, 0]  # a grey (H, W) array: a bad item
        elif i % 2:
            image = Image.fromarray(image)
        return image, int(self.labels[i])


def make():
    return Arrays()


class Bare(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return np.zeros((4, 4, 3), dtype=np.uint8), 0


def no_classes():
    return Bare()
'''


def write_user_module(
    folder: Path, name: str, images: list[np.ndarray], labels: list[int], *, broken: int = -1
) -> str:
    """``<name>.py`` in ``folder`` whose ``make()`` returns the images as a torch Dataset
    (arrays and PIL images alternating; item ``broken`` a grey 2-D array); returns the spec
    ``<name>:make``. The module is dropped from ``sys.modules`` so each test imports its own."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"{name}.npz"
    np.savez(npz, images=np.stack(images), labels=np.array(labels))
    text = USER_MODULE.format(classes=CLASSES, npz=str(npz), broken=broken)
    (folder / f"{name}.py").write_text(text)
    sys.modules.pop(name, None)
    return f"{name}:make"
