"""GPU memory of the recommended configurations at full size, from the planner (docs/ARCHITECTURE.md §13). Prints JSON.

    python benchmarks/memory.py [--quick]

For each configuration: the peak per process, the phase it occurs in, whether it fits an 80 GB
GPU and, when not, the flags that make it fit; and the bytes held per trainable parameter beyond
the frozen base model for supervised, GRPO and NFT runs with EMA off, on the device or on the CPU
(defaults otherwise: fp32 AdamW, bf16 RL copies). ``--quick`` plans the CPU proxy model instead.
The same numbers come from ``python -m train.plan`` with each configuration's flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
COMMON = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--resolution", "512", "--train_batch_size", "1"]
CONFIGS = {
    "NFT + EMA, recommended (1 GPU)": (COMMON + ["--use_rl", "--rl_method", "nft", "--use_ema", "--ema_device", "cpu",
                                                 "--use_8bit_adam"], 1),
    "NFT + EMA, recommended (8 GPUs, DDP)": (COMMON + ["--use_rl", "--rl_method", "nft", "--use_ema", "--ema_device",
                                                       "cpu", "--use_8bit_adam"], 8),
    "GRPO + EMA, recommended (8 GPUs, DDP)": (COMMON + ["--use_rl", "--rl_method", "grpo", "--use_ema", "--ema_device",
                                                        "cpu", "--use_8bit_adam"], 8),
    "supervised, examples/train_supervised.sh (8 GPUs, DDP)": (COMMON + ["--gradient_accumulation_steps", "4",
                                                                         "--use_ema", "--ema_device", "cpu"], 8),
    "NFT + EMA with defaults (fp32 AdamW, EMA on the GPU)": (COMMON + ["--use_rl", "--rl_method", "nft",
                                                                       "--use_ema"], 1),
}


def _cfg(argv):
    from train.plan import parse_plan_args

    return parse_plan_args(argv)[0]


def plan_row(argv, processes: int, spec=None, bucket_view=None) -> dict:
    from train.plan import plan_for_config

    plan = plan_for_config(_cfg(argv), processes, 80.0, spec=spec, ddp_bucket_view=bucket_view)
    return {"flags": " ".join(argv), "processes": processes, "peak_gib": round(plan.peak.device / GiB, 2),
            "peak_phase": plan.peak.name, "usable_gib": round(plan.usable / GiB, 2), "fits_80gb": plan.fits,
            "fits_with": [" ".join(s) for s in plan.suggestions], "advice": plan.advice,
            "host_gib": round(sum(r.host for r in plan.rows if r.key not in ("text_encoders",)) / GiB, 2)}


def bytes_per_param(spec=None, methods=("supervised", "grpo", "nft")) -> dict:
    """Device bytes per trainable parameter beyond the frozen base (and the EMA's host bytes), by run kind."""
    from train.plan import plan_for_config

    out = {}
    for method in methods:
        rl = [] if method == "supervised" else ["--use_rl", "--rl_method", method, "--rl_warmup_steps", "0"]
        for ema, flags in (("no_ema", []), ("ema_on_device", ["--use_ema"]),
                           ("ema_on_cpu", ["--use_ema", "--ema_device", "cpu"])):
            plan = plan_for_config(_cfg(COMMON + rl + flags), 1, 80.0, spec=spec, suggest=False)
            held = sum(plan.row(k).device for k in ("adapter", "grads", "optimizer", "ema", "rl_ref", "nft_old"))
            out.setdefault(method, {})[ema] = round(held / plan.trainable, 3)
            if ema == "ema_on_cpu":
                out[method]["ema_on_cpu_host"] = round(plan.row("ema").host / plan.trainable, 3)
    return out


def run(quick: bool = False) -> dict:
    spec = None
    if quick:
        from benchmarks.proxy import spec as proxy_spec

        spec = proxy_spec()
    rows = {}
    for name, (argv, processes) in CONFIGS.items():
        if quick and name != "NFT + EMA, recommended (1 GPU)":
            continue
        rows[name] = plan_row(argv + (["--rl_warmup_steps", "0"] if quick else []), processes, spec)
        if processes > 1:  # the trainer's DDP keeps gradients as bucket views; what accelerate's default costs
            rows[name + ", accelerate's default DDP (no bucket views)"] = plan_row(argv, processes, spec,
                                                                                  bucket_view=False)
    from train.plan_model import ModelSpec

    return {"model": (spec or ModelSpec.full()).source, "gpu_memory_gb": 80.0, "configurations": rows,
            "bytes_per_trainable_param": bytes_per_param(spec, ("nft",) if quick else ("supervised", "grpo", "nft"))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="plan the CPU proxy model (seconds)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
