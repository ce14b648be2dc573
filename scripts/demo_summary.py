"""Summary of a ``scripts/demo.sh`` run: held-out rewards per phase, where everything is, what to run next.

    python scripts/demo_summary.py --demo_dir runs/demo

Reads what the demo's runs wrote — ``{warmup,grpo,nft}/``, each RL run's ``eval_rewards.jsonl``
(held-out reward with deterministic samples at RL start, every ``--rl_eval_every`` RL epochs and
at the end), ``eval/metrics.json`` (``train.evaluate``) and ``timings.txt`` — prints a short
summary and writes it to ``DEMO_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = (("grpo", "GRPO"), ("nft", "NFT"))


class SummaryError(RuntimeError):
    """A file the summary needs is missing or malformed."""


def read_eval_curve(run: Path) -> list[dict]:
    """The rows of ``run/eval_rewards.jsonl`` (one per held-out evaluation), in the order they were written."""
    path = run / "eval_rewards.jsonl"
    if not path.is_file():
        raise SummaryError(f"{path} is missing: the RL run wrote no held-out evaluation (is --rl_eval_data set?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            value = float(row["eval/reward_mean"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SummaryError(f"{path} line {n}: not a held-out evaluation row ({exc})") from None
        if not math.isfinite(value):
            raise SummaryError(f"{path} line {n}: eval/reward_mean is {value} (every held-out reward failed)")
        rows.append(row)
    if len(rows) < 2:
        raise SummaryError(f"{path} has {len(rows)} evaluation(s); an RL run writes one at its start and one at its end")
    return rows


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((int(p.name.split("-")[1]), p) for p in run.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    return found[-1][1] if found else None


def read_timings(demo: Path) -> dict[str, int]:
    path = demo / "timings.txt"
    out: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, seconds = line.partition(" ")
            if seconds.strip().isdigit():
                out[name] = int(seconds)
    return out


def summarize(demo: Path) -> dict:
    """Everything the summary says, as a dict (also written to ``summary.json``)."""
    warm_ckpt = latest_checkpoint(demo / "warmup")
    if warm_ckpt is None:
        raise SummaryError(f"{demo / 'warmup'} holds no checkpoint: the supervised warm-up did not finish")
    timings = read_timings(demo)
    phases: dict[str, dict] = {}
    for key, name in PHASES:
        rows = read_eval_curve(demo / key)
        ckpt = latest_checkpoint(demo / key)
        phases[key] = {
            "name": name, "steps": int(rows[-1]["global_step"]), "rl_epochs": int(rows[-1]["rl_epoch"]),
            "start": rows[0]["eval/reward_mean"], "end": rows[-1]["eval/reward_mean"],
            "curve": [[int(r["global_step"]), r["eval/reward_mean"]] for r in rows],
            "checkpoint": str(ckpt) if ckpt else None, "seconds": timings.get(key),
        }
    # Both RL runs start from the warm-up weights and evaluate them on the same fixed noise first.
    warmup = {"name": "warm-up", "steps": int(warm_ckpt.name.split("-")[1]), "heldout_reward": phases["grpo"]["start"],
              "checkpoint": str(warm_ckpt), "seconds": timings.get("warmup")}
    report = None
    metrics_path = demo / "eval" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        report = {"path": str(demo / "eval" / "report.html"), "num_samples": metrics["num_samples"],
                  "mean_reward": {c["label"]: c["mean"]["reward"] for c in metrics["checkpoints"]}}
    return {"demo_dir": str(demo), "phases": {"warmup": warmup, **phases}, "report": report, "timings": timings}


def real_weight_commands() -> list[str]:
    """The same job on real FLUX.1-Fill-dev + SigLIP weights (8 GPUs), with the example scripts."""
    urls = ",".join(f"http://127.0.0.1:{8000 + i}" for i in range(8))
    return [
        "export FLUX=/models/FLUX.1-Fill-dev SIGLIP=/models/siglip-so400m-patch14-384 "
        "DATA=data/train.jsonl EVAL_DATA=data/heldout.jsonl",
        "NUM_GPUS=8 bash examples/serve_reward.sh   # in another terminal: one reward server per GPU, ports 8000-8007",
        f"export REWARD_URLS={urls}",
        "OUT=runs/sft bash examples/train_supervised.sh",
        "OUT=runs/grpo INIT_ADAPTER=runs/sft/checkpoint-10000/ip-adapter.bin bash examples/train_grpo.sh",
        "OUT=runs/nft INIT_ADAPTER=runs/sft/checkpoint-10000/ip-adapter.bin bash examples/train_nft.sh",
        "OUT=runs/grpo-released CALLIGRAPHER_BIN=calligrapher.bin bash examples/train_grpo_from_calligrapher_bin.sh"
        "   # RL straight from the released adapter",
        "python -m train.evaluate --pretrained_model_name_or_path $FLUX --siglip_path $SIGLIP --no_adapter "
        "--ip_adapter_path runs/sft/checkpoint-10000 --label sft --ip_adapter_path runs/grpo/checkpoint-2000@ema "
        "--label grpo --ip_adapter_path runs/nft/checkpoint-1000@ema --label nft "
        "--data $EVAL_DATA --output_dir runs/eval",
    ]


def app_command(summary: dict) -> list[str] | None:
    """``python -m train.app`` on the demo's checkpoints, or None when the app is absent.

    The flags are the app's own (``python -m train.app --help``); the test suite parses this command
    with the app's parser, so importing the web stack here (seconds) is not needed.
    """
    if not (REPO / "train" / "app.py").is_file():
        return None
    demo = Path(summary["demo_dir"])
    argv = ["--pretrained_model_name_or_path", str(demo / "models" / "flux-fill"),
            "--siglip_path", str(demo / "models" / "siglip"),
            "--ip_adapter_path", summary["phases"]["warmup"]["checkpoint"], "--label", "warm-up"]
    for key, name in PHASES:
        if summary["phases"][key]["checkpoint"]:
            argv += ["--ip_adapter_path", summary["phases"][key]["checkpoint"] + "@ema", "--label", f"{name} (EMA)"]
    argv += ["--examples", str(demo / "heldout" / "data.jsonl"), "--resolution", "64", "--reference_strip_height",
             "16", "--max_sequence_length", "32", "--num_inference_steps", "4", "--guidance_scale", "3.5",
             "--scorers", "contrast"]
    return ["python", "-m", "train.app", *argv]


def format_summary(s: dict, app: list[str] | None) -> str:
    p = s["phases"]
    lines = ["", "=" * 78, "Demo summary: tiny FLUX.1-Fill + SigLIP on CPU, RL on the `contrast` reward",
             "=" * 78, "Held-out reward (contrast, deterministic samples on fixed noise; eval_rewards.jsonl):"]
    warm = p["warmup"]
    lines.append(f"  {'warm-up':8} {warm['steps']:3d} supervised steps              held-out reward "
                 f"{warm['heldout_reward']:.4f}{_secs(warm['seconds'])}")
    for key, _ in PHASES:
        ph = p[key]
        delta = ph["end"] - ph["start"]
        word = "rose" if delta > 0 else "did not rise"
        lines.append(f"  {ph['name']:8} {ph['steps']:3d} RL steps ({ph['rl_epochs']:2d} RL epochs)  start {ph['start']:.4f}"
                     f" -> end {ph['end']:.4f}  ({delta:+.4f}, {word}){_secs(ph['seconds'])}")
        if len(ph["curve"]) > 2:
            lines.append("           at steps " + ", ".join(f"{step}: {value:.4f}" for step, value in ph["curve"]))
    if s["report"]:
        r = s["report"]
        means = ", ".join(f"{k} {v:.4f}" for k, v in r["mean_reward"].items() if v is not None)
        lines += ["", f"Report ({r['num_samples']} held-out samples, train.evaluate, FluxFillPipeline's sampling): {means}",
                  "  (it samples the masked image's VAE posterior like the pipeline; the tiny random VAE's posterior",
                  "   is mostly noise, so its columns are noisier than the deterministic curves above)"]
    d = s["demo_dir"]
    lines += ["", "Where things are:",
              f"  TensorBoard:  tensorboard --logdir {d}   (warmup/logs, grpo/logs, nft/logs)",
              f"  line logs:    {d}/{{warmup,grpo,nft}}/train_log.txt, step logs in {d}/logs/",
              f"  checkpoints:  {warm['checkpoint']}, {p['grpo']['checkpoint']}, {p['nft']['checkpoint']}",
              f"  held-out:     {d}/grpo/eval_rewards.jsonl, {d}/nft/eval_rewards.jsonl"]
    if s["report"]:
        lines.append(f"  report:       {s['report']['path']}")
    lines += ["", "The same with real FLUX.1-Fill-dev and SigLIP weights (see RL_TRAINING_GUIDE.md):"]
    lines += [f"  {c}" for c in real_weight_commands()]
    if app:
        lines += ["", "Try the checkpoints in the browser:", "  " + shlex.join(app)]
    return "\n".join(lines) + "\n"


def _secs(seconds) -> str:
    return f"  [{seconds} s]" if seconds is not None else ""


def write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", required=True, help="the demo's DEMO_DIR (default of scripts/demo.sh: runs/demo)")
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir)
    try:
        summary = summarize(demo)
    except (SummaryError, OSError, ValueError, KeyError) as exc:
        print(f"error: --demo_dir {demo}: {exc}", file=sys.stderr)
        return 2
    app = app_command(summary)
    summary["app_command"] = app
    write_json(demo / "summary.json", summary)
    print(format_summary(summary, app), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
