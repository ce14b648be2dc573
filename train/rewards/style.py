"""Style similarity: SigLIP embedding of the generated masked region vs the reference (SPEC §10).

Both images go through exactly what the model does to its style reference (SPEC §3):
``train.data.preprocess.style_image`` (aspect-preserving resize into a 512 square, centred on
black), then the SigLIP image processor's resize (PIL bicubic to the model's input size) and
normalisation, so the reward judges the style the way the model sees it. Score = (cos + 1) / 2.
Normalisation is one batched tensor op (the per-image processor costs more than the tiny-model
forward), and identical images within a batch (a group's shared reference) are embedded once.
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


def style_pixels(image, size: int) -> np.ndarray:
    """PIL image -> ``size`` x ``size`` x 3 uint8: the model's style image (``preprocess.style_image``)
    resized as the SigLIP image processor resizes it (PIL bicubic)."""
    from PIL import Image

    from train.data.preprocess import style_image

    return np.asarray(style_image(image).resize((size, size), Image.BICUBIC))


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
        return self._embed_arrays(np.stack([style_pixels(im, self.size) for im in images]))

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
            arr = style_pixels(im, self.size)
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
