"""Supervised training overhead on the tiny model (SPEC §13). Prints one JSON object.

    .venv/bin/python benchmarks/train_step.py [--steps 30] [--batch 2]

- ``train_overhead``: wall time of one full micro-step (data, cached prompt embeddings, VAE
  encode, conditioning, forward, backward, optimizer) / one bare transformer+adapter
  forward+backward at the same shapes, both measured here in one run.
- ``prompt_encoder_calls_after_warmup``: text-encoder calls during a whole epoch after the cache
  was filled (target 0; the encoders are freed, so any call would fail).
- ``ema_bytes_per_trainable_param``: memory the EMA shadow adds per trainable parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    from train.config import parse_args
    from train.data.synthesize import synthesize
    from train.models.tiny import write_tiny_models
    from train.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    models = write_tiny_models(tmp / "models")
    data = synthesize(tmp / "data", num=max(8, 2 * args.batch), resolution=64, seed=0)
    cfg = parse_args([
        "--pretrained_model_name_or_path", str(models["flux"]), "--siglip_path", str(models["siglip"]),
        "--train_data_json", str(data), "--output_dir", str(tmp / "run"), "--resolution", "64",
        "--num_tokens", "8", "--max_sequence_length", "32", "--reference_strip_height", "16",
        "--train_batch_size", str(args.batch), "--max_train_steps", str(10**6), "--report_to", "none",
        "--use_ema",
    ])
    trainer = Trainer(cfg)
    trainer.setup()
    calls_after_warmup = trainer.prompts.encoder_calls
    batches = trainer._loader()

    def micro_step():
        batch, keys = next(batches)
        loss = trainer.train_step(batch, keys)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step_s = _median_time(micro_step, args.steps)
    for _ in range(trainer.batches_per_epoch):  # one whole epoch more: no encoder call may happen
        micro_step()
    calls_in_epoch = trainer.prompts.encoder_calls - calls_after_warmup

    # The bare model at the same shapes: transformer + adapter forward and backward only.
    batch, _ = next(batches)
    model = trainer.model
    embeds, pooled, ids = trainer.prompts.get(batch.texts)
    cond = model.prepare_condition(batch.image, batch.mask, embeds, pooled, ids, trainer._style_embeds(batch), 30.0)
    x = torch.randn(len(batch), cond.cond_latents.shape[1], 64)
    sigma = torch.full((len(batch),), 0.5)

    def fwd_bwd():
        model.velocity(x, sigma, cond, adapter=trainer.adapter).square().mean().backward()

    fb_s = _median_time(fwd_bwd, args.steps)
    trainable = sum(p.numel() for p in model.adapter.parameters() if p.requires_grad)
    ema_bytes = sum(t.numel() * t.element_size() for t in trainer.ema.shadow.values())
    print(json.dumps({
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "model": "tiny FLUX.1-Fill (1+1 blocks) at 64x64 + 16 px strip",
        "batch": args.batch,
        "micro_step_s": round(step_s, 5),
        "forward_backward_s": round(fb_s, 5),
        "train_overhead": round(step_s / fb_s, 3),
        "prompt_encoder_calls_after_warmup": calls_in_epoch,
        "ema_bytes_per_trainable_param": ema_bytes / trainable,
        "trainable_params": trainable,
    }))


if __name__ == "__main__":
    main()
