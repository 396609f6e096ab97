"""The shapes of the embedded datasets, as polygons: each class's geometry with a group's own
proportions.

Every primitive is a list of polygons in object coordinates (radius ~1, centred at 0) with a
value: 1 = paint, 0 = cut a hole. Circles are polygons too, so aspect and rotation apply to
all shapes the same way."""

from __future__ import annotations

import numpy as np

_Poly = np.ndarray  # (n, 2) float vertices
Part = tuple[_Poly, int]


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


def shape_parts(label: str, g: np.random.Generator) -> list[Part]:
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
