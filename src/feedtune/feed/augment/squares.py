"""Working squares: every image squashed to one ``n x n`` uint8 square, with its aspect ratio.

Images of any shape then collate into one uint8 batch, and the batch augmentation
(``feed.augment.batch``) undoes the squash when it places crops, from the recorded aspect.
The squash is done per sample by :class:`ToWorkingUint8`, or once per image when the cache
stores squares (``feed.cache``, ``square=n``): the loader then only slices shared memory.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["SquashedImage", "ToWorkingUint8", "squash"]


class SquashedImage(NamedTuple):
    """An image already squashed: ``pixels`` uint8 ``[3, n, n]``, ``aspect`` its original
    width / height."""

    pixels: Tensor
    aspect: float


def squash(image: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """``(H, W, 3)`` uint8 RGB -> (``(n, n, 3)`` uint8, W / H).

    Shrinking uses ``INTER_AREA`` (antialiased), growing ``INTER_LINEAR``; an axis that shrinks
    while the other grows is shrunk first on its own, so each axis gets the right filter.
    """
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an RGB (H, W, 3) uint8 array, got {got}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    image = np.ascontiguousarray(image)
    if h > n > w:
        image = cv2.resize(image, (w, n), interpolation=cv2.INTER_AREA)
    elif w > n > h:
        image = cv2.resize(image, (n, h), interpolation=cv2.INTER_AREA)
    shrink = image.shape[0] >= n and image.shape[1] >= n
    mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (n, n), interpolation=mode), w / h


class ToWorkingUint8:
    """Loader-side transform: an image -> ``(uint8 [3, n, n] tensor, W / H)``.

    Takes a decoded ``(H, W, 3)`` array (squashed here) or a :class:`SquashedImage` from a
    cache of squares (passed through: the collate copies it into the batch).
    """

    def __init__(self, working: int):
        if working < 1:
            raise ValueError(f"working size must be >= 1, got {working}")
        self.working = int(working)

    def __call__(self, image: np.ndarray | SquashedImage) -> tuple[Tensor, float]:
        if isinstance(image, SquashedImage):
            if image.pixels.shape != (3, self.working, self.working):
                raise ValueError(
                    f"cached square is {tuple(image.pixels.shape)}, "
                    f"expected (3, {self.working}, {self.working})"
                )
            return image.pixels, image.aspect
        out, aspect = squash(image, self.working)
        return torch.from_numpy(out).permute(2, 0, 1), aspect

    def __repr__(self) -> str:
        return f"ToWorkingUint8(working={self.working})"
