"""The shared run state on tiny real components (docs/ARCHITECTURE.md §5, §6): the LR phase schedule by hand, the optimizer's
settings, what is logged and checkpointed at which step, the state a checkpoint holds and a resume restores, the
checkpoint-and-stop of a SIGTERM, gradient clipping, the seeded adapter, the RL start, and the start-up checks
of the data (canvas sizes, prompt groups)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch

from train import checkpointing as ckpt
from train.config import ConfigError, parse_args
from train.data.dataset import CalligraphyDataset, load_records
from train.data.preprocess import collate_samples
from train.data.prompt_cache import encoder_identity
from train.data.synthesize import synthesize
from train.models.checkpoint_io import adapter_state
from train.sample_cache import latent_bytes_per_sample
from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
from train.trainer import TERMINATED, PhaseSchedule, RunStopped, Trainer


# ------------------------------------------------------------------------------------------ LR phase schedule
def _schedule(*flags):
    """A PhaseSchedule over one parameter: linear, 2 warm-up steps, 10 steps in all, base LR 1e-3."""
    cfg = parse_args(["--output_dir", "unused", "--max_train_steps", "10", "--learning_rate", "1e-3",
                      "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--use_rl", "--rl_learning_rate", "4e-4",
                      "--rl_adam_weight_decay", "1e-4", *flags])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate, weight_decay=0.01)
    return PhaseSchedule(cfg, optimizer), optimizer


def _lrs(schedule, optimizer, steps: int) -> list[float]:
    """The optimizer's LR after each of ``steps`` scheduler steps."""
    out = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_supervised_schedule_then_the_rl_schedule_restarted_over_the_rl_steps():
    schedule, optimizer = _schedule()
    # warm-up k/2, then (10 - k) / 8
    assert _lrs(schedule, optimizer, 6) == pytest.approx([5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4], rel=1e-12)
    schedule.start_rl(6)
    group = optimizer.param_groups[0]
    assert (schedule.phase, schedule.rl_start_step) == ("rl", 6)
    assert group["initial_lr"] == 4e-4 and group["weight_decay"] == 1e-4 and group["lr"] == 0.0
    # the same warm-up from 4e-4, then linear over the 4 RL steps: (4 - j) / 2
    assert _lrs(schedule, optimizer, 4) == pytest.approx([2e-4, 4e-4, 2e-4, 0.0], rel=1e-12, abs=1e-18)


def test_a_restored_rl_schedule_continues_at_its_saved_lr():
    schedule, optimizer = _schedule()
    _lrs(schedule, optimizer, 6)
    schedule.start_rl(6)
    _lrs(schedule, optimizer, 1)
    state = copy.deepcopy(schedule.state_dict())
    restored, restored_optimizer = _schedule()  # a new process: supervised until the checkpoint is read
    restored_optimizer.load_state_dict(optimizer.state_dict())  # accelerate restores the optimizer first
    restored.load_state_dict(state)
    assert (restored.phase, restored.rl_start_step) == ("rl", 6)
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(2e-4, rel=1e-12)
    assert _lrs(restored, restored_optimizer, 3) == pytest.approx(_lrs(schedule, optimizer, 3), rel=1e-12, abs=1e-18)


# ------------------------------------------------------------------------------------------ a straight run
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("state-data"), num=3, resolution=64, langs=("en",), seed=3)


# 3 samples in micro-batches of 1: 5 steps cross an epoch; warm-up 2, then linear to 0 at step 5
FLAGS = {"seed": 3, "logging_steps": 2, "checkpointing_steps": 3, "lr_scheduler": "linear", "lr_warmup_steps": 2,
         "use_ema": True, "ema_update_interval": 2, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_weight_decay": 0.03,
         "adam_epsilon": 1e-6}


@pytest.fixture(scope="module")
def straight(tiny_models, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, 5, **FLAGS)))
    trainer.setup()
    group = {k: v for k, v in trainer.optimizer.param_groups[0].items() if k != "params"}
    initial = adapter_state(trainer.adapter)
    trainer.run()
    return SimpleNamespace(out=out, trainer=trainer, group=group, initial=initial)


def test_the_optimizer_is_adamw_with_the_configured_settings(straight):
    g = straight.group
    assert (g["initial_lr"], g["betas"], g["weight_decay"], g["eps"]) == (1e-3, (0.8, 0.95), 0.03, 1e-6)


def test_logging_ema_and_checkpoints_follow_their_step_counts(straight):
    logged = {step: m for step, m in straight.trainer.history if "train/loss" in m}
    assert list(logged) == [2, 4, 5]  # every 2 steps and the last
    assert [logged[s]["train/lr"] for s in logged] == pytest.approx([1e-3, 1e-3 / 3, 0.0], rel=1e-12, abs=1e-18)
    # EMA every 2 optimizer steps: updates 0 and 1 decay by min((1 + s) / (10 + s), 0.9999)
    assert logged[2]["ema/decay"] == pytest.approx(0.1) and logged[4]["ema/decay"] == pytest.approx(2 / 11)
    assert "ema/decay" not in logged[5]
    assert [s for s, _ in ckpt.list_checkpoints(straight.out)] == [3, 5]  # every 3 steps and the last
    log = (straight.out / "train_log.txt").read_text()
    assert "data: 3 samples; 3 global micro-batches of 1 per epoch (0 dropped)" in log


def test_a_checkpoint_records_where_the_run_stands(straight):
    for step, epoch, position in ((3, 0, 3), (5, 1, 2)):
        state = json.loads((straight.out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert {k: state[k] for k in ("global_step", "epoch", "position", "global_batch", "num_processes", "phase",
                                      "rl_epoch", "ema_num_updates")} == {
            "global_step": step, "epoch": epoch, "position": position, "global_batch": 1, "num_processes": 1,
            "phase": "supervised", "rl_epoch": 0, "ema_num_updates": step // 2}


def test_a_resume_restores_counters_lr_and_data_position_and_ends_where_the_straight_run_does(
        tiny_models, data, straight, tmp_path):
    out = shutil.copytree(straight.out, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-5")
    with pytest.raises(ConfigError, match="written with a global batch of 1, this run has 3"):
        Trainer(parse_args(tiny_train_args(tiny_models, data, out, 5, resume_from_checkpoint="latest",
                                           **{**FLAGS, "train_batch_size": 3}))).setup()
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, 5, resume_from_checkpoint="latest", **FLAGS)))
    trainer.setup()
    assert (trainer.global_step, trainer.epoch, trainer.position) == (3, 0, 3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 3, rel=1e-12)
    trainer.run()
    for name in ("ip-adapter.bin", "ip-adapter-ema.bin"):
        assert_weights_equal(adapter_weights(out / "checkpoint-5" / name),
                             adapter_weights(straight.out / "checkpoint-5" / name))


def test_sigterm_writes_a_checkpoint_after_the_current_step_and_stops(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, 5, **FLAGS)))
    trainer.setup()
    real_loader = trainer.loader

    def terminated_during_step_two():
        for i, item in enumerate(real_loader()):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item

    trainer.loader = terminated_during_step_two
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped, match="SIGTERM: stopped at global_step 2 after writing") as stop:
        trainer.run()
    assert stop.value.exit_code == TERMINATED
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # not due (every 3 steps), written for the stop
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with the run


# ------------------------------------------------------------------------------------------ clipping and the seed
def _latent_cache_decisions(trainer) -> list[bool]:
    """Whether the latent cache stays on with 1 process and twice the latents' bytes available, one byte less, and
    with LOCAL_WORLD_SIZE=2 and four times, then twice (2 samples of a 64 x (16 + 64) canvas in fp32)."""
    from train import trainer as trainer_module

    need = 2 * latent_bytes_per_sample(64, 80, trainer.model.vae.config, 4)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        for local, available in ((None, 2 * need), (None, 2 * need - 1), ("2", 4 * need), ("2", 2 * need)):
            if local is None:
                mp.delenv("LOCAL_WORLD_SIZE", raising=False)
            else:
                mp.setenv("LOCAL_WORLD_SIZE", local)
            mp.setattr(trainer_module, "available_host_bytes", lambda available=available: available)
            out.append(trainer._latent_cache_fits())
    return out


@pytest.fixture(scope="module")
def one_step(tiny_models, tmp_path_factory):
    """One step of batch 2 on 2 samples, unclipped (--max_grad_norm 0) and clipped to a quarter of its norm.

    Adam's epsilon far above every gradient entry makes the first update ``lr * g / (|g| + eps)`` ~ ``g``, so the
    clipped update is a quarter of the unclipped one. Before each set-up the global RNG is set differently. The
    unclipped run starts in a folder left with another run's held-out curve and best record (no checkpoints); the
    clipped one keeps no latents and its prompt embeddings in a folder of its own."""
    root = tmp_path_factory.mktemp("one-step")
    data = synthesize(root / "data", num=2, resolution=64, langs=("en",), seed=1)
    flags = {"train_batch_size": 2, "learning_rate": 1e3, "adam_epsilon": 1e3, "adam_weight_decay": 0.0}
    stale = [root / "unclipped" / "eval_rewards.jsonl", root / "unclipped" / ckpt.BEST_FILE]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}\n")
    runs = {}
    for i, (name, extra) in enumerate((("unclipped", {"max_grad_norm": 0.0}),
                                       ("clipped", {"latent_cache": "off", "prompt_cache_dir": root / "prompts"}))):
        if name == "clipped":
            extra["max_grad_norm"] = runs["unclipped"].history[-1][1]["train/grad_norm"] / 4
        torch.manual_seed(100 + i)
        trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, root / name, 1, **flags, **extra)))
        trainer.setup()
        trainer.initial = adapter_state(trainer.adapter)
        trainer.stale_left = [p.name for p in stale if p.exists()]
        trainer.fits = _latent_cache_decisions(trainer)
        trainer.run()
        runs[name] = trainer
    return root, runs


def _flat(state):
    return torch.cat([t.flatten() for part in state.values() for t in part.values()])


def test_max_grad_norm_zero_does_not_clip_and_a_norm_clips_to_it(one_step):
    _, runs = one_step
    start = _flat(runs["unclipped"].initial)
    free = _flat(adapter_state(runs["unclipped"].adapter)) - start
    clipped = _flat(adapter_state(runs["clipped"].adapter)) - start
    assert free.norm() > 0
    assert ((clipped - free / 4).norm() / (free / 4).norm()).item() < 1e-2


def test_the_fresh_adapter_follows_the_seed_whatever_the_global_rng(one_step, straight):
    _, runs = one_step
    seed0 = _flat(runs["unclipped"].initial)
    assert torch.equal(seed0, _flat(runs["clipped"].initial))
    assert not torch.equal(seed0, _flat(straight.initial))  # --seed 3


def test_a_fresh_run_starts_its_own_held_out_curve_and_best_record(one_step):
    _, runs = one_step
    assert runs["unclipped"].stale_left == []


def test_prompt_embeddings_are_cached_per_encoder_files_length_and_dtype_where_asked(one_step, tiny_models):
    root, runs = one_step
    ident = encoder_identity(tiny_models["flux"], 32, extra=str(torch.float32))
    assert runs["clipped"].prompts.encoder_id == ident != encoder_identity(tiny_models["flux"], 32)
    assert [p.name for p in (root / "prompts").iterdir()] == [ident]
    assert not (root / "clipped" / "prompt_cache").exists()
    assert (root / "unclipped" / "prompt_cache" / ident).is_dir()


def test_latents_are_cached_if_every_local_process_fits_in_half_the_free_host_memory(one_step):
    _, runs = one_step
    assert runs["unclipped"].encoders.latents_on and not runs["clipped"].encoders.latents_on  # --latent_cache off
    assert runs["unclipped"].fits == [True, False, True, False]


def test_rl_start_clears_the_optimizer_state_restarts_the_schedule_and_the_norm_history(one_step):
    _, runs = one_step
    trainer = runs["unclipped"]
    assert trainer.optimizer.state and len(trainer.guard.norms) == 1
    trainer.start_rl_optimizer()
    assert not trainer.optimizer.state and not trainer.guard.norms
    assert (trainer.lr_scheduler.phase, trainer.lr_scheduler.rl_start_step) == ("rl", 1)


# ------------------------------------------------------------------------------------------ start-up checks
def _bucketed(tmp_path, dataset, *flags) -> Trainer:
    """Only the canvas-size check of set-up, on a real dataset; no model is loaded."""
    trainer = Trainer(parse_args(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "4", "--resolution", "64",
                                  *flags]))
    trainer.dataset = dataset
    trainer.global_batch = trainer.cfg.train_batch_size
    trainer._bucket_by_canvas_size()
    return trainer


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The natural, reference-shaped strip: 4 samples of 64x80 and 4 of 64x96."""
    data = synthesize(tmp_path_factory.mktemp("mixed"), num=8, resolution=64, langs=("en", "zh"), seed=0)
    ds = CalligraphyDataset(load_records(data, resolution=64), resolution=64)
    by_size = {}
    for i, r in enumerate(ds.records):
        by_size.setdefault(ds.canvas_size(i), []).append(r)
    return lambda n80, n96: CalligraphyDataset(by_size[(64, 80)][:n80] + by_size[(64, 96)][:n96], resolution=64)


def test_canvas_sizes_are_bucketed_and_counted_per_size(tmp_path, mixed, data):
    trainer = _bucketed(tmp_path, mixed(3, 3), "--train_batch_size", "2")
    assert trainer.canvas_sizes == [(64, 80)] * 3 + [(64, 96)] * 3
    assert trainer.batches_per_epoch == 2  # one batch of each size; the third sample of each is left over
    one_size = CalligraphyDataset(load_records(data, resolution=64), resolution=64, strip_height=16)
    trainer = _bucketed(tmp_path, one_size, "--train_batch_size", "2")
    assert trainer.canvas_sizes is None and trainer.batches_per_epoch == 1


def test_a_size_too_rare_for_the_smallest_batch_of_a_phase_is_refused(tmp_path, mixed):
    rl = ["--use_rl", "--train_batch_size", "4", "--rl_num_images_per_prompt", "2"]
    _bucketed(tmp_path, mixed(3, 3), *rl, "--rl_warmup_steps", "0")  # RL alone: batches of 2 prompt groups
    with pytest.raises(ConfigError, match=r"hold fewer samples than one global batch of 4"):
        _bucketed(tmp_path, mixed(3, 3), *rl, "--rl_warmup_steps", "1")  # the warm-up cuts batches of 4
    with pytest.raises(ConfigError) as err:
        _bucketed(tmp_path, mixed(3, 1), "--train_batch_size", "2")
    assert "64x96 (1 sample) hold fewer samples than one global batch of 2" in str(err.value)
    assert "--reference_strip_height 16" in str(err.value)  # the common size's strip: 80 - 64


def test_rollout_images_that_do_not_fill_prompt_groups_are_refused_before_the_models_load(tiny_models, data,
                                                                                         tmp_path):
    argv = tiny_train_args(tiny_models, data, tmp_path / "run", 1, use_rl=True, train_batch_size=3,
                           rl_num_images_per_prompt=2, pretrained_model_name_or_path=tmp_path / "no-model-here")
    with pytest.raises(ConfigError, match="3 rollout images per batch is not a multiple of --rl_num_images_per_prompt"):
        Trainer(parse_args(argv)).setup()
    assert not (tmp_path / "run").exists()


def test_rl_token_weights_follow_the_loss_region(tmp_path, data):
    batch = collate_samples(list(CalligraphyDataset(load_records(data, resolution=64), resolution=64,
                                                    strip_height=16)))
    regions = {}
    for region in ("source", "canvas"):
        trainer = Trainer(parse_args(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--use_rl",
                                      "--rl_loss_region", region]))
        regions[region] = trainer.rl_tokens(batch)
    source = trainer.source_tokens(batch)
    assert torch.equal(regions["source"], source) and source.min() == 0  # the strip's tokens weigh nothing
    assert torch.equal(regions["canvas"], torch.ones_like(source))
