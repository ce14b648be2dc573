"""Background preservation: how unchanged the pixels outside the mask are (SPEC §10).

Score = 1 - mean |generated - source| / 255 over RGB pixels outside the mask, so an
untouched background scores exactly 1 and an inverted one about 0.
"""

from __future__ import annotations

import cv2
import numpy as np

from train.data.image_modes import to_rgb

from .base import ItemScore, RewardItem, Scorer, mask_region


class BackgroundScorer(Scorer):
    """``1 - MAE/255`` outside the mask. Needs ``source`` and ``mask`` of the image's size."""

    name = "background"
    requires = ("source", "mask")

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        out = []
        for item in items:
            try:
                inside, _ = mask_region(item)
            except ValueError as exc:
                out.append(ItemScore.fail(f"background: {exc}"))
                continue
            if item.source.size != item.image.size:
                out.append(ItemScore.fail(f"background: source is {item.source.size[0]}x{item.source.size[1]} "
                                          f"but image is {item.image.size[0]}x{item.image.size[1]}"))
                continue
            outside = ~inside
            n = int(outside.sum())
            if n == 0:
                out.append(ItemScore.fail("background: mask covers the whole image; nothing to compare"))
                continue
            diff = cv2.absdiff(np.asarray(to_rgb(item.image)), np.asarray(to_rgb(item.source)))
            mae = float(np.mean(cv2.mean(diff, mask=outside.view(np.uint8))[:3])) / 255.0
            out.append(ItemScore.ok(1.0 - mae, mae=round(mae, 6), pixels=n))
        return out
