"""GRPO loss (docs/ARCHITECTURE.md §7) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from train.rl_ip.grpo_utils import GuardTerms, grpo_guard_terms, grpo_loss
from train.rl_ip.sampling import sde_step_with_logprob

EPS, ADV_MAX = 0.2, 5.0
CLIPS = dict(clip_range=EPS, adv_clip_max=ADV_MAX)


def _log_probs(ratios):
    """Current log-probs (requiring grad) and old log-probs 0, so that exp(log_prob − old) = ratios."""
    log_prob = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    return log_prob, torch.zeros(len(ratios))


def test_unclipped_by_hand():
    log_prob, old = _log_probs([1.1, 0.9])
    loss, info = grpo_loss(log_prob, old, torch.tensor([1.0, -2.0]), **CLIPS)
    # −A·ratio = [−1.1, 1.8], inside the clip range: mean 0.35
    assert loss.item() == pytest.approx(0.35, rel=1e-6)
    assert info["policy_loss"].item() == pytest.approx(0.35, rel=1e-6)
    assert info["clipfrac"].item() == 0.0
    loss.backward()
    # d/dlogp of −A·ratio/B = −A·ratio/B: [−1·1.1/2, 2·0.9/2]
    assert log_prob.grad.tolist() == pytest.approx([-0.55, 0.9], rel=1e-6)


def test_clipped_above_with_positive_advantage():
    log_prob, old = _log_probs([1.5])
    loss, info = grpo_loss(log_prob, old, torch.tensor([2.0]), **CLIPS)
    # max(−2·1.5, −2·1.2) = −2.4; the clipped branch carries no gradient
    assert loss.item() == pytest.approx(-2.4, rel=1e-6)
    assert info["clipfrac"].item() == 1.0
    loss.backward()
    assert log_prob.grad.tolist() == [0.0]


def test_clipped_below_with_negative_advantage():
    log_prob, old = _log_probs([0.5])
    loss, info = grpo_loss(log_prob, old, torch.tensor([-1.0]), **CLIPS)
    # max(1·0.5, 1·0.8) = 0.8; no gradient
    assert loss.item() == pytest.approx(0.8, rel=1e-6)
    assert info["clipfrac"].item() == 1.0
    loss.backward()
    assert log_prob.grad.tolist() == [0.0]


def test_mixed_batch_values_gradient_and_statistics():
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.7]
    advantages = torch.tensor([1.0, 2.0, -1.0, 2.0, -1.0, 8.0])
    log_prob, old = _log_probs(ratios)
    loss, info = grpo_loss(log_prob, old, advantages, **CLIPS)
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
    loss, info = grpo_loss(log_prob, old, torch.tensor([-10.0, 12.0, 3.0]), **CLIPS)
    # A → [−5, 5, 3]; policy = −(−5 + 5 + 3)/3
    assert loss.item() == pytest.approx(-1.0)
    assert info["adv_abs_mean"].item() == pytest.approx(13 / 3)


def test_first_inner_epoch_ratio_is_one():
    log_prob = torch.tensor([-1.3, 0.2, 4.0], requires_grad=True)
    loss, info = grpo_loss(log_prob, log_prob.detach().clone(), torch.tensor([1.0, -2.0, 0.5]), **CLIPS)
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
    loss, info = grpo_loss(lp, old_lp, torch.tensor([1.0, -1.0, 0.5, 2.0]), **CLIPS, mean=mean, ref_mean=ref_mean,
                           std_dev_t=std_t, kl_beta=0.1)
    assert info["ratio_min"].item() == info["ratio_max"].item() == 1.0 and info["kl"].item() == 0.0
    loss.backward()
    assert v_theta.grad.abs().sum() > 0


def test_kl_is_zero_when_the_means_agree():
    log_prob, old = _log_probs([1.1, 0.7])
    adv = torch.tensor([1.0, -1.0])
    mean = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    plain, _ = grpo_loss(log_prob, old, adv, **CLIPS)
    loss, info = grpo_loss(
        log_prob, old, adv, **CLIPS, mean=mean, ref_mean=mean.clone(), std_dev_t=torch.ones(2), kl_beta=0.5
    )
    assert info["kl"].item() == 0.0 and torch.equal(loss, plain)


def test_kl_by_hand():
    log_prob, old = _log_probs([1.0, 1.0])
    adv = torch.tensor([1.0, -1.0])  # policy term 0
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]], requires_grad=True)  # the reference is a fixed target
    # sample 0: mean((1, 4)) / (2·0.5²) = 2.5 / 0.5 = 5; sample 1: mean((0, 9)) / (2·1²) = 2.25; KL = 3.625
    std = torch.tensor([0.5, 1.0])
    loss, info = grpo_loss(log_prob, old, adv, **CLIPS, mean=mean, ref_mean=ref, std_dev_t=std, kl_beta=0.1)
    assert info["kl"].item() == pytest.approx(3.625)
    assert loss.item() == pytest.approx(0.3625)
    assert info["policy_loss"].item() == 0.0
    loss.backward()
    # β·(mean − ref)/(std²·elements·B): 0.1·1/(0.25·2·2) = 0.1, 0.1·2/1 = 0.2, 0, 0.1·(−3)/(1·2·2) = −0.075
    assert mean.grad.flatten().tolist() == pytest.approx([0.1, 0.2, 0.0, -0.075])
    assert ref.grad is None
    # a scalar std: sample 1 becomes 4.5 / 0.5 = 9, KL = (5 + 9)/2
    _, info = grpo_loss(log_prob, old, adv, **CLIPS, mean=mean, ref_mean=ref, std_dev_t=0.5, kl_beta=0.1)
    assert info["kl"].item() == pytest.approx(7.0)
    # β = 0: no KL term, even with the means given
    loss, info = grpo_loss(log_prob, old, adv, **CLIPS, mean=mean, ref_mean=ref, std_dev_t=0.5, kl_beta=0.0)
    assert info["kl"].item() == 0.0 and loss.item() == 0.0


def test_bad_inputs_raise():
    log_prob, old = _log_probs([1.0, 1.0])
    with pytest.raises(ValueError, match="kl_beta > 0 needs mean, ref_mean and std_dev_t"):
        grpo_loss(log_prob, old, torch.ones(2), **CLIPS, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        grpo_loss(log_prob, old, torch.ones(3), **CLIPS)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):  # [B, 1] everywhere would broadcast quietly
        grpo_loss(log_prob[:, None], old[:, None], torch.ones(2, 1), **CLIPS)
    with pytest.raises(ValueError, match=r"must both be \[B, \.\.\.\]"):  # 3 means for 2 log-probs
        grpo_loss(log_prob, old, torch.ones(2), **CLIPS, mean=torch.ones(3, 4), ref_mean=torch.ones(3, 4),
                  std_dev_t=1.0, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"must both be \[B, \.\.\.\]"):
        grpo_loss(log_prob, old, torch.ones(2), **CLIPS, mean=torch.ones(2, 3), ref_mean=torch.ones(2, 4),
                  std_dev_t=1.0, kl_beta=0.1)
    with pytest.raises(TypeError):  # hyper-parameters are keyword-only: no silent swap of the two clips
        grpo_loss(log_prob, old, torch.ones(2), EPS, ADV_MAX)


# ---- GRPO-Guard: normalised log-ratio ℓ̂ = s·(Δlogp + ⟨Δμ²⟩/(2s²)), s = std_t·sqrt(σ − σ'), weight 1/(σ − σ') ----


def _guard_by_hand_inputs():
    """Two samples, two elements each, worked out by hand below."""
    # sample 0: σ 0.5 -> 0.25, std_t 0.4, s = 0.4·0.5 = 0.2; sample 1: σ 0.9 -> 0.81, std_t 1, s = 0.3
    old_mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    mean = torch.tensor([[1.1, 1.8], [0.3, 0.3]], dtype=torch.float64)
    prev = torch.tensor([[1.2, 2.2], [0.6, -0.3]], dtype=torch.float64)
    return mean, old_mean, prev, torch.tensor([0.4, 1.0]), torch.tensor([0.5, 0.9]), torch.tensor([0.25, 0.81])


def test_guard_terms_by_hand():
    mean, old_mean, prev, std, sigma, sigma_next = _guard_by_hand_inputs()
    mean = mean.float().requires_grad_(True)
    terms = grpo_guard_terms(mean, old_mean.float(), prev.float(), std, sigma, sigma_next)
    # sample 0: log p_θ = −mean(0.1², 0.4²)/(2·0.2²) = −1.0625, log p_old = −mean(0.2², 0.2²)/0.08 = −0.5,
    #   Δ = −0.5625, ⟨Δμ²⟩/(2s²) = mean(0.01, 0.04)/0.08 = 0.3125, ℓ̂ = 0.2·(−0.25) = −0.05
    # sample 1: both log-probs −mean(0.09, 0.36)/(2·0.09) = −1.25 (Δ = 0: the plain ratio is 1),
    #   ⟨Δμ²⟩/(2s²) = 0.09/0.18 = 0.5, ℓ̂ = 0.3·0.5 = 0.15
    assert isinstance(terms, GuardTerms)
    assert terms.log_ratio.tolist() == pytest.approx([-0.05, 0.15], rel=1e-5)
    assert terms.weight.tolist() == pytest.approx([1 / 0.25, 1 / 0.09], rel=1e-6)  # 1/(σ − σ')
    assert terms.log_ratio.dtype == terms.weight.dtype == torch.float32 and not terms.weight.requires_grad
    terms.log_ratio.sum().backward()
    # ∂ℓ̂/∂μ_θ = (x' − μ_old)/(s·D): sample 0 (0.2, 0.2)/(0.2·2), sample 1 (0.6, −0.3)/(0.3·2)
    assert mean.grad.flatten().tolist() == pytest.approx([0.5, 0.5, 1.0, -0.5], rel=1e-5)


def test_guard_log_ratio_matches_eq8_from_float64_log_probs():
    """The computed form ⟨Δμ·(x' − μ_old)⟩/s equals s·(Δlogp + ⟨Δμ²⟩/(2s²)) with float64 Gaussian log-probs."""
    g = torch.Generator().manual_seed(3)
    b, a = 3, 0.7
    sigma, sigma_next = torch.tensor([0.95, 0.6, 0.2], dtype=torch.float64), torch.tensor([0.9, 0.5, 0.1],
                                                                                             dtype=torch.float64)
    std_t = a * torch.sqrt(sigma / (1 - sigma))
    s = (std_t * torch.sqrt(sigma - sigma_next)).view(b, 1, 1)
    old_mean = torch.randn(b, 6, 5, generator=g, dtype=torch.float64)
    prev = old_mean + s * torch.randn(b, 6, 5, generator=g, dtype=torch.float64)
    mean = old_mean + 0.05 * torch.randn(b, 6, 5, generator=g, dtype=torch.float64)

    def log_density(mu):
        return (-((prev - mu) ** 2).mean(dim=(1, 2)) / (2 * s.flatten() ** 2) - torch.log(s.flatten())
                - 0.5 * math.log(2 * math.pi))

    delta = log_density(mean) - log_density(old_mean)
    expected = s.flatten() * (delta + ((mean - old_mean) ** 2).mean(dim=(1, 2)) / (2 * s.flatten() ** 2))
    terms = grpo_guard_terms(mean.float(), old_mean.float(), prev.float(), std_t.float(), sigma, sigma_next)
    assert terms.log_ratio.double().tolist() == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-7)
    assert terms.weight.double().tolist() == pytest.approx((1 / (sigma - sigma_next)).tolist(), rel=1e-6)
    assert bool((expected.abs() > 1e-3).all())  # the case is not trivially 0


def test_guard_token_weights_use_the_log_prob_average():
    # [B=1, L=2, C=2]; the second token has weight 0, so only the first token's channels count
    old_mean = torch.zeros(1, 2, 2)
    mean = torch.tensor([[[0.1, 0.3], [5.0, 5.0]]])
    prev = torch.tensor([[[1.0, 1.0], [-7.0, 9.0]]])
    terms = grpo_guard_terms(mean, old_mean, prev, 1.0, 0.5, 0.25, token_weights=torch.tensor([[1.0, 0.0]]))
    # s = 1·sqrt(0.25) = 0.5; ⟨Δμ·(x' − μ_old)⟩ = mean(0.1, 0.3) = 0.2 over the first token; ℓ̂ = 0.4
    assert terms.log_ratio.tolist() == pytest.approx([0.4], rel=1e-6)


def test_guard_ratio_is_exactly_one_on_policy():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.85, 0.6, 0.45, 0.1])
    prev, old_lp, old_mean, _ = sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, generator=g)
    v_theta = v.clone().requires_grad_(True)
    _, lp, mean, std_t = sde_step_with_logprob(v_theta, sigma, sigma_next, x, 0.7, prev_sample=prev.detach())
    terms = grpo_guard_terms(mean, old_mean.detach(), prev.detach(), std_t, sigma, sigma_next)
    assert torch.equal(torch.exp(terms.log_ratio), torch.ones(4))
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    loss, info = grpo_loss(lp, old_lp, adv, **CLIPS, guard=terms)
    assert info["ratio_min"].item() == info["ratio_max"].item() == 1.0 and info["clipfrac"].item() == 0.0
    # policy = mean(w·(−A)) with w = 1/(σ − σ') = (20, 10, 20, 5)
    assert loss.item() == pytest.approx((-20 * 1 + 10 * 1 - 20 * 0.5 - 5 * 2) / 4, rel=1e-5)
    loss.backward()
    assert v_theta.grad.abs().sum() > 0


def test_grpo_loss_with_guard_by_hand():
    log_ratio = torch.tensor([math.log(1.1), math.log(0.5)], requires_grad=True)
    weight = torch.tensor([4.0, 2.0])
    log_prob = torch.tensor([0.3, -0.2], requires_grad=True)
    old = torch.tensor([0.1, -0.2])
    loss, info = grpo_loss(log_prob, old, torch.tensor([1.0, -1.0]), **CLIPS, guard=(log_ratio, weight))
    # sample 0: ratio 1.1 inside the clip, −A·ratio = −1.1, ×4 = −4.4; sample 1: ratio 0.5, A = −1:
    # max(0.5, 0.8) = 0.8 (clipped), ×2 = 1.6; policy = (−4.4 + 1.6)/2 = −1.4
    assert loss.item() == pytest.approx(-1.4, rel=1e-6)
    assert info["clipfrac"].item() == 0.5 and info["ratio_mean"].item() == pytest.approx(0.8, rel=1e-6)
    assert info["raw_ratio_mean"].item() == pytest.approx((math.exp(0.2) + 1) / 2, rel=1e-6)
    assert info["guard_weight_mean"].item() == 3.0
    assert info["approx_kl"].item() == pytest.approx(0.5 * 0.2**2 / 2, rel=1e-5)  # from the raw log-probs
    loss.backward()
    # ∂/∂ℓ̂ = w·(−A·ratio)/B where unclipped, 0 where clipped: 4·(−1.1)/2 = −2.2, 0
    assert log_ratio.grad.tolist() == pytest.approx([-2.2, 0.0], rel=1e-6)
    assert log_prob.grad is None  # with the guard, the raw log-prob carries no policy gradient


def test_guard_weight_scales_each_samples_gradient():
    log_ratio = torch.tensor([0.05, -0.02, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    weight = torch.tensor([3.0, 0.5, 7.0])
    plain, _ = grpo_loss(torch.zeros(3), torch.zeros(3), adv, **CLIPS, guard=(log_ratio, torch.ones(3)))
    (g_plain,) = torch.autograd.grad(plain, log_ratio)
    weighted, _ = grpo_loss(torch.zeros(3), torch.zeros(3), adv, **CLIPS, guard=(log_ratio, weight))
    (g_weighted,) = torch.autograd.grad(weighted, log_ratio)
    assert g_weighted.tolist() == pytest.approx((weight * g_plain).tolist(), rel=1e-6)
    assert g_plain.tolist() == pytest.approx((-adv * torch.exp(log_ratio.detach()) / 3).tolist(), rel=1e-6)


def test_guard_weight_equalises_the_velocity_gradient_across_steps():
    """With x' = μ_old + s·ε, ∂(w·ℓ̂)/∂v = −(1 + a²/2)·ε/D at every step: the weight cancels dt."""
    g = torch.Generator().manual_seed(1)
    a = 0.7
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    eps = torch.randn(2, 3, 4, generator=g)
    grads = []
    for sigma, sigma_next in [(0.9, 0.8), (0.4, 0.1)]:
        _, _, old_mean, std_t = sde_step_with_logprob(v, sigma, sigma_next, x, a)
        prev = old_mean + (std_t * math.sqrt(sigma - sigma_next)).view(-1, 1, 1) * eps
        v_theta = v.clone().requires_grad_(True)
        mean = sde_step_with_logprob(v_theta, sigma, sigma_next, x, a, prev_sample=prev)[2]
        terms = grpo_guard_terms(mean, old_mean, prev, std_t, sigma, sigma_next)
        (grad,) = torch.autograd.grad((terms.weight * terms.log_ratio).sum(), v_theta, retain_graph=True)
        assert grad.flatten().tolist() == pytest.approx((-(1 + a**2 / 2) * eps / 12).flatten().tolist(), rel=1e-4)
        (unweighted,) = torch.autograd.grad(terms.log_ratio.sum(), v_theta)
        grads.append(unweighted)
    # without the weight the two steps' gradients differ by their dt ratio, 0.1 / 0.3
    assert grads[0].flatten().tolist() == pytest.approx((grads[1] / 3).flatten().tolist(), rel=1e-4)


def test_guard_with_unit_weight_and_plain_log_ratio_is_plain_grpo():
    log_prob, old = _log_probs([1.1, 1.5, 0.5])
    adv = torch.tensor([1.0, 2.0, -1.0])
    plain, plain_info = grpo_loss(log_prob, old, adv, **CLIPS)
    guarded, info = grpo_loss(log_prob, old, adv, **CLIPS, guard=(log_prob - old, torch.ones(3)))
    assert torch.equal(plain, guarded)
    assert all(torch.equal(plain_info[k], info[k]) for k in plain_info)
    assert set(info) - set(plain_info) == {"raw_ratio_mean", "guard_weight_mean"}
    for name, value in info.items():
        assert value.ndim == 0 and not value.requires_grad and value.dtype == torch.float32, name


def test_guard_bad_inputs_raise():
    mean, old_mean, prev, std, sigma, sigma_next = (t.float() for t in _guard_by_hand_inputs())
    with pytest.raises(ValueError, match="defined for sde_type 'sde'"):
        grpo_guard_terms(mean, old_mean, prev, std, sigma, sigma_next, sde_type="cps")
    with pytest.raises(ValueError, match=r"must all be the same \[B, \.\.\.\] shape"):
        grpo_guard_terms(mean, old_mean[:, :1], prev, std, sigma, sigma_next)
    with pytest.raises(ValueError, match=r"must all be the same \[B, \.\.\.\] shape"):
        grpo_guard_terms(mean, old_mean, prev[:1], std, sigma, sigma_next)
    with pytest.raises(ValueError, match="at least one non-batch dimension"):  # [B] means: nothing to average
        grpo_guard_terms(mean[:, 0], old_mean[:, 0], prev[:, 0], std, sigma, sigma_next)
    with pytest.raises(ValueError, match="0 < sigma_next < sigma <= 1"):  # dt = 0: no weight 1/(−dt)
        grpo_guard_terms(mean, old_mean, prev, std, sigma, sigma)
    with pytest.raises(ValueError, match="0 < sigma_next < sigma <= 1"):
        grpo_guard_terms(mean, old_mean, prev, std, torch.tensor([0.5, 1.5]), sigma_next)
    with pytest.raises(ValueError, match="stochastic step"):  # noise level 0: s = 0
        grpo_guard_terms(mean, old_mean, prev, torch.tensor([0.4, 0.0]), sigma, sigma_next)
    with pytest.raises(ValueError, match=r"sigma must be a float, a 0-dim tensor or a \[B=2\] tensor"):
        grpo_guard_terms(mean, old_mean, prev, std, torch.tensor([0.5, 0.6, 0.7]), sigma_next)
    log_prob, old = _log_probs([1.0, 1.0])
    with pytest.raises(ValueError, match=r"guard log_ratio \(3,\) and weight \(2,\) must both be \[B=2\]"):
        grpo_loss(log_prob, old, torch.ones(2), **CLIPS, guard=(torch.zeros(3), torch.ones(2)))
    with pytest.raises(ValueError, match=r"must both be \[B=2\]"):
        grpo_loss(log_prob, old, torch.ones(2), **CLIPS, guard=(torch.zeros(2), torch.ones(2, 1)))


def test_kl_with_token_weights_by_hand():
    """mean - ref_mean = [[1, 1], [2, 2], [3, 3]] per token, weights [1, 0, 1], std 1: KL = (1 + 9) / 2 / 2."""
    mean = torch.zeros(1, 3, 2, requires_grad=True)
    ref = -torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    zero = torch.zeros(1)
    w = torch.tensor([[1.0, 0.0, 1.0]])
    _, info = grpo_loss(zero, zero, zero, **CLIPS, mean=mean, ref_mean=ref, std_dev_t=1.0, kl_beta=1.0,
                        token_weights=w)
    assert info["kl"].item() == pytest.approx(10.0 / 2 / 2)
    _, plain = grpo_loss(zero, zero, zero, **CLIPS, mean=mean, ref_mean=ref, std_dev_t=1.0, kl_beta=1.0)
    assert plain["kl"].item() == pytest.approx(14.0 / 3 / 2)
