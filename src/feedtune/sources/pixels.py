"""From a decoded Pillow image (or JPEG bytes, with OpenCV) to a ``(H, W, 3) uint8`` RGB
array: colour modes, alpha on white, 16-bit scaling. ``imageio`` decides which path a file takes."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in _16BIT_MODES:
        # 16-bit grayscale: scale 0..65535 to 0..255 with rounding (Pillow's convert clips).
        wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = (
        mode in _ALPHA_MODES
        or "transparency" in im.info
        or (mode == "P" and im.palette is not None and im.palette.mode == "RGBA")
    )
    if not has_alpha:
        return np.asarray(im.convert("RGB"))  # L, 1, P, CMYK (Adobe inversion handled), ...
    rgba = np.asarray(im.convert("RGBA"))
    # Composite on white: out = rgb * a + 255 * (1 - a), in integers (max 65025 fits uint16).
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


_cv2: Any = None


def decode_opencv(data: bytes, scale: int) -> np.ndarray | None:
    global _cv2
    if _cv2 is None:
        import cv2  # lazily: a slow import that the pil backend does not need

        _cv2 = cv2
    cv2 = _cv2
    reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}
    reduced |= {4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    # Orientation is applied by _orient for both backends, so OpenCV must not apply it too.
    flags = reduced[scale] | cv2.IMREAD_IGNORE_ORIENTATION
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10: no BGR->RGB pass
    if rgb_flag is not None:
        flags = (flags & ~cv2.IMREAD_COLOR) | rgb_flag
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if out is None or rgb_flag is not None:
        return out
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
