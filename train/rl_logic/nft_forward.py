"""DiffusionNFT loss and old-adapter decay (docs/ARCHITECTURE.md §8): pure tensor functions, no accelerate, no model.

The trainer runs three velocity predictions on the same noised latents ``x_t = (1 - t)·x0 + t·ε``:
``v_theta`` (the adapter being trained), ``v_old`` (the rollout adapter) and ``v_ref`` (the adapter
at RL start). The current and old predictions define an implicit positive policy
``v⁺ = β·v_θ + (1 − β)·v_old`` and an implicit negative one ``v⁻ = (1 + β)·v_old − β·v_θ``; each
sample pulls ``v⁺``'s clean-image estimate towards its own x0 with weight r and ``v⁻``'s with
weight 1 − r, where r in [0, 1] comes from the sample's advantage.
"""

from __future__ import annotations

import torch

from ..rl_ip.sampling import token_mean

ADV_MODES = ("normal", "positive_only", "negative_only", "one_only", "binary")
DECAY_TYPES = (0, 1, 2)
MIN_X0_WEIGHT = 1e-5


def nft_r(advantages: torch.Tensor, adv_mode: str, adv_clip_max: float) -> torch.Tensor:
    """[B] advantages -> [B] float32 r in [0, 1] (``--nft_adv_mode``, ``--rl_adv_clip_max``).

    A = clamp(adv, ±max), then: normal = A; positive_only = clamp(A, 0, max); negative_only =
    clamp(A, −max, 0); one_only = 1 where A > 0 else 0; binary = sign(A). r = clamp(A / max / 2 + 0.5, 0, 1).
    """
    if adv_mode not in ADV_MODES:
        raise ValueError(f"unknown --nft_adv_mode {adv_mode!r}; choose one of {', '.join(ADV_MODES)}")
    if not adv_clip_max > 0:
        raise ValueError(f"--rl_adv_clip_max must be > 0 for DiffusionNFT, got {adv_clip_max}")
    a = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = a.clamp(0.0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = a.clamp(-adv_clip_max, 0.0)
    elif adv_mode == "one_only":
        a = (a > 0).float()
    elif adv_mode == "binary":
        a = torch.sign(a)
    return (a / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def nft_loss(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_theta: torch.Tensor, v_old: torch.Tensor,
             v_ref: torch.Tensor, advantages: torch.Tensor, *, beta: float, adv_mode: str, adv_clip_max: float,
             kl_beta: float, valid: torch.Tensor | None = None,
             token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss of one micro-batch at one timestep per sample.

    Args:
        x0, x_t, v_theta, v_old, v_ref: [B, L, C] (any float dtype; computed in float32). Only ``v_theta``
            receives gradient; the other tensors are detached.
        t: [B] noise level of x_t (x_t = (1 − t)·x0 + t·ε).
        advantages: [B]. beta: ``--nft_beta`` in (0, 1]. kl_beta: ``--rl_kl_beta``.
        valid: optional [B] bool; a sample whose reward failed (False) adds nothing to the policy term
            (its r = 0.5 would still pull v_θ once it differs from v_old). The mean stays over all B.
        token_weights: optional [B, L] weights of the tokens of [B, L, C] inputs; every "mean" over a sample's
            elements below is then the token-weighted mean of per-token channel means (the trainer passes 0 on
            the in-context reference strip, which is no target). None = the plain element mean.

    Returns ``(loss, info)``: loss is a 0-dim float32 tensor, ``policy + kl_beta·KL`` with
    policy = mean_b (r·L⁺ + (1 − r)·L⁻) / β · adv_clip_max, L± = mean((x̂0± − x0)²) / w±,
    x̂0± = x_t − t·v±, w± = mean|x̂0± − x0| (no gradient, ≥ 1e-5), KL = mean (v_θ − v_ref)².
    info holds detached 0-dim float32 tensors: policy_loss, kl, old_deviate = mean (v_θ − v_old)²,
    r_mean, r_min, r_max, loss_pos = mean L⁺, loss_neg = mean L⁻.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"--nft_beta must be in (0, 1], got {beta}")
    shape = v_theta.shape
    if v_theta.dim() < 2:
        raise ValueError(f"NFT velocities must be [B, ...] with at least 2 dims, got shape {tuple(shape)}")
    for name, x in (("x0", x0), ("x_t", x_t), ("v_old", v_old), ("v_ref", v_ref)):
        if x.shape != shape:
            raise ValueError(f"NFT loss: {name} has shape {tuple(x.shape)}, v_theta has {tuple(shape)}")
    for name, x in (("t", t), ("advantages", advantages)):
        if x.shape != shape[:1]:
            raise ValueError(f"NFT loss: {name} must have shape ({shape[0]},), got {tuple(x.shape)}")

    r = nft_r(advantages, adv_mode, adv_clip_max)
    v = v_theta.float()
    v_old, v_ref = v_old.detach().float(), v_ref.detach().float()
    x0, x_t = x0.detach().float(), x_t.detach().float()
    t = t.detach().float().view(-1, *([1] * (v.dim() - 1)))

    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v

    def weighted_x0_error(v_pm: torch.Tensor) -> torch.Tensor:
        err = x_t - t * v_pm - x0
        w = token_mean(err.detach().abs(), token_weights).clamp(min=MIN_X0_WEIGHT)
        return token_mean(err**2, token_weights) / w

    loss_pos, loss_neg = weighted_x0_error(v_pos), weighted_x0_error(v_neg)
    per_sample = (r * loss_pos + (1 - r) * loss_neg) / beta * adv_clip_max
    if valid is not None:
        per_sample = per_sample * valid.to(per_sample.device, per_sample.dtype)
    policy = per_sample.mean()
    kl = token_mean((v - v_ref) ** 2, token_weights).mean()
    loss = policy + kl_beta * kl
    info = {
        "policy_loss": policy, "kl": kl, "old_deviate": token_mean((v - v_old) ** 2, token_weights).mean(),
        "r_mean": r.mean(), "r_min": r.min(), "r_max": r.max(),
        "loss_pos": loss_pos.mean(), "loss_neg": loss_neg.mean(),
    }
    return loss, {k: x.detach().float() for k, x in info.items()}


def nft_decay(step: int, decay_type: int) -> float:
    """Decay d of the old-adapter update ``old ← d·old + (1 − d)·θ`` after RL optimizer step ``step``.

    0: d = 0 (old follows the current adapter); 1: d = min(0.001·s, 0.5);
    2: d = 0 for s < 75, else min(0.0075·(s − 75), 0.999).
    """
    if decay_type not in DECAY_TYPES or isinstance(decay_type, bool):
        raise ValueError(f"unknown --nft_decay_type {decay_type!r}; choose one of 0, 1, 2")
    if step < 0:
        raise ValueError(f"NFT decay step must be >= 0, got {step}")
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * step, 0.5)
    return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
