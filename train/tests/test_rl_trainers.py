"""Both RL trainers on tiny components (docs/ARCHITECTURE.md §6–§9): invariants, learning, resume, copies, window, faults.

Learning tests guard the signs: from a fixed seed the held-out reward (deterministic samples on
fixed noise, a set the run never trains on) rises under the ``contrast`` reward and falls under
its negation (``1 - contrast``, same scorer).
"""

from __future__ import annotations

import pytest
import torch

from train.config import parse_args
from train.data.synthesize import synthesize
from train.tests.rl_helpers import EVAL_WEIGHTS, eval_curve, metric, negated_reward, rl_args, rl_state  # noqa: F401
from train.tests.train_helpers import adapter_weights, assert_weights_equal
from train.train import main
from train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("rl-data"), num=8, resolution=64, seed=0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("rl-held-out"), num=4, resolution=64, seed=5)


def run_trainer(argv, stop_at=None) -> Trainer:
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    trainer.run(stop_at=stop_at)
    return trainer


# ---------------------------------------------------------------------------------------------- GRPO
@pytest.mark.parametrize("window", [{}, {"rl_sde_window_size": 2}, {"rl_grpo_guard": True}],
                         ids=["all-steps", "sde-window", "grpo-guard"])
def test_grpo_first_update_has_ratio_one_and_every_parameter_changes(tiny_models, data, tmp_path, window):
    trainer = Trainer(parse_args(rl_args(tiny_models, data, tmp_path / "run", 2, rl_warmup_steps=1, **window)))
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}
    trainer.run()
    # one rollout batch, one inner epoch: the first re-scoring uses the rollout's own weights
    rl_steps = [m for _, m in trainer.history if "train/ratio_min" in m]
    assert rl_steps[0]["train/ratio_min"] == 1.0 and rl_steps[0]["train/ratio_max"] == 1.0
    assert rl_steps[0]["train/clipfrac"] == 0.0 and rl_steps[0]["train/approx_kl"] == 0.0
    for k, v in trainer.model.adapter.state_dict().items():
        assert not torch.equal(v, before[k]), f"{k} did not change"
    if window.get("rl_grpo_guard"):  # each of the 3 trained steps weighted 1 / (sigma - sigma')
        sigmas = trainer.model.sigmas(4, 20).double()  # 80 x 64 px canvas: 5 x 4 packed tokens
        expected = (1 / (sigmas[:3] - sigmas[1:4])).mean().item()
        assert rl_steps[0]["train/guard_weight_mean"] == pytest.approx(expected, rel=1e-5)
    else:
        assert "train/guard_weight_mean" not in rl_steps[0]
    # the KL reference is the adapter as RL found it (after the one warm-up step), not the initial one
    assert rl_state(tmp_path / "run" / "checkpoint-1")["ref"] is None  # written during the warm-up
    warm = adapter_weights(tmp_path / "run" / "checkpoint-1" / "ip-adapter.bin")
    assert_weights_equal(rl_state(tmp_path / "run" / "checkpoint-2")["ref"], warm)


@pytest.mark.slow
@pytest.mark.parametrize("method,sign", [("grpo", 1), ("grpo", -1), ("nft", 1), ("nft", -1)])
def test_rl_moves_the_held_out_reward_the_right_way(tiny_models, data, tmp_path, request, method, sign):
    """Scored on the training records under held-out noise (the evaluation's own fixed draws, never
    used by a rollout): at this size the adapter moves a record's contrast but hardly transfers to
    unseen records in a few epochs. GRPO, whose SDE log-prob gradient carries far less signal per
    rollout than NFT's regression, gets 30 RL epochs, NFT 25 (fewer suffice to raise the reward,
    lowering it takes longer from this start)."""
    if sign < 0:
        request.getfixturevalue("negated_reward")
    flags = dict(learning_rate=0.03, rl_kl_beta=0.0, rl_per_prompt_stat_tracking=True, rl_num_images_per_prompt=4,
                 train_batch_size=8, rl_eval_reward_weights=EVAL_WEIGHTS, checkpointing_steps=1000,
                 rl_eval_data=data)
    steps = {"grpo": 30, "nft": 25}[method]
    assert main(rl_args(tiny_models, data, tmp_path / "run", steps, method=method, **flags)) == 0
    curve = eval_curve(tmp_path / "run")
    start, end = curve[0], curve[-1]
    assert len(curve) == 2
    assert sign * (end - start) > 0.004, curve  # contrast / 2: a move of 0.008 in contrast (~3%)


@pytest.mark.slow
@pytest.mark.parametrize("guard", [False, True], ids=["sde-window", "grpo-guard"])
@pytest.mark.parametrize("sign", [1, -1])
def test_grpo_with_an_sde_window_moves_the_held_out_reward_the_right_way(tiny_models, data, tmp_path, request,
                                                                         sign, guard):
    """A window of 3 stochastic (and trained) steps in 8, plain and with GRPO-Guard. With 4 sampler steps a
    window of 2 in 3 carries too little signal at this size (the held-out contrast fell under the reward and
    its negation alike); 8 steps give the window room."""
    if sign < 0:
        request.getfixturevalue("negated_reward")
    flags = dict(learning_rate=0.03, rl_kl_beta=0.0, rl_per_prompt_stat_tracking=True, rl_num_images_per_prompt=4,
                 train_batch_size=8, rl_eval_reward_weights=EVAL_WEIGHTS, checkpointing_steps=1000,
                 rl_eval_data=data, rl_num_inference_steps=8, rl_sde_window_size=3, rl_grpo_guard=guard)
    assert main(rl_args(tiny_models, data, tmp_path / "run", 30, **flags)) == 0
    curve = eval_curve(tmp_path / "run")
    assert len(curve) == 2
    assert sign * (curve[-1] - curve[0]) > 0.004, curve


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_rl_resumed_twice_equals_the_uninterrupted_run(tiny_models, data, tmp_path, method):
    """Warm-up step, then RL; the run dies after steps 2 and 3 and resumes each time with ``latest``."""
    flags = dict(rl_warmup_steps=1, use_ema=True, lr_scheduler="cosine", lr_warmup_steps=1, method=method,
                 rl_per_prompt_stat_tracking=True, **({"nft_decay_type": 1} if method == "nft" else {}))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(rl_args(tiny_models, data, straight, 4, **flags)) == 0
    run_trainer(rl_args(tiny_models, data, resumed, 4, **flags), stop_at=2)
    run_trainer(rl_args(tiny_models, data, resumed, 4, resume_from_checkpoint="latest", **flags), stop_at=3)
    assert main(rl_args(tiny_models, data, resumed, 4, resume_from_checkpoint="latest", **flags)) == 0
    a, b = straight / "checkpoint-4", resumed / "checkpoint-4"
    for name in ("ip-adapter.bin", "ip-adapter-ema.bin"):
        assert_weights_equal(adapter_weights(a / name), adapter_weights(b / name))
    sa, sb = rl_state(a), rl_state(b)
    assert sa["epoch"] == sb["epoch"] == 3 and sa["start_step"] == sb["start_step"] == 1
    for copy in ("ref", "old"):
        if sa[copy] is None:
            assert sb[copy] is None and (method, copy) == ("grpo", "old")
        else:
            assert_weights_equal(sa[copy], sb[copy])
    opt_a = torch.load(a / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=False)["state"]
    for idx in opt_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[idx][key], opt_b[idx][key]), (idx, key)
    log = (resumed / "train_log.txt").read_text()
    assert log.count("resumed from") == 2 and f"RL ({method}) continues at global_step 2" in log


# ---------------------------------------------------------------------------------------------- SDE window
def test_sde_window_trains_only_window_steps(tiny_models, data, tmp_path, monkeypatch):
    """Count the forwards: with a window of 2 of 5 trainable steps, each sample trains exactly 2 steps,
    at the window's two noise levels; without a window, all 5."""
    from train.models.calligrapher import Calligrapher

    calls = []
    real = Calligrapher.velocity

    def counting(self, latents, sigma, cond, adapter=None, params=None):
        if torch.is_grad_enabled():
            calls.append(torch.as_tensor(sigma).flatten().tolist())
        return real(self, latents, sigma, cond, adapter=adapter, params=params)

    monkeypatch.setattr(Calligrapher, "velocity", counting)
    common = dict(rl_num_inference_steps=6, rl_kl_beta=0.0)
    windowed = run_trainer(rl_args(tiny_models, data, tmp_path / "w", 2, rl_sde_window_size=2, **common))
    assert len(calls) == 2 * 2  # 2 RL epochs x 2 trained steps (one micro-batch of 4 images)
    sigmas = windowed.model.sigmas(6, 20).tolist()  # 64 px canvas + 16 px strip = 20 tokens
    for epoch_calls in (calls[:2], calls[2:]):
        levels = sorted({s for c in epoch_calls for s in c}, reverse=True)
        assert len(levels) == 2 and sigmas.index(levels[1]) == sigmas.index(levels[0]) + 1, levels
    calls.clear()
    run_trainer(rl_args(tiny_models, data, tmp_path / "all", 1, **common))
    assert len(calls) == 5  # every step but the final one
    assert {s for c in calls for s in c} == set(sigmas[:5])


def test_grpo_trained_steps_are_drawn_per_sample_and_per_epoch(tiny_models, data, tmp_path, monkeypatch):
    """With half of the 5 stochastic steps trained, each sample draws its own steps, and draws again
    every RL epoch (one micro-batch of 4 images per epoch: a forward's sigmas are the 4 samples' steps)."""
    from train.models.calligrapher import Calligrapher

    calls = []
    real = Calligrapher.velocity

    def recording(self, latents, sigma, cond, adapter=None, params=None):
        if torch.is_grad_enabled():
            calls.append(torch.as_tensor(sigma).flatten().tolist())
        return real(self, latents, sigma, cond, adapter=adapter, params=params)

    monkeypatch.setattr(Calligrapher, "velocity", recording)
    epochs = 4
    run_trainer(rl_args(tiny_models, data, tmp_path / "run", epochs, rl_num_inference_steps=6, rl_kl_beta=0.0,
                        rl_timestep_fraction=0.5))
    per_epoch = len(calls) // epochs
    assert per_epoch * epochs == len(calls) and 1 <= per_epoch < 5
    drawn = [[frozenset(c[i] for c in calls[e * per_epoch:(e + 1) * per_epoch]) for i in range(4)]
             for e in range(epochs)]
    assert all(len(steps) == per_epoch for epoch in drawn for steps in epoch)  # distinct steps per sample
    assert any(len(set(epoch)) > 1 for epoch in drawn)  # samples differ within an epoch
    assert any(drawn[e][i] != drawn[0][i] for e in range(1, epochs) for i in range(4))  # and between epochs


def test_grpo_stops_at_max_train_steps_inside_an_epoch(tiny_models, data, tmp_path):
    """Two rollout batches per RL epoch train two optimizer steps each epoch; --max_train_steps 3 ends the
    run after the first step of the second epoch, with its checkpoint."""
    trainer = run_trainer(rl_args(tiny_models, data, tmp_path / "run", 3, rl_num_batches_per_epoch=2,
                                  rl_kl_beta=0.0, checkpointing_steps=1000))
    assert trainer.global_step == 3 and trainer.history[-1][0] == 3
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]


# ---------------------------------------------------------------------------------------------- NFT copies
def _condition(model, dataset, n=2):
    from train.data.preprocess import collate_samples

    batch = collate_samples([dataset[i] for i in range(n)])
    embeds, pooled, ids = model.encode_prompt(batch.texts, 32)
    return model.prepare_condition(batch.image, batch.mask, embeds, pooled, ids,
                                   model.encode_style(batch.style_images), guidance_scale=3.5)


@pytest.mark.parametrize("part", ["image_proj.", "ip_adapter."])
def test_each_copy_uses_its_own_projection_and_attention(calligrapher, data, part):
    from train.data.dataset import CalligraphyDataset
    from train.rl_ip.param_copy import ParamCopy

    model = calligrapher
    cond = _condition(model, CalligraphyDataset.from_path(data, resolution=64, strip_height=16))
    x = torch.randn(cond.batch_size, cond.cond_latents.shape[1], 64, generator=torch.Generator().manual_seed(0))
    old = ParamCopy(model.adapter, torch.float32)
    v_theta, v_old = model.velocity(x, 0.6, cond), model.velocity(x, 0.6, cond, params=old.params())
    assert torch.equal(v_theta, v_old)
    changed = [n for n in old.tensors if n.startswith(part) and n.endswith("weight")]
    assert changed
    with torch.no_grad():
        for n in changed:
            old.tensors[n].mul_(1.5)
    v_old2 = model.velocity(x, 0.6, cond, params=old.params())
    assert not torch.allclose(v_old2, v_old, atol=1e-6), f"changing the old copy's {part}* left v_old unchanged"
    assert torch.equal(model.velocity(x, 0.6, cond), v_theta), "the live adapter must not see the copy's weights"


def test_old_adapter_rollout_equals_a_rollout_with_those_weights_installed(tiny_models, data, tmp_path):
    from train.data.preprocess import collate_samples
    from train.rl_ip.param_copy import ParamCopy
    from train.rl_logic.rollout import sample_trajectory
    from train.rng import keyed_generator

    trainer = Trainer(parse_args(rl_args(tiny_models, data, tmp_path / "run", 1, method="nft")))
    trainer.setup()
    batch = collate_samples([trainer.dataset[i] for i in range(2)])
    cond = trainer.condition(batch, 3.5)
    sigmas = trainer.model.sigmas(4, cond.cond_latents.shape[1])
    old = ParamCopy(trainer.model.adapter, torch.float32)
    with torch.no_grad():
        for t in old.tensors.values():
            t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))

    def gens():
        return [keyed_generator(0, i) for i in range(2)]

    current = sample_trajectory(trainer, cond, gens(), sigmas).final
    via_copy = sample_trajectory(trainer, cond, gens(), sigmas, params=old.params()).final
    assert not torch.allclose(current, via_copy, atol=1e-4)
    old.copy_to(trainer.model.adapter)
    installed = sample_trajectory(trainer, cond, gens(), sigmas).final
    assert torch.equal(via_copy, installed)
    trainer.close()


@pytest.mark.parametrize("decay_type", [0, 1])
def test_old_adapter_follows_its_decay_schedule_after_each_epoch(tiny_models, data, tmp_path, decay_type):
    """Type 0: old == current after every epoch. Type 1: old = d*old + (1-d)*current, d = min(0.001 s, 0.5)."""
    out = tmp_path / "run"
    run_trainer(rl_args(tiny_models, data, out, 3, method="nft", nft_decay_type=decay_type))
    previous = rl_state(out / "checkpoint-1")["ref"]  # the adapter when RL started = the first old copy
    for step in (1, 2, 3):
        ckpt = out / f"checkpoint-{step}"
        old, current = rl_state(ckpt)["old"], adapter_weights(ckpt / "ip-adapter.bin")
        if decay_type == 0:
            assert_weights_equal(old, current)
        else:
            d = min(0.001 * step, 0.5)  # s = RL optimizer steps so far (RL starts at step 0)
            expected = {k: d * previous[k] + (1 - d) * current[k] for k in current}
            assert_weights_equal(old, expected, atol=1e-6)
            assert any(not torch.equal(old[k], current[k]) for k in current)
        previous = old


# ---------------------------------------------------------------------------------------------- processes
@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_models, data, tmp_path, method):
    """Groups of 2 over 4 images: with 2 processes every group spans both ranks' slices in turn."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from train.tests.reward_helpers import free_port

    flags = dict(method=method, adam_epsilon=1e-2, rl_per_prompt_stat_tracking=True, checkpointing_steps=2,
                 rl_num_batches_per_epoch=2, rl_num_images_per_prompt=4)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(rl_args(tiny_models, data, one, 2, **flags)) == 0
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "train.train", *rl_args(tiny_models, data, two, 2, **dict(flags, train_batch_size=2))]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_weights_equal(adapter_weights(one / "checkpoint-2" / "ip-adapter.bin"),
                         adapter_weights(two / "checkpoint-2" / "ip-adapter.bin"), atol=1e-6)
    log_one, log_two = (one / "train_log.txt").read_text(), (two / "train_log.txt").read_text()
    reward_one = [line.split("reward/mean=")[1].split()[0] for line in log_one.splitlines() if "reward/mean=" in line]
    reward_two = [line.split("reward/mean=")[1].split()[0] for line in log_two.splitlines() if "reward/mean=" in line]
    assert reward_one == reward_two and reward_one


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_rl_against_a_reward_server_process_survives_its_death(tiny_models, data, held_out, tmp_path, capsys, method):
    """Warm-up then RL scored by a real server process; the server is killed mid-run: one clear line,
    exit 3, the newest checkpoint intact; restarted, ``latest`` finishes the run exactly as an
    uninterrupted in-process run does (the contrast reward is the same computation in both)."""
    import threading
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.tests.reward_helpers import free_port, spawn_server

    port = free_port()
    proc, url = spawn_server("--scorers", "contrast", "--port", str(port))
    flags = dict(rl_warmup_steps=1, report_to="tensorboard", rl_image_log_every=1, rl_eval_data=held_out,
                 rl_eval_every=1, rl_eval_num_inference_steps=2, method=method, use_ema=True)
    out, reference = tmp_path / "run", tmp_path / "in-process"
    try:
        def kill_after_checkpoint_2():
            deadline = time.monotonic() + 300
            while not (out / "checkpoint-2").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.kill()

        killer = threading.Thread(target=kill_after_checkpoint_2, daemon=True)
        killer.start()
        argv = rl_args(tiny_models, data, out, 4, reward_server_url=url, **flags)
        assert main(argv) == 3
        killer.join()
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "rewards could not be computed" in errors[0] and "latest" in errors[0], errors
        assert "Traceback" not in err
        assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()
        assert not list(out.glob(".checkpoint-*"))
        proc, url = spawn_server("--scorers", "contrast", "--port", str(port))
        assert main(rl_args(tiny_models, data, out, 4, reward_server_url=url, resume_from_checkpoint="latest",
                            **flags)) == 0
    finally:
        proc.kill()
    assert main(rl_args(tiny_models, data, reference, 4, **flags)) == 0
    for name in ("ip-adapter.bin", "ip-adapter-ema.bin"):
        assert_weights_equal(adapter_weights(out / "checkpoint-4" / name), adapter_weights(reference / "checkpoint-4" / name))
    for copy in ("ref", "old"):
        a, b = rl_state(out / "checkpoint-4")[copy], rl_state(reference / "checkpoint-4")[copy]
        assert (a is None) == (b is None) and (a is not None or (method, copy) == ("grpo", "old"))
        if a is not None:
            assert_weights_equal(a, b)
    assert eval_curve(out)[-1] == eval_curve(reference)[-1]

    scalars, images = set(), set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    common = {"train/loss", "train/policy_loss", "train/kl", "reward/mean", "reward/std", "reward/contrast_mean",
              "adv/zero_std_fraction", "eval/reward_mean", "timing/rollout_s", "timing/reward_wait_s",
              "timing/update_s", "train/lr", "memory/peak_gb", "ema/decay"}
    specific = {"grpo": {"train/approx_kl", "train/clipfrac", "train/ratio_min", "train/ratio_max"},
                "nft": {"train/old_deviate", "train/r_mean", "train/r_min", "train/r_max", "nft/decay"}}[method]
    assert common | specific <= scalars, (common | specific) - scalars
    assert {"images/rollouts", "images/eval"} <= images
