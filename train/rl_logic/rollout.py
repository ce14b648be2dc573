"""What GRPO and DiffusionNFT share: groups, rollouts, rewards, advantages, held-out evaluation, image grids.

Groups are a sampler concern. RL batch ``b`` of RL epoch ``e`` holds ``m = G / k`` dataset samples
(``G = train_batch_size x processes`` images, ``k = --rl_num_images_per_prompt``), each rolled out
``k`` times; global image ``j`` belongs to group ``j // k``, and rank ``r`` rolls out images
``[r * B, (r + 1) * B)``, so a group may span processes. Every random draw of an image (its
initial noise and its SDE noise) comes from a generator keyed by (seed, RL epoch, batch, global
image index): neither the process count nor a resume changes what is sampled.

One RL epoch's rollouts (:func:`rollout_epoch`) are the same for both methods but for the sampler of a
batch: GRPO's SDE window with log-probabilities, NFT's deterministic sampler with the old adapter.
Rewards are scored in the background (``reward_fn.submit``) while the next batch rolls out, then
gathered from every process; every process computes the same advantages on the whole epoch and
keeps its slice. A reward that failed stays NaN: dropped within ``--reward_failure_budget``, a
clean :class:`~train.rl_ip.reward.RewardError` beyond it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .. import checkpointing as ckpt
from .. import rng
from ..data import buckets
from ..data.preprocess import SampleBatch, collate_samples, tensor_to_pil
from ..models.calligrapher import FillConditioning
from ..models.checkpoint_io import atomic_write_text
from ..rewards.base import RewardItem, RewardResult, parse_reward_weights
from ..rl_ip.param_copy import ParamCopy, copy_dtypes
from ..rl_ip.reward import build_reward_fn, check_failure_budget, reward_stats, reward_table
from ..rl_ip.sampling import Trajectory, denoise
from ..rl_ip.stat_tracking import compute_advantages
from ..rng import keyed_generator


@dataclass
class RLContext:
    """Per-phase objects that live outside checkpoints: reward functions and fixed settings."""

    reward_fn: object
    eval_reward_fn: object | None
    weights: dict[str, float]
    eval_weights: dict[str, float]
    groups_per_batch: int
    timings: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        for fn in {id(f): f for f in (self.reward_fn, self.eval_reward_fn) if f is not None}.values():
            fn.close()


def start_rl(trainer, with_old: bool) -> RLContext:
    """Begin (or resume) the RL phase: reference/old copies, reward functions, the RL-start evaluation."""
    cfg, acc, rl = trainer.cfg, trainer.accelerator, trainer.rl
    dtypes = copy_dtypes(cfg)
    fresh = rl.start_step is None
    if fresh:
        rl.start_step = trainer.global_step
        trainer.start_rl_optimizer()
    if rl.ref is None and cfg.rl_kl_beta > 0:
        rl.ref = ParamCopy(trainer.adapter, dtypes["ref"])
    if with_old and rl.old is None:
        rl.old = ParamCopy(trainer.adapter, dtypes["old"])
    weights = parse_reward_weights(cfg.reward_weights)
    eval_weights = parse_reward_weights(cfg.rl_eval_reward_weights or cfg.reward_weights)
    common = dict(siglip_path=cfg.siglip_path, rank=acc.process_index, world_size=acc.num_processes,
                  timeout=cfg.reward_timeout, retries=cfg.reward_retries)
    reward_fn = build_reward_fn(cfg.reward_server_url, weights, **common)
    eval_fn = None
    if trainer.eval_dataset is not None:
        eval_fn = reward_fn if eval_weights == weights else build_reward_fn(cfg.reward_server_url, eval_weights,
                                                                          **common)
    ctx = RLContext(reward_fn, eval_fn, weights, eval_weights, trainer.global_batch // cfg.rl_num_images_per_prompt)
    trainer.monitor.line(f"RL ({cfg.rl_method}) {'starts' if fresh else 'continues'} at global_step "
                         f"{trainer.global_step}, RL epoch {rl.epoch}: {ctx.groups_per_batch} groups x "
                         f"{cfg.rl_num_images_per_prompt} images per batch, {cfg.rl_num_batches_per_epoch} batches "
                         f"per epoch; rewards {'from ' + cfg.reward_server_url if cfg.reward_server_url else 'in-process'}")
    trainer.monitor.line(f"RL rollouts and held-out evaluation at guidance {cfg.rl_guidance_scale:g} (supervised "
                         f"training: --guidance_scale {cfg.guidance_scale:g}); "
                         + ("a fresh optimizer" if fresh else "the checkpoint's RL optimizer")
                         + f" at --rl_learning_rate {cfg.rl_learning_rate:g}, weight decay "
                         f"{cfg.rl_adam_weight_decay:g}, a {cfg.lr_scheduler} schedule from RL start")
    per_epoch = cfg.rl_num_inner_epochs * cfg.rl_num_batches_per_epoch // cfg.gradient_accumulation_steps
    if (trainer.global_step - rl.start_step) % per_epoch:
        trainer.monitor.line(f"note: this run continues from global_step {trainer.global_step}, inside RL epoch "
                             f"{rl.epoch - 1} (an earlier --max_train_steps ended it early): its remaining "
                             f"optimizer steps are not taken, so the run differs from one that was never stopped")
    if (cfg.max_train_steps - rl.start_step) % per_epoch:
        trainer.monitor.line(f"note: --max_train_steps {cfg.max_train_steps} ends inside an RL epoch ({per_epoch} "
                             f"optimizer steps each from RL start at global_step {rl.start_step}); a run extended "
                             f"from its last checkpoint differs from a straight run. For an exact extension end at "
                             f"{rl.start_step} + a multiple of {per_epoch}")
    if fresh:
        out = evaluate_heldout(trainer, ctx)
        if out is not None and watch_heldout(trainer)[0]:
            trainer.request_checkpoint()
            record_best(trainer, trainer.maybe_checkpoint(), out)
    return ctx


# ---------------------------------------------------------------------- rollouts
@dataclass
class BatchDraw:
    """The images of one RL batch: G = ``train_batch_size x processes`` global images, B on this rank."""

    samples: SampleBatch  # this rank's B samples
    image_keys: list[int]  # [B] each one's global image index in the batch (keys its noise)
    group_keys: list[str]  # [G] the record id of every global image of the batch (the same list on every rank)


def rollout_batch(trainer, rl_epoch: int, batch_index: int) -> BatchDraw:
    """This rank's images of RL batch ``batch_index`` of RL epoch ``rl_epoch``."""
    cfg, acc = trainer.cfg, trainer.accelerator
    k, m, n = cfg.rl_num_images_per_prompt, trainer.global_batch // cfg.rl_num_images_per_prompt, len(trainer.dataset)
    # Passes over the data, each a keyed permutation cut into batches of m records of one canvas size.
    per_pass = buckets.batches_per_order(trainer.canvas_sizes, n, m)
    passes, j = divmod(rl_epoch * cfg.rl_num_batches_per_epoch + batch_index, per_pass)
    order = torch.randperm(n, generator=keyed_generator(cfg.seed, rng.RL_DATA_ORDER, passes)).tolist()
    indices = buckets.same_size_batches(order, trainer.canvas_sizes, m)[j]
    global_images = [indices[j // k] for j in range(trainer.global_batch)]
    lo = acc.process_index * cfg.train_batch_size
    mine = list(range(lo, lo + cfg.train_batch_size))
    batch = collate_samples([trainer.dataset[global_images[j]] for j in mine])
    return BatchDraw(batch, mine, [trainer.dataset.records[i].id for i in global_images])


@dataclass
class RolloutBatch:
    """What the update of an RL epoch needs of one rollout batch (this rank's B images)."""

    cond: FillConditioning  # batch of B
    sigmas: torch.Tensor  # [T + 1] the sampler's noise levels
    image_ids: list[int]  # [B] global image index within the RL epoch (keys the update's random draws)
    tokens: torch.Tensor  # [B, L] each token's weight in the RL objectives (Trainer.rl_tokens)
    traj: Trajectory  # GRPO: the stochastic steps; NFT: only ``final``


@dataclass
class EpochRollouts:
    """This rank's rollouts of one RL epoch, ``--rl_num_batches_per_epoch`` batches of B images each."""

    batches: list[RolloutBatch]  # one per rollout batch, in order
    rewards: list[PendingRewards]  # one per rollout batch: its B rewards, scored in the background
    group_keys: list[str]  # [processes x batches x B] the record id of every image of the epoch in the order
    # of the gathered rewards: rank-major, then batch, then position (collect_rewards)


# sampler(batch_index, cond, generators, sigmas, tokens) -> Trajectory: how a method samples one rollout batch
Sampler = Callable[[int, FillConditioning, list[torch.Generator], torch.Tensor, torch.Tensor], Trajectory]


def rollout_epoch(trainer, ctx: RLContext, epoch: int, sampler: Sampler) -> EpochRollouts:
    """Roll out RL epoch ``epoch``: per batch draw the images, condition, sample with the method's ``sampler``,
    decode and submit the rewards (scored while the next batch rolls out)."""
    cfg, acc = trainer.cfg, trainer.accelerator
    t0 = time.perf_counter()
    batches, rewards, group_keys = [], [], []
    for b in range(cfg.rl_num_batches_per_epoch):
        draw = rollout_batch(trainer, epoch, b)
        cond = trainer.condition(draw.samples, cfg.rl_guidance_scale)
        sigmas = trainer.model.sigmas(cfg.rl_num_inference_steps, cond.cond_latents.shape[1])
        tokens = trainer.rl_tokens(draw.samples).to(cond.cond_latents.device)
        traj = sampler(b, cond, image_generators(cfg, epoch, b, draw.image_keys), sigmas, tokens)
        rewards.append(submit_rewards(ctx.reward_fn, draw.samples, decode(trainer, traj.final, cond),
                                      f"e{epoch}b{b}", draw.image_keys))
        batches.append(RolloutBatch(cond, sigmas, [b * trainer.global_batch + j for j in draw.image_keys], tokens,
                                    traj))
        group_keys.append(draw.group_keys)
    ctx.timings["rollout_s"] = time.perf_counter() - t0
    per_rank = cfg.train_batch_size
    ranked = [k for r in range(acc.num_processes) for keys in group_keys
              for k in keys[r * per_rank:(r + 1) * per_rank]]
    return EpochRollouts(batches, rewards, ranked)


def sample_trajectory(trainer, cond: FillConditioning, generators: list[torch.Generator], sigmas: torch.Tensor,
                      stochastic: range | None = None, noise_level: float = 0.0, sde_type: str = "sde",
                      params: dict | None = None, token_weights: torch.Tensor | None = None,
                      keep_means: bool = False) -> Trajectory:
    """Roll out from per-image noise (``generators`` draw it, then the SDE noise) with the live adapter, or
    with the adapter weights ``params``; the state stays float32, the model sees its own dtype under autocast.
    The other arguments are :func:`~train.rl_ip.sampling.denoise`'s."""
    model, acc = trainer.model, trainer.accelerator
    h, w = cond.latent_size
    shape = ((h // 2) * (w // 2), 64)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(model.device, torch.float32)

    def velocity(x, sigma):
        with acc.autocast():
            return model.velocity(x.to(model.dtype), sigma, cond, adapter=trainer.adapter, params=params)

    return denoise(velocity, x, sigmas, stochastic, noise_level, generators, sde_type, token_weights, keep_means)


def image_generators(cfg, rl_epoch: int, batch_index: int, image_keys: list[int]) -> list[torch.Generator]:
    return [keyed_generator(cfg.seed, rng.ROLLOUT_NOISE, rl_epoch, batch_index, j) for j in image_keys]


def _crop(t: torch.Tensor, box) -> torch.Tensor:
    left, top, right, bottom = box
    return t[:, top:bottom, left:right]


def reward_items(batch, pixels: torch.Tensor, tag: str, image_keys: list[int]) -> list[RewardItem]:
    """Generated canvases ``[B, 3, H, W]`` -> reward items (source region, its mask, source, reference)."""
    items = []
    for i, box in enumerate(batch.source_boxes):
        mask = tensor_to_pil(_crop(batch.mask[i], box).expand(3, -1, -1) * 2 - 1).convert("L")
        items.append(RewardItem(id=f"{tag}-{image_keys[i]}", image=tensor_to_pil(_crop(pixels[i], box)),
                                text=batch.texts[i], mask=mask, reference=batch.style_images[i],
                                source=tensor_to_pil(_crop(batch.image[i], box))))
    return items


NONFINITE = "the generated image holds NaN/Inf pixels (the sampler diverged), so it was not scored"


class PendingRewards:
    """The rewards of one batch's items, scored in the background; an item whose generated pixels are not all
    finite is never sent (it would be scored as the black image it turns into) and fails instead."""

    def __init__(self, reward_fn, items: list[RewardItem], finite: list[bool]):
        self.items, self.finite = items, finite
        sent = [item for item, ok in zip(items, finite) if ok]
        self._future = reward_fn.submit(sent) if sent else None

    def result(self) -> list[RewardResult]:
        scored = iter(self._future.result() if self._future is not None else [])
        return [next(scored) if ok else RewardResult(item.id, None, error=NONFINITE)
                for item, ok in zip(self.items, self.finite)]


def submit_rewards(reward_fn, batch, pixels: torch.Tensor, tag: str, image_keys: list[int]) -> PendingRewards:
    """Start scoring a batch's generated canvases ``[B, 3, H, W]``."""
    items = reward_items(batch, pixels, tag, image_keys)
    return PendingRewards(reward_fn, items, torch.isfinite(pixels.flatten(1)).all(1).tolist())


def decode(trainer, latents: torch.Tensor, cond: FillConditioning) -> torch.Tensor:
    return trainer.model.decode_latents(latents.to(trainer.model.dtype), cond.latent_size).float().cpu()


# ---------------------------------------------------------------------- rewards and advantages
@dataclass
class EpochRewards:
    rewards: torch.Tensor  # [N_local] NaN where failed
    advantages: torch.Tensor  # [N_local]
    valid: torch.Tensor  # [N_local] bool
    metrics: dict[str, float]
    items: list = field(default_factory=list)  # (RewardItem, RewardResult) of this rank, for image grids


def collect_rewards(trainer, ctx: RLContext, rollouts: EpochRollouts) -> EpochRewards:
    """Wait for this rank's rewards, gather every rank's, compute advantages, keep this rank's slice."""
    cfg, acc = trainer.cfg, trainer.accelerator
    t0 = time.perf_counter()
    results, items = [], []
    for pending in rollouts.rewards:
        results.extend(pending.result())
        items.extend(pending.items)
    ctx.timings["reward_wait_s"] = time.perf_counter() - t0
    names = list(ctx.weights)
    local = reward_table(results, names)
    everything = acc.gather(local.to(acc.device)).cpu()
    rewards, scores = everything[:, 0], {n: everything[:, 1 + i] for i, n in enumerate(names)}
    check_failure_budget(rewards, cfg.reward_failure_budget, results, f"rewards failed in RL epoch {trainer.rl.epoch}")
    adv = compute_advantages(rewards, rollouts.group_keys, per_group=cfg.rl_per_prompt_stat_tracking,
                             global_std=cfg.rl_global_std, adv_clip_max=cfg.rl_adv_clip_max,
                             scores=scores, weights=ctx.weights, per_scorer=cfg.rl_reward_norm == "per_scorer")
    n_local = local.shape[0]
    lo = acc.process_index * n_local
    metrics = reward_stats(rewards, scores)
    metrics.update({k: float(v) for k, v in adv.stats.items()})
    return EpochRewards(rewards=rewards[lo:lo + n_local].float(), advantages=adv.advantages[lo:lo + n_local].float(),
                        valid=adv.valid[lo:lo + n_local], metrics=metrics,
                        items=list(zip(items, results)))


# ---------------------------------------------------------------------- evaluation and images
class Evaluation(NamedTuple):
    """One entry of the RL state's ``evals`` (stored as a list)."""

    rl_epoch: int
    heldout: float  # the held-out figure (heldout_metric)
    train_reward: float  # the epoch's mean training reward; NaN at RL start


@torch.no_grad()
def evaluate_heldout(trainer, ctx: RLContext, train_reward: float = math.nan) -> dict[str, float] | None:
    """Deterministic samples of the held-out set (fixed noise per sample) scored with the eval weights.

    The live adapter is logged under ``eval/``; with ``--use_ema`` the EMA weights (what users export) under
    ``eval_ema/``. Both go to ``OUTPUT_DIR/eval_rewards.jsonl``, and the evaluation is recorded in the RL
    state beside ``train_reward`` (the epoch's mean training reward) for :func:`watch_heldout`.
    """
    cfg, acc, ds = trainer.cfg, trainer.accelerator, trainer.eval_dataset
    if ds is None or ctx.eval_reward_fn is None:
        return None
    t0 = time.perf_counter()
    out = _evaluate_weights(trainer, ctx, "eval", None)
    if trainer.ema is not None:
        out.update(_evaluate_weights(trainer, ctx, "eval_ema", trainer.ema.copy.params(acc.device)))
    out["timing/eval_s"] = time.perf_counter() - t0
    trainer.log(out)
    trainer.rl.evals.append(list(Evaluation(trainer.rl.epoch, out[heldout_metric(trainer)], train_reward)))
    if acc.is_main_process:  # one row per entry of rl.evals, so a resume can cut the file back to its checkpoint
        line = {"global_step": trainer.global_step, "rl_epoch": trainer.rl.epoch,
                **{k: v if math.isfinite(v) else None for k, v in out.items()}}
        with (Path(cfg.output_dir) / EVAL_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
    return out


def trim_eval_log(output_dir, rows: int) -> None:
    """Keep the first ``rows`` rows of ``eval_rewards.jsonl``: the evaluations the checkpoint a run resumes from
    had recorded; the later ones belong to the interrupted attempt and are evaluated again."""
    path = Path(output_dir) / EVAL_LOG
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if len(lines) > rows:
            atomic_write_text(path, "".join(lines[:rows]))


def heldout_metric(trainer) -> str:
    """The held-out figure the best checkpoint and the divergence alarm follow: the EMA's when there is one."""
    return "eval_ema/reward_mean" if trainer.ema is not None else "eval/reward_mean"


def _evaluate_weights(trainer, ctx: RLContext, prefix: str, params: dict | None) -> dict[str, float]:
    """Held-out figures ``{prefix}/…`` of one set of adapter weights (None = the live adapter)."""
    cfg, acc, ds = trainer.cfg, trainer.accelerator, trainer.eval_dataset
    steps = cfg.rl_eval_num_inference_steps or cfg.rl_num_inference_steps
    mine = list(range(acc.process_index, len(ds), acc.num_processes))
    sizes = [ds.canvas_size(i) for i in range(len(ds))]
    results, shown = [], []
    for idx in buckets.size_groups(mine, sizes, cfg.train_batch_size):
        batch = collate_samples([ds[i] for i in idx])
        cond = trainer.condition(batch, cfg.rl_guidance_scale)
        sigmas = trainer.model.sigmas(steps, cond.cond_latents.shape[1])
        traj = sample_trajectory(trainer, cond, [keyed_generator(cfg.seed, rng.HELDOUT_NOISE, i) for i in idx],
                                 sigmas, params=params)
        pending = submit_rewards(ctx.eval_reward_fn, batch, decode(trainer, traj.final, cond), prefix, idx)
        scored = pending.result()
        results.extend(scored)
        shown.extend(zip(pending.items, scored))
    from accelerate.utils import gather_object

    names = list(ctx.eval_weights)
    rows = gather_object(reward_table(results, names).tolist())  # every process's rows
    table = torch.tensor(rows, dtype=torch.float64).reshape(-1, 1 + len(names))
    failed = check_failure_budget(table[:, 0], cfg.reward_failure_budget, results,
                                  f"held-out rewards ({prefix}/) failed at global_step {trainer.global_step}")
    rewards = [r for r in table[:, 0].tolist() if not math.isnan(r)]
    out = {f"{prefix}/reward_mean": sum(rewards) / len(rewards) if rewards else math.nan,
           f"{prefix}/failed": float(failed)}
    for i, name in enumerate(names):
        vals = [v for v in table[:, 1 + i].tolist() if not math.isnan(v)]
        if vals:
            out[f"{prefix}/{name}_mean"] = sum(vals) / len(vals)
    if cfg.rl_image_log_every:
        log_image_grid(trainer, shown, tag=prefix)
    return out


def watch_heldout(trainer) -> tuple[bool, str | None]:
    """Read the newest evaluation against the earlier ones: ``(new best, divergence warning or None)``.

    New best: the held-out figure beats every earlier evaluation (the first, at RL start, is the first best:
    where to fall back to when RL only made things worse). Divergence: the held-out figure fell at each of
    the last ``--rl_divergence_patience`` evaluations while the training reward rose over the same span — the
    policy games the training reward.
    """
    cfg, evals = trainer.cfg, [Evaluation(*e) for e in trainer.rl.evals]
    value = evals[-1].heldout
    best = math.isfinite(value) and all(value > e.heldout for e in evals[:-1] if math.isfinite(e.heldout))
    p = cfg.rl_divergence_patience
    if not p or len(evals) <= p:
        return best, None
    window = evals[-p - 1:]
    fell = all(b.heldout < a.heldout for a, b in zip(window, window[1:]))
    trained = [e.train_reward for e in window if math.isfinite(e.train_reward)]  # none at RL start
    rose = len(trained) >= 2 and trained[-1] > trained[0]
    if not (fell and rose):
        return best, None
    return best, (f"the held-out {heldout_metric(trainer)} fell at each of the last {p} evaluations "
                  f"({window[0].heldout:.4f} -> {window[-1].heldout:.4f}) while the training reward rose "
                  f"({trained[0]:.4f} -> {trained[-1]:.4f}): the policy may be gaming the training reward")


def record_best(trainer, path: Path, out: dict[str, float]) -> None:
    """Record ``path`` as the best held-out checkpoint in ``OUTPUT_DIR/best.json``."""
    if not trainer.accelerator.is_main_process:
        return
    key = heldout_metric(trainer)
    ckpt.write_best(trainer.cfg.output_dir, {"checkpoint": path.name, "global_step": trainer.global_step,
                                             "rl_epoch": trainer.rl.epoch, "metric": key, "value": out[key],
                                             "eval": out})
    trainer.monitor.line(f"best held-out {key} so far ({out[key]:.4f}): {path.name}, recorded in {ckpt.BEST_FILE}")


def log_image_grid(trainer, pairs, tag: str = "rollouts", limit: int = 8) -> None:
    """Rows of (source | result | reference), each captioned with its text and reward (main process only)."""
    if not trainer.accelerator.is_main_process or not pairs:
        return
    from PIL import Image, ImageDraw

    rows = []
    for item, res in pairs[:limit]:
        h = item.image.size[1]
        tiles = [im.convert("RGB").resize((h * im.size[0] // im.size[1], h))
                 for im in (item.source, item.image, item.reference) if im is not None]
        width = sum(t.size[0] for t in tiles)
        row = Image.new("RGB", (max(width, 160), h + 14), (255, 255, 255))
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.size[0]
        reward = "failed" if res.reward is None else f"{res.reward:.3f}"
        ImageDraw.Draw(row).text((2, h + 1), f"{item.text[:24]} r={reward}", fill=(0, 0, 0))
        rows.append(row)
    grid = Image.new("RGB", (max(r.size[0] for r in rows), sum(r.size[1] for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.size[1]
    trainer.monitor.image(f"images/{tag}", grid, trainer.global_step)


EVAL_LOG = "eval_rewards.jsonl"  # one JSON row per held-out evaluation
CLIP_IDLE_EPOCHS = 10  # GRPO epochs in a row with train/clipfrac 0 before the log says the clip never binds


def end_of_epoch(trainer, ctx: RLContext, metrics: dict[str, float], rewards: EpochRewards) -> None:
    """Count the epoch, log its figures, maybe evaluate / log images, then checkpoint if one is due.

    A new best held-out figure forces a checkpoint (named in ``best.json``, never pruned); the divergence
    alarm warns and, with ``--rl_stop_on_divergence``, stops the run after that checkpoint.
    """
    cfg, rl = trainer.cfg, trainer.rl
    rl.epoch += 1
    metrics = {**rewards.metrics, **metrics, "rl/epoch": rl.epoch,
               **{f"timing/{k}": v for k, v in ctx.timings.items()}}
    _watch_clipfrac(trainer, metrics)
    trainer.log(metrics)
    if cfg.rl_image_log_every and rl.epoch % cfg.rl_image_log_every == 0:
        log_image_grid(trainer, rewards.items)
    last = trainer.global_step >= cfg.max_train_steps
    best, warning, out = False, None, None
    if last or (cfg.rl_eval_every and rl.epoch % cfg.rl_eval_every == 0):
        out = evaluate_heldout(trainer, ctx, train_reward=rewards.metrics["reward/mean"])
        if out is not None:
            best, warning = watch_heldout(trainer)
    if warning is not None:
        trainer.monitor.line(f"warning: {warning}" + (" (--rl_stop_on_divergence: stopping)"
                                                      if cfg.rl_stop_on_divergence else ""))
        trainer.log({"eval/divergence": 1.0})
    if best or (warning is not None and cfg.rl_stop_on_divergence):
        trainer.request_checkpoint()
    path = trainer.maybe_checkpoint()
    if best and path is not None:
        record_best(trainer, path, out)
    trainer.checkpoint_or_stop()  # the end of an epoch is where an RL run resumes exactly
    if warning is not None and cfg.rl_stop_on_divergence:
        from ..trainer import RunStopped

        raise RunStopped(f"stopped on divergence at global_step {trainer.global_step}: {warning}. The best "
                         f"held-out checkpoint is named in {Path(cfg.output_dir) / ckpt.BEST_FILE}", exit_code=0)


def _watch_clipfrac(trainer, metrics: dict[str, float]) -> None:
    """Count GRPO epochs whose last step clipped nothing; say so once the clip has been idle for a while."""
    if "train/clipfrac" not in metrics:
        return
    stats = trainer.rl.stats
    stats["clip_idle_epochs"] = stats.get("clip_idle_epochs", 0) + 1 if metrics["train/clipfrac"] == 0 else 0
    if stats["clip_idle_epochs"] == CLIP_IDLE_EPOCHS:
        trainer.monitor.line(f"warning: train/clipfrac has been 0 for {CLIP_IDLE_EPOCHS} RL epochs: "
                             f"--rl_grpo_clip_range {trainer.cfg.rl_grpo_clip_range:g} is no trust region at this "
                             f"step size (train/approx_kl {metrics.get('train/approx_kl', math.nan):.2e}); try "
                             "1e-4 for --rl_sde_type sde, 1e-5 for cps")


def step_metrics(acc, infos: list[dict], names: tuple[str, ...], extremes: tuple[str, ...], grad_norm,
                 elapsed: float) -> dict[str, float]:
    """One optimizer step's figures: each of ``names`` averaged over the step's backwards and all
    processes; for each of ``extremes`` (``x``) the minimum of ``x_min`` and the maximum of ``x_max``."""
    parts = [torch.stack([i[n].float() for i in infos]).mean() for n in names]
    for x in extremes:
        parts += [torch.stack([i[f"{x}_min"].float() for i in infos]).min(),
                  -torch.stack([i[f"{x}_max"].float() for i in infos]).max()]
    gathered = acc.gather(torch.stack(parts)[None].to(acc.device)).cpu()
    out = {f"train/{n}": gathered[:, k].mean().item() for k, n in enumerate(names)}
    for j, x in enumerate(extremes):
        out[f"train/{x}_min"] = gathered[:, len(names) + 2 * j].min().item()
        out[f"train/{x}_max"] = -gathered[:, len(names) + 2 * j + 1].min().item()
    out["train/grad_norm"] = grad_norm
    out["timing/optimizer_step_s"] = elapsed
    return out
