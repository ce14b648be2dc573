"""Background preservation: how unchanged the pixels outside the mask are (docs/ARCHITECTURE.md §10).

Score = 1 - mean |generated - source| / 255 over RGB pixels outside the mask, so an
untouched background scores exactly 1 and an inverted one about 0.
"""

from __future__ import annotations

import cv2
import numpy as np

from train.data.image_modes import to_rgb

from .base import ItemScore, RewardItem, Scorer, mask_region


class BackgroundScorer(Scorer):
    """``1 - MAE/255`` outside the mask. Needs ``source`` and ``mask`` of the image's size.

    A mask or source that several items of a batch share (the same image object: the reward
    server hands a group's items one decoded copy) is thresholded or converted once.
    """

    name = "background"
    requires = ("source", "mask")

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        outsides: dict[tuple, tuple[np.ndarray, int] | str] = {}  # (mask, image size) -> (outside, count) or error
        sources: dict[int, np.ndarray] = {}  # id(source) -> RGB pixels; the items keep the objects alive
        out = []
        for item in items:
            key = (id(item.mask), item.image.size)
            if key not in outsides:
                outsides[key] = self._outside(item)
            region = outsides[key]
            if isinstance(region, str):
                out.append(ItemScore.fail(region))
                continue
            if item.source.size != item.image.size:
                out.append(ItemScore.fail(f"background: source is {item.source.size[0]}x{item.source.size[1]} "
                                          f"but image is {item.image.size[0]}x{item.image.size[1]}"))
                continue
            outside, n = region
            if id(item.source) not in sources:
                sources[id(item.source)] = np.asarray(to_rgb(item.source))
            diff = cv2.absdiff(np.asarray(to_rgb(item.image)), sources[id(item.source)])
            mae = float(np.mean(cv2.mean(diff, mask=outside)[:3])) / 255.0
            out.append(ItemScore.ok(1.0 - mae, mae=round(mae, 6), pixels=n))
        return out

    @staticmethod
    def _outside(item: RewardItem) -> tuple[np.ndarray, int] | str:
        """``(uint8 mask of the pixels outside the item's mask, their count)``, or the item's error."""
        try:
            inside, _ = mask_region(item)
        except ValueError as exc:
            return f"background: {exc}"
        outside = ~inside
        n = int(outside.sum())
        if n == 0:
            return "background: mask covers the whole image; nothing to compare"
        return outside.view(np.uint8), n
