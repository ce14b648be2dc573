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

import torch

from ..config import default_window_range, sde_window_range
from ..models.calligrapher import FillConditioning
from ..rl_ip.grpo_utils import grpo_guard_terms, grpo_loss
from ..rl_ip.sampling import choose_train_steps, sde_step_with_logprob, sde_window
from .rollout import (RolloutBatch, collect_rewards, decode, end_of_epoch, image_generators, keyed_generator,
                      rollout_batch, sample_trajectory, start_rl, step_metrics, submit_rewards)

GRPO_METRICS = ("loss", "policy_loss", "kl", "approx_kl", "clipfrac", "ratio_mean")  # averaged per optimizer step
GUARD_METRICS = ("raw_ratio_mean", "guard_weight_mean")  # also, with --rl_grpo_guard


def train_grpo(trainer, end: int) -> None:
    cfg, acc, rl = trainer.cfg, trainer.accelerator, trainer.rl
    ctx = start_rl(trainer, with_old=False)
    try:
        while trainer.global_step < end:
            epoch = rl.epoch
            # ---------------------------------------------------------------- rollout
            t0 = time.perf_counter()
            batches, futures, group_keys = [], [], []
            for b in range(cfg.rl_num_batches_per_epoch):
                batch, image_keys, keys = rollout_batch(trainer, epoch, b)
                cond = trainer.condition(batch, cfg.rl_guidance_scale)
                sigmas = trainer.model.sigmas(cfg.rl_num_inference_steps, cond.cond_latents.shape[1])
                lo, hi = sde_window(cfg.rl_num_inference_steps, cfg.rl_sde_window_size, sde_window_range(cfg),
                                    keyed_generator(cfg.seed, 17, epoch, b), default_range=default_window_range(cfg))
                tokens = trainer.rl_tokens(batch).to(cond.cond_latents.device)
                traj = sample_trajectory(trainer, cond, image_generators(cfg, epoch, b, image_keys), sigmas,
                                         stochastic=range(lo, hi), noise_level=cfg.rl_noise_level,
                                         sde_type=cfg.rl_sde_type, token_weights=tokens, keep_means=cfg.rl_grpo_guard)
                futures.append(submit_rewards(ctx.reward_fn, batch, decode(trainer, traj.final, cond),
                                              f"e{epoch}b{b}", image_keys))
                batches.append(RolloutBatch(cond, sigmas, [b * trainer.global_batch + j for j in image_keys], tokens,
                                            traj))
                group_keys.append(keys)
            ctx.timings["rollout_s"] = time.perf_counter() - t0
            # ---------------------------------------------------------------- reward + advantage
            ranked = [k for r in range(acc.num_processes) for keys in group_keys
                      for k in keys[r * cfg.train_batch_size:(r + 1) * cfg.train_batch_size]]
            rewards = collect_rewards(trainer, ctx, futures, ranked)
            # ---------------------------------------------------------------- update
            t0 = time.perf_counter()
            metrics = grpo_update(trainer, ctx, batches, rewards, end)
            ctx.timings["update_s"] = time.perf_counter() - t0
            end_of_epoch(trainer, ctx, metrics, rewards)
    finally:
        ctx.close()


def grpo_update(trainer, ctx, batches, rewards, end: int) -> dict[str, float]:
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
    n, stored = latents.shape[0], latents.shape[1]
    # A failed reward has no advantage (0: no policy gradient; it was left out of every group statistic).
    # Its sample still takes part in the KL term, so every rank runs the same number of backwards.
    ref = rl.ref.params(acc.device) if cfg.rl_kl_beta > 0 else None
    num_trained = len(choose_train_steps(list(range(stored)), cfg.rl_timestep_fraction, torch.Generator()))
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps * num_trained
    acc.step = 0  # each epoch holds whole optimizer steps; count them from its first backward
    last: dict[str, float] = {}
    infos: list[dict] = []
    step_start = time.perf_counter()
    for inner in range(cfg.rl_num_inner_epochs):
        # Shuffle whole rollout batches: a global micro-batch is then one rollout batch on any number
        # of processes (every rank trains its slice of it), so 2 processes train exactly what 1 does.
        batch_order = torch.randperm(len(batches), generator=keyed_generator(cfg.seed, 19, rl.epoch, inner))
        order = [b * cfg.train_batch_size + i for b in batch_order.tolist() for i in range(cfg.train_batch_size)]
        chosen = {i: choose_train_steps(list(range(stored)), cfg.rl_timestep_fraction,
                                        keyed_generator(cfg.seed, 23, rl.epoch, inner, image_ids[i])) for i in order}
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
                sigma, sigma_next = step_sigmas[rows, s], next_sigmas[rows, s]
                with acc.accumulate(trainer.adapter):
                    with acc.autocast():
                        v = trainer.model.velocity(x.to(trainer.model.dtype), sigma, sub, adapter=trainer.adapter)
                    _, log_prob, mean, std = sde_step_with_logprob(
                        v, sigma, sigma_next, x, cfg.rl_noise_level, prev_sample=x_next, sde_type=cfg.rl_sde_type,
                        sigma_max=sigma_max, token_weights=sub_tokens)
                    ref_mean = None
                    if ref is not None:
                        with torch.no_grad(), acc.autocast():
                            v_ref = trainer.model.velocity(x.to(trainer.model.dtype), sigma, sub, params=ref)
                        ref_mean = sde_step_with_logprob(v_ref, sigma, sigma_next, x, cfg.rl_noise_level,
                                                         prev_sample=x_next, sde_type=cfg.rl_sde_type,
                                                         sigma_max=sigma_max)[2]
                    guard = None
                    if old_means is not None:
                        guard = grpo_guard_terms(mean, old_means[rows, s], x_next, std, sigma, sigma_next,
                                                 token_weights=sub_tokens)
                    loss, info = grpo_loss(log_prob, old_log_probs[rows, s].to(acc.device), adv,
                                           cfg.rl_grpo_clip_range, cfg.rl_adv_clip_max, mean=mean, ref_mean=ref_mean,
                                           std_dev_t=std, kl_beta=cfg.rl_kl_beta, guard=guard,
                                           token_weights=sub_tokens)
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

