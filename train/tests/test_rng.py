"""The named random streams (train/rng.py): keys by hand, distinct streams, the supervised schemes as the trainer
draws them today."""

from __future__ import annotations

import torch

from train import rng

STREAMS = {"RL_DATA_ORDER": 7, "ROLLOUT_NOISE": 11, "HELDOUT_NOISE": 13, "SDE_WINDOW": 17, "GRPO_BATCH_ORDER": 19,
           "GRPO_TRAINED_STEPS": 23, "NFT_BATCH_ORDER": 29, "NFT_LEVELS": 31}


def test_rl_keys_by_hand_and_streams_distinct():
    assert {n: getattr(rng, n) for n in STREAMS} == STREAMS  # a changed number changes every run's draws
    assert rng.keyed_generator(3, 11, 2).initial_seed() == (3 * 1_000_003 + 11) * 1_000_003 + 2
    big = 2**61 - 1
    assert rng.keyed_generator(big + 5).initial_seed() == 5  # reduced mod 2^61 - 1
    draws = {torch.randn(4, generator=rng.keyed_generator(0, s, 1, 2)).tolist()[0] for s in STREAMS.values()}
    assert len(draws) == len(STREAMS)


def test_supervised_streams_by_hand():
    assert rng.sample_generator(7, 2, 3).initial_seed() == (7 * 1_000_003 + 2) * 1_000_000_007 + 3
    assert rng.epoch_order_generator(7, 2).initial_seed() == 7 * 7919 + 2
