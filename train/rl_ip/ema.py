"""Exponential moving average of the adapter weights (docs/ARCHITECTURE.md §9).

At update ``s`` (0 for the first update) the effective decay is
``d_s = min((1 + s) / (10 + s), ema_decay)`` and ``shadow <- d_s * shadow + (1 - d_s) * param``.
The trainer calls :meth:`EMA.step` once per *optimizer* step (never per micro-batch); it
updates every ``update_interval`` optimizer steps. The shadow is float32 and may live on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .param_copy import ParamCopy


def ema_decay_at(update: int, max_decay: float) -> float:
    """Effective decay of update number ``update`` (0-based)."""
    return min((1 + update) / (10 + update), max_decay)


class EMA:
    def __init__(self, named_parameters, decay: float = 0.9999, update_interval: int = 1, device=None):
        self.decay, self.update_interval = decay, update_interval
        self.params = {n: p for n, p in named_parameters if p.requires_grad}
        self.device = device
        self.copy = ParamCopy(self.params, torch.float32, device)
        self.shadow = self.copy.tensors
        self.num_updates = 0
        self.last_decay: float | None = None

    @torch.no_grad()
    def step(self, optimizer_step: int) -> float | None:
        """Call after optimizer step number ``optimizer_step`` (1-based). Returns the decay used, or None."""
        if optimizer_step % self.update_interval:
            return None
        d = ema_decay_at(self.num_updates, self.decay)
        self.copy.lerp_from(self.params, d)
        self.num_updates += 1
        self.last_decay = d
        return d

    @torch.no_grad()
    def copy_to(self, named_parameters=None) -> None:
        """Write the shadow into the live parameters."""
        params = dict(named_parameters) if named_parameters is not None else self.params
        for n, p in params.items():
            p.copy_(self.shadow[n].to(p.device, p.dtype))

    @contextmanager
    def swapped_in(self):
        """Temporarily run with EMA weights (evaluation, export); the live weights are restored after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"shadow": {n: t.cpu() for n, t in self.shadow.items()}, "num_updates": self.num_updates,
                "decay": self.decay, "update_interval": self.update_interval}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the adapter; differing keys: {sorted(missing)[:10]}")
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
        self.num_updates = int(state["num_updates"])
