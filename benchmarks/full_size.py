"""Seconds per optimizer step and model FLOP utilisation of the bare model steps (GPU, full size).

``python benchmarks/train_step.py --size full`` calls :func:`measure` with FLUX.1-Fill-dev and
SigLIP-so400m dimensions and random bf16 weights built directly on the GPU (nothing is
downloaded or written): the supervised step (two VAE encodes, forward, backward), the GRPO
trained step (forward, backward, reference forward) and the NFT trained step (three forwards,
one backward), each followed by gradient clipping and an optimizer step (bitsandbytes' 8-bit
AdamW when installed, else AdamW), at 512 x 512 with a 128 px strip, batch 1, gradient
checkpointing. MFU = the step's model FLOPs (:mod:`train.flops`, recomputation not counted) /
(seconds x the GPU's peak dense bf16 FLOP/s). The same function runs the proxy on a CPU in tests.
"""

from __future__ import annotations

import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _timer(device):
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn, repeats: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    return timed


def build(spec, device, dtype, num_tokens: int):
    """A :class:`~train.models.calligrapher.Calligrapher` with random weights built on ``device``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    from train.models.calligrapher import Calligrapher
    from train.plan_model import default_dtype

    with torch.device(device), default_dtype(dtype):
        transformer, vae = spec.build_transformer(), spec.build_vae()
    with torch.device(device):
        adapter = spec.build_adapter(transformer, num_tokens)
    pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return Calligrapher(pipe, None, None, adapter)


def _optimizer(params):
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4), "8-bit AdamW"
    except ImportError:
        return torch.optim.AdamW(params, lr=1e-4), "AdamW"


def measure(spec=None, canvas=(640, 512), text_tokens: int = 512, num_tokens: int = 128, device="cuda",
            dtype=torch.bfloat16, repeats: int = 5, checkpointing: bool = True) -> dict:
    from train.flops import flop_report
    from train.plan_memory import StepShape, _condition
    from train.plan_model import ModelSpec

    spec = spec or ModelSpec.full()
    torch.manual_seed(0)
    model = build(spec, device, dtype, num_tokens)
    if checkpointing:
        model.transformer.enable_gradient_checkpointing()
    adapter = model.adapter.train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer, opt_name = _optimizer(params)
    copies = {n: {k: v.detach().to(torch.bfloat16, copy=True) for k, v in adapter.state_dict().items()}
              for n in ("old", "ref")}
    shape = StepShape("supervised", 1, tuple(canvas), text_tokens, num_tokens, "bf16", checkpointing, False, True,
                      "bf16")
    with torch.device(device):
        cond = _condition(model, shape, (canvas[0] // 8, canvas[1] // 8))
        pixels = torch.rand(1, 3, *canvas) * 2 - 1
        mask = torch.zeros(1, 1, *canvas)
        x = torch.randn(1, cond.cond_latents.shape[1], 64, dtype=model.dtype)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype)

    def opt_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_backward(extra: list):
        with autocast:
            v = model.velocity(x, 0.5, cond)
            with torch.no_grad():
                for p in extra:
                    model.velocity(x, 0.5, cond, params=p)
        v.float().square().mean().backward()

    def supervised():
        model.encode_latents(pixels)
        model.prepare_condition(pixels, mask, cond.prompt_embeds, cond.pooled_prompt_embeds, cond.text_ids,
                                cond.style_embeds, 30.0)
        forward_backward([])
        opt_step()

    steps = {"supervised": supervised,
             "grpo": lambda: (forward_backward([copies["ref"]]), opt_step()),
             "nft": lambda: (forward_backward([copies["old"], copies["ref"]]), opt_step())}
    timed = _timer(device)
    report = flop_report(spec, canvas, text_tokens, num_tokens)["steps"]
    flops = {"supervised": report["supervised step"]["gflop"], "grpo": report["GRPO trained step"]["gflop"],
             "nft": report["NFT trained step"]["gflop"]}
    peak = peak_tflops(device)
    out = {"device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device),
           "canvas": list(canvas), "optimizer": opt_name, "gradient_checkpointing": checkpointing,
           "peak_bf16_tflops": peak}
    for name, fn in steps.items():
        seconds = timed(fn, repeats)
        out[name] = {"seconds_per_optimizer_step": round(seconds, 4), "model_gflop": flops[name],
                     "mfu": round(flops[name] * 1e9 / seconds / (peak * 1e12), 4) if peak else None}
    if torch.device(device).type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out
