"""The GRPO policy loss (docs/ARCHITECTURE.md §7) as a pure tensor function: clipped ratio objective plus a KL penalty
to the frozen reference adapter, measured between the two SDE step means.

Also here: the GRPO-Guard terms (ratio normalisation and per-step gradient weight), which the loss takes
through its ``guard=`` argument. Every argument after the three ``[B]`` tensors is keyword-only."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .sampling import per_sample_values, token_mean


class GuardTerms(NamedTuple):
    """GRPO-Guard terms of one trained step for a micro-batch of B samples (``grpo_guard_terms``' result)."""

    log_ratio: torch.Tensor  # [B] normalised log-ratio ℓ̂; the guarded ratio is exp(ℓ̂)
    weight: torch.Tensor  # [B] per-step gradient weight w = 1 / (σ − σ')


def grpo_guard_terms(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    prev_sample: torch.Tensor,
    std_dev_t: torch.Tensor | float,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    sde_type: str = "sde",
    token_weights: torch.Tensor | None = None,
) -> GuardTerms:
    """GRPO-Guard's normalised log-ratio and per-step gradient weight of one ``"sde"`` step.

    Notation (that of ``sde_step_with_logprob``): step σ -> σ' with dt = σ' − σ < 0, std_t the step's std_t,
    s = std_t·sqrt(−dt) the transition std, x' the stored next latents, μ_θ the step mean under the current
    adapter and μ_old the step mean at rollout time, Δμ = μ_θ − μ_old; ⟨·⟩ is the per-sample mean over the
    D non-batch elements that ``sde_step_with_logprob`` uses (token-weighted with ``token_weights``);
    Δ = log p_θ(x'|x) − log p_old(x'|x) with its element-averaged log-density
    log p = −⟨(x' − μ)²⟩/(2s²) − log s − log sqrt(2π).

    The plain log-ratio is Δ = ⟨Δμ·(x' − μ_old)⟩/s² − ⟨Δμ²⟩/(2s²): with x' = μ_old + s·ε its mean is
    −⟨Δμ²⟩/(2s²) < 0 (the ratio's left shift) and its spread ∝ 1/s varies from step to step.

    Ratio normalisation (GRPO-Guard's RatioNorm) removes the shift and multiplies by s:

        ℓ̂ = s·(Δ + ⟨Δμ²⟩/(2s²)) = ⟨Δμ·(x' − μ_old)⟩ / s        (= ⟨Δμ·ε⟩ for x' = μ_old + s·ε)

    and the guarded ratio is exp(ℓ̂). The last form is the one computed: it is the same function of θ (s does
    not depend on θ, so value and gradient agree with the first form in exact arithmetic), it is exactly 0 when
    μ_θ equals μ_old (so the ratio is exactly 1 on-policy, whatever the log-probs' rounding), and it avoids
    subtracting two O(1) float32 log-probabilities, whose rounding is of the size of ℓ̂ itself at latent sizes.

    Gradient re-weighting: ∂μ/∂v = (1 + std_t²(1 − σ)/(2σ))·dt = (1 + a²/2)·dt for σ < 1, so ∂ℓ̂/∂v is
    proportional to dt; the per-step weight

        w = 1 / (−dt) = 1 / (σ − σ')

    multiplies the step's clipped policy term (``grpo_loss(..., guard=...)``), making the gradient with respect
    to the velocity −(1 + a²/2)·ε/D at every step.

    Args:
        mean: ``[B, ...]`` μ_θ (``sde_step_with_logprob``'s third output under θ; carries the gradient).
        old_mean: ``[B, ...]`` μ_old, the third output at rollout time (stored with the rollout).
        prev_sample: ``[B, ...]`` x', the stored next latents that the step re-scores.
        std_dev_t: ``[B]`` or a scalar, std_t (``sde_step_with_logprob``'s fourth output, without sqrt(−dt)).
        sigma, sigma_next: ``[B]`` tensors or scalars, σ and σ' of each sample's step.
        sde_type: must be ``"sde"``; the weight is derived for that transition only.
        token_weights: the ``[B, L]`` token weights the log-probabilities were computed with (None: plain
            mean over every non-batch element), so that ⟨·⟩ is the same average.

    Returns:
        ``GuardTerms(log_ratio [B], weight [B])``, float32 on ``mean``'s device; ``log_ratio`` carries the
        gradient of ``mean``, ``weight`` none. ``old_mean`` and ``prev_sample`` are treated as constants.
    """
    if sde_type != "sde":
        raise ValueError(f"GRPO-Guard is defined for sde_type 'sde' (its weight 1/(-dt) is derived for that "
                         f"transition), got {sde_type!r}")
    if mean.ndim < 2 or mean.shape != old_mean.shape or mean.shape != prev_sample.shape:
        raise ValueError(f"mean {tuple(mean.shape)}, old_mean {tuple(old_mean.shape)} and prev_sample "
                         f"{tuple(prev_sample.shape)} must all be the same [B, ...] shape with at least one "
                         f"non-batch dimension")
    batch = mean.shape[0]
    sig, sig_next = per_sample_values(sigma, batch, "sigma"), per_sample_values(sigma_next, batch, "sigma_next")
    std = per_sample_values(std_dev_t, batch, "std_dev_t")
    gap = sig - sig_next  # −dt, float64
    if not bool(((sig > 0) & (sig <= 1) & (gap > 0)).all()):
        raise ValueError(f"GRPO-Guard needs 0 < sigma_next < sigma <= 1 per sample (dt < 0), got "
                         f"sigma={sig.tolist()} sigma_next={sig_next.tolist()}")
    if not bool((torch.isfinite(std) & (std > 0)).all()):
        raise ValueError(f"GRPO-Guard needs a stochastic step (finite std_dev_t > 0, i.e. noise level > 0), "
                         f"got std_dev_t={std.tolist()}")

    def per_sample(t: torch.Tensor) -> torch.Tensor:  # [B] float64 CPU -> [B] float32 beside the latents
        return t.to(mean.device, torch.float32)

    old = old_mean.detach().float()
    cross = token_mean((mean.float() - old) * (prev_sample.detach().float() - old), token_weights)
    return GuardTerms(log_ratio=cross / per_sample(std * torch.sqrt(gap)), weight=per_sample(1 / gap))


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std_dev_t: torch.Tensor | float | None = None,
    kl_beta: float = 0.0,
    guard: GuardTerms | tuple[torch.Tensor, torch.Tensor] | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one trained step for a micro-batch of B samples.

    Args:
        log_prob: ``[B]`` log p_θ(x' | x) under the current adapter (carries the gradient).
        old_log_prob: ``[B]`` the same transition's log-probability at rollout time.
        advantages: ``[B]``, clamped to ±``adv_clip_max``.
        clip_range: ε of the ratio clip [1 − ε, 1 + ε].
        mean, ref_mean: ``[B, ...]`` SDE step means under θ and under the reference adapter.
        std_dev_t: ``[B]`` or a scalar, the step's std_t (``sde_step_with_logprob``'s fourth output).
        kl_beta: β; the KL term is computed only when β > 0 (then ``mean``, ``ref_mean`` and ``std_dev_t``
            are required).
        guard: ``(log_ratio [B], weight [B])`` from ``grpo_guard_terms`` to train with GRPO-Guard: the ratio is
            then exp(log_ratio) (``log_prob`` enters only ``approx_kl`` and ``raw_ratio_mean``) and each
            sample's clipped term is multiplied by its weight before the batch mean. None: plain GRPO.
        token_weights: optional ``[B, L]`` token weights of ``[B, L, C]`` means, the ones the log-probabilities
            were computed with: the KL's "mean over elements" is then their token-weighted mean.

    Returns:
        ``(loss, info)``: loss = policy + β·KL with
        policy = mean(max(−A·ratio, −A·clamp(ratio, 1 − ε, 1 + ε))), ratio = exp(log_prob − old_log_prob),
        KL = mean over the batch of [mean over elements of (mean − ref_mean)² / (2·std_dev_t²)].
        With ``guard``: ratio = exp(log_ratio) and policy = mean(w·max(−A·ratio, −A·clamp(ratio, 1 − ε, 1 + ε))).
        ``info`` holds detached 0-dim float32 tensors: policy_loss, kl (0 when not computed),
        approx_kl = ½·mean(Δlogp²), clipfrac = mean(|ratio − 1| > ε), ratio_mean, ratio_min, ratio_max,
        adv_abs_mean (of the clamped advantages); with ``guard`` also raw_ratio_mean = mean(exp(Δlogp)) and
        guard_weight_mean = mean(w).
    """
    if not log_prob.shape == old_log_prob.shape == advantages.shape or log_prob.ndim != 1:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
            f"{tuple(advantages.shape)} must all be [B]"
        )
    adv = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    delta = log_prob.float() - old_log_prob.detach().float()
    if guard is None:
        ratio = torch.exp(delta)
    else:
        guard_log_ratio, weight = guard
        if guard_log_ratio.shape != log_prob.shape or weight.shape != log_prob.shape:
            raise ValueError(f"guard log_ratio {tuple(guard_log_ratio.shape)} and weight {tuple(weight.shape)} "
                             f"must both be [B={log_prob.shape[0]}] like log_prob")
        ratio = torch.exp(guard_log_ratio.float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    if guard is None:
        policy = torch.maximum(unclipped, clipped).mean()
    else:
        policy = (weight.detach().float() * torch.maximum(unclipped, clipped)).mean()

    kl = torch.zeros((), device=policy.device)
    if kl_beta > 0:
        if mean is None or ref_mean is None or std_dev_t is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std_dev_t for the KL to the reference adapter")
        if mean.shape != ref_mean.shape or mean.shape[0] != log_prob.shape[0]:
            raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must both be [B, ...]")
        std = torch.as_tensor(std_dev_t, dtype=torch.float32, device=mean.device)
        sq = token_mean((mean.float() - ref_mean.detach().float()) ** 2, token_weights)
        kl = (sq / (2 * std**2)).mean()
    loss = policy + kl_beta * kl

    info = {
        "policy_loss": policy,
        "kl": kl,
        "approx_kl": 0.5 * (delta**2).mean(),
        "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
        "adv_abs_mean": adv.abs().mean(),
    }
    if guard is not None:
        info["raw_ratio_mean"] = torch.exp(delta).mean()
        info["guard_weight_mean"] = weight.float().mean()
    return loss, {k: v.detach() for k, v in info.items()}
