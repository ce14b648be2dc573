"""FLOP accounting of training steps, at any model size, on fake tensors: ``python -m train.flops``.

Counts the FLOPs of matrix products, convolutions and attention (``torch.utils.flop_counter``;
elementwise operations are not counted, the usual convention for model FLOP utilisation) of:

* one transformer forward with the style adapter at the canvas (source plus reference strip)
  and text length, its backward (gradients of activations through the frozen base, weight
  gradients of the adapter only), and the base transformer alone for comparison;
* a VAE encode and a VAE decode of the canvas, SigLIP on one style image, T5 and CLIP on one prompt;

and composes them into one supervised step, one GRPO trained step, one NFT trained step and one
rollout (per image), with the share of each part. Components are built from their configs
under ``FakeTensorMode``: nothing is allocated, so full FLUX.1-Fill-dev / SigLIP-so400m sizes run
anywhere. Transformer FLOPs are linear in the number of double and single blocks (the first two
double blocks differ: the adapter's gradient reaches the text stream only from block 1 on), so
the transformer is counted at depths (3, 1), (4, 1) and (3, 2) and extrapolated. Gradient
checkpointing would add one more forward of the blocks to each backward; model FLOPs leave it out.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from .plan_memory import StepShape, _autocast, _condition, _fake_mode, _model
from .plan_model import DTYPES, ModelSpec, _quiet, default_dtype

aten = torch.ops.aten


def _as_registered(formula):
    """A formula already wrapped by ``register_flop_formula`` (FlopCounterMode must not wrap it again)."""
    def count(*args, **kwargs):
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


# CPU attention kernels the counter does not know: the same formulas as the CUDA kernels
_CUSTOM = {aten._scaled_dot_product_flash_attention_for_cpu: _as_registered(sdpa_flop),
           aten._scaled_dot_product_flash_attention_for_cpu_backward: _as_registered(sdpa_backward_flop)}
BASE_DEPTH = (3, 1)


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM)


def _transformer_at_depth(spec: ModelSpec, canvas, text_tokens: int, num_tokens: int, batch: int,
                          precision: str) -> dict[str, int]:
    """Forward and backward FLOPs with the adapter, and the forward of the base alone, at ``spec``'s depth."""
    shape = StepShape("supervised", batch, tuple(canvas), text_tokens, num_tokens, precision, False, False, False,
                      "bf16")
    with _fake_mode():
        model = _model(spec, DTYPES[precision], num_tokens, with_vae=False)
        model.adapter.train()
        cond = _condition(model, shape, (canvas[0] // 8, canvas[1] // 8))
        x = torch.randn(batch, cond.cond_latents.shape[1], 64, dtype=model.dtype)
        with _counter() as fwd, _autocast(shape):
            v = model.velocity(x, 0.5, cond)
        with _counter() as bwd:
            v.float().square().mean().backward()
        with torch.no_grad(), _counter() as base, _autocast(shape):  # no style tokens: the base model alone
            model.transformer(hidden_states=torch.cat([x, cond.cond_latents], -1),
                              timestep=torch.full((batch,), 0.5, dtype=x.dtype), guidance=cond.guidance,
                              pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
                              txt_ids=cond.text_ids, img_ids=cond.img_ids, joint_attention_kwargs={}, return_dict=False)
        return {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops(),
                "base_forward": base.get_total_flops()}


def transformer_flops(spec: ModelSpec, canvas, text_tokens: int, num_tokens: int, batch: int = 1,
                      precision: str = "bf16") -> dict[str, int]:
    """``forward``, ``backward`` (with the adapter) and ``base_forward`` (no style) FLOPs at full depth."""
    double, single = spec.blocks
    d0, s0 = BASE_DEPTH
    args = (canvas, text_tokens, num_tokens, batch, precision)
    if double <= d0 + 1 and single <= s0 + 1:
        return _transformer_at_depth(spec, *args)
    base = _transformer_at_depth(spec.with_depth(d0, s0), *args)
    plus_d = _transformer_at_depth(spec.with_depth(d0 + 1, s0), *args)
    plus_s = _transformer_at_depth(spec.with_depth(d0, s0 + 1), *args)
    return {k: v + (double - d0) * (plus_d[k] - v) + (single - s0) * (plus_s[k] - v) for k, v in base.items()}


def encoder_flops(spec: ModelSpec, canvas, text_tokens: int, batch: int = 1, precision: str = "bf16") -> dict[str, int]:
    """``vae_encode`` / ``vae_decode`` of the canvas, ``siglip`` of one style image, ``t5`` + ``clip`` of one prompt."""
    dtype = DTYPES[precision]
    h, w = canvas
    out = {}
    with torch.device("meta"), torch.no_grad():  # (transformers' initialisers read values under a fake mode)
        with default_dtype(dtype):
            vae, siglip = spec.build_vae(), spec.build_siglip()
            clip, t5 = spec.build_text_encoders()
        with _counter() as c:
            vae.encode(torch.randn(batch, 3, h, w, dtype=dtype))
        out["vae_encode"] = c.get_total_flops()
        with _counter() as c:
            vae.decode(torch.randn(batch, vae.config.latent_channels, h // 8, w // 8, dtype=dtype))
        out["vae_decode"] = c.get_total_flops()
        size = siglip.config.image_size
        with _counter() as c:
            siglip(torch.randn(batch, 3, size, size, dtype=dtype))
        out["siglip"] = c.get_total_flops()
        out["text_encoders"] = 0
        for model, length in ((t5, text_tokens), (clip, 77)):
            if model is not None:
                with _counter() as c:
                    model(torch.zeros(batch, length, dtype=torch.long))
                out["text_encoders"] += c.get_total_flops()
    return out


def step_flops(parts: dict[str, int], rl_steps: int = 50, reference: bool = True) -> dict[str, dict[str, float]]:
    """Per-sample FLOPs of each step, as ``{step: {part: flops}}`` (SigLIP and T5 run once per sample / text
    and are cached, so they are not part of a step)."""
    fwd, bwd = parts["forward"], parts["backward"]
    return {
        "supervised step": {"VAE encodes (source, masked source)": 2 * parts["vae_encode"],
                            "transformer forward": fwd, "transformer backward": bwd},
        "GRPO trained step": {"transformer forward": fwd, "transformer backward": bwd,
                              "reference forward": fwd if reference else 0},
        "NFT trained step": {"transformer forward": fwd, "transformer backward": bwd,
                             "old + reference forwards": (2 if reference else 1) * fwd},
        f"rollout ({rl_steps} steps)": {"VAE encode (masked source)": parts["vae_encode"],
                                        "transformer forwards": rl_steps * fwd, "VAE decode": parts["vae_decode"]},
    }


def flop_report(spec: ModelSpec, canvas, text_tokens: int, num_tokens: int, rl_steps: int = 50,
                precision: str = "bf16") -> dict:
    """Everything above for one sample, as JSON-ready GFLOP figures with shares."""
    _quiet()
    parts = {**transformer_flops(spec, canvas, text_tokens, num_tokens, 1, precision),
             **encoder_flops(spec, canvas, text_tokens, 1, precision)}
    steps = step_flops(parts, rl_steps)
    report = {
        "model": spec.source, "canvas": list(canvas), "image_tokens": (canvas[0] // 16) * (canvas[1] // 16),
        "text_tokens": text_tokens, "style_tokens": num_tokens,
        "parts_gflop": {k: round(v / 1e9, 3) for k, v in parts.items()},
        "adapter_share_of_forward": round(1 - parts["base_forward"] / parts["forward"], 4),
        "steps": {},
    }
    for name, items in steps.items():
        total = sum(items.values())
        report["steps"][name] = {"gflop": round(total / 1e9, 3),
                                 "share": {k: round(v / total, 4) for k, v in items.items()}}
    return report


def transformer_share(report: dict, step: str) -> float:
    """Share of a step's FLOPs spent in the transformer (forwards and backwards)."""
    return sum(v for k, v in report["steps"][step]["share"].items() if "forward" in k or "backward" in k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", help="FLUX.1-Fill folder (default: full-size dimensions)")
    parser.add_argument("--siglip_path", help="SigLIP folder (default: so400m dimensions)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--strip_height", type=int, default=0, help="reference strip height in pixels (0 = none)")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="text tokens")
    parser.add_argument("--num_tokens", type=int, default=128, help="style tokens")
    parser.add_argument("--rl_num_inference_steps", type=int, default=50)
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 16 or args.strip_height < 0 or args.strip_height % 16:
        parser.error("--resolution and --strip_height must be multiples of 16 (resolution positive)")
    paths = args.pretrained_model_name_or_path, args.siglip_path
    spec = ModelSpec.from_paths(*paths) if all(paths) else ModelSpec.full()
    report = flop_report(spec, (args.resolution + args.strip_height, args.resolution), args.max_sequence_length,
                         args.num_tokens, args.rl_num_inference_steps)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

