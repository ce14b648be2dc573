"""Resuming through the real trainer and entry point: exact continuation after several
interruptions, and one clear exit-2 line for every checkpoint or flag that cannot be continued (docs/ARCHITECTURE.md §5)."""

from __future__ import annotations

import json

import pytest
import torch

from train import checkpointing as ckpt
from train.config import parse_args
from train.data.synthesize import synthesize
from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
from train.train import main
from train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 10 samples in global micro-batches of 2 with accumulation 2: an epoch is 2.5 optimizer steps,
    # so checkpoints fall both on and between epoch boundaries.
    return synthesize(tmp_path_factory.mktemp("data"), num=10, resolution=64, langs=("en",), seed=2)


def assert_same_tensors(a, b, where=""):
    """Recursive exact equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (where, (a.float() - b.float()).abs().max().item())
    else:
        assert a == b, (where, a, b)


def assert_same_checkpoint(a, b, ema: bool = True):
    assert_weights_equal(adapter_weights(a / "ip-adapter.bin"), adapter_weights(b / "ip-adapter.bin"))
    if ema:
        assert_weights_equal(adapter_weights(a / "ip-adapter-ema.bin"), adapter_weights(b / "ip-adapter-ema.bin"))
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl"):  # Adam moments and steps; LR scheduler
        assert_same_tensors(torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), name)
    sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    sa.pop("config", None), sb.pop("config", None)  # holds --resume_from_checkpoint, which differs
    assert sa == sb


FLAGS = dict(train_batch_size=2, gradient_accumulation_steps=2, use_ema=True, checkpointing_steps=2,
             lr_scheduler="cosine", lr_warmup_steps=2)


@pytest.mark.slow
def test_three_interruptions_reach_the_uninterrupted_weights_bit_for_bit(tiny_models, data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(tiny_train_args(tiny_models, data, straight, 6, **FLAGS)) == 0
    # The process dies after optimizer step k; the next start resumes from the newest checkpoint:
    # 3 (one step after checkpoint-2, which is mid-epoch), 4 (right at a checkpoint), 5 (after checkpoint-4).
    for i, k in enumerate((3, 4, 5)):
        resume = "latest" if i else None
        trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, resumed, 6, resume_from_checkpoint=resume,
                                                     **FLAGS)))
        trainer.setup()
        trainer.run(stop_at=k)
        assert trainer.global_step == k
    assert main(tiny_train_args(tiny_models, data, resumed, 6, resume_from_checkpoint="latest", **FLAGS)) == 0
    assert [s for s, _ in ckpt.list_checkpoints(resumed)] == [2, 4, 6]
    for step in (4, 6):
        assert_same_checkpoint(straight / f"checkpoint-{step}", resumed / f"checkpoint-{step}")


@pytest.fixture(scope="module")
def finished(tiny_models, data, tmp_path_factory):
    """A finished 2-step run with EMA and checkpoints at steps 1 and 2 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(tiny_train_args(tiny_models, data, out, 2, checkpointing_steps=1, use_ema=True)) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _exit_2_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "custom_checkpoint_0.pkl",
                                  "random_states_0.pkl", "ip-adapter-ema.bin"])
def test_resuming_a_truncated_checkpoint_is_one_line_naming_the_file(tiny_models, data, finished, tmp_path,
                                                                    capsys, name):
    out = _copy(finished, tmp_path / "run")
    file = out / "checkpoint-2" / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    line = _exit_2_line(capsys, tiny_train_args(tiny_models, data, out, 3, use_ema=True,
                                                resume_from_checkpoint=str(out / "checkpoint-2")))
    assert name in line and "truncated" in line and "checkpoint-2" in line


def test_resuming_with_ema_from_a_run_without_it(tiny_models, data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    (out / "checkpoint-2" / "ip-adapter-ema.bin").unlink()
    line = _exit_2_line(capsys, tiny_train_args(tiny_models, data, out, 3, use_ema=True,
                                                resume_from_checkpoint=str(out / "checkpoint-2")))
    assert "ip-adapter-ema.bin: missing" in line and "--use_ema" in line


def test_resuming_with_another_num_tokens(tiny_models, data, finished, capsys):
    line = _exit_2_line(capsys, tiny_train_args(tiny_models, data, finished, 3, use_ema=True, num_tokens=4,
                                                resume_from_checkpoint=str(finished / "checkpoint-2")))
    assert "model.safetensors" in line and "--num_tokens" in line


def test_resuming_from_a_folder_that_is_not_a_checkpoint(tiny_models, data, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    line = _exit_2_line(capsys, tiny_train_args(tiny_models, data, tmp_path / "out", 1,
                                                resume_from_checkpoint=str(tmp_path / "notes")))
    assert "not a checkpoint folder" in line


def test_latest_skips_a_damaged_newest_checkpoint(tiny_models, data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    file = out / "checkpoint-2" / "optimizer.bin"
    file.write_bytes(file.read_bytes()[:100])
    assert main(tiny_train_args(tiny_models, data, out, 2, checkpointing_steps=1, use_ema=True,
                                resume_from_checkpoint="latest")) == 0
    printed = capsys.readouterr().out
    assert "skipping damaged" in printed and "checkpoint-2" in printed and "optimizer.bin" in printed
    assert ckpt.validate_checkpoint(out / "checkpoint-2", expect_ema=True) == []  # rewritten from checkpoint-1
    assert_same_checkpoint(finished / "checkpoint-2", out / "checkpoint-2")


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(tiny_models, data, finished, tmp_path,
                                                                            capsys):
    out = _copy(finished, tmp_path / "run")
    line = _exit_2_line(capsys, tiny_train_args(tiny_models, data, out, 1))
    assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    assert main(tiny_train_args(tiny_models, data, out, 1, overwrite_output_dir=True)) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["ema_num_updates"] is None


@pytest.mark.parametrize("flags, expect", [
    (dict(learning_rate=5e-4, lr_scheduler="cosine"), "--learning_rate 0.0005 differs from the checkpoint's 0.001"),
    (dict(gradient_accumulation_steps=2), "--gradient_accumulation_steps 2 differs"),
    (dict(max_train_steps=1), "--max_train_steps 1 is below the checkpoint's step 2"),
])
def test_resume_flags_that_cannot_apply_are_refused(tiny_models, data, finished, tmp_path, capsys, flags, expect):
    out = _copy(finished, tmp_path / "run")
    args = dict(checkpointing_steps=1, use_ema=True, resume_from_checkpoint="latest")
    steps = flags.pop("max_train_steps", 4)
    line = _exit_2_line(capsys, tiny_train_args(tiny_models, data, out, steps, **args, **flags))
    assert expect in line, line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]  # nothing was written


def test_resume_notes_flags_that_change(tiny_models, data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    assert main(tiny_train_args(tiny_models, data, out, 3, checkpointing_steps=1, use_ema=True,
                                masked_loss_weight=2.0, resume_from_checkpoint="latest")) == 0
    printed = capsys.readouterr().out
    assert "--masked_loss_weight changed from 1.0 to 2.0" in printed
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["config"]["masked_loss_weight"] == 2.0 and state["global_step"] == 3
