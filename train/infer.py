"""Calligrapher inference: FLUX.1-Fill + a trained style adapter, with the official preprocessing.

One sample::

    python -m train.infer --pretrained_model_name_or_path FLUX.1-Fill-dev --siglip_path siglip-so400m \\
        --ip_adapter_path runs/exp/checkpoint-2000 --ema \\
        --source src.png --mask mask.png --ref ref.png --text "Hello" --output out.png

A whole dataset (any ``--train_data_json`` format), one ``{id}.png`` per record plus ``results.jsonl``::

    python -m train.infer ... --data bench/ --output_dir outputs/ --batch_size 4

The adapter comes from ``--ip_adapter_path`` (a ``checkpoint-N`` folder or a weight file in
either layout, the official ``calligrapher.bin`` included). Sample ``i`` of a run uses seed
``--seed + i`` for its noise and its VAE sampling, so results do not depend on the batch size.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from train.cli_flags import (DEFAULT_NUM_TOKENS, add_adapter_flags, add_model_flags, add_preprocessing_flags,
                             add_sampling_flags, preprocessing_problems, sampling_problems, split_ema)
from train.export import describe
from train.models.checkpoint_io import resolve_adapter_file
from train.data.prompt_limits import TruncationNotes, quiet_truncation
from train.models.adapter import StyleAdapter
from train.models.calligrapher import Calligrapher
from train.models.checkpoint_io import (AdapterFileError, atomic_write, atomic_write_text, check_finite,
                                       load_adapter_state, read_adapter_file)

# Extensions --output accepts (lossless PNG is what the tools write), and the PIL format of each.
OUTPUT_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                     ".tif": "TIFF", ".tiff": "TIFF"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------- model loading
def add_model_args(parser: argparse.ArgumentParser, multiple_adapters: bool = False) -> None:
    """Flags shared by ``train.infer``, ``train.evaluate`` and the web app (defined in :mod:`train.cli_flags`)."""
    add_model_flags(parser)
    add_adapter_flags(parser, multiple=multiple_adapters)
    add_preprocessing_flags(parser)
    add_sampling_flags(parser)


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, (torch.float32 if device == "cpu" else torch.bfloat16)
    return device, DTYPES[dtype]


def read_adapter(path: str | Path, ema: bool = False, num_tokens: int | None = None) -> tuple[dict, Path, dict]:
    """``(state in our layout, file, geometry)``; raises if ``num_tokens`` disagrees with the file
    or a weight is NaN or inf (it would paint NaN images).

    ``path`` may end in ``@ema`` (the folder's ``ip-adapter-ema.bin``).
    """
    path, ema = split_ema(str(path), ema)
    file = resolve_adapter_file(path, ema)
    state = read_adapter_file(file)
    check_finite(state, str(file))
    info = describe(state)
    if num_tokens is not None and num_tokens != info["num_tokens"]:
        raise AdapterFileError(f"{file} has {info['num_tokens']} style tokens but --num_tokens is {num_tokens}; "
                               "drop --num_tokens to use the file's")
    return state, file, info


def use_adapter_state(model: Calligrapher, state: dict, source: str = "adapter file") -> None:
    """Load ``state`` into ``model`` strictly, rebuilding the adapter if its token count differs."""
    num_tokens = describe(state)["num_tokens"]
    if model.adapter.num_tokens != num_tokens:
        adapter = StyleAdapter.for_transformer(model.transformer, model.siglip.config.hidden_size, num_tokens)
        load_adapter_state(adapter, state, source)
        adapter.install(model.transformer)
        model.adapter = adapter.requires_grad_(False).to(model.device, model.dtype)
    else:
        load_adapter_state(model.adapter, state, source)
        model.adapter.to(model.device, model.dtype)
    model.adapter.eval()


def load_model(flux_path, siglip_path, adapter_path=None, ema: bool = False, num_tokens: int | None = None,
               no_adapter: bool = False, device: str | None = None, dtype: str = "auto",
               adapter: tuple | None = None) -> Calligrapher:
    """Calligrapher with the adapter from ``adapter_path``; ``no_adapter`` gives the base model (scale 0).

    ``adapter`` passes an already read ``read_adapter(...)`` result instead of a path.
    """
    if adapter_path is not None and adapter is None:
        if no_adapter:
            raise ValueError("--no_adapter and --ip_adapter_path exclude each other")
        adapter = read_adapter(adapter_path, ema, num_tokens)
    if adapter is None and not no_adapter:
        raise AdapterFileError("no adapter given: pass --ip_adapter_path (checkpoint-N folder or weight file), "
                               "or --no_adapter to run the base model without style")
    device, torch_dtype = resolve_device_dtype(device, dtype)
    tokens = adapter[2]["num_tokens"] if adapter is not None else (num_tokens or DEFAULT_NUM_TOKENS)
    model = Calligrapher.from_pretrained(flux_path, siglip_path, tokens, dtype=torch_dtype, device=device)
    if adapter is not None:
        use_adapter_state(model, adapter[0], str(adapter[1]))
    else:
        model.adapter.to(device, torch_dtype).requires_grad_(False)
        model.adapter.set_scale(0.0)
    return model


def quiet_loading() -> None:
    """No per-file progress bars while loading weights: CLI output stays one JSON line per run."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def model_from_args(args) -> Calligrapher:
    return load_model(args.pretrained_model_name_or_path, args.siglip_path, args.ip_adapter_path, args.ema,
                      args.num_tokens, args.no_adapter, args.device, args.dtype)


# ---------------------------------------------------------------------------- generation
def _noise(generators, latent_size: tuple[int, int], channels: int) -> torch.Tensor:
    """Per-sample packed noise, drawn in float32 as ``FluxFillPipeline.prepare_latents`` draws it.

    That pipeline first samples the VAE posterior of the whole source (its ``strength`` path,
    which at strength 1 does not change the result) and then draws the noise: the same numbers
    are drawn and discarded here, so a seed gives the pipeline's own result.
    """
    h, w = latent_size
    z = []
    for g in generators:
        torch.randn((1, channels, h, w), generator=g, dtype=torch.float32)  # the pipeline's posterior sample
        z.append(torch.randn((1, channels, h, w), generator=g, dtype=torch.float32))
    return Calligrapher.pack(torch.cat(z))


@torch.no_grad()
def generate(model: Calligrapher, samples, num_inference_steps: int = 50, guidance_scale: float = 30.0,
             seed: int = 0, batch_size: int = 1, scale: float | None = None, max_sequence_length: int = 512,
             seeds: list[int] | None = None) -> list[torch.Tensor]:
    """Generated canvases ``[3, H, W]`` in ``[-1, 1]`` (CPU, float32), one per prepared sample.

    Sample ``i`` uses ``seeds[i]`` (default ``seed + i``) for its noise and VAE sampling, drawn
    in the same order as ``FluxFillPipeline`` with a per-sample generator, so a sample's result
    does not depend on the batch it ran in. ``scale`` overrides the adapter scale for this call.
    """
    samples = list(samples)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(samples))]
    if len(seeds) != len(samples):
        raise ValueError(f"{len(seeds)} seeds for {len(samples)} samples")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    previous = model.adapter.ip_adapter[0].scale if len(model.adapter.ip_adapter) else 1.0
    if scale is not None:
        model.adapter.set_scale(scale)
    channels = model.vae.config.latent_channels
    outputs: list[torch.Tensor | None] = [None] * len(samples)
    try:
        for start in range(0, len(samples), batch_size):
            # Canvases of different sizes cannot share a batch: group by shape within the chunk.
            groups: dict[tuple, list[int]] = {}
            for i in range(start, min(start + batch_size, len(samples))):
                groups.setdefault(tuple(samples[i].image.shape), []).append(i)
            for idx in groups.values():
                for i, canvas in zip(idx, _generate_batch(model, [samples[i] for i in idx], [seeds[i] for i in idx],
                                                          num_inference_steps, guidance_scale, channels,
                                                          max_sequence_length)):
                    outputs[i] = canvas
    finally:
        model.adapter.set_scale(previous)
    return outputs


def _truncation_notes(model: Calligrapher, max_sequence_length: int) -> TruncationNotes:
    """One :class:`TruncationNotes` per model and prompt length (so each record is named once per run)."""
    notes = getattr(model, "_truncation_notes", None)
    if notes is None or notes.max_sequence_length != max_sequence_length:
        notes = TruncationNotes(model.pipe.tokenizer_2, max_sequence_length,
                                emit=lambda message: print(f"warning: {message}", file=sys.stderr))
        model._truncation_notes = notes
    return notes


def _generate_batch(model, batch, seeds, steps, guidance, channels, max_sequence_length) -> list[torch.Tensor]:
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    image = torch.stack([s.image for s in batch])
    mask = torch.stack([s.mask for s in batch])
    notes = _truncation_notes(model, max_sequence_length)
    for s in batch:
        notes.check(s.id, s.text)
    with quiet_truncation():
        embeds, pooled, text_ids = model.encode_prompt([s.text for s in batch], max_sequence_length)
    style = model.encode_style([s.style_image for s in batch])
    h, w = image.shape[-2:]
    factor = model.pipe.vae_scale_factor * 2
    if h % factor or w % factor:
        raise ValueError(f"canvas {w}x{h} is not a multiple of {factor}")
    noise = _noise(generators, (2 * (h // factor), 2 * (w // factor)), channels)  # before the VAE, as the pipeline
    cond = model.prepare_condition(image, mask, embeds, pooled, text_ids, style, guidance, generator=generators)
    latents = model.sample(cond, steps, latents=noise)
    pixels = model.decode_latents(latents, cond.latent_size)
    return list(pixels.float().cpu())


# ---------------------------------------------------------------------------- CLI
def safe_name(sample_id: str, index: int) -> str:
    """A file name for a sample id (ids come from user data)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(sample_id)).strip("._")
    return name or f"sample{index:05d}"


def unique_names(ids) -> list[str]:
    names, seen = [], set()
    for i, sid in enumerate(ids):
        name = base = safe_name(sid, i)
        k = 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    one = parser.add_argument_group("one sample")
    one.add_argument("--source", help="source image")
    one.add_argument("--mask", help="mask image (white = paint the text here)")
    one.add_argument("--ref", help="style reference image (default: the source cropped to the mask's box)")
    one.add_argument("--text", help="text to paint")
    one.add_argument("--output", help=f"output image file ({', '.join(OUTPUT_EXTENSIONS)})")
    many = parser.add_argument_group("a dataset")
    many.add_argument("--data", help="a .json/.jsonl record file or a benchmark folder")
    many.add_argument("--output_dir", help="folder for {id}.png and results.jsonl")
    many.add_argument("--limit", type=int, default=None, help="only the first N records")
    return parser


def check_common_args(parser, args) -> None:
    """Preprocessing and sampling flags, checked before anything loads (one line, exit 2)."""
    problems = preprocessing_problems(args) + sampling_problems(args)
    if getattr(args, "limit", None) is not None and args.limit < 1:
        problems.append(f"--limit must be at least 1, got {args.limit}")
    if problems:
        parser.error("; ".join(problems))


def output_dir_problem(flag: str, path) -> str | None:
    """Why ``path`` cannot be an output folder (it is a file, or lies under one), or None."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            return None if q.is_dir() else (f"{flag} {path} is a file, not a folder" if q == p
                                           else f"{flag} {path} lies under {q}, which is a file")
    return None


def output_file_problem(flag: str, path) -> str | None:
    """Why ``path`` cannot be written as an image (unknown extension, a folder), or None."""
    p = Path(path)
    if p.is_dir():
        return f"{flag} {path} is a folder; give an image file name such as {p / 'out.png'}"
    if p.suffix.lower() not in OUTPUT_EXTENSIONS:
        return (f"{flag} {path}: {repr(p.suffix) if p.suffix else 'no'} image extension; "
                f"use one of {', '.join(OUTPUT_EXTENSIONS)}")
    return output_dir_problem(flag, p.parent) if str(p.parent) else None


def save_image(image, path) -> None:
    """Write ``image`` to ``path`` atomically, in the format its extension names."""
    path = Path(path)
    atomic_write(path, lambda f: image.save(f, format=OUTPUT_EXTENSIONS[path.suffix.lower()]))


def dataset_from_args(records, args):
    """Records -> ``CalligraphyDataset`` with the preprocessing flags (official defaults)."""
    from train.data.dataset import CalligraphyDataset

    return CalligraphyDataset(records, args.resolution, reference_strip=not args.no_reference_strip,
                              strip_height=args.reference_strip_height or None)


def _check_mode(parser, args) -> None:
    single = [args.source, args.mask, args.text, args.output]
    if args.data:
        if any(v is not None for v in single + [args.ref]):
            parser.error("give either --data/--output_dir or --source/--mask/--text/--output, not both")
        if not args.output_dir:
            parser.error("--data needs --output_dir")
        problem = output_dir_problem("--output_dir", args.output_dir)
    elif not all(v is not None for v in single):
        parser.error("one sample needs --source, --mask, --text and --output (or use --data and --output_dir)")
    else:
        problem = output_file_problem("--output", args.output)
    if problem:
        parser.error(problem)
    check_common_args(parser, args)


def generate_dataset(model: Calligrapher, dataset, args, scale: float):
    """Yield ``(index, sample, output image at the source's size)`` batch by batch (bounded memory).

    Record ``i`` uses seed ``args.seed + i``.
    """
    from train.data.preprocess import to_output_image

    for start in range(0, len(dataset), args.batch_size):
        idx = range(start, min(start + args.batch_size, len(dataset)))
        samples = [dataset[i] for i in idx]
        canvases = generate(model, samples, args.num_inference_steps, args.guidance_scale,
                            batch_size=args.batch_size, scale=scale, max_sequence_length=args.max_sequence_length,
                            seeds=[args.seed + i for i in idx])
        for i, sample, canvas in zip(idx, samples, canvases):
            yield i, sample, to_output_image(canvas, sample)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_mode(parser, args)
    quiet_loading()
    from train.data.dataset import DatasetError, load_records, load_sample

    try:
        if args.data:
            records = load_records(args.data, resolution=args.resolution, flag="--data")[: args.limit]
        else:
            records = [load_sample(args.source, args.mask, args.text, args.ref, resolution=args.resolution)]
        dataset = dataset_from_args(records, args)
        dataset[0]  # preprocessing problems surface before the model loads
        model = model_from_args(args)
    except (DatasetError, AdapterFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outputs = generate_dataset(model, dataset, args, 0.0 if args.no_adapter else args.scale)
    if not args.data:
        _, _, image = next(outputs)
        save_image(image, args.output)
        print(json.dumps({"output": str(args.output), "seed": args.seed}))
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_names(r.id for r in records)
    lines = []
    for i, sample, image in outputs:
        save_image(image, out / f"{names[i]}.png")
        lines.append(json.dumps({"id": sample.id, "text": sample.text, "image": f"{names[i]}.png",
                                 "seed": args.seed + i}, ensure_ascii=False) + "\n")
    atomic_write_text(out / "results.jsonl", "".join(lines))
    print(json.dumps({"output_dir": str(out), "samples": len(records)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
