"""The supervised objective (docs/ARCHITECTURE.md §6) against hand computations and against the sampler it trains."""

from __future__ import annotations

import math

import pytest
import torch

from train.flow_matching import (flow_matching_loss, interpolate, pixel_mask_to_tokens, sample_sigmas,
                                 target_velocity, token_weights)
from train.models.calligrapher import Calligrapher

SIGMAS = [0.0, 0.05, 0.3, 0.5, 0.77, 1.0]


def _draw(shape=(len(SIGMAS), 4, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_interpolate_by_hand():
    x0, eps = torch.tensor([[2.0, -4.0]]), torch.tensor([[-1.0, 8.0]])
    assert interpolate(x0, eps, torch.tensor([0.25])).tolist() == [[1.25, -1.0]]  # 0.75*x0 + 0.25*eps
    assert torch.equal(interpolate(x0, eps, torch.tensor([0.0])), x0)
    assert torch.equal(interpolate(x0, eps, torch.tensor([1.0])), eps)
    assert target_velocity(x0, eps).tolist() == [[-3.0, 12.0]]


def test_per_sample_sigma_broadcasts_over_tokens_and_channels():
    x0, eps = _draw()
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x_t = interpolate(x0, eps, sigma)
    for i, s in enumerate(SIGMAS):
        assert torch.allclose(x_t[i], (1 - s) * x0[i] + s * eps[i], atol=1e-15, rtol=0)


def test_predicted_clean_latent_from_the_true_velocity_is_x0():
    """What the sampler does with the model's output: x0 = x_t - sigma * v (float64, exact to rounding)."""
    x0, eps = _draw()
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x_t = interpolate(x0, eps, sigma)
    x0_hat = x_t - sigma.view(-1, 1, 1) * target_velocity(x0, eps)
    assert torch.allclose(x0_hat, x0, atol=1e-12, rtol=0)


def test_one_euler_step_of_the_pipeline_scheduler_stays_on_the_straight_line():
    """FluxFillPipeline's sampler (FlowMatchEulerDiscreteScheduler.step) moved by the true velocity
    lands on interpolate(x0, eps, sigma_next): the training target is the velocity the sampler integrates."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from train.models.tiny import SCHEDULER

    x0, eps = _draw((1, 4, 3), seed=1)
    x0, eps = x0.float(), eps.float()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    scheduler.set_timesteps(sigmas=[1.0, 0.8, 0.45, 0.1], mu=0.7)  # shifted: non-uniform steps
    sig = scheduler.sigmas
    x = interpolate(x0, eps, sig[:1])
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(target_velocity(x0, eps), t, x, return_dict=False)[0]
        assert torch.allclose(x, interpolate(x0, eps, sig[i + 1:i + 2]), atol=1e-5, rtol=0), i
    assert sig[-1] == 0 and torch.allclose(x, x0, atol=1e-5)


def test_token_weights_by_hand():
    mask = torch.tensor([[0.0, 0.5, 1.0, 1.0, 0.25]])
    region = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.5]])  # token 3 is the reference strip, token 4 half strip
    # region * (1 + (w - 1) * mask)
    assert token_weights(mask, region, 3.0).tolist() == [[1.0, 2.0, 3.0, 0.0, 0.75]]
    assert token_weights(mask, region, 0.0).tolist() == [[1.0, 0.5, 0.0, 0.0, 0.375]]
    assert token_weights(mask, region, 1.0).tolist() == region.tolist()


def test_pixel_mask_tokens_follow_the_latent_packing_order():
    """Token t of a 32x48 image is the 16x16 pixel block that Calligrapher.pack puts at position t."""
    blocks = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)  # block (row, col) -> its row-major index
    pixels = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)
    assert pixel_mask_to_tokens(pixels / 10).mul(10).round().tolist() == [[0, 1, 2, 3, 4, 5]]
    latents = blocks.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(1, 16, 4, 6)  # VAE: 8 px per latent
    packed = Calligrapher.pack(latents.contiguous())
    assert packed.shape == (1, 6, 64) and packed[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.all(packed == packed[..., :1])
    half = torch.zeros(1, 1, 16, 32)
    half[..., :8, :] = 1  # top half of both tokens
    half[..., 8:, 16:20] = 1  # a quarter of the second token's bottom half
    assert pixel_mask_to_tokens(half).tolist() == [[0.5, 0.5 + 0.5 * 0.25]]


def test_sample_sigmas_maps_through_the_training_sigmas():
    """u = sigmoid(n), index = floor(u * T): shown on a non-linear (squared) descending schedule."""
    T = 10
    train_sigmas = torch.linspace(1.0, 0.1, T) ** 2
    logit = lambda u: math.log(u / (1 - u))  # noqa: E731
    normal = torch.tensor([-30.0, logit(0.25), 0.0, logit(0.61), logit(0.999), 30.0])
    expected_idx = [0, 2, 5, 6, 9, 9]  # floor(u * 10), clamped to T - 1
    assert sample_sigmas(normal, train_sigmas).tolist() == train_sigmas[expected_idx].tolist()
    # The identity schedule would return u itself; the squared one does not.
    assert sample_sigmas(torch.tensor([0.0]), train_sigmas).item() == pytest.approx(train_sigmas[5].item())
    assert sample_sigmas(torch.tensor([0.0]), train_sigmas).item() != pytest.approx(0.5, abs=0.05)


def test_sample_sigmas_is_logit_normal_over_the_real_schedule():
    """With FLUX's scheduler (1000 sigmas) and n ~ N(0, 1): median sigma ~ sigmas[500], symmetric quartiles."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from train.models.tiny import SCHEDULER

    train_sigmas = FlowMatchEulerDiscreteScheduler(**SCHEDULER).sigmas[:-1].float()
    n = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    s = sample_sigmas(n, train_sigmas)
    q = torch.quantile(s, torch.tensor([0.25, 0.5, 0.75]))
    u = torch.sigmoid(torch.tensor([0.6745, 0.0, -0.6745]))  # normal quartiles through the sigmoid, reversed
    assert torch.allclose(q, 1 - u, atol=3e-3), (q, 1 - u)  # this schedule is linear and descending
    assert s.min() >= train_sigmas.min() and s.max() <= 1.0


def test_flow_matching_loss_by_hand():
    pred = torch.zeros(2, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [3.0, 3.0]]])
    weights = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    # sample 0: token errors [1, 2] -> (1*1 + 3*2) / 4 = 1.75; sample 1: [0, 9] -> 2*9 / 2 = 9
    assert flow_matching_loss(pred, target, weights).item() == pytest.approx((1.75 + 9) / 2)
    assert flow_matching_loss(pred, target, torch.ones(2, 2)).item() == pytest.approx(((1 + 2) / 2 + 9 / 2) / 2)


def test_loss_ignores_zero_weight_tokens_and_is_float32():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    weights = token_weights(torch.rand(2, 5, generator=g), torch.tensor([[1.0, 1, 1, 0, 0]] * 2), 2.0)
    base = flow_matching_loss(pred, target, weights)
    moved = pred.clone()
    moved[:, 3:] += 100  # errors in the strip tokens do not count
    assert flow_matching_loss(moved, target, weights).item() == base.item()
    moved[:, 0] += 1
    assert flow_matching_loss(moved, target, weights).item() > base.item()
    low = flow_matching_loss(pred.bfloat16(), target.bfloat16(), weights)
    assert low.dtype == torch.float32  # bf16 predictions are compared in float32, not rounded to bf16 first
    assert low.item() == flow_matching_loss(pred.bfloat16().float(), target.bfloat16().float(), weights).item()
    assert torch.isfinite(flow_matching_loss(pred, target, torch.zeros(2, 5)))
