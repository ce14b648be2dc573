"""Supervised flow-matching phase (docs/ARCHITECTURE.md §6): the whole run without ``--use_rl``, the warm-up with it.

One micro-batch: cached prompt and style embeddings -> FLUX-Fill conditioning -> clean latents of
the source (with its text) -> noise and noise level keyed per sample -> weighted MSE between the
predicted and the true velocity ``eps - x0``. Gradient accumulation and the optimizer step follow
accelerate; LR, EMA, logging and checkpoints are the run's shared :meth:`Trainer.after_optimizer_step`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .flow_matching import flow_matching_loss, interpolate, pixel_mask_to_tokens, sample_sigmas, token_weights
from .rng import sample_generator

if TYPE_CHECKING:  # the trainer runs this phase; the phase only reads its state
    from .trainer import Trainer


def training_sigmas(model) -> torch.Tensor:
    """The scheduler's training noise levels (descending from 1), as flow matching samples them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fresh = FlowMatchEulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    return fresh.sigmas[:-1].to(torch.float32) if fresh.sigmas[-1] == 0 else fresh.sigmas.to(torch.float32)


def supervised_loss(trainer: Trainer, batch, keys, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of one micro-batch; ``keys`` are the samples' ``(epoch, position)``."""
    cfg, model = trainer.cfg, trainer.model
    cond = trainer.condition(batch, cfg.guidance_scale)
    x0 = trainer.clean_latents(batch)
    draws = [sample_generator(cfg.seed, e, p) for e, p in keys]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws]).to(x0.device, x0.dtype)
    normal = torch.stack([torch.randn((), generator=g) for g in draws])
    sigma = sample_sigmas(normal, train_sigmas).to(x0.device)
    x_t = interpolate(x0, noise, sigma)
    target = noise - x0

    weights = token_weights(pixel_mask_to_tokens(batch.mask), trainer.source_tokens(batch),
                            cfg.masked_loss_weight).to(x0.device)
    with trainer.accelerator.autocast():
        pred = model.velocity(x_t, sigma, cond, adapter=trainer.adapter)
    return flow_matching_loss(pred, target, weights)


def train_supervised(trainer: Trainer, end: int) -> None:
    """Optimizer steps until ``trainer.global_step == end``."""
    cfg, acc = trainer.cfg, trainer.accelerator
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    train_sigmas = training_sigmas(trainer.model)
    step_start, losses = time.perf_counter(), []
    batches = trainer.loader()
    try:
        while trainer.global_step < end:
            batch, keys = next(batches)
            with acc.accumulate(trainer.adapter):
                loss = supervised_loss(trainer, batch, keys, train_sigmas)
                acc.backward(loss)
                grad_norm = trainer.optimizer_step(loss)
            losses.append(loss.detach())
            if not acc.sync_gradients:
                continue
            elapsed = time.perf_counter() - step_start
            mean_loss = acc.gather(torch.stack(losses).mean()[None]).mean().item()
            trainer.after_optimizer_step({
                "train/loss": mean_loss, "train/grad_norm": grad_norm, "train/epoch": trainer.epoch,
                "timing/step_s": elapsed,
                "perf/images_per_s": trainer.global_batch * cfg.gradient_accumulation_steps / elapsed,
            }, progress={"loss": mean_loss})
            step_start, losses = time.perf_counter(), []
    finally:
        batches.close()
