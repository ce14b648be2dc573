"""OCR text accuracy on the masked region (docs/ARCHITECTURE.md §10), Latin and Chinese, offline.

Recognition uses rapidocr's bundled PP-OCR ONNX weights. Fast path: one batched
recognition call over the crops of all items' mask boxes. Recognition alone misreads text
that fills only a small part of a loose mask, so in ``detect="auto"`` mode crops read with
low confidence go through text detection + recognition (per crop, slower) as well.
"""

from __future__ import annotations

import threading
import unicodedata

import numpy as np

from train.data.image_modes import to_rgb

from .base import CROP_MARGIN, ItemScore, RewardItem, Scorer, mask_region


def normalize_text(text: str) -> str:
    """NFKC (full-width forms -> ASCII), drop all whitespace, case-fold (affects Latin only)."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if not ch.isspace()).casefold()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_accuracy(recognised: str, target: str) -> float:
    """docs/ARCHITECTURE.md §10: ``1 - min(edit distance, len(target)) / len(target)`` on normalised text.

    1.0 when the normalised target is contained in the normalised recognised text.
    Raises ``ValueError`` for a target that is empty after normalisation.
    """
    t, r = normalize_text(target), normalize_text(recognised)
    if not t:
        raise ValueError(f"target text {target!r} is empty after normalisation")
    if t in r:
        return 1.0
    return 1.0 - min(edit_distance(r, t), len(t)) / len(t)


# The detector scales the long side to 960 and rounds sides to multiples of 32: beyond this
# aspect ratio the short side rounds to 0 (rapidocr raises ResizeImgError).
MAX_DET_ASPECT = 40
# Recognition scales crops to 48 px high and pads a batch to its widest crop: a 20000x1 crop
# would become 960000 px wide (tens of GB). Wider crops are padded to this width:height.
MAX_REC_ASPECT = 64


def _bounded_aspect(crop: np.ndarray) -> np.ndarray:
    """``crop`` padded above and below with its median colour to at most ``MAX_REC_ASPECT``:1."""
    h, w = crop.shape[:2]
    if w <= MAX_REC_ASPECT * h:
        return crop
    import cv2

    extra = -(-w // MAX_REC_ASPECT) - h
    colour = [float(c) for c in np.median(crop.reshape(-1, crop.shape[2]), axis=0)]
    return cv2.copyMakeBorder(crop, extra // 2, extra - extra // 2, 0, 0, cv2.BORDER_CONSTANT, value=colour)


class OCRScorer(Scorer):
    """Score = ``text_accuracy(recognised text in the mask box, item.text)``.

    Args:
        detect: ``"auto"`` (detect only where fast recognition is unsure), ``"never"``, ``"always"``.
        min_confidence: readings below this recognition confidence count as no text.
        confident: fast-path confidence at or above which ``"auto"`` skips detection.
        pad: pixels of context added around the mask box.
        batch_size: crops per recognition call.
    """

    name = "ocr"

    def __init__(self, detect: str = "auto", min_confidence: float = 0.5, confident: float = 0.9,
                 pad: int = 4, batch_size: int = 64):
        if detect not in ("auto", "never", "always"):
            raise ValueError(f"detect must be auto, never or always, got {detect!r}")
        if not 0 <= pad <= CROP_MARGIN:  # clients may send only the mask box + CROP_MARGIN
            raise ValueError(f"pad must be in [0, {CROP_MARGIN}], got {pad}")
        from rapidocr import RapidOCR

        self.detect, self.min_confidence, self.confident, self.pad = detect, min_confidence, confident, pad
        quiet = {"Global.log_level": "error"}
        self._rec_engine = RapidOCR(params={**quiet, "Global.use_det": False, "Global.use_cls": False,
                                            "Rec.rec_batch_num": batch_size})
        # "max" keeps small crops small; the default ("min", 736) upscales every crop and is ~5x slower.
        self._det_engine = RapidOCR(params={**quiet, "Global.use_cls": False, "Det.limit_type": "max",
                                            "Det.limit_side_len": 960})
        self._lock = threading.Lock()  # rapidocr engines keep per-call state

    @property
    def identity(self) -> str:
        from importlib.metadata import version

        return (f"rapidocr {version('rapidocr')} (detect={self.detect}, min_confidence={self.min_confidence:g}, "
                f"confident={self.confident:g}, pad={self.pad})")

    def _crop(self, item: RewardItem) -> np.ndarray:
        _, (x0, y0, x1, y1) = mask_region(item)
        w, h = item.image.size
        box = (max(0, x0 - self.pad), max(0, y0 - self.pad), min(w, x1 + self.pad), min(h, y1 + self.pad))
        return _bounded_aspect(np.ascontiguousarray(np.asarray(to_rgb(item.image.crop(box)))[:, :, ::-1]))  # BGR

    def _recognise(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        from rapidocr.ch_ppocr_rec import TextRecInput

        out = self._rec_engine._load_rec_model()(TextRecInput(img=crops))
        return [(str(t), float(s)) for t, s in zip(out.txts, out.scores)]

    def _detect_and_recognise(self, crop: np.ndarray) -> tuple[str, float]:
        import cv2

        m = max(8, min(crop.shape[:2]) // 4)  # detection needs a margin around the text
        padded = cv2.copyMakeBorder(crop, m, m, m, m, cv2.BORDER_REPLICATE)
        h, w = padded.shape[:2]
        if max(h, w) > MAX_DET_ASPECT * min(h, w):
            return "", 0.0  # the detector would shrink the short side to nothing: recognition alone decides
        out = self._det_engine(padded)
        if out.txts is None or len(out.txts) == 0:
            return "", 0.0
        # Reading order: lines top to bottom, then left to right.
        order = sorted(range(len(out.txts)), key=lambda i: (float(out.boxes[i][:, 1].mean()) // max(1, crop.shape[0] // 8),
                                                            float(out.boxes[i][:, 0].min())))
        lines = [(out.txts[i], float(out.scores[i])) for i in order if float(out.scores[i]) >= self.min_confidence]
        if not lines:
            return "", 0.0
        return "".join(t for t, _ in lines), float(np.mean([s for _, s in lines]))

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        results: list[ItemScore | None] = [None] * len(items)
        todo, crops = [], []
        for i, item in enumerate(items):
            try:
                if not normalize_text(item.text):
                    raise ValueError(f"target text {item.text!r} is empty")
                crops.append(self._crop(item))
                todo.append(i)
            except ValueError as exc:
                results[i] = ItemScore.fail(f"ocr: {exc}")
        with self._lock:
            readings = self._recognise(crops) if crops and self.detect != "always" else [("", 0.0)] * len(crops)
            for i, crop, (text, conf) in zip(todo, crops, readings):
                engine = "rec"
                if self.detect == "always" or (self.detect == "auto" and conf < self.confident):
                    d_text, d_conf = self._detect_and_recognise(crop)
                    if d_text and d_conf >= conf:
                        text, conf, engine = d_text, d_conf, "det+rec"
                read = text if conf >= self.min_confidence else ""
                results[i] = ItemScore.ok(text_accuracy(read, items[i].text), recognised=read,
                                          raw_text=text, confidence=round(conf, 5), engine=engine)
        return results  # type: ignore[return-value]
