"""Model dimensions for the memory planner and the FLOP accounting, without loading any weight.

:class:`ModelSpec` holds the configs of every component of a run: read from the model folders
when paths are given, otherwise the published FLUX.1-Fill-dev and SigLIP-so400m-patch14-384
configs. Components are built from these configs on the meta device (byte counts) or under a
``FakeTensorMode`` (memory simulation, FLOPs), so nothing is allocated or downloaded.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.tiny import FLUX_TRANSFORMER, SIGLIP_VISION

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# FLUX.1-Fill-dev vae/config.json
FULL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, act_fn="silu", norm_num_groups=32, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True,
)
# FLUX.1-Fill-dev text_encoder/config.json (CLIP ViT-L/14 text tower)
FULL_CLIP_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# FLUX.1-Fill-dev text_encoder_2/config.json (T5 v1.1 XXL encoder)
FULL_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
               use_cache=False)


@dataclass
class ModelSpec:
    """Configs of the transformer, VAE, text encoders (None when absent) and SigLIP vision tower."""

    transformer: dict
    vae: dict
    clip: dict | None
    t5: dict | None
    siglip: dict
    source: str  # how the dimensions were obtained, for the report

    @classmethod
    def full(cls) -> "ModelSpec":
        return cls(dict(FLUX_TRANSFORMER["full"]), dict(FULL_VAE), dict(FULL_CLIP_TEXT), dict(FULL_T5),
                   dict(SIGLIP_VISION["full"]), "FLUX.1-Fill-dev and SigLIP-so400m dimensions (meta device)")

    @classmethod
    def from_paths(cls, flux_path, siglip_path) -> "ModelSpec":
        """Read ``transformer/``, ``vae/``, ``text_encoder*/`` configs and the SigLIP config; one-line errors."""
        root = Path(flux_path)

        def read(sub: str, required: bool = True) -> dict | None:
            path = root / sub / "config.json"
            if not path.is_file():
                if required:
                    raise ValueError(f"--pretrained_model_name_or_path {flux_path}: {sub}/config.json is missing")
                return None
            return _public(json.loads(path.read_text()))

        sig_path = Path(siglip_path) / "config.json"
        if not sig_path.is_file():
            raise ValueError(f"--siglip_path {siglip_path}: config.json is missing")
        siglip = json.loads(sig_path.read_text())
        siglip = _public(siglip.get("vision_config", siglip))  # a full SigLIP config holds the vision tower's
        return cls(read("transformer"), read("vae"), read("text_encoder", False), read("text_encoder_2", False),
                   siglip, f"configs of {flux_path} and {siglip_path} (meta device)")

    # ------------------------------------------------------------------ derived dimensions
    @property
    def blocks(self) -> tuple[int, int]:
        return int(self.transformer["num_layers"]), int(self.transformer["num_single_layers"])

    @property
    def style_dim(self) -> int:
        return int(self.siglip["hidden_size"])

    def with_depth(self, double: int, single: int) -> "ModelSpec":
        """The same widths with another number of double / single blocks (memory and FLOPs are linear in them)."""
        t = dict(self.transformer, num_layers=double, num_single_layers=single)
        return ModelSpec(t, self.vae, self.clip, self.t5, self.siglip, self.source)

    # ------------------------------------------------------------------ builders (call under a device / fake mode)
    def build_transformer(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(self.transformer)

    def build_vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(self.vae)

    def build_siglip(self):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(SiglipVisionConfig(**self.siglip))

    def build_text_encoders(self):
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        clip = CLIPTextModel(CLIPTextConfig(**self.clip)) if self.clip else None
        t5 = T5EncoderModel(T5Config(**self.t5)) if self.t5 else None
        return clip, t5

    def build_adapter(self, transformer, num_tokens: int):
        from .models.adapter import StyleAdapter

        return StyleAdapter.for_transformer(transformer, self.style_dim, num_tokens)


def _public(config: dict) -> dict:
    """A saved config without its bookkeeping keys (``_class_name``, ``architectures``, ...)."""
    drop = {"architectures", "transformers_version", "torch_dtype", "dtype", "model_type"}
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in drop}


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (casting afterwards is not possible under a fake mode)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _quiet():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


# ---------------------------------------------------------------------- bytes of a loaded component
def loaded_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters and buffers once loaded with ``dtype`` (``from_pretrained(dtype=...)``).

    Floating tensors take ``dtype`` except in the modules a transformers class keeps in float32
    (``_keep_in_fp32_modules`` for fp16, ``_keep_in_fp32_modules_strict`` for fp16 and bf16);
    integer buffers keep their dtype.
    """
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ()) if dtype != torch.float32 else set()
    if dtype == torch.float16:
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    total = 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            size = 4 if keep & set(name.split(".")) else torch.empty((), dtype=dtype).element_size()
        else:
            size = t.element_size()
        total += t.numel() * size
    return total


@dataclass
class Components:
    """Byte counts of every component and the adapter's parameter shapes, from one meta build."""

    transformer: int
    vae: int
    siglip: int
    clip: int
    t5: int
    adapter_numels: list[int]  # one entry per trainable tensor
    adapter_parts: dict[str, int]  # mlp / qformer / kv parameter counts
    style_blocks: int

    @property
    def trainable(self) -> int:
        return sum(self.adapter_numels)


_COUNTED: dict[str, Components] = {}


def count_components(spec: ModelSpec, weight_dtype: torch.dtype, num_tokens: int) -> Components:
    """Build every component on the meta device and count what loading it would take (cached)."""
    key = json.dumps([spec.transformer, spec.vae, spec.clip, spec.t5, spec.siglip, str(weight_dtype), num_tokens],
                     sort_keys=True, default=str)
    if key not in _COUNTED:
        _COUNTED[key] = _count_components(spec, weight_dtype, num_tokens)
    return _COUNTED[key]


def _count_components(spec: ModelSpec, weight_dtype: torch.dtype, num_tokens: int) -> Components:
    _quiet()
    with torch.device("meta"):
        transformer = spec.build_transformer()
        vae = spec.build_vae()
        siglip = spec.build_siglip()
        clip, t5 = spec.build_text_encoders()
        adapter = spec.build_adapter(transformer, num_tokens)
    numels = [p.numel() for p in adapter.parameters() if p.requires_grad]
    parts = {"mlp": _count(adapter.image_proj.mlp), "qformer": _count(adapter.image_proj.qformer),
             "kv": _count(adapter.ip_adapter)}
    return Components(
        transformer=loaded_bytes(transformer, weight_dtype), vae=loaded_bytes(vae, weight_dtype),
        siglip=loaded_bytes(siglip, weight_dtype),
        clip=loaded_bytes(clip, weight_dtype) if clip is not None else 0,
        t5=loaded_bytes(t5, weight_dtype) if t5 is not None else 0,
        adapter_numels=numels, adapter_parts=parts, style_blocks=len(adapter.ip_adapter))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- optimizer state
BNB_BLOCK = 256  # bitsandbytes' block size of the blockwise 8-bit optimizers
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit state


def adamw_state_bytes(numels: list[int]) -> tuple[int, int]:
    """``(device bytes, host bytes)`` of the trainer's fused ``torch.optim.AdamW`` state: fp32 m and v per
    element and one float32 ``step`` scalar per tensor, all on the parameter's device."""
    return 8 * sum(numels) + 4 * len(numels), 0


def adamw8bit_state_bytes(numels: list[int]) -> int:
    """Device bytes of bitsandbytes' ``AdamW8bit`` state: per tensor of at least 4096 elements two uint8
    states, two float32 absmax per 256-element block and two 256-entry float32 quantisation maps;
    smaller tensors keep two float32 states."""
    total = 0
    for n in numels:
        if n >= BNB_MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + 2 * 256 * 4
        else:
            total += 8 * n
    return total
