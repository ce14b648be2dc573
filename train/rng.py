"""Every random stream of training, named in one place (docs/ARCHITECTURE.md, "Determinism: keyed random streams").

No draw depends on global RNG state, the batch layout or the process count: each comes from a CPU
``torch.Generator`` seeded by a key of integers. An RL stream is ``keyed_generator(seed, STREAM, *indices)``
with one of the stream numbers below (they only have to differ; changing one changes every run's draws).
"""

from __future__ import annotations

import torch

# RL streams: keyed_generator(seed, STREAM, ...indices in the comment)
RL_DATA_ORDER = 7  # (pass): the permutation of the dataset that a pass of RL batches is cut from
ROLLOUT_NOISE = 11  # (RL epoch, batch, global image): an image's initial noise, then its SDE noise
HELDOUT_NOISE = 13  # (held-out index): a held-out sample's initial noise, the same at every evaluation
SDE_WINDOW = 17  # (RL epoch, batch): where a GRPO rollout batch's SDE window starts
GRPO_BATCH_ORDER = 19  # (RL epoch, inner epoch): the order in which GRPO trains the epoch's rollout batches
GRPO_TRAINED_STEPS = 23  # (RL epoch, inner epoch, image id): which stored steps of an image GRPO trains
NFT_BATCH_ORDER = 29  # (RL epoch, inner epoch): the order in which NFT trains the epoch's rollout batches
NFT_LEVELS = 31  # (RL epoch, inner epoch, image id): an image's trained noise levels, then its noise at each


def _key(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**61 - 1)
    return h


def keyed_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (seed, stream, ...), hashed polynomially mod 2⁶¹ − 1."""
    return torch.Generator().manual_seed(_key(*parts))


# Supervised streams
def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The stream of one supervised sample draw (its noise, then its noise level), independent of batch size,
    accumulation and process count."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + position)


def epoch_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The stream of supervised epoch ``epoch``'s permutation of the dataset."""
    return torch.Generator().manual_seed(seed * 7919 + epoch)
