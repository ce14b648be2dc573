"""Reward scorers (OCR, style, background, VLM judge, contrast) and their shared types (docs/ARCHITECTURE.md §10).

Heavy dependencies (rapidocr, torch/transformers, httpx) load only with the scorer that needs them.
"""

from .base import (
    API_VERSION,
    SCORER_NAMES,
    ItemScore,
    RewardItem,
    RewardResult,
    Scorer,
    combine_item,
    parse_reward_weights,
    score_items,
    weighted_reward,
)
from .registry import build_scorers
from .codec import ImageDecodeError, ImageTooLargeError, decode_png_b64, encode_png_b64

__all__ = [
    "API_VERSION", "SCORER_NAMES", "ItemScore", "RewardItem", "RewardResult", "Scorer", "build_scorers",
    "combine_item", "parse_reward_weights", "score_items", "weighted_reward", "ImageDecodeError",
    "ImageTooLargeError", "decode_png_b64", "encode_png_b64", "OCRScorer", "StyleScorer",
    "BackgroundScorer", "VLMScorer", "ContrastScorer", "text_accuracy",
]

_LAZY = {"OCRScorer": ".ocr", "text_accuracy": ".ocr", "StyleScorer": ".style",
         "BackgroundScorer": ".background", "VLMScorer": ".vlm", "ContrastScorer": ".contrast"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
