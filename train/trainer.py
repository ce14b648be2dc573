"""The shared run state of every training phase (docs/ARCHITECTURE.md §5, §6), and the phase chain.

:class:`Trainer` builds what every loop needs — validated data, the frozen model, the
prompt-embedding and style caches, optimizer, LR schedule, EMA, monitor, step counters,
checkpoint/resume — and offers one :meth:`Trainer.after_optimizer_step` that does LR, EMA,
logging and checkpoints. The loops read top to bottom in their own files:

* ``train/supervised.py`` — flow matching (all steps without ``--use_rl``; the first
  ``--rl_warmup_steps`` with it);
* ``train/rl_logic/grpo_trainer.py`` and ``train/rl_logic/nft_trainer.py`` — online RL.

:meth:`Trainer.run` chains them; ``global_step`` counts optimizer steps across phases, so a
resumed run continues in the phase it stopped in.

Determinism across layouts: the data order is a per-epoch permutation of the dataset and
every sample's noise and noise level come from a generator keyed by (seed, epoch, position in
the epoch). A global micro-batch of ``train_batch_size x num_processes`` consecutive positions
is split across processes by rank. So 2 processes x batch 1 train on exactly what 1 process x
batch 2 does, batch 4 x accumulation 1 on what batch 1 x accumulation 4 does, and a resumed
run on what an uninterrupted one does.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from safetensors import SafetensorError

from . import checkpointing as ckpt
from . import rng
from .config import ConfigError, TrainConfig, initial_adapter_file
from .data import buckets
from .data.dataset import CalligraphyDataset, load_records
from .data.preprocess import collate_samples
from .data.prompt_cache import PromptCache, encoder_identity, make_encode_fn, release_text_encoders
from .flow_matching import source_region_tokens
from .models.calligrapher import Calligrapher
from .models.checkpoint_io import load_adapter_file
from .monitoring import RunMonitor, peak_memory_gb
from .rl_ip.ema import EMA
from .sample_cache import EncoderCache, available_host_bytes, latent_bytes_per_sample

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Gradients as views into DDP's communication buckets: without it every process holds a second fp32
# copy of the gradients (11.2 GiB at full size). ``train.plan`` reads this setting.
DDP_KWARGS = DistributedDataParallelKwargs(gradient_as_bucket_view=True)


WRITE_FAILED = 5  # exit status of a run whose checkpoint could not be written
TERMINATED = 128 + signal.SIGTERM  # exit status of a run stopped by SIGTERM (after its checkpoint)


class RunStopped(Exception):
    """The run stopped on purpose before ``--max_train_steps``; the entry point prints it and exits ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RLRunState:
    """What an RL phase adds to a checkpoint (registered with accelerate, saved and restored with it).

    ``ref`` is the adapter as it was when RL started (KL anchor), ``old`` the NFT old adapter,
    both :class:`~train.rl_ip.param_copy.ParamCopy`; ``epoch`` counts finished RL epochs and
    ``start_step`` is the global step at which RL began. ``evals`` holds one
    ``[rl_epoch, held-out reward, training reward]`` per held-out evaluation (the divergence alarm
    and the best checkpoint read it); ``stats`` run counters (e.g. RL epochs in a row with clipfrac 0).
    """

    def __init__(self):
        self.epoch = 0
        self.start_step: int | None = None
        self.ref = None
        self.old = None
        self.stats: dict[str, float] = {}
        self.evals: list[list[float]] = []
        self.saved_copies: dict | None = None  # copies read from a checkpoint, until the trainer rebuilds them

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "stats": dict(self.stats),
                "evals": [list(e) for e in self.evals],
                "ref": None if self.ref is None else self.ref.state_dict(),
                "old": None if self.old is None else self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start_step = int(state["epoch"]), state["start_step"]
        self.stats = dict(state.get("stats", {}))
        self.evals = [list(e) for e in state.get("evals", [])]
        self.saved_copies = {"ref": state.get("ref"), "old": state.get("old")}


class PhaseSchedule:
    """The LR schedule of the current phase: the supervised one from step 0, then (at RL start, see
    :meth:`start_rl`) the same ``--lr_scheduler`` restarted on ``--rl_learning_rate`` over the RL steps.

    Registered with accelerate in place of the bare scheduler, so a checkpoint says which phase's schedule
    it continues. accelerate restores the optimizer (with its learning rate) before this object; rebuilding
    the RL scheduler would reset that learning rate, so :meth:`load_state_dict` writes the saved one back.
    """

    def __init__(self, cfg: TrainConfig, optimizer):
        self.cfg, self.optimizer, self.phase = cfg, optimizer, "supervised"
        self.rl_start_step: int | None = None
        self.scheduler = self._build(cfg.max_train_steps)

    def _build(self, num_steps: int):
        from diffusers.optimization import get_scheduler

        return get_scheduler(self.cfg.lr_scheduler, self.optimizer, num_warmup_steps=self.cfg.lr_warmup_steps,
                             num_training_steps=num_steps)

    def start_rl(self, rl_start_step: int) -> None:
        """Switch to the RL schedule: base LR ``--rl_learning_rate``, weight decay ``--rl_adam_weight_decay``."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = cfg.rl_learning_rate
            group["weight_decay"] = cfg.rl_adam_weight_decay
        self.phase, self.rl_start_step = "rl", rl_start_step
        self.scheduler = self._build(max(1, cfg.max_train_steps - rl_start_step))

    def step(self) -> None:
        self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return {"phase": self.phase, "rl_start_step": self.rl_start_step,
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["phase"] == "rl":
            self.phase = "rl"
            self.rl_start_step = state["rl_start_step"]
            self.scheduler = self._build(max(1, self.cfg.max_train_steps - self.rl_start_step))
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


class StepGuard:
    """Decides whether an optimizer step is taken: a non-finite loss or gradient norm, or a norm above
    ``--max_grad_norm_skip`` x the median of the last ``WINDOW`` accepted norms (once ``MIN_HISTORY`` exist),
    skips the step. Its counters travel in ``trainer_state.json`` so a resumed run decides as an uninterrupted
    one would."""

    WINDOW, MIN_HISTORY = 100, 10

    def __init__(self, factor: float, max_consecutive: int):
        self.factor, self.max_consecutive = factor, max_consecutive
        self.norms: deque[float] = deque(maxlen=self.WINDOW)
        self.skipped = 0
        self.consecutive = 0

    def reason(self, grad_norm: float, loss_finite: bool) -> str | None:
        """Why this step must be skipped, or None to take it."""
        if not loss_finite:
            return "non-finite loss"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self.factor > 0 and len(self.norms) >= self.MIN_HISTORY:
            median = statistics.median(self.norms)
            if grad_norm > self.factor * median:
                return (f"gradient norm {grad_norm:.4g} > --max_grad_norm_skip {self.factor:g} x the running "
                        f"median {median:.4g}")
        return None

    def record(self, grad_norm: float, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
            self.norms.append(grad_norm)

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.norms = deque(state["norms"], maxlen=self.WINDOW)
            self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            kwargs_handlers=[DDP_KWARGS],
        )
        self.global_step = 0
        self.epoch = 0
        self.position = 0  # global micro-batches already consumed in the current epoch
        self.rl = RLRunState()
        self.monitor = None
        self.canvas_sizes: list[tuple[int, int]] | None = None  # per sample when they differ (None: one size)
        self.history: list[tuple[int, dict[str, float]]] = []  # every logged (step, metrics), for tests and tools
        self._notes: list[str] = []  # start-up lines for the console and train_log.txt once the monitor exists
        self._checkpoint_due = False
        self.guard = StepGuard(cfg.max_grad_norm_skip, cfg.max_consecutive_skips)
        self.step_skipped = False  # whether the last synchronising micro-batch skipped its optimizer step
        self._loss_bad: torch.Tensor | None = None  # non-finite loss since the last optimizer step (on the device)
        self._skip_reason = ""
        self._terminated = False  # SIGTERM received
        self._saved: tuple[int | None, Path | None] = (None, None)  # (global_step, folder) of the last checkpoint

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        self._check_distributed_setup()
        records = load_records(cfg.train_data_json, resolution=cfg.resolution,
                               flag="--train_data_json")  # raises with every problem
        self.dataset = CalligraphyDataset(records, resolution=cfg.resolution,
                                          reference_strip=not cfg.no_reference_strip,
                                          strip_height=cfg.reference_strip_height or None)
        self.global_batch = cfg.train_batch_size * acc.num_processes
        if len(self.dataset) < self.global_batch:
            raise ConfigError(f"--train_data_json has {len(self.dataset)} samples, fewer than one global batch "
                             f"({cfg.train_batch_size} x {acc.num_processes} processes)")
        if cfg.use_rl and self.global_batch % cfg.rl_num_images_per_prompt:
            raise ConfigError(f"--train_batch_size {cfg.train_batch_size} x {acc.num_processes} processes = "
                              f"{self.global_batch} rollout images per batch is not a multiple of "
                              f"--rl_num_images_per_prompt {cfg.rl_num_images_per_prompt}")
        self._bucket_by_canvas_size()
        self._check_reward_service()
        resume_path = self._prepare_output_dir(out)

        torch.manual_seed(cfg.seed)  # the fresh adapter's initial weights
        weight_dtype = _DTYPES[cfg.mixed_precision]
        self.model = Calligrapher.from_pretrained(
            cfg.pretrained_model_name_or_path, cfg.siglip_path, num_tokens=cfg.num_tokens, dtype=weight_dtype,
            device=acc.device, text_encoder_device="cpu" if cfg.offload_text_encoder_two else None,
        )
        if cfg.initial_ip_adapter_path:
            load_adapter_file(self.model.adapter, initial_adapter_file(cfg))
        if cfg.gradient_checkpointing:
            self.model.transformer.enable_gradient_checkpointing()
        self.eval_dataset = None
        if cfg.use_rl and cfg.rl_eval_data:
            self.eval_dataset = CalligraphyDataset(load_records(cfg.rl_eval_data, resolution=cfg.resolution,
                                                                flag="--rl_eval_data"),
                                                   resolution=cfg.resolution,
                                                   reference_strip=not cfg.no_reference_strip,
                                                   strip_height=cfg.reference_strip_height or None)
        self._fill_prompt_cache(out)
        self.encoders = EncoderCache(self.model, latents=self._latent_cache_fits())

        adapter = self.model.adapter
        adapter.train()
        params = [p for p in adapter.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        self.lr_scheduler = PhaseSchedule(cfg, optimizer)
        self.adapter, self.optimizer = acc.prepare(adapter, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)  # stepped by us once per optimizer step
        if cfg.use_rl:
            acc.register_for_checkpointing(self.rl)
        self.ema = None
        if cfg.use_ema:
            ema_device = torch.device("cpu") if cfg.ema_device == "cpu" else None
            self.ema = EMA(adapter.named_parameters(), cfg.ema_decay, cfg.ema_update_interval, ema_device)

        self._resume(resume_path)
        ckpt.begin_run(acc, out, resume_path)
        self.monitor = RunMonitor(acc, out, cfg.to_dict(), cfg.report_to, cfg.max_train_steps, self.global_step)
        for note in self._notes:
            self.monitor.line(note)
        if resume_path is not None:
            self.monitor.line(f"resumed from {resume_path} at global_step {self.global_step}")
        if acc.is_main_process:
            self.monitor.line(self._memory_plan())
        report = self.model.parameter_report()
        self.monitor.line("trainable parameters: " + ", ".join(f"{k}={v:,}" for k, v in report.items()))
        dropped = len(self.dataset) - self.batches_per_epoch * self.global_batch
        sizes = self.canvas_sizes
        self.monitor.line(f"data: {len(self.dataset)} samples"
                          + (f" in {len(set(sizes))} canvas sizes, batched per size ({buckets.describe(sizes)})"
                             if sizes else "")
                          + f"; {self.batches_per_epoch} global micro-batches of {self.global_batch} per epoch "
                          f"({dropped} dropped); global_step counts optimizer steps")

    def _bucket_by_canvas_size(self) -> None:
        """Record each sample's canvas size (batches are cut per size, :mod:`train.data.buckets`); refuse
        sizes too rare to fill the smallest batch a phase of this run cuts."""
        cfg = self.cfg
        sizes = [self.dataset.canvas_size(i) for i in range(len(self.dataset))]
        self.canvas_sizes = sizes if len(set(sizes)) > 1 else None
        supervised = not cfg.use_rl or cfg.rl_warmup_steps > 0
        unit, what = ((self.global_batch, f"one global batch of {self.global_batch}") if supervised else
                      (self.global_batch // cfg.rl_num_images_per_prompt,
                       f"one RL batch of {self.global_batch // cfg.rl_num_images_per_prompt} prompt group(s)"))
        rare = buckets.undersized(sizes, unit)
        if rare:
            common_h = max(set(sizes), key=sizes.count)[1] - cfg.resolution
            listed = ", ".join(f"{w}x{h} ({c} sample{'s' * (c > 1)})" for (w, h), c in rare.items())
            raise ConfigError(
                f"--train_data_json: canvas size(s) {listed} hold fewer samples than {what}, so no batch of one "
                f"canvas size can be cut from them (the reference strip's height follows each reference's aspect "
                f"ratio; sizes: {buckets.describe(sizes)}); cheapest fix: --reference_strip_height {common_h} "
                f"(one canvas size for every sample), else a smaller --train_batch_size or more such samples")
        self.batches_per_epoch = buckets.batches_per_order(self.canvas_sizes, len(sizes), self.global_batch)

    def _prepare_output_dir(self, out: Path) -> Path | None:
        """Create OUTPUT_DIR, clear interrupted writes, refuse to mix a fresh run with old checkpoints.

        Returns the validated checkpoint to resume from (None = fresh start). Runs after data
        validation, so a rejected dataset leaves no empty folder behind.
        """
        cfg, acc = self.cfg, self.accelerator
        removed = ckpt.prepare_output_dir(out, cfg.resume_from_checkpoint, cfg.overwrite_output_dir,
                                          remove=acc.is_main_process)
        acc.wait_for_everyone()
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            if removed:
                print(f"--overwrite_output_dir: deleted {len(removed)} item(s) of the previous run in {out}",
                      flush=True)
            for stale in ckpt.remove_partial(out):
                self._notes.append(f"removed an incomplete checkpoint left by an interrupted write: {stale}")
        acc.wait_for_everyone()
        resume = ckpt.resolve_resume(out, cfg.resume_from_checkpoint, expect_ema=cfg.use_ema, log=self._notes.append)
        if resume is None and acc.is_main_process:  # a fresh run starts its own held-out curve and best
            (out / "eval_rewards.jsonl").unlink(missing_ok=True)
            (out / ckpt.BEST_FILE).unlink(missing_ok=True)
        return resume

    def _memory_plan(self) -> str:
        """The planner's per-process memory table for this run (``python -m train.plan`` prints the same)."""
        from .plan import format_plan

        try:
            return "memory plan:\n" + format_plan(self.cfg, self.accelerator.num_processes)
        except Exception as exc:  # noqa: BLE001 - the plan informs; a model layout it cannot read must not stop training
            return f"memory plan unavailable: {type(exc).__name__}: {exc}"

    def _check_reward_service(self) -> None:
        """With ``--reward_server_url``, wait for the servers' health (and their scorers) before any
        training, so a wrong URL or a missing scorer fails in seconds, not after the warm-up."""
        cfg, acc = self.cfg, self.accelerator
        if not (cfg.use_rl and cfg.reward_server_url):
            return
        from .rl_ip.reward import RemoteReward

        weights = [cfg.reward_weights] + ([cfg.rl_eval_reward_weights] if cfg.rl_eval_reward_weights else [])
        for spec in weights:
            with RemoteReward(cfg.reward_server_url, spec, rank=acc.process_index, world_size=acc.num_processes,
                              timeout=cfg.reward_timeout) as probe:
                probe.wait_healthy()

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
        if cfg.use_rl and shards_params:
            raise ConfigError("--use_rl cannot run with FSDP or DeepSpeed ZeRO-3: the RL reference and old adapters "
                              "are evaluated as whole parameter copies on the frozen model. Use DDP or DeepSpeed "
                              "ZeRO-2 instead.")

    def _fill_prompt_cache(self, out: Path) -> None:
        """Encode every unique text once (rank 0 writes the disk cache first), then drop CLIP and T5."""
        cfg, acc, model = self.cfg, self.accelerator, self.model
        encode_fn = make_encode_fn(model, cfg.max_sequence_length)
        cache_dir = Path(cfg.prompt_cache_dir) if cfg.prompt_cache_dir else out / "prompt_cache"
        ident = encoder_identity(cfg.pretrained_model_name_or_path, cfg.max_sequence_length, extra=str(model.dtype))
        self.prompts = PromptCache(encode_fn, ident, cache_dir)
        texts = list(self.dataset.texts) + (list(self.eval_dataset.texts) if self.eval_dataset is not None else [])
        if model.pipe.tokenizer_2 is not None and acc.is_main_process:
            from .data.prompt_limits import TruncationNotes

            notes = TruncationNotes(model.pipe.tokenizer_2, cfg.max_sequence_length, emit=self._notes.append)
            for dataset in (self.dataset, self.eval_dataset):
                for record in (dataset.records if dataset is not None else []):
                    notes.check(record.id, record.text)
        from .data.prompt_limits import quiet_truncation

        with quiet_truncation():
            if acc.is_main_process:
                self.prompts.warm(texts)
            acc.wait_for_everyone()
            self.prompts.warm(texts)
        self.prompts.encode_fn = None  # every text is cached: the encoders are no longer needed
        release_text_encoders(model, "free")

    def _latent_cache_fits(self) -> bool:
        """``--latent_cache host`` unless the whole dataset's latents, in every process of this machine, would
        take more than half of the host memory available now (then off, with a note)."""
        cfg = self.cfg
        if cfg.latent_cache == "off":
            return False
        from .plan import canvas

        per_sample = latent_bytes_per_sample(*canvas(cfg), self.model.vae.config, self.model.dtype.itemsize)
        samples = len(self.dataset) + (len(self.eval_dataset) if self.eval_dataset is not None else 0)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
        need, available = per_sample * samples * local, available_host_bytes()
        if need <= available // 2:
            return True
        self._notes.append(f"--latent_cache host needs up to {need / 2**30:.1f} GiB of host memory ({samples} samples "
                           f"x {per_sample / 2**10:.0f} KiB x {local} processes), more than half of the "
                           f"{available / 2**30:.1f} GiB available: VAE latents are encoded every step instead")
        return False

    def _optimizer(self, params):
        cfg = self.cfg
        kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
        if cfg.use_8bit_adam:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kw)
        # fused: one kernel per step that updates in place (the default foreach step allocates temporaries as
        # large as the adapter: 11.2 GiB at full size); available on CUDA and the CPU.
        return torch.optim.AdamW(params, fused=True, **kw)

    def _resume(self, path: Path | None) -> None:
        if path is None:
            return
        state = ckpt.load_checkpoint(self.accelerator, path, self.ema, config=self.cfg.to_dict(),
                                     log=self._notes.append)
        if state["global_batch"] != self.global_batch:
            raise ConfigError(f"{path} was written with a global batch of {state['global_batch']}, this run has "
                             f"{self.global_batch}: the data position cannot be continued exactly")
        self.global_step, self.epoch, self.position = state["global_step"], state["epoch"], state["position"]
        if self.accelerator.is_main_process:
            from .rl_logic.rollout import trim_eval_log

            trim_eval_log(self.cfg.output_dir, len(self.rl.evals))
        self.guard.load_state_dict(state.get("step_guard"))
        saved = self.rl.saved_copies
        if self.rl.start_step is not None and self.cfg.rl_kl_beta > 0 and not (saved or {}).get("ref"):
            raise ConfigError(f"--rl_kl_beta {self.cfg.rl_kl_beta:g}: the RL phase of {path} ran with --rl_kl_beta 0, "
                              f"so it kept no RL-start reference for the KL to anchor to (one made now would anchor "
                              f"it at global_step {self.global_step}); resume with --rl_kl_beta 0, or start a new run "
                              f"from its weights (--initial_ip_adapter_path {path}/ip-adapter.bin)")
        if saved:
            from .rl_ip.param_copy import ParamCopy, copy_dtypes

            dtypes = copy_dtypes(self.cfg)
            for name in ("ref", "old"):
                if saved[name] is not None:
                    copy = ParamCopy(self.model.adapter, dtypes[name])
                    copy.load_state_dict(saved[name])
                    setattr(self.rl, name, copy)
            self.rl.saved_copies = None

    # ------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch ``epoch`` visits them (the same on every rank)."""
        g = rng.epoch_order_generator(self.cfg.seed, epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s global micro-batches, each of one canvas size, cut from :meth:`epoch_order`."""
        return buckets.same_size_batches(self.epoch_order(epoch), self.canvas_sizes, self.global_batch)

    def _rank_batches(self, epoch: int, position: int):
        """From (epoch, position) on, forever: this rank's slice of each global micro-batch as
        ``(dataset index, epoch, position in epoch)`` triples."""
        b, rank = self.cfg.train_batch_size, self.accelerator.process_index
        while True:
            batches = self.epoch_batches(epoch)
            for m in range(position, self.batches_per_epoch):
                start = m * self.global_batch + rank * b
                yield [(batches[m][rank * b + j], epoch, start + j) for j in range(b)]
            epoch, position = epoch + 1, 0

    def loader(self):
        """Batches (with their sample keys) continuing exactly where the run stands; workers optional."""
        dataset = _KeyedSamples(self.dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=self._rank_batches(self.epoch, self.position),
                                             collate_fn=_collate_keyed, num_workers=self.cfg.dataloader_num_workers,
                                             worker_init_fn=_die_with_parent)
        for batch, keys in loader:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self.position += 1
            yield batch, keys

    # ------------------------------------------------------------------ conditioning
    def style_embeds(self, batch) -> torch.Tensor:
        """Pooled SigLIP embeddings of the batch's style images, each computed once (see :mod:`train.sample_cache`)."""
        return self.encoders.style(batch.style_images)

    def clean_latents(self, batch) -> torch.Tensor:
        """Packed latents ``x0`` of the batch's sources, cached per sample unless ``--latent_cache off``."""
        return self.encoders.clean_latents(batch.image)

    def source_tokens(self, batch) -> torch.Tensor:
        """``[B, L]`` fraction of each packed token inside the source region: the in-context reference strip
        (cropped off before scoring, never a target) gets 0. The supervised loss weights its tokens by it, the RL
        objectives with ``--rl_loss_region source``."""
        return source_region_tokens(batch.mask, batch.source_boxes)

    def rl_tokens(self, batch) -> torch.Tensor:
        """``[B, L]`` token weights of the RL objectives: :meth:`source_tokens`, or 1 everywhere with
        ``--rl_loss_region canvas``."""
        tokens = self.source_tokens(batch)
        return tokens if self.cfg.rl_loss_region == "source" else torch.ones_like(tokens)

    def condition(self, batch, guidance_scale: float):
        """The model conditioning of a :class:`~train.data.preprocess.SampleBatch` (cached prompts, styles and
        masked-source latents)."""
        embeds, pooled, text_ids = self.prompts.get(batch.texts)
        return self.model.prepare_condition(batch.image, batch.mask, embeds, pooled, text_ids,
                                            self.style_embeds(batch), guidance_scale=guidance_scale,
                                            masked_latents=self.encoders.masked_latents(batch.image, batch.mask))

    # ------------------------------------------------------------------ one optimizer step
    def optimizer_step(self, loss: torch.Tensor) -> float | None:
        """Clip, step and zero the gradients inside ``accelerator.accumulate``; returns the grad norm on a sync.

        ``loss`` is this micro-batch's (already backpropagated) loss. On a sync the :class:`StepGuard`
        may skip the step: the gradients are dropped and neither the weights nor the optimizer state change;
        :attr:`step_skipped` tells :meth:`after_optimizer_step`, which then leaves LR, EMA and step count alone.
        """
        acc, cfg = self.accelerator, self.cfg
        bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: no host sync per micro-batch
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        if not acc.sync_gradients:
            self.optimizer.step()  # accelerate's wrapper does nothing until the sync
            return None
        limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.adapter.parameters(), limit))
        # every process decides alike: the norm is of the reduced gradients, the loss flag is gathered
        finite = not bool(acc.gather(self._loss_bad.float().reshape(1)).max() > 0)
        self._loss_bad = None
        reason = self.guard.reason(grad_norm, finite)
        self.step_skipped = reason is not None
        self.guard.record(grad_norm, self.step_skipped)
        if self.step_skipped:
            self._skip_reason = reason
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # DDP points a re-created gradient at its bucket again
        return grad_norm

    def start_rl_optimizer(self) -> None:
        """At RL start (not on resume): a fresh optimizer state — the supervised phase's Adam moments
        (beta2 = 0.999 remembers ~1000 steps of its gradient scale) would mis-scale the first RL updates — and
        the RL learning rate, weight decay and schedule."""
        self.optimizer.state.clear()
        self.lr_scheduler.start_rl(self.global_step)
        self.guard.norms.clear()  # RL gradients have their own scale: the median starts again

    def _report_skip(self) -> None:
        """Log a skipped step; stop the run after ``--max_consecutive_skips`` of them in a row."""
        guard, cfg = self.guard, self.cfg
        self.monitor.line(f"warning: skipped the optimizer step after global_step {self.global_step}: "
                          f"{self._skip_reason} ({guard.consecutive} in a row, {guard.skipped} in all)")
        self.log({"train/skipped_steps": float(guard.skipped)})
        if guard.consecutive >= cfg.max_consecutive_skips:
            newest = ckpt.latest_resumable(cfg.output_dir, cfg.use_ema)
            kept = f"the newest checkpoint {newest} is intact" if newest else "no checkpoint was written yet"
            raise RunStopped(f"{guard.consecutive} optimizer steps in a row were skipped at global_step "
                             f"{self.global_step} (last: {self._skip_reason}); the run diverged and stops here. "
                             f"{kept}: continue it with --resume_from_checkpoint latest and a higher "
                             f"--max_grad_norm_skip, or start a new run from its weights (--initial_ip_adapter_path "
                             f"CHECKPOINT/ip-adapter.bin) with a lower learning rate", exit_code=4)

    def after_optimizer_step(self, metrics: dict[str, float], progress: dict | None = None,
                             checkpoint_now: bool = True) -> None:
        """Everything that follows an optimizer step, in every phase: LR, EMA, logging, checkpoints.

        RL loops pass ``checkpoint_now=False`` and call :meth:`maybe_checkpoint` at the end of the
        epoch, the only point from which a run can be resumed exactly.
        """
        cfg = self.cfg
        if self.step_skipped:
            self.step_skipped = False
            self._report_skip()
            return
        self.global_step += 1
        self.lr_scheduler.step()
        metrics = dict(metrics)
        metrics["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["train/skipped_steps"] = float(self.guard.skipped)
        if self.ema is not None:
            decay = self.ema.step(self.global_step)
            if decay is not None:
                metrics["ema/decay"] = decay
        metrics["memory/peak_gb"] = peak_memory_gb(self.accelerator.device)
        if self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_train_steps:
            self.log(metrics)
        self.monitor.advance(1, **(progress or {}))
        if self.global_step % cfg.checkpointing_steps == 0 or self.global_step == cfg.max_train_steps:
            self._checkpoint_due = True
        if checkpoint_now:
            self.checkpoint_or_stop()

    def checkpoint_or_stop(self) -> Path | None:
        """At a point a resume continues exactly from: write a due checkpoint; after a SIGTERM (every process
        agreeing on the step) write one in any case and stop the run."""
        terminated = self._terminated
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(terminated)], device=self.accelerator.device)
            terminated = bool(self.accelerator.gather(flag).max() > 0)
        if terminated and self._saved[0] != self.global_step:
            self.request_checkpoint()
        path = self.maybe_checkpoint() or self._saved[1]
        if terminated:
            raise RunStopped(f"SIGTERM: stopped at global_step {self.global_step} after writing {path}; continue "
                             f"with --resume_from_checkpoint latest", exit_code=TERMINATED)
        return path

    def log(self, metrics: dict[str, float]) -> None:
        self.history.append((self.global_step, dict(metrics)))
        self.monitor.log(self.global_step, metrics)

    def request_checkpoint(self) -> None:
        """Have the next :meth:`maybe_checkpoint` write one (e.g. at a new best held-out reward)."""
        self._checkpoint_due = True

    def maybe_checkpoint(self) -> Path | None:
        if not self._checkpoint_due:
            return None
        self._checkpoint_due = False
        return self.save()

    # ------------------------------------------------------------------ the phases
    def run(self, stop_at: int | None = None) -> None:
        """Train to ``--max_train_steps`` (or stop after optimizer step ``stop_at``, as an interruption would).

        Supervised flow matching up to the warm-up, then the RL method; each phase picks up at
        ``global_step``, so a resumed run continues in the right phase.
        """
        cfg = self.cfg
        end = cfg.max_train_steps if stop_at is None else min(stop_at, cfg.max_train_steps)
        warmup_end = cfg.rl_warmup_steps if cfg.use_rl else cfg.max_train_steps
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.global_step >= cfg.max_train_steps:
                self.monitor.line(f"nothing to do: global_step {self.global_step} has reached --max_train_steps "
                                  f"{cfg.max_train_steps}")
                return
            if self.global_step < min(end, warmup_end):
                from .supervised import train_supervised

                train_supervised(self, min(end, warmup_end))
            if cfg.use_rl and self.global_step < end:
                if cfg.rl_method == "grpo":
                    from .rl_logic.grpo_trainer import train_grpo as rl_loop
                else:
                    from .rl_logic.nft_trainer import train_nft as rl_loop
                rl_loop(self, end)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.close()

    def _on_sigterm(self, signum, frame) -> None:
        # only a flag: the loop stops at its next resumable point (checkpoint_or_stop)
        if not self._terminated:
            print("SIGTERM received: the run stops after a checkpoint at its next resumable point", file=sys.stderr)
        self._terminated = True

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def save(self) -> Path:
        state = {"global_step": self.global_step, "epoch": self.epoch, "position": self.position,
                 "global_batch": self.global_batch, "num_processes": self.accelerator.num_processes,
                 "phase": "rl" if self.rl.start_step is not None else "supervised", "rl_epoch": self.rl.epoch,
                 "step_guard": self.guard.state_dict()}
        try:
            path = ckpt.save_checkpoint(self.accelerator, self.cfg.output_dir, self.global_step, self.adapter, state,
                                        ema=self.ema, total_limit=self.cfg.checkpoints_total_limit,
                                        config=self.cfg.to_dict())
        except (OSError, SafetensorError) as exc:  # disk full, quota, a vanished mount: earlier checkpoints are intact
            newest = ckpt.latest_resumable(self.cfg.output_dir, self.cfg.use_ema)
            reason = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RunStopped(f"could not write the checkpoint of global_step {self.global_step} in "
                             f"{self.cfg.output_dir}: {reason}; "
                             + (f"the newest checkpoint {newest} is intact: make room and continue with "
                                f"--resume_from_checkpoint latest" if newest else "no checkpoint was written yet"),
                             exit_code=WRITE_FAILED) from None
        self.monitor.line(f"saved {path}")
        self._saved = (self.global_step, path)
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


def _die_with_parent(worker_id: int) -> None:
    """A DataLoader worker gets SIGKILL when the trainer dies, however it dies (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: torch's own watchdog still ends idle workers
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a SIGTERM to the process group ends workers at once


def _collate_keyed(items):
    return collate_samples([s for s, _ in items]), [k for _, k in items]
