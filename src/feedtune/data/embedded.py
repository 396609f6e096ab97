"""Deterministic generator of the embedded image-classification datasets.

Two datasets, written as real JPEG files plus a ``manifest.csv`` (``path,label,group``, paths
relative to the dataset folder, e.g. ``images/triangle/g0012_3.jpg``):

- ``shapes`` (~3000 images): 10 shape classes with long-tailed counts (largest / smallest = 10).
- ``shapes-shift`` (~600 images): 6 *new* classes made of the same primitives in new
  arrangements (``two_circles``, ``circle_in_square``, ...), for the transfer-learning demo.

Every image belongs to a *group*: one object with a fixed identity (colour, fill pattern,
aspect ratio, outline, shape proportions, size, favourite position, rotation, mirroring,
background palette) rendered 4-8 times with jitter in pose, lighting and background. A split
that ignores groups therefore leaks near-duplicates. Colour is a per-group identity, never a
class cue. Width and height vary per image between 128 and 400 px (aspect ratio up to 1.6),
backgrounds are cluttered (gradients, clouds, noise, thin strokes, partial arcs, small blobs),
objects are sometimes small, occluded, blurred, low-contrast or cut by the frame, and the JPEG
quality varies between 70 and 95.

Generation is byte-identical for a given seed: every random draw comes from
``numpy.random.default_rng([seed, dataset, class, group, ...])``, so an image depends only on
its own coordinates (a smaller ``n_images`` keeps the first groups of each class stable), and
images are encoded with PIL at a fixed quality with ``optimize=False``.

``ensure_dataset`` is idempotent: a ``_complete.json`` marker records the parameters and the
manifest digest, so a different generation is rebuilt and a deleted image is re-rendered on its
own. A dataset is built beside its folder and renamed into place under a lock, and a folder
holding anything feedtune did not write is refused, never cleared.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from feedtune.progress import progress_bar

__all__ = [
    "EMBEDDED",
    "DatasetFolderError",
    "class_counts",
    "dataset_root",
    "ensure_dataset",
    "generate_dataset",
]

EMBEDDED: tuple[str, ...] = ("shapes", "shapes-shift")

# Bumped whenever the rendering changes, so that ensure_dataset rebuilds stale datasets.
GENERATOR_VERSION = 2  # bump when rendering changes: existing datasets are rebuilt
MANIFEST_NAME = "manifest.csv"
MARKER_NAME = "_complete.json"
IMAGE_DIR = "images"

MIN_SIDE, MAX_SIDE = 128, 400  # image width and height, each
MAX_ASPECT = 1.6  # longer side / shorter side at most: objects stay recognisable once squashed
MIN_GROUP, MAX_GROUP = 4, 8  # renders per group (object)
JPEG_QUALITY = (70, 95)
SUPERSAMPLE = 2  # the object mask is drawn at 2x and reduced: anti-aliased edges

# Difficulty knobs. Tuned so that a small CNN at 64x64 picks the shapes up within a few epochs
# but, without augmentation, generalises poorly to unseen groups (a group's scale, position,
# mirroring, colours and background are shared by its renders), while random-resized crops,
# flips and class-balanced sampling close part of the gap.
MIN_LUMA_GAP = 80.0  # object colour vs mean background luma (0-255), as far as can be found
BG_SPREAD = 60.0  # how far the two colours of a background gradient are apart (std, per channel)
CLOUD_AMPLITUDE = (2.0, 10.0)  # low-frequency background noise, 0-255
SMALL_OBJECT_P = 0.2  # share of groups with a small object ...
SMALL_RADIUS = (0.17, 0.26)  # ... whose radius is this fraction of the shorter image side
RADIUS = (0.28, 0.46)  # otherwise
SCALE_JITTER = 0.1  # std of the per-render log-scale around the group's radius
POSITION_JITTER = 0.15  # std of the per-render centre around the group's spot (in 0..1)
CUT_P, CUT_MARGIN = 0.1, 0.45  # share of renders cut by the border, and how far
BASE_ANGLE = 20.0  # a group's rotation from the upright shape: uniform in +-BASE_ANGLE degrees
ANGLE_JITTER = 6.0  # std of the per-render rotation around the group's angle, degrees
PATTERNS = ("solid",) * 6 + ("stripes", "dots", "checker", "gradient")  # drawn evenly
PATTERN_CONTRAST = 20.0  # std per channel of the second colour of a patterned fill
LOW_CONTRAST_P = 0.05  # share of renders with a semi-transparent object ...
LOW_ALPHA = (0.55, 0.8)  # ... of this opacity
OCCLUSION_P = 0.1  # share of renders with an occluding patch
BLUR_P = 0.15  # share of slightly blurred renders
N_LINES = (0, 4)  # distractor strokes per image (low inclusive, high exclusive)
NOISE_AMPLITUDE = (2, 8)  # uniform pixel noise, +-


@dataclass(frozen=True)
class _Spec:
    """What a dataset is made of: its classes (in order), total size and long-tail ratio."""

    classes: tuple[str, ...]
    n_images: int
    imbalance: float  # largest class / smallest class


_SPECS: dict[str, _Spec] = {
    "shapes": _Spec(
        classes=(
            "circle",
            "square",
            "triangle",
            "star",
            "cross",
            "hexagon",
            "ring",
            "arrow",
            "crescent",
            "heart",
        ),
        n_images=3000,
        imbalance=10.0,
    ),
    "shapes-shift": _Spec(
        classes=(
            "two_circles",
            "circle_in_square",
            "triangle_pair",
            "star_in_ring",
            "cross_in_circle",
            "house",
        ),
        n_images=600,
        imbalance=2.0,
    ),
}


def dataset_root(name: str, project_root: Path) -> Path:
    """Folder of the embedded dataset ``name`` inside a project: ``project_root/data/name``."""
    return Path(project_root) / "data" / name


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown embedded dataset {name!r}; allowed: {', '.join(EMBEDDED)}")
    return _SPECS[name]


def class_counts(name: str, n_images: int | None = None) -> dict[str, int]:
    """Planned number of images per class (in class order), without rendering anything.

    Counts decay geometrically from the first class to the last so that largest / smallest
    equals the dataset's imbalance ratio; they sum exactly to ``n_images`` (default: the full
    size) except that every class keeps at least one group (``MIN_GROUP`` images).
    """
    spec = _spec(name)
    total = spec.n_images if n_images is None else int(n_images)
    if total < 1:
        raise ValueError(f"n_images must be >= 1, got {total}")
    k = len(spec.classes)
    decay = spec.imbalance ** (-1.0 / (k - 1))
    weights = decay ** np.arange(k)
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    # Largest remainder (ties broken by class order) so the counts sum exactly to `total`.
    for i in sorted(range(k), key=lambda i: (-(raw[i] - counts[i]), i))[: total - counts.sum()]:
        counts[i] += 1
    counts = np.maximum(counts, MIN_GROUP)
    return {c: int(n) for c, n in zip(spec.classes, counts, strict=True)}


def _group_sizes(count: int, rng: np.random.Generator) -> list[int]:
    """Split ``count`` images into groups of MIN_GROUP..MAX_GROUP renders (about 6 on average)."""
    lo, hi = math.ceil(count / MAX_GROUP), count // MIN_GROUP
    n_groups = min(max(round(count / 6), lo), hi)
    sizes = np.full(n_groups, MIN_GROUP)
    for _ in range(count - MIN_GROUP * n_groups):
        free = np.flatnonzero(sizes < MAX_GROUP)
        sizes[free[rng.integers(len(free))]] += 1
    return [int(s) for s in sizes]


@dataclass(frozen=True)
class _Item:
    """One image to render: its manifest row and the coordinates its random draws come from."""

    path: str
    label: str
    group: str
    dataset_index: int
    class_index: int
    group_index: int
    render_index: int


def _plan(name: str, seed: int, n_images: int | None) -> list[_Item]:
    _spec(name)  # validates the name
    ds = EMBEDDED.index(name)
    items = []
    for ci, (label, count) in enumerate(class_counts(name, n_images).items()):
        sizes = _group_sizes(count, np.random.default_rng([seed, ds, ci, 0xC0FFEE]))
        for gi, size in enumerate(sizes):
            group = f"{name}-{label}-{gi:04d}"
            for ri in range(size):
                path = f"{IMAGE_DIR}/{label}/g{gi:04d}_{ri}.jpg"
                items.append(_Item(path, label, group, ds, ci, gi, ri))
    return items


# --------------------------------------------------------------------------- geometry
# Every primitive is a list of polygons in object coordinates (radius ~1, centred at 0) with a
# value: 1 = paint, 0 = cut a hole. Circles are polygons too, so aspect and rotation apply to
# all shapes the same way.

_Poly = np.ndarray  # (n, 2) float vertices
_Part = tuple[_Poly, int]


def _ngon(n: int, r: float = 1.0, phase: float = 0.0, cx: float = 0.0, cy: float = 0.0) -> _Poly:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.sin(t), cy - r * np.cos(t)], axis=1)


def _circle(r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> _Poly:
    return _ngon(64, r, 0.0, cx, cy)


def _star(points: int, r: float, inner: float, cx: float = 0.0, cy: float = 0.0) -> _Poly:
    t = np.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return np.stack([cx + rad * np.sin(t), cy - rad * np.cos(t)], axis=1)


def _cross(arm: float, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> _Poly:
    a = arm * r
    pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a)]
    pts += [(a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    return np.asarray(pts, dtype=float) + (cx, cy)


def _arrow(shaft: float, head: float) -> _Poly:
    s, h = shaft, head
    pts = [(-1.0, -s), (1.0 - h, -s), (1.0 - h, -0.75), (1.0, 0.0)]
    pts += [(1.0 - h, 0.75), (1.0 - h, s), (-1.0, s)]
    return np.asarray(pts, dtype=float)


def _heart(lobe: float) -> _Poly:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - lobe * 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= pts.mean(axis=0)
    return pts / np.abs(pts).max()


def _shape_parts(label: str, g: np.random.Generator) -> list[_Part]:
    """The object of one group: class geometry with group-specific proportions."""
    u = g.uniform
    if label == "circle":
        return [(_circle(), 1)]
    if label == "square":
        return [(_ngon(4, 1.0, np.pi / 4) / np.sqrt(0.5), 1)]
    if label == "triangle":
        return [(_ngon(3, 1.0, u(-0.15, 0.15)) + (0, 0.2), 1)]
    if label == "star":
        return [(_star(int(g.choice([5, 6])), 1.0, u(0.38, 0.55)), 1)]
    if label == "cross":
        return [(_cross(u(0.22, 0.38)), 1)]
    if label == "hexagon":
        return [(_ngon(6, 1.0, np.pi / 6), 1)]
    if label == "ring":
        return [(_circle(), 1), (_circle(u(0.45, 0.68)), 0)]
    if label == "arrow":
        return [(_arrow(u(0.2, 0.32), u(0.45, 0.65)), 1)]
    if label == "crescent":
        off = u(0.35, 0.6)
        return [(_circle(), 1), (_circle(u(0.8, 0.95), off, -off * u(0.0, 0.4)), 0)]
    if label == "heart":
        return [(_heart(u(0.8, 1.2)), 1)]
    # shapes-shift: the same primitives in new arrangements.
    if label == "two_circles":
        r, gap = u(0.42, 0.5), u(0.02, 0.15)
        return [(_circle(r, -r - gap / 2), 1), (_circle(r, r + gap / 2), 1)]
    if label == "circle_in_square":
        inner = u(0.72, 0.82)
        sq = _ngon(4, 1.0, np.pi / 4) / np.sqrt(0.5)
        return [(sq, 1), (sq * inner, 0), (_circle(inner * u(0.6, 0.8)), 1)]
    if label == "triangle_pair":
        r = u(0.5, 0.58)
        return [
            (_ngon(3, r, 0.0, -r * 0.9, r * 0.25), 1),
            (_ngon(3, r, np.pi, r * 0.9, -r * 0.25), 1),
        ]
    if label == "star_in_ring":
        inner = u(0.72, 0.82)
        return [(_circle(), 1), (_circle(inner), 0), (_star(5, inner * 0.85, u(0.4, 0.5)), 1)]
    if label == "cross_in_circle":
        inner = u(0.72, 0.82)
        return [(_circle(), 1), (_circle(inner), 0), (_cross(u(0.22, 0.3), inner * 0.8), 1)]
    if label == "house":
        w = u(0.55, 0.7)
        body = np.asarray([(-w, -0.1), (w, -0.1), (w, 0.9), (-w, 0.9)], dtype=float)
        roof = np.asarray([(-w * 1.25, -0.05), (0.0, -1.0), (w * 1.25, -0.05)], dtype=float)
        return [(body, 1), (roof, 1)]
    raise AssertionError(f"no geometry for {label!r}")


# --------------------------------------------------------------------------- colour helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _random_colour(g: np.random.Generator) -> np.ndarray:
    return _hsv(g.uniform(), g.uniform(0.1, 0.95), g.uniform(0.2, 1.0))


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    r, gr, b = (int(v) for v in np.clip(np.round(c), 0, 255))
    return r, gr, b


def _jitter(c: np.ndarray, g: np.random.Generator, sigma: float) -> np.ndarray:
    return np.clip(c + g.normal(0, sigma, 3), 0, 255).astype(np.float32)


# --------------------------------------------------------------------------- group identity


@dataclass(frozen=True)
class _Identity:
    """What stays fixed across the renders of one group (one object)."""

    parts: list[_Part]
    colour: np.ndarray
    colour2: np.ndarray
    pattern: str
    pattern_period: float  # relative to the object radius
    pattern_angle: float
    aspect: float
    outline: float  # outline width relative to the object radius; 0 = none
    outline_colour: np.ndarray
    base_angle: float  # degrees
    mirror: bool  # the shape is drawn mirrored (an arrow pointing left, ...)
    radius: float  # object radius / shorter image side
    position: np.ndarray  # favourite centre, (0, 0) = top left .. (1, 1) = bottom right
    bg1: np.ndarray
    bg2: np.ndarray
    bg_kind: str


def _luma(c: np.ndarray) -> float:
    return float(c @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _identity(label: str, g: np.random.Generator) -> _Identity:
    bg1 = _random_colour(g)
    bg2 = _jitter(bg1, g, BG_SPREAD)
    # The object stands out from its background by at least MIN_LUMA_GAP (most of the time:
    # renders can still lose contrast through transparency, lighting and occlusion).
    bg_luma = (_luma(bg1) + _luma(bg2)) / 2
    for _ in range(50):
        colour = _random_colour(g)
        if abs(_luma(colour) - bg_luma) >= MIN_LUMA_GAP:
            break
    return _Identity(
        parts=_shape_parts(label, g),
        colour=colour,
        colour2=_jitter(colour, g, PATTERN_CONTRAST),
        pattern=str(g.choice(PATTERNS)),
        pattern_period=float(g.uniform(0.15, 0.35)),
        pattern_angle=float(g.uniform(0, np.pi)),
        aspect=float(np.exp(g.uniform(-0.3, 0.3))),
        outline=float(g.choice([0.0, 0.0, g.uniform(0.03, 0.1)])),
        outline_colour=_random_colour(g),
        base_angle=float(g.uniform(-BASE_ANGLE, BASE_ANGLE)),
        mirror=bool(g.uniform() < 0.5),
        radius=float(g.uniform(*(SMALL_RADIUS if g.uniform() < SMALL_OBJECT_P else RADIUS))),
        position=g.uniform(0, 1, 2),
        bg1=bg1,
        bg2=bg2,
        bg_kind=str(g.choice(["linear", "radial", "clouds"])),
    )


# --------------------------------------------------------------------------- rendering

_BG_CELL = 8  # the smooth background is computed on a grid 8x coarser, then upsampled


def _background(ident: _Identity, g: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth background: a gradient between two colours of the group's palette plus clouds."""
    sw, sh = -(-w // _BG_CELL) + 1, -(-h // _BG_CELL) + 1
    c1, c2 = _jitter(ident.bg1, g, 25), _jitter(ident.bg2, g, 25)
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    if ident.bg_kind == "linear":
        a = g.uniform(0, 2 * np.pi)
        t = xs * np.cos(a) + ys * np.sin(a)
    elif ident.bg_kind == "radial":
        t = np.hypot(xs - g.uniform(0, sw), ys - g.uniform(0, sh))
    else:
        t = _clouds(g, sw, sh, int(g.integers(3, 7)), 1)[..., 0]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c1 + t[..., None] * (c2 - c1)
    bg += _clouds(g, sw, sh, int(g.integers(4, 10)), 3) * g.uniform(*CLOUD_AMPLITUDE)
    small = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    return small.resize((w, h), Image.BILINEAR, box=(0, 0, w / _BG_CELL, h / _BG_CELL))


def _clouds(g: np.random.Generator, w: int, h: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of shape (h, w, channels)."""
    small = g.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
    img = Image.fromarray(small, "RGB") if channels == 3 else Image.fromarray(small[..., 0], "L")
    big = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32)
    return (big.reshape(h, w, channels)) / 127.5 - 1.0


def _distractors(img: Image.Image, g: np.random.Generator) -> None:
    """Clutter that no class looks like: thin strokes, short partial arcs, small blobs."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    side = min(w, h)
    for _ in range(int(g.integers(*N_LINES))):
        x0, y0 = g.uniform(0, w), g.uniform(0, h)
        length, a = g.uniform(0.1, 0.5) * side, g.uniform(0, 2 * np.pi)
        x1, y1 = x0 + length * np.cos(a), y0 + length * np.sin(a)
        d.line([(x0, y0), (x1, y1)], fill=_rgb(_random_colour(g)), width=int(g.integers(1, 3)))
    for _ in range(int(g.integers(0, 3))):
        r = g.uniform(0.04, 0.15) * side
        cx, cy = g.uniform(0, w), g.uniform(0, h)
        start = g.uniform(0, 360)
        box = [cx - r, cy - r, cx + r, cy + r]
        width = int(g.integers(1, 3))
        d.arc(box, start, start + g.uniform(30, 110), fill=_rgb(_random_colour(g)), width=width)
    for _ in range(int(g.integers(0, 5))):
        r = g.uniform(0.008, 0.03) * side
        cx, cy = g.uniform(0, w), g.uniform(0, h)
        ax = r * np.exp(g.uniform(-0.5, 0.5))
        d.ellipse([cx - ax, cy - r, cx + ax, cy + r], fill=_rgb(_random_colour(g)))


def _object_masks(
    ident: _Identity, g: np.random.Generator, w: int, h: int
) -> tuple[Image.Image, Image.Image | None, float, tuple[float, float]]:
    """Anti-aliased masks (fill, outline or None) of the posed object, its radius and centre."""
    radius = ident.radius * np.exp(g.normal(0, SCALE_JITTER)) * min(w, h)
    angle = np.deg2rad(ident.base_angle + g.normal(0, ANGLE_JITTER))
    aspect = ident.aspect * np.exp(g.normal(0, 0.08))
    # Near the group's favourite spot; mostly inside the frame, sometimes cut by the border.
    margin = radius * (CUT_MARGIN if g.uniform() < CUT_P else 0.95)
    fx, fy = np.clip(ident.position + g.normal(0, POSITION_JITTER, 2), 0, 1)
    cx = min(margin, w / 2) + fx * max(w - 2 * margin, 0)
    cy = min(margin, h / 2) + fy * max(h - 2 * margin, 0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    stretch = np.array([np.sqrt(aspect) * (-1 if ident.mirror else 1), 1 / np.sqrt(aspect)])

    s = SUPERSAMPLE
    fill = Image.new("L", (w * s, h * s), 0)
    df = ImageDraw.Draw(fill)
    width = int(round(2 * ident.outline * radius * s))
    line = Image.new("L", (w * s, h * s), 0) if width > 0 else None
    for poly, value in ident.parts:
        pts = ((poly * stretch) @ rot.T * radius + (cx, cy)) * s
        xy = [(float(x), float(y)) for x, y in pts]
        df.polygon(xy, fill=255 * value)
        if line is not None:
            ImageDraw.Draw(line).line([*xy, xy[0]], fill=255, width=width, joint="curve")
    if line is not None:  # keep the inner half: a cut-out's edge shows only where it cuts
        line = ImageChops.darker(line, fill).reduce(s)
    return fill.reduce(s), line, radius, (cx, cy)


def _texture(
    ident: _Identity, g: np.random.Generator, box: tuple[int, int, int, int], radius: float
) -> Image.Image | tuple[int, int, int]:
    """The object's surface over ``box``: a colour, or an image with the group's pattern."""
    c1, c2 = _jitter(ident.colour, g, 12), _jitter(ident.colour2, g, 12)
    if ident.pattern == "solid":
        return _rgb(c1)
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    a = ident.pattern_angle + g.normal(0, 0.3)
    period = max(ident.pattern_period * radius, 3.0)
    u = (xs * np.cos(a) + ys * np.sin(a)) / period
    v = (-xs * np.sin(a) + ys * np.cos(a)) / period
    if ident.pattern == "stripes":
        t = np.floor(u) % 2
    elif ident.pattern == "checker":
        t = (np.floor(u) + np.floor(v)) % 2
    elif ident.pattern == "dots":
        t = (np.hypot(u % 1 - 0.5, v % 1 - 0.5) < 0.28).astype(np.float32)
    else:  # a gradient across the object
        t = np.clip((u - u.min()) * period / (2 * radius), 0, 1)
    tex = c1 + t[..., None] * (c2 - c1)
    return Image.fromarray(np.clip(tex, 0, 255).astype(np.uint8), "RGB")


def _scaled(mask: Image.Image, alpha: float) -> Image.Image:
    return mask.point([int(round(v * alpha)) for v in range(256)])


def _image_size(g: np.random.Generator) -> tuple[int, int]:
    """Width and height in MIN_SIDE..MAX_SIDE, neither more than MAX_ASPECT times the other."""
    w = int(g.integers(MIN_SIDE, MAX_SIDE + 1))
    lo, hi = max(MIN_SIDE, math.ceil(w / MAX_ASPECT)), min(MAX_SIDE, int(w * MAX_ASPECT))
    h = int(g.integers(lo, hi + 1))
    return (w, h) if g.uniform() < 0.5 else (h, w)


def _render(seed: int, item: _Item) -> bytes:
    """The JPEG bytes of one image; depends only on (seed, item coordinates)."""
    key = [seed, item.dataset_index, item.class_index, item.group_index]
    ident = _identity(item.label, np.random.default_rng(key))
    g = np.random.default_rng([*key, item.render_index + 1])
    w, h = _image_size(g)

    canvas = _background(ident, g, w, h)
    _distractors(canvas, g)

    fill, outline, radius, (cx, cy) = _object_masks(ident, g, w, h)
    # Low-contrast renders: the object is partly transparent over the background.
    alpha = g.uniform(*LOW_ALPHA) if g.uniform() < LOW_CONTRAST_P else g.uniform(0.85, 1.0)
    box = fill.getbbox() or (0, 0, 1, 1)
    tex = _texture(ident, g, box, radius)
    if isinstance(tex, tuple):
        canvas.paste(tex, (0, 0, w, h), _scaled(fill, alpha))
    else:
        canvas.paste(tex, box, _scaled(fill.crop(box), alpha))
    oc = _rgb(_jitter(ident.outline_colour, g, 12))
    if outline is not None:
        canvas.paste(oc, (0, 0, w, h), _scaled(outline, alpha))

    if g.uniform() < OCCLUSION_P:  # an irregular foreign patch hides part of the object
        n = int(g.integers(6, 10))
        t = np.sort(g.uniform(0, 2 * np.pi, n))
        r = g.uniform(0.15, 0.5, n) * radius
        ox, oy = (cx, cy) + g.uniform(-1, 1, 2) * radius
        xs, ys = ox + r * np.cos(t), oy + r * np.sin(t)
        patch = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        ImageDraw.Draw(canvas).polygon(patch, fill=_rgb(_random_colour(g)))
    if g.uniform() < BLUR_P:
        canvas = canvas.filter(ImageFilter.GaussianBlur(g.uniform(0.5, 1.5)))

    # Lighting (contrast, brightness, colour tint: one lookup table per channel), then noise.
    mean = np.asarray(canvas.reduce(8), dtype=np.float32).mean(axis=(0, 1))
    contrast, brightness = g.uniform(0.55, 1.2), g.uniform(0.65, 1.3)
    tint = g.uniform(0.85, 1.15, size=3)
    levels = np.arange(256, dtype=np.float32)[None, :]
    lut = ((levels - mean[:, None]) * contrast + mean[:, None]) * (brightness * tint[:, None])
    canvas = canvas.point(np.clip(np.round(lut), 0, 255).astype(int).ravel().tolist())
    amp = int(g.integers(*NOISE_AMPLITUDE))
    noise = g.integers(-amp, amp + 1, size=(h, w, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(canvas, dtype=np.int16) + noise, 0, 255).astype(np.uint8)

    buf = io.BytesIO()
    quality = int(g.integers(JPEG_QUALITY[0], JPEG_QUALITY[1], endpoint=True))
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _manifest_bytes(items: Iterable[_Item]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "group"])
    for it in items:
        writer.writerow([it.path, it.label, it.group])
    return buf.getvalue().encode()


def _marker(name: str, seed: int, n_images: int | None, items: list[_Item], digest: str) -> dict:
    return {
        "name": name,
        "seed": seed,
        "n_images": n_images,
        "count": len(items),
        "manifest_sha256": digest,
        "generator_version": GENERATOR_VERSION,
    }


def _write_images(seed: int, root: Path, items: list[_Item], progress: bool, desc: str) -> None:
    for it in progress_bar(items, desc=desc, unit="img", enabled=progress):
        path = root / it.path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic, so that a reader never scans a half-written JPEG as a bad image.
        _atomic_write(path, _render(seed, it))


class DatasetFolderError(ValueError):
    """The target folder holds files feedtune did not write; nothing in it was touched."""


def _lock(root: Path) -> FileLock:
    # Beside the folder, not in it: the folder itself is replaced by a rename.
    return FileLock(str(root.parent / f".{root.name}.lock"))


def _listed_paths(manifest: Path) -> set[str] | None:
    try:
        with manifest.open(newline="") as f:
            return {row["path"] for row in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return None


def _foreign_file(root: Path, expected_manifest: bytes) -> Path | None:
    """The first file in ``root`` that feedtune did not write, or None if all are feedtune's.

    A folder is feedtune's when it carries a generator marker or exactly the manifest this
    generation would write, and every file in it is that marker, the manifest, an image the
    manifest lists or a leftover of an atomic write. Symbolic links are never feedtune's.
    """
    manifest = root / MANIFEST_NAME
    files = sorted(
        Path(folder, name)
        for folder, dirs, names in os.walk(root)  # does not follow links
        for name in names + [d for d in dirs if Path(folder, d).is_symlink()]
    )
    if not files:
        return None
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
        marked = isinstance(marker, dict) and "generator_version" in marker
    except (OSError, ValueError):
        marked = False
    try:
        same_manifest = manifest.read_bytes() == expected_manifest
    except OSError:
        same_manifest = False
    listed = _listed_paths(manifest) if marked or same_manifest else None
    if listed is None:
        return next((p for p in files if p.name == MANIFEST_NAME), files[0])
    ours = listed | {MANIFEST_NAME, MARKER_NAME}
    for path in files:
        rel = path.relative_to(root).as_posix()
        leftover = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_symlink() or not (rel in ours or leftover):
            return path
    return None


def _replace_folder(built: Path, root: Path) -> None:
    """Move the finished ``built`` folder to ``root``; an old ``root`` goes only afterwards."""
    if not root.exists():
        os.replace(built, root)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, old / root.name)
    os.replace(built, root)
    shutil.rmtree(old)


def _generate_locked(
    name: str, root: Path, seed: int, progress: bool, n_images: int | None, items: list[_Item]
) -> Path:
    manifest = _manifest_bytes(items)
    if root.exists() and not root.is_dir():
        raise DatasetFolderError(f"{root} is a file, not a folder; choose another --root")
    foreign = _foreign_file(root, manifest) if root.is_dir() else None
    if foreign is not None:
        raise DatasetFolderError(
            f"{root} holds files feedtune did not write (e.g. {foreign}); nothing was changed. "
            "Choose an empty or new folder for the embedded dataset."
        )
    # Builds of a process killed mid-way; only the holder of the lock builds, so none is live.
    for stale in root.parent.glob(f".{root.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    built = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _write_images(seed, built, items, progress, name)
        (built / MANIFEST_NAME).write_bytes(manifest)
        digest = hashlib.sha256(manifest).hexdigest()
        info = _marker(name, seed, n_images, items, digest)
        (built / MARKER_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _replace_folder(built, root)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return root / MANIFEST_NAME


def generate_dataset(
    name: str,
    root: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    n_images: int | None = None,
) -> Path:
    """Write the embedded dataset ``name`` into ``root`` and return the manifest path.

    The dataset is built in a hidden sibling folder and renamed into place, under a lock file
    beside ``root``: a reader sees the old dataset or the new one, never half of one, and
    several processes asking at once build it once.

    Args:
        name: one of ``EMBEDDED`` (``"shapes"`` or ``"shapes-shift"``).
        root: the dataset's own folder, e.g. ``data/shapes``; created if missing. It must be
            missing, empty or an earlier feedtune dataset, which is replaced.
        seed: generator seed; the same seed gives byte-identical files.
        progress: show progress (a bar on a terminal, a line in a log).
        n_images: scale the dataset down (or up) to about this many images, keeping the class
            proportions; ``None`` = the full size (3000 for shapes, 600 for shapes-shift).

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names).
        DatasetFolderError: ``root`` holds files feedtune did not write (it names one).
    """
    items = _plan(name, seed, n_images)
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        return _generate_locked(name, root, seed, progress, n_images, items)


def _intact(root: Path, marker: dict, expected_manifest: bytes) -> bool:
    try:
        found = json.loads((root / MARKER_NAME).read_text())
        return found == marker and (root / MANIFEST_NAME).read_bytes() == expected_manifest
    except (OSError, ValueError):
        return False


def ensure_dataset(
    name: str,
    root: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    n_images: int | None = None,
) -> Path:
    """Make sure ``root`` holds the complete dataset; return the manifest path.

    Idempotent: a complete dataset with the same parameters is left untouched (no file is
    rewritten, no lock taken). Missing images of an otherwise complete dataset are re-rendered
    alone (byte-identical to the originals); a missing or different marker (other seed, size
    or generator version) or a changed manifest means a full rebuild, as ``generate_dataset``.
    Arguments and errors as for ``generate_dataset``.
    """
    items = _plan(name, seed, n_images)
    root = Path(root).absolute()
    expected = _manifest_bytes(items)
    marker = _marker(name, seed, n_images, items, hashlib.sha256(expected).hexdigest())
    if _intact(root, marker, expected) and all(_nonempty(root / it.path) for it in items):
        return root / MANIFEST_NAME
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):  # checked again: another process may have built it while we waited
        if not _intact(root, marker, expected):
            return _generate_locked(name, root, seed, progress, n_images, items)
        missing = [it for it in items if not _nonempty(root / it.path)]
        if missing:
            _write_images(seed, root, missing, progress, f"{name} (repair)")
    return root / MANIFEST_NAME


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False
