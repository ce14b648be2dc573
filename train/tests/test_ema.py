"""EMA (docs/ARCHITECTURE.md §9) against a hand computation, including the warm-up decay."""

from __future__ import annotations

import pytest
import torch

from train.rl_ip.ema import EMA, ema_decay_at


def test_decay_schedule_by_hand():
    assert ema_decay_at(0, 0.9999) == pytest.approx(1 / 10)
    assert ema_decay_at(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay_at(8, 0.9999) == pytest.approx(9 / 18)
    assert ema_decay_at(10_000_000, 0.9999) == 0.9999
    assert ema_decay_at(50, 0.5) == 0.5


def test_ema_values_match_hand_computation_with_interval():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([("w", w)], decay=0.9999, update_interval=2)
    history = {1: [2.0, 0.0], 2: [4.0, 2.0], 3: [0.0, 0.0], 4: [8.0, -4.0]}
    decays = []
    for step, value in history.items():
        with torch.no_grad():
            w.copy_(torch.tensor(value))
        decays.append(ema.step(step))
    assert decays == [None, pytest.approx(0.1), None, pytest.approx(2 / 11)]
    # update 0 (after step 2): 0.1*[1,-2] + 0.9*[4,2] = [3.7, 1.6]
    # update 1 (after step 4): (2/11)*[3.7,1.6] + (9/11)*[8,-4] = [7.2181818..., -2.9818181...]
    expected = torch.tensor([2 / 11 * 3.7 + 9 / 11 * 8, 2 / 11 * 1.6 + 9 / 11 * -4])
    assert torch.allclose(ema.shadow["w"], expected, atol=1e-6)
    assert ema.num_updates == 2


def test_swap_in_and_restore_and_state_round_trip():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA([("w", w)], decay=0.5, device=torch.device("cpu"))
    with torch.no_grad():
        w.fill_(3.0)
    ema.step(1)  # d = 0.1 -> 0.1*1 + 0.9*3 = 2.8
    with ema.swapped_in():
        assert w.item() == pytest.approx(2.8)
    assert w.item() == 3.0
    other = EMA([("w", torch.nn.Parameter(torch.tensor([0.0])))], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.shadow["w"].item() == pytest.approx(2.8) and other.num_updates == 1
    with pytest.raises(ValueError, match="differing keys"):
        EMA([("v", torch.nn.Parameter(torch.zeros(1)))]).load_state_dict(ema.state_dict())
