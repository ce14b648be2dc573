"""Rows of ``verify_deployment.py`` about the environment and the model folders (see :mod:`train.verify`)."""

from __future__ import annotations

import json
import sys
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
    """Trainable parameters of the style adapter (docs/ARCHITECTURE.md §3), from the model dimensions."""
    e, d, n = style_dim, token_dim, num_tokens
    first = e * 2 * e + 2 * e
    mlp = first + 2 * e * d * n + d * n + 2 * d
    qformer = n * d + first + 2 * e * d * 32 + d * 32 + (4 * d * d + 4 * d) + 4 * d
    return mlp + qformer + blocks * 2 * d * inner_dim


def check_adapter(path: str, ema: bool, tcfg: dict | None, siglip: dict | None, num_tokens: int | None) -> list[Check]:
    from train.export import describe
    from train.models.checkpoint_io import resolve_adapter_file
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
