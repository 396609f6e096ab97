"""Augmentation policies, written once and built with either library.

A policy is a list of operation *kinds* (colour jitter, affine, blur, ...). Each library has an
``*Ops`` class with one method per kind that returns that library's transform, so both libraries
get the same kinds with the same strengths by construction; only the implementation differs.
Every strength is ``maximum * magnitude`` with the maxima below: magnitude 0 is (close to) the
identity, 1 the strongest setting.

Pipeline layout (``S`` = ``image_size``, ``R`` = :func:`resize_size`):

- eval and policy ``none``: resize the shorter side to ``R``, centre-crop ``S`` (torchvision's
  reference 224/256 recipe: no aspect distortion, same framing as the train crops).
- train, ``resize_first``: resize shorter side to ``R``, random resized crop ``S``, flip, policy ops
  (the ops run on the small ``S x S`` image: cheap).
- train, ``augment_first``: flip, policy ops on the full-size image, random resized crop ``S``
  last (slower; pixel-size parameters such as blur sigma act at full resolution, so they are
  weaker after the final downscale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from feedtune.feed.augment.albumentations_lazy import A, ToTensorV2
from feedtune.feed.geometry import resize_size

# Random resized crop: scale lower bound goes from 0.9 (m=0) to 0.35 (m=1); usual aspect range.
CROP_SCALE_AT_0, CROP_SCALE_AT_1 = 0.9, 0.35
CROP_RATIO = (3 / 4, 4 / 3)
# Colour jitter maxima (SimCLR-like; hue is a fraction of the colour wheel).
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
# Affine maxima: degrees, fraction of the side, relative zoom, x-shear degrees.
ROTATE, TRANSLATE, ZOOM, SHEAR = 45.0, 0.2, 0.25, 15.0
# heavy: blur sigma range at m=1 and its probability; grayscale and erasing probabilities.
BLUR_SIGMA_MIN, BLUR_SIGMA_MAX, BLUR_P = 0.1, 2.0, 0.5
GRAY_P, ERASE_P = 0.2, 0.5
ERASE_AREA = (0.02, 0.22)  # fraction of the image area erased, at m=1
# RandAugment / TrivialAugmentWide: torchvision's 31 magnitude bins, 2 ops for RandAugment.
AUTOAUG_BINS, RANDAUG_OPS = 31, 2
# The tops of torchvision's op spaces, mirrored in the albumentations versions.
RANDAUG_MAX = {"shear": 0.3, "translate": 150 / 331, "rotate": 30.0, "enhance": 0.9, "bits": 4}
TRIVIAL_MAX = {"shear": 0.99, "translate_px": 32, "rotate": 135.0, "enhance": 0.99, "bits": 6}

POLICIES = ("none", "basic", "color", "geometric", "randaugment", "trivialaugment", "heavy")


def crop_scale(magnitude: float) -> tuple[float, float]:
    """Area range of the random resized crop: a smaller lower bound is a stronger zoom."""
    return (CROP_SCALE_AT_0 + (CROP_SCALE_AT_1 - CROP_SCALE_AT_0) * magnitude, 1.0)


def _blur_sigma(magnitude: float) -> tuple[float, float]:
    return (BLUR_SIGMA_MIN, BLUR_SIGMA_MIN + (BLUR_SIGMA_MAX - BLUR_SIGMA_MIN) * magnitude)


def _blur_kernel(magnitude: float) -> int:
    # Odd kernel covering +-3 sigma of the largest sigma, as both libraries need one fixed size.
    return 2 * math.ceil(3 * _blur_sigma(magnitude)[1]) + 1


def _erase_area(magnitude: float) -> tuple[float, float]:
    lo, hi = ERASE_AREA
    return (lo, lo + (hi - lo) * magnitude)


def _shear_degrees(factor: float) -> float:
    # torchvision's auto-augment shear is a factor; albumentations wants degrees.
    return math.degrees(math.atan(factor))


class NumpyToImage:
    """RGB ``(H, W, 3)`` uint8 array -> ``(3, H, W)`` uint8 tensor (a view when possible).

    Copies only arrays torch cannot share (negative strides, read-only cache memory).
    """

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not (image.flags.c_contiguous and image.flags.writeable):
            image = np.array(image, order="C", copy=True)
        return torch.from_numpy(image).permute(2, 0, 1)

    def __repr__(self) -> str:
        return "NumpyToImage()"


class TrivialAugmentWideUpTo(v2.TrivialAugmentWide):
    """TrivialAugmentWide whose magnitude bin is drawn from ``0..max_bin`` instead of all bins.

    torchvision's version has no strength knob; capping the bin scales every op's strength
    (bin 0 is the identity for all ops but AutoContrast and Equalize).
    """

    def __init__(self, max_bin: int, num_magnitude_bins: int = AUTOAUG_BINS, **kwargs: Any):
        super().__init__(num_magnitude_bins=num_magnitude_bins, **kwargs)
        self.max_bin = max(0, min(int(max_bin), num_magnitude_bins - 1))

    def forward(self, *inputs: Any) -> Any:
        flat_inputs_with_spec, image = self._flatten_and_extract_image_or_video(inputs)
        height, width = v2.functional.get_size(image)
        op, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
        magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
        magnitude = 0.0
        if magnitudes is not None:
            magnitude = float(magnitudes[int(torch.randint(self.max_bin + 1, ()))])
            if signed and torch.rand(()) <= 0.5:
                magnitude *= -1
        image = self._apply_image_or_video_transform(
            image, op, magnitude, interpolation=self.interpolation, fill=self._fill
        )
        return self._unflatten_and_insert_image_or_video(flat_inputs_with_spec, image)


class TorchvisionOps:
    """torchvision v2 transforms on ``(3, H, W)`` uint8 tensors, one method per op kind."""

    bilinear = InterpolationMode.BILINEAR

    def to_image(self) -> list[Any]:
        return [NumpyToImage()]

    def resize(self, size: int) -> Any:
        return v2.Resize(size, interpolation=self.bilinear, antialias=True)

    def center_crop(self, size: int) -> Any:
        return v2.CenterCrop(size)

    def random_resized_crop(self, size: int, magnitude: float) -> Any:
        return v2.RandomResizedCrop(
            size, scale=crop_scale(magnitude), ratio=CROP_RATIO, antialias=True
        )

    def hflip(self) -> Any:
        return v2.RandomHorizontalFlip(p=0.5)

    def color_jitter(self, m: float) -> Any:
        return v2.ColorJitter(**{k: v * m for k, v in JITTER.items()})

    def affine(self, m: float) -> Any:
        return v2.RandomAffine(
            degrees=ROTATE * m,
            translate=(TRANSLATE * m, TRANSLATE * m),
            scale=(1 - ZOOM * m, 1 + ZOOM * m),
            shear=SHEAR * m,
            interpolation=self.bilinear,
        )

    def blur(self, m: float) -> Any:
        blur = v2.GaussianBlur(_blur_kernel(m), sigma=_blur_sigma(m))
        return v2.RandomApply([blur], p=BLUR_P)

    def grayscale(self, m: float) -> Any:
        return v2.RandomGrayscale(p=GRAY_P * m)

    def erase(self, m: float) -> Any:
        return v2.RandomErasing(p=ERASE_P * m, scale=_erase_area(m), ratio=(0.3, 3.3), value=0)

    def randaugment(self, m: float) -> Any:
        magnitude = round(m * (AUTOAUG_BINS - 1))
        return v2.RandAugment(
            num_ops=RANDAUG_OPS,
            magnitude=magnitude,
            num_magnitude_bins=AUTOAUG_BINS,
            interpolation=self.bilinear,
        )

    def trivialaugment(self, m: float) -> Any:
        max_bin = round(m * (AUTOAUG_BINS - 1))
        return TrivialAugmentWideUpTo(max_bin, AUTOAUG_BINS, interpolation=self.bilinear)

    def to_tensor_normalize(self, mean: Sequence[float], std: Sequence[float]) -> list[Any]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class AlbumentationsOps:
    """albumentations transforms on ``(H, W, 3)`` uint8 arrays, one method per op kind.

    Downscaling uses ``INTER_AREA`` (``area_for_downscale``) because OpenCV's bilinear resize does
    not antialias, unlike torchvision's ``antialias=True``.
    """

    def to_image(self) -> list[Any]:
        return []

    def resize(self, size: int) -> Any:
        return A.SmallestMaxSize(
            max_size=size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0
        )

    def center_crop(self, size: int) -> Any:
        return A.CenterCrop(size, size, p=1.0)

    def random_resized_crop(self, size: int, magnitude: float) -> Any:
        return A.RandomResizedCrop(
            size=(size, size),
            scale=crop_scale(magnitude),
            ratio=CROP_RATIO,
            interpolation=cv2.INTER_LINEAR,
            area_for_downscale="image",
            p=1.0,
        )

    def hflip(self) -> Any:
        return A.HorizontalFlip(p=0.5)

    def color_jitter(self, m: float) -> Any:
        return A.ColorJitter(**{k: v * m for k, v in JITTER.items()}, p=1.0)

    def _affine(self, **kwargs: Any) -> Any:
        return A.Affine(
            interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0, **kwargs
        )

    def affine(self, m: float) -> Any:
        # Dicts: translate x/y independently and shear x only, as torchvision's RandomAffine does.
        t = TRANSLATE * m
        return self._affine(
            rotate=(-ROTATE * m, ROTATE * m),
            translate_percent={"x": (-t, t), "y": (-t, t)},
            scale=(1 - ZOOM * m, 1 + ZOOM * m),
            shear={"x": (-SHEAR * m, SHEAR * m), "y": (0.0, 0.0)},
        )

    def blur(self, m: float) -> Any:
        k = _blur_kernel(m)
        return A.GaussianBlur(blur_limit=(k, k), sigma_limit=_blur_sigma(m), p=BLUR_P)

    def grayscale(self, m: float) -> Any:
        return A.ToGray(num_output_channels=3, method="weighted_average", p=GRAY_P * m)

    def erase(self, m: float) -> Any:
        # One hole whose area fraction matches RandomErasing's: side fraction = sqrt(area).
        side = tuple(math.sqrt(a) for a in _erase_area(m))
        return A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=side,
            hole_width_range=side,
            fill=0,
            p=ERASE_P * m,
        )

    def _autoaugment_ops(
        self,
        *,
        shear: float,
        translate: dict[str, Any],
        rotate: float,
        enhance: float,
        bits: tuple[int, int],
        solarize: tuple[float, float],
    ) -> list[Any]:
        """torchvision's auto-augment op space; each op draws its strength in +-max."""

        def jitter(**kw: float) -> Any:
            return A.ColorJitter(
                **{"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, **kw}, p=1.0
            )

        return [
            A.NoOp(p=1.0),
            self._affine(shear={"x": (-shear, shear), "y": (0.0, 0.0)}),  # ShearX
            self._affine(shear={"x": (0.0, 0.0), "y": (-shear, shear)}),  # ShearY
            self._affine(**translate["x"]),  # TranslateX
            self._affine(**translate["y"]),  # TranslateY
            self._affine(rotate=(-rotate, rotate)),
            jitter(brightness=enhance),
            jitter(saturation=enhance),  # torchvision's "Color"
            jitter(contrast=enhance),
            A.Sharpen(alpha=(0.0, enhance), lightness=(1.0, 1.0), p=1.0),
            A.Posterize(num_bits=bits, p=1.0),
            A.Solarize(threshold_range=solarize, p=1.0),
            A.AutoContrast(p=1.0),
            A.Equalize(p=1.0),
        ]

    def randaugment(self, m: float) -> Any:
        # RandAugment: 2 ops drawn with replacement, strength fixed by magnitude (here: up to).
        top = RANDAUG_MAX
        t = top["translate"] * m
        bits = 8 - round(top["bits"] * m)
        ops = self._autoaugment_ops(
            shear=_shear_degrees(top["shear"] * m),
            translate={
                "x": {"translate_percent": {"x": (-t, t), "y": (0.0, 0.0)}},
                "y": {"translate_percent": {"x": (0.0, 0.0), "y": (-t, t)}},
            },
            rotate=top["rotate"] * m,
            enhance=top["enhance"] * m,
            bits=(bits, bits),
            solarize=(1.0 - m, 1.0 - m),
        )
        return A.SomeOf(ops, n=RANDAUG_OPS, replace=True, p=1.0)

    def trivialaugment(self, m: float) -> Any:
        # TrivialAugmentWide: one op, strength uniform in [0, max * magnitude].
        top = TRIVIAL_MAX
        px = round(top["translate_px"] * m)
        ops = self._autoaugment_ops(
            shear=_shear_degrees(top["shear"] * m),
            translate={
                "x": {"translate_px": {"x": (-px, px), "y": (0, 0)}},
                "y": {"translate_px": {"x": (0, 0), "y": (-px, px)}},
            },
            rotate=top["rotate"] * m,
            enhance=top["enhance"] * m,
            bits=(8 - round(top["bits"] * m), 8),
            solarize=(1.0 - m, 1.0),
        )
        return A.OneOf(ops, p=1.0)

    def to_tensor_normalize(self, mean: Sequence[float], std: Sequence[float]) -> list[Any]:
        normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0, p=1.0)
        return [normalize, ToTensorV2(p=1.0)]


def policy_ops(ops: TorchvisionOps | AlbumentationsOps, policy: str, m: float) -> list[Any]:
    """The policy's augmentations after crop and flip (``basic`` and ``none`` add none)."""
    if policy in ("none", "basic"):
        return []
    if policy == "color":
        return [ops.color_jitter(m)]
    if policy == "geometric":
        return [ops.affine(m)]
    if policy == "randaugment":
        return [ops.randaugment(m)]
    if policy == "trivialaugment":
        return [ops.trivialaugment(m)]
    if policy == "heavy":
        return [ops.color_jitter(m), ops.affine(m), ops.blur(m), ops.grayscale(m), ops.erase(m)]
    raise ValueError(f"augment.policy: got {policy!r}, allowed: {', '.join(POLICIES)}")


def build_stages(
    ops: TorchvisionOps | AlbumentationsOps,
    *,
    policy: str,
    magnitude: float,
    order: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> list[tuple[str, list[Any]]]:
    """Named stages ``(name, [transforms])`` in order; a stage is one profiler step."""

    def named(t: Any) -> tuple[str, list[Any]]:
        return (type(t).__name__, [t])

    to_image = ops.to_image()
    head = [("to_image", to_image)] if to_image else []
    tail = [("to_tensor_normalize", ops.to_tensor_normalize(mean, std))]
    if not train or policy == "none":
        middle = [
            ("resize", [ops.resize(resize_size(image_size))]),
            ("center_crop", [ops.center_crop(image_size)]),
        ]
        return head + middle + tail
    crop = named(ops.random_resized_crop(image_size, magnitude))
    augment = [named(ops.hflip())] + [named(t) for t in policy_ops(ops, policy, magnitude)]
    if order == "resize_first":
        middle = [("resize", [ops.resize(resize_size(image_size))]), crop, *augment]
    elif order == "augment_first":
        middle = [*augment, crop]
    else:
        raise ValueError(f"augment.order: got {order!r}, allowed: resize_first, augment_first")
    return head + middle + tail
