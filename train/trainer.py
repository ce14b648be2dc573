"""Supervised flow-matching training of the style adapter (SPEC §6), and the run scaffolding.

Read top to bottom: :meth:`Trainer.setup` builds everything (validated data, frozen model,
prompt-embedding cache, optimizer, EMA, resume), :meth:`Trainer.run` is the loop, one
:meth:`Trainer.train_step` per micro-batch.

Determinism across layouts: the data order is a per-epoch permutation of the dataset and
every sample's noise and noise level come from a generator keyed by (seed, epoch, position in
the epoch). A global micro-batch of ``train_batch_size x num_processes`` consecutive positions
is split across processes by rank. So 2 processes x batch 1 train on exactly what 1 process x
batch 2 does, batch 4 x accumulation 1 on what batch 1 x accumulation 4 does, and a resumed
run on what an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from . import checkpointing as ckpt
from .config import ConfigError, TrainConfig
from .data.dataset import CalligraphyDataset, load_records
from .data.preprocess import collate_samples
from .data.prompt_cache import PromptCache, encoder_identity, make_encode_fn, release_text_encoders
from .flow_matching import flow_matching_loss, interpolate, pixel_mask_to_tokens, sample_sigmas, token_weights
from .models.calligrapher import Calligrapher
from .models.checkpoint_io import load_adapter_file
from .monitoring import RunMonitor, peak_memory_gb
from .rl_ip.ema import EMA

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The random stream of one sample draw, independent of batch size, accumulation and process count."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + position)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
        self.global_step = 0
        self.epoch = 0
        self.position = 0  # global micro-batches already consumed in the current epoch

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            for stale in ckpt.remove_partial(out):
                print(f"removed an incomplete checkpoint left by an interrupted write: {stale}", flush=True)
        acc.wait_for_everyone()

        self._check_distributed_setup()
        records = load_records(cfg.train_data_json, resolution=cfg.resolution)  # raises with every problem
        self.dataset = CalligraphyDataset(records, resolution=cfg.resolution,
                                          reference_strip=not cfg.no_reference_strip,
                                          strip_height=cfg.reference_strip_height or None)
        self.global_batch = cfg.train_batch_size * acc.num_processes
        self.batches_per_epoch = len(self.dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"--train_data_json has {len(self.dataset)} samples, fewer than one global batch "
                             f"({cfg.train_batch_size} x {acc.num_processes} processes)")

        torch.manual_seed(cfg.seed)  # the fresh adapter's initial weights
        weight_dtype = _DTYPES[cfg.mixed_precision]
        self.model = Calligrapher.from_pretrained(
            cfg.pretrained_model_name_or_path, cfg.siglip_path, num_tokens=cfg.num_tokens, dtype=weight_dtype,
            device=acc.device, text_encoder_device="cpu" if cfg.offload_text_encoder_two else None,
        )
        if cfg.initial_ip_adapter_path:
            load_adapter_file(self.model.adapter, cfg.initial_ip_adapter_path)
        if cfg.gradient_checkpointing:
            self.model.transformer.enable_gradient_checkpointing()
        self.train_sigmas = self._training_sigmas()
        self._fill_prompt_cache(out)
        self.style_cache: dict[str, torch.Tensor] = {}

        adapter = self.model.adapter
        adapter.train()
        params = [p for p in adapter.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        self.adapter, self.optimizer = acc.prepare(adapter, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)  # stepped by us once per optimizer step
        self.ema = None
        if cfg.use_ema:
            ema_device = torch.device("cpu") if cfg.ema_device == "cpu" else None
            self.ema = EMA(adapter.named_parameters(), cfg.ema_decay, cfg.ema_update_interval, ema_device)

        self._maybe_resume(out)
        self.monitor = RunMonitor(acc, out, cfg.to_dict(), cfg.report_to, cfg.max_train_steps, self.global_step)
        report = self.model.parameter_report()
        self.monitor.line("trainable parameters: " + ", ".join(f"{k}={v:,}" for k, v in report.items()))
        self.monitor.line(f"data: {len(self.dataset)} samples, {self.batches_per_epoch} global micro-batches "
                          f"of {self.global_batch} per epoch ({len(self.dataset) % self.global_batch} dropped); "
                          f"global_step counts optimizer steps")

    def _check_distributed_setup(self) -> None:
        """Refuse combinations accelerate would accept but that cannot work here, before loading anything."""
        from accelerate.utils import DistributedType

        acc, cfg = self.accelerator, self.cfg
        shards_params = acc.distributed_type == DistributedType.FSDP or (
            acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3)
        if cfg.use_ema and shards_params:
            raise ConfigError("--use_ema cannot run with FSDP or DeepSpeed ZeRO-3: each process holds only a shard "
                             "of the adapter, so there is no whole weight to average. Use DDP or DeepSpeed "
                             "ZeRO-2 (optimizer state and gradients sharded) with --ema_device cpu instead.")

    def _training_sigmas(self) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        fresh = FlowMatchEulerDiscreteScheduler.from_config(self.model.pipe.scheduler.config)
        return fresh.sigmas[:-1].to(torch.float32) if fresh.sigmas[-1] == 0 else fresh.sigmas.to(torch.float32)

    def _fill_prompt_cache(self, out: Path) -> None:
        """Encode every unique text once (rank 0 writes the disk cache first), then drop CLIP and T5."""
        cfg, acc, model = self.cfg, self.accelerator, self.model
        encode_fn = make_encode_fn(model, cfg.max_sequence_length)
        cache_dir = Path(cfg.prompt_cache_dir) if cfg.prompt_cache_dir else out / "prompt_cache"
        ident = encoder_identity(cfg.pretrained_model_name_or_path, cfg.max_sequence_length, extra=str(model.dtype))
        self.prompts = PromptCache(encode_fn, ident, cache_dir)
        if acc.is_main_process:
            self.prompts.warm(self.dataset.texts)
        acc.wait_for_everyone()
        self.prompts.warm(self.dataset.texts)
        self.prompts.encode_fn = None  # every text is cached: the encoders are no longer needed
        release_text_encoders(model, "free")

    def _optimizer(self, params):
        cfg = self.cfg
        kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
        if cfg.use_8bit_adam:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    def _maybe_resume(self, out: Path) -> None:
        cfg = self.cfg
        if not cfg.resume_from_checkpoint:
            return
        path = ckpt.latest_checkpoint(out) if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
        if path is None:
            print(f"--resume_from_checkpoint latest: no checkpoint in {out}, starting fresh", flush=True)
            return
        state = ckpt.load_checkpoint(self.accelerator, path, self.ema)
        if state["global_batch"] != self.global_batch:
            raise ConfigError(f"{path} was written with a global batch of {state['global_batch']}, this run has "
                             f"{self.global_batch}: the data position cannot be continued exactly")
        self.global_step, self.epoch, self.position = state["global_step"], state["epoch"], state["position"]
        print(f"resumed from {path} at global_step {self.global_step}", flush=True)

    # ------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch ``epoch`` visits them (the same on every rank)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _rank_batches(self, epoch: int, position: int):
        """From (epoch, position) on, forever: this rank's slice of each global micro-batch as
        ``(dataset index, epoch, position in epoch)`` triples."""
        b, rank = self.cfg.train_batch_size, self.accelerator.process_index
        while True:
            order = self.epoch_order(epoch)
            for m in range(position, self.batches_per_epoch):
                start = m * self.global_batch + rank * b
                yield [(order[p], epoch, p) for p in range(start, start + b)]
            epoch, position = epoch + 1, 0

    def _loader(self):
        """Batches (with their sample keys) continuing exactly where the run stands; workers optional."""
        dataset = _KeyedSamples(self.dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=self._rank_batches(self.epoch, self.position),
                                             collate_fn=_collate_keyed, num_workers=self.cfg.dataloader_num_workers)
        for batch, keys in loader:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self.position += 1
            yield batch, keys

    def _style_embeds(self, batch) -> torch.Tensor:
        """Pooled SigLIP embeddings, computed once per sample (the encoder is frozen)."""
        missing = [i for i, sid in enumerate(batch.ids) if sid not in self.style_cache]
        if missing:
            embeds = self.model.encode_style([batch.style_images[i] for i in missing])
            for i, e in zip(missing, embeds):
                self.style_cache[batch.ids[i]] = e.detach()
        return torch.stack([self.style_cache[sid] for sid in batch.ids])

    # ------------------------------------------------------------------ one micro-batch
    def train_step(self, batch, keys) -> torch.Tensor:
        model = self.model
        embeds, pooled, text_ids = self.prompts.get(batch.texts)
        cond = model.prepare_condition(batch.image, batch.mask, embeds, pooled, text_ids,
                                       self._style_embeds(batch), guidance_scale=self.cfg.guidance_scale)
        x0 = model.encode_latents(batch.image)
        draws = [sample_generator(self.cfg.seed, e, p) for e, p in keys]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws]).to(x0.device, x0.dtype)
        normal = torch.stack([torch.randn((), generator=g) for g in draws])
        sigma = sample_sigmas(normal, self.train_sigmas).to(x0.device)
        x_t = interpolate(x0, noise, sigma)
        target = noise - x0

        region = torch.zeros_like(batch.mask)
        for i, (left, top, right, bottom) in enumerate(batch.source_boxes):
            region[i, :, top:bottom, left:right] = 1
        weights = token_weights(pixel_mask_to_tokens(batch.mask), pixel_mask_to_tokens(region),
                                self.cfg.masked_loss_weight).to(x0.device)
        with self.accelerator.autocast():
            pred = model.velocity(x_t, sigma, cond, adapter=self.adapter)
        return flow_matching_loss(pred, target, weights)

    # ------------------------------------------------------------------ the loop
    def run(self, stop_at: int | None = None) -> Path | None:
        """Train to ``--max_train_steps`` (or stop early after optimizer step ``stop_at``, as an interruption would)."""
        cfg, acc = self.cfg, self.accelerator
        last_ckpt = None
        step_start, losses = time.perf_counter(), []
        end = cfg.max_train_steps if stop_at is None else min(stop_at, cfg.max_train_steps)
        batches = self._loader()
        while self.global_step < end:
            batch, keys = next(batches)
            with acc.accumulate(self.adapter):
                loss = self.train_step(batch, keys)
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients:
                    params = self.adapter.parameters()
                    grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if not acc.sync_gradients:
                continue

            self.global_step += 1
            self.lr_scheduler.step()
            ema_decay = self.ema.step(self.global_step) if self.ema is not None else None
            elapsed = time.perf_counter() - step_start
            mean_loss = acc.gather(torch.stack(losses).mean()[None]).mean().item()
            if self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_train_steps:
                metrics = {
                    "train/loss": mean_loss, "train/lr": self.lr_scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm), "train/epoch": self.epoch,
                    "timing/step_s": elapsed,
                    "perf/images_per_s": self.global_batch * cfg.gradient_accumulation_steps / elapsed,
                    "memory/peak_gb": peak_memory_gb(acc.device),
                }
                if ema_decay is not None:
                    metrics["ema/decay"] = ema_decay
                self.monitor.log(self.global_step, metrics)
            self.monitor.advance(1, loss=mean_loss)
            if self.global_step % cfg.checkpointing_steps == 0 or self.global_step == cfg.max_train_steps:
                last_ckpt = self.save()
            step_start, losses = time.perf_counter(), []
        batches.close()
        self.monitor.close()
        return last_ckpt

    def save(self) -> Path:
        state = {"global_step": self.global_step, "epoch": self.epoch, "position": self.position,
                 "global_batch": self.global_batch, "num_processes": self.accelerator.num_processes}
        path = ckpt.save_checkpoint(self.accelerator, self.cfg.output_dir, self.global_step, self.adapter, state,
                                    ema=self.ema, total_limit=self.cfg.checkpoints_total_limit)
        self.monitor.line(f"saved {path}")
        return path


class _KeyedSamples(torch.utils.data.Dataset):
    """Indexed by ``(dataset index, epoch, position)`` so each prepared sample travels with its key."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch, position = key
        return self.dataset[index], (epoch, position)


def _collate_keyed(items):
    return collate_samples([s for s, _ in items]), [k for _, k in items]
