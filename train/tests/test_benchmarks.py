"""``python -m benchmarks``: the quick mode writes every results file and the README table with its stamps;
the GPU-only mode exits cleanly on a CPU; the table marks targets; the README keeps its own text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.report import END, START, render_table, update_readme  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_every_result_and_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro kept\n\n{START}\nold table\n{END}\n\nafter kept\n")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--readme", str(readme)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    payloads = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(payloads) == {"flops", "memory", "train_step", "reward_throughput"}
    for p in payloads.values():
        assert p["quick"] is True and p["date"] and p["commit"] != "unknown" and "CPU" in p["machine"]
    # bytes per trainable parameter walked from the live tensors of each run on the proxy: adapter 4 + gradients 4
    # + AdamW m and v 8, GRPO + 2 (bf16 reference), NFT + 4 (reference and old), EMA 4 (device or host)
    train = payloads["train_step"]["results"]
    assert train["supervised"]["bytes_per_trainable_param"] == {"no_ema": 16, "ema_on_cpu": 16, "ema_on_cpu_host": 4,
                                                                "ema_on_device": 20}
    assert train["grpo"]["bytes_per_trainable_param"]["ema_on_device"] == 22
    assert train["nft"]["bytes_per_trainable_param"]["ema_on_device"] == 24
    assert train["supervised"]["text_encoder_calls_during_training"] == 0
    planned = payloads["memory"]["results"]["bytes_per_trainable_param"]["nft"]
    assert planned == {"no_ema": 20, "ema_on_device": 24, "ema_on_cpu": 20, "ema_on_cpu_host": 4}
    assert [r["scorer"] for r in payloads["reward_throughput"]["results"]] == ["style", "background", "ocr"]
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro kept\n") and text.rstrip().endswith("after kept")
    assert "old table" not in text and text.count(START) == 1
    table = text[text.index(START):text.index(END)]
    stamp = f"{os.cpu_count()}-core CPU (quick) | {payloads['flops']['date']} | {payloads['flops']['commit']} |"
    for figure in ("Supervised step ÷ forward + backward", "`--latent_cache off`", "at accumulation 1", "GRPO rollout",
                   "NFT trained step", "Text-encoder calls", "Reward `style`", "OCR time split", "Transformer share of a supervised step", "Peak GPU memory"):
        line = next((line for line in table.splitlines() if figure in line), None)
        assert line is not None, figure
        assert line.endswith(stamp), line


def test_full_size_on_a_cpu_says_it_needs_a_gpu_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the full-size benchmark would run")
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--size", "full"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs a CUDA GPU" in json.loads(proc.stdout)["skipped"]


@pytest.mark.slow
def test_full_size_step_timing_runs_on_the_proxy(tmp_path):
    """The GPU benchmark's code path, on the CPU proxy model (MFU needs a known GPU: None here)."""
    from benchmarks import proxy
    from benchmarks.full_size import measure

    out = measure(proxy.spec(), proxy.CANVAS, proxy.TEXT_TOKENS, proxy.STYLE_TOKENS, device="cpu", repeats=1)
    for step in ("supervised", "grpo", "nft"):
        assert out[step]["seconds_per_optimizer_step"] > 0 and out[step]["model_gflop"] > 0
        assert out[step]["mfu"] is None
    # NFT's three forwards and one backward cost more model FLOPs than GRPO's two forwards and one backward
    assert out["nft"]["model_gflop"] > out["grpo"]["model_gflop"] > out["supervised"]["model_gflop"] * 0.9


def _payload(**train):
    results = {"supervised": {"overhead": 1.30, "vae_encodes_share_of_step": 0.0, "optimizer_step_share": 0.1,
                              "text_encoder_calls_during_training": 0, "epochs_trained": 2.0,
                              "bytes_per_trainable_param": {"no_ema": 16, "ema_on_cpu": 16, "ema_on_cpu_host": 4,
                                                            "ema_on_device": 20}}}
    for method in ("grpo", "nft"):
        results[method] = {"train": {"overhead": 1.25, "pure_model": "x"},
                           "rollout": {"overhead": 1.16, "sampling_loop_overhead": 1.0, "steps": 20},
                           "bytes_per_trainable_param": {"no_ema": 18, "ema_on_cpu": 18, "ema_on_cpu_host": 4,
                                                         "ema_on_device": 22}}
    results.update(train)
    return {"benchmark": "train_step", "machine": "2-core CPU (Some CPU), torch 2.13.0", "date": "2026-01-02",
            "commit": "abc1234", "quick": False, "results": results}


def test_table_marks_each_target_and_stamps_each_figure():
    table = render_table([_payload()])
    lines = table.splitlines()
    sup = next(line for line in lines if line.startswith("| Supervised step"))
    assert "1.30 ❌" in sup and sup.endswith("| ≤ 1.25 | 2-core CPU | 2026-01-02 | abc1234 |")
    grpo = next(line for line in lines if line.startswith("| GRPO trained step"))
    assert "1.25 ✅" in grpo  # the target is inclusive
    rollout = next(line for line in lines if line.startswith("| NFT rollout"))
    assert "1.16 ❌" in rollout and "sampling loop alone 1.00" in rollout
    assert "Machines: 2-core CPU (Some CPU), torch 2.13.0." in table


def test_readme_update_keeps_the_text_around_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    update_readme(readme, "| new |")
    assert readme.read_text() == f"intro\n{START}\n| new |\n{END}\noutro\n"
    bare = tmp_path / "bare.md"
    bare.write_text("# Title\n")
    update_readme(bare, "| t |")
    assert bare.read_text() == f"# Title\n\n{START}\n| t |\n{END}\n"
    assert oct(bare.stat().st_mode & 0o777) == "0o644"


@pytest.mark.slow
def test_profile_traces_show_the_vae_only_without_the_latent_cache(tmp_path):
    """``benchmarks/train_step.py --profile``: steady-state supervised steps run no convolution (the VAE)
    once every sample's latents are cached, and do with ``--latent_cache off``."""
    from benchmarks.train_step import profile_supervised

    out = profile_supervised(tmp_path, steps=1)
    names = {}
    for cache, files in out["profiles"].items():
        trace = json.loads(Path(files["trace"]).read_text())
        names[cache] = {e.get("name", "") for e in trace["traceEvents"]}
        assert "aten::mm" in Path(files["table"]).read_text()
    assert not any("convolution" in n for n in names["host"])
    assert any("convolution" in n for n in names["off"])
