"""Resuming an RL run never changes what it optimises without saying so: a KL switched on at resume has no
RL-start reference to anchor to and is refused; a run whose --max_train_steps ends inside an RL epoch, and a
run extended from such an end, say that they differ from a straight run."""

from __future__ import annotations

import pytest

from train.data.synthesize import synthesize
from train.tests.rl_helpers import rl_args
from train.train import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("rl-resume-data"), num=8, resolution=64, seed=6)


def test_a_kl_switched_on_at_resume_is_refused_in_one_line(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(rl_args(tiny_models, data, out, 1, rl_kl_beta=0)) == 0
    capsys.readouterr()
    assert main(rl_args(tiny_models, data, out, 2, rl_kl_beta=0.1, resume_from_checkpoint="latest")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--rl_kl_beta 0.1" in errors[0] and "ran with --rl_kl_beta 0" in errors[0], errors
    assert "Traceback" not in err and not (out / "checkpoint-2").exists()
    assert main(rl_args(tiny_models, data, out, 2, rl_kl_beta=0, resume_from_checkpoint="latest")) == 0


def test_an_end_inside_an_rl_epoch_and_its_extension_are_noted(tiny_models, data, tmp_path, capsys):
    """Two optimizer steps per RL epoch (2 inner epochs): ending at step 3 cuts epoch 1 short."""
    flags = dict(rl_num_inner_epochs=2)
    out = tmp_path / "run"
    assert main(rl_args(tiny_models, data, out, 3, **flags)) == 0
    first = capsys.readouterr().out
    assert "note: --max_train_steps 3 ends inside an RL epoch (2 optimizer steps each" in first
    assert main(rl_args(tiny_models, data, out, 4, resume_from_checkpoint="latest", **flags)) == 0
    second = capsys.readouterr().out
    assert "note: this run continues from global_step 3, inside RL epoch 1" in second
    assert "ends inside an RL epoch" not in second  # 4 = 0 + 2 x 2
    assert main(rl_args(tiny_models, data, tmp_path / "whole", 4, **flags)) == 0
    assert "note:" not in capsys.readouterr().out
