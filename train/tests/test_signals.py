"""A trainer stopped by SIGTERM (a scheduler's pre-emption) checkpoints at its next resumable point and exits
143, and its DataLoader workers never outlive it, whether it is terminated or killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.checkpointing import latest_checkpoint
from train.data.synthesize import synthesize
from train.tests.rl_helpers import rl_args
from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
from train.train import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("signal-data"), num=8, resolution=64, seed=5)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # zombies are dead
    except FileNotFoundError:
        return False


def _start(argv) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # every run compared: the same threads
    return subprocess.Popen([sys.executable, "-m", "train.train", *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_dataloader_workers_die_with_the_trainer(tiny_models, data, tmp_path, how):
    out = tmp_path / "run"
    proc = _start(tiny_train_args(tiny_models, data, out, 10_000, dataloader_num_workers=2, checkpointing_steps=1))
    try:
        _wait_for(lambda: latest_checkpoint(out) is not None and len(_children(proc.pid)) >= 2)
        workers = _children(proc.pid)
        proc.send_signal(how)
        proc.communicate(timeout=120)
        _wait_for(lambda: not any(_alive(w) for w in workers), timeout=10)
    finally:
        proc.kill()
    if how == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM


def test_sigterm_checkpoints_at_the_next_resumable_point_and_the_resume_equals_a_straight_run(tiny_models, data,
                                                                                                 tmp_path):
    """Supervised steps then GRPO, SIGTERM once RL has begun: the run writes the checkpoint of the epoch it is
    in (between the regular ones), exits 143, and ``latest`` finishes it exactly as an uninterrupted run."""
    flags = dict(rl_warmup_steps=2, checkpointing_steps=100)
    out, straight = tmp_path / "run", tmp_path / "straight"
    proc = _start(rl_args(tiny_models, data, out, 40, **flags))
    try:
        _wait_for(lambda: (out / "train_log.txt").is_file() and "RL (grpo) starts" in (out / "train_log.txt").read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped: SIGTERM")]
    assert len(stopped) == 1 and "--resume_from_checkpoint latest" in stopped[0] and "Traceback" not in err
    step = int(latest_checkpoint(out).name.split("-")[1])
    assert 2 < step < 40  # a checkpoint no schedule asked for: the one SIGTERM wrote
    for argv in (rl_args(tiny_models, data, out, step + 2, resume_from_checkpoint="latest", **flags),
                 rl_args(tiny_models, data, straight, step + 2, **flags)):
        proc = _start(argv)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert_weights_equal(adapter_weights(out / f"checkpoint-{step + 2}" / "ip-adapter.bin"),
                         adapter_weights(straight / f"checkpoint-{step + 2}" / "ip-adapter.bin"))


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line_and_keeps_the_last(tiny_models, data,
                                                                                         tmp_path):
    """The OS refuses files above 300 KiB (RLIMIT_FSIZE; the optimizer state is ~750 KiB), as a full disk
    refuses the next write: checkpoint-1 is written with room to spare, then the limit bites."""
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 1)) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "train.train",
                          *tiny_train_args(tiny_models, data, out, 2, resume_from_checkpoint="latest")],
                         cwd=REPO, env=env, text=True, capture_output=True, timeout=300,
                         preexec_fn=_limit_file_size(300 << 10))
    assert res.returncode == 5, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write the checkpoint of global_step 2" in errors[0], res.stderr[-2000:]
    assert "File too large" in errors[0] and f"{out / 'checkpoint-1'} is intact" in errors[0]
    assert "Traceback" not in res.stderr
    assert latest_checkpoint(out) == out / "checkpoint-1" and not (out / "checkpoint-2").exists()
    assert main(tiny_train_args(tiny_models, data, out, 2, resume_from_checkpoint="latest")) == 0
