"""Working memory of a training step, measured by running the step's own code on fake tensors.

The persistent state of a run (weights, gradients, optimizer state, copies) is counted by
:mod:`train.plan`. What a step needs *on top* of it — activations kept for the backward pass,
autocast's 16-bit copies of the fp32 adapter weights, the gradients of activations, attention
workspaces, the VAE's feature maps, the optimizer's temporaries — is measured here: the same
functions the trainers call (``Calligrapher.velocity``, ``prepare_condition``, the GRPO and NFT
loops' trained steps ``grpo_step_loss`` / ``nft_step_loss``, the flow-matching loss,
``torch.optim.AdamW``) run under ``FakeTensorMode``, and
:class:`LiveBytes` follows every storage created in the step until it is freed. The peak of
those live bytes is the step's working memory. Nothing is allocated, so full FLUX.1-Fill sizes
run on any machine.

Model of the device: CPU autocast and CPU kernels stand in for CUDA's (the attention kernel
is flash-style on both: it keeps the output and the log-sum-exp, never the score matrix); the
caching allocator's rounding and fragmentation are not modelled (the planner keeps a reserve).

Transformer blocks of one kind are alike, so the memory timeline is a block profile repeated on
offsets linear in the number of blocks: steps run at depths (3, 1), (4, 1) and (3, 2), each
segment of the timeline (:class:`_BlockMarks`) is extrapolated to the full depth, and the peak is
the largest segment (the tests compare this with a run at full depth).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .plan_model import DTYPES, ModelSpec, _quiet, default_dtype


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while the mode is active and still alive, and their peak.

    Storages that existed before (weights, state) are ignored, as are views and in-place results
    of existing storages: they allocate nothing.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.known: set[int] = set()
        self.segments: dict[tuple, int] = {}  # label -> peak while a segment with that label was open
        self._labels: tuple = (("start",),)
        self._segment_peak = 0

    def ignore(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.known.add(id(t.untyped_storage()))

    def mark(self, *labels: tuple) -> None:
        """Close the open segment and open one recorded under ``labels``."""
        self.close()
        self._labels, self._segment_peak = labels, self.current

    def close(self) -> None:
        for label in self._labels:
            self.segments[label] = max(self.segments.get(label, 0), self._segment_peak)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live and key not in self.known:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        self._segment_peak = max(self._segment_peak, self.current)
        return out


LEAD = {"double": 3, "single": 1}  # blocks of each kind labelled one by one before the alike ones


class _BlockMarks:
    """Segments the tracked timeline at transformer block boundaries.

    Labels: ``("fwd", pass, "pre")`` from a transformer call to its first block;
    ``("fwd", pass, kind, which)`` from a block's forward to the next block's;
    ``("fwd", pass, "post")`` from the end of the last block to the next mark; ``("bwd", "start")`` from
    the loss's backward call; ``("bwd", kind, which)`` from the gradient reaching a block's output.
    ``which`` is the index of the first ``LEAD[kind]`` blocks of a kind, ``"last"`` for the last,
    ``"middle"`` otherwise. The first double blocks differ (the adapter's gradient reaches the image
    stream in block 0, the text stream's output in block 1 and its input in block 2); from there on
    blocks are alike, so a segment's peak is its block's profile on an offset linear in the block counts,
    and over the alike blocks it is largest at the first or the last of them: every label but
    ``"middle"`` is linear in the depth, and the step's peak is among them.
    """

    def __init__(self, transformer, tracker: LiveBytes):
        self.tracker, self.passes, self.backward = tracker, -1, False
        self.handles = [transformer.register_forward_pre_hook(self._new_pass)]
        for kind, blocks in (("double", transformer.transformer_blocks),
                             ("single", transformer.single_transformer_blocks)):
            for i, block in enumerate(blocks):
                self.handles.append(block.register_forward_pre_hook(partial(self._forward, kind, i, len(blocks))))
                self.handles.append(block.register_forward_hook(partial(self._output, kind, i, len(blocks))))
        self.handles.append(blocks[-1].register_forward_hook(self._post))

    @staticmethod
    def _labels(prefix: tuple, i: int, n: int) -> list[tuple]:
        out = [prefix + (i,)] if i < LEAD[prefix[-1]] else []
        out += [prefix + ("last",)] if i == n - 1 else []
        return out or [prefix + ("middle",)]

    def _new_pass(self, module, args) -> None:
        if not self.backward:
            self.passes += 1
            self.tracker.mark(("fwd", self.passes, "pre"))

    def _forward(self, kind, i, n, module, args) -> None:
        if not self.backward:  # recomputation under gradient checkpointing belongs to the backward segment
            self.tracker.mark(*self._labels(("fwd", self.passes, kind), i, n))

    def _post(self, module, args, out) -> None:
        if not self.backward:  # the last block ends its segment: what follows is alike at every depth
            self.tracker.mark(("fwd", self.passes, "post"))

    def _output(self, kind, i, n, module, args, out) -> None:
        hidden = out[1]
        if not self.backward and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._backward(kind, i, n))

    def _backward(self, kind, i, n) -> None:
        self.tracker.mark(*self._labels(("bwd", kind), i, n))

    def start_backward(self) -> None:
        self.backward = True
        self.tracker.mark(("bwd", "start"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class StepShape:
    """What a simulated step depends on."""

    method: str  # supervised | grpo | nft
    batch: int
    canvas: tuple[int, int]  # pixels (height with the reference strip, width)
    text_tokens: int
    num_tokens: int
    precision: str  # --mixed_precision
    checkpointing: bool
    grads_exist: bool  # accumulating into existing gradients (RL always; supervised with accumulation > 1)
    reference: bool  # a reference-adapter forward (KL weight > 0)
    copy_dtype: str  # --rl_copy_dtype (the reference copy)
    old_copy_dtype: str = ""  # the NFT old copy ("fp32" when it decays); "" = copy_dtype


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _sde_step(*args, **kwargs):
    """``sde_step_with_logprob`` with real noise levels: it validates them by value, which fake tensors lack."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .rl_ip.sampling import sde_step_with_logprob

    with unset_fake_temporarily():
        return sde_step_with_logprob(*args, **kwargs)


def _real(value: float, batch: int) -> torch.Tensor:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return torch.full((batch,), value, dtype=torch.float64)


def _model(spec: ModelSpec, weight_dtype, num_tokens: int, with_vae: bool):
    """A :class:`~train.models.calligrapher.Calligrapher` of fake tensors (call under a fake mode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .models.calligrapher import Calligrapher

    with unset_fake_temporarily():  # the scheduler reads tensor values at construction
        scheduler = FlowMatchEulerDiscreteScheduler()

    with default_dtype(weight_dtype):
        transformer = spec.build_transformer()
        vae = spec.build_vae() if with_vae else _VaeStub(spec.vae)
    adapter = spec.build_adapter(transformer, num_tokens)
    pipe = FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return Calligrapher(pipe, None, None, adapter)


class _VaeStub(torch.nn.Module):
    """Only the VAE config (scale factor, latent channels) for steps that run no VAE."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict({**config, "block_out_channels": list(config["block_out_channels"])})


def _state_tensors(model) -> list[torch.Tensor]:
    mods = [model.transformer, model.adapter] + ([model.vae] if hasattr(model.vae, "encoder") else [])
    return [t for m in mods for t in list(m.parameters()) + list(m.buffers())]


def _condition(model, shape: StepShape, latent_hw):
    from .models.calligrapher import FillConditioning

    cfg = model.transformer.config
    b, dtype = shape.batch, model.dtype
    h, w = latent_hw
    tokens = (h // 2) * (w // 2)
    return FillConditioning(
        cond_latents=torch.randn(b, tokens, 320, dtype=dtype),
        prompt_embeds=torch.randn(b, shape.text_tokens, cfg.joint_attention_dim, dtype=dtype),
        pooled_prompt_embeds=torch.randn(b, cfg.pooled_projection_dim, dtype=dtype),
        text_ids=torch.zeros(shape.text_tokens, 3, dtype=dtype), img_ids=torch.zeros(tokens, 3, dtype=dtype),
        style_embeds=torch.randn(b, model.adapter.image_proj.mlp.proj[0].in_features, dtype=dtype),
        guidance=torch.ones(b), latent_size=(h, w))


def _autocast(shape: StepShape):
    if shape.precision == "no":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=DTYPES[shape.precision])


def _trained_step(model, shape: StepShape, cond, copies, marks: _BlockMarks) -> None:
    """One backward of the method: the loops' own step functions (inputs drawn inside the measured region)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .flow_matching import flow_matching_loss, interpolate
    from .rl_logic.grpo_trainer import grpo_step_loss
    from .rl_logic.nft_trainer import nft_step_loss

    b, dtype = shape.batch, model.dtype
    tokens = cond.cond_latents.shape[1]
    autocast = partial(_autocast, shape)
    ref = copies["ref"] if shape.reference else None
    if shape.method == "supervised":
        sigma = torch.full((b,), 0.5)
        x0, noise = torch.randn(b, tokens, 64, dtype=dtype), torch.randn(b, tokens, 64, dtype=dtype)
        with autocast():
            pred = model.velocity(interpolate(x0, noise, sigma), sigma, cond)
        loss = flow_matching_loss(pred, noise - x0, torch.ones(b, tokens))
    elif shape.method == "grpo":
        x, x_next = torch.randn(b, tokens, 64), torch.randn(b, tokens, 64)
        old_log_prob, advantages, token_weights = torch.zeros(b), torch.ones(b), torch.ones(b, tokens)
        with unset_fake_temporarily():  # the step checks its noise levels by value: real ones, fake latents
            sigma, sigma_next = torch.full((b,), 0.5), torch.full((b,), 0.48)
            loss, _ = grpo_step_loss(model, cond, x, x_next, sigma, sigma_next, old_log_prob, advantages,
                                     autocast=autocast, noise_level=0.7, sde_type="sde", sigma_max=0.99,
                                     clip_range=0.2, adv_clip_max=5.0, kl_beta=0.1 if ref is not None else 0.0,
                                     ref=ref, token_weights=token_weights)
    else:
        x0, noise = torch.randn(b, tokens, 64), torch.randn(b, tokens, 64)
        loss, _ = nft_step_loss(model, cond, x0, noise, torch.full((b,), 0.5), torch.ones(b), autocast=autocast,
                                beta=0.5, adv_mode="normal", adv_clip_max=5.0, kl_beta=0.01, old=copies["old"],
                                ref=ref, valid=torch.ones(b, dtype=torch.bool), token_weights=torch.ones(b, tokens))
    marks.start_backward()
    loss.backward()


def _rollout_step(model, shape: StepShape, cond, copies, marks: _BlockMarks) -> None:
    """One sampler step without gradients (NFT samples with the old copy)."""
    x = torch.randn(shape.batch, cond.cond_latents.shape[1], 64)
    params = copies.get("old") if shape.method == "nft" else None
    with torch.no_grad(), _autocast(shape):
        v = model.velocity(x.to(model.dtype), 0.5, cond, params=params)
    b = shape.batch
    _sde_step(v, _real(0.5, b), _real(0.48, b), x, 0.7 if shape.method == "grpo" else 0.0, sigma_max=0.99)


def _depth_peaks(spec: ModelSpec, shape: StepShape) -> dict[str, dict[tuple, int]]:
    """Per phase (``train``, ``rollout``), the peak working bytes of every segment label (:class:`_BlockMarks`)
    of the trained step and of a rollout step at ``spec``'s depth."""
    weight_dtype = DTYPES[shape.precision]
    h, w = shape.canvas[0] // 8, shape.canvas[1] // 8
    out = {}
    with _fake_mode():
        model = _model(spec, weight_dtype, shape.num_tokens, with_vae=False)
        if shape.checkpointing:
            model.transformer.enable_gradient_checkpointing()
        adapter = model.adapter
        adapter.train()
        stored = {"ref": shape.copy_dtype, "old": shape.old_copy_dtype or shape.copy_dtype}
        copies = {name: {n: t.detach().to(DTYPES["bf16" if stored[name] == "bf16" else "no"], copy=True)
                         for n, t in adapter.state_dict().items()} for name in ("ref", "old")}
        state = _state_tensors(model) + [t for c in copies.values() for t in c.values()]
        if shape.grads_exist:
            for p in adapter.parameters():
                p.grad = torch.zeros_like(p)
                state.append(p.grad)
        for phase, run in (("train", _trained_step), ("rollout", _rollout_step)):
            tracker = LiveBytes()
            tracker.ignore(state)
            marks = _BlockMarks(model.transformer, tracker)
            with tracker:
                cond = _condition(model, shape, (h, w))
                run(model, shape, cond, copies, marks)
                del cond
            tracker.close()
            marks.remove()
            out[phase] = dict(tracker.segments)
            if not shape.grads_exist:  # gradients the step created are state, counted by the planner
                for p in adapter.parameters():
                    p.grad = None
    return out


def _vae_peaks(spec: ModelSpec, shape: StepShape) -> dict[str, int]:
    """Working bytes of the conditioning / source encodes and of decoding a rollout batch."""
    weight_dtype = DTYPES[shape.precision]
    b, (height, width) = shape.batch, shape.canvas
    out = {}
    with _fake_mode():
        model = _model(spec.with_depth(1, 1), weight_dtype, shape.num_tokens, with_vae=True)
        tracker = LiveBytes()
        tracker.ignore(_state_tensors(model))
        with tracker:
            source, mask = torch.rand(b, 3, height, width) * 2 - 1, torch.zeros(b, 1, height, width)
            cond = _condition(model, shape, (height // 8, width // 8))
            model.prepare_condition(source, mask, cond.prompt_embeds, cond.pooled_prompt_embeds, cond.text_ids,
                                    cond.style_embeds, 3.5)
            if shape.method == "supervised":
                model.encode_latents(source)
        out["vae_encode"] = tracker.peak
        tracker = LiveBytes()
        tracker.ignore(_state_tensors(model))
        with tracker:
            model.decode_latents(torch.randn(b, (height // 16) * (width // 16), 64), (height // 8, width // 8))
        out["vae_decode"] = tracker.peak
    return out


def _cache_key(spec: ModelSpec, shape: StepShape) -> str:
    return json.dumps([spec.transformer, spec.vae, spec.siglip, asdict(shape)], sort_keys=True, default=str)


def _from_key(key: str) -> tuple[ModelSpec, StepShape]:
    transformer, vae, siglip, shape = json.loads(key)
    shape["canvas"] = tuple(shape["canvas"])
    return ModelSpec(transformer, vae, None, None, siglip, ""), StepShape(**shape)


@lru_cache(maxsize=64)
def _simulate_cached(key: str) -> tuple[tuple[str, int], ...]:
    spec, shape = _from_key(key)
    _quiet()
    peaks = transformer_peaks(spec, shape)
    # the VAE's work depends only on the canvas, the batch, the dtype and whether the source is encoded too
    vae_shape = replace(shape, method="supervised" if shape.method == "supervised" else "grpo", checkpointing=False,
                        grads_exist=False, reference=False, copy_dtype="bf16")
    peaks.update(_vae_cached(_cache_key(spec, vae_shape)))
    return tuple(sorted(peaks.items()))


@lru_cache(maxsize=16)
def _vae_cached(key: str) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(_vae_peaks(*_from_key(key)).items()))


def transformer_peaks(spec: ModelSpec, shape: StepShape) -> dict[str, int]:
    """Peak working bytes of the trained step and of a rollout step at ``spec``'s full depth."""
    double, single = spec.blocks
    d0, s0 = LEAD["double"], LEAD["single"]
    if double <= d0 + 1 and single <= s0 + 1:
        peaks = {phase: max(labels.values()) for phase, labels in _depth_peaks(spec, shape).items()}
    else:  # every labelled segment's peak is linear in each block count: extrapolate from three shallow runs
        base = _depth_peaks(spec.with_depth(d0, s0), shape)
        plus_d = _depth_peaks(spec.with_depth(d0 + 1, s0), shape)
        plus_s = _depth_peaks(spec.with_depth(d0, s0 + 1), shape)
        peaks = {phase: max(v + (double - d0) * (plus_d[phase][k] - v) + (single - s0) * (plus_s[phase][k] - v)
                            for k, v in labels.items() if k[-1] != "middle") for phase, labels in base.items()}
    return peaks


def simulate_step(spec: ModelSpec, shape: StepShape) -> dict[str, int]:
    """Peak working bytes beyond the run's state, per phase of a step:

    ``train`` (one trained forward/backward of the method, with the gradients it creates when
    none existed), ``rollout`` (one sampler step without gradients), ``vae_encode`` (the
    conditioning's masked-image encode, and the source encode in supervised steps) and
    ``vae_decode`` (decoding a rollout batch).
    """
    return dict(_simulate_cached(_cache_key(spec, shape)))


def optimizer_step_bytes(numels: tuple[int, ...], fused: bool = True, max_grad_norm: float = 1.0) -> int:
    """Temporaries of gradient clipping and one ``torch.optim.AdamW`` step beyond parameters, gradients and
    state. The trainer's ``fused=True`` step updates in place; ``fused=False`` measures PyTorch's default on
    CUDA, ``foreach``, whose intermediates run over all tensors at once and are as large as the adapter."""
    return _optimizer_cached(tuple(numels), fused, max_grad_norm)


@lru_cache(maxsize=16)
def _optimizer_cached(numels: tuple[int, ...], fused: bool, max_grad_norm: float) -> int:
    with _fake_mode():
        params = [torch.nn.Parameter(torch.zeros(n)) for n in numels]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
        opt.step()  # creates the state (counted by the planner)
        tracker = LiveBytes()
        tracker.ignore(params + [p.grad for p in params]
                       + [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)])
        with tracker:
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            opt.step()
        return tracker.peak

