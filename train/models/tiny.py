"""Randomly initialised FLUX.1-Fill and SigLIP folders, written in the diffusers layout.

Nothing can be downloaded in tests or in the demo, so we build the real diffusers /
transformers classes from config, save them exactly as the hub folders are laid out, and
load them back through the same code path as real weights. ``size="full"`` gives the real
FLUX.1-Fill-dev / SigLIP-so400m dimensions (random weights, or the meta device) for
benchmarks and shape checks.

    python -m train.models.tiny --out runs/tiny_model
"""

from __future__ import annotations

import argparse
import json
import os
import string
from pathlib import Path

import torch

FLUX_TRANSFORMER = {
    "tiny": dict(
        patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    ),
    "full": dict(
        patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ),
}

SIGLIP_VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, image_size=64, patch_size=16),
    # google/siglip-so400m-patch14-384
    "full": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                 num_attention_heads=16, image_size=384, patch_size=14),
}

# FLUX.1-Fill-dev's scheduler/scheduler_config.json
SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
    shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    sample_size=64,
)

TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, dense_act_fn="gelu_new",
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def flux_transformer_config(size: str = "tiny") -> dict:
    return dict(FLUX_TRANSFORMER[size])


def siglip_vision_config(size: str = "tiny"):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**SIGLIP_VISION[size])


def build_flux_transformer(size: str = "tiny", device: str | torch.device = "cpu"):
    """A ``FluxTransformer2DModel`` with random weights; ``device="meta"`` allocates nothing."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(**flux_transformer_config(size))


def build_siglip(size: str = "tiny", device: str | torch.device = "cpu"):
    from transformers import SiglipVisionModel

    with torch.device(device):
        return SiglipVisionModel(siglip_vision_config(size))


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab = {}
    for ch in alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(ch, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    chars = [c for c in string.printable if not c.isspace()]
    pieces += chars + ["▁" + c for c in chars]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=100, model_max_length=512)


def write_tiny_flux_fill(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete FLUX.1-Fill folder (diffusers layout) with tiny random components."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out)
    torch.manual_seed(seed)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = build_flux_transformer("tiny")
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                                                eos_token_id=clip_tok.eos_token_id,
                                                pad_token_id=clip_tok.pad_token_id, **TINY_CLIP_TEXT))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                                             eos_token_id=t5_tok.eos_token_id, **TINY_T5))
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_siglip(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SigLIP vision tower plus its image-processor config."""
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor

    out = Path(out)
    torch.manual_seed(seed)
    model = build_siglip("tiny")
    model.save_pretrained(out, safe_serialization=True)
    size = SIGLIP_VISION["tiny"]["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(out)
    return out


def write_tiny_models(out: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Both folders under ``out``: ``flux-fill/`` and ``siglip/``. Reuses them if already complete."""
    out = Path(out)
    stamp = out / "tiny-models.json"
    paths = {"flux": out / "flux-fill", "siglip": out / "siglip"}
    if stamp.exists() and json.loads(stamp.read_text()).get("seed") == seed:
        return paths
    write_tiny_flux_fill(paths["flux"], seed)
    write_tiny_siglip(paths["siglip"], seed)
    stamp.write_text(json.dumps({"seed": seed}))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write flux-fill/ and siglip/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_models(args.out, args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
