"""Batches of one canvas size from data whose references differ in aspect ratio (the default strip):
the bucketing functions by hand, supervised and RL runs at batch >= 2, the start-up refusal, and the
invariants that keep holding (resume = uninterrupted, 2 processes = 1 process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError, parse_args
from train.data import buckets
from train.data.dataset import CalligraphyDataset, Record, load_records
from train.data.synthesize import synthesize
from train.tests.reward_helpers import free_port
from train.tests.rl_helpers import rl_args
from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
from train.train import main
from train.trainer import Trainer

NATURAL_STRIP = {"reference_strip_height": 0}  # the default: each strip's height follows its reference


def test_batches_fill_up_per_size_in_the_order_given():
    sizes = ["a", "b", "a", "a", "b", "b", "a", "b", "a"]
    order = [8, 0, 1, 2, 3, 4, 5, 6, 7]
    # a: 8, 0, 2 | 3, 6 (open, dropped); b: 1, 4, 5 | 7 (dropped)
    assert buckets.same_size_batches(order, sizes, 3) == [[8, 0, 2], [1, 4, 5]]
    assert buckets.same_size_batches(order, sizes, 2) == [[8, 0], [2, 3], [1, 4], [5, 7]]
    assert buckets.batches_per_order(sizes, 9, 2) == 4 and buckets.batches_per_order(sizes, 9, 3) == 2
    assert buckets.same_size_batches([3, 1, 0, 2, 4], None, 2) == [[3, 1], [0, 2]]  # one size: consecutive runs
    assert buckets.batches_per_order(None, 5, 2) == 2
    assert buckets.size_groups(order, sizes, 2) == [[8, 0], [2, 3], [6], [1, 4], [5, 7]]  # nothing dropped
    assert buckets.undersized([(64, 80)] * 3 + [(64, 96)], 2) == {(64, 96): 1}
    assert buckets.describe([(64, 96), (64, 80), (64, 96)]) == "64x80: 1, 64x96: 2"


def test_canvas_size_is_read_without_preprocessing_and_equals_the_prepared_canvas(tmp_path):
    data = synthesize(tmp_path / "d", num=8, resolution=64, langs=("en", "zh"), seed=0)
    ds = CalligraphyDataset(load_records(data, resolution=64), resolution=64)
    bare = CalligraphyDataset([Record(r.id, r.source, r.mask, r.text, r.ref) for r in ds.records], resolution=64)
    prepared = [tuple(ds[i].image.shape[:0:-1]) for i in range(len(ds))]  # (W, H)
    assert [ds.canvas_size(i) for i in range(len(ds))] == prepared == [bare.canvas_size(i) for i in range(len(ds))]
    assert len(set(prepared)) == 2  # the fixture really mixes aspect ratios
    assert {CalligraphyDataset(ds.records, resolution=64, strip_height=32).canvas_size(i) for i in range(8)} == {(64, 96)}
    assert {CalligraphyDataset(ds.records, resolution=64, reference_strip=False).canvas_size(i)
            for i in range(8)} == {(64, 64)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8 samples in two canvas sizes (4 of 64x80, 4 of 64x96) under the default, reference-shaped strip."""
    return synthesize(tmp_path_factory.mktemp("mixed"), num=8, resolution=64, langs=("en", "zh"), seed=0)


def test_every_micro_batch_has_one_canvas_size_and_start_up_names_the_sizes(tiny_models, mixed, tmp_path, capsys):
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, mixed, tmp_path / "run", 4, train_batch_size=2,
                                                 **NATURAL_STRIP)))
    trainer.setup()
    seen = []
    for batch, keys in trainer.loader():
        seen.append(tuple(batch.image.shape))
        if len(seen) == 8:  # two epochs
            break
    assert set(seen) == {(2, 3, 80, 64), (2, 3, 96, 64)}
    trainer.close()
    out = capsys.readouterr().out
    assert "8 samples in 2 canvas sizes, batched per size (64x80: 4, 64x96: 4); 4 global micro-batches of 2" in out


def test_a_canvas_size_too_rare_for_one_batch_is_refused_before_the_models_load(tiny_models, tmp_path, capsys):
    data = synthesize(tmp_path / "d", num=8, resolution=64, langs=("en", "zh"), seed=0)
    lines = data.read_text().splitlines()
    ds = CalligraphyDataset(load_records(data, resolution=64), resolution=64)
    keep = [i for i in range(8) if ds.canvas_size(i) == (64, 80)] + [next(i for i in range(8)
                                                                         if ds.canvas_size(i) == (64, 96))]
    data.write_text("\n".join(lines[i] for i in keep) + "\n")
    argv = tiny_train_args(tiny_models, data, tmp_path / "run", 2, train_batch_size=2,
                           pretrained_model_name_or_path=tmp_path / "no-model-here", **NATURAL_STRIP)
    with pytest.raises(ConfigError) as err:
        Trainer(parse_args(argv)).setup()
    message = str(err.value)
    assert "64x96 (1 sample) hold fewer samples than one global batch of 2" in message
    assert "--reference_strip_height 16" in message  # the common size's strip: 80 - 64
    assert not (tmp_path / "run").exists()
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err


def _mixed_rl(tiny_models, mixed, out, steps, **flags):
    """2 supervised steps then RL, batches of 4 in groups of 2, on the mixed-size data."""
    return rl_args(tiny_models, mixed, out, steps, rl_warmup_steps=2, checkpointing_steps=2, adam_epsilon=1e-2,
                   **NATURAL_STRIP, **flags)


@pytest.mark.slow
def test_mixed_sizes_resumed_run_equals_the_uninterrupted_run(tiny_models, mixed, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_mixed_rl(tiny_models, mixed, straight, 6)) == 0
    assert main(_mixed_rl(tiny_models, mixed, resumed, 4)) == 0  # the supervised phase and one RL checkpoint
    assert main(_mixed_rl(tiny_models, mixed, resumed, 6, resume_from_checkpoint="latest")) == 0
    assert_weights_equal(adapter_weights(straight / "checkpoint-6" / "ip-adapter.bin"),
                         adapter_weights(resumed / "checkpoint-6" / "ip-adapter.bin"))


@pytest.mark.slow
def test_mixed_sizes_two_processes_equal_one_process(tiny_models, mixed, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_mixed_rl(tiny_models, mixed, one, 4)) == 0
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "train.train", *_mixed_rl(tiny_models, mixed, two, 4, train_batch_size=2)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for step in (2, 4):  # after the supervised phase, after RL
        assert_weights_equal(adapter_weights(one / f"checkpoint-{step}" / "ip-adapter.bin"),
                             adapter_weights(two / f"checkpoint-{step}" / "ip-adapter.bin"), atol=1e-6)
    rewards = [[line.split("reward/mean=")[1].split()[0] for line in (d / "train_log.txt").read_text().splitlines()
                if "reward/mean=" in line] for d in (one, two)]
    assert rewards[0] == rewards[1] and rewards[0]
