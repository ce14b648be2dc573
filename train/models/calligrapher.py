"""Frozen FLUX.1-Fill + SigLIP with the style adapter: loading, input preparation, velocity.

The one narrow interface trainers use is :meth:`Calligrapher.velocity`: the transformer's
velocity for packed noisy latents at noise level ``sigma`` under a :class:`FillConditioning`,
evaluated with the live adapter (with gradients) or with any other set of adapter weights
(``params=``: old / reference policy, no gradients) on the same base model.

Tensor conventions: pixels ``[B, 3, H, W]`` in ``[-1, 1]``; masks ``[B, 1, H, W]`` in ``{0, 1}``
(1 = paint here); latents are VAE latents normalised as ``(z - shift) * scale`` and *packed*
2x2 into ``[B, L, 64]`` with ``L = (H/16) * (W/16)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from .adapter import StyleAdapter, count_parameters

PROMPT_TEMPLATE = "The text is '{text}'."


def prompt_for(text: str) -> str:
    return PROMPT_TEMPLATE.format(text=text)


@dataclass
class FillConditioning:
    """Everything except the noisy latents that one FLUX-Fill forward needs, for a batch of B."""

    cond_latents: torch.Tensor  # [B, L, 320]: packed masked-image latents (64) ++ packed 8x8-folded mask (256)
    prompt_embeds: torch.Tensor  # [B, T, D] T5
    pooled_prompt_embeds: torch.Tensor  # [B, P] CLIP
    text_ids: torch.Tensor  # [T, 3]
    img_ids: torch.Tensor  # [L, 3]
    style_embeds: torch.Tensor  # [B, E] pooled SigLIP
    guidance: torch.Tensor  # [B]
    latent_size: tuple[int, int]  # unpacked VAE latent (h, w)

    @property
    def batch_size(self) -> int:
        return self.cond_latents.shape[0]

    _BATCHED = ("cond_latents", "prompt_embeds", "pooled_prompt_embeds", "style_embeds", "guidance")

    def select(self, index) -> "FillConditioning":
        """The conditioning of the samples ``index`` (a list or tensor of batch positions)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.cond_latents.device)
        picked = {name: getattr(self, name).index_select(0, index.to(getattr(self, name).device))
                  for name in self._BATCHED}
        return FillConditioning(text_ids=self.text_ids, img_ids=self.img_ids, latent_size=self.latent_size, **picked)

    @classmethod
    def cat(cls, conds: list["FillConditioning"]) -> "FillConditioning":
        """Concatenate conditionings of equal canvas size along the batch."""
        first = conds[0]
        if any(c.latent_size != first.latent_size for c in conds):
            raise ValueError("cannot concatenate conditionings of different canvas sizes")
        joined = {name: torch.cat([getattr(c, name) for c in conds]) for name in cls._BATCHED}
        return cls(text_ids=first.text_ids, img_ids=first.img_ids, latent_size=first.latent_size, **joined)


class Calligrapher:
    """FLUX.1-Fill (frozen, held in a ``FluxFillPipeline``) + SigLIP (frozen) + :class:`StyleAdapter`."""

    def __init__(self, pipe, siglip, siglip_processor, adapter: StyleAdapter):
        self.pipe, self.siglip, self.siglip_processor, self.adapter = pipe, siglip, siglip_processor, adapter
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, siglip):
            if module is not None:
                module.requires_grad_(False).eval()
        adapter.install(pipe.transformer)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, flux_path, siglip_path, num_tokens: int = 128, dtype=torch.float32,
                        device="cpu", adapter: StyleAdapter | None = None, load_text_encoders: bool = True,
                        text_encoder_device=None):
        """Load the diffusers-layout FLUX.1-Fill folder and a SigLIP folder; build a fresh adapter if none given.

        ``load_text_encoders=False`` skips CLIP/T5 (use with cached prompt embeddings);
        ``text_encoder_device="cpu"`` keeps them off the accelerator (they then run on the CPU).
        """
        from diffusers import FluxFillPipeline
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor, SiglipVisionModel

        extra = {} if load_text_encoders else {"text_encoder": None, "text_encoder_2": None}
        pipe = FluxFillPipeline.from_pretrained(flux_path, dtype=dtype, **extra)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name)
            if module is not None:
                on_text_device = name.startswith("text_encoder") and text_encoder_device is not None
                module.to(text_encoder_device if on_text_device else device)
        pipe.set_progress_bar_config(disable=True)
        siglip = SiglipVisionModel.from_pretrained(siglip_path, dtype=dtype).to(device)
        processor = SiglipImageProcessor.from_pretrained(siglip_path)
        if adapter is None:
            adapter = StyleAdapter.for_transformer(pipe.transformer, siglip.config.hidden_size, num_tokens)
        return cls(pipe, siglip, processor, adapter.to(device))

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    # The first parameter's, not diffusers' ``ModelMixin.device`` / ``.dtype``: those visit every submodule
    # looking for offloading hooks (1,279 at full size, ~3 ms a call, read many times per step).
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def parameter_report(self) -> dict[str, int]:
        a = self.adapter
        return {
            "trainable": sum(p.numel() for p in a.parameters() if p.requires_grad),
            "image_proj.mlp": count_parameters(a.image_proj.mlp),
            "image_proj.qformer": count_parameters(a.image_proj.qformer),
            "ip_adapter": count_parameters(a.ip_adapter),
            "style_blocks": len(a.ip_adapter),
            "frozen_transformer": count_parameters(self.transformer),
        }

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, texts: list[str], max_sequence_length: int = 512):
        """Raw texts -> (T5 embeds ``[B, T, D]``, CLIP pooled ``[B, P]``, text ids ``[T, 3]``), via the prompt template.

        Runs where the text encoders live (the results are moved by :meth:`prepare_condition`).
        """
        if self.pipe.text_encoder is None or self.pipe.text_encoder_2 is None:
            raise RuntimeError("text encoders were not loaded (or were freed); use cached prompt embeddings")
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=[prompt_for(t) for t in texts], prompt_2=None, device=self.pipe.text_encoder_2.device,
            num_images_per_prompt=1, max_sequence_length=max_sequence_length,
        )
        return embeds, pooled, text_ids

    @torch.no_grad()
    def encode_style(self, images) -> torch.Tensor:
        """Style images (PIL, already padded to square) -> pooled SigLIP embeddings ``[B, E]``."""
        pixels = self.siglip_processor(images=list(images), return_tensors="pt").pixel_values
        return self.siglip(pixels.to(self.device, self.siglip.dtype)).pooler_output

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` -> packed normalised latents ``[B, L, 64]``.

        With a ``generator`` the VAE posterior is sampled (as ``FluxFillPipeline`` does); without
        one its mean is used, so the result does not depend on any global random state.
        """
        cfg = self.vae.config
        z = self._vae_encode(pixels, generator)
        z = (z - cfg.shift_factor) * cfg.scaling_factor
        return self.pack(z)

    @torch.no_grad()
    def decode_latents(self, packed: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Packed latents -> pixels ``[B, 3, H, W]`` in ``[-1, 1]``."""
        cfg = self.vae.config
        z = self.unpack(packed, latent_size) / cfg.scaling_factor + cfg.shift_factor
        return self.vae.decode(z.to(self._vae_dtype), return_dict=False)[0].clamp(-1, 1)

    @property
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _vae_encode(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self._vae_dtype)).latent_dist
        return dist.sample(generator) if generator is not None else dist.mode()

    @torch.no_grad()
    def masked_image_latents(self, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B, C, h, w]`` (posterior mean, before shift and scale) of ``source * (1 - mask)``,
        what :meth:`prepare_condition` encodes without a generator."""
        source, mask = source.to(self.device, torch.float32), mask.to(self.device, torch.float32)
        return self._vae_encode((source * (1 - mask)).to(self.dtype)).to(self.dtype)

    @staticmethod
    def pack(z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        h, w = latent_size
        b, _, ch = packed.shape
        z = packed.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return z.reshape(b, ch // 4, h, w)

    @torch.no_grad()
    def prepare_condition(self, source: torch.Tensor, mask: torch.Tensor, prompt_embeds, pooled_prompt_embeds,
                          text_ids, style_embeds, guidance_scale: float, generator=None,
                          masked_latents: torch.Tensor | None = None) -> FillConditioning:
        """FLUX-Fill conditioning exactly as ``FluxFillPipeline`` builds it (its own helpers are reused).

        The masked image's VAE posterior is sampled with ``generator`` (the pipeline's behaviour)
        or, without one, replaced by its mean: deterministic, whatever the batch layout.
        ``masked_latents`` passes that mean already computed (:meth:`masked_image_latents`, cached per sample).
        """
        pipe = self.pipe
        b, _, height, width = source.shape
        dtype = self.dtype
        if masked_latents is not None and generator is not None:
            raise ValueError("masked_latents is the posterior mean; a generator asks for a posterior sample")
        source, mask = source.to(self.device, torch.float32), mask.to(self.device, torch.float32)
        if generator is not None:  # pixels: prepare_mask_latents samples the posterior
            masked = (source * (1 - mask)).to(dtype)
        else:  # raw latents: prepare_mask_latents then applies shift / scale and packs
            masked = (self.masked_image_latents(source, mask) if masked_latents is None
                      else masked_latents.to(self.device, dtype))
        mask_packed, masked_latents = pipe.prepare_mask_latents(
            mask, masked, b, self.vae.config.latent_channels, 1, height, width, dtype, self.device, generator
        )
        h, w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, dtype)
        return FillConditioning(
            cond_latents=torch.cat([masked_latents, mask_packed], dim=-1),
            prompt_embeds=prompt_embeds.to(self.device, dtype),
            pooled_prompt_embeds=pooled_prompt_embeds.to(self.device, dtype),
            text_ids=text_ids.to(self.device, dtype),
            img_ids=img_ids,
            style_embeds=style_embeds.to(self.device),
            guidance=torch.full((b,), float(guidance_scale), device=self.device, dtype=torch.float32),
            latent_size=(h, w),
        )

    # ------------------------------------------------------------------ the model
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: FillConditioning,
                 adapter=None, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted velocity ``[B, L, 64]`` (flow ``x_t = (1-sigma) x0 + sigma eps``, v = eps - x0).

        ``adapter`` defaults to ``self.adapter`` (pass the DDP/FSDP-wrapped one when training).
        ``params`` evaluates another set of adapter weights (names as in ``adapter.state_dict()``)
        on the same frozen base model; that path is gradient-free by construction.
        """
        adapter = self.adapter if adapter is None else adapter
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(latents.shape[0])
        kwargs = dict(
            hidden_states=torch.cat([latents, cond.cond_latents.to(latents.dtype)], dim=-1),
            timestep=sigma.to(latents.dtype), guidance=cond.guidance,
            pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids, img_ids=cond.img_ids,
        )
        if params is None:
            return adapter(self.transformer, cond.style_embeds, **kwargs)
        module = getattr(adapter, "module", adapter)  # unwrap DDP: the swapped weights are the bare module's
        if not torch.is_autocast_enabled(latents.device.type):
            # Copies may be stored in another dtype (bf16 reference/old adapters): without autocast the
            # layers need the live dtype, so cast for this call only. Under autocast they run as stored.
            live = {n: p.dtype for n, p in module.state_dict(keep_vars=True).items()}
            params = {n: t if t.dtype == live[n] else t.to(live[n]) for n, t in params.items()}
        with torch.no_grad():
            return functional_call(module, params, (self.transformer, cond.style_embeds), kwargs, strict=True)

    def sigmas(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """The sampler's noise levels, ``num_steps + 1`` values from ~1 down to 0 (FLUX's shifted schedule)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

        cfg = self.pipe.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)  # a private one: the pipeline's is untouched
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.to(torch.float32).clone()

    @torch.no_grad()
    def sample(self, cond: FillConditioning, num_steps: int, generator=None, latents=None,
               params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Deterministic Euler sampling (what ``FluxFillPipeline`` does); returns clean packed latents.

        It is the RL sampler's loop (:func:`train.rl_ip.sampling.denoise`) with no stochastic step, the latents
        kept in the model's dtype between steps as the pipeline keeps them.
        """
        from ..rl_ip.sampling import denoise

        h, w = cond.latent_size
        shape = (cond.batch_size, (h // 2) * (w // 2), 64)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
        latents = latents.to(self.device, self.dtype)
        sigmas = self.sigmas(num_steps, shape[1])
        return denoise(lambda x, sigma: self.velocity(x, sigma, cond, params=params), latents, sigmas).final
