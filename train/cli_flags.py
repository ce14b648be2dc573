"""Command-line flags shared by ``train.infer``, ``train.evaluate`` and ``verify_deployment.py``.

One definition per flag (name, default, help), so the tools cannot drift apart. Training's own
flags live in :mod:`train.config`; the names here are the same where the meaning is.
"""

from __future__ import annotations

import argparse
import ipaddress

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_NUM_TOKENS = 128
EMA_SUFFIX = "@ema"
ADAPTER_HELP = ("a checkpoint-N folder or an adapter weight file (ip-adapter.bin or the official calligrapher.bin); "
                f"append {EMA_SUFFIX} (e.g. runs/exp/checkpoint-2000{EMA_SUFFIX}) for that folder's ip-adapter-ema.bin")


def add_model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--pretrained_model_name_or_path`` and ``--siglip_path``."""
    parser.add_argument("--pretrained_model_name_or_path", required=required,
                        help="diffusers-layout FLUX.1-Fill folder (transformer/, vae/, text_encoder/, text_encoder_2/, "
                             "tokenizer/, tokenizer_2/, scheduler/)")
    parser.add_argument("--siglip_path", required=required, help="SigLIP vision model folder")


def add_adapter_flags(parser: argparse.ArgumentParser, multiple: bool = False, no_adapter: bool = True,
                      aliases: tuple[str, ...] = ()) -> None:
    """``--ip_adapter_path`` (repeatable with ``multiple``), ``--ema``, ``--num_tokens`` and ``--no_adapter``."""
    if multiple:
        parser.add_argument("--ip_adapter_path", *aliases, dest="ip_adapter_path", action="append", default=[],
                            help=ADAPTER_HELP + "; give it once per checkpoint to compare them side by side")
    else:
        parser.add_argument("--ip_adapter_path", *aliases, dest="ip_adapter_path", help=ADAPTER_HELP)
    parser.add_argument("--ema", action="store_true",
                        help="use ip-adapter-ema.bin of the checkpoint folder(s) (same as the @ema suffix)")
    parser.add_argument("--num_tokens", type=int, default=None,
                        help=f"style tokens; read from the weight file when omitted ({DEFAULT_NUM_TOKENS} without one)")
    if no_adapter:
        parser.add_argument("--no_adapter", action="store_true",
                            help="add the base FLUX.1-Fill without style (adapter scale 0) as a first column"
                            if multiple else
                            "run the base FLUX.1-Fill without style (adapter scale 0) instead of a checkpoint")


def add_preprocessing_flags(parser: argparse.ArgumentParser, resolution: int | None = 512) -> None:
    """``--resolution``, ``--no_reference_strip``, ``--reference_strip_height`` (training's names and defaults)."""
    parser.add_argument("--resolution", type=int, default=resolution,
                        help="model canvas side, a positive multiple of 16 (training's default: 512)")
    parser.add_argument("--no_reference_strip", action="store_true",
                        help="do not paste the reference above the source (official inference does)")
    parser.add_argument("--reference_strip_height", type=int, default=0,
                        help="fixed strip height (multiple of 16), as in training; 0 = the official rule "
                             "(follows each reference's aspect ratio)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Sampler, seed, batch, prompt length, device and dtype of a generation run."""
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=30.0, help="FLUX guidance embedding (official: 30)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--scale", type=float, default=1.0, help="style adapter scale")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 prompt length in tokens")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")


def split_ema(spec: str, ema: bool = False) -> tuple[str, bool]:
    """``"PATH@ema"`` -> ``("PATH", True)``; otherwise ``(spec, ema)``."""
    if spec.endswith(EMA_SUFFIX):
        return spec[: -len(EMA_SUFFIX)], True
    return spec, ema


def preprocessing_problems(args) -> list[str]:
    """Problems with the preprocessing flags, worded as training words them (``train.config.validate``)."""
    problems = []
    resolution = getattr(args, "resolution", None)
    if resolution is not None and (resolution <= 0 or resolution % 16):
        problems.append(f"--resolution {resolution} must be a positive multiple of 16 "
                        "(FLUX packs 2x2 latents of an 8x VAE)")
    strip = getattr(args, "reference_strip_height", 0) or 0
    if strip < 0 or strip % 16:
        problems.append(f"--reference_strip_height {strip} must be 0 or a positive multiple of 16")
    return problems


def sampling_problems(args) -> list[str]:
    problems = []
    for name in ("batch_size", "num_inference_steps", "max_sequence_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1, got {value}")
    if getattr(args, "max_sequence_length", 0) > 512:
        problems.append(f"--max_sequence_length {args.max_sequence_length} exceeds T5's 512 tokens")
    return problems


LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``--host`` listens on this machine only (a service reachable from others needs a token)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
