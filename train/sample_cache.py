"""Per-sample caches of what the frozen encoders compute from a training sample's pixels.

The pooled SigLIP embedding of the style image and the two VAE encodes of a supervised step (the
source, and the masked source in the FLUX-Fill conditioning) are deterministic functions of the
sample's pixels: SigLIP has no randomness and the VAE posterior is replaced by its mean. So each
is computed once per sample and looked up afterwards. Every sample is encoded alone: a batched
kernel rounds differently with different neighbours, and a resumed or re-sharded run has to see
exactly the values an uninterrupted one saw. Entries are keyed by the pixels' content, not a
record id (ids are unique within one dataset only; the held-out set may reuse them).

Sizes, per sample, in the base model's dtype: the style embedding ``E`` values (kept on the
device); the latents ``2 x L x 64`` values kept in host memory and copied to the device per step
(at 512² with a 128 px strip in bf16, 320 KiB; see ``python -m train.plan``).
"""

from __future__ import annotations

import hashlib

import torch

from .rewards.codec import content_key as image_key  # PIL images: mode, size and pixels


def content_key(*tensors: torch.Tensor) -> str:
    """A digest of the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def latent_bytes_per_sample(height: int, width: int, vae_config, element_size: int) -> int:
    """Host bytes one sample's cached latents take: source and masked source, ``latent_channels`` x
    ``(height / f) x (width / f)`` values each, ``f`` the VAE's downsampling factor."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return 2 * vae_config["latent_channels"] * (height // factor) * (width // factor) * element_size


def available_host_bytes() -> int:
    """Memory the OS reports available (``MemAvailable``), or the free physical pages where that is unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class EncoderCache:
    """Style embeddings (always cached) and, with ``latents=True``, the VAE latents of each sample."""

    def __init__(self, model, latents: bool = True):
        self.model, self.latents_on = model, latents
        self.styles: dict[str, torch.Tensor] = {}
        self.clean: dict[str, torch.Tensor] = {}
        self.masked: dict[str, torch.Tensor] = {}

    def style(self, images) -> torch.Tensor:
        """Pooled SigLIP embeddings ``[B, E]`` of PIL style images (already padded to square)."""
        keys = [image_key(image) for image in images]
        for image, key in zip(images, keys):
            if key not in self.styles:
                self.styles[key] = self.model.encode_style([image])[0].detach()
        return torch.stack([self.styles[key] for key in keys])

    def clean_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Packed normalised latents ``[B, L, 64]`` of sources ``[B, 3, H, W]`` (the flow-matching ``x0``)."""
        model = self.model
        if not self.latents_on:
            return model.encode_latents(pixels)
        return self._lookup(self.clean, [(pixels[i],) for i in range(len(pixels))],
                            lambda i: model.encode_latents(pixels[i:i + 1])[0])

    def masked_latents(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
        """Raw VAE latents ``[B, C, h, w]`` of the masked sources, for ``prepare_condition(masked_latents=...)``;
        ``None`` with the cache off (the conditioning then encodes the batch itself)."""
        model = self.model
        if not self.latents_on:
            return None
        return self._lookup(self.masked, [(pixels[i], masks[i]) for i in range(len(pixels))],
                            lambda i: model.masked_image_latents(pixels[i:i + 1], masks[i:i + 1])[0])

    def _lookup(self, table: dict, contents: list[tuple], encode) -> torch.Tensor:
        keys = [content_key(*c) for c in contents]
        for i, key in enumerate(keys):
            if key not in table:
                table[key] = encode(i).to("cpu")
        return torch.stack([table[key] for key in keys]).to(self.model.device, non_blocking=True)

    def host_bytes(self) -> int:
        """Bytes of the cached latents (host memory)."""
        return sum(t.numel() * t.element_size() for table in (self.clean, self.masked) for t in table.values())
