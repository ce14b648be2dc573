"""Training-loop overhead on the CPU proxy model (docs/ARCHITECTURE.md §13). Prints one JSON object.

    python benchmarks/train_step.py [--quick] [--size proxy|full]

The real trainers run on the proxy model (:mod:`benchmarks.proxy`); a loop's own time (its
``timing/rollout_s`` / ``timing/update_s``, or the CPU time of 10 supervised steps) is divided by
the time spent inside the model during that same stretch (:class:`ModelClock` times every
``velocity`` call and every ``accelerator.backward`` in place), so both sides of a ratio are
measured at the same moments. Medians over pieces of loop (the first, warming caches up, left
out). Everything runs on one torch thread with the clock set to process CPU time
(:func:`benchmarks.common.cpu_clock`), so other jobs on a shared machine stretch neither side:

- supervised: optimizer step ÷ its micro-batches' (forward + backward) at accumulation 4 as
  ``examples/train_supervised.sh`` trains, with the VAE latents cached per sample (the default); for
  comparison with ``--latent_cache off`` (both VAE encodes timed every step) and at accumulation 1;
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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cpu_clock  # noqa: E402

BIG = 10**6


def proxy_argv(models, data, out, **flags) -> list[str]:
    base = {"pretrained_model_name_or_path": models["flux"], "siglip_path": models["siglip"], "train_data_json": data,
            "output_dir": out, "resolution": 128, "reference_strip_height": 32, "max_sequence_length": 32,
            "num_tokens": 16, "max_train_steps": BIG, "checkpointing_steps": BIG, "report_to": "none",
            "mixed_precision": "no", "use_ema": True, "ema_device": "cpu", "learning_rate": 1e-4}
    from train.config import to_argv

    return to_argv({**base, **flags})


def _trainer(argv):
    from train.config import parse_args
    from train.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    trainer.setup()
    return trainer


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


# ---------------------------------------------------------------------------------------------- model time
class ModelClock:
    """Time spent inside the model while the real loops run: every ``Calligrapher.velocity`` call and every
    ``accelerator.backward`` (and, separately, the VAE encodes), accumulated on the instances' own methods.

    Loop time ÷ model time measured this way compares the two at the same moments, so drift in the
    machine's load cannot favour one side. In an RL epoch the velocity calls before the first one with
    gradients are the rollout's; from it on they and the backwards are the update's.
    """

    def __init__(self, trainer):
        self.reset()
        model, acc = trainer.model, trainer.accelerator
        model.velocity = self._timed(model.velocity, "model")
        acc.backward = self._timed(acc.backward, "model")
        model._vae_encode = self._timed(model._vae_encode, "vae")
        trainer.optimizer_step = self._timed(trainer.optimizer_step, "optimizer")

    def _timed(self, fn, kind: str):
        def timed(*args, **kwargs):
            if kind == "model" and torch.is_grad_enabled():
                self.updating = True
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                if kind == "model":
                    self.model_s["update" if self.updating else "rollout"] += elapsed
                else:
                    self.other_s[kind] += elapsed

        return timed

    def reset(self) -> None:
        self.model_s, self.other_s = {"rollout": 0.0, "update": 0.0}, {"vae": 0.0, "optimizer": 0.0}
        self.updating = False


# ---------------------------------------------------------------------------------------------- supervised
def _last(trainer, name: str) -> float:
    return next(m[name] for _, m in reversed(trainer.history) if name in m)


def supervised(models, data, work: Path, chunks: int, steps: int, latent_cache: str = "host",
               accumulation: int = 4) -> dict:
    """One supervised phase of ``chunks x steps`` optimizer steps of ``accumulation`` micro-batches, as a
    run trains (one loader); each chunk's time ÷ the model time inside it (the first chunk, filling the
    caches, left out when there are several). ``forward_backward_s`` is per optimizer step: all of its
    micro-batches' forwards and backwards."""
    from train.supervised import train_supervised

    trainer = _trainer(proxy_argv(models, data, work / f"supervised-{latent_cache}-{accumulation}",
                                  latent_cache=latent_cache, gradient_accumulation_steps=accumulation))
    calls_at_start = trainer.prompts.encoder_calls
    clock = ModelClock(trainer)
    marks = [(time.perf_counter(), 0.0, 0.0, 0.0)]
    after_step = trainer.after_optimizer_step

    def mark_chunks(*args, **kwargs):
        after_step(*args, **kwargs)
        if trainer.global_step % steps == 0:
            marks.append((time.perf_counter(), clock.model_s["update"], clock.other_s["vae"],
                          clock.other_s["optimizer"]))

    trainer.after_optimizer_step = mark_chunks
    train_supervised(trainer, chunks * steps)
    trainer.after_optimizer_step = after_step
    rows = [tuple((b[i] - a[i]) / steps for i in range(4)) for a, b in zip(marks, marks[1:])]
    rows = rows[1:] if len(rows) > 1 else rows
    step_s, model_s, vae_s, opt_s = (statistics.median(r[i] for r in rows) for i in range(4))
    epochs = trainer.epoch + trainer.position / trainer.batches_per_epoch
    _backward_once(trainer)
    trainer.close()
    return {
        "optimizer_step_s": round(step_s, 4), "forward_backward_s": round(model_s, 4),
        "overhead": round(step_s / model_s, 3), "target": 1.25,
        "vae_encodes_s": round(vae_s, 4), "vae_encodes_share_of_step": round(vae_s / step_s, 3),
        "optimizer_step_share": round(opt_s / step_s, 3), "latent_cache": latent_cache,
        "text_encoder_calls_during_training": trainer.prompts.encoder_calls - calls_at_start,
        "epochs_trained": round(epochs, 2), "batch": trainer.cfg.train_batch_size, "chunks": len(rows),
        "gradient_accumulation_steps": accumulation,
        "bytes_per_trainable_param": bytes_per_param(trainer),
    }


# ---------------------------------------------------------------------------------------------- RL
def rl(method: str, models, data, work: Path, epochs: int, num_steps: int, fraction: float) -> dict:
    """``epochs`` RL epochs of one optimizer step each: the rollout's and the update's time ÷ the model time
    inside them (the first epoch, warming caches up, left out when there are several); then the sampling
    loop alone, the same way."""
    from train.data.preprocess import collate_samples
    from train.rl_logic.grpo_trainer import train_grpo
    from train.rl_logic.nft_trainer import train_nft
    from train.rl_logic.rollout import image_generators, rollout_batch, sample_trajectory
    from train.rl_ip.sampling import choose_train_steps, nft_train_steps

    trainer = _trainer(proxy_argv(models, data, work / method, use_rl=True, rl_method=method, rl_warmup_steps=0,
                                  train_batch_size=2, rl_num_images_per_prompt=2, rl_num_inference_steps=num_steps,
                                  rl_timestep_fraction=fraction, reward_weights="contrast=1"))
    cfg = trainer.cfg
    for i in range(len(trainer.dataset)):  # SigLIP runs once per sample: measure the steady state
        trainer.style_embeds(collate_samples([trainer.dataset[i]]))
    trained = (len(choose_train_steps(list(range(num_steps - 1)), fraction, torch.Generator())) if method == "grpo"
               else len(nft_train_steps(num_steps, fraction, torch.Generator())))
    clock = ModelClock(trainer)
    loop = train_grpo if method == "grpo" else train_nft
    rows = []
    for _ in range(epochs):
        clock.reset()
        loop(trainer, trainer.global_step + 1)  # one RL epoch
        rows.append((_last(trainer, "timing/rollout_s"), clock.model_s["rollout"],
                     _last(trainer, "timing/update_s"), clock.model_s["update"]))
    rows = rows[1:] if len(rows) > 1 else rows
    rollout_s, rollout_model_s, update_s, update_model_s = (statistics.median(r[i] for r in rows) for i in range(4))

    draw = rollout_batch(trainer, 0, 0)
    cond = trainer.condition(draw.samples, cfg.rl_guidance_scale)
    sigmas = trainer.model.sigmas(num_steps, cond.cond_latents.shape[1])
    grpo = method == "grpo"
    loops = []
    for _ in range(2 if epochs > 1 else 1):
        clock.reset()
        t0 = time.perf_counter()
        sample_trajectory(trainer, cond, image_generators(cfg, 0, 0, draw.image_keys), sigmas,
                          stochastic=range(0, num_steps - 1) if grpo else None,
                          noise_level=cfg.rl_noise_level if grpo else 0.0,
                          params=None if grpo else trainer.rl.old.params())
        loops.append((time.perf_counter() - t0) / clock.model_s["rollout"])
    _backward_once(trainer)
    trainer.close()
    pure = "forward + backward + reference forward" if grpo else "3 forwards + 1 backward"
    return {
        "rollout": {"rollout_s": round(rollout_s, 4), "steps": num_steps, "batch": cfg.train_batch_size,
                    "batched_forward_s": round(rollout_model_s / num_steps, 4),
                    "overhead": round(rollout_s / rollout_model_s, 3),
                    "sampling_loop_overhead": round(loops[-1], 3), "target": 1.15},
        "train": {"per_trained_step_s": round(update_s / trained, 4),
                  "pure_model_s": round(update_model_s / trained, 4),
                  "pure_model": pure, "overhead": round(update_s / update_model_s, 3), "target": 1.25,
                  "trained_steps_per_epoch": trained},
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


def profile_supervised(out: Path, steps: int = 10) -> dict:
    """``torch.profiler`` traces of ``steps`` steady-state supervised steps on the proxy (accumulation 4), with
    the latent cache and with ``--latent_cache off``: ``OUT/supervised_{host,off}.trace.json`` (Chrome /
    Perfetto) and ``.txt`` (operators by self CPU time)."""
    from benchmarks.proxy import write_proxy_models
    from train.data.synthesize import synthesize
    from train.supervised import train_supervised

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(tmp)
        models = write_proxy_models(work / "models")
        data = synthesize(work / "data", num=8, resolution=128, seed=0)
        for cache in ("host", "off"):
            trainer = _trainer(proxy_argv(models, data, work / cache, latent_cache=cache, gradient_accumulation_steps=4,
                                          use_ema=False))
            train_supervised(trainer, 4)  # one pass over the data: the caches are filled
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                train_supervised(trainer, 4 + steps)
            trainer.close()
            trace, table = out / f"supervised_{cache}.trace.json", out / f"supervised_{cache}.txt"
            prof.export_chrome_trace(str(trace))
            table.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            written[cache] = {"trace": str(trace), "table": str(table)}
    return {"profiles": written, "steps": steps, "gradient_accumulation_steps": 4}


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
            sup = supervised(models, data, work, chunks=1, steps=2)
            uncached = supervised(models, data, work, chunks=1, steps=2, latent_cache="off")
            single = supervised(models, data, work, chunks=1, steps=2, accumulation=1)
            grpo = rl("grpo", models, data, work, epochs=1, num_steps=2, fraction=1.0)
            nft = rl("nft", models, data, work, epochs=1, num_steps=2, fraction=0.5)
        else:
            # 8 samples: the caches are filled in the first chunk
            sup = supervised(models, data, work, chunks=5, steps=10)
            uncached = supervised(models, data, work, chunks=5, steps=10, latent_cache="off")
            single = supervised(models, data, work, chunks=5, steps=10, accumulation=1)
            grpo = rl("grpo", models, data, work, epochs=5, num_steps=50, fraction=0.2)
            nft = rl("nft", models, data, work, epochs=5, num_steps=50, fraction=0.2)
    torch.set_num_threads(threads)
    from benchmarks.proxy import spec

    return {"model": spec().source, "mixed_precision": "no", "clock": "process CPU time, 1 torch thread",
            "supervised": sup, "supervised_latent_cache_off": uncached,
            "supervised_accumulation_1": single, "grpo": grpo, "nft": nft}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each (seconds, for tests)")
    parser.add_argument("--size", choices=("proxy", "full"), default="proxy")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="instead: write torch.profiler traces of steady-state supervised steps to DIR")
    args = parser.parse_args(argv)
    print(json.dumps(profile_supervised(args.profile) if args.profile else run(args.quick, args.size), indent=1))


if __name__ == "__main__":
    main()
