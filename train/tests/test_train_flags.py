"""Start-up validation: bad flags fail before any model is loaded, one clear line each (docs/ARCHITECTURE.md §2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pathlib import Path

from train.config import build_parser, parse_args, validate
from train.train import main


@pytest.fixture()
def good_args(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    return ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--train_data_json", str(data), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]


def _errors(capsys, argv):
    assert main(argv) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_defaults_are_the_contract():
    cfg = parse_args(["--max_train_steps", "1"])
    assert (cfg.resolution, cfg.train_batch_size, cfg.learning_rate, cfg.checkpointing_steps) == (512, 1, 1e-4, 500)
    assert (cfg.max_grad_norm, cfg.num_tokens, cfg.ema_decay, cfg.rl_warmup_steps) == (1.0, 128, 0.9999, 1000)
    assert (cfg.rl_method, cfg.rl_num_inference_steps, cfg.rl_guidance_scale, cfg.rl_adv_clip_max) == ("grpo", 50, 30.0, 5.0)
    assert (cfg.rl_grpo_clip_range, cfg.rl_noise_level, cfg.nft_beta, cfg.nft_adv_mode) == (0.2, 0.7, 0.5, "normal")
    assert cfg.rl_kl_beta == 0.1 and parse_args(["--rl_method", "nft"]).rl_kl_beta == 0.01
    assert parse_args(["--rl_method", "nft", "--rl_kl_beta", "0.5"]).rl_kl_beta == 0.5
    assert (cfg.report_to, cfg.ema_device, cfg.mixed_precision, cfg.nft_decay_type) == ("tensorboard", "same", "no", 0)


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for flag in ("--model_type", "--use_8bit_adam", "--ema_device", "--rl_per_prompt_stat_tracking",
                 "--nft_decay_type", "--reward_server_url", "--reward_weights", "--offload_text_encoder_two"):
        assert flag in text


def test_unknown_model_type(capsys, good_args):
    assert _errors(capsys, good_args + ["--model_type", "sd3"]) == [
        "error: --model_type 'sd3' is not supported; only 'flux' (FLUX.1-Fill-dev) exists"]


def test_per_prompt_tracking_with_one_image(capsys, good_args):
    errs = _errors(capsys, good_args + ["--rl_per_prompt_stat_tracking"])
    assert any("--rl_per_prompt_stat_tracking needs --rl_num_images_per_prompt >= 2" in e and "advantage" in e
               for e in errs)


def test_missing_paths_reported_together(capsys, tmp_path):
    errs = _errors(capsys, ["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--siglip_path",
                            str(tmp_path / "nosig"), "--train_data_json", str(tmp_path / "no.jsonl"),
                            "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1"])
    assert f"error: --pretrained_model_name_or_path {tmp_path / 'nope'} is not a folder" in errs
    assert f"error: --siglip_path {tmp_path / 'nosig'} is not a folder" in errs
    assert f"error: --train_data_json {tmp_path / 'no.jsonl'} does not exist" in errs


def test_required_and_ranges(capsys, good_args):
    errs = _errors(capsys, good_args + ["--resolution", "500", "--ema_decay", "1.5", "--train_batch_size", "0"])
    assert any("--resolution 500 must be a positive multiple of 16" in e for e in errs)
    assert any("--ema_decay must be in (0, 1)" in e for e in errs)
    assert any("--train_batch_size must be positive" in e for e in errs)
    assert "--output_dir is required" in " ".join(validate(parse_args([])))


def test_8bit_adam_without_cuda(capsys, good_args):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert any("--use_8bit_adam needs a CUDA GPU" in e for e in _errors(capsys, good_args + ["--use_8bit_adam"]))


def test_invalid_rl_combinations_are_all_reported_at_start_up(capsys, good_args):
    argv = [a if a != "1" else "10" for a in good_args] + [
        "--use_rl", "--rl_warmup_steps", "0", "--rl_per_prompt_stat_tracking", "--rl_num_inference_steps", "4",
        "--rl_sde_window_size", "5", "--gradient_accumulation_steps", "2", "--reward_weights", "ocr=x"]
    errors = _errors(capsys, argv)
    joined = "\n".join(errors)
    assert "--rl_per_prompt_stat_tracking needs --rl_num_images_per_prompt >= 2" in joined
    assert "--rl_sde_window_size" in joined
    assert "--rl_num_batches_per_epoch 1 must be a multiple of --gradient_accumulation_steps 2" in joined
    assert "--reward_weights" in joined and "not a number" in joined
    assert len(errors) >= 4


def test_rl_flag_defaults_and_method_specific_checks(capsys, good_args):
    assert parse_args(good_args + ["--use_rl"]).rl_kl_beta == 0.1
    assert parse_args(good_args + ["--use_rl", "--rl_method", "nft"]).rl_kl_beta == 0.01
    assert parse_args(good_args + ["--use_rl", "--rl_kl_beta", "0"]).rl_kl_beta == 0.0
    nft = _errors(capsys, good_args + ["--use_rl", "--rl_method", "nft", "--rl_sde_window_size", "2",
                                       "--rl_warmup_steps", "1"])
    assert any("--rl_sde_window_size applies to GRPO only" in e for e in nft)
    assert any("--rl_warmup_steps 1 leaves no RL step" in e for e in nft)
    grpo = _errors(capsys, good_args + ["--use_rl", "--rl_noise_level", "0", "--rl_warmup_steps", "0"])
    assert any("--rl_noise_level must be positive" in e for e in grpo)


def test_bad_dataset_fails_at_start_up_naming_the_record(tmp_path, good_args, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"source": "missing.png", "mask": "m.png", "text": ""}\n')
    argv = [a if a != good_args[5] else str(data) for a in good_args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "empty text" in err.lower()


def test_cli_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "train.train", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--rl_grpo_clip_range" in res.stdout


def test_incompatible_initial_adapter_is_one_clear_error(tiny_models, tmp_path, capsys):
    import torch

    from train.data.synthesize import synthesize
    from train.tests.train_helpers import tiny_train_args

    data = synthesize(tmp_path / "data", num=2, resolution=64)
    bad = tmp_path / "bad.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}}, bad)
    assert main(tiny_train_args(tiny_models, data, tmp_path / "o", 1, initial_ip_adapter_path=bad)) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "missing keys in 'image_proj'" in err


def test_dataset_smaller_than_a_global_batch(tiny_models, tmp_path, capsys):
    from train.data.synthesize import synthesize
    from train.tests.train_helpers import tiny_train_args

    data = synthesize(tmp_path / "data", num=2, resolution=64)
    assert main(tiny_train_args(tiny_models, data, tmp_path / "o", 1, train_batch_size=4)) == 2
    assert "fewer than one global batch" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["learning_rate", "masked_loss_weight", "guidance_scale", "rl_noise_level",
                                  "rl_grpo_clip_range", "rl_kl_beta", "rl_guidance_scale", "rl_adv_clip_max",
                                  "max_grad_norm"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_must_be_finite(capsys, good_args, flag, value):
    errs = _errors(capsys, good_args + ["--use_rl", "--rl_warmup_steps", "0", f"--{flag}={value}"])
    assert f"error: --{flag} must be a finite number, got {float(value)}" in errs


def test_out_of_range_numbers_are_one_line_each_at_start_up(capsys, good_args):
    errs = _errors(capsys, good_args + ["--adam_beta1", "1.5", "--adam_beta2", "-0.1", "--adam_epsilon", "-1",
                                        "--adam_weight_decay", "-3", "--dataloader_num_workers", "-1",
                                        "--max_grad_norm", "-1", "--lr_warmup_steps", "-2", "--guidance_scale", "-1"])
    assert errs == ["error: --adam_beta1 must be in [0, 1), got 1.5", "error: --adam_beta2 must be in [0, 1), got -0.1",
                    "error: --adam_epsilon must be positive, got -1.0",
                    "error: --adam_weight_decay must be >= 0, got -3.0", "error: --max_grad_norm must be >= 0, got -1.0",
                    "error: --lr_warmup_steps must be >= 0, got -2", "error: --dataloader_num_workers must be >= 0, got -1",
                    "error: --guidance_scale must be >= 0, got -1.0"]


def test_output_and_cache_folders_must_be_writable_folders(capsys, good_args, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    args = [a for a in good_args]
    args[args.index("--output_dir") + 1] = str(a_file)
    errs = _errors(capsys, args + ["--prompt_cache_dir", str(a_file / "cache")])
    assert errs == [f"error: --output_dir {a_file} is a file, not a folder",
                    f"error: --prompt_cache_dir {a_file / 'cache'} cannot be created: {a_file} is a file"]
    assert not (tmp_path / "out").exists()


def test_read_only_output_folder_is_refused(capsys, good_args, tmp_path):
    """A read-only file system (root ignores permission bits, not a read-only mount)."""
    ro = Path("/proc/self")  # procfs refuses new files to everyone
    args = [a for a in good_args]
    args[args.index("--output_dir") + 1] = str(ro / "run")
    errs = _errors(capsys, args)
    assert len(errs) == 1 and errs[0].startswith(f"error: --output_dir {ro / 'run'} is not writable")


def test_rl_flags_need_use_rl_and_method_flags_their_method(capsys, good_args):
    errs = _errors(capsys, good_args + ["--rl_kl_beta", "0.3", "--reward_weights", "contrast=1", "--nft_beta", "0.2"])
    assert errs == ["error: --rl_kl_beta applies only with --use_rl", "error: --nft_beta applies only with --use_rl",
                    "error: --reward_weights applies only with --use_rl"]
    rl = ["--use_rl", "--rl_warmup_steps", "0"]
    assert _errors(capsys, good_args + rl + ["--rl_method", "nft", "--rl_noise_level", "0.5",
                                             "--rl_grpo_clip_range", "1e-4"]) == [
        "error: --rl_grpo_clip_range applies to GRPO only (--rl_method grpo)",
        "error: --rl_noise_level applies to GRPO only (--rl_method grpo)"]
    assert _errors(capsys, good_args + rl + ["--nft_decay_type", "2"]) == [
        "error: --nft_decay_type applies to NFT only (--rl_method nft)"]
    # a value equal to its default is no conflict, nor is the default that follows another flag
    assert not validate(parse_args(good_args + ["--rl_guidance_scale", "7", "--guidance_scale", "7"]))


def test_initial_adapter_may_be_a_checkpoint_folder(tiny_models, tmp_path, capsys):
    from train.data.synthesize import synthesize
    from train.tests.train_helpers import adapter_weights, assert_weights_equal, tiny_train_args
    from train.trainer import Trainer

    data = synthesize(tmp_path / "d", num=2, resolution=64, seed=0)
    assert main(tiny_train_args(tiny_models, data, tmp_path / "first", 1, use_ema=True, ema_decay=0.5)) == 0
    folder = tmp_path / "first" / "checkpoint-1"
    for spec, name in ((folder, "ip-adapter.bin"), (f"{folder}@ema", "ip-adapter-ema.bin")):
        trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, tmp_path / f"from-{name}", 1,
                                                     initial_ip_adapter_path=spec)))
        trainer.setup()
        state = trainer.model.adapter.state_dict()
        expected = adapter_weights(folder / name)
        assert_weights_equal({k: state[k].float() for k in expected}, expected)
        trainer.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    errs = _errors(capsys, tiny_train_args(tiny_models, data, tmp_path / "x", 1, initial_ip_adapter_path=empty))
    assert errs == [f"error: --initial_ip_adapter_path: {empty} has no ip-adapter.bin; pass a checkpoint-N folder "
                    "or a weight file"]
