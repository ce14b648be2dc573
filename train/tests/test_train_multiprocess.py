"""Two CPU processes (``accelerate launch``, gloo) train to the same weights as one process (docs/ARCHITECTURE.md §6, §12)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train.data.synthesize import synthesize
from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
from train.train import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    data = synthesize(tmp_path / "data", num=8, resolution=64, seed=1)
    # Adam's first steps divide by |g|: for near-zero gradient entries the float noise of a
    # different reduction order (all-reduce vs one batch mean) becomes a +-lr flip. A larger
    # epsilon keeps updates proportional to the gradients, so equal gradients mean equal weights.
    eps = {"adam_epsilon": 1e-2}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(tiny_train_args(tiny_models, data, one, 2, train_batch_size=2, **eps)) == 0

    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "train.train", *tiny_train_args(tiny_models, data, two, 2, train_batch_size=1, **eps)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    state = (two / "checkpoint-2" / "trainer_state.json").read_text()
    assert '"num_processes": 2' in state and '"global_batch": 2' in state
    assert_weights_equal(adapter_weights(one / "checkpoint-2" / "ip-adapter.bin"),
                         adapter_weights(two / "checkpoint-2" / "ip-adapter.bin"), atol=1e-6)
