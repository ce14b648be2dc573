"""Metrics to TensorBoard (through accelerate's trackers), a ``tail -f``-able line log, a progress bar."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated by this process, or peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20


def _flat_config(cfg: dict) -> dict:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.items()}


CONSOLE_KEYS = ("train/loss", "train/lr", "train/grad_norm", "reward/mean", "reward/failed", "adv/zero_std_fraction",
                "train/approx_kl", "train/clipfrac", "train/kl", "train/old_deviate", "eval/reward_mean",
                "timing/step_s", "timing/rollout_s", "timing/update_s")


class RunMonitor:
    """Main-process logging; on other ranks every call is a no-op."""

    def __init__(self, accelerator, output_dir, config: dict, report_to: str, total_steps: int, initial_step: int):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.line_log = Path(output_dir) / "train_log.txt"
        self.trackers = report_to != "none"
        self.bar = None
        if self.trackers:
            accelerator.init_trackers("calligrapher", config=_flat_config(config))
        if self.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", dynamic_ncols=True)

    def line(self, text: str, console: str | None = None) -> None:
        """One line to ``train_log.txt`` (flushed, so ``tail -f`` follows it) and, above the progress
        bar, to the console (``console`` replaces it there when given)."""
        if not self.main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.line_log.open("a", encoding="utf-8") as f:
            f.write(f"{stamp} {text}\n")
        shown = text if console is None else console
        if self.bar is not None:
            self.bar.write(shown)
        else:
            print(shown, flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """All metrics to the trackers and the line log; the console gets the few that read at a glance."""
        if self.trackers:
            self.accelerator.log(metrics, step=step)
        if self.main:
            full = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
            brief = " ".join(f"{k.split('/', 1)[-1] if k.startswith('train/') else k}={metrics[k]:.4g}"
                             for k in CONSOLE_KEYS if k in metrics)
            self.line(f"step={step} {full}", console=f"step={step} {brief}" if brief else None)

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image to TensorBoard (main process, when a tracker is on)."""
        if not (self.trackers and self.main):
            return
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
                tracker.writer.flush()

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers:
            self.accelerator.end_training()
