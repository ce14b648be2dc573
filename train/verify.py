"""Pre-flight checks for a training run (``python verify_deployment.py``).

Every check prints one row — ✅ passed, ⚠️ works but worth knowing, ❌ will fail, ➖ not
checked because its flag was not given — with the reason and, when something is wrong, what
to do. The exit status is 1 when any row is ❌. Model, SigLIP, data, reward server, adapter
and output flags are optional and use the training script's names, so the same arguments as
the planned run can be passed (training-only flags are listed and otherwise ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FLUX_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SYMBOLS = {"ok": "✅", "warn": "⚠️ ", "fail": "❌", "skip": "➖"}
GiB = 1024 ** 3
# Bytes one checkpoint holds per trainable parameter: fp32 weights (4), EMA (4), Adam moments (8),
# NFT old/reference copies in bf16 (2 + 2).
CHECKPOINT_BYTES_PER_PARAM = 20
FULL_SIZE_ADAPTER_PARAMS = 3.02e9


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------- environment
def check_python() -> list[Check]:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v < (3, 10):
        return [Check("python", "fail", text, "use Python 3.10 or newer (3.11 is tested)")]
    return [Check("python", "ok", text)]


def read_pins(requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    return pins


def check_packages(requirements: Path = REPO_ROOT / "requirements.txt") -> list[Check]:
    from importlib.metadata import PackageNotFoundError, version

    if not requirements.is_file():
        return [Check("packages", "warn", f"{requirements} not found; package versions not checked")]
    pins = read_pins(requirements)
    rows, missing, different = [], [], []
    for name, want in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            missing.append(name)
            continue
        if have.split("+", 1)[0] != want:  # "+cu128" local builds are the same release
            different.append(f"{name} {have} (pinned {want})")
    if missing:
        rows.append(Check("packages", "fail", "not installed: " + ", ".join(missing),
                          f"pip install -r {requirements}"))
    if different:
        rows.append(Check("package versions", "warn", "; ".join(different),
                          f"the pinned set is what is tested: pip install -r {requirements}"))
    if not rows:
        rows.append(Check("packages", "ok", f"all {len(pins)} pinned versions from {requirements.name} installed"))
    try:
        version("torchvision")
        rows.append(Check("torchvision", "warn", "installed; it is not needed and can fail to import beside torch",
                          "pip uninstall torchvision"))
    except PackageNotFoundError:
        pass
    try:
        from diffusers import FluxFillPipeline  # noqa: F401
        from transformers import SiglipVisionModel  # noqa: F401
    except Exception as exc:  # a broken install shows up here rather than hours into a run
        rows.append(Check("imports", "fail", f"diffusers/transformers do not import: {type(exc).__name__}: {exc}",
                          f"reinstall: pip install --force-reinstall -r {requirements}"))
    else:
        rows.append(Check("imports", "ok", "diffusers FluxFillPipeline, transformers SiglipVisionModel"))
    return rows


def check_torch(require_gpu: bool = False, min_gpu_gib: float = 75.0) -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        status = "fail" if require_gpu else "warn"
        return [Check("torch / GPU", status, f"torch {torch.__version__}, CPU only (no CUDA device visible): "
                      "enough for tiny models, tests and the demo; full FLUX.1-Fill training needs GPUs",
                      "for real training install a CUDA build of torch and check CUDA_VISIBLE_DEVICES / nvidia-smi")]
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    mems = [g.total_memory / GiB for g in gpus]
    names = ", ".join(f"{g.name} {m:.0f} GiB" for g, m in zip(gpus, mems))
    rows = [Check("torch / GPU", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                  f"{len(gpus)} GPU(s): {names}")]
    if min(mems) < min_gpu_gib:
        rows.append(Check("GPU memory", "warn", f"smallest GPU has {min(mems):.0f} GiB; full-size NFT + EMA at 512² "
                          f"is sized for ~80 GB per GPU",
                          "use --gradient_checkpointing, --ema_device cpu, --use_8bit_adam, or FSDP across GPUs"))
    if not torch.cuda.is_bf16_supported():
        rows.append(Check("bf16", "warn", "this GPU has no bf16 support", "use --mixed_precision fp16 or no"))
    return rows


# ---------------------------------------------------------------------------- models
def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()) if folder.is_dir() else False


def check_model_folder(path: str) -> tuple[list[Check], dict | None]:
    """Layout, configs and weights of a diffusers-layout FLUX.1-Fill folder; returns the transformer config."""
    root = Path(path)
    fix = ("download the complete black-forest-labs/FLUX.1-Fill-dev repository (diffusers layout) into "
           f"{root} and pass that folder")
    if not root.is_dir():
        return [Check("model folder", "fail", f"{root} is not a folder", fix)], None
    missing = [f"{d}/" for d in FLUX_SUBFOLDERS if not (root / d).is_dir()]
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    if missing:
        return [Check("model folder", "fail", f"{root}: missing {', '.join(missing)}", fix)], None
    rows = [Check("model folder", "ok", f"{root}: {', '.join(d + '/' for d in FLUX_SUBFOLDERS)} model_index.json")]
    try:
        index = json.loads((root / "model_index.json").read_text())
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextConfig, T5Config

        tcfg = FluxTransformer2DModel.load_config(root, subfolder="transformer")
        vcfg = AutoencoderKL.load_config(root, subfolder="vae")
        FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        CLIPTextConfig.from_pretrained(root / "text_encoder")
        T5Config.from_pretrained(root / "text_encoder_2")
        for sub in ("tokenizer", "tokenizer_2"):
            AutoTokenizer.from_pretrained(root / sub)
    except Exception as exc:
        return rows + [Check("model configs", "fail", f"{type(exc).__name__}: {exc}", fix)], None
    no_weights = [f"{d}/" for d in ("transformer", "vae", "text_encoder", "text_encoder_2")
                  if not _has_weights(root / d)]
    if no_weights:
        rows.append(Check("model weights", "fail", f"no .safetensors/.bin weights in {', '.join(no_weights)}", fix))
    problems = []
    if tcfg.get("in_channels") != 384:
        problems.append(f"transformer in_channels is {tcfg.get('in_channels')}, FLUX.1-Fill has 384 "
                        "(64 means plain FLUX.1-dev)")
    if not tcfg.get("guidance_embeds", False):
        problems.append("transformer has no guidance embedding (FLUX.1-Fill-dev is guidance-distilled)")
    if vcfg.get("latent_channels") != 16:
        problems.append(f"VAE latent_channels is {vcfg.get('latent_channels')}, FLUX uses 16")
    blocks = tcfg.get("num_layers", 0) + tcfg.get("num_single_layers", 0)
    summary = (f"{index.get('_class_name', '?')}: {tcfg.get('num_layers')} double + {tcfg.get('num_single_layers')} "
               f"single blocks, joint_attention_dim {tcfg.get('joint_attention_dim')}, configs and tokenizers load")
    if problems:
        rows.append(Check("FLUX.1-Fill model", "fail", "; ".join(problems),
                          "point --pretrained_model_name_or_path at FLUX.1-Fill-dev, not another FLUX variant"))
    else:
        rows.append(Check("FLUX.1-Fill model", "ok", summary))
    tcfg = dict(tcfg, style_blocks=blocks)
    return rows, (tcfg if not problems and not no_weights else None)


def check_siglip(path: str) -> tuple[list[Check], dict | None]:
    root = Path(path)
    fix = f"download google/siglip-so400m-patch14-384 into {root} and pass that folder"
    if not root.is_dir():
        return [Check("SigLIP", "fail", f"{root} is not a folder", fix)], None
    try:
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor, SiglipVisionConfig

        cfg = SiglipVisionConfig.from_pretrained(root)
        SiglipImageProcessor.from_pretrained(root)
    except Exception as exc:
        return [Check("SigLIP", "fail", f"{root}: {type(exc).__name__}: {exc}", fix)], None
    if not _has_weights(root):
        return [Check("SigLIP", "fail", f"{root}: no .safetensors/.bin weights", fix)], None
    return [Check("SigLIP", "ok", f"{root}: hidden_size {cfg.hidden_size}, image_size {cfg.image_size}, "
                  "image processor loads")], {"hidden_size": cfg.hidden_size}


def adapter_parameters(style_dim: int, token_dim: int, num_tokens: int, blocks: int, inner_dim: int) -> int:
    """Trainable parameters of the style adapter (SPEC §3), from the model dimensions."""
    e, d, n = style_dim, token_dim, num_tokens
    first = e * 2 * e + 2 * e
    mlp = first + 2 * e * d * n + d * n + 2 * d
    qformer = n * d + first + 2 * e * d * 32 + d * 32 + (4 * d * d + 4 * d) + 4 * d
    return mlp + qformer + blocks * 2 * d * inner_dim


def check_adapter(path: str, ema: bool, tcfg: dict | None, siglip: dict | None, num_tokens: int | None) -> list[Check]:
    from train.export import describe, resolve_adapter_file
    from train.models.checkpoint_io import read_adapter_file

    try:
        file = resolve_adapter_file(path, ema)
        info = describe(read_adapter_file(file))
    except Exception as exc:
        return [Check("adapter weights", "fail", str(exc), "pass a checkpoint-N folder, ip-adapter.bin or "
                      "the official calligrapher.bin")]
    problems = []
    if num_tokens is not None and num_tokens != info["num_tokens"]:
        problems.append(f"file has {info['num_tokens']} style tokens, --num_tokens is {num_tokens}")
    if siglip and info["style_dim"] != siglip["hidden_size"]:
        problems.append(f"file expects SigLIP width {info['style_dim']}, SigLIP has {siglip['hidden_size']}")
    if tcfg:
        if info["token_dim"] != tcfg["joint_attention_dim"]:
            problems.append(f"file token width {info['token_dim']}, transformer joint_attention_dim "
                            f"{tcfg['joint_attention_dim']}")
        if info["style_blocks"] != tcfg["style_blocks"]:
            problems.append(f"file has {info['style_blocks']} style blocks, transformer has {tcfg['style_blocks']}")
    text = (f"{file}: {info['num_tokens']} tokens, {info['style_blocks']} style blocks, "
            f"{info['parameters'] / 1e6:.1f} M parameters")
    if problems:
        return [Check("adapter weights", "fail", f"{file}: " + "; ".join(problems),
                      "use an adapter trained for this FLUX.1-Fill / SigLIP pair and its --num_tokens")]
    return [Check("adapter weights", "ok", text)]


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
    from train.rewards.base import build_scorers

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


class _FlagError(ValueError):
    """A training flag that argparse rejects (bad type or choice)."""


def training_config(argv: list[str]):
    """``(TrainConfig, flags neither training nor this script knows)`` from the planned run's arguments."""
    from train.config import TrainConfig, build_parser as training_parser

    parser = training_parser()
    parser.allow_abbrev = False  # "--ema" (ours) must not be read as training's --ema_decay

    def error(message):
        raise _FlagError(message)

    parser.error = error  # a row in the table rather than argparse's exit
    ns, extra = parser.parse_known_args(argv)
    cfg = TrainConfig(**vars(ns))
    if cfg.rl_kl_beta is None:
        cfg.rl_kl_beta = 0.1 if cfg.rl_method == "grpo" else 0.01
    return cfg, extra


def check_training_flags(cfg, given: list[str]) -> list[Check]:
    """``train.config.validate``: the run's flags as ``python -m train.train`` would judge them at start-up."""
    from train.config import validate

    try:
        problems = validate(cfg)
    except Exception as exc:  # a broken optional import must not hide the other rows
        return [Check("training flags", "fail", f"validation failed: {type(exc).__name__}: {exc}")]
    problems = [p for p in problems if not p.endswith(" is required") and not p.startswith(_OWN_ROWS)]
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
    if not any(r.name in RUN_ROWS and r.status != "skip" for r in rows):
        rows.append(Check("run", "fail", "nothing about the planned run was checked (only Python, packages, torch "
                          "and disk)", "pass the run's flags, e.g. --pretrained_model_name_or_path FLUX.1-Fill-dev "
                          "--siglip_path siglip-so400m --train_data_json data.jsonl --output_dir runs/exp"))
    return rows


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
