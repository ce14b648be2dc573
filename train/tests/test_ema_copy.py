"""The parameter-copy primitive under EMA and the RL reference/old adapters (docs/ARCHITECTURE.md §8, §9):
blending, low-precision storage rounded once, recovery from a non-finite copy, state round trips."""

from __future__ import annotations

import pytest
import torch

from train.rl_ip.ema import EMA
from train.rl_ip.param_copy import ParamCopy


def module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2, bias=False))


def test_copy_is_independent_of_the_live_weights():
    live = module()
    copy = ParamCopy(live)
    before = {n: t.clone() for n, t in copy.tensors.items()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    assert all(torch.equal(copy.tensors[n], before[n]) for n in before)


def test_lerp_by_hand_in_float32():
    copy = ParamCopy({"w": torch.tensor([1.0, -2.0])})
    copy.lerp_from({"w": torch.tensor([3.0, 2.0])}, keep=0.25)
    assert copy.tensors["w"].tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * -2 + 0.75 * 2]


def test_low_precision_copies_blend_in_float32_and_round_once():
    g = torch.Generator().manual_seed(0)
    start, source = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    copy = ParamCopy({"w": start}, torch.bfloat16)
    assert copy.tensors["w"].dtype == torch.bfloat16 and copy.nbytes() == 2 * 4096
    copy.lerp_from({"w": source}, keep=0.3)
    expected = (0.3 * start.bfloat16().float() + 0.7 * source).bfloat16()
    assert torch.equal(copy.tensors["w"], expected)


def test_keep_zero_copies_the_source_exactly_even_from_a_non_finite_copy():
    """NFT decay type 0 sets old <- current every epoch: a copy that went non-finite must recover."""
    copy = ParamCopy({"w": torch.tensor([float("nan"), float("inf"), 1.0])})
    source = torch.tensor([0.5, -0.25, 2.0])
    copy.lerp_from({"w": source}, keep=0.0)
    assert torch.equal(copy.tensors["w"], source)
    low = ParamCopy({"w": torch.tensor([float("nan"), 1.0])}, torch.bfloat16)
    low.lerp_from({"w": torch.tensor([0.5, 3.0])}, keep=0.0)
    assert low.tensors["w"].tolist() == [0.5, 3.0]


def test_names_must_match():
    copy = ParamCopy(module())
    with pytest.raises(ValueError, match="parameter names differ"):
        copy.lerp_from({"other": torch.zeros(1)}, keep=0.5)
    with pytest.raises(ValueError, match="differing keys"):
        copy.load_state_dict({"other": torch.zeros(1)})


def test_wrapped_modules_are_unwrapped():
    inner = module()
    wrapped = torch.nn.DataParallel(inner)  # like DDP: the weights live under .module
    copy = ParamCopy(wrapped)
    assert copy.tensors.keys() == inner.state_dict().keys()
    copy.lerp_from(wrapped, keep=0.5)


def test_copy_to_params_and_state_round_trip():
    src, dst = module(0), module(1)
    copy = ParamCopy(src, torch.bfloat16)
    assert copy.params().keys() == copy.tensors.keys()
    moved = copy.params(device="cpu")
    assert moved.keys() == copy.tensors.keys() and all(torch.equal(moved[n], copy.tensors[n]) for n in moved)
    copy.copy_to(dst)
    for n, p in dst.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, src.state_dict()[n].bfloat16().float()), n
    other = ParamCopy(module(2), torch.bfloat16)
    other.load_state_dict(copy.state_dict())
    assert all(torch.equal(other.tensors[n], copy.tensors[n]) for n in copy.tensors)
    assert all(t.device.type == "cpu" for t in copy.state_dict().values())


def test_ema_follows_trainable_parameters_only():
    live = module()
    live[0].bias.requires_grad_(False)
    ema = EMA(live.named_parameters(), decay=0.5)
    assert set(ema.shadow) == {"0.weight", "1.weight"}
    ema.step(1)
    assert ema.num_updates == 1
