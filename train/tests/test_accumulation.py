"""Gradient accumulation with EMA and an LR schedule (docs/ARCHITECTURE.md §6, §9): batch 4 x accumulation 1 and
batch 1 x accumulation 4 write the same checkpoints, and EMA / scheduler advance once per optimizer step."""

from __future__ import annotations

import json

import pytest
import torch

from train.data.synthesize import synthesize
from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
from train.train import main


@pytest.mark.slow
def test_batch_four_equals_four_accumulated_micro_batches_with_ema_and_schedule(tiny_models, tmp_path):
    data = synthesize(tmp_path / "data", num=8, resolution=64, langs=("en",), seed=6)
    # A larger Adam epsilon keeps updates proportional to the gradients (see the multi-process test);
    # 3 steps over 8 samples cross an epoch boundary; warm-up then cosine decay.
    flags = dict(use_ema=True, ema_decay=0.5, lr_scheduler="cosine", lr_warmup_steps=2, adam_epsilon=1e-2,
                 checkpointing_steps=3)
    b4, a4 = tmp_path / "b4", tmp_path / "a4"
    assert main(tiny_train_args(tiny_models, data, b4, 3, train_batch_size=4, **flags)) == 0
    assert main(tiny_train_args(tiny_models, data, a4, 3, gradient_accumulation_steps=4, **flags)) == 0
    x, y = b4 / "checkpoint-3", a4 / "checkpoint-3"
    assert_weights_equal(adapter_weights(x / "ip-adapter.bin"), adapter_weights(y / "ip-adapter.bin"), atol=1e-6)
    assert_weights_equal(adapter_weights(x / "ip-adapter-ema.bin"), adapter_weights(y / "ip-adapter-ema.bin"),
                         atol=1e-6)
    for path in (x, y):
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["global_step"] == 3 and state["ema_num_updates"] == 3, state
        assert (state["epoch"], state["position"]) == (1, 1 if path == x else 4), state  # micro-batches of 4 vs 1
        scheduler = torch.load(path / "custom_checkpoint_0.pkl", weights_only=False)
        assert scheduler["phase"] == "supervised", scheduler
        scheduler = scheduler["scheduler"]
        assert scheduler["last_epoch"] == 3 and scheduler["_step_count"] == 4, scheduler
        # warm-up 2 then cosine over the remaining 1 of 3 steps: after step 3 the LR is 0
        assert scheduler["_last_lr"] == [pytest.approx(0.0, abs=1e-12)]
        optimizer = torch.load(path / "optimizer.bin", weights_only=False)
        assert {s["step"].item() for s in optimizer["state"].values()} == {3.0}
