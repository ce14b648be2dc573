"""Every command-line flag of ``python -m train.train`` (docs/ARCHITECTURE.md §2), with defaults, help and validation.

The flags are the fields of :class:`TrainConfig`; ``--help`` is built from the field metadata.
:func:`validate` checks everything that can be checked before a model is loaded and returns
all problems at once, so a run never fails minutes in on a bad combination.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path


class ConfigError(ValueError):
    """A problem with the run's configuration that is only detectable once set-up has begun."""


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model and data
    model_type: str = opt("flux", "Base model family. Only 'flux' (FLUX.1-Fill-dev) exists.")
    pretrained_model_name_or_path: str | None = opt(None, "Diffusers-layout FLUX.1-Fill folder (transformer/, vae/, "
                                                          "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, "
                                                          "scheduler/).", required=True)
    siglip_path: str | None = opt(None, "SigLIP vision model folder (e.g. siglip-so400m-patch14-384).", required=True)
    train_data_json: str | None = opt(None, "Training data: a .json list, a .jsonl file, or a benchmark-layout "
                                            "folder (self_bench.txt + test{N}_{source,mask,ref}.png).", required=True)
    output_dir: str | None = opt(None, "Where checkpoints, logs/ (TensorBoard) and train_log.txt go.", required=True)
    resolution: int = opt(512, "Side of the square the source (and mask) is resized to, aspect ratio not kept, as the "
                                 "official inference does (multiple of 16).")
    no_reference_strip: bool = opt(False, "Do not paste the reference above the source as an in-context strip.")
    reference_strip_height: int = opt(0, "Fixed height (multiple of 16) of the reference strip. 0 = the official "
                                         "rule (follows each reference's aspect ratio), which batches only "
                                         "references of one aspect ratio.")
    max_sequence_length: int = opt(512, "T5 prompt length in tokens (FLUX.1-Fill uses 512).")
    num_tokens: int = opt(128, "Style tokens produced by the image projection (the released adapter uses 128).")
    initial_ip_adapter_path: str | None = opt(None, "Start from these adapter weights: a file (ip-adapter.bin or the "
                                                    "official calligrapher.bin layout) or a checkpoint-N folder "
                                                    "(FOLDER@ema for its ip-adapter-ema.bin).")
    offload_text_encoder_two: bool = opt(False, "Keep the text encoders (T5 is ~9.5 GB in bf16) on the CPU and fill "
                                                "the prompt-embedding cache there; they are freed afterwards either way.")
    prompt_cache_dir: str | None = opt(None, "Disk cache of prompt embeddings (default OUTPUT_DIR/prompt_cache).")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes.")
    latent_cache: str = opt("host", "Keep each training sample's VAE latents (source and masked source: the posterior "
                                    "mean, deterministic) in host memory after their first use instead of encoding "
                                    "them every step ('off'). python -m train.plan prints the bytes per sample.",
                            choices=("host", "off"))

    # ---------------------------------------------------------------- optimisation
    train_batch_size: int = opt(1, "Samples per process per micro-batch. In RL: rollout images per process per "
                                   "batch (train_batch_size x processes must be a multiple of "
                                   "--rl_num_images_per_prompt; a group may span processes).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(1e-4, "AdamW learning rate.")
    lr_scheduler: str = opt("constant", "LR schedule.", choices=("constant", "constant_with_warmup", "linear", "cosine"))
    lr_warmup_steps: int = opt(0, "LR warm-up in optimizer steps.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = opt(False, "8-bit AdamW from bitsandbytes (CUDA only).")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    max_grad_norm_skip: float = opt(10.0, "Skip an optimizer step (no weight, EMA or optimizer-state change) whose "
                                          "gradient norm exceeds this multiple of the median of the last 100 accepted "
                                          "steps (from the 10th step on); a NaN/Inf loss or gradient is always "
                                          "skipped. 0 = skip only non-finite steps.")
    max_consecutive_skips: int = opt(5, "Stop the run (exit code 4, the newest checkpoint intact) after this many "
                                        "skipped optimizer steps in a row.")
    max_train_steps: int | None = opt(None, "Optimizer steps to train (global_step counts optimizer steps).",
                                      required=True)
    mixed_precision: str = opt("no", "Autocast precision; the frozen base model is stored in this dtype.",
                               choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute transformer activations in backward to save memory.")
    guidance_scale: float = opt(30.0, "Guidance value fed to FLUX-Fill's guidance embedding during supervised "
                                      "training (the official inference default is 30).")
    masked_loss_weight: float = opt(1.0, "Flow-matching loss weight inside the mask relative to outside (1 = plain MSE).")
    seed: int = opt(0, "Seed for data order, noise and timesteps (all keyed per sample, so layouts agree).")

    # ---------------------------------------------------------------- checkpoints and logging
    checkpointing_steps: int = opt(500, "Write OUTPUT_DIR/checkpoint-{step}/ every N optimizer steps (and at the end).")
    checkpoints_total_limit: int | None = opt(None, "Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: str | None = opt(None, "A checkpoint folder, or 'latest' (newest complete one in "
                                                   "OUTPUT_DIR; starts fresh when there is none).")
    overwrite_output_dir: bool = opt(False, "Start a fresh run in an OUTPUT_DIR that already holds checkpoints, "
                                            "deleting them (without it such a run is refused).")
    report_to: str = opt("tensorboard", "Tracker for metrics ('tensorboard' or 'none').", choices=("tensorboard", "none"))
    logging_steps: int = opt(10, "Log metrics every N optimizer steps (and the last one; RL also logs each epoch). "
                                 "train_log.txt and TensorBoard get every metric, the console a short line.")

    # ---------------------------------------------------------------- EMA
    use_ema: bool = opt(False, "Keep an exponential moving average of the adapter weights.")
    ema_decay: float = opt(0.9999, "Maximum EMA decay; effective decay is min((1+s)/(10+s), ema_decay).")
    ema_update_interval: int = opt(1, "Update the EMA every N optimizer steps.")
    ema_device: str = opt("same", "Where the EMA copy lives.", choices=("same", "cpu"))

    # ---------------------------------------------------------------- RL (common)
    use_rl: bool = opt(False, "Switch to online RL after --rl_warmup_steps supervised steps.")
    rl_method: str = opt("grpo", "RL method.", choices=("grpo", "nft"))
    rl_warmup_steps: int = opt(1000, "Supervised optimizer steps before RL starts.")
    rl_num_images_per_prompt: int = opt(1, "Rollouts per dataset sample (group size k).")
    rl_num_batches_per_epoch: int = opt(1, "Rollout batches per RL epoch.")
    rl_num_inference_steps: int = opt(50, "Sampler steps per rollout.")
    rl_guidance_scale: float | None = opt(None, "Guidance embedded in rollouts and the held-out evaluation (default: "
                                                "--guidance_scale, 30 for FLUX-Fill, the value it is used at).")
    rl_timestep_fraction: float = opt(1.0, "Fraction of sampler steps trained per sample.")
    rl_num_inner_epochs: int = opt(1, "Passes over each RL epoch's rollouts.")
    rl_learning_rate: float | None = opt(None, "AdamW learning rate of the RL phase (default: --learning_rate). RL "
                                               "starts with a fresh optimizer and its own --lr_scheduler schedule "
                                               "from its first step.")
    rl_adam_weight_decay: float | None = opt(None, "AdamW weight decay of the RL phase (default: "
                                                   "--adam_weight_decay; flow_grpo and DiffusionNFT use 1e-4).")
    rl_adv_clip_max: float = opt(5.0, "Advantages are clamped to [-max, max].")
    rl_per_prompt_stat_tracking: bool = opt(False, "Normalise rewards within each group (needs k > 1).")
    rl_kl_beta: float | None = opt(None, "KL weight to the RL-start adapter (default 0.1 for grpo, 0.01 for nft).")
    rl_global_std: bool = opt(False, "With per-prompt stat tracking: centre by the group mean but divide by the std "
                                     "of the whole (all-process) batch.")
    rl_reward_norm: str = opt("weighted", "'weighted': normalise the weighted reward; 'per_scorer': normalise each "
                                          "scorer's score first, then weight (GDPO-style; keeps one scorer's scale "
                                          "from drowning the others).", choices=("weighted", "per_scorer"))
    rl_copy_dtype: str = opt("bf16", "Storage dtype of the RL reference copy (and of the NFT old copy with "
                                     "--nft_decay_type 0). An old copy that decays (types 1, 2) is always fp32: "
                                     "in bf16 it stops moving once (1 - d)|theta - old| falls below half an ulp.",
                             choices=("bf16", "fp32"))
    rl_eval_data: str | None = opt(None, "Held-out data (same formats as --train_data_json) scored with deterministic "
                                         "samples every --rl_eval_every RL epochs, logged under eval/.")
    rl_eval_every: int = opt(0, "Evaluate on --rl_eval_data every N RL epochs (and at RL start and end); 0 = only at "
                                "RL start and end.")
    rl_eval_reward_weights: str | None = opt(None, "Reward weights for the held-out evaluation (default: "
                                                   "--reward_weights).")
    rl_eval_num_inference_steps: int | None = opt(None, "Sampler steps of the held-out evaluation (default: "
                                                        "--rl_num_inference_steps).")
    rl_image_log_every: int = opt(0, "Log a TensorBoard image grid of rollouts every N RL epochs (0 = never).")
    rl_loss_region: str = opt("canvas", "Tokens the RL objectives (GRPO log-probabilities and KL, NFT x0 errors and "
                                        "KL) average over: 'source' leaves out the in-context reference strip, "
                                        "which is cropped off before scoring, as the supervised loss does; "
                                        "'canvas' (default) keeps every token: the strip's sampled transitions are part of the action and "
                                        "reach the source through attention (leaving them out stopped GRPO learning "
                                        "on the tiny model).", choices=("source", "canvas"))
    rl_divergence_patience: int = opt(3, "Warn when the held-out reward has fallen for this many evaluations in a "
                                         "row while the training reward rose (reward hacking); 0 = never.")
    rl_stop_on_divergence: bool = opt(False, "Stop the run (after a checkpoint) when that warning fires; the best "
                                             "held-out checkpoint is kept as OUTPUT_DIR/best.json names it.")
    rl_grpo_clip_range: float = opt(0.2, "GRPO ratio clip range. One update moves |log ratio| by ~1e-3, so 0.2 "
                                         "never binds: use 1e-4 (sde) or 1e-5 (cps) and watch train/clipfrac.")
    rl_grpo_guard: bool = opt(False, "GRPO-Guard (--rl_sde_type sde): normalise each step's log-ratio and re-weight "
                                     "its gradient across steps (see the guide).")
    rl_noise_level: float = opt(0.7, "GRPO SDE noise level a.")
    rl_sde_type: str = opt("sde", "GRPO sampler: 'sde' (flow_grpo's SDE) or 'cps' (coefficients-preserving).",
                           choices=("sde", "cps"))
    rl_sde_window_size: int = opt(0, "Stochastic window of W consecutive steps per rollout, the only steps trained "
                                     "(0 = every step but the last is stochastic).")
    rl_sde_window_range: str | None = opt(None, "'lo,hi': the window lies inside steps [lo, hi) (default: "
                                                "0,rl_num_inference_steps-1 for sde; the first half of the "
                                                "trajectory, 0,rl_num_inference_steps//2, for cps).")
    nft_beta: float = opt(0.5, "DiffusionNFT mixing coefficient beta.")
    nft_adv_mode: str = opt("normal", "How NFT uses advantages.",
                            choices=("normal", "positive_only", "negative_only", "one_only", "binary"))
    nft_decay_type: int = opt(0, "Old-adapter update schedule (0, 1 or 2; see the guide).", choices=(0, 1, 2))

    # ---------------------------------------------------------------- rewards
    reward_server_url: str | None = opt(None, "Comma-separated reward server URLs (absent = score in-process).")
    reward_weights: str = opt("ocr=0.7,style=0.2,background=0.1", "Weights of the reward scorers.")
    reward_failure_budget: float = opt(0.0, "Fraction of an epoch's samples whose reward may fail; they are dropped "
                                            "from the advantages. Above it the step fails (0 = any failure fails).")
    reward_timeout: float = opt(60.0, "Seconds one reward request may take in all (connect, send, score, reply).")
    reward_retries: int = opt(3, "Extra attempts for a failed reward request, each sent to every reward server "
                                 "at once after a backoff.")

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Train the Calligrapher style adapter on FLUX.1-Fill: supervised flow matching, then online RL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        meta, flag = f.metadata, f"--{f.name}"
        help_text = meta["help"] + (" (required)" if meta.get("required") else "")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
        default = None if f.default is MISSING else f.default
        parser.add_argument(flag, type=kind, default=default, choices=meta.get("choices"), help=help_text)
    return parser


def to_argv(flags: dict) -> list[str]:
    """``{"use_ema": True, "resolution": 64, "report_to": None}`` -> ``["--use_ema", "--resolution", "64"]``:
    ``True`` is a bare switch, ``False`` and ``None`` are left out."""
    argv = []
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not False and v is not None:
            argv += [f"--{k}", str(v)]
    return argv


def parse_args(argv=None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    resolve_defaults(cfg)
    return cfg


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the flags whose default depends on other flags (``None`` = not given)."""
    if cfg.rl_kl_beta is None:
        cfg.rl_kl_beta = 0.1 if cfg.rl_method == "grpo" else 0.01
    if cfg.rl_guidance_scale is None:  # rollouts in the regime the model is deployed in
        cfg.rl_guidance_scale = cfg.guidance_scale
    if cfg.rl_learning_rate is None:
        cfg.rl_learning_rate = cfg.learning_rate
    if cfg.rl_adam_weight_decay is None:
        cfg.rl_adam_weight_decay = cfg.adam_weight_decay
    return cfg


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with the configuration, each naming its flag. Empty list = fine."""
    p: list[str] = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.metadata.get("required") and value in (None, ""):
            p.append(f"--{f.name} is required")
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"--{f.name} must be a finite number, got {value}")
    if cfg.model_type != "flux":
        p.append(f"--model_type {cfg.model_type!r} is not supported; only 'flux' (FLUX.1-Fill-dev) exists")
    for name in ("pretrained_model_name_or_path", "siglip_path"):
        v = getattr(cfg, name)
        if v and not Path(v).is_dir():
            p.append(f"--{name} {v} is not a folder")
    if cfg.train_data_json and not Path(cfg.train_data_json).exists():
        p.append(f"--train_data_json {cfg.train_data_json} does not exist")
    if cfg.initial_ip_adapter_path:
        try:
            initial_adapter_file(cfg)
        except ValueError as exc:
            p.append(f"--initial_ip_adapter_path: {exc}")
    if cfg.resume_from_checkpoint not in (None, "latest") and not Path(cfg.resume_from_checkpoint).is_dir():
        p.append(f"--resume_from_checkpoint {cfg.resume_from_checkpoint} is not a checkpoint folder (or 'latest')")
    if cfg.resolution <= 0 or cfg.resolution % 16:
        p.append(f"--resolution {cfg.resolution} must be a positive multiple of 16 (FLUX packs 2x2 latents of an 8x VAE)")
    positive = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                "logging_steps", "ema_update_interval", "num_tokens", "max_sequence_length",
                "rl_num_images_per_prompt", "rl_num_batches_per_epoch", "rl_num_inference_steps", "rl_num_inner_epochs",
                "rl_eval_num_inference_steps")
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            p.append(f"--{name} must be positive, got {v}")
    if cfg.reference_strip_height < 0 or cfg.reference_strip_height % 16:
        p.append(f"--reference_strip_height {cfg.reference_strip_height} must be 0 or a positive multiple of 16")
    if cfg.max_sequence_length > 512:
        p.append(f"--max_sequence_length {cfg.max_sequence_length} exceeds T5's 512 tokens")
    if cfg.learning_rate <= 0:
        p.append(f"--learning_rate must be positive, got {cfg.learning_rate}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            p.append(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.adam_epsilon <= 0:
        p.append(f"--adam_epsilon must be positive, got {cfg.adam_epsilon}")
    non_negative = ("adam_weight_decay", "max_grad_norm", "lr_warmup_steps", "dataloader_num_workers", "guidance_scale")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            p.append(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("output_dir", "prompt_cache_dir"):
        if getattr(cfg, name):
            p.extend(_check_writable_dir(f"--{name}", Path(getattr(cfg, name))))
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        p.append("--checkpoints_total_limit must be at least 1")
    if not 0 < cfg.ema_decay < 1:
        p.append(f"--ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if not 0 < cfg.rl_timestep_fraction <= 1:
        p.append(f"--rl_timestep_fraction must be in (0, 1], got {cfg.rl_timestep_fraction}")
    if not 0 <= cfg.reward_failure_budget < 1:
        p.append(f"--reward_failure_budget must be in [0, 1), got {cfg.reward_failure_budget}")
    if cfg.reward_timeout <= 0:
        p.append(f"--reward_timeout must be > 0, got {cfg.reward_timeout}")
    if cfg.reward_retries < 0:
        p.append(f"--reward_retries must be >= 0, got {cfg.reward_retries}")
    if cfg.reward_server_url:
        from .rl_ip.reward import parse_server_urls

        try:
            parse_server_urls(cfg.reward_server_url)
        except ValueError as exc:
            p.append(f"--reward_server_url: {exc}")
    if cfg.masked_loss_weight < 0:
        p.append("--masked_loss_weight must be non-negative")
    if cfg.max_grad_norm_skip < 0 or (0 < cfg.max_grad_norm_skip <= 1):
        p.append(f"--max_grad_norm_skip must be 0 (off) or > 1 (a multiple of the median gradient norm), "
                 f"got {cfg.max_grad_norm_skip}")
    if cfg.max_consecutive_skips < 1:
        p.append(f"--max_consecutive_skips must be at least 1, got {cfg.max_consecutive_skips}")
    if cfg.rl_per_prompt_stat_tracking and cfg.rl_num_images_per_prompt < 2:
        p.append("--rl_per_prompt_stat_tracking needs --rl_num_images_per_prompt >= 2: with one image per prompt "
                 "every group has zero spread and every advantage would be 0")
    if cfg.use_8bit_adam:
        p.extend(_check_8bit_adam())
    if cfg.use_rl:
        p.extend(_check_rl(cfg))
    else:
        p.extend(f"--{name} applies only with --use_rl" for name in _given(cfg, RL_ONLY))
    return p


RL_ONLY = ("rl_", "nft_", "reward_")  # prefixes of the flags that only the RL phase reads
GRPO_ONLY = ("rl_noise_level", "rl_grpo_clip_range")
NFT_ONLY = ("nft_",)


def _given(cfg: TrainConfig, prefixes: tuple[str, ...]) -> list[str]:
    """The flags named by ``prefixes`` whose value differs from their default (as resolved for this ``cfg``)."""
    names = [f.name for f in fields(TrainConfig) if f.name.startswith(prefixes)]
    default = resolve_defaults(replace(cfg, **{f.name: f.default for f in fields(TrainConfig) if f.name in names}))
    return [n for n in names if getattr(cfg, n) != getattr(default, n)]


def _check_writable_dir(flag: str, path: Path) -> list[str]:
    """A folder that is (or can be created) where files can be written; checked before anything is loaded."""
    if path.exists() and not path.is_dir():
        return [f"{flag} {path} is a file, not a folder"]
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{flag} {path} cannot be created: {existing} is a file"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return [f"{flag} {path} is not writable ({exc.strerror or type(exc).__name__} in {existing})"]
    return []


def initial_adapter_file(cfg: TrainConfig) -> Path:
    """The weight file ``--initial_ip_adapter_path`` names: a file, or a ``checkpoint-N`` folder's ip-adapter.bin
    (``FOLDER@ema``: its ip-adapter-ema.bin), as the inference tools read it. Raises ValueError."""
    from .cli_flags import split_ema
    from .models.checkpoint_io import resolve_adapter_file  # torch: imported only when the flag is given

    return resolve_adapter_file(*split_ema(cfg.initial_ip_adapter_path))


def sde_window_range(cfg: TrainConfig) -> tuple[int, int] | None:
    """``--rl_sde_window_range`` as ``(lo, hi)``; None when unset. Raises ValueError on a malformed value."""
    if not cfg.rl_sde_window_range:
        return None
    try:
        lo, hi = (int(v) for v in cfg.rl_sde_window_range.split(","))
    except ValueError:
        raise ValueError(f"--rl_sde_window_range {cfg.rl_sde_window_range!r} must be 'lo,hi' (two integers)") from None
    return lo, hi


def default_window_range(cfg: TrainConfig) -> tuple[int, int] | None:
    """The stochastic steps without ``--rl_sde_window_range``: every step but the last for ``sde``; the first
    half of the trajectory for ``cps``, whose late steps' tiny transition std would otherwise dominate the
    log-ratio and its gradient (the guide gives the numbers)."""
    if cfg.rl_sde_type == "cps":
        return 0, max(1, cfg.rl_num_inference_steps // 2)
    return None


def _check_rl(cfg: TrainConfig) -> list[str]:
    from .rewards.base import parse_reward_weights

    p = []
    if cfg.rl_warmup_steps < 0:
        p.append(f"--rl_warmup_steps must be >= 0, got {cfg.rl_warmup_steps}")
    if cfg.max_train_steps is not None and cfg.rl_warmup_steps >= cfg.max_train_steps:
        p.append(f"--rl_warmup_steps {cfg.rl_warmup_steps} leaves no RL step before --max_train_steps "
                 f"{cfg.max_train_steps}")
    if cfg.rl_num_inference_steps < 2:
        p.append("--rl_num_inference_steps must be at least 2 (the final step is never trained)")
    if cfg.rl_num_batches_per_epoch % cfg.gradient_accumulation_steps:
        p.append(f"--rl_num_batches_per_epoch {cfg.rl_num_batches_per_epoch} must be a multiple of "
                 f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}: an RL optimizer step spans "
                 "that many rollout micro-batches")
    if cfg.rl_adv_clip_max <= 0:
        p.append(f"--rl_adv_clip_max must be positive, got {cfg.rl_adv_clip_max}")
    if cfg.rl_kl_beta is not None and cfg.rl_kl_beta < 0:
        p.append(f"--rl_kl_beta must be >= 0, got {cfg.rl_kl_beta}")
    if cfg.rl_learning_rate is not None and cfg.rl_learning_rate <= 0 and cfg.rl_learning_rate != cfg.learning_rate:
        p.append(f"--rl_learning_rate must be positive, got {cfg.rl_learning_rate}")
    if (cfg.rl_adam_weight_decay is not None and cfg.rl_adam_weight_decay < 0
            and cfg.rl_adam_weight_decay != cfg.adam_weight_decay):  # inherited: reported once, for the flag given
        p.append(f"--rl_adam_weight_decay must be >= 0, got {cfg.rl_adam_weight_decay}")
    if cfg.rl_guidance_scale is not None and cfg.rl_guidance_scale < 0:
        p.append(f"--rl_guidance_scale must be >= 0, got {cfg.rl_guidance_scale}")
    if cfg.rl_divergence_patience < 0:
        p.append(f"--rl_divergence_patience must be >= 0, got {cfg.rl_divergence_patience}")
    if cfg.rl_stop_on_divergence and not (cfg.rl_divergence_patience and cfg.rl_eval_data):
        p.append("--rl_stop_on_divergence needs --rl_eval_data and --rl_divergence_patience > 0 (the held-out "
                 "reward it watches)")
    if cfg.rl_global_std and not cfg.rl_per_prompt_stat_tracking:
        p.append("--rl_global_std only applies with --rl_per_prompt_stat_tracking")
    if cfg.rl_method == "grpo":
        if cfg.rl_noise_level <= 0:
            p.append("--rl_noise_level must be positive for GRPO: a deterministic step has no log-probability")
        if cfg.rl_grpo_clip_range <= 0:
            p.append(f"--rl_grpo_clip_range must be positive, got {cfg.rl_grpo_clip_range}")
        if cfg.rl_grpo_guard and cfg.rl_sde_type != "sde":
            p.append("--rl_grpo_guard applies to --rl_sde_type sde (its ratio normalisation assumes the sde step's "
                     "Gaussian); use it without --rl_sde_type cps")
        try:
            from .rl_ip.sampling import check_sde_window

            p.extend(check_sde_window(cfg.rl_num_inference_steps, cfg.rl_sde_window_size, sde_window_range(cfg),
                                      default_range=default_window_range(cfg)))
        except ValueError as exc:
            p.append(str(exc))
        p.extend(f"--{name} applies to NFT only (--rl_method nft)" for name in _given(cfg, NFT_ONLY))
    else:
        p.extend(f"--{name} applies to GRPO only (--rl_method grpo)" for name in _given(cfg, GRPO_ONLY))
        if not 0 < cfg.nft_beta <= 1:
            p.append(f"--nft_beta must be in (0, 1], got {cfg.nft_beta}")
        if cfg.rl_grpo_guard:
            p.append("--rl_grpo_guard applies to GRPO only")
        for name in ("rl_sde_window_size", "rl_sde_window_range"):
            if getattr(cfg, name):
                p.append(f"--{name} applies to GRPO only (NFT rolls out with the deterministic sampler)")
        if cfg.rl_sde_type != "sde":
            p.append("--rl_sde_type applies to GRPO only (NFT rolls out with the deterministic sampler)")
    if cfg.rl_eval_data and not Path(cfg.rl_eval_data).exists():
        p.append(f"--rl_eval_data {cfg.rl_eval_data} does not exist")
    if cfg.rl_eval_every < 0 or cfg.rl_image_log_every < 0:
        p.append("--rl_eval_every and --rl_image_log_every must be >= 0")
    for flag, spec in (("reward_weights", cfg.reward_weights), ("rl_eval_reward_weights", cfg.rl_eval_reward_weights)):
        if spec is None:
            continue
        try:
            parse_reward_weights(spec)
        except ValueError as exc:
            p.append(f"--{flag}: {exc}")
    return p


def _check_8bit_adam() -> list[str]:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return ["--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU kernel)"]
    if importlib.util.find_spec("bitsandbytes") is None:
        return ["--use_8bit_adam needs bitsandbytes: pip install bitsandbytes"]
    return []

