"""Mutation testing: does each test suite notice when the code it guards is broken?

Each mutant is one exact edit (file, original snippet, replacement) to a copy of the working tree
under a temporary folder; the live tree is never touched. A mutant is *killed* when its tests fail,
*survives* when they pass. ``equivalent`` marks a mutant that cannot change behaviour (with the
reason); it is run and listed but left out of the score.

    python scripts/mutation.py                      # every module (use scripts/mutation.sh: nice'd)
    python scripts/mutation.py -m checkpointing -m ema
    python scripts/mutation.py --list               # the mutants, nothing run
    python scripts/mutation.py -k flow_matching#3   # one mutant by id (with -m: those matching both)

The mutants and the tests of each module are listed in ``scripts/mutants.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutants import MUTANTS, TESTS, Mutant  # scripts/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


# ---------------------------------------------------------------------------- running
def copy_tree(dest: Path) -> Path:
    """The working tree as it is now (tracked and untracked, not ignored files), without .git or caches."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_tests(tree: Path, tests, timeout: float) -> tuple[str, float]:
    """``"pass"``, ``"fail"`` or ``"timeout"``, and seconds taken."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode of a mutant can survive its restore
    cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    # Own process group: a hung run is killed with every server or worker process its tests started.
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - t0
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal error, usage error, no tests collected
        return f"error (pytest exit {proc.returncode}): {out[-600:]}", time.monotonic() - t0
    return ("pass" if proc.returncode == 0 else "fail"), time.monotonic() - t0


def check(tree: Path, m: Mutant) -> str:
    """The file's text; raises unless the original snippet occurs exactly once."""
    text = (tree / m.path).read_text()
    count = text.count(m.original)
    if count != 1:
        raise ValueError(f"{m.id}: the original snippet occurs {count} times in {m.path}, not once: {m.original!r}")
    return text


def apply(tree: Path, m: Mutant) -> str:
    """Apply ``m`` inside ``tree``; returns the original file text for the restore."""
    text = check(tree, m)
    (tree / m.path).write_text(text.replace(m.original, m.replacement))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--module", action="append", choices=sorted(TESTS), help="only these modules")
    parser.add_argument("-k", "--id", action="append", help="only these mutant ids (e.g. ema#3)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for a baseline test run; a mutant "
                        "gets 3x its baseline time plus a minute (a mutant that hangs counts as killed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="where to put the copy (default: a new temporary folder)")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTANTS if (not args.module or m.module in args.module) and (not args.id or m.id in args.id)]
    if not chosen:  # -m and -k together select the mutants that match both
        parser.error("no mutant matches " + " and ".join(f"{flag} {' '.join(v)}" for flag, v in
                                                        (("-m", args.module), ("-k", args.id)) if v))
    if args.list:
        for m in chosen:
            check(REPO, m)  # read-only
            print(f"{m.id:18} {m.path}: {m.original!r} -> {m.replacement!r}"
                  + (f"  [equivalent: {m.equivalent}]" if m.equivalent else ""))
        return 0
    work = Path(tempfile.mkdtemp(prefix="mutation-", dir=args.workdir))
    tree = copy_tree(work / "repo")
    for m in chosen:  # every snippet must match exactly once before anything runs
        check(tree, m)
    print(f"copy of the working tree: {tree}", flush=True)

    baseline, limit = {}, {}
    for tests in dict.fromkeys(m.tests for m in chosen):
        baseline[tests], secs = run_tests(tree, tests, args.timeout)
        limit[tests] = 3 * secs + 60
        print(f"baseline {' '.join(tests)}: {baseline[tests]} ({secs:.0f}s)", flush=True)
    results = []
    for m in chosen:
        if baseline[m.tests] != "pass":
            outcome, secs = "skipped (tests fail without the mutant)", 0.0
        else:
            original = apply(tree, m)
            try:
                outcome, secs = run_tests(tree, m.tests, limit[m.tests])
            finally:
                (tree / m.path).write_text(original)
            outcome = {"fail": "killed", "timeout": "killed (timeout)", "pass": "SURVIVED"}.get(outcome, outcome)
        if outcome == "SURVIVED" and m.equivalent:
            outcome = "equivalent"
        results.append({"id": m.id, "module": m.module, "path": m.path, "original": m.original,
                        "replacement": m.replacement, "outcome": outcome, "seconds": round(secs, 1),
                        "equivalent": m.equivalent})
        print(f"{m.id:18} {outcome:10} {secs:6.0f}s  {m.original.strip()[:60]!r} -> {m.replacement.strip()[:60]!r}",
              flush=True)

    print("\nmodule          killed / scored   score   (equivalent, other)")
    for module in dict.fromkeys(r["module"] for r in results):
        rs = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"].startswith("killed") for r in rs)
        scored = sum(r["outcome"].startswith("killed") or r["outcome"] == "SURVIVED" for r in rs)
        eq = sum(r["outcome"] == "equivalent" for r in rs)
        score = f"{100 * killed / scored:5.1f}%" if scored else "  n/a"
        print(f"{module:15} {killed:6} / {scored:<6}   {score}   ({eq}, {len(rs) - scored - eq})")
    for r in results:
        if r["outcome"] in ("SURVIVED", "equivalent") or r["outcome"].startswith(("error", "skipped")):
            print(f"  {r['id']}: {r['outcome']}: {r['original'].strip()!r} -> {r['replacement'].strip()!r}"
                  + (f" ({r['equivalent']})" if r["equivalent"] else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["outcome"] != "SURVIVED" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
