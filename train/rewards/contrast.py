"""Luminance contrast inside the mask (docs/ARCHITECTURE.md §2 scorer ``contrast``).

L = (0.299 R + 0.587 G + 0.114 B) / 255 (ITU-R BT.601) over the pixels whose mask value is
above ``MASK_THRESHOLD``; score = 2 * std(L) (population std). Values in [0, 1] have a std of
at most 0.5, reached by half black / half white, so the score lies in [0, 1] exactly: 1 for
that case, 0 for a uniform region. Only the mask's bounding box is read.
"""

from __future__ import annotations

import numpy as np

from train.data.image_modes import to_rgb

from .base import ItemScore, RewardItem, Scorer, mask_region

BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def luminance_std(rgb: np.ndarray, inside: np.ndarray) -> float:
    """Population std of BT.601 luminance in [0, 1] over ``rgb[inside]``; ``rgb`` is ``[H, W, 3]`` uint8."""
    lum = rgb[inside].astype(np.float64) @ BT601 / 255.0
    return float(lum.std())


class ContrastScorer(Scorer):
    """``2 * std(luminance)`` of the pixels under the mask. Needs ``mask`` of the image's size."""

    name = "contrast"
    requires = ("mask",)

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        out = []
        for item in items:
            try:
                inside, (x0, y0, x1, y1) = mask_region(item)
            except ValueError as exc:
                out.append(ItemScore.fail(f"contrast: {exc}"))
                continue
            rgb = np.asarray(to_rgb(item.image.crop((x0, y0, x1, y1))))
            std = luminance_std(rgb, inside[y0:y1, x0:x1])
            out.append(ItemScore.ok(2.0 * std, std=std))
        return out
