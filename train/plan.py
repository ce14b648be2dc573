"""Memory planner: will a training run fit on its GPUs? ``python -m train.plan --help``.

Takes the flags of ``python -m train.train`` (model paths optional: without them FLUX.1-Fill-dev
and SigLIP-so400m dimensions are built on the meta device, nothing is downloaded) plus
``--gpu_memory_gb`` and ``--num_processes``, and prints per process:

* **state** — exact byte counts of what the run holds: the frozen transformer, VAE and SigLIP
  in the ``--mixed_precision`` dtype; CLIP + T5 (on the device only while the prompt cache is
  filled, then freed; ``--offload_text_encoder_two`` keeps them on the CPU); the fp32 adapter,
  its fp32 gradients, DDP's gradient buckets (several processes, unless the trainer makes the
  gradients views of them), AdamW state (fp32 m and v, 8 B/param; ``--use_8bit_adam`` about
  2 B/param), the EMA shadow (fp32, on the device or the CPU), the RL reference and NFT old
  copies (``--rl_copy_dtype``), and the RL epoch's stored conditionings and latents;
* **working memory** of each phase — activations for the backward pass, autocast's 16-bit
  weight copies, attention and VAE workspaces, optimizer temporaries — measured by running the
  trainers' own step functions on fake tensors (:mod:`train.plan_memory`) at the run's canvas
  (resolution plus the reference strip; the official strip rule is planned at its tallest, the
  resolution), batch and gradient checkpointing;
* the peak over the phases against the usable GPU memory, and when it does not fit, the
  cheapest flag changes that make it fit.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace

import torch

from .config import TrainConfig, build_parser, default_window_range, resolve_defaults, sde_window_range, validate
from .rl_ip.param_copy import copy_dtypes
from .plan_memory import StepShape, optimizer_step_bytes, simulate_step
from .plan_model import DTYPES, ModelSpec, adamw8bit_state_bytes, adamw_state_bytes, count_components
from .sample_cache import latent_bytes_per_sample

GiB = 2**30
RESERVE_FIXED_GIB = 1.0  # CUDA context, cuBLAS / NCCL workspaces
RESERVE_FRACTION = 0.05  # caching-allocator rounding and fragmentation


@dataclass
class Row:
    key: str  # stable name: transformer, vae, siglip, text_encoders, adapter, grads, ddp_buckets, optimizer, ema,
    #           rl_ref, nft_old, rl_buffers, style_cache, prompt_cache, working, optimizer_temporaries
    name: str
    device: int  # bytes on the accelerator
    host: int = 0  # bytes in CPU memory
    note: str = ""


@dataclass
class Phase:
    name: str
    device: int  # peak device bytes in this phase


@dataclass
class Plan:
    """Per-process memory of one configuration; ``fits`` is None without a GPU size to compare with."""

    title: str
    run: str
    rows: list[Row]
    phases: list[Phase]
    capacity: int | None
    suggestions: list[list[str]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    trainable: int = 0

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.device)

    @property
    def usable(self) -> int | None:
        if self.capacity is None:
            return None
        return int(self.capacity * (1 - RESERVE_FRACTION) - RESERVE_FIXED_GIB * GiB)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak.device <= self.usable

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def _unit(self) -> tuple[str, int]:
        return next((u, s) for u, s in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                    if self.peak.device >= s or s == 1)

    def summary(self) -> str:
        """One line: the peak, the phase it occurs in and the verdict."""
        peak, (unit, scale) = self.peak, self._unit()
        line = f"peak {peak.device / scale:.1f} {unit} per process ({peak.name})"
        if self.capacity is None:
            return line + "; no GPU size to compare with (--gpu_memory_gb)"
        verdict = "fits" if self.fits else "does not fit"
        line += f" {verdict} in {self.usable / GiB:.1f} GiB usable of {self.capacity / GiB:.0f} GiB"
        if not self.fits and self.suggestions:
            line += "; would fit with " + " ".join(self.suggestions[0])
        return line

    def format(self) -> str:
        unit, scale = self._unit()
        width = max(len(r.name) for r in self.rows) + 2
        lines = [f"Memory plan per process — {self.title}", f"run: {self.run}", "",
                 f"{'':<{width}}{'device ' + unit:>11}{'host ' + unit:>10}"]
        for r in self.rows:
            dev = f"{r.device / scale:11.2f}" if r.device else f"{'-':>11}"
            host = f"{r.host / scale:10.2f}" if r.host else f"{'':>10}"
            lines.append(f"{r.name:<{width}}{dev}{host}  {r.note}".rstrip())
        lines.append(f"\nphase peaks in {unit} (the state present in the phase + its working memory):")
        for p in self.phases:
            mark = "  <- peak" if p is self.peak else ""
            lines.append(f"  {p.name:<{width}}{p.device / scale:9.2f}{mark}")
        lines.append("")
        if self.capacity is not None:
            lines.append(f"GPU memory {self.capacity / GiB:.0f} GiB; usable {self.usable / GiB:.1f} GiB "
                         f"(reserve {RESERVE_FIXED_GIB:.0f} GiB for the CUDA context and workspaces + "
                         f"{RESERVE_FRACTION:.0%} allocator headroom)")
        lines.append(("verdict: " + ("FITS" if self.fits else "DOES NOT FIT") + ": " if self.capacity is not None
                      else "") + self.summary())
        for s in self.suggestions:
            lines.append("  fits with: " + " ".join(s))
        lines += [f"note: {a}" for a in self.advice]
        return "\n".join(lines)


# ---------------------------------------------------------------------- the configuration
def canvas(cfg: TrainConfig) -> tuple[int, int]:
    """Pixels (height, width) of the tallest canvas: source plus reference strip."""
    if cfg.no_reference_strip:
        return cfg.resolution, cfg.resolution
    return cfg.resolution + (cfg.reference_strip_height or cfg.resolution), cfg.resolution


def ddp_gradient_views() -> bool:
    """Whether the trainer's DDP makes gradients views of its buckets (``train.trainer.DDP_KWARGS``);
    accelerate's default does not, so DDP then holds a second fp32 copy of the gradients."""
    from . import trainer

    kwargs = getattr(trainer, "DDP_KWARGS", None)
    return bool(getattr(kwargs, "gradient_as_bucket_view", False))


def _describe(cfg: TrainConfig, num_processes: int, tokens: tuple[int, int]) -> str:
    h, w = canvas(cfg)
    strip = h - cfg.resolution
    parts = [f"{cfg.rl_method.upper()} after {cfg.rl_warmup_steps} supervised steps" if cfg.use_rl else "supervised",
             f"--mixed_precision {cfg.mixed_precision}",
             f"{cfg.resolution}x{cfg.resolution}" + (f" + {strip} px strip" if strip else "")
             + f" ({tokens[0]} image + {tokens[1]} text tokens)",
             f"batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}",
             "gradient checkpointing" if cfg.gradient_checkpointing else "no gradient checkpointing",
             "8-bit AdamW" if cfg.use_8bit_adam else "AdamW",
             f"EMA on {'the CPU' if cfg.ema_device == 'cpu' else 'the device'}" if cfg.use_ema else "no EMA",
             f"{num_processes} process{'es (DDP)' if num_processes > 1 else ''}"]
    return ", ".join(parts)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_for_config(cfg: TrainConfig, num_processes: int = 1, gpu_memory_gb: float | None = None,
                    spec: ModelSpec | None = None, ddp_bucket_view: bool | None = None,
                    suggest: bool = True, working_memory: bool | None = None) -> Plan:
    """The per-process memory plan of ``cfg``.

    ``gpu_memory_gb``: GiB per GPU; None = the visible CUDA device's, or no verdict without one.
    ``spec``: model dimensions (default: from the config's model paths, else full size).
    ``ddp_bucket_view``: whether DDP gradients are bucket views (default: the trainer's setting).
    ``working_memory``: measure each phase's working memory on fake tensors (seconds at full size);
    default: when there is a GPU size to compare with, so a CPU run's start-up stays quick.
    """
    if spec is None:
        paths = cfg.pretrained_model_name_or_path, cfg.siglip_path
        spec = ModelSpec.from_paths(*paths) if all(paths) else ModelSpec.full()
    if gpu_memory_gb is None and torch.cuda.is_available():
        gpu_memory_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    views = ddp_gradient_views() if ddp_bucket_view is None else ddp_bucket_view
    if working_memory is None:
        working_memory = gpu_memory_gb is not None
    plan = _plan(cfg, num_processes, gpu_memory_gb, spec, views, working_memory)
    if suggest and plan.fits is False:
        plan.suggestions = _suggest(cfg, num_processes, gpu_memory_gb, spec, views)
        if not plan.suggestions:
            plan.advice.append(f"no change of --ema_device, --rl_copy_dtype, --mixed_precision, "
                               f"--gradient_checkpointing, --use_8bit_adam or the batch makes this fit: "
                               f"{(plan.peak.device - plan.usable) / GiB:.1f} GiB over; use GPUs with more memory")
    return plan


def format_plan(cfg: TrainConfig, num_processes: int = 1, gpu_memory_gb: float | None = None, **kw) -> str:
    """:func:`plan_for_config` as the printed table (what ``python -m train.plan`` prints)."""
    return plan_for_config(cfg, num_processes, gpu_memory_gb, **kw).format()


def _plan(cfg: TrainConfig, num_processes: int, gpu_memory_gb: float | None, spec: ModelSpec,
          views: bool, working_memory: bool = True) -> Plan:
    wdt = DTYPES[cfg.mixed_precision]
    comp = count_components(spec, wdt, cfg.num_tokens)
    numels, n = comp.adapter_numels, comp.trainable
    h, w = canvas(cfg)
    image_tokens, text_tokens = (h // 16) * (w // 16), cfg.max_sequence_length
    ddp, parts = num_processes > 1, comp.adapter_parts
    # With several processes DDP allocates its gradient buckets at start-up: either the gradients are
    # views of them (held for the whole run) or the buckets are a second copy next to the gradients.
    grads_held = 4 * n if ddp and views else 0
    grads_when_stepping = 0 if grads_held else 4 * n
    buckets = 4 * n if ddp and not views else 0
    opt_dev, opt_host = (adamw8bit_state_bytes(numels), 0) if cfg.use_8bit_adam else adamw_state_bytes(numels)
    ema_host = cfg.use_ema and cfg.ema_device == "cpu"
    ema = 4 * n if cfg.use_ema else 0
    copies = copy_dtypes(cfg)
    rl_ref = _size(copies["ref"]) * n if cfg.use_rl and cfg.rl_kl_beta > 0 else 0
    rl_old = _size(copies["old"]) * n if cfg.use_rl and cfg.rl_method == "nft" else 0
    buffers = _rl_epoch_buffers(cfg, spec, image_tokens, wdt) if cfg.use_rl else 0
    encoders = comp.clip + comp.t5
    wsize = _size(wdt)
    latent_bytes = latent_bytes_per_sample(h, w, spec.vae, wsize)

    rows = [
        Row("transformer", f"frozen transformer ({_dt(wdt)})", comp.transformer),
        Row("vae", f"VAE ({_dt(wdt)})", comp.vae),
        Row("siglip", f"SigLIP vision tower ({_dt(wdt)})", comp.siglip),
        Row("text_encoders", "text encoders CLIP + T5", 0, encoders if cfg.offload_text_encoder_two else 0,
            "on the CPU (--offload_text_encoder_two), freed after the prompt cache fills"
            if cfg.offload_text_encoder_two else
            f"{encoders / GiB:.2f} GiB on the device while the prompt cache fills, then freed"),
        Row("adapter", "trainable adapter (fp32)", 4 * n, 0, f"{n:,} parameters (MLP {parts['mlp']:,}, "
            f"Q-Former {parts['qformer']:,}, K/V {parts['kv']:,})"),
        Row("grads", "gradients (fp32)", 4 * n, 0, "views of DDP's buckets, held for the whole run" if grads_held
            else "from the first backward of an optimizer step to the step"),
    ]
    if ddp:
        rows.append(Row("ddp_buckets", "DDP gradient buckets (fp32)", buckets, 0, "the gradients are views of them"
                        if views else "a second copy of the gradients (gradient_as_bucket_view=False)"))
    rows += [
        Row("optimizer", "optimizer state (8-bit AdamW)" if cfg.use_8bit_adam else "optimizer state (AdamW fp32 m + v)",
            opt_dev, opt_host, "bitsandbytes: uint8 m and v + block scales, about 2 B/param" if cfg.use_8bit_adam
            else "8 B/param (fused: step counters on the device too)"),
        Row("ema", "EMA shadow (fp32)", 0 if ema_host else ema, ema if ema_host else 0,
            "" if cfg.use_ema else "--use_ema off"),
        Row("rl_ref", f"RL reference copy ({cfg.rl_copy_dtype})", rl_ref, 0,
            "" if rl_ref else "no RL or --rl_kl_beta 0"),
        Row("nft_old", f"NFT old copy ({'fp32' if copies['old'] == torch.float32 else cfg.rl_copy_dtype})", rl_old, 0,
            ("fp32: it decays (--nft_decay_type != 0)" if copies["old"] == torch.float32 else "") if rl_old
            else "NFT only"),
        Row("rl_buffers", "RL epoch buffers", buffers, 0, "one epoch's conditionings and latents, and the copies "
            "the update concatenates" if cfg.use_rl else "no RL"),
        Row("style_cache", "SigLIP embedding cache", 0, 0, f"on the device, {spec.style_dim * wsize} B per training "
            f"sample ({spec.style_dim * wsize * 100_000 / 2**20:.0f} MiB per 100k)"),
        Row("latent_cache", "VAE latent cache", 0, 0, "--latent_cache off" if cfg.latent_cache == "off" else
            f"host memory, {latent_bytes / 2**10:.0f} KiB per training sample "
            f"({latent_bytes * 100_000 / 2**30:.0f} GiB per 100k, each process)"),
        Row("prompt_cache", "prompt-embedding cache", 0, 0, "host memory, "
            f"{text_tokens * spec.transformer['joint_attention_dim'] * wsize / 2**20:.1f} MiB per unique text"),
    ]

    base = comp.transformer + comp.vae + comp.siglip
    held = base + 4 * n + grads_held + buckets + opt_dev + (0 if ema_host else ema)
    phases = [Phase("set-up: prompt-cache fill", base + 4 * n + (0 if cfg.offload_text_encoder_two else encoders))]
    opt_tmp = 0 if cfg.use_8bit_adam or not working_memory else optimizer_step_bytes(tuple(numels), True,
                                                                                       cfg.max_grad_norm)

    def simulate(step: StepShape) -> dict[str, int]:
        if working_memory:
            return simulate_step(spec, step)
        # state only: a backward without accumulation still creates the gradients
        return {"train": 0 if step.grads_exist else grads_when_stepping, "rollout": 0, "vae_encode": 0,
                "vae_decode": 0}

    accumulating = cfg.gradient_accumulation_steps > 1 or bool(grads_held)
    shape = StepShape("supervised", cfg.train_batch_size, (h, w), text_tokens, cfg.num_tokens, cfg.mixed_precision,
                      cfg.gradient_checkpointing, accumulating, False, cfg.rl_copy_dtype,
                      "fp32" if copies["old"] == torch.float32 else "bf16")
    work = {}
    if not cfg.use_rl or cfg.rl_warmup_steps > 0:
        sim = simulate(shape)  # without accumulation its peak includes the gradients it creates
        grads = grads_when_stepping if accumulating else 0
        phases += [Phase("supervised: VAE encodes", held + grads + sim["vae_encode"]),
                   Phase("supervised: forward/backward", held + grads + sim["train"]),
                   Phase("supervised: optimizer step", held + grads_when_stepping + opt_tmp)]
        work["supervised"] = sim["train"] - (0 if accumulating else grads_when_stepping)
    if cfg.use_rl:  # RL accumulates over the trained steps: gradients exist during each backward
        sim = simulate(replace(shape, method=cfg.rl_method, grads_exist=True, reference=cfg.rl_kl_beta > 0))
        state = held + rl_ref + rl_old + buffers
        m = cfg.rl_method.upper()
        phases += [Phase(f"{m}: rollout step", state + sim["rollout"]),
                   Phase(f"{m}: VAE encode / decode", state + max(sim["vae_encode"], sim["vae_decode"])),
                   Phase(f"{m}: trained forward/backward", state + grads_when_stepping + sim["train"]),
                   Phase(f"{m}: optimizer step", state + grads_when_stepping + opt_tmp)]
        if ema_host and cfg.rl_eval_data:  # the fp32 shadow is copied to the device to sample the held-out set
            phases.append(Phase(f"{m}: held-out evaluation of the EMA", state + ema + sim["rollout"]))
        work[cfg.rl_method] = sim["train"]
    largest = max(work, key=work.get)
    rows += [Row("working", "step working memory (estimate)", work[largest], 0, f"{largest} forward/backward: "
                 "activations, autocast weight copies, workspaces" if working_memory else
                 "not estimated without a GPU size: python -m train.plan --gpu_memory_gb N"),
             Row("optimizer_temporaries", "optimizer-step temporaries", opt_tmp, 0,
                 "gradient clipping and the fused AdamW step" if opt_tmp else "")]
    plan = Plan(spec.source, _describe(cfg, num_processes, (image_tokens, text_tokens)), rows, phases,
                None if gpu_memory_gb is None else int(gpu_memory_gb * GiB), trainable=n)
    if buckets:
        plan.advice.append(f"DDP keeps its own {buckets / GiB:.1f} GiB of gradient buckets; "
                           "DistributedDataParallelKwargs(gradient_as_bucket_view=True) in the trainer removes them")
    if not cfg.no_reference_strip and not cfg.reference_strip_height:
        plan.advice.append(f"the official strip height follows each reference (at most {cfg.resolution} px); "
                           "planned at its tallest")
    return plan


def _dt(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _rl_epoch_buffers(cfg: TrainConfig, spec: ModelSpec, image_tokens: int, wdt: torch.dtype) -> int:
    """Bytes the RL loops keep for one epoch on the device: each batch's conditioning and latents
    (GRPO: the stochastic steps' latents, next latents and log-probabilities, and with GRPO-Guard their means;
    NFT: the clean latents),
    and the copies ``FillConditioning.cat`` / ``torch.cat`` make of them for the update."""
    t = spec.transformer
    images = cfg.train_batch_size * cfg.rl_num_batches_per_epoch
    w = _size(wdt)
    cond = (image_tokens * 320 + cfg.max_sequence_length * t["joint_attention_dim"] + t["pooled_projection_dim"]
            + spec.style_dim) * w + 4
    per_batch_ids = (cfg.max_sequence_length + image_tokens) * 3 * w
    if cfg.rl_method == "grpo":
        lo, hi = sde_window_range(cfg) or default_window_range(cfg) or (0, cfg.rl_num_inference_steps - 1)
        steps = cfg.rl_sde_window_size or hi - lo
        kept = 3 if cfg.rl_grpo_guard else 2  # latents and next latents (+ the step means for GRPO-Guard)
        latents = kept * steps * image_tokens * 64 * 4 + steps * 4
    else:
        latents = image_tokens * 64 * 4
    return 2 * images * (cond + latents) + cfg.rl_num_batches_per_epoch * per_batch_ids


# ---------------------------------------------------------------------- suggestions
def _candidates(cfg: TrainConfig, num_processes: int):
    """Flag changes in order of cost (free first, then compute, then batch), each with the config it gives."""
    if not cfg.offload_text_encoder_two:
        yield ["--offload_text_encoder_two"], replace(cfg, offload_text_encoder_two=True)
    if cfg.use_ema and cfg.ema_device != "cpu":
        yield ["--ema_device", "cpu"], replace(cfg, ema_device="cpu")
    if cfg.use_rl and cfg.rl_copy_dtype != "bf16":
        yield ["--rl_copy_dtype", "bf16"], replace(cfg, rl_copy_dtype="bf16")
    if cfg.mixed_precision == "no":
        yield ["--mixed_precision", "bf16"], replace(cfg, mixed_precision="bf16")
    if not cfg.use_8bit_adam:
        yield ["--use_8bit_adam"], replace(cfg, use_8bit_adam=True)
    if not cfg.gradient_checkpointing:
        yield ["--gradient_checkpointing"], replace(cfg, gradient_checkpointing=True)
    b = cfg.train_batch_size
    while b > 1:  # halve the batch, keep the samples per optimizer step
        b //= 2
        factor = cfg.train_batch_size // b
        if cfg.use_rl and (b * num_processes) % cfg.rl_num_images_per_prompt:
            break
        new = replace(cfg, train_batch_size=b, gradient_accumulation_steps=cfg.gradient_accumulation_steps * factor)
        flags = ["--train_batch_size", str(b), "--gradient_accumulation_steps", str(new.gradient_accumulation_steps)]
        if cfg.use_rl:
            new = replace(new, rl_num_batches_per_epoch=cfg.rl_num_batches_per_epoch * factor)
            flags += ["--rl_num_batches_per_epoch", str(new.rl_num_batches_per_epoch)]
        yield flags, new


def _suggest(cfg, num_processes, gpu_memory_gb, spec, views) -> list[list[str]]:
    """Apply changes in cost order until the plan fits, then drop every change that is not needed."""
    applied, current = [], cfg

    def fits(c: TrainConfig) -> bool:
        return bool(_plan(c, num_processes, gpu_memory_gb, spec, views).fits)

    batch_steps = []
    for flags, new in _candidates(cfg, num_processes):
        if flags[0] == "--train_batch_size":
            batch_steps.append((flags, new))
            continue
        applied.append((flags, new))
        current = _apply(cfg, applied)
        if fits(current):
            break
    else:
        for flags, new in batch_steps:  # the batch last: it slows the run the most
            applied = [a for a in applied if a[0][0] != "--train_batch_size"] + [(flags, new)]
            current = _apply(cfg, applied)
            if fits(current):
                break
        else:
            return []
    for item in list(reversed(applied[:-1])):  # the last change was needed; try without each earlier one
        trial = [a for a in applied if a is not item]
        if fits(_apply(cfg, trial)):
            applied = trial
    return [[f for flags, _ in applied for f in flags]]


def _apply(cfg: TrainConfig, applied) -> TrainConfig:
    """``cfg`` with every change in ``applied`` (each given as the config it produces from ``cfg``)."""
    out = cfg
    for _, new in applied:
        changes = {k: v for k, v in vars(new).items() if getattr(cfg, k) != v}
        out = replace(out, **changes)
    return out


# ---------------------------------------------------------------------- command line
def build_plan_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.prog = "python -m train.plan"
    parser.description = __doc__.split("\n\n")[0] + " Takes every flag of python -m train.train."
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU in GiB")
    parser.add_argument("--num_processes", type=int, default=1, help="training processes (GPUs) under DDP")
    return parser


def parse_plan_args(argv=None) -> tuple[TrainConfig, int, float]:
    """``(TrainConfig, num_processes, gpu_memory_gb)``; exits 2 with one line per problem."""
    parser = build_plan_parser()
    ns = vars(parser.parse_args(argv))
    num_processes, gpu = ns.pop("num_processes"), ns.pop("gpu_memory_gb")
    cfg = TrainConfig(**ns)
    resolve_defaults(cfg)
    # A plan needs no data, output folder or step count, and is made for the GPU machine, not this one.
    problems = [p for p in validate(cfg) if not p.endswith(" is required") and "--use_8bit_adam" not in p]
    if num_processes < 1:
        problems.append(f"--num_processes must be at least 1, got {num_processes}")
    if gpu <= 0:
        problems.append(f"--gpu_memory_gb must be positive, got {gpu}")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        raise SystemExit(2)
    return cfg, num_processes, gpu


def main(argv=None) -> int:
    cfg, num_processes, gpu = parse_plan_args(argv)
    try:
        plan = plan_for_config(cfg, num_processes, gpu)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
