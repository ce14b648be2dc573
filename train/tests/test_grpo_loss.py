"""GRPO loss (SPEC §7) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from train.rl_ip.grpo_utils import grpo_loss
from train.rl_ip.sampling import sde_step_with_logprob

EPS, ADV_MAX = 0.2, 5.0


def _log_probs(ratios):
    """Current log-probs (requiring grad) and old log-probs 0, so that exp(log_prob − old) = ratios."""
    log_prob = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    return log_prob, torch.zeros(len(ratios))


def test_unclipped_by_hand():
    log_prob, old = _log_probs([1.1, 0.9])
    loss, info = grpo_loss(log_prob, old, torch.tensor([1.0, -2.0]), EPS, ADV_MAX)
    # −A·ratio = [−1.1, 1.8], inside the clip range: mean 0.35
    assert loss.item() == pytest.approx(0.35, rel=1e-6)
    assert info["policy_loss"].item() == pytest.approx(0.35, rel=1e-6)
    assert info["clipfrac"].item() == 0.0
    loss.backward()
    # d/dlogp of −A·ratio/B = −A·ratio/B: [−1·1.1/2, 2·0.9/2]
    assert log_prob.grad.tolist() == pytest.approx([-0.55, 0.9], rel=1e-6)


def test_clipped_above_with_positive_advantage():
    log_prob, old = _log_probs([1.5])
    loss, info = grpo_loss(log_prob, old, torch.tensor([2.0]), EPS, ADV_MAX)
    # max(−2·1.5, −2·1.2) = −2.4; the clipped branch carries no gradient
    assert loss.item() == pytest.approx(-2.4, rel=1e-6)
    assert info["clipfrac"].item() == 1.0
    loss.backward()
    assert log_prob.grad.tolist() == [0.0]


def test_clipped_below_with_negative_advantage():
    log_prob, old = _log_probs([0.5])
    loss, info = grpo_loss(log_prob, old, torch.tensor([-1.0]), EPS, ADV_MAX)
    # max(1·0.5, 1·0.8) = 0.8; no gradient
    assert loss.item() == pytest.approx(0.8, rel=1e-6)
    assert info["clipfrac"].item() == 1.0
    loss.backward()
    assert log_prob.grad.tolist() == [0.0]


def test_mixed_batch_values_gradient_and_statistics():
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.7]
    advantages = torch.tensor([1.0, 2.0, -1.0, 2.0, -1.0, 8.0])
    log_prob, old = _log_probs(ratios)
    loss, info = grpo_loss(log_prob, old, advantages, EPS, ADV_MAX)
    # per sample: −1.1 (inside), −2.4 (clipped above), 0.8 (clipped below),
    # max(−1.0, −1.6) = −1.0 and max(1.5, 1.2) = 1.5 (pessimistic side is the unclipped one),
    # A = 8 clamped to 5 with ratio 0.7: max(−3.5, −4.0) = −3.5. Mean: −5.7 / 6 = −0.95
    assert loss.item() == pytest.approx(-0.95, rel=1e-6)
    assert info["clipfrac"].item() == pytest.approx(5 / 6)  # |ratio − 1| > 0.2 for all but 1.1
    assert info["ratio_mean"].item() == pytest.approx(5.8 / 6, rel=1e-6)
    assert info["ratio_min"].item() == pytest.approx(0.5, rel=1e-6)
    assert info["ratio_max"].item() == pytest.approx(1.5, rel=1e-6)
    assert info["adv_abs_mean"].item() == pytest.approx(12 / 6)  # |[1, 2, −1, 2, −1, 5]|
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in ratios) / 6
    assert info["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-6)
    assert info["kl"].item() == 0.0
    loss.backward()
    # −A·ratio/B where the unclipped branch is taken, 0 where clipped
    expected_grad = [-1 * 1.1 / 6, 0.0, 0.0, -2 * 0.5 / 6, 1 * 1.5 / 6, -5 * 0.7 / 6]
    assert log_prob.grad.tolist() == pytest.approx(expected_grad, rel=1e-6)
    for name, value in info.items():
        assert value.ndim == 0 and not value.requires_grad and value.dtype == torch.float32, name


def test_advantage_clamp():
    log_prob, old = _log_probs([1.0, 1.0, 1.0])
    loss, info = grpo_loss(log_prob, old, torch.tensor([-10.0, 12.0, 3.0]), EPS, ADV_MAX)
    # A → [−5, 5, 3]; policy = −(−5 + 5 + 3)/3
    assert loss.item() == pytest.approx(-1.0)
    assert info["adv_abs_mean"].item() == pytest.approx(13 / 3)


def test_first_inner_epoch_ratio_is_one():
    log_prob = torch.tensor([-1.3, 0.2, 4.0], requires_grad=True)
    loss, info = grpo_loss(log_prob, log_prob.detach().clone(), torch.tensor([1.0, -2.0, 0.5]), EPS, ADV_MAX)
    assert info["ratio_min"].item() == info["ratio_max"].item() == 1.0
    assert info["clipfrac"].item() == 0.0 and info["approx_kl"].item() == 0.0
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-1 / 3, 2 / 3, -0.5 / 3])


def test_rescored_rollout_gives_ratio_one_and_no_kl_against_itself():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    prev, old_lp, _, _ = sde_step_with_logprob(v, 0.7, 0.6, x, 0.7, generator=g)
    v_theta = v.clone().requires_grad_(True)
    _, lp, mean, std_t = sde_step_with_logprob(v_theta, 0.7, 0.6, x, 0.7, prev_sample=prev.detach())
    ref_mean = sde_step_with_logprob(v, 0.7, 0.6, x, 0.7, prev_sample=prev)[2]
    loss, info = grpo_loss(lp, old_lp, torch.tensor([1.0, -1.0, 0.5, 2.0]), EPS, ADV_MAX, mean, ref_mean, std_t, 0.1)
    assert info["ratio_min"].item() == info["ratio_max"].item() == 1.0 and info["kl"].item() == 0.0
    loss.backward()
    assert v_theta.grad.abs().sum() > 0


def test_kl_is_zero_when_the_means_agree():
    log_prob, old = _log_probs([1.1, 0.7])
    adv = torch.tensor([1.0, -1.0])
    mean = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    plain, _ = grpo_loss(log_prob, old, adv, EPS, ADV_MAX)
    loss, info = grpo_loss(
        log_prob, old, adv, EPS, ADV_MAX, mean=mean, ref_mean=mean.clone(), std_dev_t=torch.ones(2), kl_beta=0.5
    )
    assert info["kl"].item() == 0.0 and torch.equal(loss, plain)


def test_kl_by_hand():
    log_prob, old = _log_probs([1.0, 1.0])
    adv = torch.tensor([1.0, -1.0])  # policy term 0
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]], requires_grad=True)  # the reference is a fixed target
    # sample 0: mean((1, 4)) / (2·0.5²) = 2.5 / 0.5 = 5; sample 1: mean((0, 9)) / (2·1²) = 2.25; KL = 3.625
    std = torch.tensor([0.5, 1.0])
    loss, info = grpo_loss(log_prob, old, adv, EPS, ADV_MAX, mean=mean, ref_mean=ref, std_dev_t=std, kl_beta=0.1)
    assert info["kl"].item() == pytest.approx(3.625)
    assert loss.item() == pytest.approx(0.3625)
    assert info["policy_loss"].item() == 0.0
    loss.backward()
    # β·(mean − ref)/(std²·elements·B): 0.1·1/(0.25·2·2) = 0.1, 0.1·2/1 = 0.2, 0, 0.1·(−3)/(1·2·2) = −0.075
    assert mean.grad.flatten().tolist() == pytest.approx([0.1, 0.2, 0.0, -0.075])
    assert ref.grad is None
    # a scalar std: sample 1 becomes 4.5 / 0.5 = 9, KL = (5 + 9)/2
    _, info = grpo_loss(log_prob, old, adv, EPS, ADV_MAX, mean=mean, ref_mean=ref, std_dev_t=0.5, kl_beta=0.1)
    assert info["kl"].item() == pytest.approx(7.0)
    # β = 0: no KL term, even with the means given
    loss, info = grpo_loss(log_prob, old, adv, EPS, ADV_MAX, mean=mean, ref_mean=ref, std_dev_t=0.5, kl_beta=0.0)
    assert info["kl"].item() == 0.0 and loss.item() == 0.0


def test_bad_inputs_raise():
    log_prob, old = _log_probs([1.0, 1.0])
    with pytest.raises(ValueError, match="kl_beta > 0 needs mean, ref_mean and std_dev_t"):
        grpo_loss(log_prob, old, torch.ones(2), EPS, ADV_MAX, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        grpo_loss(log_prob, old, torch.ones(3), EPS, ADV_MAX)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):  # [B, 1] everywhere would broadcast quietly
        grpo_loss(log_prob[:, None], old[:, None], torch.ones(2, 1), EPS, ADV_MAX)
    with pytest.raises(ValueError, match=r"must both be \[B, \.\.\.\]"):  # 3 means for 2 log-probs
        grpo_loss(log_prob, old, torch.ones(2), EPS, ADV_MAX, mean=torch.ones(3, 4), ref_mean=torch.ones(3, 4),
                  std_dev_t=1.0, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"must both be \[B, \.\.\.\]"):
        grpo_loss(log_prob, old, torch.ones(2), EPS, ADV_MAX, mean=torch.ones(2, 3), ref_mean=torch.ones(2, 4),
                  std_dev_t=1.0, kl_beta=0.1)
