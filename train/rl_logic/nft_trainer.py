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

import torch

from ..flow_matching import interpolate
from ..models.calligrapher import FillConditioning
from ..rl_ip.sampling import nft_train_steps
from .nft_forward import nft_decay, nft_loss
from .rollout import (RolloutBatch, collect_rewards, decode, end_of_epoch, image_generators, keyed_generator,
                      rollout_batch, sample_trajectory, start_rl, step_metrics, submit_rewards)

NFT_METRICS = ("loss", "policy_loss", "kl", "old_deviate", "r_mean", "loss_pos", "loss_neg")  # averaged per optimizer step


def train_nft(trainer, end: int) -> None:
    cfg, acc, rl = trainer.cfg, trainer.accelerator, trainer.rl
    ctx = start_rl(trainer, with_old=True)
    try:
        while trainer.global_step < end:
            epoch = rl.epoch
            # ---------------------------------------------------------------- rollout (old adapter)
            t0 = time.perf_counter()
            old = rl.old.params(acc.device)
            batches, futures, group_keys = [], [], []
            for b in range(cfg.rl_num_batches_per_epoch):
                batch, image_keys, keys = rollout_batch(trainer, epoch, b)
                cond = trainer.condition(batch, cfg.rl_guidance_scale)
                sigmas = trainer.model.sigmas(cfg.rl_num_inference_steps, cond.cond_latents.shape[1])
                traj = sample_trajectory(trainer, cond, image_generators(cfg, epoch, b, image_keys), sigmas,
                                         params=old)
                futures.append(submit_rewards(ctx.reward_fn, batch, decode(trainer, traj.final, cond),
                                              f"e{epoch}b{b}", image_keys))
                batches.append(RolloutBatch(cond, sigmas, [b * trainer.global_batch + j for j in image_keys],
                                            trainer.rl_tokens(batch).to(cond.cond_latents.device), traj))
                group_keys.append(keys)
            ctx.timings["rollout_s"] = time.perf_counter() - t0
            # ---------------------------------------------------------------- reward + advantage
            ranked = [k for r in range(acc.num_processes) for keys in group_keys
                      for k in keys[r * cfg.train_batch_size:(r + 1) * cfg.train_batch_size]]
            rewards = collect_rewards(trainer, ctx, futures, ranked)
            # ---------------------------------------------------------------- update
            t0 = time.perf_counter()
            metrics = nft_update(trainer, batches, rewards, end)
            ctx.timings["update_s"] = time.perf_counter() - t0
            # ---------------------------------------------------------------- old adapter
            d = nft_decay(trainer.global_step - rl.start_step, cfg.nft_decay_type)
            rl.old.lerp_from(trainer.adapter, d)
            metrics["nft/decay"] = d
            end_of_epoch(trainer, ctx, metrics, rewards)
    finally:
        ctx.close()


def nft_update(trainer, batches, rewards, end: int) -> dict[str, float]:
    """Inner epochs over this rank's rollouts of one RL epoch; returns the last optimizer step's metrics."""
    cfg, acc, rl, model = trainer.cfg, trainer.accelerator, trainer.rl, trainer.model
    cond = FillConditioning.cat([rb.cond for rb in batches])
    x0_all = torch.cat([rb.traj.final for rb in batches])  # [N, L, C] float32
    tokens = torch.cat([rb.tokens for rb in batches])  # [N, L]
    sigmas = batches[0].sigmas[:-1]  # the sampler's noise levels (all batches share one canvas size)
    image_ids = [j for rb in batches for j in rb.image_ids]
    old, ref = rl.old.params(acc.device), rl.ref.params(acc.device) if rl.ref is not None else None
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
        batch_order = torch.randperm(len(batches), generator=keyed_generator(cfg.seed, 29, rl.epoch, inner))
        order = [b * cfg.train_batch_size + i for b in batch_order.tolist() for i in range(cfg.train_batch_size)]
        gens = {i: keyed_generator(cfg.seed, 31, rl.epoch, inner, image_ids[i]) for i in order}
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
                x_t = interpolate(x0, noise, t)  # float32: x̂0 = x_t − t·v is formed from it in the loss
                x_in = x_t.to(model.dtype)  # only the model input is rounded
                with acc.accumulate(trainer.adapter):
                    with acc.autocast():
                        v_theta = model.velocity(x_in, t, sub, adapter=trainer.adapter)
                        with torch.no_grad():
                            v_old = model.velocity(x_in, t, sub, params=old)
                            v_ref = model.velocity(x_in, t, sub, params=ref) if ref is not None else v_old
                    loss, info = nft_loss(x0, x_t, t, v_theta, v_old, v_ref, adv, cfg.nft_beta, cfg.nft_adv_mode,
                                          cfg.rl_adv_clip_max, cfg.rl_kl_beta if ref is not None else 0.0, valid=valid,
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

