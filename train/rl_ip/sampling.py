"""Stochastic flow-matching sampling with per-step log-probabilities (docs/ARCHITECTURE.md §7), as pure tensor functions.

One step function both draws a transition and re-scores a stored one (``prev_sample=``); σ is passed
explicitly and no scheduler state is touched. Deterministic sampling is the ``noise_level=0`` case of the
same code (for ``sde_type="sde"`` it is bit-identical to the plain Euler step ``x + (σ' − σ)·v``).

For step i with σ = σ_i, σ' = σ_{i+1}, dt = σ' − σ (negative), velocity v and noise level a:

- ``"sde"`` (flow_grpo's default): std_t = a·sqrt(σ / (1 − σ)) (σ = 1 uses ``sigma_max`` = σ_1 in the
  denominator), mean = x·(1 + std_t²·dt/(2σ)) + v·(1 + std_t²·(1 − σ)/(2σ))·dt, transition std s = std_t·sqrt(−dt).
- ``"cps"`` (coefficients-preserving sampling): std_t = σ'·sin(aπ/2), x̂0 = x − σv, x̂1 = x + (1 − σ)v,
  mean = (1 − σ')·x̂0 + sqrt(σ'² − std_t²)·x̂1, transition std s = std_t.

x' = mean + s·ε, and the log-probability is the Gaussian log-density of x' under N(mean, s²) averaged over all
non-batch elements. The per-sample scalars (σ, dt, coefficients) are computed in float64 on the CPU (σ given
as a device tensor is copied there) and then rounded to float32; every tensor the size of a latent is float32.

The sampling loop that chains the step (:func:`denoise`) is here too, for a velocity given as a function:
RL rollouts, held-out evaluation and inference all run it. Also here: which steps are stochastic (flow_grpo's
SDE window) and which are trained (GRPO / DiffusionNFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

SDE_TYPES = ("sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def per_sample_values(value, batch: int, name: str) -> torch.Tensor:
    """A python float, 0-dim or ``[B]`` tensor -> float64 CPU tensor ``[B]``."""
    # A python float stays float64 here (torch.as_tensor alone would round it to float32 first).
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
    t = t.to("cpu", torch.float64)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a float, a 0-dim tensor or a [B={batch}] tensor, got shape {tuple(t.shape)}")
    return t


def _draw_noise(sample: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal float32 noise shaped like ``sample``. A list of generators draws sample i's noise with
    generator i alone, so one sample's noise never depends on its batch-mates."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != sample.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {sample.shape[0]}")
        shape = sample.shape[1:]
        draws = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack([d.to(sample.device) for d in draws])
    device = generator.device if generator is not None else sample.device
    return torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32).to(sample.device)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator=None,
    sde_type: str = "sde",
    sigma_max: float | None = None,
    token_weights: torch.Tensor | None = None,
):
    """One denoising step from σ to σ' that draws (or re-scores) x' and returns its log-probability.

    Args:
        velocity: model velocity ``[B, ...]``, any float dtype; gradients flow from ``log_prob`` and
            ``prev_sample_mean`` back to it.
        sigma, sigma_next: python floats, 0-dim or ``[B]`` tensors (per-sample), with 0 < σ <= 1 and 0 <= σ' <= σ.
        sample: current latents x ``[B, ...]``.
        noise_level: a >= 0. With a = 0 the step is deterministic.
        prev_sample: ``[B, ...]`` latents to re-score; None draws new ones.
        generator: a ``torch.Generator`` for the whole batch, a list of B generators (one per sample) or None.
        sde_type: ``"sde"`` or ``"cps"`` (module docstring).
        sigma_max: σ_1 of the schedule, used in the ``"sde"`` std where σ = 1 (needed only when a > 0).
        token_weights: optional ``[B, L]`` weights of the tokens of ``[B, L, C]`` latents in the log-probability:
            the squared error is then averaged over channels and weighted over tokens (the trainers pass 1 on the
            source region, 0 on the in-context reference strip, which is cropped off before scoring). None = the
            plain mean over every non-batch element.

    Returns:
        ``(prev_sample [B, ...], log_prob [B], prev_sample_mean [B, ...], std_dev_t [B])``, all float32.
        ``std_dev_t`` is std_t (for ``"sde"`` not multiplied by sqrt(−dt)). Where the transition std is 0
        (a = 0, or the last ``"cps"`` step where σ' = 0) x' is the mean exactly and there is no density:
        ``log_prob`` is 0 there. A step whose transitions all have std 0 draws no noise. A drawn
        ``prev_sample`` keeps its autograd link to ``velocity``: detach it before storing.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} differ in shape")
    batch = sample.shape[0]
    sig = per_sample_values(sigma, batch, "sigma")
    sig_next = per_sample_values(sigma_next, batch, "sigma_next")
    if not bool(((sig > 0) & (sig <= 1)).all()):
        raise ValueError(f"sigma must lie in (0, 1], got {sig.tolist()}")
    if not bool(((sig_next >= 0) & (sig_next <= sig)).all()):
        raise ValueError(f"sigma_next must lie in [0, sigma], got sigma={sig.tolist()} sigma_next={sig_next.tolist()}")
    dt = sig_next - sig

    if sde_type == "sde":
        at_one = sig == 1
        if noise_level == 0:  # deterministic; σ = 1 needs no guard
            std_t = torch.zeros_like(sig)
        else:
            denom = 1 - sig
            if bool(at_one.any()):
                if sigma_max is None:
                    raise ValueError("sigma == 1 needs sigma_max (the schedule's second sigma) for the sde std")
                if not 0 < float(sigma_max) < 1:
                    raise ValueError(f"sigma_max must lie in (0, 1), got {float(sigma_max)}")
                denom = torch.where(at_one, 1 - float(sigma_max), denom)
            std_t = noise_level * torch.sqrt(sig / denom)
        coef_x = 1 + std_t**2 * dt / (2 * sig)
        coef_v = (1 + std_t**2 * (1 - sig) / (2 * sig)) * dt
        step_std = std_t * torch.sqrt(-dt)
    else:
        std_t = sig_next * math.sin(noise_level * math.pi / 2)
        step_std = std_t

    def per_sample(t: torch.Tensor) -> torch.Tensor:  # [B] float64 CPU -> [B] float32 beside the latents
        return t.to(sample.device, torch.float32)

    def latent(t: torch.Tensor) -> torch.Tensor:  # [B] float64 CPU -> float32 broadcastable over the latent
        return per_sample(t).view(-1, *([1] * (sample.ndim - 1)))

    x, v = sample.float(), velocity.float()
    if sde_type == "sde":
        # x·1 == x and v·dt exactly in IEEE arithmetic, so a = 0 reproduces x + dt·v bit for bit.
        mean = x * latent(coef_x) + v * latent(coef_v)
    else:
        x0_hat = x - latent(sig) * v
        x1_hat = x + latent(1 - sig) * v
        mean = latent(1 - sig_next) * x0_hat + latent(torch.sqrt((sig_next**2 - std_t**2).clamp(min=0))) * x1_hat

    has_density = step_std > 0
    s = latent(step_std)
    if prev_sample is None:
        prev_sample = mean + s * _draw_noise(sample, generator) if bool(has_density.any()) else mean
    else:
        if prev_sample.shape != sample.shape:
            raise ValueError(f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} differ in shape")
        prev_sample = prev_sample.float()

    # log N(x'; mean, s²) = −(x' − mean)²/(2s²) − log s − log sqrt(2π); the constant terms leave the element mean.
    # Where s = 0 a stand-in std of 1 keeps the masked branch (and its gradient) finite.
    safe_std = torch.where(has_density, step_std, torch.ones_like(step_std))
    sq = token_mean((prev_sample.detach() - mean) ** 2, token_weights)
    log_prob = -sq / per_sample(2 * safe_std**2) - per_sample(torch.log(safe_std) + _LOG_SQRT_2PI)
    log_prob = torch.where(has_density.to(sample.device), log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob, mean, per_sample(std_t)


@dataclass
class Trajectory:
    """One sampled batch. ``latents[:, s]`` -> ``next_latents[:, s]`` is stochastic step ``steps[s]``."""

    final: torch.Tensor  # [B, L, C] clean latents
    steps: list[int] = field(default_factory=list)  # [S] the recorded (stochastic) step indices, ascending
    latents: torch.Tensor | None = None  # [B, S, L, C] float32
    next_latents: torch.Tensor | None = None  # [B, S, L, C] float32
    log_probs: torch.Tensor | None = None  # [B, S]
    means: torch.Tensor | None = None  # [B, S, L, C] the steps' means (kept for GRPO-Guard only)


@torch.no_grad()
def denoise(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
            stochastic: range | None = None, noise_level: float = 0.0, generators=None, sde_type: str = "sde",
            token_weights: torch.Tensor | None = None, keep_means: bool = False) -> Trajectory:
    """Sample from the noise ``x [B, L, C]`` along ``sigmas [T + 1]`` with ``velocity(x, sigma) -> v``.

    Steps in ``stochastic`` draw from the SDE with ``generators`` (one per sample) and are recorded (never the
    final step); every other step is the deterministic (``noise_level=0``) case of the same step function.
    ``token_weights [B, L]`` weight the recorded log-probabilities' tokens. Between steps ``x`` keeps the dtype
    it starts in: float32 for RL rollouts, the model's dtype at inference (as ``FluxFillPipeline`` does).
    """
    num_steps = len(sigmas) - 1
    record = [i for i in (stochastic or ()) if i < num_steps - 1]
    lat, nxt, logp, means = [], [], [], []
    for i in range(num_steps):
        v = velocity(x, sigmas[i])
        noisy = i in record
        x_next, log_prob, mean, _ = sde_step_with_logprob(
            v, sigmas[i], sigmas[i + 1], x, noise_level if noisy else 0.0, generator=generators if noisy else None,
            sde_type=sde_type, sigma_max=float(sigmas[1]), token_weights=token_weights if noisy else None)
        if noisy:
            lat.append(x)
            nxt.append(x_next)
            logp.append(log_prob)
            if keep_means:
                means.append(mean)
        x = x_next.to(x.dtype)
    if not record:
        return Trajectory(final=x)
    return Trajectory(final=x, steps=record, latents=torch.stack(lat, 1), next_latents=torch.stack(nxt, 1),
                      log_probs=torch.stack(logp, 1), means=torch.stack(means, 1) if keep_means else None)


def token_mean(x: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, ...]`` -> ``[B]``: the mean over every non-batch element, or with ``token_weights [B, L]`` (for
    ``[B, L, C]``) the token-weighted mean of the per-token channel means, sum_l w_l·x̄_l / sum_l w_l."""
    if token_weights is None:
        return x.mean(dim=tuple(range(1, x.ndim)))
    if x.ndim < 2 or token_weights.shape != x.shape[:2]:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must be [B, L] of latents {tuple(x.shape)}")
    w = token_weights.to(x.device, torch.float32)
    per_token = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x
    return (per_token * w).sum(1) / w.sum(1).clamp_min(1e-8)


def check_sde_window(num_steps: int, window_size: int, window_range: tuple[int, int] | None,
                     default_range: tuple[int, int] | None = None) -> list[str]:
    """Problems with an SDE window setting, one message per problem (empty when valid).

    ``default_range`` is the range used when ``window_range`` is None (``(0, num_steps − 1)`` if None too)."""
    if num_steps < 2:
        return [f"--rl_num_inference_steps must be >= 2 (the last step is never stochastic), got {num_steps}"]
    if window_size < 0:
        return [f"--rl_sde_window_size must be >= 0 (0 = every step but the last stochastic), got {window_size}"]
    if window_size == 0:
        if window_range is not None:
            return [
                "--rl_sde_window_range needs --rl_sde_window_size > 0 "
                "(size 0 makes every step but the last stochastic)"
            ]
        return []
    if window_range is None:
        window_range = default_range or (0, num_steps - 1)
    if len(window_range) != 2:
        return [f"--rl_sde_window_range must be two step indices lo,hi, got {tuple(window_range)}"]
    lo, hi = window_range
    if not 0 <= lo < hi <= num_steps - 1:
        return [
            f"--rl_sde_window_range {lo},{hi} must satisfy 0 <= lo < hi <= {num_steps - 1} "
            f"(--rl_num_inference_steps {num_steps} minus the last step)"
        ]
    if window_size > hi - lo:
        return [f"--rl_sde_window_size {window_size} does not fit in --rl_sde_window_range {lo},{hi} ({hi - lo} steps)"]
    return []


def sde_window(num_steps: int, window_size: int, window_range: tuple[int, int] | None, generator,
               default_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """Step indices ``[start, end)`` that sample stochastically (flow_grpo's "Fast" mode); the others use a = 0.

    ``window_size`` 0 gives ``default_range``, by default ``(0, num_steps − 1)``: every step but the last.
    Otherwise ``start`` is drawn uniformly (with the torch ``generator``) so that the window of ``window_size``
    steps lies inside ``window_range = (lo, hi)``, by default ``default_range``.
    """
    problems = check_sde_window(num_steps, window_size, window_range, default_range)
    if problems:
        raise ValueError("; ".join(problems))
    full = default_range or (0, num_steps - 1)
    if window_size == 0:
        return full
    lo, hi = window_range if window_range is not None else full
    start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator, device=_device(generator)).item())
    return start, start + window_size


def _device(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _count(fraction: float, n: int) -> int:
    """ceil(fraction·n), at least 1 for n > 0. The tolerance keeps 0.28·25 = 7.000000000000001 at 7."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--rl_timestep_fraction must lie in (0, 1], got {fraction}")
    return min(n, max(1, math.ceil(fraction * n - 1e-9))) if n > 0 else 0


def choose_train_steps(candidates: list[int], fraction: float, generator) -> list[int]:
    """A uniformly random subset of ``candidates`` of size ceil(fraction·len), sorted ascending (GRPO, docs/ARCHITECTURE.md §7)."""
    k = _count(fraction, len(candidates))
    order = torch.randperm(len(candidates), generator=generator, device=_device(generator))[:k].tolist()
    return sorted(candidates[i] for i in order)


def nft_train_steps(num_steps: int, fraction: float, generator) -> list[int]:
    """The first ceil(fraction·num_steps) entries of a random permutation of the steps (DiffusionNFT, docs/ARCHITECTURE.md §8)."""
    k = _count(fraction, num_steps)
    return torch.randperm(num_steps, generator=generator, device=_device(generator))[:k].tolist()
