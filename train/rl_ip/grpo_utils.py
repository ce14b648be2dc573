"""The GRPO policy loss (SPEC §7) as a pure tensor function: clipped ratio objective plus a KL penalty
to the frozen reference adapter, measured between the two SDE step means."""

from __future__ import annotations

import torch


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std_dev_t: torch.Tensor | float | None = None,
    kl_beta: float = 0.0,
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

    Returns:
        ``(loss, info)``: loss = policy + β·KL with
        policy = mean(max(−A·ratio, −A·clamp(ratio, 1 − ε, 1 + ε))), ratio = exp(log_prob − old_log_prob),
        KL = mean over the batch of [mean over elements of (mean − ref_mean)² / (2·std_dev_t²)].
        ``info`` holds detached 0-dim float32 tensors: policy_loss, kl (0 when not computed),
        approx_kl = ½·mean(Δlogp²), clipfrac = mean(|ratio − 1| > ε), ratio_mean, ratio_min, ratio_max,
        adv_abs_mean (of the clamped advantages).
    """
    if not log_prob.shape == old_log_prob.shape == advantages.shape or log_prob.ndim != 1:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
            f"{tuple(advantages.shape)} must all be [B]"
        )
    adv = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    delta = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(delta)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()

    kl = torch.zeros((), device=policy.device)
    if kl_beta > 0:
        if mean is None or ref_mean is None or std_dev_t is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std_dev_t for the KL to the reference adapter")
        if mean.shape != ref_mean.shape or mean.shape[0] != log_prob.shape[0]:
            raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must both be [B, ...]")
        std = torch.as_tensor(std_dev_t, dtype=torch.float32, device=mean.device)
        sq = ((mean.float() - ref_mean.detach().float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
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
    return loss, {k: v.detach() for k, v in info.items()}
