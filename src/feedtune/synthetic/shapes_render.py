"""Rendering one image of the embedded datasets: a shape with a fixed group identity (colour,
fill, proportions, pose, background) drawn with per-render jitter, as JPEG bytes.

Every random draw comes from ``numpy.random.default_rng([seed, dataset, class, group, ...])``,
so an image depends only on its own coordinates and is byte-identical for a given seed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from feedtune.synthetic.shapes import Part, shape_parts

MIN_SIDE, MAX_SIDE = 128, 400  # image width and height, each
MAX_ASPECT = 1.6  # longer side / shorter side at most: objects stay recognisable once squashed
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
class PlannedImage:
    """One image to render: its manifest row and the coordinates its random draws come from."""

    path: str
    label: str
    group: str
    dataset_index: int
    class_index: int
    group_index: int
    render_index: int


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

    parts: list[Part]
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
        parts=shape_parts(label, g),
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


def render(seed: int, item: PlannedImage) -> bytes:
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
