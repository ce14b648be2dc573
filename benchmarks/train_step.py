"""Training-loop overhead on the CPU proxy model (SPEC §13). Prints one JSON object.

    python benchmarks/train_step.py [--quick] [--size proxy|full]

The real trainers run on the proxy model (:mod:`benchmarks.proxy`); their own step timings
(``timing/step_s``, ``timing/rollout_s``, ``timing/update_s``) are divided by the pure model time
at the same shapes, measured in the same process right after. Everything runs on one torch thread
with the clock set to process CPU time (:func:`benchmarks.common.cpu_clock`), so other jobs on a
shared machine do not stretch one side of a ratio:

- supervised: optimizer step ÷ (forward + backward); the two VAE encodes of the step (source and
  masked source, deterministic) are timed on their own, with the ratio they would leave if cached;
- GRPO: per trained step ÷ (forward + backward + reference forward);
- NFT: per trained step ÷ (3 forwards + 1 backward);
- rollout: the whole rollout (conditioning, sampling, decoding, reward hand-off) and the sampling
  loop alone ÷ (steps × one batched forward);
- text-encoder calls during training after the prompt cache was filled (target 0);
- bytes per trainable parameter the run holds beyond the frozen base, walked from live tensors.

``--size full`` measures seconds per optimizer step and model FLOP utilisation of the bare model
steps at FLUX.1-Fill-dev size on a CUDA GPU (on a CPU it says so and exits 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cpu_clock, median_time  # noqa: E402

BIG = 10**6


def proxy_argv(models, data, out, **flags) -> list[str]:
    base = {"pretrained_model_name_or_path": models["flux"], "siglip_path": models["siglip"], "train_data_json": data,
            "output_dir": out, "resolution": 128, "reference_strip_height": 32, "max_sequence_length": 32,
            "num_tokens": 16, "max_train_steps": BIG, "checkpointing_steps": BIG, "report_to": "none",
            "mixed_precision": "no", "use_ema": True, "ema_device": "cpu", "learning_rate": 1e-4}
    base.update(flags)
    argv = []
    for k, v in base.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not False and v is not None:
            argv += [f"--{k}", str(v)]
    return argv


def _trainer(argv):
    from train.config import parse_args
    from train.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    trainer.setup()
    return trainer


def _steady(trainer, name: str) -> float:
    """Median of a logged timing, leaving out the first value (caches warm up) when there are several."""
    values = [m[name] for _, m in trainer.history if name in m]
    return statistics.median(values[1:] if len(values) > 1 else values)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_per_param(trainer) -> dict:
    """Bytes the run holds per trainable parameter beyond the frozen base: on the device (adapter, gradients,
    optimizer state, RL copies) and the EMA shadow, counted on the device or on the CPU as --ema_device puts it."""
    adapter = trainer.model.adapter
    n = sum(p.numel() for p in adapter.parameters())
    opt = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    device = _nbytes(adapter.parameters()) + _nbytes(p.grad for p in adapter.parameters() if p.grad is not None)
    device += _nbytes(opt) + sum(c.nbytes() for c in (trainer.rl.ref, trainer.rl.old) if c is not None)
    ema = _nbytes(trainer.ema.shadow.values()) if trainer.ema is not None else 0
    return {"no_ema": round(device / n, 3), "ema_on_cpu": round(device / n, 3),
            "ema_on_cpu_host": round(ema / n, 3), "ema_on_device": round((device + ema) / n, 3)}


def _backward_once(trainer) -> None:
    from train.supervised import supervised_loss, training_sigmas

    batch, keys = next(trainer.loader())
    supervised_loss(trainer, batch, keys, training_sigmas(trainer.model)).backward()


def _drop_grads(module) -> None:
    for p in module.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------------------- supervised
def supervised(models, data, work: Path, steps: int, repeats: int) -> dict:
    from train.flow_matching import flow_matching_loss

    trainer = _trainer(proxy_argv(models, data, work / "supervised"))
    acc, model, cfg = trainer.accelerator, trainer.model, trainer.cfg
    calls_at_start = trainer.prompts.encoder_calls
    trainer.run(stop_at=steps)
    epochs = trainer.epoch + trainer.position / trainer.batches_per_epoch
    step_s = _steady(trainer, "timing/step_s")  # logged every --logging_steps (10) steps

    batch, _ = next(trainer.loader())
    cond = trainer.condition(batch, cfg.guidance_scale)
    x0 = model.encode_latents(batch.image)
    x_t, sigma = torch.randn_like(x0), torch.full((x0.shape[0],), 0.5)
    weights = torch.ones(x0.shape[:2])

    def forward_backward():
        with acc.autocast():
            pred = model.velocity(x_t, sigma, cond, adapter=trainer.adapter)
        flow_matching_loss(pred, x0, weights).backward()
        _drop_grads(model.adapter)

    def vae_encodes():  # the step's two encodes: the source, and the masked source inside the conditioning
        model.encode_latents(batch.image)
        model.prepare_condition(batch.image, batch.mask, cond.prompt_embeds, cond.pooled_prompt_embeds,
                                cond.text_ids, cond.style_embeds, cfg.guidance_scale)

    fb_s = median_time(forward_backward, repeats)
    vae_s = median_time(vae_encodes, repeats)
    _backward_once(trainer)
    return {
        "optimizer_step_s": round(step_s, 4), "forward_backward_s": round(fb_s, 4),
        "overhead": round(step_s / fb_s, 3), "target": 1.25,
        "vae_encodes_s": round(vae_s, 4), "vae_encodes_share_of_step": round(vae_s / step_s, 3),
        "overhead_with_cached_vae_encodes": round((step_s - vae_s) / fb_s, 3),
        "text_encoder_calls_during_training": trainer.prompts.encoder_calls - calls_at_start,
        "epochs_trained": round(epochs, 2), "batch": cfg.train_batch_size,
        "bytes_per_trainable_param": bytes_per_param(trainer),
    }


# ---------------------------------------------------------------------------------------------- RL
def rl(method: str, models, data, work: Path, epochs: int, repeats: int, num_steps: int, fraction: float) -> dict:
    from train.data.preprocess import collate_samples
    from train.rl_logic.rollout import image_generators, rollout_batch, sample_trajectory
    from train.rl_ip.sampling import choose_train_steps, nft_train_steps

    trainer = _trainer(proxy_argv(models, data, work / method, use_rl=True, rl_method=method, rl_warmup_steps=0,
                                  train_batch_size=2, rl_num_images_per_prompt=2, rl_num_inference_steps=num_steps,
                                  rl_timestep_fraction=fraction, reward_weights="contrast=1"))
    acc, model, cfg = trainer.accelerator, trainer.model, trainer.cfg
    for i in range(len(trainer.dataset)):  # SigLIP runs once per sample: measure the steady state
        trainer.style_embeds(collate_samples([trainer.dataset[i]]))
    trainer.run(stop_at=epochs)
    trained = (len(choose_train_steps(list(range(num_steps - 1)), fraction, torch.Generator())) if method == "grpo"
               else len(nft_train_steps(num_steps, fraction, torch.Generator())))
    rollout_s = _steady(trainer, "timing/rollout_s")
    step_s = _steady(trainer, "timing/update_s") / trained

    batch, image_keys, _ = rollout_batch(trainer, 0, 0)
    cond = trainer.condition(batch, cfg.rl_guidance_scale)
    sigmas = model.sigmas(num_steps, cond.cond_latents.shape[1])
    x = torch.randn(cond.batch_size, cond.cond_latents.shape[1], 64)
    ref = trainer.rl.ref.params() if trainer.rl.ref is not None else None
    old = trainer.rl.old.params() if trainer.rl.old is not None else None
    rollout_params = old if method == "nft" else None

    def forward():
        with torch.no_grad(), acc.autocast():
            model.velocity(x, 0.5, cond, adapter=trainer.adapter, params=rollout_params)

    def trained_step():
        with acc.autocast():
            v = model.velocity(x, 0.5, cond, adapter=trainer.adapter)
            with torch.no_grad():
                extra = [old, ref] if method == "nft" else [ref]
                for params in extra:
                    if params is not None:
                        model.velocity(x, 0.5, cond, params=params)
        v.float().square().mean().backward()
        _drop_grads(model.adapter)

    def sampling_loop():
        stochastic = range(0, num_steps - 1) if method == "grpo" else None
        sample_trajectory(trainer, cond, image_generators(cfg, 0, 0, image_keys), sigmas, stochastic=stochastic,
                          noise_level=cfg.rl_noise_level if method == "grpo" else 0.0, params=rollout_params)

    fwd_s = median_time(forward, repeats)
    model_step_s = median_time(trained_step, repeats)
    loop_s = median_time(sampling_loop, max(1, repeats // 3))
    _backward_once(trainer)
    pure = "forward + backward + reference forward" if method == "grpo" else "3 forwards + 1 backward"
    return {
        "rollout": {"rollout_s": round(rollout_s, 4), "sampling_loop_s": round(loop_s, 4), "steps": num_steps,
                    "batched_forward_s": round(fwd_s, 4), "batch": cfg.train_batch_size,
                    "overhead": round(rollout_s / (num_steps * fwd_s), 3),
                    "sampling_loop_overhead": round(loop_s / (num_steps * fwd_s), 3), "target": 1.15},
        "train": {"per_trained_step_s": round(step_s, 4), "pure_model_s": round(model_step_s, 4), "pure_model": pure,
                  "overhead": round(step_s / model_step_s, 3), "target": 1.25, "trained_steps_per_epoch": trained},
        "rl_epochs": epochs, "bytes_per_trainable_param": bytes_per_param(trainer),
    }


# ---------------------------------------------------------------------------------------------- full size
def full_size() -> dict:
    """Bare model steps at FLUX.1-Fill-dev size on a CUDA GPU (random weights)."""
    if not torch.cuda.is_available():
        return {"skipped": "--size full needs a CUDA GPU (FLUX.1-Fill-dev in bf16 is 24 GB); none is visible"}
    from benchmarks.full_size import measure

    try:
        return measure()
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": f"out of GPU memory: {str(exc).splitlines()[0]}"}


def run(quick: bool = False, size: str = "proxy", workdir: Path | None = None) -> dict:
    if size == "full":
        return full_size()
    from benchmarks.proxy import write_proxy_models
    from train.data.synthesize import synthesize

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the trainers' console lines go to stderr: stdout carries the JSON
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, cpu_clock(), \
            contextlib.redirect_stdout(sys.stderr):
        work = Path(workdir or tmp)
        models = write_proxy_models(work / "models")
        data = synthesize(work / "data", num=8, resolution=128, seed=0)
        if quick:
            sup = supervised(models, data, work, steps=10, repeats=2)
            grpo = rl("grpo", models, data, work, epochs=1, repeats=1, num_steps=3, fraction=0.5)
            nft = rl("nft", models, data, work, epochs=1, repeats=1, num_steps=3, fraction=0.34)
        else:
            sup = supervised(models, data, work, steps=30, repeats=9)
            grpo = rl("grpo", models, data, work, epochs=4, repeats=7, num_steps=20, fraction=0.2)
            nft = rl("nft", models, data, work, epochs=4, repeats=7, num_steps=20, fraction=0.2)
    torch.set_num_threads(threads)
    from benchmarks.proxy import spec

    return {"model": spec().source, "mixed_precision": "no", "clock": "process CPU time, 1 torch thread",
            "supervised": sup, "grpo": grpo, "nft": nft}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each (seconds, for tests)")
    parser.add_argument("--size", choices=("proxy", "full"), default="proxy")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.size), indent=1))


if __name__ == "__main__":
    main()
