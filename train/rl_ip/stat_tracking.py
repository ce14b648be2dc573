"""Advantages from group rewards (docs/ARCHITECTURE.md §6, §7): pure functions, no accelerate, no model.

A *group* is the k rollouts of one dataset sample, keyed by record id. Every process calls
:func:`compute_advantages` on the all-gathered rewards and keys and keeps its own slice, so the
result must not depend on how samples are spread over processes: all sums are exactly rounded
(``math.fsum`` over float64 values), which makes the output bit-identical under any permutation
of the samples (permuting the inputs permutes the advantages) and on every rank.

Failed rewards are NaN. They are never replaced by a number: such a sample gets ``valid=False``
and advantage 0, and is left out of every mean and standard deviation. Standard deviations are
population ones (divide by n).

"Standard deviation is zero" means ``std < ZERO_STD`` (1e-8). Rewards are O(1) (scorers return
[0, 1]), so this only catches equal values whose mean picked up rounding, e.g. a group in which
every image scored the same or only one image has a reward. Such a group carries no learning
signal; its members get advantage exactly 0 and it is counted in ``adv/zero_std_groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

ZERO_STD = 1e-8


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # [N] float32; 0 for failed samples and for zero-std groups
    valid: torch.Tensor  # [N] bool: the reward was computed
    stats: dict[str, float]  # adv/mean, adv/std, adv/abs_mean, adv/min, adv/max (over valid samples),
    # adv/zero_std_groups, adv/zero_std_fraction, adv/num_groups, adv/failed


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Exactly rounded mean and population std: independent of the order of ``values``."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)


def _as_floats(x, n: int, what: str) -> list[float]:
    t = torch.as_tensor(x).detach()
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must be a 1-D tensor of {n} values (one per group key), got shape {tuple(t.shape)}")
    return t.to("cpu", torch.float64).tolist()


def _validate(rewards, group_keys) -> tuple[list[float], list[bool], torch.device]:
    keys_n = len(group_keys)
    device = rewards.device if isinstance(rewards, torch.Tensor) else torch.device("cpu")
    r = _as_floats(rewards, keys_n, "rewards")
    for i, v in enumerate(r):
        if math.isinf(v):
            raise ValueError(f"reward of sample {i} (group {group_keys[i]!r}) is {v}: failed rewards must be NaN, "
                             "not infinite")
    valid = [not math.isnan(v) for v in r]
    if not any(valid):
        raise ValueError(f"all {keys_n} rewards failed (NaN): no advantage can be computed for this batch")
    return r, valid, device


def _groups(group_keys, valid: list[bool]) -> dict[Hashable, list[int]]:
    """Indices of the valid samples of each group (groups with no valid sample are absent)."""
    groups: dict[Hashable, list[int]] = {}
    for i, (k, ok) in enumerate(zip(group_keys, valid)):
        if ok:
            groups.setdefault(k, []).append(i)
    return groups


def _normalise(values: list[float], valid: list[bool], groups: dict[Hashable, list[int]] | None,
               global_std: bool, eps: float) -> tuple[list[float], int, int]:
    """``(normalised values, zero-std groups, groups)``; invalid samples get 0.

    ``groups=None`` normalises the whole valid batch as one group; otherwise each group by its own
    mean and its own std (or, with ``global_std``, the std of every valid value). A group whose own
    std is zero gets 0 (with ``global_std`` it has no spread to give either: its values all equal
    its mean; forcing 0 only drops rounding residue).
    """
    out = [0.0] * len(values)
    all_idx = [i for i, ok in enumerate(valid) if ok]
    batch_mean, batch_std = _mean_std([values[i] for i in all_idx])
    if groups is None:
        if batch_std < ZERO_STD:
            return out, 1, 1
        for i in all_idx:
            out[i] = (values[i] - batch_mean) / (batch_std + eps)
        return out, 0, 1
    zero = 0
    for idx in groups.values():
        mean, std = _mean_std([values[i] for i in idx])
        if std < ZERO_STD:
            zero += 1
            continue
        scale = (batch_std if global_std else std) + eps
        for i in idx:
            out[i] = (values[i] - mean) / scale
    return out, zero, len(groups)


def compute_advantages(rewards, group_keys: Sequence[Hashable], per_group: bool = False, global_std: bool = False,
                       adv_clip_max: float | None = None, eps: float = 1e-4, scores=None, weights=None,
                       per_scorer: bool = False) -> AdvantageResult:
    """Advantages of N samples from their rewards.

    Args:
        rewards: [N] float, NaN where the reward failed.
        group_keys: N hashable keys (record ids); groups may have any size and come in any order.
        per_group: normalise each group by its own mean and std (``--rl_per_prompt_stat_tracking``);
            otherwise ``(r - mean) / (std + eps)`` over the whole valid batch, which then counts as one group.
        global_std: with ``per_group``, divide by the std of every valid reward (``--rl_global_std``).
        adv_clip_max: clamp the advantages to ``[-adv_clip_max, adv_clip_max]`` when given.
        per_scorer: GDPO-style (``--rl_reward_norm per_scorer``): normalise each scorer's ``scores[name]``
            ([N] float) as above, combine with ``weights[name]``, then normalise the combination across the
            valid batch, so a scorer with a small spread is not drowned by another's scale. Validity
            still comes from ``rewards``; scorers absent from ``weights`` are not used.
    """
    r, valid, device = _validate(rewards, group_keys)
    if adv_clip_max is not None and not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0 (--rl_adv_clip_max), got {adv_clip_max}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    groups = _groups(group_keys, valid) if per_group else None

    if not per_scorer:
        adv, zero, n_groups = _normalise(r, valid, groups, global_std, eps)
    else:
        if not scores or not weights:
            raise ValueError("per-scorer reward normalisation (--rl_reward_norm per_scorer) needs per-scorer "
                             "scores and --reward_weights")
        missing = sorted(set(weights) - set(scores))
        if missing:
            raise ValueError(f"per-scorer normalisation: no scores for weighted scorer(s) {missing}; "
                             f"scores were given for {sorted(scores)}")
        combined = [0.0] * len(r)
        for name in sorted(weights):
            s = _as_floats(scores[name], len(r), f"scores[{name!r}]")
            for i, ok in enumerate(valid):
                if ok and not math.isfinite(s[i]):
                    raise ValueError(f"scorer {name!r} has no finite score for sample {i} "
                                     f"(group {group_keys[i]!r}) although its total reward is {r[i]}")
            z, _, _ = _normalise(s, valid, groups, global_std, eps)
            w = float(weights[name])
            combined = [c + w * zi for c, zi in zip(combined, z)]
        # Zero-std groups: those whose combined value has no spread inside the group.
        zero_groups = set()
        if groups is not None:
            zero_groups = {k for k, idx in groups.items() if _mean_std([combined[i] for i in idx])[1] < ZERO_STD}
        adv, zero, n_groups = _normalise(combined, valid, None, False, eps)
        if groups is not None:
            for k in zero_groups:
                for i in groups[k]:
                    adv[i] = 0.0
            zero, n_groups = len(zero_groups), len(groups)

    if adv_clip_max is not None:
        adv = [min(max(a, -adv_clip_max), adv_clip_max) for a in adv]
    valid_adv = [a for a, ok in zip(adv, valid) if ok]
    mean, std = _mean_std(valid_adv)
    stats = {
        "adv/mean": mean,
        "adv/std": std,
        "adv/abs_mean": math.fsum(abs(a) for a in valid_adv) / len(valid_adv),
        "adv/min": min(valid_adv),
        "adv/max": max(valid_adv),
        "adv/zero_std_groups": float(zero),
        "adv/zero_std_fraction": zero / n_groups,
        "adv/num_groups": float(n_groups),
        "adv/failed": float(valid.count(False)),
    }
    return AdvantageResult(advantages=torch.tensor(adv, dtype=torch.float32, device=device),
                           valid=torch.tensor(valid, dtype=torch.bool, device=device), stats=stats)


def summarize_groups(rewards, group_keys: Sequence[Hashable]) -> dict[str, float]:
    """Monitoring numbers of the groups, whatever the normalisation mode.

    ``reward/group_std_mean``: mean over groups of the within-group std of the valid rewards;
    ``reward/zero_std_fraction``: share of groups whose rewards have no spread (no learning signal
    under per-group normalisation). Groups with no valid reward are left out.
    """
    r, valid, _ = _validate(rewards, group_keys)
    stds = [_mean_std([r[i] for i in idx])[1] for idx in _groups(group_keys, valid).values()]
    return {"reward/group_std_mean": math.fsum(stds) / len(stds),
            "reward/zero_std_fraction": sum(s < ZERO_STD for s in stds) / len(stds)}
