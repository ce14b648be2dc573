"""Adapter weight files: ``ip-adapter.bin`` in our layout and the official Calligrapher layout.

Our layout (what ``checkpoint-{step}/ip-adapter.bin`` holds)::

    {"image_proj": StyleProjection.state_dict(),          # "mlp.proj.0.weight", "qformer.query_embeds", ...
     "ip_adapter": ModuleList(style blocks).state_dict()}  # "0.to_k_ip.weight", "0.to_v_ip.weight", ...

Official layout (the released ``calligrapher.bin``, read by the official inference code)::

    {"image_proj_mlp": ..., "image_proj_qformer": ..., "attn_adapter": ...}

Loading is strict: every missing or unexpected key and every shape mismatch is reported in
one :class:`AdapterFileError` (the official loader's ``strict=False`` hides such bugs).
Writes are atomic (temporary file + rename) and get the same permissions as any new file (umask).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

ADAPTER_FILE, EMA_FILE = "ip-adapter.bin", "ip-adapter-ema.bin"  # a checkpoint folder's weight files
OURS = ("image_proj", "ip_adapter")
OFFICIAL = ("image_proj_mlp", "image_proj_qformer", "attn_adapter")
_PROJ_PARTS = {"image_proj_mlp": "mlp.", "image_proj_qformer": "qformer."}


class AdapterFileError(ValueError):
    """A weight file that is not a valid adapter for this model; the message lists every problem."""


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file (0666 minus the umask); ``mkstemp`` would give 0600."""
    try:  # Linux reports the umask without changing it (os.umask would, process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write, binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, fsync, give it the usual permissions
    (:func:`new_file_mode`), then rename it over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def adapter_state(adapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's weights in our layout (CPU copies, detached)."""
    adapter = getattr(adapter, "module", adapter)
    return {
        "image_proj": {k: v.detach().cpu().clone() for k, v in adapter.image_proj.state_dict().items()},
        "ip_adapter": {k: v.detach().cpu().clone() for k, v in adapter.ip_adapter.state_dict().items()},
    }


def to_official(state: dict) -> dict:
    """Our layout -> ``{"image_proj_mlp", "image_proj_qformer", "attn_adapter"}``."""
    out = {name: {k[len(prefix):]: v for k, v in state["image_proj"].items() if k.startswith(prefix)}
           for name, prefix in _PROJ_PARTS.items()}
    out["attn_adapter"] = dict(state["ip_adapter"])
    return out


def from_official(state: dict) -> dict:
    """``{"image_proj_mlp", "image_proj_qformer", "attn_adapter"}`` -> our layout."""
    image_proj = {}
    for name, prefix in _PROJ_PARTS.items():
        image_proj.update({prefix + k: v for k, v in state[name].items()})
    return {"image_proj": image_proj, "ip_adapter": dict(state["attn_adapter"])}


def normalize_layout(raw, source: str = "adapter file") -> dict:
    """Detect the layout of a loaded file and return it in our layout, or raise naming what was found."""
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{source}: expected a dict of state dicts, found {type(raw).__name__}")
    keys = set(raw)
    if keys == set(OURS):
        state = raw
    elif keys == set(OFFICIAL):
        state = from_official(raw)
    else:
        raise AdapterFileError(
            f"{source}: unknown layout with top-level keys {sorted(map(str, keys))}; expected {list(OURS)} "
            f"(ip-adapter.bin) or {list(OFFICIAL)} (official calligrapher.bin)"
        )
    for part, sd in state.items():
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise AdapterFileError(f"{source}: '{part}' is not a state dict of tensors")
    return state


def read_adapter_file(path: str | os.PathLike) -> dict:
    """Load either layout from disk (tensor-only unpickling) and return it in our layout."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        # mmap: tensors are paged in on use, so checking several full-size files costs little RAM
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt / truncated / not a torch file
        raise AdapterFileError(f"{path}: cannot be read as a torch checkpoint ({exc.__class__.__name__}: {exc})") from exc
    return normalize_layout(raw, str(path))


def check_finite(state: dict, source: str = "adapter file") -> None:
    """Raise naming the first tensor of ``state`` (our layout) that holds NaN or inf: such weights give NaN images."""
    for part, sd in state.items():
        for key, tensor in sd.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                raise AdapterFileError(f"{source}: tensor '{part}.{key}' holds {nan} NaN and {inf} inf values; "
                                       "the weights are unusable (take an earlier checkpoint)")


def check_compatible(adapter, state: dict, source: str = "adapter file") -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
    adapter = getattr(adapter, "module", adapter)
    problems = []
    for part in OURS:
        want = getattr(adapter, part).state_dict()
        got = state[part]
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        if missing:
            problems.append(f"missing keys in '{part}': {missing}")
        if unexpected:
            problems.append(f"unexpected keys in '{part}': {unexpected}")
        for k in sorted(set(want) & set(got)):
            if tuple(want[k].shape) != tuple(got[k].shape):
                problems.append(f"shape mismatch for '{part}.{k}': file {tuple(got[k].shape)}, "
                                f"model {tuple(want[k].shape)}")
    if problems:
        raise AdapterFileError(f"{source} does not fit this model:\n  " + "\n  ".join(problems))


def load_adapter_state(adapter, state: dict, source: str = "adapter file") -> None:
    """Copy ``state`` (our layout) into ``adapter`` after a strict check."""
    check_compatible(adapter, state, source)
    adapter = getattr(adapter, "module", adapter)
    adapter.image_proj.load_state_dict(state["image_proj"], strict=True)
    adapter.ip_adapter.load_state_dict(state["ip_adapter"], strict=True)


def load_adapter_file(adapter, path: str | os.PathLike) -> None:
    """Load either layout from ``path`` into ``adapter``, strictly."""
    load_adapter_state(adapter, read_adapter_file(path), str(path))


def save_adapter_file(adapter_or_state, path: str | os.PathLike, layout: str = "ours") -> None:
    """Write ``ip-adapter.bin`` (``layout="ours"``) or the official layout (``layout="official"``), atomically."""
    state = adapter_or_state if isinstance(adapter_or_state, dict) else adapter_state(adapter_or_state)
    if layout == "official":
        state = to_official(state)
    elif layout != "ours":
        raise ValueError(f"unknown layout {layout!r}; use 'ours' or 'official'")
    atomic_torch_save(state, path)


def resolve_adapter_file(path: str | Path, ema: bool = False) -> Path:
    """A weight file from a file path or a ``checkpoint-N`` folder; ``ema`` picks ``ip-adapter-ema.bin``."""
    path = Path(path)
    if path.is_dir():
        name = EMA_FILE if ema else ADAPTER_FILE
        found = path / name
        if not found.is_file():
            if ema:
                raise AdapterFileError(f"{path} has no {EMA_FILE}: the run was trained without --use_ema; "
                                       f"drop --ema to use the live weights ({ADAPTER_FILE})")
            raise AdapterFileError(f"{path} has no {ADAPTER_FILE}; pass a checkpoint-N folder or a weight file")
        return found
    if not path.exists():
        raise AdapterFileError(f"adapter path not found: {path}")
    if ema and path.name != EMA_FILE:
        raise AdapterFileError(f"--ema needs a checkpoint-N folder (or the {EMA_FILE} file itself), got {path}")
    return path
