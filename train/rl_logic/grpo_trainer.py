"""GRPO for the style adapter (docs/ARCHITECTURE.md §7), one RL epoch at a time, top to bottom:

rollout   ``--rl_num_batches_per_epoch`` batches sampled with the SDE (log-probabilities kept for
          the stochastic steps); each batch's rewards are scored in the background while the
          next one rolls out;
reward    gathered from every process, failures dropped within the budget;
advantage per group or per batch (``train/rl_ip/stat_tracking.py``), this rank's slice kept;
update    ``--rl_num_inner_epochs`` passes; per sample a random subset of its stochastic steps
          (never the final step); each trained step re-scores the stored transition under the
          current adapter (and under the RL-start reference for the KL) and backpropagates the
          clipped policy loss; one optimizer step per ``gradient_accumulation_steps`` micro-batches
          x trained steps, then the shared LR / EMA / logging path;
then      held-out evaluation, image grids and a checkpoint when due.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from .. import rng
from ..config import default_window_range, sde_window_range
from ..models.calligrapher import FillConditioning
from ..rl_ip.grpo_utils import grpo_guard_terms, grpo_loss
from ..rl_ip.sampling import Trajectory, choose_train_steps, sde_step_with_logprob, sde_window
from ..rng import keyed_generator
from .rollout import (EpochRewards, RolloutBatch, collect_rewards, end_of_epoch, rollout_epoch, sample_trajectory,
                      start_rl, step_metrics)

GRPO_METRICS = ("loss", "policy_loss", "kl", "approx_kl", "clipfrac", "ratio_mean")  # averaged per optimizer step
GUARD_METRICS = ("raw_ratio_mean", "guard_weight_mean")  # also, with --rl_grpo_guard


def train_grpo(trainer, end: int) -> None:
    ctx = start_rl(trainer, with_old=False)
    try:
        while trainer.global_step < end:
            epoch = trainer.rl.epoch
            # ---------------------------------------------------------------- rollout (SDE window)
            rollouts = rollout_epoch(trainer, ctx, epoch, partial(sde_rollout, trainer, epoch))
            # ---------------------------------------------------------------- reward + advantage
            rewards = collect_rewards(trainer, ctx, rollouts)
            # ---------------------------------------------------------------- update
            t0 = time.perf_counter()
            metrics = grpo_update(trainer, rollouts.batches, rewards, end)
            ctx.timings["update_s"] = time.perf_counter() - t0
            end_of_epoch(trainer, ctx, metrics, rewards)
    finally:
        ctx.close()


def sde_rollout(trainer, epoch: int, batch_index: int, cond: FillConditioning, generators, sigmas: torch.Tensor,
                tokens: torch.Tensor) -> Trajectory:
    """GRPO's sampler of one rollout batch: the SDE on a window of steps drawn per batch, whose transitions and
    log-probabilities (and, with GRPO-Guard, means) are kept."""
    cfg = trainer.cfg
    lo, hi = sde_window(cfg.rl_num_inference_steps, cfg.rl_sde_window_size, sde_window_range(cfg),
                        keyed_generator(cfg.seed, rng.SDE_WINDOW, epoch, batch_index),
                        default_range=default_window_range(cfg))
    return sample_trajectory(trainer, cond, generators, sigmas, stochastic=range(lo, hi),
                             noise_level=cfg.rl_noise_level, sde_type=cfg.rl_sde_type, token_weights=tokens,
                             keep_means=cfg.rl_grpo_guard)


def grpo_step_loss(model, cond: FillConditioning, x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next,
                   old_log_prob: torch.Tensor, advantages: torch.Tensor, *, autocast, noise_level: float,
                   sde_type: str, sigma_max: float, clip_range: float, adv_clip_max: float, kl_beta: float,
                   adapter=None, ref: dict | None = None, old_mean: torch.Tensor | None = None,
                   token_weights: torch.Tensor | None = None):
    """The loss of one trained step of a micro-batch of B: the stored transition ``x -> x_next`` ``[B, L, C]``
    (float32) at ``sigma -> sigma_next`` (``[B]``) re-scored under the current adapter (with gradients) and,
    for the KL, under the reference weights ``ref`` (without), then the clipped policy loss
    (:func:`~train.rl_ip.grpo_utils.grpo_loss`; with ``old_mean [B, L, C]`` GRPO-Guard's). ``autocast()`` is
    the context of the forwards. Returns ``(loss, info)``."""
    with autocast():
        v = model.velocity(x.to(model.dtype), sigma, cond, adapter=adapter)
    _, log_prob, mean, std = sde_step_with_logprob(
        v, sigma, sigma_next, x, noise_level, prev_sample=x_next, sde_type=sde_type,
        sigma_max=sigma_max, token_weights=token_weights)
    ref_mean = None
    if ref is not None:
        with torch.no_grad(), autocast():
            v_ref = model.velocity(x.to(model.dtype), sigma, cond, params=ref)
        ref_mean = sde_step_with_logprob(v_ref, sigma, sigma_next, x, noise_level, prev_sample=x_next,
                                         sde_type=sde_type, sigma_max=sigma_max)[2]
    guard = None
    if old_mean is not None:
        guard = grpo_guard_terms(mean, old_mean, x_next, std, sigma, sigma_next, token_weights=token_weights)
    return grpo_loss(log_prob, old_log_prob, advantages, clip_range=clip_range, adv_clip_max=adv_clip_max, mean=mean,
                     ref_mean=ref_mean, std_dev_t=std, kl_beta=kl_beta, guard=guard, token_weights=token_weights)


def grpo_update(trainer, batches: list[RolloutBatch], rewards: EpochRewards, end: int) -> dict[str, float]:
    """Inner epochs over this rank's rollouts of one RL epoch; returns the last optimizer step's metrics."""
    cfg, acc, rl = trainer.cfg, trainer.accelerator, trainer.rl
    cond = FillConditioning.cat([rb.cond for rb in batches])
    tokens = torch.cat([rb.tokens for rb in batches])  # [N, L]
    latents = torch.cat([rb.traj.latents for rb in batches])  # [N, S, L, C]
    next_latents = torch.cat([rb.traj.next_latents for rb in batches])
    old_log_probs = torch.cat([rb.traj.log_probs for rb in batches])  # [N, S]
    old_means = torch.cat([rb.traj.means for rb in batches]) if cfg.rl_grpo_guard else None  # [N, S, L, C]
    # the sigma of stored step s of each sample (windows may differ between batches)
    step_sigmas = torch.cat([rb.sigmas[rb.traj.steps].expand(len(rb.traj.final), -1) for rb in batches])
    next_sigmas = torch.cat([rb.sigmas[[i + 1 for i in rb.traj.steps]].expand(len(rb.traj.final), -1)
                             for rb in batches])
    sigma_max = float(batches[0].sigmas[1])
    image_ids = [j for rb in batches for j in rb.image_ids]
    stored = latents.shape[1]
    # A failed reward has no advantage (0: no policy gradient; it was left out of every group statistic).
    # Its sample still takes part in the KL term, so every rank runs the same number of backwards.
    ref = rl.ref.params(acc.device) if cfg.rl_kl_beta > 0 else None
    settings = dict(autocast=acc.autocast, noise_level=cfg.rl_noise_level, sde_type=cfg.rl_sde_type,
                    sigma_max=sigma_max, clip_range=cfg.rl_grpo_clip_range, adv_clip_max=cfg.rl_adv_clip_max,
                    kl_beta=cfg.rl_kl_beta, adapter=trainer.adapter, ref=ref)
    num_trained = len(choose_train_steps(list(range(stored)), cfg.rl_timestep_fraction, torch.Generator()))
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps * num_trained
    acc.step = 0  # each epoch holds whole optimizer steps; count them from its first backward
    last: dict[str, float] = {}
    infos: list[dict] = []
    step_start = time.perf_counter()
    for inner in range(cfg.rl_num_inner_epochs):
        # Shuffle whole rollout batches: a global micro-batch is then one rollout batch on any number
        # of processes (every rank trains its slice of it), so 2 processes train exactly what 1 does.
        batch_order = torch.randperm(len(batches), generator=keyed_generator(cfg.seed, rng.GRPO_BATCH_ORDER,
                                                                               rl.epoch, inner))
        order = [b * cfg.train_batch_size + i for b in batch_order.tolist() for i in range(cfg.train_batch_size)]
        chosen = {i: choose_train_steps(list(range(stored)), cfg.rl_timestep_fraction,
                                        keyed_generator(cfg.seed, rng.GRPO_TRAINED_STEPS, rl.epoch, inner,
                                                        image_ids[i])) for i in order}
        micro = cfg.train_batch_size
        for start in range(0, len(order), micro):
            idx = order[start:start + micro]
            sub = cond.select(idx)
            sub_tokens = tokens[idx]
            adv = rewards.advantages[idx].to(acc.device)
            for j in range(num_trained):
                s = torch.tensor([chosen[i][j] for i in idx])
                rows = torch.tensor(idx)
                x, x_next = latents[rows, s], next_latents[rows, s]
                with acc.accumulate(trainer.adapter):
                    loss, info = grpo_step_loss(
                        trainer.model, sub, x, x_next, step_sigmas[rows, s], next_sigmas[rows, s],
                        old_log_probs[rows, s].to(acc.device), adv, **settings, token_weights=sub_tokens,
                        old_mean=old_means[rows, s] if old_means is not None else None)
                    acc.backward(loss)
                    grad_norm = trainer.optimizer_step(loss)
                infos.append({**info, "loss": loss.detach()})
                if not acc.sync_gradients:
                    continue
                names = GRPO_METRICS + (GUARD_METRICS if cfg.rl_grpo_guard else ())
                last = step_metrics(acc, infos, names, ("ratio",), grad_norm,
                                    time.perf_counter() - step_start)
                trainer.after_optimizer_step(last, progress={"reward": rewards.metrics["reward/mean"]},
                                             checkpoint_now=False)
                infos, step_start = [], time.perf_counter()
                if trainer.global_step >= end:
                    return last
    return last
