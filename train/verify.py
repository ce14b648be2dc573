"""Pre-flight checks for a training run (``python verify_deployment.py``).

Every check prints one row — ✅ passed, ⚠️ works but worth knowing, ❌ will fail, ➖ not
checked because its flag was not given — with the reason and, when something is wrong, what
to do. The exit status is 1 when any row is ❌. Model, SigLIP, data, reward server, adapter
and output flags are optional and use the training script's names, so the same arguments as
the planned run can be passed: every training flag is judged by training's own start-up
validation (``train.config.validate``), an unknown flag fails, and a table in which nothing
about the run was checked fails too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from train.verify_checks import (  # noqa: F401  (re-exported: the checks are part of this module's API)
    CHECKPOINT_BYTES_PER_PARAM, FULL_SIZE_ADAPTER_PARAMS, GiB, REPO_ROOT, SYMBOLS, Check, adapter_parameters,
    check_adapter, check_model_folder, check_packages, check_python, check_siglip, check_torch,
)


# ---------------------------------------------------------------------------- data, rewards, disk
def check_data(path: str, resolution: int | None = None, name: str = "training data",
               flag: str = "--train_data_json") -> list[Check]:
    try:
        from train.data.dataset import DatasetError, load_records
    except ImportError as exc:
        return [Check(name, "fail", f"the data package does not import: {exc}", "reinstall the project")]
    try:
        records = load_records(path, resolution=resolution, flag=flag)
    except DatasetError as exc:
        return [Check(name, "fail", str(exc), "fix or remove the records named above, then run this again")]
    except OSError as exc:
        return [Check(name, "fail", f"{flag} {path}: {exc}", "pass an existing .json/.jsonl file or benchmark folder")]
    with_ref = sum(1 for r in records if getattr(r, "ref", None) is not None)
    at = f" at --resolution {resolution}" if resolution else ""
    return [Check(name, "ok", f"{path}: {len(records)} valid records{at} ({with_ref} with a reference image, "
                  f"{len(records) - with_ref} self-referenced)")]


def needed_scorers(*specs: str | None) -> tuple[list[str], list[Check]]:
    """Scorers with a non-zero weight in any of the ``--reward_weights``-style specs, or a failing row."""
    from train.rewards.base import parse_reward_weights

    wanted = []
    for spec in specs:
        if not spec:
            continue
        try:
            weights = parse_reward_weights(spec)
        except ValueError as exc:
            return [], [Check("reward weights", "fail", f"{spec}: {exc}",
                              "e.g. --reward_weights ocr=0.7,style=0.2,background=0.1")]
        wanted += [n for n, w in weights.items() if w != 0 and n not in wanted]
    return wanted, []


def check_reward_servers(urls: str, wanted: list[str], timeout: float = 5.0, token: str | None = None,
                         weights_flag: str = "--reward_weights") -> list[Check]:
    """Health of every server, and that each serves every scorer in ``wanted``."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows = []
    for url in [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]:
        start = ("start it with: python -m train.reward_server --host 127.0.0.1 --port PORT "
                 "--scorers ocr,style,background (and check host, port and firewall)")
        try:
            response = httpx.get(f"{url}/health", timeout=timeout, headers=headers)
            response.raise_for_status()
            health = response.json()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 401:
                rows.append(Check("reward server", "fail", f"{url} rejected the token (HTTP 401)",
                                  "pass the server's secret with --reward_server_token or REWARD_SERVER_TOKEN"))
                continue
            rows.append(Check("reward server", "fail", f"{url}/health answered HTTP {exc.response.status_code}", start))
            continue
        except (httpx.HTTPError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            rows.append(Check("reward server", "fail", f"{url} unreachable ({reason})", start))
            continue
        served = health.get("scorers", [])
        served = list(served) if not isinstance(served, dict) else list(served.keys())
        lacking = [w for w in wanted if w not in served]
        detail = f"{url}: scorers {', '.join(map(str, served)) or '(none)'}"
        for key in ("device", "version"):
            if key in health:
                detail += f", {key} {health[key]}"
        if lacking:
            rows.append(Check("reward server", "fail", f"{detail}; {weights_flag} needs {', '.join(lacking)}",
                              "restart the server with --scorers including " + ",".join(lacking)))
        else:
            rows.append(Check("reward server", "ok", f"{detail}; serves {', '.join(wanted)} ({weights_flag})"))
    return rows


def check_local_scorers(names: list[str], siglip_path: str | None) -> list[Check]:
    """Without a reward server the scorers run in the trainer: build the cheap ones once to be sure."""
    from train.rewards.registry import build_scorers

    rows = []
    if "style" in names and not siglip_path:
        rows.append(Check("reward scorers", "fail", "the style scorer needs SigLIP", "pass --siglip_path"))
    if "vlm" in names:
        rows.append(Check("reward scorers", "skip", "vlm judge not checked here (it is a separate server)"))
    cheap = [n for n in names if n in ("ocr", "background")]
    try:
        if cheap:
            build_scorers(cheap)
    except Exception as exc:  # e.g. rapidocr / onnxruntime missing or broken
        return rows + [Check("reward scorers", "fail", f"in-process {', '.join(cheap)}: {type(exc).__name__}: {exc}",
                             f"pip install -r {REPO_ROOT / 'requirements.txt'}, or use --reward_server_url")]
    if cheap:
        rows.append(Check("reward scorers", "ok", f"in-process {', '.join(cheap)} load"
                          + (" (style uses --siglip_path)" if "style" in names and siglip_path else "")))
    return rows


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(path: str) -> list[Check]:
    target = Path(path)
    if target.exists() and not target.is_dir():
        return [Check("output dir", "fail", f"{target} exists and is not a folder", "choose another --output_dir")]
    base = _existing_ancestor(target)
    try:  # os.access misreads some network mounts: really write a file
        with tempfile.NamedTemporaryFile(dir=base, prefix=".verify-"):
            pass
    except OSError as exc:
        return [Check("output dir", "fail", f"cannot write in {base}: {exc}",
                      "choose a writable --output_dir or fix its permissions")]
    note = "writable" if base == target.absolute() else f"will be created (writable parent {base})"
    return [Check("output dir", "ok", f"{target}: {note}")]


def check_disk(path: str, adapter_params: float | None, min_free_gb: float | None) -> list[Check]:
    base = _existing_ancestor(Path(path))
    free = shutil.disk_usage(base).free
    if min_free_gb is not None:
        need, why, hard = min_free_gb * GiB, f"--min_free_gb {min_free_gb:g}", True
    elif adapter_params is not None:
        need = 2 * CHECKPOINT_BYTES_PER_PARAM * adapter_params
        why, hard = f"two checkpoints of a {adapter_params / 1e6:.1f} M-parameter adapter", True
    else:  # no model given: judge against the full-size adapter, but only warn
        need = 2 * CHECKPOINT_BYTES_PER_PARAM * FULL_SIZE_ADAPTER_PARAMS
        why, hard = "two checkpoints of the full-size adapter (pass the model folders for an exact estimate)", False
    detail = f"{free / GiB:.1f} GiB free at {base}; about {need / GiB:.2f} GiB needed for {why}"
    if free >= need:
        return [Check("free disk", "ok", detail)]
    return [Check("free disk", "fail" if hard else "warn", detail,
                  "free space, choose another --output_dir, or lower --checkpoints_total_limit")]


# ---------------------------------------------------------------------------- training flags
# Flags whose values get their own, more thorough row; training's existence checks on them are not repeated.
_OWN_ROWS = ("--pretrained_model_name_or_path ", "--siglip_path ", "--train_data_json ", "--rl_eval_data ")
# the reward service's own rows read these without --use_rl (a server checked before the run's other flags are known)
_REWARD_ROWS = ("--reward_server_url ", "--reward_weights ", "--rl_eval_reward_weights ")


class _FlagError(ValueError):
    """A training flag that argparse rejects (bad type or choice)."""


def training_config(argv: list[str]):
    """``(TrainConfig, flags neither training nor this script knows)`` from the planned run's arguments."""
    from train.config import TrainConfig, resolve_defaults
    from train.config import build_parser as training_parser

    parser = training_parser()
    parser.allow_abbrev = False  # "--ema" (ours) must not be read as training's --ema_decay

    def error(message):
        raise _FlagError(message)

    parser.error = error  # a row in the table rather than argparse's exit
    ns, extra = parser.parse_known_args(argv)
    cfg = TrainConfig(**vars(ns))
    resolve_defaults(cfg)
    return cfg, extra


def check_training_flags(cfg, given: list[str]) -> list[Check]:
    """``train.config.validate``: the run's flags as ``python -m train.train`` would judge them at start-up."""
    from train.config import validate

    try:
        problems = validate(cfg)
    except Exception as exc:  # a broken optional import must not hide the other rows
        return [Check("training flags", "fail", f"validation failed: {type(exc).__name__}: {exc}")]
    problems = [p for p in problems if not p.endswith(" is required") and not p.startswith(_OWN_ROWS)
                and not (p.startswith(_REWARD_ROWS) and p.endswith("applies only with --use_rl"))]
    if problems:
        return [Check("training flags", "fail", "\n".join(problems), "python -m train.train would refuse to start: "
                      "fix these flags")]
    what = f"{len(given)} given ({', '.join(given)})" if given else "defaults only"
    return [Check("training flags", "ok", f"training's start-up validation passes: {what}, --resolution {cfg.resolution}")]


# ---------------------------------------------------------------------------- driver
VERIFY_ONLY = ("--ip_adapter_path", "--ema", "--require_gpu", "--min_free_gb", "--reward_server_token", "--timeout")


def build_parser() -> argparse.ArgumentParser:
    from train.cli_flags import add_adapter_flags, add_model_flags

    p = argparse.ArgumentParser(prog="verify_deployment.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, required=False)
    p.add_argument("--train_data_json", help=".json/.jsonl record file or benchmark folder to validate")
    p.add_argument("--reward_server_url", help="comma-separated reward server URLs to health-check")
    p.add_argument("--reward_weights", help="the run's reward weights (default: training's); the servers, or the "
                                            "in-process scorers, must provide every scorer they weight")
    p.add_argument("--output_dir", help="training output folder: must be writable")
    add_adapter_flags(p, no_adapter=False, aliases=("--initial_ip_adapter_path",))
    p.add_argument("--require_gpu", action="store_true", help="fail instead of warn when no CUDA GPU is visible")
    p.add_argument("--min_free_gb", type=float, default=None, help="free-disk threshold instead of the estimate")
    p.add_argument("--reward_server_token", default=os.environ.get("REWARD_SERVER_TOKEN"),
                   help="shared secret of the reward servers (or env REWARD_SERVER_TOKEN)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reward server")
    p.epilog = ("Every other flag of python -m train.train is accepted too and checked with training's own "
                "start-up validation (e.g. --resolution, --use_rl, --rl_num_images_per_prompt).")
    return p


# Rows about the planned run (not the environment): at least one must have been checked.
RUN_ROWS = ("model folder", "SigLIP", "adapter weights", "training data", "eval data", "reward server",
            "reward scorers", "output dir")


def run_checks(args, cfg) -> list[Check]:
    rows = check_python() + check_packages() + check_torch(args.require_gpu)
    tcfg = siglip = None
    if args.pretrained_model_name_or_path:
        found, tcfg = check_model_folder(args.pretrained_model_name_or_path)
        rows += found
    else:
        rows.append(Check("model folder", "skip", "not checked: pass --pretrained_model_name_or_path"))
    if args.siglip_path:
        found, siglip = check_siglip(args.siglip_path)
        rows += found
    else:
        rows.append(Check("SigLIP", "skip", "not checked: pass --siglip_path"))
    if args.ip_adapter_path:
        from train.cli_flags import split_ema

        path, ema = split_ema(str(args.ip_adapter_path), args.ema)
        rows += check_adapter(path, ema, tcfg, siglip, args.num_tokens)
    if args.train_data_json:
        rows += check_data(args.train_data_json, cfg.resolution)
    else:
        rows.append(Check("training data", "skip", "not checked: pass --train_data_json"))
    if cfg.rl_eval_data:
        rows += check_data(cfg.rl_eval_data, cfg.resolution, name="eval data", flag="--rl_eval_data")
    wanted, weight_rows = needed_scorers(cfg.reward_weights, cfg.rl_eval_reward_weights)
    rows += weight_rows
    weights_flag = "--reward_weights" + ("" if args.reward_weights else f" (training's default {cfg.reward_weights})")
    if args.reward_server_url and not weight_rows:
        rows += check_reward_servers(args.reward_server_url, wanted, args.timeout, args.reward_server_token,
                                     weights_flag)
    elif not args.reward_server_url:
        rows.append(Check("reward server", "skip", "not checked: no --reward_server_url (rewards run in-process)"))
        if (args.reward_weights or cfg.use_rl) and not weight_rows:
            rows += check_local_scorers(wanted, args.siglip_path)
    if args.output_dir:
        rows += check_output_dir(args.output_dir)
    else:
        rows.append(Check("output dir", "skip", "not checked: pass --output_dir"))
    params = None
    if tcfg and siglip:
        params = adapter_parameters(siglip["hidden_size"], tcfg["joint_attention_dim"], args.num_tokens or 128,
                                    tcfg["style_blocks"], tcfg["num_attention_heads"] * tcfg["attention_head_dim"])
    rows += check_disk(args.output_dir or ".", params, args.min_free_gb)
    rows += check_memory_plan(cfg)
    if not any(r.name in RUN_ROWS and r.status != "skip" for r in rows):
        rows.append(Check("run", "fail", "nothing about the planned run was checked (only Python, packages, torch "
                          "and disk)", "pass the run's flags, e.g. --pretrained_model_name_or_path FLUX.1-Fill-dev "
                          "--siglip_path siglip-so400m --train_data_json data.jsonl --output_dir runs/exp"))
    return rows


def check_memory_plan(cfg, gpu_memory_gb: float | None = None) -> list[Check]:
    """The planner's verdict for one process of this run on the visible GPU (``python -m train.plan`` has the table)."""
    from train.plan import plan_for_config

    try:
        plan = plan_for_config(cfg, gpu_memory_gb=gpu_memory_gb)
    except Exception as exc:  # noqa: BLE001 - reported as a row, like every other check
        return [Check("memory plan", "warn", f"could not plan: {type(exc).__name__}: {exc}")]
    peak = f"peak {plan.peak.device / 2**30:.1f} GiB per process ({plan.peak.name})"
    if plan.fits is None:
        return [Check("memory plan", "skip", f"{peak}; no GPU to compare with",
                      "python -m train.plan --gpu_memory_gb N with the run's flags")]
    if plan.fits:
        return [Check("memory plan", "ok", f"{peak} fits")]
    fix = "; or ".join(" ".join(flags) for flags in plan.suggestions[:3]) or "use GPUs with more memory"
    return [Check("memory plan", "fail", f"{peak} does not fit", f"try {fix} (python -m train.plan shows the table)")]


def format_table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows) + 2
    lines = []
    for r in rows:
        first, *more = r.detail.splitlines() or [""]
        lines.append(f"{SYMBOLS[r.status]} {r.name:<{width}}{first}")
        lines += [f"   {'':<{width}}{line.strip()}" for line in more]
        if r.fix and r.status in ("fail", "warn"):
            lines.append(f"   {'':<{width}}→ {r.fix}")
    counts = {s: sum(r.status == s for r in rows) for s in SYMBOLS}
    checked = list(dict.fromkeys(r.name for r in rows if r.status in ("ok", "warn")))
    skipped = list(dict.fromkeys(r.name for r in rows if r.status == "skip"))
    verdict = "NOT READY" if counts["fail"] else "ready"
    lines.append(f"\n{verdict}: {counts['ok']} passed, {counts['warn']} warnings, {counts['fail']} failed, "
                 f"{counts['skip']} not checked")
    lines.append(f"checked: {', '.join(checked) or 'nothing'}")
    if skipped:
        lines.append(f"not checked: {', '.join(skipped)}")
    return "\n".join(lines)


def collect(argv=None) -> list[Check]:
    """Parse ``argv`` (this script's flags and the planned run's training flags) and run every check."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = build_parser().parse_known_args(argv)
    try:
        cfg, unknown_to_training = training_config(argv)
    except _FlagError as exc:
        from train.config import TrainConfig

        cfg, unknown_to_training = TrainConfig(), []
        return run_checks(args, cfg) + [Check("training flags", "fail", str(exc),
                                              "see python -m train.train --help")]
    verify_only = set(VERIFY_ONLY)
    unknown = [a for a in unknown_to_training if a.startswith("--") and a.split("=", 1)[0] not in verify_only]
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a not in unknown
             and a.split("=", 1)[0] not in verify_only]
    rows = run_checks(args, cfg)
    rows += check_training_flags(cfg, given)
    if unknown:
        rows.append(Check("unknown flags", "fail", " ".join(unknown) + ": neither python -m train.train nor this "
                          "script has them", "check the spelling against python -m train.train --help"))
    return rows


def exit_code(rows: list[Check]) -> int:
    return 1 if any(r.status == "fail" for r in rows) else 0


def main(argv=None) -> int:
    rows = collect(argv)
    print(format_table(rows))
    return exit_code(rows)
