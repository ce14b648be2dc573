"""Evaluate one checkpoint, or several side by side, on a dataset: scores, ``metrics.json``, HTML report.

    python -m train.evaluate --pretrained_model_name_or_path FLUX.1-Fill-dev --siglip_path siglip-so400m \\
        --ip_adapter_path runs/sft/checkpoint-1000 --ip_adapter_path runs/rl/checkpoint-3000@ema \\
        --label before_rl --label after_rl --data bench/ --output_dir eval/ --batch_size 4

Every checkpoint column runs the same samples with the same seeds (sample ``i``: ``--seed + i``),
so differences come from the weights only. ``PATH@ema`` picks ``ip-adapter-ema.bin`` of that
checkpoint folder (``--ema`` does it for all); ``--no_adapter`` adds the base model without style
as a first column. Scores per sample: OCR accuracy, style similarity, background preservation
and their weighted sum (``--reward_weights``, by default training's), computed in-process or by
reward servers (``--reward_server_url``). Writes ``OUTPUT_DIR/metrics.json``,
``OUTPUT_DIR/report.html`` and the images under ``OUTPUT_DIR/images/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from train.cli_flags import split_ema
from train.infer import (add_model_args, check_common_args, dataset_from_args, generate_dataset,
                         load_model, output_dir_problem, quiet_loading, read_adapter, unique_names, use_adapter_state)
from train.models.checkpoint_io import AdapterFileError, atomic_write_text
from train.report import METRICS, write_report

BASE_LABEL = "base (no style)"


def parse_columns(args) -> list[dict]:
    """``[{label, path, ema}]`` in column order; ``path=None`` is the base model."""
    columns = [{"label": BASE_LABEL, "path": None, "ema": False}] if args.no_adapter else []
    for spec in args.ip_adapter_path:
        path, ema = split_ema(str(spec), args.ema)
        columns.append({"label": None, "path": path, "ema": ema})
    if not columns:
        raise ValueError("nothing to evaluate: pass --ip_adapter_path (once per checkpoint) or --no_adapter")
    labels = list(args.label or [])
    named = [c for c in columns if c["path"] is not None]
    if labels and len(labels) != len(named):
        raise ValueError(f"{len(labels)} --label for {len(named)} --ip_adapter_path")
    for i, c in enumerate(named):
        c["label"] = labels[i] if labels else _default_label(c["path"], c["ema"])
    seen = [c["label"] for c in columns]
    if len(set(seen)) != len(seen):
        raise ValueError(f"column labels must differ, got {seen}; use --label")
    return columns


def _default_label(path: str, ema: bool) -> str:
    p = Path(path)
    name = p.name if p.is_dir() else f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
    return name + (" (EMA)" if ema else "")


def mask_outline(source: Image.Image, mask: Image.Image) -> Image.Image:
    """The source with the mask region tinted and outlined, for the report's first column."""
    from train.data.image_modes import to_luminance, to_rgb
    from train.data.preprocess import MASK_THRESHOLD

    img = np.asarray(to_rgb(source), dtype=np.float32)
    m = np.asarray(to_luminance(mask).resize(source.size, Image.NEAREST)) > MASK_THRESHOLD
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    img[m] = img[m] * 0.75 + np.array([255, 0, 0]) * 0.25
    img[edge] = (255, 0, 0)
    return Image.fromarray(img.round().clip(0, 255).astype(np.uint8))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _reward_fn(args, weights):
    from train.rl_ip.reward import build_reward_fn

    return build_reward_fn(args.reward_server_url, weights, siglip_path=args.siglip_path,
                           device=args.reward_device)


def training_reward_weights() -> str:
    """Training's default ``--reward_weights`` (``train.config``)."""
    from train.config import TrainConfig

    return TrainConfig().reward_weights


def reward_weights(args) -> tuple[dict, str]:
    """``(weights, note)``: ``--reward_weights``, else equal weights over ``--scorers``, else training's default;
    the note says how they relate to training's default, so a report never silently uses other weights."""
    from train.rewards.base import parse_reward_weights

    default = parse_reward_weights(training_reward_weights())
    if args.reward_weights:
        weights = parse_reward_weights(args.reward_weights)
        source = "--reward_weights"
    elif args.scorers:
        names = [n.strip() for n in args.scorers.split(",") if n.strip()]
        if not names:
            raise ValueError("--scorers is empty")
        weights = parse_reward_weights({n: 1.0 / len(names) for n in names})
        source = "equal weights over --scorers"
    else:
        return default, "training's default --reward_weights"
    if weights == default:
        return weights, f"{source}, the same as training's default"
    return weights, f"{source}; training's default is {training_reward_weights()}"


def evaluate(args) -> dict:
    """Generate, score and write everything; returns the metrics dict (also ``metrics.json``)."""
    from train.data.dataset import load_records, open_image
    from train.data.preprocess import mask_bbox
    from train.rewards.base import RewardItem, parse_reward_weights

    columns = parse_columns(args)
    weights, weights_note = reward_weights(args)
    states = {c["label"]: read_adapter(c["path"], c["ema"], args.num_tokens) if c["path"] else None for c in columns}
    records = load_records(args.data, resolution=args.resolution, flag="--data")[: args.limit]
    dataset = dataset_from_args(records, args)

    out = Path(args.output_dir)
    names = unique_names(r.id for r in records)
    (out / "images" / "inputs").mkdir(parents=True, exist_ok=True)
    inputs = []
    for name, rec in zip(names, records):
        source, mask = open_image(rec.source, "RGB"), open_image(rec.mask, "L")
        ref = open_image(rec.ref, "RGB") if rec.ref is not None else source.crop(mask_bbox(mask))
        mask_outline(source, mask).save(out / "images" / "inputs" / f"{name}_source.png")
        ref.save(out / "images" / "inputs" / f"{name}_ref.png")
        inputs.append((source, mask, ref))

    first = next((s for s in states.values() if s is not None), None)
    model = load_model(args.pretrained_model_name_or_path, args.siglip_path, no_adapter=first is None,
                       device=args.device, dtype=args.dtype, adapter=first, num_tokens=args.num_tokens)
    del first
    reward_fn = _reward_fn(args, weights)
    runs, per_sample = [], [dict() for _ in records]
    folders = unique_names(c["label"] for c in columns)
    try:
        for col, folder_name in zip(columns, folders):
            state = states[col["label"]]
            if state is not None:
                use_adapter_state(model, state[0], str(state[1]))
                states[col["label"]] = state = (None, *state[1:])  # the weights now live in the model
            t0 = time.perf_counter()
            folder = out / "images" / "outputs" / folder_name
            folder.mkdir(parents=True, exist_ok=True)
            items = []
            for i, sample, image in generate_dataset(model, dataset, args, 0.0 if state is None else args.scale):
                image.save(folder / f"{names[i]}.png")
                source, mask, ref = inputs[i]
                items.append(RewardItem(id=f"{i}", image=image, text=sample.text, mask=mask, reference=ref,
                                        source=source))
            seconds = time.perf_counter() - t0
            results = reward_fn(items)
            for i, (res, name) in enumerate(zip(results, names)):
                entry = {"image": f"images/outputs/{folder_name}/{name}.png", "reward": res.reward,
                         "scores": {k: float(v) for k, v in res.scores.items()}, "error": res.error}
                ocr = res.details.get("ocr", {})
                if "recognised" in ocr:
                    entry["recognised"] = ocr["recognised"]
                per_sample[i][col["label"]] = entry
            mean = {m: _mean(per_sample[i][col["label"]]["scores"].get(m) for i in range(len(records)))
                    for m in METRICS}
            mean["reward"] = _mean(r.reward for r in results)
            runs.append({"label": col["label"], "path": str(state[1]) if state else None, "ema": col["ema"],
                         "num_tokens": state[2]["num_tokens"] if state else None, "mean": mean,
                         "errors": sum(r.error is not None for r in results),
                         "seconds": round(seconds, 3)})
    finally:
        reward_fn.close()

    metrics = {
        "dataset": str(args.data), "num_samples": len(records),
        "settings": {"steps": args.num_inference_steps, "guidance": args.guidance_scale, "seed": args.seed,
                     "scale": args.scale, "resolution": args.resolution,
                     "reference_strip": not args.no_reference_strip,
                     "reference_strip_height": args.reference_strip_height or "official rule"},
        "reward_weights": weights, "reward_weights_note": weights_note, "checkpoints": runs,
        "samples": [{"id": rec.id, "text": rec.text, "seed": args.seed + i,
                     "source_image": f"images/inputs/{name}_source.png",
                     "reference_image": f"images/inputs/{name}_ref.png", "outputs": per_sample[i]}
                    for i, (rec, name) in enumerate(zip(records, names))],
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    write_report(metrics, out / "report.html", title=args.title)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, multiple_adapters=True)
    parser.add_argument("--label", action="append", help="column name per --ip_adapter_path, in order")
    parser.add_argument("--data", required=True, help="a .json/.jsonl record file or a benchmark folder")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, report.html and images/ go")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--scorers", default=None,
                        help="score with these scorers, equally weighted (instead of --reward_weights)")
    parser.add_argument("--reward_weights", default=None,
                        help=f"e.g. ocr=0.7,style=0.2,background=0.1 (default: training's, {training_reward_weights()})")
    parser.add_argument("--reward_server_url", default=None, help="comma-separated reward servers (else in-process)")
    parser.add_argument("--reward_device", default="cpu", help="device for in-process scorers")
    parser.add_argument("--title", default="Calligrapher evaluation")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = output_dir_problem("--output_dir", args.output_dir)
    if problem:
        parser.error(problem)
    if args.scorers and args.reward_weights:
        parser.error("give --reward_weights or --scorers, not both")
    check_common_args(parser, args)
    quiet_loading()
    from train.data.dataset import DatasetError
    from train.rl_ip.reward import RewardError

    try:
        metrics = evaluate(args)
    except (DatasetError, AdapterFileError, RewardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {run["label"]: run["mean"] for run in metrics["checkpoints"]}
    print(json.dumps({"output_dir": args.output_dir, "samples": metrics["num_samples"], "mean": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
