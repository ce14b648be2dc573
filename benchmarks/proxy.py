"""The CPU proxy model: FLUX.1-Fill's architecture at a size whose FLOP shares match the full model's.

At tiny sizes the VAE and Python dominate a step, so overhead ratios measured there say nothing
about a GPU run. The proxy keeps FLUX.1-Fill's layout (double and single blocks, 64-channel packed
latents, the mask channels, the guidance embedding) with 2 + 6 blocks of width 128 and a VAE of
4 channels, so that the transformer's share of a supervised step's FLOPs (and of a rollout's) is
close to the full-size share (``benchmarks/flops.py`` reports both). Canvas
128 x 128 plus a 32 px reference strip, 32 text tokens, 16 style tokens. One forward takes about
as long on two CPU cores as a full-size forward on a GPU, so Python's share of a step is comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.models.tiny import (SCHEDULER, SIGLIP_VISION, TINY_CLIP_TEXT, TINY_T5, TINY_VAE, build_clip_tokenizer,
                               build_t5_tokenizer, write_tiny_siglip)

TRANSFORMER = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=2, num_single_layers=6,
                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                   pooled_projection_dim=TINY_CLIP_TEXT["hidden_size"], guidance_embeds=True,
                   axes_dims_rope=(16, 24, 24))
VAE = dict(TINY_VAE, block_out_channels=(4, 4, 4, 4))
RESOLUTION, STRIP, TEXT_TOKENS, STYLE_TOKENS = 128, 32, 32, 16
CANVAS = (RESOLUTION + STRIP, RESOLUTION)


def spec():
    from train.plan_model import ModelSpec

    return ModelSpec(dict(TRANSFORMER), dict(VAE), None, None, dict(SIGLIP_VISION["tiny"]),
                     "CPU proxy (FLUX.1-Fill layout, 2 + 6 blocks of width 128, 4-channel VAE)")


def write_proxy_models(out, seed: int = 0) -> dict[str, Path]:
    """``{"flux": ..., "siglip": ...}`` folders in the diffusers layout (reused when already written)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out)
    paths = {"flux": out / "flux-fill", "siglip": out / "siglip"}
    stamp = out / "proxy-models.json"
    key = {"seed": seed, "transformer": TRANSFORMER, "vae": VAE}
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(key)):
        return paths
    torch.manual_seed(seed)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    t5 = dict(TINY_T5, d_model=TRANSFORMER["joint_attention_dim"])  # T5's width is the transformer's text width
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                                                  eos_token_id=clip_tok.eos_token_id,
                                                  pad_token_id=clip_tok.pad_token_id, **TINY_CLIP_TEXT)),
        tokenizer=clip_tok,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                                               eos_token_id=t5_tok.eos_token_id, **t5)),
        tokenizer_2=t5_tok, transformer=FluxTransformer2DModel(**TRANSFORMER),
    )
    pipe.save_pretrained(paths["flux"], safe_serialization=True)
    write_tiny_siglip(paths["siglip"], seed)
    stamp.write_text(json.dumps(key))
    return paths
