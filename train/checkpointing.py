"""Checkpoint folders: ``OUTPUT_DIR/checkpoint-{step}/`` written atomically, found, pruned, resumed (SPEC §5).

A checkpoint holds ``ip-adapter.bin`` (+ ``ip-adapter-ema.bin`` with EMA), accelerate's full
training state (adapter, optimizer, LR scheduler, RNG states, registered objects) and
``trainer_state.json`` (global step, data position, EMA update count). Everything is written
into a hidden ``.checkpoint-{step}.partial`` folder that is renamed into place only when
complete, so a crash mid-write never touches the newest complete checkpoint and ``latest``
never picks a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .models.checkpoint_io import read_adapter_file, save_adapter_file

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "ip-adapter.bin"
EMA_FILE = "ip-adapter-ema.bin"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / ADAPTER_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes; returns what was removed."""
    root = Path(output_dir)
    stale = [p for p in root.glob(".checkpoint-*.partial")] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def split_adapter_state(flat: dict) -> dict:
    """``{"image_proj.x": t, "ip_adapter.0.y": t}`` (a full adapter state dict) -> our file layout."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        part, _, rest = k.partition(".")
        out[part][rest] = v.detach().cpu()
    return out


def save_checkpoint(accelerator, output_dir, step: int, adapter, trainer_state: dict, ema=None,
                    total_limit: int | None = None) -> Path:
    """Collective: every process must call it. Returns the final checkpoint path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    full_state = accelerator.get_state_dict(adapter)  # gathers shards under FSDP / DeepSpeed
    if accelerator.is_main_process:
        save_adapter_file(split_adapter_state(full_state), tmp / ADAPTER_FILE)
        if ema is not None:
            save_adapter_file(split_adapter_state(ema.shadow), tmp / EMA_FILE)
        state = dict(trainer_state, ema_num_updates=ema.num_updates if ema is not None else None)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path, ema=None) -> dict:
    """Restore accelerate's state (+ EMA) from ``path``; returns ``trainer_state.json``."""
    path = Path(path)
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {EMA_FILE}: it was written without --use_ema")
        weights = read_adapter_file(path / EMA_FILE)
        ema.load_state_dict({"shadow": {f"{part}.{k}": v for part, sd in weights.items() for k, v in sd.items()},
                             "num_updates": state["ema_num_updates"]})
    return state
