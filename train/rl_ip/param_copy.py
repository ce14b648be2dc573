"""One primitive for every shadow of the adapter: EMA, the RL reference and the NFT old adapter.

A :class:`ParamCopy` is a dict of tensors keyed like ``adapter.state_dict()``, with its own
dtype and device. It is evaluated on the shared frozen base model through
``Calligrapher.velocity(params=copy.params())`` — never a second transformer, never a swap of
the live weights — and moved towards the live weights with :meth:`ParamCopy.lerp_from`.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def copy_dtypes(cfg) -> dict[str, torch.dtype]:
    """Storage dtype of the RL reference (``"ref"``) and NFT old (``"old"``) copies.

    The reference never moves: ``--rl_copy_dtype``. An old copy that decays (``--nft_decay_type`` 1 or 2)
    is float32 whatever that flag says: ``old <- round(d·old + (1 − d)·θ)`` in bf16 has a dead band — once
    (1 − d)|θ − old| is below half a bf16 ulp, old never moves again. With type 0 (d = 0) the copy is θ
    rounded once, so ``--rl_copy_dtype`` applies.
    """
    stored = DTYPES[cfg.rl_copy_dtype]
    return {"ref": stored, "old": torch.float32 if cfg.nft_decay_type != 0 else stored}


def _named_tensors(source) -> dict[str, torch.Tensor]:
    """A module (unwrapped from DDP), a dict or ``(name, tensor)`` pairs -> ``{name: tensor}``."""
    if isinstance(source, torch.nn.Module):
        source = getattr(source, "module", source)
        return dict(source.state_dict(keep_vars=True))
    return dict(source)


class ParamCopy:
    def __init__(self, source, dtype: torch.dtype = torch.float32, device=None):
        """Copy ``source`` (an adapter module, a state dict or named parameters) into ``dtype`` on ``device``."""
        self.dtype, self.device = dtype, None if device is None else torch.device(device)
        self.tensors = {n: t.detach().to(self.device or t.device, dtype, copy=True)
                        for n, t in _named_tensors(source).items()}

    @torch.no_grad()
    def lerp_from(self, source, keep: float) -> None:
        """``self <- keep * self + (1 - keep) * source`` (keep = 0 copies the source exactly)."""
        src = _named_tensors(source)
        if src.keys() != self.tensors.keys():
            raise ValueError(f"parameter names differ: {sorted(set(src) ^ set(self.tensors))[:10]}")
        for n, t in self.tensors.items():
            value = src[n].detach().to(t.device, torch.float32)
            if keep == 0.0:
                t.copy_(value)
            elif t.dtype == torch.float32:
                t.mul_(keep).add_(value, alpha=1 - keep)
            else:  # low-precision storage: blend in float32, round once
                t.copy_(t.float().mul_(keep).add_(value, alpha=1 - keep))

    def params(self, device=None) -> dict[str, torch.Tensor]:
        """The tensors for ``velocity(params=...)``, moved to ``device`` when given (a copy kept on the CPU)."""
        if device is None:
            return self.tensors
        return {n: t.to(device, non_blocking=True) for n, t in self.tensors.items()}

    @torch.no_grad()
    def copy_to(self, module) -> None:
        """Write these values into ``module``'s parameters (in the module's dtype)."""
        live = _named_tensors(module)
        for n, p in live.items():
            p.data.copy_(self.tensors[n].to(p.device, p.dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu() for n, t in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.tensors.keys():
            raise ValueError(f"saved copy does not match the adapter; differing keys: "
                             f"{sorted(set(state) ^ set(self.tensors))[:10]}")
        for n, t in self.tensors.items():
            t.copy_(state[n].to(t.device, t.dtype))
