"""Memory planner (``python -m train.plan``): exact state bytes against a live trainer's tensors, the
released adapter's size, the recommended multi-GPU configuration, suggestions that fit, and the
fake-tensor working-memory measurement it rests on."""

from __future__ import annotations

import pytest
import torch

from train.config import parse_args
from train.data.synthesize import synthesize
from train.plan import main, parse_plan_args, plan_for_config
from train.plan_memory import LiveBytes, StepShape, _depth_peaks, transformer_peaks
from train.plan_model import ModelSpec, adamw8bit_state_bytes, count_components
from train.supervised import supervised_loss, training_sigmas
from train.tests.rl_helpers import rl_args
from train.tests.train_helpers import tiny_train_args
from train.trainer import Trainer

RECOMMENDED = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--resolution", "512", "--train_batch_size",
               "1", "--use_rl", "--rl_method", "nft", "--use_ema", "--ema_device", "cpu", "--use_8bit_adam",
               "--rl_copy_dtype", "bf16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("plan-data"), num=8, resolution=64, seed=0)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(module) -> int:
    return _nbytes(list(module.parameters()) + list(module.buffers()))


RUNS = {
    "supervised": dict(),
    "supervised-bf16-ema-cpu": dict(mixed_precision="bf16", use_ema=True, ema_device="cpu"),
    "grpo-ema-same-fp32-copies": dict(rl=True, method="grpo", use_ema=True, rl_copy_dtype="fp32"),
    "nft-bf16-ema-cpu": dict(rl=True, method="nft", use_ema=True, ema_device="cpu", rl_copy_dtype="bf16",
                             mixed_precision="bf16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_state_bytes_equal_the_tensors_a_trainer_holds(tiny_models, data, tmp_path, run):
    """Set up, train one optimizer step (RL: after the RL start), one more backward; then walk every live tensor."""
    flags = dict(RUNS[run])
    if flags.pop("rl", False):
        argv = rl_args(tiny_models, data, tmp_path / "run", 1, method=flags.pop("method"), **flags)
    else:
        argv = tiny_train_args(tiny_models, data, tmp_path / "run", 1, train_batch_size=2, **flags)
    cfg = parse_args(argv)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.run(stop_at=1)
    batch, keys = next(trainer.loader())
    supervised_loss(trainer, batch, keys, training_sigmas(trainer.model)).backward()
    model, adapter = trainer.model, trainer.model.adapter

    plan = plan_for_config(cfg, num_processes=1, gpu_memory_gb=2.0)
    row = plan.row
    assert model.pipe.text_encoder is None and model.pipe.text_encoder_2 is None  # freed after the prompt cache
    assert row("text_encoders").device == 0
    assert row("transformer").device == _module_bytes(model.transformer)
    assert row("vae").device == _module_bytes(model.vae)
    assert row("siglip").device == _module_bytes(model.siglip)
    assert plan.trainable == model.parameter_report()["trainable"]
    assert row("adapter").device == _nbytes(adapter.parameters())
    assert row("grads").device == _nbytes(p.grad for p in adapter.parameters())
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert all(s["step"].device == p.device for p, s in trainer.optimizer.state.items())  # fused: no host part
    assert row("optimizer").device == _nbytes(state)
    assert row("optimizer").host == 0
    ema = row("ema")
    if trainer.ema is None:
        assert ema.device == ema.host == 0
    else:
        held = _nbytes(trainer.ema.shadow.values())
        on_cpu = cfg.ema_device == "cpu"
        assert all(t.device.type == "cpu" for t in trainer.ema.shadow.values())
        assert (ema.host, ema.device) == ((held, 0) if on_cpu else (0, held))
    for key, copy in (("rl_ref", trainer.rl.ref), ("nft_old", trainer.rl.old)):
        assert row(key).device == (0 if copy is None else copy.nbytes())
    if cfg.use_rl:  # every copy the method keeps exists, and nothing else
        assert (trainer.rl.ref is not None) == (cfg.rl_kl_beta > 0)
        assert (trainer.rl.old is not None) == (cfg.rl_method == "nft")


@pytest.fixture(scope="module")
def recommended():
    return parse_plan_args(RECOMMENDED + ["--num_processes", "8"])[0]


@pytest.mark.slow
def test_full_size_adapter_is_the_released_one():
    comp = count_components(ModelSpec.full(), torch.bfloat16, 128)
    assert comp.trainable == 3_018_043_904
    assert comp.adapter_parts == {"mlp": 1_211_148_544, "qformer": 372_443_392, "kv": 1_434_451_968}
    assert comp.style_blocks == 57


@pytest.mark.slow
def test_recommended_eight_gpu_configuration_fits_80_gb(recommended):
    from train.plan import ddp_gradient_views
    from train.trainer import DDP_KWARGS

    assert DDP_KWARGS.gradient_as_bucket_view and ddp_gradient_views()  # the trainer's DDP, as planned
    plan = plan_for_config(recommended, num_processes=8, gpu_memory_gb=80)
    assert plan.fits, plan.format()
    assert "NFT: trained forward/backward" == plan.peak.name
    assert plan.row("ema").host == 4 * 3_018_043_904 and plan.row("ema").device == 0
    assert plan.row("rl_ref").device == plan.row("nft_old").device == 2 * 3_018_043_904
    # DDP's default keeps a second fp32 copy of the gradients: 12 GB more, and the plan says why
    copied = plan_for_config(recommended, num_processes=8, gpu_memory_gb=80, ddp_bucket_view=False, suggest=False)
    assert copied.row("ddp_buckets").device == 4 * 3_018_043_904
    assert copied.peak.device == plan.peak.device + 4 * 3_018_043_904
    assert any("gradient_as_bucket_view=True" in a for a in copied.advice)
    # one process holds no buckets at all; with several, DDP's buckets (the gradients, as views) stay allocated
    # through the rollouts too, when a single process has no gradients
    single = plan_for_config(recommended, num_processes=1, gpu_memory_gb=80, ddp_bucket_view=False)
    assert single.fits and single.peak.device == plan.peak.device
    rollout = {p.name: p.device for p in single.phases}["NFT: rollout step"]
    assert {p.name: p.device for p in plan.phases}["NFT: rollout step"] == rollout + 4 * 3_018_043_904


@pytest.mark.slow
def test_suggested_flags_make_the_plan_fit():
    argv = ["--use_rl", "--rl_method", "nft", "--rl_warmup_steps", "0", "--use_ema", "--rl_copy_dtype", "fp32",
            "--mixed_precision", "bf16", "--gradient_checkpointing"]
    cfg, procs, gpu = parse_plan_args(argv)
    plan = plan_for_config(cfg, procs, gpu)
    assert plan.fits is False and plan.suggestions, plan.format()
    flags = plan.suggestions[0]
    assert plan_for_config(parse_plan_args(argv + flags)[0], procs, gpu, suggest=False).fits
    # each suggested change is needed: without any one of them the plan does not fit
    groups, i = [], 0
    while i < len(flags):
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        groups.append(flags[i:j])
        i = j
    assert groups == [["--ema_device", "cpu"], ["--rl_copy_dtype", "bf16"], ["--use_8bit_adam"]]
    for drop in groups:
        rest = [f for g in groups if g is not drop for f in g]
        assert not plan_for_config(parse_plan_args(argv + rest)[0], procs, gpu, suggest=False).fits, drop


@pytest.mark.slow
def test_cli_prints_every_row_and_the_verdict(capsys, recommended):
    assert main(RECOMMENDED) == 0
    out = capsys.readouterr().out
    for text in ("frozen transformer (bf16)", "22.17", "3,018,043,904 parameters", "optimizer state (8-bit AdamW)",
                 "EMA shadow (fp32)", "RL reference copy (bf16)", "NFT old copy (bf16)",
                 "step working memory (estimate)", "verdict: FITS", "FLUX.1-Fill-dev and SigLIP-so400m"):
        assert text in out, text


def test_cli_refuses_bad_flags_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_plan_args(["--num_processes", "0", "--resolution", "500"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --resolution 500 must be a positive multiple of 16 (FLUX packs 2x2 latents of an 8x VAE)",
                   "error: --num_processes must be at least 1, got 0"]


def test_adamw8bit_state_by_hand():
    # 4096 elements: 2 uint8 states (8192) + 2 x 16 blocks x 4 B absmax (128) + 2 x 256 x 4 B maps (2048);
    # 100 elements stay 32-bit: 2 x 100 x 4 B
    assert adamw8bit_state_bytes([4096, 100]) == 8192 + 128 + 2048 + 800


def test_live_bytes_counts_new_storages_until_they_are_freed():
    existing = torch.zeros(100)
    tracker = LiveBytes()
    tracker.ignore([existing])
    with tracker:
        a = torch.ones(1000)  # 4000 B
        view = a.view(10, 100)  # no new storage
        a.add_(1)  # in place: none
        b = existing + 1  # 400 B
        existing.mul_(2)  # an existing storage: ignored
        c = a * 2  # 4000 B
        del a, view, c
        d = b.double()  # 800 B
    assert tracker.peak == 4000 + 400 + 4000
    assert tracker.current == 400 + 800
    del b, d
    assert tracker.current == 0


NARROW = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=5, num_single_layers=3,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
              guidance_embeds=True, axes_dims_rope=(4, 4, 8))


@pytest.fixture(scope="module")
def narrow_spec(tiny_models):
    tiny = ModelSpec.from_paths(tiny_models["flux"], tiny_models["siglip"])
    return ModelSpec(dict(NARROW), tiny.vae, None, None, tiny.siglip, "narrow")


@pytest.mark.slow
@pytest.mark.parametrize("method, checkpointing", [("supervised", False), ("grpo", True), ("nft", False)])
def test_working_memory_extrapolated_from_shallow_runs_equals_the_deep_run(narrow_spec, method, checkpointing):
    shape = StepShape(method, 2, (80, 64), 8, 4, "bf16", checkpointing, method != "supervised", True, "bf16")
    extrapolated = transformer_peaks(narrow_spec, shape)
    direct = _depth_peaks(narrow_spec, shape)
    for phase in ("train", "rollout"):
        assert extrapolated[phase] == max(direct[phase].values()), phase


@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_the_measured_trained_step_is_the_loops_own(narrow_spec, method, monkeypatch):
    """The planner runs the GRPO / NFT loops' own trained-step function, once per measured step, on the
    step's [B, L] token weights: a copy of the step kept for the planner would drift from the loop."""
    from train.rl_logic import grpo_trainer, nft_trainer

    module, name = (grpo_trainer, "grpo_step_loss") if method == "grpo" else (nft_trainer, "nft_step_loss")
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        calls.append(tuple(kwargs["token_weights"].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    _depth_peaks(narrow_spec.with_depth(1, 1), StepShape(method, 2, (80, 64), 8, 4, "no", False, True, True, "fp32"))
    assert calls == [(2, 20)]  # 80 x 64 pixels: (80 / 16) x (64 / 16) tokens


@pytest.mark.slow
def test_working_memory_grows_with_batch_and_shrinks_with_checkpointing(narrow_spec):
    spec = narrow_spec.with_depth(2, 2)
    shape = StepShape("nft", 1, (80, 64), 8, 4, "no", False, True, True, "fp32")
    one = max(_depth_peaks(spec, shape)["train"].values())
    two = max(_depth_peaks(spec, StepShape(**{**shape.__dict__, "batch": 2}))["train"].values())
    ckpt = max(_depth_peaks(spec, StepShape(**{**shape.__dict__, "checkpointing": True}))["train"].values())
    assert two > one > ckpt > 0


# ---------------------------------------------------------------------------------------------- FLOPs
def _adapter_flops_by_hand(spec: ModelSpec, image_tokens: int, text_tokens: int, num_tokens: int) -> int:
    """The style adapter's matmul and attention FLOPs in one forward (2 per multiply-add), from docs/ARCHITECTURE.md §3."""
    t = spec.transformer
    e, d, n = spec.style_dim, t["joint_attention_dim"], num_tokens
    inner = t["num_attention_heads"] * t["attention_head_dim"]
    double, single = spec.blocks
    mlp = 2 * e * 2 * e + 2 * 2 * e * d * n
    qformer = 2 * e * 2 * e + 2 * 2 * e * d * 32 + 2 * (2 * n * d * d) + 2 * (2 * 32 * d * d) + 2 * (2 * n * 32 * d)
    kv = (double + single) * 2 * (2 * n * d * inner)
    style_attention = (double * 2 * (2 * image_tokens * n * inner)
                       + single * 2 * (2 * (image_tokens + text_tokens) * n * inner))
    return mlp + qformer + kv + style_attention


@pytest.mark.slow
def test_adapter_flops_match_the_hand_count_and_extrapolation_is_exact(narrow_spec):
    from train.flops import _transformer_at_depth, transformer_flops

    canvas, text, tokens = (80, 64), 8, 4
    counted = transformer_flops(narrow_spec, canvas, text, tokens)
    assert counted == _transformer_at_depth(narrow_spec, canvas, text, tokens, 1, "bf16")
    image_tokens = (canvas[0] // 16) * (canvas[1] // 16)
    by_hand = _adapter_flops_by_hand(narrow_spec, image_tokens, text, tokens)
    assert counted["forward"] - counted["base_forward"] == by_hand


@pytest.mark.slow
def test_full_size_forward_is_the_spec_yardstick_and_steps_compose_it():
    from train.flops import flop_report

    report = flop_report(ModelSpec.full(), (512, 512), 512, 128)
    parts = report["parts_gflop"]
    assert abs(parts["base_forward"] - 21_500) < 0.01 * 21_500  # docs/ARCHITECTURE.md §13: ~21.5 TFLOP per 512² forward
    adapter = _adapter_flops_by_hand(ModelSpec.full(), 1024, 512, 128) / 1e9
    assert abs(parts["forward"] - parts["base_forward"] - adapter) < 0.01
    steps = report["steps"]
    fwd, bwd = parts["forward"], parts["backward"]
    assert steps["NFT trained step"]["gflop"] == pytest.approx(3 * fwd + bwd, abs=0.01)
    assert steps["GRPO trained step"]["gflop"] == pytest.approx(2 * fwd + bwd, abs=0.01)
    assert steps["supervised step"]["gflop"] == pytest.approx(2 * parts["vae_encode"] + fwd + bwd, abs=0.01)


def test_without_a_gpu_size_the_plan_holds_state_only_and_no_verdict(narrow_spec):
    if torch.cuda.is_available():
        pytest.skip("a visible GPU gives the plan a size")
    cfg = parse_plan_args(["--resolution", "64", "--max_sequence_length", "8", "--num_tokens", "4"])[0]
    plan = plan_for_config(cfg, spec=narrow_spec)
    assert plan.fits is None and plan.row("working").device == 0 and "not estimated" in plan.row("working").note
    phases = {p.name: p.device for p in plan.phases}
    # the state only: the forward/backward phase adds exactly the gradients it creates
    assert phases["supervised: forward/backward"] - phases["supervised: VAE encodes"] == plan.row("grads").device
    measured = plan_for_config(cfg, gpu_memory_gb=2.0, spec=narrow_spec)
    assert measured.row("working").device > 0 and measured.fits is True


def test_the_trainer_hands_the_planned_ddp_setting_to_accelerate(tiny_models, data, tmp_path):
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, tmp_path / "run", 1)))
    assert trainer.accelerator.ddp_handler.to_kwargs() == {"gradient_as_bucket_view": True}
