"""Convert any PIL image to 8-bit RGB or luminance without losing its content.

``Image.convert("RGB")`` / ``convert("L")`` clip high-bit-depth samples instead of scaling them:
a 16-bit grayscale PNG (opened as ``I;16``) becomes almost all white. Every image the project
reads (training data, inference, evaluation, deployment checks, the reward server) goes through
:func:`to_rgb` or :func:`to_luminance`, which apply these rules:

* **16-bit** (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): ``v >> 8`` (the high byte). Pillow itself
  decodes 16-bit RGB / RGBA / gray+alpha PNGs to 8 bits by keeping the high byte, so a 16-bit gray
  file and a 16-bit colour file of the same picture give the same 8-bit pixels.
* **32-bit integer** (``I``): read as 16-bit samples (Pillow's container for 16-bit data),
  clipped to ``[0, 65535]``, then ``>> 8``.
* **Float** (``F``): read as ``[0, 1]`` (the floating-point image convention), clipped, then
  ``round(v * 255)``.
* **Transparency** (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB``/``I;16`` with a ``transparency``
  entry): composited on **black**, ``round(c * alpha / 255)``, the same black the style image is
  padded with. Premultiplied ``RGBa`` / ``La`` already are that composite: their colour bands are kept.
* **CMYK, YCbCr, HSV, LAB, 1, RGBX, P**: Pillow's own conversion to RGB (luminance is taken from
  that RGB: Pillow has no direct LAB -> L conversion).

Luminance is ITU-R 601-2 luma as in Pillow's ``convert("L")``
(``L = R·299/1000 + G·587/1000 + B·114/1000``), taken after compositing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MASK_THRESHOLD = 127  # mask pixel (0..255 luminance) > this means "paint here" (training, tools, rewards)

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PREMULTIPLIED = {"RGBa": "RGB", "La": "L"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit ``RGB`` (rules in the module docstring)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    gray = _high_depth_gray(img)
    if gray is not None:
        return Image.merge("RGB", (gray,) * 3)
    if img.mode in _PREMULTIPLIED:
        return Image.merge("RGB", img.split()[:3]) if img.mode == "RGBa" else Image.merge("RGB", (img.getchannel(0),) * 3)
    if _has_alpha(img):
        rgba = _to_rgba(img)
        arr = np.asarray(rgba)
        return Image.fromarray(_composite_black(arr[..., :3], arr[..., 3:]), mode="RGB")
    return img.convert("RGB")


def to_luminance(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit ``L`` (rules in the module docstring)."""
    if img.mode == "L" and "transparency" not in img.info:
        return img
    gray = _high_depth_gray(img)
    if gray is not None:
        return gray
    if img.mode == "La":
        return img.getchannel(0)
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("L", "LA"):
        la = np.asarray(img.convert("LA") if img.mode == "L" else img)
        return Image.fromarray(_composite_black(la[..., 0], la[..., 1]), mode="L")
    return to_rgb(img).convert("L")


# ---------------------------------------------------------------------- helpers
def _high_depth_gray(img: Image.Image) -> Image.Image | None:
    """``I;16*`` / ``I`` / ``F`` -> 8-bit ``L`` (transparency composited on black); None for other modes."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        raw = np.asarray(img).astype(np.int64)
        out = (np.clip(raw, 0, 65535) >> 8).astype(np.uint8)
        transparent = img.info.get("transparency")
        if isinstance(transparent, int):
            out[raw == transparent] = 0
        return Image.fromarray(out, mode="L")
    if img.mode == "F":
        raw = np.asarray(img, dtype=np.float64)
        raw = np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(np.round(np.clip(raw, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    return None


def _has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or "transparency" in img.info


def _to_rgba(img: Image.Image) -> Image.Image:
    """RGBA with the image's transparency applied (a 16-bit RGB tRNS colour is matched at 8 bits)."""
    transparent = img.info.get("transparency")
    if img.mode == "RGB" and isinstance(transparent, tuple) and max(transparent) > 255:
        # Pillow decodes 16-bit RGB PNGs to their high bytes but keeps the 16-bit tRNS colour,
        # which then never matches; compare at the precision the pixels have.
        img = img.copy()
        img.info["transparency"] = tuple(int(v) >> 8 for v in transparent)
    return img.convert("RGBA")


def _composite_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``round(colour * alpha / 255)`` in integers (uint8 in, uint8 out)."""
    c = colour.astype(np.uint32) * alpha.astype(np.uint32)
    return ((c + 127) // 255).astype(np.uint8)

