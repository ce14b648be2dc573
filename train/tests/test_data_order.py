"""The keyed data order (SPEC §5, §6): per-epoch permutations, per-sample noise keys that never
repeat, ranks that split each global micro-batch, and a resume that repeats and skips nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from train.config import parse_args
from train.data.synthesize import synthesize
from train.tests.train_helpers import tiny_train_args
from train.trainer import Trainer, sample_generator


def bare_trainer(tmp_path, n: int, batch: int, rank: int = 0, processes: int = 1, seed: int = 0) -> Trainer:
    """A Trainer with only what the data order reads: no model is loaded; ``rank`` stands in for accelerate's."""
    trainer = Trainer(parse_args(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
                                  "--train_batch_size", str(batch), "--seed", str(seed)]))
    trainer.accelerator = SimpleNamespace(process_index=rank, num_processes=processes)
    trainer.dataset = list(range(n))
    trainer.global_batch = batch * processes
    trainer.batches_per_epoch = n // trainer.global_batch
    return trainer


def take(gen, k):
    return [next(gen) for _ in range(k)]


def test_each_epoch_is_a_fresh_permutation(tmp_path):
    t = bare_trainer(tmp_path, n=12, batch=1)
    orders = [t.epoch_order(e) for e in range(4)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4  # every epoch visits the data in another order
    assert t.epoch_order(2) == orders[2]  # a pure function of (seed, epoch)
    assert bare_trainer(tmp_path, n=12, batch=1, seed=1).epoch_order(0) != orders[0]


def test_noise_keys_differ_between_epochs_and_positions():
    def first(seed, epoch, position):
        return torch.randn(8, generator=sample_generator(seed, epoch, position))

    assert torch.equal(first(0, 3, 5), first(0, 3, 5))
    draws = [first(s, e, p) for s in (0, 1) for e in range(3) for p in range(4)]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)


def test_keys_never_repeat_across_epochs_and_the_epoch_tail_is_dropped(tmp_path):
    t = bare_trainer(tmp_path, n=7, batch=2)  # 3 micro-batches per epoch, one sample dropped
    batches = take(t._rank_batches(0, 0), 9)
    keys = [(e, p) for b in batches for _, e, p in b]
    assert len(set(keys)) == len(keys) == 18
    assert [b[0][1] for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for e in range(3):
        order = t.epoch_order(e)
        assert [i for b in batches[3 * e:3 * e + 3] for i, _, _ in b] == order[:6]


def test_ranks_split_each_global_micro_batch(tmp_path):
    one = take(bare_trainer(tmp_path, n=8, batch=4)._rank_batches(0, 0), 4)
    ranks = [take(bare_trainer(tmp_path, n=8, batch=2, rank=r, processes=2)._rank_batches(0, 0), 4) for r in (0, 1)]
    for m in range(4):
        assert ranks[0][m] + ranks[1][m] == one[m]


def test_continuing_from_any_position_equals_the_uninterrupted_stream(tmp_path):
    t = bare_trainer(tmp_path, n=6, batch=2)  # 3 micro-batches per epoch
    stream = take(t._rank_batches(0, 0), 12)
    for epoch, position, skip in ((0, 1, 1), (0, 3, 3), (1, 0, 3), (1, 2, 5), (2, 3, 9)):
        assert take(t._rank_batches(epoch, position), 12 - skip) == stream[skip:], (epoch, position)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("data"), num=4, resolution=64, langs=("en",), seed=4)


def _recorded_run(tiny_models, data, out, stop_at, resume, seen):
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, 8, checkpointing_steps=2,
                                                 resume_from_checkpoint=resume)))
    trainer.setup()
    real_loader = trainer.loader

    def recording_loader():  # the batches the loop really consumed, in order
        for batch, keys in real_loader():
            seen.extend((sid, e, p) for sid, (e, p) in zip(batch.ids, keys))
            yield batch, keys

    trainer.loader = recording_loader
    trainer.run(stop_at=stop_at)
    return trainer


@pytest.mark.slow
def test_resume_at_and_right_after_an_epoch_boundary_repeats_no_batch(tiny_models, data, tmp_path):
    straight = []
    done = _recorded_run(tiny_models, data, tmp_path / "straight", None, None, straight)
    assert len(straight) == 8 and len({k[1:] for k in straight}) == 8
    assert [e for _, e, _ in straight] == [0] * 4 + [1] * 4
    assert (done.epoch, done.position) == (1, 4)

    resumed = []
    # 4 micro-batches per epoch: the process dies after checkpoint-4 (the epoch is consumed but not yet
    # rolled over), then after checkpoint-6 (two batches into the next epoch), then finishes.
    for stop_at, resume, position in ((4, None, (0, 4)), (6, "latest", (1, 2)), (None, "latest", (1, 4))):
        trainer = _recorded_run(tiny_models, data, tmp_path / "resumed", stop_at, resume, resumed)
        assert (trainer.epoch, trainer.position) == position
    assert resumed == straight
    assert sorted(sid for sid, e, _ in resumed if e == 1) == sorted(sid for sid, e, _ in resumed if e == 0)
