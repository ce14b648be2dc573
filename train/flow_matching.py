"""Supervised flow matching for FLUX-Fill, as pure tensor functions (docs/ARCHITECTURE.md §6).

``x_t = (1 - sigma) * x0 + sigma * eps``, target velocity ``eps - x0``; ``sigma`` drawn from a
logit-normal density (mean 0, std 1) and mapped through the scheduler's training sigmas.
"""

from __future__ import annotations

import torch


def sample_sigmas(normal: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Standard-normal draws ``[B]`` -> noise levels ``[B]``: u = sigmoid(n), index = floor(u * T) into ``train_sigmas``.

    ``train_sigmas`` are the scheduler's ``T`` training sigmas, descending from 1 (FLUX: T = 1000).
    """
    u = torch.sigmoid(normal)
    idx = (u * len(train_sigmas)).long().clamp_(0, len(train_sigmas) - 1)
    return train_sigmas[idx]


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` with ``sigma [B]`` broadcast over ``x0 [B, ...]``."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def target_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``eps - x0``: ``d x_t / d sigma`` along :func:`interpolate`'s straight line,
    so an Euler step ``x_t + (sigma' - sigma) * v`` (the sampler's) stays on it."""
    return noise - x0


def token_weights(mask: torch.Tensor, region: torch.Tensor, masked_weight: float) -> torch.Tensor:
    """Per packed-token loss weights ``[B, L]``.

    ``mask`` and ``region`` are ``[B, L]`` fractions in [0, 1] of each 16x16-pixel token covered
    by the inpainting mask and by the source region (the in-context strip is not a target).
    Weight = region * (1 + (masked_weight - 1) * mask).
    """
    return region * (1 + (masked_weight - 1) * mask)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE: per sample ``sum_l w_l * mean_c (pred - target)^2 / sum_l w_l``, then the batch mean.

    pred, target ``[B, L, C]``; weights ``[B, L]``.
    """
    err = (pred.float() - target.float()).square().mean(-1)
    per_sample = (err * weights).sum(-1) / weights.sum(-1).clamp_min(1e-8)
    return per_sample.mean()


def pixel_mask_to_tokens(mask: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """``[B, 1, H, W]`` in [0, 1] -> ``[B, (H/16)*(W/16)]`` fraction covered, in FLUX's packing order."""
    pooled = torch.nn.functional.avg_pool2d(mask.float(), patch)
    return pooled.flatten(1)


def source_region_tokens(mask: torch.Tensor, boxes) -> torch.Tensor:
    """``[B, L]`` fraction of each packed token inside sample i's source box ``(left, top, right, bottom)``
    on a ``[B, 1, H, W]`` canvas (``mask`` gives the canvas shape): the in-context reference strip gets 0."""
    region = torch.zeros_like(mask, dtype=torch.float32)
    for i, (left, top, right, bottom) in enumerate(boxes):
        region[i, :, top:bottom, left:right] = 1
    return pixel_mask_to_tokens(region)
