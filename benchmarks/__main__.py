"""Run every benchmark: ``python -m benchmarks [--quick] [--only flops,memory,train_step,reward_throughput]``.

Each benchmark's figures go to ``benchmarks/results/<name>.json`` with the machine, date and
commit they were measured on, and the table in ``benchmarks/README.md`` (between its ``results``
markers) is rebuilt from every results file, so a partial run keeps the other figures with their
own stamps. ``--quick`` runs each benchmark in seconds on small settings (for tests; its figures
are not meaningful) and is meant to write elsewhere (``--out``, ``--readme``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, REPO, stamp, write_json  # noqa: E402
from benchmarks.report import render_table, update_readme  # noqa: E402

NAMES = ("flops", "memory", "train_step", "reward_throughput")


def run_one(name: str, quick: bool):
    if name == "flops":
        from benchmarks.flops import run
        return run(quick)
    if name == "memory":
        from benchmarks.memory import run
        return run(quick)
    if name == "train_step":
        from benchmarks.train_step import run
        return run(quick)
    from benchmarks.reward_throughput import run
    if quick:
        return run("style,background,ocr", images=6, size=96, chunk_size=6, repeats=1)
    return run("style,background,ocr")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings, seconds per benchmark (for tests)")
    parser.add_argument("--only", default=",".join(NAMES),
                        help=f"comma-separated subset of {', '.join(NAMES)} ('' rebuilds the table only)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results/*.json files")
    parser.add_argument("--readme", type=Path, default=REPO / "benchmarks" / "README.md",
                        help="README whose results table is rebuilt")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    for name in names:
        t0 = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        results = run_one(name, args.quick)
        payload = {"benchmark": name, **stamp(), "quick": args.quick,
                   "wall_s": round(time.perf_counter() - t0, 1), "results": results}
        path = write_json(args.out / f"{name}.json", payload)
        print(f"[benchmarks] {name}: {payload['wall_s']} s -> {path}", file=sys.stderr, flush=True)
    payloads = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    update_readme(args.readme, render_table(payloads))
    print(render_table(payloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
