"""Shared reward types: items, results, the scorer interface and weighted totals (docs/ARCHITECTURE.md §10).

A scorer maps each item to a score in [0, 1] plus details, or to a per-item error. A
reward that could not be computed stays ``None`` with its error: it is never replaced by
a number, so the caller's failure policy can decide what to do with it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# The reward service's protocol: a client refuses a server whose /health reports another version.
API_VERSION = "2"
SCORER_NAMES = ("ocr", "style", "background", "vlm", "contrast")
# Optional RewardItem images each scorer reads (besides ``image`` and ``text``); clients send only these.
SCORER_INPUTS = {"ocr": ("mask",), "style": ("mask", "reference"), "background": ("mask", "source"),
                 "vlm": ("mask", "reference"), "contrast": ("mask",)}
# Scorers that read only the mask's bounding box plus at most CROP_MARGIN pixels around it: a
# client may send image and mask cropped to that window and get identical scores.
CROP_ONLY_SCORERS = ("ocr", "style", "contrast")
CROP_MARGIN = 8

log = logging.getLogger(__name__)
# An absolute file path (two or more components, not inside a word or URL authority).
_PATH = re.compile(r"(?<![\w.:/\\])(?:[\\/][\w.+@~-]+){2,}[\\/]?")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line for an error reply: whitespace collapsed, absolute file paths cut to
    their last component, at most ``limit`` characters."""
    text = _PATH.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1], str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line; an empty message is taken from the exception's cause."""
    msg, cur = "", exc
    while cur is not None and not msg:
        msg = str(cur).strip()
        cur = cur.__cause__ or cur.__context__
    if "Traceback (most recent call last)" in msg:  # a wrapped traceback: its last line says what failed
        msg = msg.splitlines()[-1].strip()
    return one_line(f"{type(exc).__name__}: {msg or 'no message'}")


@dataclass
class RewardItem:
    """One generated image to score. ``mask`` is white (> MASK_THRESHOLD) where text was painted."""

    id: str
    image: "Image.Image"
    text: str
    mask: "Image.Image | None" = None
    reference: "Image.Image | None" = None
    source: "Image.Image | None" = None


@dataclass
class RewardResult:
    """Per-item outcome. ``reward`` is ``None`` exactly when ``error`` is set."""

    id: str
    reward: float | None
    scores: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.reward is not None


@dataclass
class ItemScore:
    """One scorer's verdict on one item: a score in [0, 1] or an error, never both."""

    score: float | None
    details: dict = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def ok(cls, score: float, **details) -> "ItemScore":
        """A score, clipped to [0, 1] against rounding; a NaN/inf becomes an error, not a number."""
        score = float(score)
        if not math.isfinite(score):
            return cls(None, details, f"non-finite score {score}")
        return cls(min(1.0, max(0.0, score)), details, None)

    @classmethod
    def fail(cls, error: str, **details) -> "ItemScore":
        return cls(None, details, error)


class Scorer:
    """Base class: subclasses set ``name``, ``requires`` and implement ``_score_batch``.

    ``score_batch`` checks the fields each item needs, scores the rest in one call, and if
    that batched call raises, scores items one by one so a single bad item cannot take the
    others down with it.
    """

    name: str = ""
    requires: tuple[str, ...] = ()
    device: str = "cpu"

    @property
    def identity(self) -> str:
        """What decides this scorer's scores (model, weights, settings), as ``/health`` reports it: servers
        that disagree on it would give different rewards for the same image."""
        return type(self).__name__

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        raise NotImplementedError

    def score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        out: list[ItemScore | None] = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            missing = [f for f in self.requires if getattr(item, f) is None]
            if missing:
                out[i] = ItemScore.fail(f"{self.name}: item needs {', '.join(missing)}")
            else:
                todo.append(i)
        if todo:
            for i, res in zip(todo, self._isolated([items[i] for i in todo])):
                out[i] = res
        return out  # type: ignore[return-value]

    def _isolated(self, items: list[RewardItem]) -> list[ItemScore]:
        try:
            res = self._score_batch(items)
            if len(res) != len(items):
                raise RuntimeError(f"{self.name}: scorer returned {len(res)} results for {len(items)} items")
            return res
        except Exception as exc:  # noqa: BLE001 - retried per item below, then reported per item
            if len(items) == 1:  # the traceback goes to the server's log, never into a reply
                log.warning("scorer %s failed on item %r", self.name, items[0].id, exc_info=True)
                return [ItemScore.fail(f"{self.name}: {describe_exception(exc)}")]
        return [self._isolated([it])[0] for it in items]


def parse_reward_weights(spec: str | dict) -> dict[str, float]:
    """``"ocr=0.7,style=0.2"`` -> ``{"ocr": 0.7, "style": 0.2}``; raises ``ValueError`` on bad input."""
    if isinstance(spec, dict):
        pairs = [(str(k), v) for k, v in spec.items()]
    else:
        if not spec or not spec.strip():
            raise ValueError("reward weights are empty; expected e.g. 'ocr=0.7,style=0.2,background=0.1'")
        pairs = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"reward weight {part!r} is not of the form name=number")
            name, value = (s.strip() for s in part.split("=", 1))
            pairs.append((name, value))
    weights: dict[str, float] = {}
    for name, value in pairs:
        if name not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {name!r} in reward weights; known: {', '.join(SCORER_NAMES)}")
        if name in weights:
            raise ValueError(f"scorer {name!r} appears twice in reward weights")
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward weight for {name!r} is not a number: {value!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"reward weight for {name!r} must be a finite number >= 0, got {value!r}")
        weights[name] = w
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("reward weights must name at least one scorer with a positive weight")
    return weights


def weighted_reward(scores: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted sum of per-scorer scores (zero weights ignored); ``KeyError`` if one is missing."""
    used = {n: w for n, w in weights.items() if w != 0}
    missing = [n for n in used if n not in scores]
    if missing:
        raise KeyError(f"missing score(s) for {', '.join(missing)}")
    return float(sum(w * scores[n] for n, w in used.items()))


def score_items(scorers: dict[str, "Scorer"], items: list[RewardItem],
                weights: dict[str, float]) -> list[RewardResult]:
    """Run every scorer on the whole batch and combine per item with ``weights``.

    An item whose weighted scorers do not all succeed gets ``reward=None`` and an error
    naming the scorer(s); the scores that did compute are still reported.
    """
    missing = [n for n, w in weights.items() if w != 0 and n not in scorers]
    if missing:
        raise KeyError(f"no scorer loaded for {', '.join(missing)}")
    per_scorer = {name: scorers[name].score_batch(items) for name in scorers}
    return [combine_item(item.id, {n: per_scorer[n][i] for n in per_scorer}, weights)
            for i, item in enumerate(items)]


def combine_item(item_id: str, verdicts: dict[str, ItemScore], weights: dict[str, float]) -> RewardResult:
    """Merge per-scorer verdicts for one item into a ``RewardResult``.

    Only scorers with a non-zero weight can fail the item; errors of the others are kept
    in ``details[name]["error"]``.
    """
    scores = {n: v.score for n, v in verdicts.items() if v.error is None and v.score is not None}
    details = {n: dict(v.details) for n, v in verdicts.items() if v.details}
    errors = []
    for n, v in verdicts.items():
        if v.error is None and v.score is not None:
            continue
        if weights.get(n, 0) != 0:
            errors.append(v.error or f"{n}: no score")
        else:
            details.setdefault(n, {})["error"] = v.error or "no score"
    errors += [f"{n}: not computed" for n, w in weights.items() if w != 0 and n not in verdicts]
    if errors:
        return RewardResult(item_id, None, scores, details, "; ".join(errors))
    return RewardResult(item_id, weighted_reward(scores, weights), scores, details, None)


def crop_window(item: RewardItem, margin: int = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The mask's bounding box grown by ``margin`` and clipped to the image."""
    _, (x0, y0, x1, y1) = mask_region(item)
    w, h = item.image.size
    return max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)


def mask_region(item: RewardItem) -> "tuple[object, tuple[int, int, int, int]]":
    """``(bool array HxW, bbox)`` of the item's mask (pixels above ``MASK_THRESHOLD``, the
    threshold training uses); the whole image when there is no mask.

    Raises ``ValueError`` when the mask size differs from the image or the mask is empty.
    """
    import numpy as np

    from train.data.image_modes import to_luminance
    from train.data.image_modes import MASK_THRESHOLD

    w, h = item.image.size
    if item.mask is None:
        return np.ones((h, w), dtype=bool), (0, 0, w, h)
    if item.mask.size != item.image.size:
        raise ValueError(f"mask is {item.mask.size[0]}x{item.mask.size[1]} but image is {w}x{h}")
    mask = to_luminance(item.mask)
    inside = np.asarray(mask) > MASK_THRESHOLD
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if len(rows) == 0:
        raise ValueError("mask is empty")
    return inside, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
