"""Style similarity: SigLIP embedding of the generated masked region vs the reference (docs/ARCHITECTURE.md §10).

Both images go through exactly what the model does to its style reference (docs/ARCHITECTURE.md §3):
``train.data.preprocess.style_image`` (aspect-preserving resize into a 512 square, centred on
black), then the SigLIP image processor's resize (PIL bicubic to the model's input size) and
normalisation, so the reward judges the style the way the model sees it. Score = (cos + 1) / 2.

Cost, per image: the bicubic resize runs as its two separable passes with the horizontal one
over only the rows that hold the image (the black padding's rows resize to black), bit for bit
PIL's single call. Normalisation is one batched tensor op (the per-image processor costs more
than the tiny-model forward), one forward embeds the whole batch, identical images within a batch
are embedded once, and reference embeddings are kept by content in a bounded LRU: the k images of
a group, and every later epoch, share their reference's. A batch's images are preprocessed on a
few threads (PIL resizes without holding the GIL).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import ItemScore, RewardItem, Scorer, mask_region
from .codec import LRU, content_key

if TYPE_CHECKING:
    import torch


def style_pixels(image, size: int) -> np.ndarray:
    """PIL image -> ``size`` x ``size`` x 3 uint8: the model's style image (``preprocess.style_image``)
    resized as the SigLIP image processor resizes it (PIL bicubic).

    Equal to ``np.asarray(style_image(image).resize((size, size), Image.BICUBIC))``: PIL resizes 8-bit
    images horizontally, rounds to 8 bits, then vertically, so two one-axis calls give the same
    pixels, and a row of black pixels resizes horizontally to black, so only the rows that hold
    the image need the horizontal pass.
    """
    from PIL import Image

    from train.data.preprocess import style_image

    canvas = style_image(image)
    bbox = canvas.getbbox()  # columns and rows with a non-black pixel
    if bbox is None:
        return np.zeros((size, size, 3), dtype=np.uint8)
    top, bottom = bbox[1], bbox[3]
    rows = canvas.crop((0, top, canvas.width, bottom)).resize((size, bottom - top), Image.BICUBIC)
    tall = Image.new("RGB", (size, canvas.height))
    tall.paste(rows, (0, top))
    return np.asarray(tall.resize((size, size), Image.BICUBIC))


class StyleScorer(Scorer):
    """``(cos(SigLIP(crop of image under mask), SigLIP(reference)) + 1) / 2``.

    Args:
        siglip_path: a folder loadable by ``SiglipVisionModel.from_pretrained``.
        device: torch device for the forward pass.
        batch_size: images per forward.
        reference_cache: reference embeddings kept (LRU, keyed by the reference's pixels;
            ``E`` floats each); 0 turns the cache off.
        threads: threads that preprocess a batch's images (default: the CPU count, at most 4).
    """

    name = "style"
    requires = ("reference",)

    def __init__(self, siglip_path, device: str = "cpu", batch_size: int = 64, dtype=None,
                 reference_cache: int = 4096, threads: int | None = None):
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
        if reference_cache < 0:
            raise ValueError(f"reference_cache must be >= 0, got {reference_cache}")
        self.references = LRU(reference_cache)  # content_key(reference) -> embedding [E]; each counts 1
        self.embedded = 0  # images through SigLIP so far (for tests and logs)
        self.threads = threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="style-pixels") if self.threads > 1 else None
        self._folder = Path(siglip_path).name

    @cached_property
    def identity(self) -> str:
        """``SigLIP <folder> <digest>``: the digest covers the loaded weights (values and dtype) and the
        preprocessing, so two servers agree on it exactly when they embed alike."""
        import torch

        digest = hashlib.blake2b(repr((self.size, self._scale.tolist(), self._shift.tolist())).encode(), digest_size=8)
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return f"SigLIP {self._folder} {digest.hexdigest()}"

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
        self.embedded += len(arrays)
        return torch.nn.functional.normalize(torch.cat(outs), dim=-1)

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        results: list[ItemScore | None] = [None] * len(items)
        images, pairs = [], []  # images to preprocess; (item, row of its crop in `images`, reference key)
        refs: dict[bytes, object] = {}  # reference content -> cached embedding, or its row in `images`
        ref_keys: dict[int, bytes] = {}  # id(reference) -> content key (items may share the object)
        for i, item in enumerate(items):
            try:
                _, box = mask_region(item)
            except ValueError as exc:
                results[i] = ItemScore.fail(f"style: {exc}")
                continue
            crop = len(images)
            images.append(item.image.crop(box))
            rid = id(item.reference)
            key = ref_keys.get(rid) or ref_keys.setdefault(rid, content_key(item.reference))
            if key not in refs:
                cached = self.references.get(key)
                refs[key] = cached if cached is not None else len(images)
                if cached is None:
                    images.append(item.reference)
            pairs.append((i, crop, key))
        if not pairs:
            return results  # type: ignore[return-value]
        # identical style images (a crop equal to its reference) go through SigLIP once
        rows, unique, stack = [], {}, []
        for arr in self._pixels(images):
            digest = hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
            if digest not in unique:
                unique[digest] = len(stack)
                stack.append(arr)
            rows.append(unique[digest])
        emb = self._embed_arrays(np.stack(stack))
        for key, ref in refs.items():
            if isinstance(ref, int):
                refs[key] = emb[rows[ref]].clone()
                self.references.put(key, refs[key], 1)
        for i, crop, key in pairs:
            cos = float((emb[rows[crop]] * refs[key]).sum())
            results[i] = ItemScore.ok((cos + 1.0) / 2.0, cosine=round(cos, 6))
        return results  # type: ignore[return-value]

    def _pixels(self, images: list) -> list[np.ndarray]:
        """``style_pixels`` of each image, on ``threads`` threads (PIL resizes without the GIL)."""
        if self._pool is None or len(images) < 2:
            return [style_pixels(im, self.size) for im in images]
        return list(self._pool.map(style_pixels, images, [self.size] * len(images)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
