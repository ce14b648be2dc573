"""DiffusionNFT for the style adapter (docs/ARCHITECTURE.md §8), one RL epoch at a time, top to bottom:

rollout   ``--rl_num_batches_per_epoch`` batches drawn with the **old** adapter by the deterministic
          sampler; only the clean latents x0 are kept; rewards are scored in the background
          while the next batch rolls out;
reward    gathered from every process, failures dropped within the budget;
advantage exactly as GRPO computes them (``train/rl_ip/stat_tracking.py``);
update    ``--rl_num_inner_epochs`` passes; per sample the first ``ceil(fraction x T)`` of a random
          permutation of the sampler's noise levels; per trained level fresh noise,
          x_t = (1 - t) x0 + t eps and three forwards — current (grad), old and reference (no grad),
          each with its own projection and attention weights — into the negative-aware loss
          (``nft_forward.py``); one optimizer step per ``gradient_accumulation_steps``
          micro-batches x trained levels, then the shared LR / EMA / logging path;
old       after the epoch, old <- d * old + (1 - d) * current with d = ``nft_decay`` of the RL
          optimizer-step count;
then      held-out evaluation, image grids and a checkpoint when due.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from .. import rng
from ..flow_matching import interpolate
from ..models.calligrapher import FillConditioning
from ..rl_ip.sampling import Trajectory, nft_train_steps
from ..rng import keyed_generator
from .nft_forward import nft_decay, nft_loss
from .rollout import (EpochRewards, RolloutBatch, collect_rewards, end_of_epoch, rollout_epoch, sample_trajectory,
                      start_rl, step_metrics)

NFT_METRICS = ("loss", "policy_loss", "kl", "old_deviate", "r_mean", "loss_pos", "loss_neg")  # averaged per optimizer step


def train_nft(trainer, end: int) -> None:
    cfg, acc, rl = trainer.cfg, trainer.accelerator, trainer.rl
    ctx = start_rl(trainer, with_old=True)
    try:
        while trainer.global_step < end:
            # ---------------------------------------------------------------- rollout (old adapter)
            rollouts = rollout_epoch(trainer, ctx, rl.epoch, partial(old_rollout, trainer, rl.old.params(acc.device)))
            # ---------------------------------------------------------------- reward + advantage
            rewards = collect_rewards(trainer, ctx, rollouts)
            # ---------------------------------------------------------------- update
            t0 = time.perf_counter()
            metrics = nft_update(trainer, rollouts.batches, rewards, end)
            ctx.timings["update_s"] = time.perf_counter() - t0
            # ---------------------------------------------------------------- old adapter
            d = nft_decay(trainer.global_step - rl.start_step, cfg.nft_decay_type)
            rl.old.lerp_from(trainer.adapter, d)
            metrics["nft/decay"] = d
            end_of_epoch(trainer, ctx, metrics, rewards)
    finally:
        ctx.close()


def old_rollout(trainer, old: dict, batch_index: int, cond: FillConditioning, generators, sigmas: torch.Tensor,
                tokens: torch.Tensor) -> Trajectory:
    """NFT's sampler of one rollout batch: the deterministic sampler with the old adapter's weights ``old``; only
    the clean latents are kept."""
    return sample_trajectory(trainer, cond, generators, sigmas, params=old)


def nft_step_loss(model, cond: FillConditioning, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  advantages: torch.Tensor, *, autocast, beta: float, adv_mode: str, adv_clip_max: float,
                  kl_beta: float, old: dict, ref: dict | None = None, adapter=None, valid: torch.Tensor | None = None,
                  token_weights: torch.Tensor | None = None):
    """The loss of one trained level of a micro-batch of B: x_t = (1 − t)·x0 + t·ε from the clean latents
    ``x0 [B, L, C]`` (float32), the noise ``[B, L, C]`` and the levels ``t [B]``; the current (with gradients),
    old and reference (without) velocities under ``autocast()``; then
    :func:`~train.rl_logic.nft_forward.nft_loss` (no KL without ``ref``). Returns ``(loss, info)``."""
    x_t = interpolate(x0, noise, t)  # float32: x̂0 = x_t − t·v is formed from it in the loss
    x_in = x_t.to(model.dtype)  # only the model input is rounded
    with autocast():
        v_theta = model.velocity(x_in, t, cond, adapter=adapter)
        with torch.no_grad():
            v_old = model.velocity(x_in, t, cond, params=old)
            v_ref = model.velocity(x_in, t, cond, params=ref) if ref is not None else v_old
    return nft_loss(x0, x_t, t, v_theta, v_old, v_ref, advantages, beta=beta, adv_mode=adv_mode,
                    adv_clip_max=adv_clip_max, kl_beta=kl_beta if ref is not None else 0.0, valid=valid,
                    token_weights=token_weights)


def nft_update(trainer, batches: list[RolloutBatch], rewards: EpochRewards, end: int) -> dict[str, float]:
    """Inner epochs over this rank's rollouts of one RL epoch; returns the last optimizer step's metrics."""
    cfg, acc, rl = trainer.cfg, trainer.accelerator, trainer.rl
    cond = FillConditioning.cat([rb.cond for rb in batches])
    x0_all = torch.cat([rb.traj.final for rb in batches])  # [N, L, C] float32
    tokens = torch.cat([rb.tokens for rb in batches])  # [N, L]
    sigmas = batches[0].sigmas[:-1]  # the sampler's noise levels (all batches share one canvas size)
    image_ids = [j for rb in batches for j in rb.image_ids]
    old, ref = rl.old.params(acc.device), rl.ref.params(acc.device) if rl.ref is not None else None
    settings = dict(autocast=acc.autocast, beta=cfg.nft_beta, adv_mode=cfg.nft_adv_mode,
                    adv_clip_max=cfg.rl_adv_clip_max, kl_beta=cfg.rl_kl_beta, old=old, ref=ref,
                    adapter=trainer.adapter)
    n, num_levels = x0_all.shape[0], len(sigmas)
    num_trained = len(nft_train_steps(num_levels, cfg.rl_timestep_fraction, torch.Generator()))
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps * num_trained
    acc.step = 0  # each epoch holds whole optimizer steps; count them from its first backward
    last: dict[str, float] = {}
    infos: list[dict] = []
    step_start = time.perf_counter()
    for inner in range(cfg.rl_num_inner_epochs):
        # Shuffle whole rollout batches: a global micro-batch is then one rollout batch on any number
        # of processes (every rank trains its slice of it), so 2 processes train exactly what 1 does.
        batch_order = torch.randperm(len(batches), generator=keyed_generator(cfg.seed, rng.NFT_BATCH_ORDER,
                                                                               rl.epoch, inner))
        order = [b * cfg.train_batch_size + i for b in batch_order.tolist() for i in range(cfg.train_batch_size)]
        gens = {i: keyed_generator(cfg.seed, rng.NFT_LEVELS, rl.epoch, inner, image_ids[i]) for i in order}
        levels = {i: nft_train_steps(num_levels, cfg.rl_timestep_fraction, gens[i]) for i in order}
        for start in range(0, n, cfg.train_batch_size):
            idx = order[start:start + cfg.train_batch_size]
            sub = cond.select(idx)
            x0 = x0_all[idx]
            adv = rewards.advantages[idx].to(acc.device)
            valid = rewards.valid[idx].to(acc.device)  # a failed reward trains nothing (KL only)
            for j in range(num_trained):
                t = sigmas[[levels[i][j] for i in idx]].to(acc.device)
                noise = torch.stack([torch.randn(x0.shape[1:], generator=gens[i]) for i in idx]).to(x0.device)
                with acc.accumulate(trainer.adapter):
                    loss, info = nft_step_loss(trainer.model, sub, x0, noise, t, adv, **settings, valid=valid,
                                               token_weights=tokens[idx])
                    acc.backward(loss)
                    grad_norm = trainer.optimizer_step(loss)
                infos.append({**info, "loss": loss.detach()})
                if not acc.sync_gradients:
                    continue
                last = step_metrics(acc, infos, NFT_METRICS, ("r",), grad_norm,
                                    time.perf_counter() - step_start)
                trainer.after_optimizer_step(last, progress={"reward": rewards.metrics["reward/mean"]},
                                             checkpoint_now=False)
                infos, step_start = [], time.perf_counter()
                if trainer.global_step >= end:
                    return last
    return last
