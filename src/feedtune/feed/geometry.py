"""Crop geometry: how big an image is kept, resized and cropped, from ``augment.image_size``.

One rule shared by the transforms, the cache, reduced-size JPEG decoding and the served model,
so that every path sees an image at the same scale."""

from __future__ import annotations

# Eval crop covers 87.5% of the resized shorter side: torchvision's 224-of-256 convention.
CROP_FRACTION = 0.875
# Working resolution = this x the eval resize (S / 0.875): room for a random resized crop to
# zoom in ~1.25x before it has to upsample (FFCV stores ImageNet at ~1.4x its 224 crops).
WORKING_SCALE = 1.25


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop (eval) or random crop (``resize_first``): ~1.14 * S."""
    return round(image_size / CROP_FRACTION)


def working_size(image_size: int) -> int:
    """Shorter side of a ``resized`` cache entry and target of reduced-size JPEG decoding."""
    return max(image_size, round(image_size / CROP_FRACTION * WORKING_SCALE))
