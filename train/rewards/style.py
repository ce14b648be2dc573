"""Style similarity: SigLIP embedding of the generated masked region vs the reference (SPEC §10).

Both images are padded to a square with zeros after an aspect-preserving resize, like the
style image Calligrapher feeds SigLIP (SPEC §3). Score = (cos + 1) / 2. Resizing uses
OpenCV and normalisation one batched tensor op (the per-image processor costs more than the
tiny-model forward), and identical images within a batch (a group's shared reference) are
embedded once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import ItemScore, RewardItem, Scorer, mask_region

if TYPE_CHECKING:
    import torch


def pad_to_square(image, size: int) -> np.ndarray:
    """PIL image -> ``size`` x ``size`` x 3 uint8: aspect-preserving resize of the long side to
    ``size`` (area averaging down, bicubic up), centred on zeros."""
    import cv2

    arr = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    h, w = arr.shape[:2]
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = arr
    return out


class StyleScorer(Scorer):
    """``(cos(SigLIP(crop of image under mask), SigLIP(reference)) + 1) / 2``.

    Args:
        siglip_path: a folder loadable by ``SiglipVisionModel.from_pretrained``.
        device: torch device for the forward pass.
        batch_size: images per forward.
    """

    name = "style"
    requires = ("reference",)

    def __init__(self, siglip_path, device: str = "cpu", batch_size: int = 64, dtype=None):
        import torch
        from transformers import SiglipVisionModel

        self.device, self.batch_size = str(device), batch_size
        self.model = SiglipVisionModel.from_pretrained(siglip_path, dtype=dtype or torch.float32)
        self.model.to(device).eval().requires_grad_(False)
        pre = Path(siglip_path) / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.exists() else {}
        size = cfg.get("size", {}).get("height", self.model.config.image_size)
        self.size = int(size)
        mean = torch.tensor(cfg.get("image_mean", [0.5] * 3), dtype=torch.float32)
        std = torch.tensor(cfg.get("image_std", [0.5] * 3), dtype=torch.float32)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std  # per channel, channels-last

    def embed(self, images) -> "torch.Tensor":
        """PIL images -> L2-normalised pooled embeddings ``[N, E]`` (float32, CPU)."""
        return self._embed_arrays(np.stack([pad_to_square(im, self.size) for im in images]))

    def _embed_arrays(self, arrays: np.ndarray) -> "torch.Tensor":
        import torch

        # uint8 -> (x / 255 - mean) / std in one multiply-add
        pixels = torch.from_numpy(arrays).float().mul_(self._scale).add_(self._shift).permute(0, 3, 1, 2)
        outs = []
        with torch.inference_mode():
            for chunk in pixels.split(self.batch_size):
                chunk = chunk.to(self.device, self.model.dtype)
                outs.append(self.model(pixel_values=chunk).pooler_output.float().cpu())
        return torch.nn.functional.normalize(torch.cat(outs), dim=-1)

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        results: list[ItemScore | None] = [None] * len(items)
        unique: dict[bytes, int] = {}
        arrays, pairs = [], []

        def slot(im) -> int:
            arr = pad_to_square(im, self.size)
            key = hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
            if key not in unique:
                unique[key] = len(arrays)
                arrays.append(arr)
            return unique[key]

        for i, item in enumerate(items):
            try:
                _, box = mask_region(item)
            except ValueError as exc:
                results[i] = ItemScore.fail(f"style: {exc}")
                continue
            pairs.append((i, slot(item.image.crop(box)), slot(item.reference)))
        if pairs:
            emb = self._embed_arrays(np.stack(arrays))
            for i, a, b in pairs:
                cos = float((emb[a] * emb[b]).sum())
                results[i] = ItemScore.ok((cos + 1.0) / 2.0, cosine=round(cos, 6))
        return results  # type: ignore[return-value]
