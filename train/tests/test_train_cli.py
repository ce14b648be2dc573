"""``python -m train.train``: supervised runs, checkpoints, exact resume, invariants (docs/ARCHITECTURE.md §2, §5, §6)."""

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
    return synthesize(tmp_path_factory.mktemp("data"), num=8, resolution=64, langs=("en",), seed=0)


def test_two_step_cli_run_writes_everything(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 2, report_to="tensorboard", checkpointing_steps=1,
                                use_ema=True)) == 0
    for step in (1, 2):
        d = out / f"checkpoint-{step}"
        for name in ("ip-adapter.bin", "ip-adapter-ema.bin", "trainer_state.json", "optimizer.bin"):
            assert (d / name).is_file(), d / name
        assert json.loads((d / "trainer_state.json").read_text())["global_step"] == step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "ema/decay", "perf/images_per_s", "timing/step_s",
            "memory/peak_gb"} <= tags, tags
    log = (out / "train_log.txt").read_text()
    assert "trainable parameters:" in log and "step=2 train/loss=" in log and "saved" in log
    assert not list(out.glob(".checkpoint-*"))


def test_every_trainable_parameter_changes_and_no_frozen_one(tiny_models, data, tmp_path):
    cfg = parse_args(tiny_train_args(tiny_models, data, tmp_path / "run", 2, gradient_checkpointing=True))
    trainer = Trainer(cfg)
    trainer.setup()
    adapter_before = {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}
    frozen = {"transformer": trainer.model.transformer, "vae": trainer.model.vae, "siglip": trainer.model.siglip}
    frozen_before = {f"{m}.{k}": v.clone() for m, mod in frozen.items() for k, v in mod.state_dict().items()}
    trainer.run()
    for k, v in trainer.model.adapter.state_dict().items():
        assert not torch.equal(v, adapter_before[k]), f"{k} did not change"
    frozen_after = {f"{m}.{k}": v for m, mod in frozen.items() for k, v in mod.state_dict().items()}
    assert_weights_equal(frozen_before, frozen_after)
    # The text encoders were used once to fill the prompt cache, then freed.
    assert trainer.model.pipe.text_encoder is None and trainer.model.pipe.text_encoder_2 is None
    assert trainer.prompts.encoder_calls == 1


def test_resume_equals_uninterrupted(tiny_models, data, tmp_path):
    flags = dict(use_ema=True, checkpointing_steps=2, lr_scheduler="cosine", lr_warmup_steps=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(tiny_train_args(tiny_models, data, straight, 4, **flags)) == 0
    interrupted = Trainer(parse_args(tiny_train_args(tiny_models, data, resumed, 4, **flags)))
    interrupted.setup()
    interrupted.run(stop_at=2)  # the process dies right after checkpoint-2
    assert main(tiny_train_args(tiny_models, data, resumed, 4, resume_from_checkpoint="latest", **flags)) == 0
    a, b = straight / "checkpoint-4", resumed / "checkpoint-4"
    assert_weights_equal(adapter_weights(a / "ip-adapter.bin"), adapter_weights(b / "ip-adapter.bin"))
    assert_weights_equal(adapter_weights(a / "ip-adapter-ema.bin"), adapter_weights(b / "ip-adapter-ema.bin"))
    opt_a = torch.load(a / "optimizer.bin", weights_only=False)
    opt_b = torch.load(b / "optimizer.bin", weights_only=False)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for idx, sa in opt_a["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[key], opt_b["state"][idx][key]), (idx, key)
    sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    config_a, config_b = sa.pop("config"), sb.pop("config")
    assert sa == sb
    assert {k for k in config_a if config_a[k] != config_b[k]} == {"output_dir", "resume_from_checkpoint"}


def test_batch_four_equals_four_accumulated_micro_batches(tiny_models, data, tmp_path):
    # A larger Adam epsilon keeps updates proportional to the gradients (see the multi-process test).
    eps = {"adam_epsilon": 1e-2}
    assert main(tiny_train_args(tiny_models, data, tmp_path / "b4", 2, train_batch_size=4, **eps)) == 0
    assert main(tiny_train_args(tiny_models, data, tmp_path / "a4", 2, gradient_accumulation_steps=4, **eps)) == 0
    assert_weights_equal(adapter_weights(tmp_path / "b4" / "checkpoint-2" / "ip-adapter.bin"),
                         adapter_weights(tmp_path / "a4" / "checkpoint-2" / "ip-adapter.bin"), atol=1e-6)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tiny_models, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 1)) == 0
    good = adapter_weights(out / "checkpoint-1" / "ip-adapter.bin")

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):  # the disk "fills up" half-way through checkpoint-2
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    assert main(tiny_train_args(tiny_models, data, out, 2, resume_from_checkpoint="latest")) == 5  # one error line
    monkeypatch.setattr(torch, "save", real_save)

    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-1"
    assert_weights_equal(adapter_weights(out / "checkpoint-1" / "ip-adapter.bin"), good)
    # The next run cleans the partial folder and resumes from checkpoint-1.
    assert main(tiny_train_args(tiny_models, data, out, 2, resume_from_checkpoint="latest")) == 0
    assert not list(out.glob(".checkpoint-*")) and (out / "checkpoint-2").is_dir()


def test_checkpoints_total_limit_keeps_the_newest(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_models, data, out, 3, checkpointing_steps=1, checkpoints_total_limit=2)) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3]


def test_initial_adapter_from_official_layout(tiny_models, data, tmp_path):
    from train.models.checkpoint_io import save_adapter_file

    out = tmp_path / "first"
    assert main(tiny_train_args(tiny_models, data, out, 1)) == 0
    trained = adapter_weights(out / "checkpoint-1" / "ip-adapter.bin")
    official = tmp_path / "calligrapher.bin"
    save_adapter_file(ckpt.split_adapter_state(trained), official, layout="official")
    cfg = parse_args(tiny_train_args(tiny_models, data, tmp_path / "second", 1, initial_ip_adapter_path=official))
    trainer = Trainer(cfg)
    trainer.setup()
    assert_weights_equal({k: v for k, v in trainer.model.adapter.state_dict().items()}, trained)


def test_dataloader_workers_do_not_change_the_result(tiny_models, data, tmp_path):
    assert main(tiny_train_args(tiny_models, data, tmp_path / "w0", 2)) == 0
    assert main(tiny_train_args(tiny_models, data, tmp_path / "w2", 2, dataloader_num_workers=2)) == 0
    assert_weights_equal(adapter_weights(tmp_path / "w0" / "checkpoint-2" / "ip-adapter.bin"),
                         adapter_weights(tmp_path / "w2" / "checkpoint-2" / "ip-adapter.bin"))


def test_bf16_mixed_precision_trains_an_fp32_adapter_on_a_bf16_base(tiny_models, data, tmp_path):
    cfg = parse_args(tiny_train_args(tiny_models, data, tmp_path / "bf16", 2, mixed_precision="bf16",
                                     gradient_checkpointing=True))
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}
    trainer.run()
    assert trainer.model.transformer.dtype == torch.bfloat16
    for k, v in trainer.model.adapter.state_dict().items():
        assert v.dtype == torch.float32 and not torch.equal(v, before[k]), k


def test_supervised_training_lowers_the_flow_matching_loss_on_held_out_noise(tiny_models, tmp_path):
    """A learning test: the adapter alone (base frozen) fits the data better after 60 steps."""
    from train.data.preprocess import collate_samples
    from train.supervised import supervised_loss, training_sigmas

    data = synthesize(tmp_path / "data", num=4, resolution=64, seed=3)
    cfg = parse_args(tiny_train_args(tiny_models, data, tmp_path / "run", 60, train_batch_size=4,
                                     learning_rate=3e-3, checkpointing_steps=1000))
    trainer = Trainer(cfg)
    trainer.setup()
    batch = collate_samples([trainer.dataset[i] for i in range(4)])

    def held_out_loss() -> float:  # noise/sigma draws of epochs the run never reaches
        with torch.no_grad():
            sigmas = training_sigmas(trainer.model)
            return sum(supervised_loss(trainer, batch, [(10_000 + e, p) for p in range(4)], sigmas).item()
                       for e in range(5)) / 5

    before = held_out_loss()
    trainer.run()
    after = held_out_loss()
    assert after < 0.9 * before, (before, after)
