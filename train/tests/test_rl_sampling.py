"""SDE sampling with log-probabilities (docs/ARCHITECTURE.md §7) against float64 references written from the formulas,
plus the SDE window and trained-step choices."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from train.rl_ip.sampling import (
    check_sde_window,
    choose_train_steps,
    denoise,
    nft_train_steps,
    sde_step_with_logprob,
    sde_window,
)

SHAPE = (3, 4, 5, 6)


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


def _reference(velocity, sigma, sigma_next, sample, a, prev_sample, sde_type, sigma_max=None):
    """float64 mean, std_t, transition std and log-density of ``prev_sample``, straight from docs/ARCHITECTURE.md §7."""
    v, x, xp = velocity.double(), sample.double(), prev_sample.double()
    sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).reshape(-1, 1, 1, 1)
    sig_n = torch.as_tensor(sigma_next, dtype=torch.float64).expand(x.shape[0]).reshape(-1, 1, 1, 1)
    dt = sig_n - sig
    if sde_type == "sde":
        denom = torch.where(sig == 1, torch.full_like(sig, sigma_max or 0.0), sig)
        std_t = a * torch.sqrt(sig / (1 - denom))
        mean = x * (1 + std_t**2 * dt / (2 * sig)) + v * (1 + std_t**2 * (1 - sig) / (2 * sig)) * dt
        s = std_t * torch.sqrt(-dt)
    else:
        std_t = sig_n * math.sin(a * math.pi / 2)
        x0_hat, x1_hat = x - sig * v, x + (1 - sig) * v
        mean = (1 - sig_n) * x0_hat + torch.sqrt(sig_n**2 - std_t**2) * x1_hat
        s = std_t
    density = -((xp - mean) ** 2) / (2 * s**2) - torch.log(s) - math.log(math.sqrt(2 * math.pi))
    return mean, std_t.flatten(), s, density.mean(dim=(1, 2, 3))


SIGMAS = {
    "float": (0.8, 0.72),
    "per_sample": (torch.tensor([0.9, 0.55, 0.3]), torch.tensor([0.85, 0.4, 0.05])),
}


@pytest.mark.parametrize("sigmas", list(SIGMAS), ids=list(SIGMAS))
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_matches_float64_gaussian(sde_type, sigmas):
    v, x = _inputs(seed=1)
    sigma, sigma_next = SIGMAS[sigmas]
    g = torch.Generator().manual_seed(5)
    prev, log_prob, mean, std_t = sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, generator=g, sde_type=sde_type)
    ref_mean, ref_std, _, ref_lp = _reference(v, sigma, sigma_next, x, 0.7, prev, sde_type)
    assert prev.dtype == log_prob.dtype == mean.dtype == std_t.dtype == torch.float32
    assert log_prob.shape == std_t.shape == (3,)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(std_t.double(), ref_std, rtol=1e-6, atol=0)
    torch.testing.assert_close(log_prob.double(), ref_lp, rtol=0, atol=1e-4)
    # Re-scoring an arbitrary point, far from the mean, against the same density.
    other = torch.randn(SHAPE, generator=g)
    _, lp_other, _, _ = sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, prev_sample=other, sde_type=sde_type)
    ref_other = _reference(v, sigma, sigma_next, x, 0.7, other, sde_type)[3]
    torch.testing.assert_close(lp_other.double(), ref_other, rtol=1e-5, atol=1e-4)


def test_sigma_one_uses_sigma_max_in_the_denominator():
    v, x = _inputs(seed=2)
    sigma, sigma_next = torch.tensor([1.0, 0.9, 1.0]), torch.tensor([0.96, 0.8, 0.96])
    _, lp, mean, std_t = sde_step_with_logprob(v, sigma, sigma_next, x, 0.5, prev_sample=x, sigma_max=0.96)
    # by hand: 0.5·sqrt(1 / (1 − 0.96)) = 2.5 and 0.5·sqrt(0.9 / 0.1) = 1.5
    torch.testing.assert_close(std_t, torch.tensor([2.5, 1.5, 2.5]))
    ref_mean, _, _, ref_lp = _reference(v, sigma, sigma_next, x, 0.5, x, "sde", sigma_max=0.96)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_with_logprob(v, 1.0, 0.96, x, 0.5)
    for bad in (1.0, 0.0):  # 1 − σ_max would be 0 or 1: an infinite or a wrong std at σ = 1
        with pytest.raises(ValueError, match=r"sigma_max must lie in \(0, 1\)"):
            sde_step_with_logprob(v, sigma, sigma_next, x, 0.5, sigma_max=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_level_zero_is_the_plain_euler_step_bit_for_bit(dtype):
    v, x = _inputs(seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for sigma, sigma_next in [(0.7, 0.65), (1.0, 0.9), (0.3, 0.0)]:
        euler = x.float() + (sigma_next - sigma) * v.float()
        prev, lp, mean, std_t = sde_step_with_logprob(v, sigma, sigma_next, x, 0.0, generator=g)  # σ = 1: no sigma_max
        assert torch.equal(prev, euler) and torch.equal(mean, euler)
        assert torch.equal(lp, torch.zeros(3)) and torch.equal(std_t, torch.zeros(3))
    # per-sample float32 sigmas, as a scheduler stores them
    sig = torch.tensor([0.7, 0.41, 0.123456789])
    sig_n = torch.tensor([0.65, 0.3, 0.0])
    euler = x.float() + (sig_n - sig).view(-1, 1, 1, 1) * v.float()
    prev, lp, _, _ = sde_step_with_logprob(v, sig, sig_n, x, 0.0, generator=g)
    assert torch.equal(prev, euler) and torch.equal(lp, torch.zeros(3))
    assert torch.equal(g.get_state(), state), "a deterministic step draws no noise"


def test_zero_transition_std_gives_the_mean_and_no_density_per_sample():
    v, x = _inputs(seed=4)
    v.requires_grad_(True)
    # cps: the last step (σ' = 0) of sample 1 is deterministic, the others are not.
    sigma, sigma_next = torch.tensor([0.5, 0.2, 0.8]), torch.tensor([0.4, 0.0, 0.7])
    g = torch.Generator().manual_seed(1)
    prev, lp, mean, std_t = sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, generator=g, sde_type="cps")
    assert std_t[1] == 0 and lp[1] == 0 and lp[0] != 0 and lp[2] != 0
    assert torch.equal(prev[1], mean[1]) and not torch.equal(prev[0], mean[0])
    # x̂0 = x − σv, by hand for σ = 0.2
    torch.testing.assert_close(mean[1], (x[1] - 0.2 * v[1]).detach())
    lp.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))


def test_rescoring_the_drawn_sample_returns_the_same_log_prob():
    v, x = _inputs(seed=5)
    for sde_type in ("sde", "cps"):
        g = torch.Generator().manual_seed(7)
        prev, lp, _, _ = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, generator=g, sde_type=sde_type)
        _, lp_again, _, _ = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, prev_sample=prev, sde_type=sde_type)
        assert torch.equal(lp, lp_again)
        # a stored low-precision sample comes back as float32, scored as the float32 value it holds
        low = prev.bfloat16()
        back, lp_low, _, _ = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, prev_sample=low, sde_type=sde_type)
        assert back.dtype == torch.float32 and torch.equal(back, low.float())
        assert torch.equal(lp_low, sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, prev_sample=low.float(),
                                                         sde_type=sde_type)[1])


def test_log_prob_of_the_mean_is_the_maximum():
    v, x = _inputs(seed=6)
    g = torch.Generator().manual_seed(8)
    _, _, mean, _ = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7)
    _, lp_at_mean, _, std_t = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, prev_sample=mean)
    s = std_t.double() * math.sqrt(0.1)
    torch.testing.assert_close(lp_at_mean.double(), -torch.log(s) - 0.5 * math.log(2 * math.pi))
    for _ in range(5):
        _, lp, _, _ = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, generator=g)
        assert (lp < lp_at_mean).all()


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_gradient_reaches_velocity_and_matches_float64_autograd(sde_type):
    v, x = _inputs(seed=7, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    prev, _, _, _ = sde_step_with_logprob(v, 0.6, 0.45, x, 0.7, generator=g, sde_type=sde_type)
    v32 = v.float().requires_grad_(True)
    _, lp, _, _ = sde_step_with_logprob(v32, 0.6, 0.45, x, 0.7, prev_sample=prev, sde_type=sde_type)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (lp * weights).sum().backward()
    v64 = v.double().requires_grad_(True)
    ref_lp = _reference(v64, 0.6, 0.45, x, 0.7, prev, sde_type)[3]
    (ref_lp * weights.double()).sum().backward()
    assert v32.grad.abs().sum() > 0
    torch.testing.assert_close(v32.grad.double(), v64.grad, rtol=1e-4, atol=1e-7)
    # Drawing and scoring in one call treats the drawn x' as data, exactly like re-scoring it.
    v_draw = v.float().requires_grad_(True)
    g.manual_seed(9)
    _, lp_draw, _, _ = sde_step_with_logprob(v_draw, 0.6, 0.45, x, 0.7, generator=g, sde_type=sde_type)
    (lp_draw * weights).sum().backward()
    torch.testing.assert_close(v_draw.grad, v32.grad)


def test_per_sample_generators_make_a_sample_independent_of_its_batch_mates():
    v, x = _inputs(seed=8)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    prev, lp, _, _ = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, generator=gens)
    own = [torch.Generator().manual_seed(101)]
    alone, lp_alone, _, _ = sde_step_with_logprob(v[1:2], 0.6, 0.5, x[1:2], 0.7, generator=own)
    assert torch.equal(prev[1:2], alone) and torch.equal(lp[1:2], lp_alone)
    assert not torch.equal(prev[0] - x[0], prev[1] - x[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, generator=gens[:2])


def test_drawn_noise_is_standard_normal():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 250_000, generator=g)
    v = torch.randn(2, 250_000, generator=g)
    for sde_type in ("sde", "cps"):
        prev, _, mean, std_t = sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, generator=g, sde_type=sde_type)
        s = std_t.view(-1, 1) * (math.sqrt(0.1) if sde_type == "sde" else 1.0)
        eps = (prev - mean) / s
        assert eps.mean().abs() < 0.01 and (eps.std() - 1).abs() < 0.01
        assert (eps[0] - eps[1]).std() > 1.3, "each sample gets its own noise"


def test_bad_inputs_raise():
    v, x = _inputs()
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, sde_type="ode")
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(v, 0.6, 0.5, x, -0.1)
    with pytest.raises(ValueError, match=r"sigma must lie in \(0, 1\]"):
        sde_step_with_logprob(v, 0.0, 0.0, x, 0.7)
    with pytest.raises(ValueError, match="sigma_next must lie"):
        sde_step_with_logprob(v, 0.5, 0.6, x, 0.7)
    with pytest.raises(ValueError, match=r"\[B=3\]"):
        sde_step_with_logprob(v, torch.tensor([0.6, 0.5]), 0.5, x, 0.7)
    with pytest.raises(ValueError, match=r"prev_sample \(3, 4, 5, 1\) and sample \(3, 4, 5, 6\) differ"):
        sde_step_with_logprob(v, 0.6, 0.5, x, 0.7, prev_sample=x[..., :1])  # would broadcast


def test_sde_window_default_and_bounds_and_uniformity():
    g = torch.Generator().manual_seed(0)
    assert sde_window(10, 0, None, g) == (0, 9)
    starts = Counter()
    for _ in range(3500):
        start, end = sde_window(10, 3, None, g)
        assert end - start == 3 and 0 <= start and end <= 9
        starts[start] += 1
    assert sorted(starts) == list(range(7))  # 0..6: the window [start, start+3) inside [0, 9)
    assert all(abs(c - 500) < 100 for c in starts.values()), starts  # ±4.8 standard deviations
    ranged = Counter(sde_window(10, 2, (3, 8), g)[0] for _ in range(1000))
    assert sorted(ranged) == [3, 4, 5, 6]
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [sde_window(50, 4, None, a) for _ in range(5)] == [sde_window(50, 4, None, b) for _ in range(5)]


def test_sde_window_validation_names_the_flags():
    assert check_sde_window(10, 0, None) == [] and check_sde_window(10, 9, None) == []
    assert check_sde_window(10, 2, (7, 9)) == []
    cases = {
        (10, -1, None): "--rl_sde_window_size must be >= 0",
        (10, 0, (0, 5)): "--rl_sde_window_range needs --rl_sde_window_size > 0",
        (10, 10, None): "--rl_sde_window_size 10 does not fit in --rl_sde_window_range 0,9",
        (10, 3, (4, 6)): "--rl_sde_window_size 3 does not fit",
        (10, 2, (5, 10)): "--rl_sde_window_range 5,10 must satisfy 0 <= lo < hi <= 9",
        (10, 2, (-1, 4)): "--rl_sde_window_range -1,4 must satisfy",
        (10, 2, (4, 4)): "--rl_sde_window_range 4,4 must satisfy",
        (10, 2, (1, 2, 3)): "--rl_sde_window_range must be two step indices",
        (1, 0, None): "--rl_num_inference_steps must be >= 2",
    }
    for args, message in cases.items():
        problems = check_sde_window(*args)
        assert len(problems) == 1 and problems[0].startswith(message), (args, problems)
        with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
            sde_window(*args, None)


def test_choose_train_steps_size_subset_and_uniformity():
    g = torch.Generator().manual_seed(0)
    candidates = list(range(5, 35))  # 30 steps
    for fraction, size in [(1.0, 30), (0.5, 15), (0.1, 3), (0.11, 4), (0.01, 1), (0.7, 21)]:
        steps = choose_train_steps(candidates, fraction, g)
        assert len(steps) == size and steps == sorted(set(steps)) and set(steps) <= set(candidates), fraction
    assert len(choose_train_steps(list(range(25)), 0.28, g)) == 7  # 0.28·25 = 7.000000000000001 in floats
    assert len(choose_train_steps(candidates, 1e-12, g)) == 1  # never an empty set of trained steps
    assert choose_train_steps([], 0.5, g) == []
    a, b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert [choose_train_steps(candidates, 0.3, a) for _ in range(3)] == [
        choose_train_steps(candidates, 0.3, b) for _ in range(3)
    ]
    counts = Counter(s for _ in range(1500) for s in choose_train_steps(candidates, 0.2, g))
    assert set(counts) == set(candidates)
    assert all(abs(c - 300) < 70 for c in counts.values()), counts  # each step chosen w.p. 6/30
    with pytest.raises(ValueError, match="--rl_timestep_fraction"):
        choose_train_steps(candidates, 0.0, g)


def test_nft_train_steps_are_a_permutation_prefix():
    for num_steps, fraction, size in [(10, 1.0, 10), (10, 0.25, 3), (10, 0.01, 1), (50, 0.14, 7), (10, 1e-12, 1)]:
        steps = nft_train_steps(num_steps, fraction, torch.Generator().manual_seed(4))
        assert steps == torch.randperm(num_steps, generator=torch.Generator().manual_seed(4))[:size].tolist()
    with pytest.raises(ValueError, match="--rl_timestep_fraction"):
        nft_train_steps(10, 1.5, None)


def test_token_weighted_log_probability_by_hand():
    """Token weights [1, 0, 1, 0.5] on a [1, 4, 2] latent: the squared error is averaged over channels, then
    weighted over tokens; a weight-0 token's transition does not change the log-probability at all."""
    from train.rl_ip.sampling import token_mean

    x = torch.tensor([[[1.0, 3.0], [5.0, 7.0], [0.0, 2.0], [4.0, 4.0]]])
    w = torch.tensor([[1.0, 0.0, 1.0, 0.5]])
    # per-token channel means 2, 6, 1, 4 -> (2 + 0 + 1 + 2) / 2.5
    assert token_mean(x, w).item() == pytest.approx(5.0 / 2.5)
    assert token_mean(x).item() == pytest.approx(26.0 / 8)
    with pytest.raises(ValueError, match="token_weights"):
        token_mean(x, w[:, :3])

    g = torch.Generator().manual_seed(0)
    sample, v = torch.randn(1, 4, 2, generator=g), torch.randn(1, 4, 2, generator=g)
    prev, logp, mean, std = sde_step_with_logprob(v, 0.6, 0.4, sample, 0.7, generator=g, token_weights=w)
    s = std.double() * math.sqrt(0.2)
    sq = ((prev.double() - mean.double()) ** 2).mean(-1)[0]
    expected = -(sq * w[0].double()).sum() / w.sum() / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    assert logp.item() == pytest.approx(expected.item(), rel=1e-5)
    moved = prev.clone()
    moved[:, 1] += 3.0  # the weight-0 token
    assert torch.equal(sde_step_with_logprob(v, 0.6, 0.4, sample, 0.7, prev_sample=moved, token_weights=w)[1], logp)


def test_window_without_a_range_lies_in_the_default_range():
    """cps's default: a window of 2 inside [0, 5) of 10 steps, not inside [0, 9)."""
    g = torch.Generator().manual_seed(0)
    starts = Counter(sde_window(10, 2, None, g, default_range=(0, 5))[0] for _ in range(500))
    assert set(starts) == {0, 1, 2, 3}
    assert sde_window(10, 0, None, g, default_range=(0, 5)) == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_is_euler_in_the_dtype_it_starts_in(dtype):
    """Without stochastic steps the loop is x <- x + dt·v step by step, computed in float32 and rounded back to the
    starting dtype after each step (inference keeps the model's dtype, RL rollouts float32); nothing is recorded."""
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)

    def velocity(x, sigma):
        assert x.dtype == dtype
        return x * 0.5 + float(sigma)

    x = x0
    for i in range(3):
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i]).float()).to(dtype)
    traj = denoise(velocity, x0, sigmas)
    assert traj.final.dtype == dtype and torch.equal(traj.final, x) and traj.steps == [] and traj.latents is None


def test_denoise_records_only_its_stochastic_steps_never_the_last():
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    traj = denoise(lambda x, sigma: -x, x0, sigmas, stochastic=range(1, 3), noise_level=0.7, generators=gens,
                   keep_means=True)
    assert traj.steps == [1] and traj.latents.shape == traj.next_latents.shape == traj.means.shape == (2, 1, 3, 4)
    assert traj.log_probs.shape == (2, 1) and torch.equal(traj.latents[:, 0], denoise(lambda x, s: -x, x0,
                                                                                    sigmas[:2]).final)
