"""The keyed data order (docs/ARCHITECTURE.md §5, §6): per-epoch permutations, per-sample noise keys that never
repeat, ranks that split each global micro-batch, and a resume that repeats and skips nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from train.config import parse_args
from train.data.preprocess import collate_samples
from train.data.synthesize import synthesize
from train.tests.train_helpers import tiny_train_args
from train.rng import sample_generator
from train.trainer import Trainer


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


def test_orders_differ_across_seeds_and_epochs(tmp_path):
    orders = {(s, e): tuple(bare_trainer(tmp_path, n=12, batch=1, seed=s).epoch_order(e))
              for s in range(3) for e in range(4)}
    assert len(set(orders.values())) == len(orders)


def test_the_keys_are_fixed_numbers_so_a_checkpoint_continues_on_the_same_data_and_noise(tmp_path):
    """By hand: sample (seed 3, epoch 2, position 5) draws from (3 * 1_000_003 + 2) * 1_000_000_007 + 5 and epoch 2's
    order of seed 3 from 3 * 7919 + 2 — a run resumed by another version of the code continues on the same draws."""
    assert torch.equal(torch.randn(8, generator=sample_generator(3, 2, 5)),
                       torch.randn(8, generator=torch.Generator().manual_seed(3_000_011_021_000_082)))
    assert torch.equal(torch.randn(8, generator=sample_generator(0, 4, 1)),
                       torch.randn(8, generator=torch.Generator().manual_seed(4_000_000_029)))
    assert bare_trainer(tmp_path, n=12, batch=1, seed=3).epoch_order(2) == \
        torch.randperm(12, generator=torch.Generator().manual_seed(23_759)).tolist()


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


def test_each_global_micro_batch_holds_one_canvas_size_and_ranks_split_it(tmp_path):
    sizes = ["a", "b"] * 6  # 12 samples, 6 of each size: 3 global micro-batches of 2 per size
    one = bare_trainer(tmp_path, n=12, batch=2)
    ranks = [bare_trainer(tmp_path, n=12, batch=1, rank=r, processes=2) for r in (0, 1)]
    for t in (one, *ranks):
        t.canvas_sizes = sizes
    batches = take(one._rank_batches(0, 0), 12)
    assert all(len({sizes[i] for i, _, _ in b}) == 1 for b in batches)
    assert [i for b in batches[:6] for i, _, _ in b] != one.epoch_order(0)  # reordered to fill one size at a time
    assert sorted(i for b in batches[:6] for i, _, _ in b) == list(range(12))
    split = [take(t._rank_batches(0, 0), 12) for t in ranks]
    assert [a + b for a, b in zip(*split)] == batches


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


def test_supervised_noise_and_noise_level_come_from_each_samples_key(tiny_models, data, tmp_path):
    """Each sample's generator ``sample_generator(--seed, epoch, position)`` gives its noise, then its noise level."""
    from train.flow_matching import flow_matching_loss, interpolate, pixel_mask_to_tokens, sample_sigmas, token_weights
    from train.supervised import supervised_loss, training_sigmas

    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, tmp_path / "run", 1, seed=3)))
    trainer.setup()
    cfg, sigmas = trainer.cfg, training_sigmas(trainer.model)
    batch = collate_samples([trainer.dataset[0], trainer.dataset[1]])
    keys = [(2, 5), (0, 1)]
    with torch.no_grad():
        got = supervised_loss(trainer, batch, keys, sigmas)
        x0 = trainer.clean_latents(batch)
        draws = [torch.Generator().manual_seed((3 * 1_000_003 + e) * 1_000_000_007 + p) for e, p in keys]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws])
        sigma = sample_sigmas(torch.stack([torch.randn((), generator=g) for g in draws]), sigmas)
        cond = trainer.condition(batch, cfg.guidance_scale)
        pred = trainer.model.velocity(interpolate(x0, noise, sigma), sigma, cond, adapter=trainer.adapter)
        weights = token_weights(pixel_mask_to_tokens(batch.mask), trainer.source_tokens(batch), cfg.masked_loss_weight)
        expected = flow_matching_loss(pred, noise - x0, weights)
    trainer.close()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
