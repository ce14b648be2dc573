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

from train.export import describe, resolve_adapter_file
from train.models.adapter import StyleAdapter
from train.models.calligrapher import Calligrapher
from train.models.checkpoint_io import AdapterFileError, load_adapter_state, read_adapter_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_NUM_TOKENS = 128


# ---------------------------------------------------------------------------- model loading
def add_model_args(parser: argparse.ArgumentParser, multiple_adapters: bool = False) -> None:
    """Flags shared by ``train.infer`` and ``train.evaluate``."""
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers-layout FLUX.1-Fill folder")
    parser.add_argument("--siglip_path", required=True, help="SigLIP vision model folder")
    if multiple_adapters:
        parser.add_argument("--ip_adapter_path", action="append", default=[],
                            help="checkpoint-N folder or weight file (either layout); give it twice to compare")
    else:
        parser.add_argument("--ip_adapter_path", help="checkpoint-N folder or weight file (either layout)")
    parser.add_argument("--ema", action="store_true", help="use ip-adapter-ema.bin of a checkpoint folder")
    parser.add_argument("--no_adapter", action="store_true",
                        help="add the base FLUX.1-Fill without style (adapter scale 0) as a first column"
                        if multiple_adapters else
                        "run the base FLUX.1-Fill without style (adapter scale 0) instead of a checkpoint")
    parser.add_argument("--num_tokens", type=int, default=None,
                        help=f"style tokens; read from the weight file when omitted ({DEFAULT_NUM_TOKENS} "
                             "with --no_adapter)")
    parser.add_argument("--resolution", type=int, default=512, help="model canvas side (multiple of 16)")
    parser.add_argument("--no_reference_strip", action="store_true",
                        help="do not paste the reference above the source (official inference does)")
    parser.add_argument("--reference_strip_height", type=int, default=0,
                        help="fixed strip height (multiple of 16), as in training; 0 = the official rule "
                             "(follows each reference's aspect ratio)")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=30.0, help="FLUX guidance embedding (official: 30)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--scale", type=float, default=1.0, help="style adapter scale")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 prompt length")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, (torch.float32 if device == "cpu" else torch.bfloat16)
    return device, DTYPES[dtype]


def read_adapter(path: str | Path, ema: bool = False, num_tokens: int | None = None) -> tuple[dict, Path, dict]:
    """``(state in our layout, file, geometry)``; raises if ``num_tokens`` disagrees with the file."""
    file = resolve_adapter_file(path, ema)
    state = read_adapter_file(file)
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


def _generate_batch(model, batch, seeds, steps, guidance, channels, max_sequence_length) -> list[torch.Tensor]:
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    image = torch.stack([s.image for s in batch])
    mask = torch.stack([s.mask for s in batch])
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    one = parser.add_argument_group("one sample")
    one.add_argument("--source", help="source image")
    one.add_argument("--mask", help="mask image (white = paint the text here)")
    one.add_argument("--ref", help="style reference image (default: the source cropped to the mask's box)")
    one.add_argument("--text", help="text to paint")
    one.add_argument("--output", help="output image file")
    many = parser.add_argument_group("a dataset")
    many.add_argument("--data", help="a .json/.jsonl record file or a benchmark folder")
    many.add_argument("--output_dir", help="folder for {id}.png and results.jsonl")
    many.add_argument("--limit", type=int, default=None, help="only the first N records")
    return parser


def check_common_args(parser, args) -> None:
    if args.resolution % 16:
        parser.error("--resolution must be a multiple of 16")
    if args.reference_strip_height < 0 or args.reference_strip_height % 16:
        parser.error("--reference_strip_height must be 0 or a positive multiple of 16")
    if args.batch_size < 1 or args.num_inference_steps < 1:
        parser.error("--batch_size and --num_inference_steps must be >= 1")


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
    elif not all(v is not None for v in single):
        parser.error("one sample needs --source, --mask, --text and --output (or use --data and --output_dir)")
    elif not args.text.strip():
        parser.error("--text is empty")
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
    from train.data.dataset import DatasetError, Record, load_records

    try:
        if args.data:
            records = load_records(args.data, resolution=args.resolution)[: args.limit]
        else:
            paths = [Path(p).resolve() for p in (args.source, args.mask)]
            missing = [str(p) for p in paths + ([Path(args.ref)] if args.ref else []) if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"not found: {', '.join(missing)}")
            records = [Record(id=paths[0].stem, source=paths[0], mask=paths[1], text=args.text,
                              ref=Path(args.ref).resolve() if args.ref else None)]
        dataset = dataset_from_args(records, args)
        dataset[0]  # preprocessing problems (e.g. a size mismatch) surface before the model loads
        model = model_from_args(args)
    except (DatasetError, AdapterFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outputs = generate_dataset(model, dataset, args, 0.0 if args.no_adapter else args.scale)
    if not args.data:
        _, _, image = next(outputs)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        image.save(args.output)
        print(json.dumps({"output": str(args.output), "seed": args.seed}))
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_names(r.id for r in records)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for i, sample, image in outputs:
            image.save(out / f"{names[i]}.png")
            f.write(json.dumps({"id": sample.id, "text": sample.text, "image": f"{names[i]}.png",
                                "seed": args.seed + i}, ensure_ascii=False) + "\n")
    print(json.dumps({"output_dir": str(out), "samples": len(records)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
