"""Which checkpoint a restart continues, through the real trainer and entry point: the branch a resumed run
started (not the one it left), past a checkpoint that lacks a state file, named truthfully when a run stops;
and what ``--overwrite_output_dir`` deletes from ``logs/`` (docs/ARCHITECTURE.md §5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train import checkpointing as ckpt
from train.config import parse_args
from train.data.synthesize import synthesize
from train.tests.train_helpers import tiny_train_args
from train.train import main
from train.trainer import RunStopped, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("data"), num=8, resolution=64, langs=("en",), seed=3)


def test_a_crash_on_a_branch_resumed_from_an_earlier_step_continues_that_branch(tiny_models, data, tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 6, checkpointing_steps=2)) == 0  # checkpoints 2, 4, 6
    branch = dict(checkpointing_steps=2, masked_loss_weight=2.0)  # resumed from checkpoint-2 with a changed flag
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, 6, **branch,
                                                 resume_from_checkpoint=str(out / "checkpoint-2"))))
    trainer.setup()
    trainer.run(stop_at=5)  # rewrites checkpoint-4, then the process dies at step 5
    capsys.readouterr()
    assert main(tiny_train_args(tiny_models, data, out, 6, **branch, resume_from_checkpoint="latest")) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint-4'} at global_step 4" in printed and "nothing to do" not in printed
    assert "leaving checkpoint-6 alone: another branch" in printed
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["config"]["masked_loss_weight"] == 2.0  # checkpoint-6 now belongs to the continued branch


def test_latest_resumes_past_a_checkpoint_missing_its_scheduler_state(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 2, checkpointing_steps=1)) == 0
    (out / "checkpoint-2" / "custom_checkpoint_0.pkl").unlink()
    capsys.readouterr()
    assert main(tiny_train_args(tiny_models, data, out, 3, checkpointing_steps=1,
                                resume_from_checkpoint="latest")) == 0
    printed = capsys.readouterr().out
    assert "skipping damaged" in printed and "custom_checkpoint_0.pkl: missing" in printed
    assert f"resumed from {out / 'checkpoint-1'} at global_step 1" in printed
    assert ckpt.validate_checkpoint(out / "checkpoint-3") == []


def test_a_diverged_run_names_the_checkpoint_latest_would_continue(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 2, checkpointing_steps=1)) == 0
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # complete-looking, but not resumable
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, 4, checkpointing_steps=100,
                                                 max_consecutive_skips=2, resume_from_checkpoint="latest")))
    trainer.setup()
    param = next(p for p in trainer.model.adapter.parameters() if p.requires_grad)
    param.register_hook(lambda grad: torch.full_like(grad, math.nan))  # every step is skipped
    with pytest.raises(RunStopped) as stop:
        trainer.run()
    assert stop.value.exit_code == 4
    assert f"the newest checkpoint {out / 'checkpoint-1'} is intact" in str(stop.value), str(stop.value)


def test_a_reward_failure_before_any_checkpoint_does_not_claim_one(tiny_models, data, tmp_path, capsys):
    from train.reward_server import create_app
    from train.rewards.contrast import ContrastScorer
    from train.tests.reward_helpers import FaultInjector, ServerThread
    from train.tests.rl_helpers import rl_args

    out = tmp_path / "run"
    with ServerThread(FaultInjector(create_app({"contrast": ContrastScorer()}), ["500"] * 100)) as srv:
        assert main(rl_args(tiny_models, data, out, 2, reward_server_url=srv.url, reward_retries=0)) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rewards could not be computed" in errors[0], errors
    assert f"No checkpoint in {out} yet" in errors[0] and "is intact" not in errors[0]


def test_overwrite_deletes_the_previous_runs_tensorboard_folder_and_keeps_other_logs(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 1, report_to="tensorboard")) == 0
    old_events = sorted((out / ckpt.TENSORBOARD_RUN).rglob("events.out.tfevents.*"))
    assert old_events and all(p.is_relative_to(out / ckpt.TENSORBOARD_RUN) for p in (out / "logs").rglob("events*"))
    (out / "logs" / "baseline").mkdir()
    (out / "logs" / "baseline" / "events.out.tfevents.1.host.1.0").write_bytes(b"another run's curves")
    (out / "logs" / "notes.md").write_text("lr sweep notes\n")
    assert main(tiny_train_args(tiny_models, data, out, 1, report_to="tensorboard", overwrite_output_dir=True)) == 0
    assert (out / "logs" / "notes.md").read_text() == "lr sweep notes\n"
    assert (out / "logs" / "baseline" / "events.out.tfevents.1.host.1.0").read_bytes() == b"another run's curves"
    new_events = sorted((out / ckpt.TENSORBOARD_RUN).rglob("events.out.tfevents.*"))
    assert new_events and not set(old_events) & set(new_events)


@pytest.mark.slow
def test_two_processes_record_every_rank_file_and_resume_their_own_branch(tiny_models, data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from train.tests.reward_helpers import free_port

    out = tmp_path / "run"

    def launch(steps, **flags):
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "train.train",
               *tiny_train_args(tiny_models, data, out, steps, train_batch_size=1, checkpointing_steps=1, **flags)]
        env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]

    launch(2)
    manifest = ckpt.read_manifest(out / "checkpoint-2")
    assert {"random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_0.pkl"} <= set(manifest["files"])
    assert ckpt.validate_checkpoint(out / "checkpoint-2") == []
    launch(3, resume_from_checkpoint=str(out / "checkpoint-1"))  # a new branch from step 1 rewrites 2, writes 3
    lineage = ckpt.read_lineage(out)
    assert [until for _, until in lineage] == [None, 1] and lineage[1][0] == manifest["lineage"][0][0]
    assert ckpt.read_manifest(out / "checkpoint-3")["lineage"][0][0] == lineage[0][0]
    assert ckpt.latest_resumable(out) == out / "checkpoint-3"
