"""Shared by the benchmarks: machine and commit stamps, a CPU-time clock, atomic JSON results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> str:
    """``"2-core CPU (model), torch 2.13.0"`` or the GPU's name."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores), torch {torch.__version__}"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), torch {torch.__version__}"


def commit() -> str:
    """The checked-out commit (short), with ``+changes`` when tracked code differs from it (the results and
    the README table the benchmarks themselves rewrite do not count)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train", "benchmarks", ":!benchmarks/results",
                                ":!benchmarks/README.md"], cwd=REPO).returncode
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> dict:
    return {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit()}


@contextmanager
def cpu_clock():
    """Within the block ``time.perf_counter`` reads this process's CPU time (``time.process_time``).

    The trainers time their phases with ``time.perf_counter``; on a machine shared with other jobs
    wall time stretches with their load, CPU time does not. With one torch thread (no spinning
    workers) the CPU time of a step is the work it does, which is what an overhead ratio compares.
    """
    wall = time.perf_counter
    time.perf_counter = time.process_time
    try:
        yield
    finally:
        time.perf_counter = wall


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
