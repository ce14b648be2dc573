"""Checkpoint folders: ``OUTPUT_DIR/checkpoint-{step}/`` written atomically, found, validated, pruned, resumed (docs/ARCHITECTURE.md §5).

A checkpoint holds ``ip-adapter.bin`` (+ ``ip-adapter-ema.bin`` with EMA), accelerate's full
training state, ``trainer_state.json`` (global step, data position, EMA update count, the
run's flags under ``"config"``) and ``manifest.json`` (the size and sha256 of every other file,
whether the weights were finite, the checkpoint's lineage: below). accelerate 1.15's
``save_state`` writes, for one prepared model and optimizer and one registered LR scheduler:
``model.safetensors``, ``optimizer.bin``,
``custom_checkpoint_0.pkl`` (the scheduler), ``random_states_{rank}.pkl`` (and ``scheduler.bin``
/ ``scaler.pt`` when a scheduler is prepared / fp16 is used; FSDP and DeepSpeed write
``pytorch_model*`` / ``optimizer_*`` entries instead). Every ``.bin``/``.pkl``/``.pt`` is a
``torch.save`` zip archive.

Lineage: every start of a run (fresh or resumed) is a new branch with a random id.
``OUTPUT_DIR/run.json`` (:func:`begin_run`) records the branch writing into the folder and its
ancestry, newest first: ``[[branch, None], [parent_branch, fork_step], ...]`` — the parent
branch's checkpoints count up to the step this branch resumed from. Each checkpoint's manifest
copies the lineage it was written under. ``latest`` and pruning consider only the checkpoints
of this lineage, so a run resumed from an earlier step never jumps back to the branch it left.
Folders without ``run.json`` or checkpoints without a manifest (older versions) count as one lineage.

Safety rules:

- Writes go to a hidden ``.checkpoint-{step}.partial`` folder renamed into place when complete.
  Rewriting an existing step first sets the old folder aside (``.checkpoint-{step}.old``), so a
  crash at any moment leaves one complete copy; :func:`remove_partial` puts it back.
- Pruning (``--checkpoints_total_limit``) after saving step ``s`` looks only at this lineage's
  checkpoints with step <= ``s`` and keeps the newest ``limit`` of them by step (``s`` itself always
  survives) and the newest one whose weights were finite. Checkpoints with a higher step or of
  another branch are left alone.
- A fresh run refuses an output folder that already holds checkpoints, set-aside ones included
  (:func:`prepare_output_dir`).
- Resuming validates the checkpoint first (:func:`validate_checkpoint`: every file the manifest
  lists, its size and sha256, finite weights); ``latest`` skips damaged checkpoints with a note
  (:func:`resolve_resume`); flags are compared with the saved ones (:func:`check_resume_flags`).
  Every problem is one :class:`CheckpointError` line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import ConfigError
from .models.checkpoint_io import ADAPTER_FILE, EMA_FILE, AdapterFileError, atomic_write_text, read_adapter_file, save_adapter_file

_NAME = re.compile(r"^checkpoint-(\d+)$")
_ASIDE = re.compile(r"^\.checkpoint-(\d+)\.old$")
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
MANIFEST_FILE = "manifest.json"
BEST_FILE = "best.json"  # the best held-out checkpoint of an RL run: never pruned
RUN_FILE = "run.json"  # the lineage of the run writing into OUTPUT_DIR (begin_run)
TENSORBOARD_RUN = "logs/calligrapher"  # accelerate's TensorBoard folder for RunMonitor's project; logs/ may hold more
RUN_LOGS = (TENSORBOARD_RUN, "train_log.txt", BEST_FILE, RUN_FILE)  # --overwrite_output_dir removes these too
_STATE_INTS = ("global_step", "epoch", "position", "global_batch")
_FULL_LOAD_BYTES = 64 << 20  # archives up to this size are loaded completely when validated
_SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate layouts without a plain model.safetensors


class CheckpointError(ConfigError):
    """A checkpoint or output folder that cannot be used as asked; the entry point exits 2 with this one line."""


# ---------------------------------------------------------------------------- finding checkpoints
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoint-{step}`` folder in ``output_dir`` (complete or not), by step (numerically), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda sp: sp[0])


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (trainer state and adapter present) in ``output_dir``, oldest first."""
    return [(s, p) for s, p in checkpoint_dirs(output_dir)
            if (p / STATE_FILE).is_file() and (p / ADAPTER_FILE).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step (not validated: see :func:`resolve_resume`)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Clean up after interrupted writes; returns the deleted half-written folders.

    A checkpoint set aside while its step was being rewritten is put back when the rewrite never
    completed, and deleted when it did.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    for aside in root.iterdir():
        m = _ASIDE.match(aside.name)
        if m and aside.is_dir():
            final = root / f"checkpoint-{m.group(1)}"
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, final)
    stale = list(root.glob(".checkpoint-*.partial"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ---------------------------------------------------------------------------- lineage
def read_manifest(path: str | os.PathLike) -> dict | None:
    """``manifest.json`` of checkpoint ``path``; None if it has none (written before manifests) or it is unreadable."""
    manifest, _ = _manifest(Path(path))
    return manifest


def _manifest(root: Path) -> tuple[dict | None, str | None]:
    """``(manifest, problem)``: ``(None, None)`` for a checkpoint written before manifests."""
    file = root / MANIFEST_FILE
    if not file.is_file():
        return None, None
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({type(exc).__name__})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                            and isinstance(v.get("sha256"), str) for v in files.values())
            and isinstance(manifest.get("finite", {}), dict) and isinstance(manifest.get("lineage") or [], list)):
        return None, "not a checkpoint manifest (\"files\" with a size and sha256 each, \"finite\", \"lineage\")"
    return manifest, None


def _run_record(output_dir: str | os.PathLike) -> dict:
    try:
        record = json.loads((Path(output_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_lineage(output_dir: str | os.PathLike) -> list | None:
    """The lineage ``run.json`` records for the run writing into ``output_dir``; None without one."""
    try:
        return [(branch, until) for branch, until in _run_record(output_dir)["lineage"]]
    except (KeyError, TypeError, ValueError):
        return None


def in_lineage(path: str | os.PathLike, step: int, lineage: list | None) -> bool:
    """Whether checkpoint ``path`` (at ``step``) belongs to ``lineage`` (None: any checkpoint does). A checkpoint
    with an unreadable manifest counts, so that validation reports it as damaged."""
    if lineage is None:
        return True
    manifest, problem = _manifest(Path(path))
    if problem:
        return True
    own = (manifest or {}).get("lineage") or [[None, None]]
    return any(branch == own[0][0] and (until is None or step <= until) for branch, until in lineage)


def begin_run(accelerator, output_dir: str | os.PathLike, parent: str | os.PathLike | None) -> None:
    """Collective, after resolving and loading ``parent`` (None = fresh start): record in ``run.json`` that a new
    branch continues ``parent``'s lineage from its step, so that ``latest`` means this run's newest checkpoint."""
    lineage = [[uuid.uuid4().hex[:12], None]]
    if parent is not None:
        own = (read_manifest(parent) or {}).get("lineage") or [[None, None]]
        lineage += [[own[0][0], read_trainer_state(parent)["global_step"]]] + own[1:]
    record = {"lineage": lineage, "parent": str(Path(parent).resolve()) if parent is not None else None}
    accelerator.wait_for_everyone()  # every process has resolved --resume_from_checkpoint against the old record
    if accelerator.is_main_process:
        atomic_write_text(Path(output_dir) / RUN_FILE, json.dumps(record, indent=2))
    accelerator.wait_for_everyone()


def prepare_output_dir(output_dir: str | os.PathLike, resume: str | None, overwrite: bool,
                       remove: bool = True) -> list[Path]:
    """Check that a run may write into ``output_dir``; with ``overwrite`` delete the previous run's files.

    A fresh run (no ``resume``) into a folder holding checkpoints (or one set aside by an interrupted
    rewrite, which :func:`remove_partial` would put back) raises :class:`CheckpointError`: its
    checkpoints would mix with the old ones. ``overwrite`` deletes the old run's checkpoints (complete,
    half-written and set-aside ones), its TensorBoard folder ``logs/calligrapher``, ``train_log.txt``,
    ``best.json`` and ``run.json``; other files (``prompt_cache/``, anything else kept in ``logs/``) stay.
    Returns what was deleted. Call it on every process; pass ``remove=False`` on all but the main one.
    """
    root = Path(output_dir)
    if overwrite and resume:
        raise CheckpointError(f"--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint "
                              f"{resume} would continue from: pass one of them, not both")
    aside = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ()) if (m := _ASIDE.match(p.name))]
    existing = sorted(checkpoint_dirs(root) + aside, key=lambda sp: sp[0])
    if not existing or resume:
        return []
    names = ", ".join(p.name for _, p in existing[-3:]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
    if not overwrite:
        raise CheckpointError(f"--output_dir {root} already holds checkpoints of another run ({names}); continue "
                              f"it with --resume_from_checkpoint latest, choose another --output_dir, or pass "
                              f"--overwrite_output_dir to delete them")
    doomed = [p for _, p in checkpoint_dirs(root)] + sorted(root.glob(".checkpoint-*")) + \
        [root / name for name in RUN_LOGS if (root / name).exists()]
    if remove:
        for p in doomed:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    return doomed


# ---------------------------------------------------------------------------- writing
def split_adapter_state(flat: dict) -> dict:
    """``{"image_proj.x": t, "ip_adapter.0.y": t}`` (a full adapter state dict) -> our file layout."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        part, _, rest = k.partition(".")
        out[part][rest] = v.detach().cpu()
    return out


def save_checkpoint(accelerator, output_dir, step: int, adapter, trainer_state: dict, ema=None,
                    total_limit: int | None = None, config: dict | None = None) -> Path:
    """Collective: every process must call it. Returns the final checkpoint path.

    ``config`` (the run's flags, ``cfg.to_dict()``) is stored in ``trainer_state.json`` under
    ``"config"`` so that a resume can compare flags (:func:`check_resume_flags`). ``manifest.json``,
    written last, records every file's size and sha256, whether the adapter (and EMA) weights are
    finite, and the lineage ``run.json`` names.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are complete before they are hashed
    full_state = accelerator.get_state_dict(adapter)  # gathers shards under FSDP / DeepSpeed
    if accelerator.is_main_process:
        save_adapter_file(split_adapter_state(full_state), tmp / ADAPTER_FILE)
        finite = {ADAPTER_FILE: _all_finite(full_state.values())}
        if ema is not None:
            save_adapter_file(split_adapter_state(ema.shadow), tmp / EMA_FILE)
            finite[EMA_FILE] = _all_finite(ema.shadow.values())
        state = dict(trainer_state, ema_num_updates=ema.num_updates if ema is not None else None)
        if config is not None:
            state["config"] = config
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        digests = _sha256_files(tmp, files)
        manifest = {"lineage": read_lineage(output_dir), "finite": finite,
                    "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": digests[n]} for n in files}}
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2))
        _move_into_place(tmp, final)
        if total_limit:
            prune_checkpoints(output_dir, step, total_limit)
    accelerator.wait_for_everyone()
    return final


def _all_finite(tensors) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256_files(root: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of ``root / name`` for each name, several files at a time (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_sha256(root / n), names)))


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f".{final.name}.old")  # a crash from here on leaves one complete copy
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def best_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The folder name ``best.json`` records (the best held-out checkpoint of an RL run), or None."""
    try:
        return json.loads((Path(output_dir) / BEST_FILE).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None


def write_best(output_dir: str | os.PathLike, record: dict) -> None:
    """Record the best held-out checkpoint (``record["checkpoint"]`` is its folder name) in ``best.json``."""
    atomic_write_text(Path(output_dir) / BEST_FILE, json.dumps(record, indent=2))


def prune_checkpoints(output_dir: str | os.PathLike, step: int, total_limit: int) -> list[Path]:
    """After saving ``step``: among this lineage's checkpoints with step <= ``step`` keep the newest ``total_limit``
    and the newest whose weights were finite; returns the deleted. The checkpoint ``best.json`` names is never
    deleted and does not count towards the limit."""
    best, lineage = best_checkpoint(output_dir), read_lineage(output_dir)
    ours = [(s, p) for s, p in checkpoint_dirs(output_dir) if in_lineage(p, s, lineage)]
    older = [p for s, p in ours if s <= step and p.name != best]
    doomed = older[:-total_limit] if total_limit > 0 else []
    finite = [p for p in older if all((read_manifest(p) or {}).get("finite", {}).values())]
    doomed = [p for p in doomed if p not in finite[-1:]]  # weights to go back to when the newer ones hold NaN/Inf
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------- validating
def read_trainer_state(path: str | os.PathLike) -> dict:
    """``trainer_state.json`` of checkpoint ``path``; :class:`CheckpointError` naming the file if unusable."""
    file = Path(path) / STATE_FILE
    problem = _state_problem(file, Path(path).name, expect_ema=False)
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    return json.loads(file.read_text())


def validate_checkpoint(path: str | os.PathLike, expect_ema: bool | None = None,
                        model_shapes: dict[str, tuple] | None = None) -> list[str]:
    """Problems that would stop ``path`` from resuming a run, each ``"<file>: <problem>"``; empty = usable.

    Every file the manifest lists must be there with its recorded size and sha256 (zip archives
    and safetensors carry no checksum the loaders verify, so this is what catches a flipped bit),
    and weights recorded as non-finite are refused. Torch archives above 64 MB are checked for a
    complete zip directory (what truncation destroys), smaller ones are loaded; ``model.safetensors``
    is checked against its header and, with ``model_shapes`` (``{name: shape}`` of the adapter being
    resumed), against the model. ``expect_ema`` requires ``ip-adapter-ema.bin``; without it the EMA
    file is not checked (a run resumed without EMA does not read it). Each file gets one problem at
    most. Hashing reads every byte once (several files at a time): seconds for a full-size checkpoint.
    """
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    names = {p.name for p in root.iterdir()}
    if not names & {STATE_FILE, ADAPTER_FILE, MODEL_FILE, OPTIMIZER_FILE}:
        return [f"{root}: not a checkpoint folder (none of {STATE_FILE}, {ADAPTER_FILE}, {MODEL_FILE}, "
                f"{OPTIMIZER_FILE})"]
    problems = []
    manifest, problem = _manifest(root)
    if problem:
        problems.append(f"{MANIFEST_FILE}: {problem}")
    recorded, unused = (manifest or {}).get("files", {}), set() if expect_ema else {EMA_FILE}
    required = [STATE_FILE, ADAPTER_FILE] + ([EMA_FILE] if expect_ema else [])
    sharded = any(n.startswith("pytorch_model") for n in names)  # FSDP / DeepSpeed write their own layout
    if not sharded:
        required += [OPTIMIZER_FILE] + ([] if "model.bin" in names else [MODEL_FILE])
    required += [n for n in recorded if n not in unused]  # all the layout wrote: custom_checkpoint_*.pkl, RNG states
    ema_gone = (" (saved with this checkpoint and deleted since; resume without --use_ema to go on without it)"
                if EMA_FILE in recorded else " (the run was written without --use_ema)")
    problems += [f"{name}: missing" + (ema_gone if name == EMA_FILE else "")
                 for name in dict.fromkeys(required) if not (root / name).is_file()]
    if STATE_FILE in names:
        problem = _state_problem(root / STATE_FILE, root.name, expect_ema=bool(expect_ema) and EMA_FILE in names)
        if problem:
            problems.append(f"{STATE_FILE}: {problem}")
    if MODEL_FILE in names:
        problems += [f"{MODEL_FILE}: {p}" for p in _safetensors_problems(root / MODEL_FILE, model_shapes)]
    for name in sorted(names - ({EMA_FILE} if not expect_ema else set())):  # an unused EMA file may be damaged
        if name.endswith((".bin", ".pkl", ".pt")) and (root / name).is_file():
            problem = _archive_problem(root / name)
            if problem:
                problems.append(f"{name}: {problem}")
    skip = unused | {p.split(": ", 1)[0] for p in problems}  # files with a problem already, or not read
    present = [n for n in recorded if n not in skip and (root / n).is_file()]
    resized = {n: (root / n).stat().st_size for n in present if (root / n).stat().st_size != recorded[n]["bytes"]}
    problems += [f"{n}: {size} bytes, {MANIFEST_FILE} records {recorded[n]['bytes']} (changed since it was saved)"
                 for n, size in resized.items()]
    same_size = [n for n in present if n not in resized]
    digests = _sha256_files(root, same_size)
    problems += [f"{n}: content differs from the sha256 in {MANIFEST_FILE} (changed on disk since it was saved)"
                 for n in same_size if digests[n] != recorded[n]["sha256"]]
    problems += [f"{n}: holds NaN/Inf weights (found when it was saved)"
                 for n, ok in (manifest or {}).get("finite", {}).items() if not ok and n not in skip]
    return problems


def _state_problem(file: Path, folder_name: str, expect_ema: bool) -> str | None:
    if not file.is_file():
        return "missing"
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid JSON ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    if not isinstance(state, dict):
        return "not a JSON object"
    bad = [k for k in _STATE_INTS if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)]
    if bad:
        return f"missing or non-integer {bad}"
    if expect_ema and not isinstance(state.get("ema_num_updates"), int):
        return "no integer ema_num_updates beside an EMA file"
    m = _NAME.match(folder_name)
    if m and int(m.group(1)) != state["global_step"]:
        return f"global_step {state['global_step']} does not match the folder name {folder_name}"
    return None


def _archive_problem(file: Path) -> str | None:
    """Why ``file`` is not a complete ``torch.save`` archive, or None."""
    size = file.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    try:
        zipfile.ZipFile(file).close()
    except (zipfile.BadZipFile, OSError):
        return f"truncated or not a torch archive ({size} bytes, no zip directory)"
    if size <= _FULL_LOAD_BYTES:
        import torch

        try:
            torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure to unpickle makes the file unusable
            return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"
    return None


def _safetensors_problems(file: Path, model_shapes: dict | None) -> list[str]:
    size = file.stat().st_size
    if size < 8:
        return [f"empty or truncated ({size} bytes)"]
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return [f"truncated ({size} bytes; the header alone needs {8 + n})"]
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return ["header is not valid safetensors JSON"]
    if 8 + n + end != size:
        return [f"{'truncated' if size < 8 + n + end else 'has trailing bytes'} ({size} bytes, "
                f"the header describes {8 + n + end})"]
    if model_shapes is None:
        return []
    saved = {k: tuple(v.get("shape", ())) for k, v in tensors.items()}
    want = {k: tuple(v) for k, v in model_shapes.items()}
    out = []
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    if missing:
        out.append(f"lacks {len(missing)} adapter tensor(s) {missing[:3]}")
    if extra:
        out.append(f"has {len(extra)} tensor(s) this adapter does not {extra[:3]}")
    diff = [k for k in sorted(want.keys() & saved.keys()) if want[k] != saved[k]]
    if diff:
        k = diff[0]
        out.append(f"{len(diff)} tensor(s) differ in shape from this model, e.g. {k!r} is {saved[k]} in the checkpoint "
                   f"and {want[k]} here (written with another --num_tokens or base model?)")
    return out


def resolve_resume(output_dir: str | os.PathLike, spec: str | None, expect_ema: bool | None = None,
                   model_shapes: dict | None = None, log=print) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint spec`` means, validated; None = start fresh.

    ``latest``: the highest step of this lineage (``run.json``: the run being continued, and the
    checkpoint it resumed from, also outside ``output_dir``) whose checkpoint validates; each newer
    damaged one and each newer one of another branch is reported through ``log`` and skipped; no
    checkpoint at all = None (with a note); none of this lineage, or all damaged = error. A named
    folder must validate. Raises :class:`CheckpointError` (one line).
    """
    if not spec:
        return None
    if spec != "latest":
        problems = validate_checkpoint(spec, expect_ema, model_shapes)
        if problems:
            raise CheckpointError(f"--resume_from_checkpoint {spec}: " + "; ".join(problems))
        return Path(spec)
    root, lineage = Path(output_dir), read_lineage(output_dir)
    found, others = [], []
    for step, path in checkpoint_dirs(root):
        (found if in_lineage(path, step, lineage) else others).append((step, path))
    parent = _run_record(root).get("parent")
    if parent and len(lineage or ()) > 1 and Path(parent).parent != root.resolve() and Path(parent).is_dir():
        found = sorted(found + [(lineage[1][1], Path(parent))], key=lambda sp: sp[0])  # resumed from another folder
    if not found and others:
        names = ", ".join(p.name for _, p in others)
        raise CheckpointError(f"--resume_from_checkpoint latest: none of the checkpoints in {output_dir} ({names}) "
                              f"belongs to the run being continued ({RUN_FILE}); name one with "
                              f"--resume_from_checkpoint PATH, or start over with --overwrite_output_dir")
    if not found:
        log(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting fresh")
        return None
    damaged, step_of = [], {p: s for s, p in found}
    for _, path in reversed(found):
        problems = validate_checkpoint(path, expect_ema, model_shapes)
        if not problems:
            for bad, why in damaged:
                log(f"--resume_from_checkpoint latest: skipping damaged {bad} ({why}); using {path.name}")
            newer = [p.name for s, p in others if s > step_of[path]]
            if newer:
                log(f"--resume_from_checkpoint latest: leaving {', '.join(newer)} alone: another branch of this "
                    f"folder, which the run being continued left when it resumed from an earlier step; using "
                    f"{path.name}")
            return path
        damaged.append((path, "; ".join(problems)))
    raise CheckpointError(f"--resume_from_checkpoint latest: no usable checkpoint in {output_dir}: "
                          + " | ".join(f"{p.name}: {why}" for p, why in damaged))


def latest_resumable(output_dir: str | os.PathLike, expect_ema: bool | None = None) -> Path | None:
    """What ``--resume_from_checkpoint latest`` would continue from now, validated; None if nothing (never raises)."""
    try:
        return resolve_resume(output_dir, "latest", expect_ema, log=lambda _: None)
    except CheckpointError:
        return None


def load_checkpoint(accelerator, path, ema=None, config: dict | None = None, log=print) -> dict:
    """Validate, then restore accelerate's state (+ EMA) from ``path``; returns ``trainer_state.json``.

    With ``config`` (this run's ``cfg.to_dict()``) the flags are first compared with the saved
    ones (:func:`check_resume_flags`): notes go to ``log``, conflicts raise. Nothing is loaded
    unless everything checks out; any failure is one :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    shapes = None
    if len(accelerator._models) == 1 and accelerator.distributed_type.value not in _SHARDED:
        sd = accelerator.unwrap_model(accelerator._models[0]).state_dict()  # what model.safetensors must match
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
    problems = validate_checkpoint(path, expect_ema=ema is not None, model_shapes=shapes)
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))
    state = read_trainer_state(path)
    if config is not None:
        notes, errors = check_resume_flags(state.get("config"), config, state["global_step"])
        if errors:
            raise CheckpointError(f"cannot resume from {path}: " + "; ".join(errors))
        for note in notes:
            log(f"resuming from {path.name}: {note}")
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # noqa: BLE001 - one clear line instead of accelerate's traceback
        raise CheckpointError(f"cannot resume from {path}: accelerate could not load its training state "
                              f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from exc
    if ema is not None:
        try:
            weights = read_adapter_file(path / EMA_FILE)
            ema.load_state_dict({"shadow": {f"{part}.{k}": v for part, sd in weights.items() for k, v in sd.items()},
                                 "num_updates": state["ema_num_updates"]})
        except (AdapterFileError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot resume from {path}: {EMA_FILE}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}") from exc
    return state



# ---------------------------------------------------------------------------- flags on resume
# What a resumed run may do with each flag. Flags not listed here may change and get a note
# ("changed from A to B; the new value applies from here on"), so new flags are safe by default.
MUST_MATCH = {
    "model_type": "the adapter belongs to that base model",
    "num_tokens": "the image projection's shapes depend on it",
    "gradient_accumulation_steps": "every saved optimizer step averaged that many micro-batches; the data "
                                   "position, LR schedule and --max_train_steps count such steps",
    "learning_rate": "the restored optimizer and LR scheduler keep the saved base learning rate",
    "rl_learning_rate": "the restored RL optimizer and LR schedule keep the saved base learning rate",
    "rl_adam_weight_decay": "the restored RL optimizer keeps the saved value",
    "lr_scheduler": "the restored scheduler state would continue on the saved base learning rate",
    "lr_warmup_steps": "the restored scheduler state belongs to the saved warm-up",
    "adam_beta1": "the restored optimizer state keeps the saved value",
    "adam_beta2": "the restored optimizer state keeps the saved value",
    "adam_weight_decay": "the restored optimizer state keeps the saved value",
    "adam_epsilon": "the restored optimizer state keeps the saved value",
    "use_8bit_adam": "the optimizer state has another format",
    "use_rl": "the checkpoint's phases and RL state (reference copy, RL epoch) follow it",
    "rl_method": "the RL state (reference and old copies, epoch layout) belongs to that method",
}
FREE = {  # bookkeeping, paths and speed/memory switches: no effect on what is learned
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "checkpointing_steps",
    "checkpoints_total_limit", "report_to", "logging_steps", "dataloader_num_workers", "prompt_cache_dir",
    "offload_text_encoder_two", "gradient_checkpointing", "ema_device", "initial_ip_adapter_path",
}
_CONSTANT_LR = ("constant", "constant_with_warmup")


def check_resume_flags(saved_config: dict | None, current_config: dict,
                       saved_step: int | None = None) -> tuple[list[str], list[str]]:
    """Compare this run's flags with those saved in a checkpoint: ``(notes, errors)``, one line each.

    Errors: a :data:`MUST_MATCH` flag changed (the restored state would silently ignore or
    contradict it), ``--max_train_steps`` below the checkpoint's step, ``--mixed_precision fp16``
    from a checkpoint without a loss-scaler state. Notes: any other changed flag except
    :data:`FREE` ones, ``--max_train_steps`` equal to the checkpoint's step (nothing to train),
    a longer or shorter non-constant LR schedule, EMA weights left behind.
    """
    notes, errors = [], []
    total = current_config.get("max_train_steps")
    if saved_step is not None and total is not None:
        if total < saved_step:
            errors.append(f"--max_train_steps {total} is below the checkpoint's step {saved_step}: a run cannot go "
                          f"back; raise --max_train_steps or resume from an earlier checkpoint")
        elif total == saved_step:
            notes.append(f"--max_train_steps {total} equals the checkpoint's step: nothing left to train")
    if saved_config is None:
        notes.append("the checkpoint holds no saved flags, so they cannot be compared")
        return notes, errors
    changed = {k: (saved_config[k], v) for k, v in current_config.items()
               if k in saved_config and saved_config[k] != v and k not in FREE}
    for key, (old, new) in changed.items():
        if key in MUST_MATCH:
            errors.append(f"--{key} {new} differs from the checkpoint's {old}: {MUST_MATCH[key]}. Resume with "
                          f"--{key} {old}, or start a new run from the weights with --initial_ip_adapter_path")
        elif key == "mixed_precision" and new == "fp16":
            errors.append(f"--mixed_precision fp16 differs from the checkpoint's {old}: it holds no fp16 loss-scaler "
                          f"state. Resume with --mixed_precision {old}")
        elif key == "max_train_steps":
            sched = current_config.get("lr_scheduler")
            notes.append(f"--max_train_steps {old} -> {new}" + ("" if sched in _CONSTANT_LR else
                         f": the {sched} LR schedule now spans {new} steps, so the learning rate jumps here"))
        elif key == "use_ema" and not new:
            notes.append("--use_ema is off: the checkpoint's EMA weights are not carried on")
        elif key == "train_batch_size":
            notes.append(f"--train_batch_size {old} -> {new} (the global batch must stay the same)")
        else:
            notes.append(f"--{key} changed from {old} to {new}; the new value applies from here on")
    return notes, errors
