"""DiffusionNFT loss, r mapping and old-adapter decay (train/rl_logic/nft_forward.py) against hand computations.

Expected values are worked out with plain Python floats from the formulas of docs/ARCHITECTURE.md §8, element by element.
"""

from __future__ import annotations

import pytest
import torch

from train.rl_logic.nft_forward import ADV_MODES, nft_decay, nft_loss, nft_r

CLIP = 5.0
NORMAL = dict(beta=0.5, adv_mode="normal", adv_clip_max=CLIP, kl_beta=0.1)  # the loss's hyper-parameters
NO_KL = {**NORMAL, "kl_beta": 0.0}
ADVANTAGES = [-7.0, -5.0, -2.5, -1.0, 0.0, 1.0, 2.5, 5.0, 7.0]
# r = clamp(A / 5 / 2 + 0.5, 0, 1) after clamping A to [-5, 5] and applying the mode.
R_TABLE = {
    "normal": [0.0, 0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0, 1.0],
    "positive_only": [0.5, 0.5, 0.5, 0.5, 0.5, 0.6, 0.75, 1.0, 1.0],
    "negative_only": [0.0, 0.0, 0.25, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5],
    "one_only": [0.5, 0.5, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6],
    "binary": [0.4, 0.4, 0.4, 0.4, 0.5, 0.6, 0.6, 0.6, 0.6],
}


@pytest.mark.parametrize("mode", ADV_MODES)
def test_r_table(mode):
    r = nft_r(torch.tensor(ADVANTAGES), mode, CLIP)
    assert r.dtype == torch.float32
    assert r.tolist() == pytest.approx(R_TABLE[mode], abs=1e-7)


def test_r_with_another_clip_and_unknown_mode():
    adv = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    assert nft_r(adv, "normal", 2.0).tolist() == pytest.approx([0.0, 0.375, 0.5, 0.625, 1.0])
    assert nft_r(adv, "one_only", 2.0).tolist() == pytest.approx([0.5, 0.5, 0.5, 0.75, 0.75])
    assert nft_r(adv, "binary", 2.0).tolist() == pytest.approx([0.25, 0.25, 0.5, 0.75, 0.75])
    with pytest.raises(ValueError, match="--nft_adv_mode 'positive'"):
        nft_r(adv, "positive", 2.0)
    with pytest.raises(ValueError, match="--rl_adv_clip_max must be > 0"):
        nft_r(adv, "normal", 0.0)


# ---- the loss, by hand -------------------------------------------------------------------------------------------

def hand_nft(x0, xt, t, vth, vold, vref, r, beta, clip, kl_beta):
    """(loss, policy, kl, old_deviate, mean L+, mean L-, d loss / d v_theta) from nested lists, plain floats."""
    B = len(x0)
    x0f, xtf, vf, vof, vrf = ([[e for row in sample for e in row] for sample in x] for x in (x0, xt, vth, vold, vref))
    n = len(x0f[0])
    policy_terms, lpos, lneg, grad = [], [], [], []
    for b in range(B):
        e_pos = [xtf[b][j] - t[b] * (beta * vf[b][j] + (1 - beta) * vof[b][j]) - x0f[b][j] for j in range(n)]
        e_neg = [xtf[b][j] - t[b] * ((1 + beta) * vof[b][j] - beta * vf[b][j]) - x0f[b][j] for j in range(n)]
        w_pos = max(sum(abs(e) for e in e_pos) / n, 1e-5)
        w_neg = max(sum(abs(e) for e in e_neg) / n, 1e-5)
        lp = sum(e * e for e in e_pos) / n / w_pos
        ln = sum(e * e for e in e_neg) / n / w_neg
        lpos.append(lp)
        lneg.append(ln)
        policy_terms.append((r[b] * lp + (1 - r[b]) * ln) / beta * clip)
        # d/dv of e_pos is -t*beta, of e_neg +t*beta; the weights w carry no gradient.
        grad.append([clip / (B * beta) * (r[b] * 2 * e_pos[j] * (-t[b] * beta) / (n * w_pos)
                                          + (1 - r[b]) * 2 * e_neg[j] * (t[b] * beta) / (n * w_neg))
                     + kl_beta * 2 * (vf[b][j] - vrf[b][j]) / (B * n) for j in range(n)])
    policy = sum(policy_terms) / B
    kl = sum((vf[b][j] - vrf[b][j]) ** 2 for b in range(B) for j in range(n)) / (B * n)
    old_dev = sum((vf[b][j] - vof[b][j]) ** 2 for b in range(B) for j in range(n)) / (B * n)
    return policy + kl_beta * kl, policy, kl, old_dev, sum(lpos) / B, sum(lneg) / B, grad


def batch(seed=0, B=4, L=2, C=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps, vth, vold, vref = (torch.randn(B, L, C, generator=g) for _ in range(5))
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])[:B]
    xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    return x0, xt, t, vth, vold * 0.5 + vth * 0.5, vref


MODE_ADVANTAGES = [-7.0, -1.0, 0.0, 2.5]
MODE_R = {  # clip 5: r of each advantage under each mode (rows of R_TABLE above)
    "normal": [0.0, 0.4, 0.5, 0.75],
    "positive_only": [0.5, 0.5, 0.5, 0.75],
    "negative_only": [0.0, 0.4, 0.5, 0.5],
    "one_only": [0.5, 0.5, 0.5, 0.6],
    "binary": [0.4, 0.4, 0.5, 0.6],
}


@pytest.mark.parametrize("mode", ADV_MODES)
def test_loss_matches_hand_computation(mode):
    x0, xt, t, vth, vold, vref = batch()
    beta, kl_beta = 0.3, 0.01
    vth.requires_grad_(True)
    loss, info = nft_loss(x0, xt, t, vth, vold, vref, torch.tensor(MODE_ADVANTAGES), beta=beta, adv_mode=mode,
                          adv_clip_max=CLIP, kl_beta=kl_beta)
    exp_loss, exp_policy, exp_kl, exp_dev, exp_lpos, exp_lneg, exp_grad = hand_nft(
        x0.tolist(), xt.tolist(), t.tolist(), vth.tolist(), vold.tolist(), vref.tolist(), MODE_R[mode], beta,
        CLIP, kl_beta)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    expected_info = {"policy_loss": exp_policy, "kl": exp_kl, "old_deviate": exp_dev, "loss_pos": exp_lpos,
                     "loss_neg": exp_lneg, "r_mean": sum(MODE_R[mode]) / 4, "r_min": min(MODE_R[mode]),
                     "r_max": max(MODE_R[mode])}
    assert {k: v.item() for k, v in info.items()} == pytest.approx(expected_info, rel=1e-5)
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in info.values())
    loss.backward()
    got = vth.grad.view(4, -1).tolist()
    for b in range(4):
        assert got[b] == pytest.approx(exp_grad[b], rel=1e-4, abs=1e-7)


def test_x0_weight_clamped_at_1e_5():
    # Sample 0: x̂0 error 2e-6 everywhere, so w = 2e-6 is raised to 1e-5 (L = 4e-12 / 1e-5 = 4e-7, not 2e-6).
    # Sample 1: errors (2e-5, 4e-5): w = 3e-5 stays (L = (4e-10 + 16e-10) / 2 / 3e-5).
    x0 = torch.zeros(2, 1, 2)
    xt = torch.zeros(2, 1, 2)
    t = torch.tensor([0.5, 0.5])
    v = torch.tensor([[[-4e-6, -4e-6]], [[-4e-5, -8e-5]]])  # x̂0 = x_t - t·v = -t·v
    loss, info = nft_loss(x0, xt, t, v, v.clone(), v.clone(), torch.tensor([1.0, -1.0]), **NORMAL)
    l0 = (2e-6) ** 2 / 1e-5
    l1 = ((2e-5) ** 2 + (4e-5) ** 2) / 2 / 3e-5
    # v_theta == v_old, so L+ == L- and r drops out: policy = mean(L) / beta * clip.
    assert info["loss_pos"].item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert info["loss_neg"].item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert loss.item() == pytest.approx((l0 + l1) / 2 / 0.5 * CLIP, rel=1e-5)


def test_gradient_reaches_only_v_theta():
    x0, xt, t, vth, vold, vref = batch(seed=1)
    inputs = [x0, xt, t, vth, vold, vref, torch.tensor(MODE_ADVANTAGES)]
    for x in inputs:
        x.requires_grad_(True)
    loss, _ = nft_loss(*inputs, **NORMAL)
    loss.backward()
    assert vth.grad is not None and vth.grad.abs().sum() > 0 and torch.isfinite(vth.grad).all()
    for name, x in zip(("x0", "x_t", "t", "v_old", "v_ref", "advantages"), inputs[:3] + inputs[4:]):
        assert x.grad is None, name


def test_identical_predictions_have_no_kl_and_no_old_deviation():
    x0, xt, t, vth, _, _ = batch(seed=2)
    loss, info = nft_loss(x0, xt, t, vth, vth.clone(), vth.clone(), torch.tensor(MODE_ADVANTAGES), **NORMAL)
    assert info["kl"].item() == 0.0 and info["old_deviate"].item() == 0.0
    assert loss.item() == info["policy_loss"].item()
    assert info["loss_pos"].item() == info["loss_neg"].item()  # v+ == v- == v_old


def test_low_precision_inputs_are_computed_in_float32():
    tensors = [x.to(torch.bfloat16) for x in batch(seed=3)]
    adv = torch.tensor(MODE_ADVANTAGES)
    loss, info = nft_loss(*tensors, adv, **{**NORMAL, "beta": 0.3})
    ref_loss, ref_info = nft_loss(*(x.float() for x in tensors), adv, **{**NORMAL, "beta": 0.3})
    assert loss.dtype == torch.float32 and torch.equal(loss, ref_loss)
    assert all(torch.equal(info[k], ref_info[k]) for k in info)


def test_bad_arguments_raise():
    x0, xt, t, vth, vold, vref = batch()
    adv = torch.tensor(MODE_ADVANTAGES)
    with pytest.raises(ValueError, match="v_old has shape"):
        nft_loss(x0, xt, t, vth, vold[:, :1], vref, adv, **NORMAL)
    with pytest.raises(ValueError, match="advantages must have shape"):
        nft_loss(x0, xt, t, vth, vold, vref, adv[:3], **NORMAL)
    for beta in (0.0, 1.5):  # β > 1 would give v⁺ a negative weight on v_old
        with pytest.raises(ValueError, match="--nft_beta"):
            nft_loss(x0, xt, t, vth, vold, vref, adv, **{**NORMAL, "beta": beta})
    with pytest.raises(ValueError, match="at least 2 dims"):
        nft_loss(*(x[:, 0, 0] for x in (x0, xt)), t, *(x[:, 0, 0] for x in (vth, vold, vref)), adv, **NORMAL)
    with pytest.raises(TypeError):  # hyper-parameters are keyword-only: no silent swap of beta and kl_beta
        nft_loss(x0, xt, t, vth, vold, vref, adv, 0.5, "normal", CLIP, 0.1)


# ---- old-adapter decay -------------------------------------------------------------------------------------------

STEPS = [0, 50, 74, 75, 76, 100, 208, 209, 499, 500, 10000]
DECAY = {
    0: [0.0] * len(STEPS),
    1: [0.0, 0.05, 0.074, 0.075, 0.076, 0.1, 0.208, 0.209, 0.499, 0.5, 0.5],
    # 0 before step 75, then 0.0075 per step: 76 -> 0.0075, 100 -> 0.1875, 208 -> 0.9975, 209 -> 1.005 capped.
    2: [0.0, 0.0, 0.0, 0.0, 0.0075, 0.1875, 0.9975, 0.999, 0.999, 0.999, 0.999],
}


@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_decay_schedule(decay_type):
    assert [nft_decay(s, decay_type) for s in STEPS] == pytest.approx(DECAY[decay_type], abs=1e-12)


def test_decay_rejects_unknown_type():
    for bad in (3, -1, "1", True):
        with pytest.raises(ValueError, match="--nft_decay_type"):
            nft_decay(10, bad)
    with pytest.raises(ValueError, match="step must be >= 0"):
        nft_decay(-1, 1)



def test_failed_samples_add_nothing_to_the_policy_term():
    torch.manual_seed(0)
    x0, x_t, v, v_old = (torch.randn(2, 3, 4) for _ in range(4))
    v = v.requires_grad_()
    t, adv = torch.tensor([0.3, 0.7]), torch.tensor([1.0, -2.0])
    both, _ = nft_loss(x0, x_t, t, v, v_old, v_old, adv, **NO_KL)
    only_first, _ = nft_loss(x0, x_t, t, v, v_old, v_old, adv, **NO_KL,
                             valid=torch.tensor([True, False]))
    first_alone, _ = nft_loss(x0[:1], x_t[:1], t[:1], v[:1], v_old[:1], v_old[:1], adv[:1], **NO_KL)
    assert torch.allclose(only_first, first_alone / 2) and not torch.allclose(only_first, both)
    only_first.backward()
    assert torch.all(v.grad[1] == 0) and torch.any(v.grad[0] != 0)
