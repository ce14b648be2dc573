"""FLOPs of every part of a step at full size, and the proxy's FLOP shares beside them. Prints JSON.

    python benchmarks/flops.py [--quick]

Full size: FLUX.1-Fill-dev + SigLIP-so400m dimensions on fake tensors (:mod:`train.flops`), with
512 text tokens and 128 style tokens, at 512 x 512 without the strip (docs/ARCHITECTURE.md §13's ~21.5 TFLOP
yardstick for the base transformer), with a 128 px strip (a wide text reference) and with a
512 px strip (the tallest the official rule allows). ``proxy`` gives the transformer's share of a
supervised step and of a rollout for the CPU proxy model and for full size. ``--quick`` counts the
proxy only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(quick: bool = False) -> dict:
    from benchmarks import proxy
    from train.flops import flop_report, transformer_share
    from train.plan_model import ModelSpec

    out = {}
    if not quick:
        full = ModelSpec.full()
        for strip in (0, 128, 512):
            out[f"full_512_strip_{strip}"] = flop_report(full, (512 + strip, 512), 512, 128, 50)
    p = flop_report(proxy.spec(), proxy.CANVAS, proxy.TEXT_TOKENS, proxy.STYLE_TOKENS, 50)
    out["proxy"] = p
    shares = {"proxy": {"supervised_step": round(transformer_share(p, "supervised step"), 4),
                        "rollout_50_steps": round(transformer_share(p, "rollout (50 steps)"), 4)}}
    if not quick:
        f = out["full_512_strip_128"]
        shares["full_512_strip_128"] = {"supervised_step": round(transformer_share(f, "supervised step"), 4),
                                        "rollout_50_steps": round(transformer_share(f, "rollout (50 steps)"), 4)}
    out["transformer_share"] = shares
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the proxy model only")
    print(json.dumps(run(parser.parse_args(argv).quick), indent=1))


if __name__ == "__main__":
    main()
