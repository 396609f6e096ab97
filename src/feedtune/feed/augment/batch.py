"""Augmentation of whole uint8 batches: the ``resize_first`` sample path, applied per batch.

The sample path (``per_sample.build_transform``) resizes, crops, flips and jitters each image in
the loader workers. Here the loader only delivers every image squashed to one working square
with its original aspect (``feed.augment.squares``) so that images collate, and
:class:`BatchPolicy` does the rest once per batch, on whatever device the batch is on: each
sample's parameters are drawn as torchvision draws them, crop + flip (+ affine) are one
``grid_sample``, colour jitter is a few batched tensor ops.

Crops are drawn on a virtual image: the original with its shorter side resized to
``resize_size(S)`` (its size follows from the aspect, with torchvision's integer rounding), so
crop area and aspect have exactly ``v2.RandomResizedCrop``'s distribution on the sample path. A
crop's fractions of that image are its fractions of the squashed square.

Known differences from the sample path: pixels stay float between stages (no uint8 rounding),
sampling is bilinear without antialiasing (the working square is at most ~1.43x the output),
and the pixels bordering the affine's zero fill are approximated to first order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from feedtune.config import AugmentConfig
from feedtune.feed.augment.policies import (
    CROP_RATIO,
    JITTER,
    ROTATE,
    SHEAR,
    TRANSLATE,
    ZOOM,
    crop_scale,
)
from feedtune.feed.augment.squares import (
    ToWorkingUint8,  # re-exported: the loader half of this path
)
from feedtune.feed.geometry import resize_size, working_size

__all__ = [
    "BATCH_POLICIES",
    "BatchPolicy",
    "BatchParams",
    "ToWorkingUint8",
    "build_batch_policy",
    "has_batch_version",
]


# Policies whose batch version draws the same transforms as the sample path.
BATCH_POLICIES = ("none", "basic", "color", "geometric")


def has_batch_version(policy: object, order: object) -> bool:
    """Whether ``augment.where: batch`` draws the same transforms as the sample path for this
    policy and order: what ``BatchPolicy`` accepts (geometric's affine must follow the crop)."""
    return policy in BATCH_POLICIES and not (policy == "geometric" and order == "augment_first")


# torchvision's grayscale weights (contrast mean, saturation blend).
_GRAY = (0.2989, 0.587, 0.114)
# RandomResizedCrop's attempts before it falls back to a central crop.
_CROP_TRIES = 10


@dataclass
class BatchParams:
    """Per-sample parameters (CPU tensors, first dimension B), in the sample path's terms.

    ``scale``/``ratio``: crop area as a fraction of the image and crop width / height;
    ``box``: crop (left, top, right, bottom) as fractions of the image; ``order``: [B, 4]
    jitter order (0 brightness, 1 contrast, 2 saturation, 3 hue); ``translate``: [B, 2] pixels
    of the S x S image; ``zoom``: the affine scale. Identity values where a policy has no op.
    ``scale`` and ``ratio`` describe ``box``; ``apply_params`` reads ``box``, not them.
    """

    scale: Tensor
    ratio: Tensor
    box: Tensor
    flip: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    angle: Tensor
    translate: Tensor
    zoom: Tensor
    shear: Tensor


def _jitter_range(name: str, m: float) -> tuple[float, float] | None:
    """ColorJitter's range for a strength (None: the op is skipped, as torchvision does)."""
    v = JITTER[name] * m
    if v == 0:
        return None
    return (-v, v) if name == "hue" else (max(1.0 - v, 0.0), 1.0 + v)


class BatchPolicy(torch.nn.Module):
    """``forward(uint8 [B, 3, n, n], aspects [B]) -> float32 [B, 3, S, S]``, normalised.

    ``random`` (train with a policy other than ``none``) is fixed at build time: the module's
    own ``train()``/``eval()`` switch does not change which crops are drawn.
    """

    def __init__(self, cfg: AugmentConfig, *, train: bool):
        super().__init__()
        if cfg.policy not in BATCH_POLICIES:
            raise ValueError(
                f"augment.policy: got {cfg.policy!r}, allowed: {', '.join(BATCH_POLICIES)}"
            )
        if train and cfg.policy == "geometric" and cfg.order != "resize_first":
            # The affine would act on the full image before the crop: another transform.
            raise ValueError(f"augment.order: got {cfg.order!r}, allowed: resize_first")
        self.policy = cfg.policy
        self.magnitude = float(cfg.magnitude)
        self.size = int(cfg.image_size)
        self.resize = resize_size(self.size)
        self.working = working_size(self.size)
        self.random = train and cfg.policy != "none"
        self.jitter = {k: _jitter_range(k, self.magnitude) for k in JITTER}
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def sample_params(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        aspects: Tensor | None = None,
    ) -> BatchParams:
        """Draw each sample's parameters on the CPU (``aspects`` default to square images)."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator: parameters are drawn on the CPU, pass a CPU generator")
        b, m, g = batch_size, self.magnitude, generator
        a = torch.ones(b, dtype=torch.float64) if aspects is None else aspects.double().cpu()
        if a.shape != (b,):
            raise ValueError(f"aspects: expected shape ({b},), got {tuple(a.shape)}")

        def uniform(lo: float, hi: float, *shape: int) -> Tensor:
            return torch.empty(*(shape or (b,)), dtype=torch.float64).uniform_(lo, hi, generator=g)

        # Virtual image: shorter side resized to R, longer side truncated as v2.Resize does.
        r = self.resize
        hr = torch.where(a >= 1, float(r), torch.floor(r / a + 1e-9))
        wr = torch.where(a >= 1, torch.floor(r * a + 1e-9), float(r))
        if self.random:
            left, top, w, h = self._random_crop(hr, wr, g)
            flip = torch.rand(b, generator=g) < 0.5
        else:
            w = h = torch.full((b,), float(self.size), dtype=torch.float64)
            top, left = torch.round((hr - h) / 2), torch.round((wr - w) / 2)
            flip = torch.zeros(b, dtype=torch.bool)
        box = torch.stack((left / wr, top / hr, (left + w) / wr, (top + h) / hr), dim=1)
        ones, zeros = torch.ones(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        p = BatchParams(
            scale=w * h / (wr * hr),
            ratio=w / h,
            box=box,
            flip=flip,
            brightness=ones,
            contrast=ones,
            saturation=ones,
            hue=zeros,
            order=torch.arange(4).expand(b, 4),
            angle=zeros,
            translate=torch.zeros(b, 2, dtype=torch.float64),
            zoom=ones,
            shear=zeros,
        )
        if self.random and self.policy == "color":
            p.order = torch.rand(b, 4, generator=g).argsort(dim=1)  # uniform permutation
            for name, bounds in self.jitter.items():
                if bounds is not None:
                    setattr(p, name, uniform(*bounds))
        elif self.random and self.policy == "geometric":
            p.angle = uniform(-ROTATE * m, ROTATE * m)
            max_d = TRANSLATE * m * self.size
            p.translate = torch.round(uniform(-max_d, max_d, b, 2))
            p.zoom = uniform(1 - ZOOM * m, 1 + ZOOM * m)
            p.shear = uniform(-SHEAR * m, SHEAR * m)
        return p

    def _random_crop(
        self, hr: Tensor, wr: Tensor, g: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``v2.RandomResizedCrop.make_params`` for every sample at once: (left, top, w, h)."""
        b, (s_lo, s_hi) = hr.numel(), crop_scale(self.magnitude)
        r_lo, r_hi = CROP_RATIO
        shape = (b, _CROP_TRIES)
        area = (hr * wr)[:, None] * torch.empty(shape, dtype=torch.float64).uniform_(
            s_lo, s_hi, generator=g
        )
        log_r = torch.empty(shape, dtype=torch.float64).uniform_(
            math.log(r_lo), math.log(r_hi), generator=g
        )
        ratio = torch.exp(log_r)
        w_try, h_try = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
        fits = (w_try > 0) & (w_try <= wr[:, None]) & (h_try > 0) & (h_try <= hr[:, None])
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try
        found = fits.any(dim=1)
        w, h = w_try.gather(1, first).squeeze(1), h_try.gather(1, first).squeeze(1)
        # Fallback: the whole image, cut down to the nearest allowed aspect, centred.
        in_ratio = wr / hr
        fw = torch.where(in_ratio > r_hi, torch.round(hr * r_hi), wr)
        fh = torch.where(in_ratio < r_lo, torch.round(wr / r_lo), hr)
        w, h = torch.where(found, w, fw), torch.where(found, h, fh)
        u = torch.rand(b, 2, generator=g, dtype=torch.float64)
        top = torch.where(found, torch.floor(u[:, 0] * (hr - h + 1)), torch.floor((hr - h) / 2))
        left = torch.where(found, torch.floor(u[:, 1] * (wr - w + 1)), torch.floor((wr - w) / 2))
        return left, top, w, h

    def forward(
        self, images: Tensor, aspects: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                f"expected uint8 images [B, 3, n, n], got {images.dtype} {tuple(images.shape)}"
            )
        return self.apply_params(
            images, self.sample_params(len(images), generator, aspects=aspects)
        )

    def apply_params(self, images: Tensor, p: BatchParams) -> Tensor:
        """Augment ``images`` with given parameters (what ``forward`` does after drawing)."""
        dev, s, b = images.device, self.size, len(images)
        c = torch.linspace((1 - s) / 2, (s - 1) / 2, s, device=dev)
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        # Output pixel centres, relative to the image centre, in pixels of the S x S image.
        pts = torch.stack((xs, ys), dim=-1).reshape(1, s * s, 2)
        mask = None
        if self.policy == "geometric" and self.random:
            theta = self._inverse_affine(p).to(dev, torch.float32)  # [B, 2, 3]
            pts = pts @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
            # v2.affine samples the S x S image with zero padding, then multiplies by the
            # in-image weight of each point: both factors vanish outside that image.
            idx = pts + (s - 1) / 2
            inside = torch.minimum(idx + 1, s - idx).clamp(0, 1).prod(dim=-1)
            mask = inside.square().view(b, 1, s, s)
        box = p.box.to(dev, torch.float32)
        sign = torch.where(p.flip, -1.0, 1.0).to(dev, torch.float32)[:, None]
        gx = (box[:, 0] + box[:, 2] - 1)[:, None] + pts[..., 0] * sign * (2 / s) * (
            box[:, 2] - box[:, 0]
        )[:, None]
        gy = (box[:, 1] + box[:, 3] - 1)[:, None] + pts[..., 1] * (2 / s) * (box[:, 3] - box[:, 1])[
            :, None
        ]
        grid = torch.stack((gx, gy), dim=-1).view(b, s, s, 2)
        x = F.grid_sample(
            images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        if mask is not None:
            x = x * mask
        x = x / 255.0
        if self.policy == "color" and self.random:
            x = self._jitter(x, p)
        return (x - self.mean.to(dev)) / self.std.to(dev)

    @staticmethod
    def _inverse_affine(p: BatchParams) -> Tensor:
        """[B, 2, 3] output -> input maps of ``v2.functional.affine`` (centre 0, x-shear only)."""
        rot, sx = torch.deg2rad(p.angle), torch.deg2rad(p.shear)
        a, c = torch.cos(rot), torch.sin(rot)
        bb = -(a * torch.tan(sx) + c)
        d = a - c * torch.tan(sx)
        m = torch.stack((d, -bb, -c, a), dim=1).view(-1, 2, 2) / p.zoom.view(-1, 1, 1)
        return torch.cat((m, -(m @ p.translate.unsqueeze(-1))), dim=2)

    def _jitter(self, x: Tensor, p: BatchParams) -> Tensor:
        """ColorJitter on [0, 1] floats: op ``order[:, k]`` at step k, one subset per op."""
        ops = [
            (_brightness, p.brightness, self.jitter["brightness"]),
            (_contrast, p.contrast, self.jitter["contrast"]),
            (_saturation, p.saturation, self.jitter["saturation"]),
            (_hue, p.hue, self.jitter["hue"]),
        ]
        x = x.clone()
        for k in range(4):
            for j, (op, factor, bounds) in enumerate(ops):
                sel = torch.nonzero(p.order[:, k] == j).squeeze(1)  # CPU: no device sync
                if bounds is None or sel.numel() == 0:
                    continue
                f = factor[sel].to(x.device, x.dtype).view(-1, 1, 1, 1)
                sel = sel.to(x.device)
                x[sel] = op(x[sel], f)
        return x


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x * f + mean * (1 - f)).clamp_(0, 1)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return (x * f + _gray(x) * (1 - f)).clamp_(0, 1)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the HSV hue by ``f`` turns (RGB -> HSV as torchvision computes it -> RGB)."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    h = torch.where(is_r, (g - b) / safe, torch.where(is_g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h6 = h + 6 * f.view(-1, 1, 1)  # shifted hue, in sixths of a turn
    # Closed-form HSV -> RGB: channel = V - V * S * clamp(min(k, 4 - k), 0, 1), V * S = delta.
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        out.append(maxc - delta * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=1)


def build_batch_policy(cfg: AugmentConfig, *, train: bool) -> BatchPolicy:
    """The batch train (random) or eval (centre crop) augmentation described by ``cfg``.

    Pair it with ``ToWorkingUint8(working_size(cfg.image_size))`` in the dataset.
    """
    return BatchPolicy(cfg, train=train)
