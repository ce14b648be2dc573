"""Entry point: ``python -m train.train --help``.

    parse flags -> validate everything at start-up -> build the trainer -> run.
"""

from __future__ import annotations

import sys

from .config import parse_args, validate


def main(argv=None) -> int:
    cfg = parse_args(argv)
    problems = validate(cfg)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    from .config import ConfigError
    from .data.dataset import DatasetError
    from .models.checkpoint_io import AdapterFileError
    from .trainer import TERMINATED, RunStopped, Trainer

    from .rl_ip.reward import RewardError

    trainer = Trainer(cfg)
    try:
        trainer.setup()
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, AdapterFileError) as exc:  # known only once set-up began (e.g. FSDP + EMA)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RewardError as exc:
        print(f"error: --reward_server_url: {exc}", file=sys.stderr)
        return 3

    try:
        trainer.run()
    except RewardError as exc:  # nothing half-done was written: the newest checkpoint resumes exactly
        from .checkpointing import latest_resumable

        newest = latest_resumable(cfg.output_dir, cfg.use_ema)
        kept = f"The newest checkpoint {newest} is intact" if newest else f"No checkpoint in {cfg.output_dir} yet"
        print(f"error: rewards could not be computed: {exc}. {kept}; fix the reward service and continue with "
              "--resume_from_checkpoint latest", file=sys.stderr)
        return 3
    except RunStopped as exc:  # diverged (exit 4), the held-out alarm (exit 0), SIGTERM (143); checkpoints intact
        print(f"{'stopped' if exc.exit_code in (0, TERMINATED) else 'error'}: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _shutdown_processes() -> None:
    """Tear the process group down before the interpreter exits: gloo's threads otherwise may abort the exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main()
    finally:
        _shutdown_processes()
    sys.exit(code)
