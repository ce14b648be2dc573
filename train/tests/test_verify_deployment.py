"""``verify_deployment.py`` (docs/ARCHITECTURE.md §11): passes on a complete tiny set-up, fails naming each problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train import verify
from train.data.synthesize import synthesize
from train.models.calligrapher import Calligrapher
from train.models.checkpoint_io import save_adapter_file
from train.rewards.registry import build_scorers
from train.reward_server import create_app
from train.tests.reward_helpers import ServerThread, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reward_server():
    with ServerThread(create_app(build_scorers("background"))) as server:
        yield server.url


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("data"), 2, resolution=64, seed=0, layout="jsonl")


@pytest.fixture(scope="module")
def adapter_file(tiny_models, tmp_path_factory):
    model = Calligrapher.from_pretrained(tiny_models["flux"], tiny_models["siglip"], num_tokens=8)
    path = tmp_path_factory.mktemp("run") / "checkpoint-1" / "ip-adapter.bin"
    save_adapter_file(model.adapter, path, layout="official")
    return path


def _run(argv) -> tuple[int, str, dict[str, list[verify.Check]]]:
    """``(exit code, printed table, rows by check name)``."""
    rows = verify.collect([str(a) for a in argv])
    by_name = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    return verify.exit_code(rows), verify.format_table(rows), by_name


def _flux_copy(tiny_models, tmp_path) -> Path:
    copy = tmp_path / "flux-fill"
    shutil.copytree(tiny_models["flux"], copy)
    return copy


def test_passes_on_the_tiny_model_folder(tiny_models, data_file, reward_server, adapter_file, tmp_path):
    argv = ["--pretrained_model_name_or_path", tiny_models["flux"], "--siglip_path", tiny_models["siglip"],
            "--train_data_json", data_file, "--reward_server_url", reward_server, "--reward_weights", "background=1",
            "--output_dir", tmp_path / "out", "--ip_adapter_path", adapter_file.parent, "--num_tokens", "8",
            "--learning_rate", "1e-4"]
    code, text, rows = _run(argv)
    assert code == 0, text
    for name in ("python", "packages", "model folder", "FLUX.1-Fill model", "SigLIP", "adapter weights",
                 "training data", "reward server", "output dir", "free disk"):
        assert all(r.status == "ok" for r in rows[name]), (name, text)
    assert "❌" not in text and "✅ model folder" in text
    assert "2 valid records" in text and "scorers background" in text
    assert rows["training flags"][0].status == "ok" and "--learning_rate" in rows["training flags"][0].detail
    assert not (tmp_path / "out").exists()  # checking does not create it
    # On a machine without CUDA the GPU row is a warning, which does not fail the run.
    import torch

    assert rows["torch / GPU"][0].status == ("ok" if torch.cuda.is_available() else "warn")
    assert "\nready: " in text and "checked: python, " in text


def test_fails_on_a_model_folder_without_vae(tiny_models, tmp_path):
    flux = _flux_copy(tiny_models, tmp_path)
    shutil.rmtree(flux / "vae")
    code, text, rows = _run(["--pretrained_model_name_or_path", flux])
    assert code == 1
    assert rows["model folder"][0].status == "fail"
    assert "missing vae/" in text and "❌ model folder" in text and "FLUX.1-Fill-dev" in text


def test_fails_on_plain_flux_dev_and_missing_weights(tiny_models, tmp_path):
    flux = _flux_copy(tiny_models, tmp_path)
    cfg = json.loads((flux / "transformer" / "config.json").read_text())
    (flux / "transformer" / "config.json").write_text(json.dumps(dict(cfg, in_channels=64)))
    for weights in (flux / "vae").glob("*.safetensors"):
        weights.unlink()
    code, text, _ = _run(["--pretrained_model_name_or_path", flux])
    assert code == 1
    assert "in_channels is 64, FLUX.1-Fill has 384" in text
    assert "no .safetensors/.bin weights in vae/" in text


def test_fails_on_a_bad_data_file(tmp_path, data_file):
    bad = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()
    broken = dict(json.loads(lines[0]), source=str(tmp_path / "nope.png"))
    empty_text = dict(json.loads(lines[1]), text="  ")
    for r in (broken, empty_text):  # the images are relative to the original file
        for key in ("mask", "ref", "source"):
            if r.get(key) and not Path(r[key]).is_absolute():
                r[key] = str(data_file.parent / r[key])
    bad.write_text("\n".join(json.dumps(r) for r in (broken, empty_text)) + "\n")
    code, text, rows = _run(["--train_data_json", bad])
    assert code == 1
    detail = rows["training data"][0].detail
    assert "source file not found" in detail and "nope.png" in detail
    assert "empty text" in detail and "line 2" in detail


def test_fails_on_an_unreachable_reward_server():
    url = f"http://127.0.0.1:{free_port()}"
    code, text, rows = _run(["--reward_server_url", url])
    assert code == 1
    assert rows["reward server"][0].status == "fail"
    assert f"{url} unreachable" in text and "python -m train.reward_server" in text


def test_fails_when_the_server_lacks_a_weighted_scorer(reward_server):
    code, text, _ = _run(["--reward_server_url", reward_server, "--reward_weights", "ocr=0.7,background=0.3"])
    assert code == 1
    assert "--reward_weights needs ocr" in text


def test_server_must_serve_trainings_default_weights(reward_server):
    """Without --reward_weights the run uses training's default (ocr, style, background): a server with
    only 'background' cannot serve it."""
    code, text, rows = _run(["--reward_server_url", reward_server])
    assert code == 1
    (row,) = rows["reward server"]
    assert row.status == "fail"
    assert "needs ocr, style" in row.detail and "training's default ocr=0.7,style=0.2,background=0.1" in row.detail
    code, _, rows = _run(["--reward_server_url", reward_server, "--reward_weights", "background=1,ocr=0"])
    assert code == 0 and rows["reward server"][0].status == "ok"  # a zero weight needs no scorer


def test_training_flag_rules_are_training_own():
    code, text, rows = _run(["--resolution", "50", "--output_dir", "/tmp/verify-never-created"])
    assert code == 1
    assert rows["training flags"][0].status == "fail"
    assert "--resolution 50 must be a positive multiple of 16" in rows["training flags"][0].detail
    code, _, rows = _run(["--use_rl", "--rl_per_prompt_stat_tracking", "--max_train_steps", "2000",
                          "--output_dir", "/tmp/verify-never-created"])
    assert code == 1 and "needs --rl_num_images_per_prompt >= 2" in rows["training flags"][0].detail
    code, _, rows = _run(["--rl_method", "ppo", "--output_dir", "/tmp/verify-never-created"])
    assert code == 1 and "invalid choice: 'ppo'" in rows["training flags"][0].detail
    code, _, rows = _run(["--learnig_rate", "1e-4", "--output_dir", "/tmp/verify-never-created"])
    assert code == 1 and rows["unknown flags"][0].detail.startswith("--learnig_rate")


def test_nothing_checked_is_a_failure():
    code, text, rows = _run([])
    assert code == 1
    assert rows["run"][0].status == "fail" and "nothing about the planned run was checked" in text
    assert "NOT READY" in text and "not checked: model folder, SigLIP, training data, reward server, output dir" in text


def test_in_process_reward_weights_are_checked():
    code, text, rows = _run(["--reward_weights", "ocr=0.7,background=0.3"])
    assert code == 0 and rows["reward scorers"][0].status == "ok", text
    code, text, _ = _run(["--reward_weights", "ocr=0.7,colour=0.3"])
    assert code == 1 and "unknown scorer 'colour'" in text
    code, text, _ = _run(["--reward_weights", "style=1"])
    assert code == 1 and "the style scorer needs SigLIP" in text


def test_output_dir_that_is_a_file_fails(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    code, text, _ = _run(["--output_dir", blocker])
    assert code == 1 and "exists and is not a folder" in text


@pytest.mark.slow
def test_script_exit_status(tmp_path):
    """The repo-root script itself: table on stdout, exit 1 on a failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "verify_deployment.py", "--reward_server_url", url,
                           "--output_dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "❌ reward server" in proc.stdout and "✅ output dir" in proc.stdout and "NOT READY" in proc.stdout


@pytest.mark.slow
def test_memory_plan_row_judges_the_run_against_the_gpu():
    from train.config import parse_args
    from train.verify import check_memory_plan

    cfg = parse_args(["--max_train_steps", "1"])  # full FLUX.1-Fill / so400m dimensions, the defaults
    (row,) = check_memory_plan(cfg)
    assert row.name == "memory plan" and "GiB per process" in row.detail
    import torch

    if not torch.cuda.is_available():
        assert row.status == "skip"
    (small,) = check_memory_plan(cfg, gpu_memory_gb=8)
    assert small.status == "fail" and "does not fit" in small.detail and small.fix.startswith("try ")
    (big,) = check_memory_plan(cfg, gpu_memory_gb=10_000)
    assert big.status == "ok" and "fits" in big.detail
