"""Defaults and numerics of the RL phases that must transfer to a full-size run, and the guards of a long run.

Each test pins one behaviour a real FLUX-Fill run depends on: rollouts at the deployed guidance, a fresh
RL optimizer, an NFT old copy that keeps moving, RL objectives that ignore the reference strip, NFT's x̂0
from float32 x_t, the EMA evaluated during RL, non-finite or exploding steps skipped, and the held-out
reward watched for reward hacking (best checkpoint, divergence alarm).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from train.checkpointing import BEST_FILE, validate_checkpoint
from train.config import parse_args, validate
from train.data.synthesize import synthesize
from train.models.calligrapher import Calligrapher
from train.tests.rl_helpers import EVAL_WEIGHTS, negated_reward, rl_args, rl_state  # noqa: F401
from train.tests.train_helpers import adapter_weights, tiny_train_args
from train.trainer import RunStopped, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("rl-transfer-data"), num=8, resolution=64, seed=0)


def _trainer(argv) -> Trainer:
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    return trainer


def _record_velocity(monkeypatch, calls: list):
    """Record the guidance of every model forward."""
    real = Calligrapher.velocity

    def recording(self, latents, sigma, cond, adapter=None, params=None):
        calls.append({"guidance": cond.guidance.clone()})
        return real(self, latents, sigma, cond, adapter=adapter, params=params)

    monkeypatch.setattr(Calligrapher, "velocity", recording)


# ------------------------------------------------------------------------------------------ 1. guidance
def test_rl_guidance_follows_guidance_scale_unless_set():
    base = ["--pretrained_model_name_or_path", "x", "--siglip_path", "y", "--train_data_json", "z",
            "--output_dir", "o", "--max_train_steps", "1"]
    assert parse_args(base).rl_guidance_scale == 30.0  # FLUX-Fill is used at 30
    assert parse_args(base + ["--guidance_scale", "12"]).rl_guidance_scale == 12.0
    assert parse_args(base + ["--guidance_scale", "12", "--rl_guidance_scale", "3.5"]).rl_guidance_scale == 3.5


@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_rollouts_and_held_out_evaluation_run_at_the_supervised_guidance(tiny_models, data, tmp_path, monkeypatch,
                                                                         method):
    calls = []
    _record_velocity(monkeypatch, calls)
    trainer = _trainer(rl_args(tiny_models, data, tmp_path / "run", 1, method=method, guidance_scale=12.0,
                               rl_eval_data=data, rl_warmup_steps=0))
    trainer.run()
    assert calls and all(torch.equal(c["guidance"], torch.full_like(c["guidance"], 12.0)) for c in calls)
    log = (tmp_path / "run" / "train_log.txt").read_text()
    assert "RL rollouts and held-out evaluation at guidance 12" in log


# ------------------------------------------------------------------------------------------ 2. optimizer
def test_rl_starts_with_a_fresh_optimizer_its_own_learning_rate_and_schedule(tiny_models, data, tmp_path):
    """Two supervised steps, then RL: after the first RL step Adam has taken one step (not three), at the RL
    learning rate and weight decay, and the linear schedule restarted over the RL steps."""
    trainer = _trainer(rl_args(tiny_models, data, tmp_path / "run", 4, rl_warmup_steps=2, lr_scheduler="linear",
                               learning_rate=1e-3, rl_learning_rate=4e-4, rl_adam_weight_decay=1e-4, logging_steps=1))
    trainer.run(stop_at=3)
    supervised = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.bin", weights_only=False)["state"]
    assert supervised and all(float(s["step"]) == 2 for s in supervised.values())
    inner = trainer.optimizer.optimizer
    assert inner.state and all(float(s["step"]) == 1 for s in inner.state.values())
    group = inner.param_groups[0]
    assert group["weight_decay"] == 1e-4
    # linear over the 2 RL steps: 4e-4 at RL start, 4e-4 * (2 - 1) / 2 after its first step
    assert group["lr"] == pytest.approx(2e-4, rel=1e-12)
    lrs = [m["train/lr"] for _, m in trainer.history if "train/lr" in m]
    assert lrs[:3] == [pytest.approx(1e-3 * 3 / 4), pytest.approx(1e-3 * 2 / 4), pytest.approx(2e-4)]


def test_rl_optimizer_is_not_reset_when_a_run_resumes_mid_rl(tiny_models, data, tmp_path):
    flags = dict(rl_warmup_steps=1, rl_learning_rate=4e-4, lr_scheduler="linear")
    out = tmp_path / "run"
    trainer = _trainer(rl_args(tiny_models, data, out, 3, **flags))
    trainer.run(stop_at=2)
    saved = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=False)
    resumed = _trainer(rl_args(tiny_models, data, out, 3, resume_from_checkpoint="latest", **flags))
    state = resumed.optimizer.optimizer.state_dict()
    assert state["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"] == pytest.approx(2e-4)
    for idx, s in saved["state"].items():
        assert float(s["step"]) == 1
        assert torch.equal(state["state"][idx]["exp_avg_sq"], s["exp_avg_sq"])
    saved_guard = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step_guard"]
    assert len(saved_guard["norms"]) == 1 and list(resumed.guard.norms) == saved_guard["norms"]  # RL restarted it
    resumed.run()
    assert all(float(s["step"]) == 2 for s in resumed.optimizer.optimizer.state.values())  # continued, not reset
    resumed.close()


# ------------------------------------------------------------------------------------------ 3. NFT old copy
def test_a_decaying_old_copy_tracks_its_float64_recursion_over_600_epochs():
    """``old <- d·old + (1 − d)·θ`` with decay type 2 (d -> 0.999) while θ moves by 1e-4 per step (an Adam step at
    lr 1e-4): the stored copy stays within 2x bf16 rounding of the float64 recursion. A bf16 copy stalls once
    (1 − d)|θ − old| is below half an ulp and drifts to tens of ulps."""
    from train.config import TrainConfig
    from train.rl_ip.param_copy import ParamCopy, copy_dtypes
    from train.rl_logic.nft_forward import nft_decay

    cfg = TrainConfig(rl_copy_dtype="bf16", nft_decay_type=2)
    assert copy_dtypes(cfg) == {"ref": torch.bfloat16, "old": torch.float32}
    assert copy_dtypes(TrainConfig(rl_copy_dtype="bf16", nft_decay_type=0))["old"] == torch.bfloat16

    def errors(dtype):
        g = torch.Generator().manual_seed(0)
        theta = {"w": torch.rand(4096, generator=g) + 0.5}
        old = ParamCopy(theta, dtype)
        ref = theta["w"].double().clone()
        for step in range(1, 601):
            theta["w"] += 1e-4 * torch.sign(torch.randn(4096, generator=g) + 0.3)
            d = nft_decay(step, 2)
            old.lerp_from(theta, d)
            ref = d * ref + (1 - d) * theta["w"].double()
        half_ulp = torch.exp2(torch.floor(torch.log2(ref.abs())) - 8)  # bf16 rounding of ref, at most
        return (old.tensors["w"].double() - ref).abs() / half_ulp

    assert errors(copy_dtypes(cfg)["old"]).max().item() <= 2.0  # within 2x bf16 rounding, every element
    assert errors(torch.bfloat16).max().item() > 4.0  # a bf16 copy stalls and drifts beyond it


def test_the_nft_trainer_keeps_a_decaying_old_copy_in_float32_and_the_planner_counts_it(tiny_models, data, tmp_path):
    from train.plan import plan_for_config

    for decay, dtype in ((2, torch.float32), (0, torch.bfloat16)):
        out = tmp_path / f"decay{decay}"
        argv = rl_args(tiny_models, data, out, 1, method="nft", nft_decay_type=decay, rl_copy_dtype="bf16")
        trainer = _trainer(argv)
        trainer.run()
        assert trainer.rl.old.dtype == dtype and trainer.rl.ref.dtype == torch.bfloat16
        assert all(t.dtype == dtype for t in rl_state(out / "checkpoint-1")["old"].values())
        plan = plan_for_config(trainer.cfg, 1)
        assert plan.row("nft_old").device == trainer.rl.old.nbytes()
        assert plan.row("rl_ref").device == trainer.rl.ref.nbytes()


# ------------------------------------------------------------------------------------------ 4. strip tokens
def test_source_tokens_give_the_reference_strip_zero_weight(tiny_models, data, tmp_path):
    from train.data.preprocess import collate_samples

    trainer = _trainer(rl_args(tiny_models, data, tmp_path / "run", 1))
    batch = collate_samples([trainer.dataset[i] for i in range(2)])
    tokens = trainer.source_tokens(batch)
    # a 16 px strip above a 64 px source: 5 x 4 tokens, the first row (4 tokens) is the strip
    assert tokens.shape == (2, 20)
    assert torch.equal(tokens[:, :4], torch.zeros(2, 4)) and torch.equal(tokens[:, 4:], torch.ones(2, 16))
    trainer.close()


@pytest.mark.parametrize("region", ["source", "canvas"])
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_rl_objectives_send_no_gradient_to_the_reference_strip(tiny_models, data, tmp_path, monkeypatch, method,
                                                               region):
    """With ``--rl_loss_region source`` the trained forward's velocity gets zero gradient on every strip token and
    a non-zero one on the source tokens; ``canvas`` (the default) trains the strip too. (At this first update
    θ = ref, so the KL terms send no gradient; their token weighting is pinned in the loss tests.)"""
    grads = []
    real = Calligrapher.velocity

    def hooked(self, latents, sigma, cond, adapter=None, params=None):
        v = real(self, latents, sigma, cond, adapter=adapter, params=params)
        if v.requires_grad:
            v.register_hook(lambda g: grads.append(g.detach().clone()))
        return v

    monkeypatch.setattr(Calligrapher, "velocity", hooked)
    kl = {"grpo": 0.1, "nft": 0.01}[method]
    trainer = _trainer(rl_args(tiny_models, data, tmp_path / "run", 1, method=method, rl_kl_beta=kl,
                               rl_loss_region=region))
    trainer.run()
    assert grads
    for g in grads:
        strip_trained = bool((g[:, :4].abs().sum(-1) > 0).all())
        assert strip_trained == (region == "canvas"), "strip tokens: gradient where none belongs, or none"
        assert bool((g[:, 4:].abs().sum(-1) > 0).all()), "a source token received no gradient"


# ------------------------------------------------------------------------------------------ 5. NFT x_t
def test_nft_forms_x0_estimates_from_float32_x_t_under_bf16(tiny_models, data, tmp_path, monkeypatch):
    from train.rl_logic import nft_trainer

    seen = []
    real = nft_trainer.nft_loss

    def spy(x0, x_t, *args, **kwargs):
        seen.append((x0.dtype, x_t.detach().clone()))
        return real(x0, x_t, *args, **kwargs)

    monkeypatch.setattr(nft_trainer, "nft_loss", spy)
    trainer = _trainer(rl_args(tiny_models, data, tmp_path / "run", 1, method="nft", mixed_precision="bf16"))
    assert trainer.model.dtype == torch.bfloat16
    trainer.run()
    assert seen
    for x0_dtype, x_t in seen:
        assert x0_dtype == torch.float32 and x_t.dtype == torch.float32
        assert not torch.equal(x_t, x_t.to(torch.bfloat16).float()), "x_t was rounded to bf16 before the loss"


# ------------------------------------------------------------------------------------------ 6. EMA evaluation
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_held_out_evaluation_scores_the_ema_weights_too(tiny_models, data, tmp_path, method):
    """``eval_ema/`` beside ``eval/`` in the log and in eval_rewards.jsonl. With a lagging EMA the two differ;
    with an EMA that follows the live weights (decay ~0) they agree, so ``eval_ema/`` is the EMA's own figure."""
    rows = {}
    for name, decay in (("lag", 0.9999), ("follow", 1e-9)):
        out = tmp_path / name
        trainer = _trainer(rl_args(tiny_models, data, out, 2, method=method, use_ema=True, ema_decay=decay,
                                   rl_eval_data=data, learning_rate=0.03))
        trainer.run()
        lines = [json.loads(line) for line in (out / "eval_rewards.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all("eval_ema/reward_mean" in r and "eval/reward_mean" in r for r in lines)
        assert any("eval_ema/reward_mean" in m for _, m in trainer.history)
        rows[name] = lines[-1]
    lag, follow = rows["lag"], rows["follow"]
    assert abs(lag["eval_ema/reward_mean"] - lag["eval/reward_mean"]) > 1e-6
    assert follow["eval_ema/reward_mean"] == pytest.approx(follow["eval/reward_mean"], abs=1e-6)


# ------------------------------------------------------------------------------------------ 11. step guard
def _snapshot(trainer) -> dict:
    opt = trainer.optimizer.optimizer.state
    return {"weights": {k: v.detach().clone() for k, v in trainer.model.adapter.state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.shadow.items()},
            "adam": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.values()]}


def _same(a: dict, b: dict) -> bool:
    flat = lambda d: [*d["weights"].values(), *d["ema"].values(), *(v for s in d["adam"] for v in s.values())]
    return all(torch.equal(x, y) for x, y in zip(flat(a), flat(b))) and len(flat(a)) == len(flat(b))


def _plant_nan(trainer, backwards: set[int] | None):
    """NaN gradients on the backward passes numbered in ``backwards`` (None = every one), from the first."""
    count = {"n": 0}
    param = next(p for p in trainer.model.adapter.parameters() if p.requires_grad)

    def hook(grad):
        count["n"] += 1
        return torch.full_like(grad, math.nan) if backwards is None or count["n"] in backwards else grad

    param.register_hook(hook)


@pytest.mark.parametrize("method", [None, "grpo", "nft"])
def test_a_nan_gradient_skips_one_step_and_changes_nothing(tiny_models, data, tmp_path, method):
    flags = dict(use_ema=True, checkpointing_steps=100)
    if method is None:
        argv = tiny_train_args(tiny_models, data, tmp_path / "run", 3, **flags)
    else:
        argv = rl_args(tiny_models, data, tmp_path / "run", 3, method=method, **flags)
    trainer = _trainer(argv)
    snapshots = []
    real_after = trainer.after_optimizer_step

    def after(*args, **kwargs):
        skipped = trainer.step_skipped
        real_after(*args, **kwargs)
        snapshots.append((skipped, _snapshot(trainer)))  # the state once everything after the step is done

    trainer.after_optimizer_step = after
    _plant_nan(trainer, {2} if method is None else {5})  # GRPO/NFT: 3 trained steps per optimizer step here
    trainer.run()
    skipped = [i for i, (s, _) in enumerate(snapshots) if s]
    assert skipped == [1], [s for s, _ in snapshots]
    assert _same(snapshots[0][1], snapshots[1][1]), "the skipped step changed weights, EMA or Adam state"
    assert not _same(snapshots[1][1], snapshots[2][1])
    assert trainer.global_step == 3 and trainer.guard.skipped == 1 and trainer.guard.consecutive == 0
    assert [m["train/skipped_steps"] for _, m in trainer.history if "train/lr" in m][-1] == 1.0
    assert "skipped the optimizer step" in (tmp_path / "run" / "train_log.txt").read_text()
    for t in trainer.model.adapter.state_dict().values():
        assert torch.isfinite(t).all()


def test_consecutive_nan_steps_stop_the_run_and_the_last_checkpoint_resumes(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    flags = dict(use_ema=True, checkpointing_steps=1, max_consecutive_skips=3)
    trainer = _trainer(tiny_train_args(tiny_models, data, out, 4, **flags))
    _plant_nan(trainer, set(range(2, 100)))  # every backward after the first
    with pytest.raises(RunStopped) as stop:
        trainer.run()
    assert stop.value.exit_code == 4 and "3 optimizer steps in a row were skipped" in str(stop.value)
    assert str(out / "checkpoint-1") in str(stop.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert validate_checkpoint(out / "checkpoint-1", expect_ema=True) == []
    for name in ("ip-adapter.bin", "ip-adapter-ema.bin"):
        assert all(torch.isfinite(t).all() for t in adapter_weights(out / "checkpoint-1" / name).values())
    from train.train import main

    assert main(tiny_train_args(tiny_models, data, out, 4, resume_from_checkpoint="latest", **flags)) == 0
    assert (out / "checkpoint-4").is_dir()


def test_a_non_finite_loss_with_finite_gradients_skips_only_its_own_step(tiny_models, data, tmp_path):
    """The loss flag covers the micro-batches of one optimizer step and is cleared at the step: a NaN loss
    whose gradients are finite skips that step, and the next micro-batch's step is taken."""
    from train.supervised import supervised_loss, training_sigmas

    trainer = _trainer(tiny_train_args(tiny_models, data, tmp_path / "run", 3))
    acc, sigmas, batches = trainer.accelerator, training_sigmas(trainer.model), trainer.loader()
    taken = []
    for poisoned in (True, False):
        batch, keys = next(batches)
        before = {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}
        with acc.accumulate(trainer.adapter):
            loss = supervised_loss(trainer, batch, keys, sigmas)
            if poisoned:  # NaN in value only: the constant has no gradient
                loss = loss + torch.tensor(math.nan)
            acc.backward(loss)
            norm = trainer.optimizer_step(loss)
        assert math.isfinite(norm)
        taken.append(any(not torch.equal(v, before[k]) for k, v in trainer.model.adapter.state_dict().items()))
        assert trainer.step_skipped == poisoned
    assert taken == [False, True]
    batches.close()
    trainer.close()


def test_a_gradient_norm_far_above_its_running_median_is_skipped():
    from train.trainer import StepGuard

    guard = StepGuard(factor=10.0, max_consecutive=5)
    for n in [1.0] * 9:
        assert guard.reason(n, True) is None
        guard.record(n, False)
    assert guard.reason(50.0, True) is None  # fewer than 10 accepted norms: no median yet
    guard.record(2.0, False)
    assert guard.reason(10.0, True) is None and "running median 1" in guard.reason(10.5, True)
    assert guard.reason(math.nan, True).startswith("non-finite gradient") and guard.reason(1.0, False)
    guard.record(99.0, True)
    assert guard.consecutive == 1 and guard.skipped == 1 and len(guard.norms) == 10  # skipped norms not kept
    restored = StepGuard(10.0, 5)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict()
    assert StepGuard(0.0, 5).reason(1e9, True) is None  # 0: only non-finite steps are skipped


def test_non_finite_and_out_of_range_guard_flags_are_refused(tmp_path):
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--siglip_path", str(tmp_path),
            "--train_data_json", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1"]
    problems = validate(parse_args(base + ["--learning_rate", "inf", "--masked_loss_weight", "nan",
                                           "--max_grad_norm_skip", "0.5", "--max_consecutive_skips", "0"]))
    joined = "\n".join(problems)
    for flag in ("--learning_rate must be a finite", "--masked_loss_weight must be a finite",
                 "--max_grad_norm_skip must be 0", "--max_consecutive_skips must be at least 1"):
        assert flag in joined, joined


# ------------------------------------------------------------------------------------------ 12. reward hacking
@pytest.mark.slow
def test_divergence_alarm_and_best_checkpoint_when_the_training_reward_is_gamed(tiny_models, data, tmp_path,
                                                                                negated_reward, capsys):
    """Train on ``1 - contrast`` while the held-out set is scored with the real ``contrast``: the training reward
    rises as the held-out reward falls. The alarm fires, ``--rl_stop_on_divergence`` stops the run after a
    checkpoint (exit 0, a "stopped:" line), and ``best.json`` names the best held-out checkpoint, which
    ``--checkpoints_total_limit 1`` did not prune."""
    from train.train import main

    out = tmp_path / "run"
    flags = dict(method="nft", learning_rate=0.03, rl_kl_beta=0.0, rl_per_prompt_stat_tracking=True,
                 rl_num_images_per_prompt=4, train_batch_size=8, rl_eval_reward_weights=EVAL_WEIGHTS,
                 rl_eval_data=data, rl_eval_every=1, rl_divergence_patience=2, rl_stop_on_divergence=True,
                 checkpointing_steps=1000, checkpoints_total_limit=1)
    assert main(rl_args(tiny_models, data, out, 30, **flags)) == 0
    err = capsys.readouterr().err
    assert "stopped: stopped on divergence at global_step" in err
    log = (out / "train_log.txt").read_text()
    assert "while the training reward rose" in log and "--rl_stop_on_divergence: stopping" in log
    rows = [json.loads(line) for line in (out / "eval_rewards.jsonl").read_text().splitlines()]
    stop = rows[-1]["global_step"]
    assert stop < 30 and rows[-1]["eval/reward_mean"] < rows[-3]["eval/reward_mean"]
    best = json.loads((out / BEST_FILE).read_text())
    assert best["metric"] == "eval/reward_mean"
    assert best["value"] == max(r["eval/reward_mean"] for r in rows)
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == sorted({best["checkpoint"], f"checkpoint-{stop}"}), names
    assert validate_checkpoint(out / best["checkpoint"]) == []
    assert json.loads((out / best["checkpoint"] / "trainer_state.json").read_text())["global_step"] == \
        best["global_step"]


def test_divergence_needs_a_falling_held_out_reward_and_a_rising_training_reward(tiny_models, data, tmp_path):
    from train.rl_logic.rollout import watch_heldout

    trainer = Trainer(parse_args(rl_args(tiny_models, data, tmp_path / "run", 1, rl_divergence_patience=2)))
    trainer.ema = None
    cases = [  # (held-out, training) per evaluation -> (best at the last, alarm at the last)
        ([(0.5, math.nan)], (True, False)),
        ([(0.5, math.nan), (0.4, 0.1), (0.3, 0.2)], (False, True)),  # RL-start row has no training reward
        ([(0.5, 0.1), (0.4, 0.2), (0.3, 0.3)], (False, True)),
        ([(0.5, 0.1), (0.4, 0.2), (0.3, 0.05)], (False, False)),  # training reward fell too
        ([(0.5, 0.1), (0.6, 0.2), (0.3, 0.3)], (False, False)),  # held-out rose once in the window
        ([(0.5, 0.1), (0.4, 0.2), (0.7, 0.3)], (True, False)),
        ([(0.5, 0.1), (0.5, 0.2)], (False, False)),  # a tie is no new best
    ]
    for rows, (best, alarm) in cases:
        trainer.rl.evals = [[i, h, t] for i, (h, t) in enumerate(rows)]
        got_best, warning = watch_heldout(trainer)
        assert (got_best, warning is not None) == (best, alarm), rows
    trainer.cfg.rl_divergence_patience = 0
    trainer.rl.evals = [[0, 0.5, 0.1], [1, 0.4, 0.2], [2, 0.3, 0.3]]
    assert watch_heldout(trainer)[1] is None


def test_pruning_never_deletes_the_best_checkpoint(tmp_path):
    from train.checkpointing import prune_checkpoints

    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / BEST_FILE).write_text(json.dumps({"checkpoint": "checkpoint-1"}))
    prune_checkpoints(tmp_path, 4, 1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]


def test_the_planner_counts_the_guard_means_and_the_ema_copied_for_evaluation(tmp_path):
    from dataclasses import replace

    from train.config import TrainConfig
    from train.plan import canvas, plan_for_config

    cfg = TrainConfig(use_rl=True, rl_method="grpo", rl_warmup_steps=0, max_train_steps=10, rl_kl_beta=0.0,
                      rl_num_inference_steps=8, rl_sde_window_size=3, train_batch_size=2, rl_num_batches_per_epoch=2,
                      resolution=512, use_ema=True, ema_device="cpu")
    plain, guarded = plan_for_config(cfg), plan_for_config(replace(cfg, rl_grpo_guard=True))
    h, w = canvas(cfg)
    tokens = (h // 16) * (w // 16)
    images, steps = 2 * 2, 3
    # one more fp32 latent per stored step and image, kept per batch and in the update's concatenated copy
    assert guarded.row("rl_buffers").device - plain.row("rl_buffers").device == 2 * images * steps * tokens * 64 * 4
    assert not any("held-out evaluation of the EMA" in p.name for p in plain.phases)  # no --rl_eval_data
    evaluated = plan_for_config(replace(cfg, rl_eval_data=str(tmp_path)))
    phase = next(p for p in evaluated.phases if "held-out evaluation of the EMA" in p.name)
    rollout = next(p for p in evaluated.phases if p.name == "GRPO: rollout step")
    assert phase.device - rollout.device == evaluated.row("ema").host
