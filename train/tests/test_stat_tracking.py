"""Advantages (train/rl_ip/stat_tracking.py) against values worked out by hand on a small reward table."""

from __future__ import annotations

import math
import random

import pytest
import torch

from train.rl_ip.stat_tracking import compute_advantages, summarize_groups

NAN = float("nan")
EPS = 1e-4
# 3 groups x 3 rollouts: group "a" spread out, group "b" with one failed reward, group "c" all equal.
KEYS = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
REWARDS = [1.0, 0.5, 0.0, 0.2, NAN, 0.6, 0.3, 0.3, 0.3]
VALID = [True, True, True, True, False, True, True, True, True]
# By hand: the 8 valid rewards have mean 3.2 / 8 = 0.4; squared deviations 0.36 + 0.01 + 0.16 + 0.04 + 0.04
# + 3 * 0.01 = 0.64, so the batch std is sqrt(0.64 / 8) = sqrt(0.08). Group a: mean 0.5, std sqrt(0.5 / 3);
# group b: mean 0.4, std 0.2; group c: std 0.
BATCH_STD = math.sqrt(0.08)
STD_A = math.sqrt(0.5 / 3)


def rewards_tensor(values=REWARDS):
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: list[float]):
    assert actual.dtype == torch.float32 and actual.shape == (len(expected),)
    assert actual.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def stats_of(expected: list[float]) -> dict[str, float]:
    """adv/mean, std, abs_mean, min, max over the valid samples, from the hand-computed list."""
    v = [a for a, ok in zip(expected, VALID) if ok]
    mean = sum(v) / len(v)
    return {"adv/mean": mean, "adv/std": math.sqrt(sum((a - mean) ** 2 for a in v) / len(v)),
            "adv/abs_mean": sum(abs(a) for a in v) / len(v), "adv/min": min(v), "adv/max": max(v)}


def test_whole_batch_normalisation():
    out = compute_advantages(rewards_tensor(), KEYS)
    s = BATCH_STD + EPS
    expected = [0.6 / s, 0.1 / s, -0.4 / s, -0.2 / s, 0.0, 0.2 / s, -0.1 / s, -0.1 / s, -0.1 / s]
    assert_close(out.advantages, expected)
    assert out.valid.tolist() == VALID
    assert out.stats == pytest.approx({**stats_of(expected), "adv/zero_std_groups": 0.0, "adv/zero_std_fraction": 0.0,
                                       "adv/num_groups": 1.0, "adv/failed": 1.0}, rel=1e-6, abs=1e-12)


def test_per_group_normalisation():
    out = compute_advantages(rewards_tensor(), KEYS, per_group=True)
    sa, sb = STD_A + EPS, 0.2 + EPS
    expected = [0.5 / sa, 0.0, -0.5 / sa, -0.2 / sb, 0.0, 0.2 / sb, 0.0, 0.0, 0.0]
    assert_close(out.advantages, expected)
    assert out.advantages[6:].tolist() == [0.0, 0.0, 0.0]  # the zero-std group is exactly 0
    assert out.stats == pytest.approx({**stats_of(expected), "adv/zero_std_groups": 1.0,
                                       "adv/zero_std_fraction": 1 / 3, "adv/num_groups": 3.0, "adv/failed": 1.0},
                                      rel=1e-6, abs=1e-12)


def test_per_group_with_global_std():
    out = compute_advantages(rewards_tensor(), KEYS, per_group=True, global_std=True)
    s = BATCH_STD + EPS
    expected = [0.5 / s, 0.0, -0.5 / s, -0.2 / s, 0.0, 0.2 / s, 0.0, 0.0, 0.0]
    assert_close(out.advantages, expected)
    assert out.stats["adv/zero_std_groups"] == 1.0 and out.stats["adv/num_groups"] == 3.0


def test_group_with_one_valid_reward_is_a_zero_std_group():
    out = compute_advantages(rewards_tensor([0.9, NAN, 0.1, 0.5]), ["x", "x", "y", "y"], per_group=True, eps=0.0)
    # x has a single valid reward (no spread): 0; y: mean 0.3, std 0.2.
    assert_close(out.advantages, [0.0, 0.0, -1.0, 1.0])
    assert out.valid.tolist() == [True, False, True, True]
    assert out.stats["adv/zero_std_groups"] == 1.0 and out.stats["adv/zero_std_fraction"] == 0.5


def test_whole_batch_without_spread_gives_zero_and_counts_one_zero_std_group():
    out = compute_advantages(rewards_tensor([0.3, 0.3, NAN, 0.3]), ["a", "a", "b", "b"])
    assert out.advantages.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert out.stats["adv/zero_std_groups"] == 1.0 and out.stats["adv/zero_std_fraction"] == 1.0
    assert out.stats["adv/num_groups"] == 1.0 and out.stats["adv/failed"] == 1.0


def test_clamp():
    out = compute_advantages(rewards_tensor(), KEYS, adv_clip_max=1.0)
    s = BATCH_STD + EPS  # 0.6 / s = 2.12 and -0.4 / s = -1.41 are clamped; the rest are inside [-1, 1]
    expected = [1.0, 0.1 / s, -1.0, -0.2 / s, 0.0, 0.2 / s, -0.1 / s, -0.1 / s, -0.1 / s]
    assert_close(out.advantages, expected)
    assert out.stats["adv/max"] == 1.0 and out.stats["adv/min"] == -1.0
    with pytest.raises(ValueError, match="adv_clip_max"):
        compute_advantages(rewards_tensor(), KEYS, adv_clip_max=0.0)


# Two scorers; rewards are their 0.7 / 0.3 weighted sum (NaN where the sample failed).
OCR = [1.0, 0.0, 0.5, 0.8, NAN, 0.8, 0.5, 0.5, 0.5]
STYLE = [0.2, 0.2, 0.2, 0.1, NAN, 0.3, 0.4, 0.4, 0.4]
WEIGHTS = {"ocr": 0.7, "style": 0.3}


def scorer_tensors(ocr=OCR, style=STYLE):
    return {"ocr": torch.tensor(ocr), "style": torch.tensor(style)}


def test_per_scorer_per_group():
    out = compute_advantages(rewards_tensor(), KEYS, per_group=True, per_scorer=True, scores=scorer_tensors(),
                             weights=WEIGHTS)
    # ocr by group: a -> (+0.5, -0.5, 0) / (std_a + eps); b and c have no spread -> 0.
    # style by group: a and c have no spread -> 0; b (0.1, 0.3): mean 0.2, std 0.1 -> (-0.1, +0.1) / (0.1 + eps).
    ca = 0.7 * 0.5 / (STD_A + EPS)
    cb = 0.3 * 0.1 / (0.1 + EPS)
    # combined over the 8 valid samples: (ca, -ca, 0, -cb, cb, 0, 0, 0): mean 0, std sqrt((2ca² + 2cb²) / 8).
    s = math.sqrt((2 * ca**2 + 2 * cb**2) / 8) + EPS
    expected = [ca / s, -ca / s, 0.0, -cb / s, 0.0, cb / s, 0.0, 0.0, 0.0]
    assert_close(out.advantages, expected)
    assert out.advantages[6:].tolist() == [0.0, 0.0, 0.0]  # group c has no spread in either scorer: exactly 0
    assert out.stats["adv/zero_std_groups"] == 1.0 and out.stats["adv/num_groups"] == 3.0


def test_per_scorer_whole_batch_gives_a_small_spread_scorer_equal_say():
    scores = {"ocr": torch.tensor([1.0, 0.0, 1.0, 0.0]), "style": torch.tensor([0.2, 0.2, 0.4, 0.4])}
    weights = {"ocr": 0.5, "style": 0.5}
    rewards = rewards_tensor([0.6, 0.1, 0.7, 0.2])
    out = compute_advantages(rewards, [0, 0, 1, 1], per_scorer=True, scores=scores, weights=weights, eps=0.0)
    # ocr: mean 0.5, std 0.5 -> (1, -1, 1, -1); style: mean 0.3, std 0.1 -> (-1, -1, 1, 1);
    # combined (0, -1, 1, 0): mean 0, std sqrt(0.5).
    assert_close(out.advantages, [0.0, -math.sqrt(2), math.sqrt(2), 0.0])
    # The weighted total normalised as one number lets ocr's larger spread dominate:
    # rewards mean 0.4, deviations (0.2, -0.3, 0.3, -0.2), std sqrt(0.065).
    plain = compute_advantages(rewards, [0, 0, 1, 1], eps=0.0)
    s = math.sqrt(0.065)
    assert_close(plain.advantages, [0.2 / s, -0.3 / s, 0.3 / s, -0.2 / s])


def test_per_scorer_per_group_with_global_std_by_hand():
    scores = {"ocr": torch.tensor([1.0, 0.0, 0.5, 0.5]), "style": torch.tensor([0.2, 0.4, 0.1, 0.5])}
    weights = {"ocr": 0.5, "style": 0.5}
    rewards = rewards_tensor([0.6, 0.2, 0.3, 0.5])
    out = compute_advantages(rewards, ["x", "x", "y", "y"], per_group=True, global_std=True, per_scorer=True,
                             scores=scores, weights=weights, eps=0.0)
    # each scorer: minus its group mean, over its batch std. ocr: batch std sqrt(0.125), group y has no spread
    # -> (sqrt 2, -sqrt 2, 0, 0); style: batch std sqrt(0.025) -> (-sqrt 0.4, sqrt 0.4, -sqrt 1.6, sqrt 1.6).
    a, b = (math.sqrt(2) - math.sqrt(0.4)) / 2, math.sqrt(1.6) / 2
    # combined (a, -a, -b, b): mean 0, std sqrt((a² + b²) / 2)
    s = math.sqrt((a * a + b * b) / 2)
    assert_close(out.advantages, [a / s, -a / s, -b / s, b / s])


def test_per_scorer_is_invariant_to_each_scorer_scale_and_offset():
    keys, rewards = KEYS, rewards_tensor()
    base = compute_advantages(rewards, keys, per_group=True, per_scorer=True, scores=scorer_tensors(),
                              weights=WEIGHTS, eps=0.0)
    shifted = scorer_tensors(style=[100.0 * v + 3.0 for v in STYLE])
    moved = compute_advantages(rewards, keys, per_group=True, per_scorer=True, scores=shifted, weights=WEIGHTS, eps=0.0)
    assert moved.advantages.tolist() == pytest.approx(base.advantages.tolist(), abs=1e-5)


def test_per_scorer_bad_input():
    with pytest.raises(ValueError, match="per_scorer"):
        compute_advantages(rewards_tensor(), KEYS, per_scorer=True)
    with pytest.raises(ValueError, match="'vlm'"):
        compute_advantages(rewards_tensor(), KEYS, per_scorer=True, scores=scorer_tensors(),
                           weights={**WEIGHTS, "vlm": 0.1})
    bad = scorer_tensors(style=[NAN] + STYLE[1:])
    with pytest.raises(ValueError, match="scorer 'style'.* sample 0"):
        compute_advantages(rewards_tensor(), KEYS, per_scorer=True, scores=bad, weights=WEIGHTS)


MODES = [dict(), dict(per_group=True), dict(per_group=True, global_std=True), dict(adv_clip_max=1.5),
         dict(per_group=True, per_scorer=True), dict(per_scorer=True)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(m) or "whole_batch")
def test_permuting_samples_permutes_advantages_exactly(mode):
    # 40 groups of uneven size, random rewards with rounding-sensitive values, a few failures.
    rng = random.Random(0)
    keys = [f"rec{rng.randrange(40)}" for _ in range(200)]
    ocr = [rng.random() for _ in keys]
    style = [rng.random() * 1e-3 for _ in keys]
    rewards = [NAN if rng.random() < 0.05 else 0.7 * o + 0.3 * s for o, s in zip(ocr, style)]
    extra = dict(scores=scorer_tensors(ocr, style), weights=WEIGHTS) if mode.get("per_scorer") else {}
    out = compute_advantages(rewards_tensor(rewards), keys, **mode, **extra)
    perm = list(range(len(keys)))
    rng.shuffle(perm)
    extra_p = {}
    if extra:
        extra_p = dict(scores={n: t[perm] for n, t in extra["scores"].items()}, weights=WEIGHTS)
    out_p = compute_advantages(rewards_tensor([rewards[i] for i in perm]), [keys[i] for i in perm], **mode, **extra_p)
    assert torch.equal(out_p.advantages, out.advantages[perm])
    assert torch.equal(out_p.valid, out.valid[perm])
    assert out_p.stats == out.stats
    assert out.advantages.abs().sum() > 0


def test_all_failed_and_malformed_input_raise_clear_errors():
    with pytest.raises(ValueError, match="all 3 rewards failed"):
        compute_advantages(rewards_tensor([NAN, NAN, NAN]), ["a", "a", "b"], per_group=True)
    with pytest.raises(ValueError, match="all 2 rewards failed"):
        summarize_groups(rewards_tensor([NAN, NAN]), ["a", "b"])
    with pytest.raises(ValueError, match="one per group key"):
        compute_advantages(rewards_tensor([0.1, 0.2]), ["a", "a", "b"])
    with pytest.raises(ValueError, match="sample 1 .*'b'.* infinite"):
        compute_advantages(rewards_tensor([0.1, math.inf]), ["a", "b"])
    with pytest.raises(ValueError, match="rewards must be a 1-D tensor"):
        compute_advantages(rewards_tensor([0.1, 0.2]).view(2, 1), ["a", "b"])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        compute_advantages(rewards_tensor([0.1, 0.2]), ["a", "b"], eps=-1e-4)


def test_summarize_groups():
    out = summarize_groups(rewards_tensor(), KEYS)
    assert out == pytest.approx({"reward/group_std_mean": (STD_A + 0.2 + 0.0) / 3, "reward/zero_std_fraction": 1 / 3},
                                rel=1e-6)


def test_per_scorer_zero_spread_groups_are_exactly_zero_among_many():
    # Rounding leaves the combined batch mean a hair off 0; groups without spread must still get exactly 0.
    rng = random.Random(1)
    keys = [f"rec{i // 4}" for i in range(120)]
    ocr = [rng.random() if i < 80 else 0.25 for i in range(120)]
    style = [rng.random() if i < 80 else 0.75 for i in range(120)]
    rewards = rewards_tensor([0.7 * o + 0.3 * s for o, s in zip(ocr, style)])
    out = compute_advantages(rewards, keys, per_group=True, per_scorer=True, scores=scorer_tensors(ocr, style),
                             weights=WEIGHTS)
    assert out.advantages[80:].tolist() == [0.0] * 40
    assert out.stats["adv/zero_std_groups"] == 10.0 and out.stats["adv/num_groups"] == 30.0


def test_equal_rewards_whose_mean_rounds_are_still_a_zero_std_group():
    # float64 rewards, as the trainer gathers them: fsum([0.7] * 3) / 3 = 0.6999999999999998, so the group's std
    # is 1e-16, not 0, and its advantages must still be exactly 0.
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.1, 0.5], dtype=torch.float64)
    out = compute_advantages(rewards, ["a", "a", "a", "b", "b"], per_group=True)
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.stats["adv/zero_std_groups"] == 1.0
