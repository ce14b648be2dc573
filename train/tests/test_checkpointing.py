"""Checkpoint folders on a real accelerator with the tiny style adapter: latest, lineage, pruning, atomic
rewrites, refusing a used output folder, validation of damaged checkpoints (docs/ARCHITECTURE.md §5)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator

from train import checkpointing as ckpt
from train.checkpointing import CheckpointError
from train.config import ConfigError
from train.models.adapter import StyleAdapter
from train.models.tiny import build_flux_transformer
from train.rl_ip.ema import EMA


class Run:
    """A prepared adapter + AdamW + registered LR scheduler (+ EMA), as the trainer sets them up."""

    def __init__(self, out, num_tokens: int = 8, use_ema: bool = True):
        from diffusers.optimization import get_scheduler

        torch.manual_seed(0)
        adapter = StyleAdapter.for_transformer(build_flux_transformer("tiny"), style_dim=32, num_tokens=num_tokens)
        self.acc = Accelerator()
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
        self.scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=20)
        self.adapter, self.optimizer = self.acc.prepare(adapter, optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.ema = EMA(adapter.named_parameters(), 0.9) if use_ema else None
        self.out, self.step = out, 0

    def train(self, steps: int = 1) -> None:
        for _ in range(steps):
            loss = sum((p - 1).square().sum() for p in self.adapter.parameters())
            self.acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                self.ema.step(self.step)

    def save(self, step: int | None = None, limit: int | None = None, config: dict | None = None):
        step = self.step if step is None else step
        state = {"global_step": step, "epoch": 0, "position": step, "global_batch": 1, "num_processes": 1}
        return ckpt.save_checkpoint(self.acc, self.out, step, self.adapter, state, ema=self.ema, total_limit=limit,
                                    config=config)

    def weights(self) -> dict:
        return {k: v.clone() for k, v in self.adapter.state_dict().items()}


@pytest.fixture()
def run(tmp_path):
    return Run(tmp_path / "out")


def steps(out) -> list[int]:
    return [s for s, _ in ckpt.checkpoint_dirs(out)]


# ---------------------------------------------------------------------------- latest and pruning
def test_latest_is_the_highest_step_numerically(run):
    for s in (10, 2, 1000, 9, 500):
        run.save(s)
    assert steps(run.out) == [2, 9, 10, 500, 1000]
    assert [s for s, _ in ckpt.list_checkpoints(run.out)] == [2, 9, 10, 500, 1000]
    assert ckpt.latest_checkpoint(run.out) == run.out / "checkpoint-1000"
    assert ckpt.resolve_resume(run.out, "latest") == run.out / "checkpoint-1000"


def test_pruning_keeps_the_newest(run):
    for _ in range(5):
        run.train()
        run.save(limit=2)
    assert steps(run.out) == [4, 5]


def test_pruning_never_removes_this_runs_checkpoints_for_older_higher_steps(run):
    run.save(180)
    run.save(200)
    run.save(20, limit=2)
    run.save(40, limit=2)
    assert steps(run.out) == [20, 40, 180, 200]
    run.save(60, limit=2)
    assert steps(run.out) == [40, 60, 180, 200]
    assert ckpt.prune_checkpoints(run.out, 60, 1) == [run.out / "checkpoint-40"]
    assert steps(run.out) == [60, 180, 200]


# ---------------------------------------------------------------------------- lineage
def resume_from(run, path) -> None:
    """What a restart with ``--resume_from_checkpoint path`` does: load, then begin a new branch."""
    run.step = ckpt.load_checkpoint(run.acc, path, run.ema)["global_step"]
    ckpt.begin_run(run.acc, run.out, path)


def test_latest_continues_the_branch_a_resumed_run_started_not_the_one_it_left(run):
    ckpt.begin_run(run.acc, run.out, None)
    for _ in range(4):
        run.train(2)
        run.save(limit=3)  # the abandoned branch: checkpoints 4, 6, 8
    resume_from(run, run.out / "checkpoint-4")
    notes = []
    assert ckpt.resolve_resume(run.out, "latest", True, log=notes.append) == run.out / "checkpoint-4"  # crash at once
    assert notes == [("--resume_from_checkpoint latest: leaving checkpoint-6, checkpoint-8 alone: another branch of "
                      "this folder, which the run being continued left when it resumed from an earlier step; using "
                      "checkpoint-4")]
    run.train(1)
    run.save(limit=3)
    new = run.weights()
    run.train(1)  # ... and the process dies at step 6, before its checkpoint
    assert steps(run.out) == [4, 5, 6, 8]  # pruning leaves the other branch alone
    assert ckpt.resolve_resume(run.out, "latest", True, log=notes.append) == run.out / "checkpoint-5"
    assert ckpt.latest_resumable(run.out, True) == run.out / "checkpoint-5"
    resume_from(run, run.out / "checkpoint-5")  # the restart continues the new branch
    assert all(torch.equal(run.weights()[k], new[k]) for k in new) and run.step == 5
    run.train(1)
    run.save(limit=3)  # rewrites the old branch's checkpoint-6
    resume_from(run, ckpt.resolve_resume(run.out, "latest", True, log=notes.append))
    assert run.step == 6
    lineage = ckpt.read_lineage(run.out)
    assert [until for _, until in lineage] == [None, 6, 5, 4] and len({b for b, _ in lineage}) == 4
    assert ckpt.read_manifest(run.out / "checkpoint-8")["lineage"][0][0] == lineage[-1][0]


def test_a_crash_while_rewriting_another_branchs_step_does_not_bring_that_branch_back(run, monkeypatch):
    ckpt.begin_run(run.acc, run.out, None)
    for _ in range(2):
        run.train(2)
        run.save()  # checkpoints 2 and 4
    resume_from(run, run.out / "checkpoint-2")
    run.train(2)
    _fail_when(monkeypatch, os, "replace", lambda src, dst: str(src).endswith(".partial"))
    with pytest.raises(OSError, match="simulated crash"):
        run.save()  # the old branch's checkpoint-4 is set aside, the new one never lands
    monkeypatch.undo()
    ckpt.remove_partial(run.out)  # what the next start does: the old checkpoint-4 is back
    assert steps(run.out) == [2, 4]
    notes = []
    assert ckpt.resolve_resume(run.out, "latest", True, log=notes.append) == run.out / "checkpoint-2"
    assert len(notes) == 1 and "leaving checkpoint-4 alone: another branch" in notes[0]


def test_latest_in_a_folder_none_of_whose_checkpoints_belong_to_the_run(run, tmp_path):
    ckpt.begin_run(run.acc, run.out, None)
    run.save(2)
    ckpt.begin_run(run.acc, run.out, None)  # a new branch without a parent: checkpoint-2 is not its own
    with pytest.raises(CheckpointError) as err:
        ckpt.resolve_resume(run.out, "latest", True)
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint-2" in msg and "--overwrite_output_dir" in msg
    assert ckpt.latest_resumable(run.out, True) is None
    other = Run(tmp_path / "other")  # resumed from another folder's checkpoint, crashed before its first one
    resume_from(other, run.out / "checkpoint-2")
    assert ckpt.resolve_resume(other.out, "latest", True) == run.out / "checkpoint-2"


def test_folders_and_checkpoints_without_lineage_count_as_one(run):
    """Written before run.json and manifests: every checkpoint is the run's, as before."""
    run.save(2)
    run.save(4)
    for _, path in ckpt.checkpoint_dirs(run.out):
        (path / ckpt.MANIFEST_FILE).unlink()
    assert ckpt.resolve_resume(run.out, "latest", True) == run.out / "checkpoint-4"
    resume_from(run, run.out / "checkpoint-2")  # a new branch from an old checkpoint
    assert ckpt.read_lineage(run.out)[1:] == [(None, 2)]
    assert ckpt.resolve_resume(run.out, "latest", True, log=lambda _: None) == run.out / "checkpoint-2"


def test_pruning_keeps_the_newest_checkpoint_with_finite_weights(run):
    ckpt.begin_run(run.acc, run.out, None)
    run.train()
    run.save(limit=1)
    resume_from(run, run.out / "checkpoint-1")
    run.train()
    with torch.no_grad():
        next(run.adapter.parameters()).view(-1)[0] = float("nan")  # a step that slipped past the guards
    for _ in range(2):
        run.save(limit=1)
        run.step += 1
    assert steps(run.out) == [1, 3]  # checkpoint-2 went; checkpoint-1 holds the last finite weights
    assert ckpt.read_manifest(run.out / "checkpoint-3")["finite"] == {ckpt.ADAPTER_FILE: False, ckpt.EMA_FILE: True}
    assert ckpt.validate_checkpoint(run.out / "checkpoint-3", expect_ema=True) == [
        "ip-adapter.bin: holds NaN/Inf weights (found when it was saved)"]
    notes = []
    assert ckpt.resolve_resume(run.out, "latest", expect_ema=True, log=notes.append) == run.out / "checkpoint-1"
    assert len(notes) == 1 and "checkpoint-3 (ip-adapter.bin: holds NaN/Inf" in notes[0]
    with torch.no_grad():
        next(run.adapter.parameters()).view(-1)[0] = 0.0
    run.save(limit=1)  # finite again: the older ones go
    assert steps(run.out) == [4]


# ---------------------------------------------------------------------------- a used output folder
def test_fresh_run_into_a_folder_with_checkpoints_is_refused(run):
    run.save(180)
    run.save(200)
    with pytest.raises(CheckpointError) as err:
        ckpt.prepare_output_dir(run.out, resume=None, overwrite=False)
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint-200" in msg
    for hint in ("--resume_from_checkpoint latest", "another --output_dir", "--overwrite_output_dir"):
        assert hint in msg
    assert isinstance(err.value, ConfigError)  # the entry point turns it into exit 2
    assert steps(run.out) == [180, 200]
    assert ckpt.prepare_output_dir(run.out, resume="latest", overwrite=False) == []
    assert ckpt.prepare_output_dir(run.out.parent / "empty", resume=None, overwrite=False) == []


def test_overwrite_removes_the_old_runs_checkpoints_and_logs_only(run):
    ckpt.begin_run(run.acc, run.out, None)
    run.save(180)
    (run.out / ".checkpoint-200.partial").mkdir()
    tensorboard = run.out / ckpt.TENSORBOARD_RUN
    (tensorboard / "1700000000.5").mkdir(parents=True)
    (tensorboard / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"old curves")
    (run.out / "logs" / "baseline").mkdir()  # a researcher's own files beside the run's TensorBoard folder
    (run.out / "logs" / "baseline" / "events.out.tfevents.1600000000.host.9.0").write_bytes(b"kept")
    (run.out / "logs" / "notes.md").write_text("kept\n")
    (run.out / "train_log.txt").write_text("old run\n")
    (run.out / "prompt_cache").mkdir()
    with pytest.raises(CheckpointError, match="contradict|not both"):
        ckpt.prepare_output_dir(run.out, resume="latest", overwrite=True)
    assert ckpt.prepare_output_dir(run.out, None, overwrite=True, remove=False)  # other ranks: check only
    assert steps(run.out) == [180]
    removed = ckpt.prepare_output_dir(run.out, resume=None, overwrite=True)
    assert sorted(p.relative_to(run.out).as_posix() for p in removed) == [
        ".checkpoint-200.partial", "checkpoint-180", ckpt.TENSORBOARD_RUN, ckpt.RUN_FILE, "train_log.txt"]
    assert sorted(p.relative_to(run.out).as_posix() for p in run.out.rglob("*")) == [
        "logs", "logs/baseline", "logs/baseline/events.out.tfevents.1600000000.host.9.0", "logs/notes.md",
        "prompt_cache"]


def test_a_fresh_run_does_not_adopt_a_checkpoint_set_aside_by_an_interrupted_rewrite(run, monkeypatch):
    run.save(3)
    run.train()
    _fail_when(monkeypatch, os, "replace", lambda src, dst: str(src).endswith(".partial"))
    with pytest.raises(OSError, match="simulated crash"):
        run.save(3)  # the crash leaves only .checkpoint-3.old (and the half-written copy)
    monkeypatch.undo()
    assert steps(run.out) == [] and (run.out / ".checkpoint-3.old").is_dir()
    with pytest.raises(CheckpointError) as err:
        ckpt.prepare_output_dir(run.out, resume=None, overwrite=False)
    assert ".checkpoint-3.old" in str(err.value) and "--resume_from_checkpoint latest" in str(err.value)
    removed = ckpt.prepare_output_dir(run.out, resume=None, overwrite=True)
    assert sorted(p.name for p in removed) == [".checkpoint-3.old", ".checkpoint-3.partial"]
    assert ckpt.remove_partial(run.out) == [] and steps(run.out) == []


# ---------------------------------------------------------------------------- atomic rewrites
def _fail_when(monkeypatch, func_owner, name, predicate):
    real = getattr(func_owner, name)

    def maybe_fail(*args, **kw):
        if predicate(*args):
            raise OSError(5, "simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(func_owner, name, maybe_fail)


def test_crash_while_rewriting_a_step_keeps_the_old_one(run, monkeypatch):
    run.train()
    run.save(3)
    old = run.weights()
    run.train()
    _fail_when(monkeypatch, os, "replace", lambda src, dst: str(src).endswith(".partial"))
    with pytest.raises(OSError, match="simulated crash"):
        run.save(3)
    monkeypatch.undo()
    ckpt.remove_partial(run.out)  # what the next start does
    assert steps(run.out) == [3] and ckpt.validate_checkpoint(run.out / "checkpoint-3", expect_ema=True) == []
    back = ckpt.read_adapter_file(run.out / "checkpoint-3" / ckpt.ADAPTER_FILE)
    assert torch.equal(back["image_proj"]["mlp.norm.weight"], old["image_proj.mlp.norm.weight"])
    assert not list(run.out.glob(".checkpoint-*"))


def test_crash_after_a_rewrite_completed_keeps_the_new_one(run, monkeypatch):
    run.save(3)
    run.train()
    new = run.weights()
    _fail_when(monkeypatch, shutil, "rmtree", lambda p, *a: str(p).endswith(".old") and os.path.isdir(p))
    with pytest.raises(OSError, match="simulated crash"):
        run.save(3)
    monkeypatch.undo()
    assert (run.out / ".checkpoint-3.old").is_dir()
    ckpt.remove_partial(run.out)
    back = ckpt.read_adapter_file(run.out / "checkpoint-3" / ckpt.ADAPTER_FILE)
    assert torch.equal(back["image_proj"]["mlp.norm.weight"], new["image_proj.mlp.norm.weight"])
    assert not list(run.out.glob(".checkpoint-*"))


def test_config_is_stored_with_the_state(run):
    config = {"learning_rate": 1e-4, "lr_scheduler": "cosine", "output_dir": str(run.out)}
    path = run.save(1, config=config)
    state = ckpt.read_trainer_state(path)
    assert state["config"] == config and state["global_step"] == 1 and state["ema_num_updates"] == 0


# ---------------------------------------------------------------------------- damaged checkpoints
def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _grow_archive(path):
    """Append a member to a torch archive: still a valid archive that loads, but not the file that was saved."""
    import zipfile

    with zipfile.ZipFile(path, "a") as z:
        z.writestr(z.namelist()[0].split("/")[0] + "/extra", b"x" * 64)


def _garble_pickle(path):
    """Rewrite a torch archive with a broken pickle inside and an intact zip structure."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data)


def _flip_a_bit_in_tensor_data(path):
    """Flip one bit inside the tensor bytes of a safetensors file or a torch zip archive, leaving every
    header, pickle and zip record intact (neither loader checks a checksum)."""
    import zipfile

    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        at = 8 + int.from_bytes(data[:8], "little") + 4
    else:
        with zipfile.ZipFile(path) as z:
            info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        head = info.header_offset
        at = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + \
            int.from_bytes(data[head + 28:head + 30], "little") + info.file_size // 2
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated optimizer": ("optimizer.bin", lambda d: _truncate(d / "optimizer.bin"), "truncated"),
    "missing optimizer": ("optimizer.bin", lambda d: (d / "optimizer.bin").unlink(), "missing"),
    "truncated model": ("model.safetensors", lambda d: _truncate(d / "model.safetensors", 0.9), "truncated"),
    "empty model": ("model.safetensors", lambda d: (d / "model.safetensors").write_bytes(b""), "empty"),
    "truncated adapter": ("ip-adapter.bin", lambda d: _truncate(d / "ip-adapter.bin"), "truncated"),
    "truncated scheduler state": ("custom_checkpoint_0.pkl", lambda d: _truncate(d / "custom_checkpoint_0.pkl"),
                                  "truncated"),
    "truncated rng state": ("random_states_0.pkl", lambda d: _truncate(d / "random_states_0.pkl", 0.98),
                            "truncated"),
    "truncated scheduler.bin": ("scheduler.bin", lambda d: (d / "scheduler.bin").write_bytes(
        (d / "custom_checkpoint_0.pkl").read_bytes()[:300]), "truncated"),
    "empty optimizer": ("optimizer.bin", lambda d: (d / "optimizer.bin").write_bytes(b""), "empty"),
    "model truncated inside its header": ("model.safetensors", lambda d: _truncate(d / "model.safetensors", 0.001),
                                          "truncated"),
    "model with trailing bytes": ("model.safetensors", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes() + b"\0" * 8), "trailing bytes"),
    "garbage pickle in an intact archive": ("custom_checkpoint_0.pkl", lambda d: _garble_pickle(
        d / "custom_checkpoint_0.pkl"), "unreadable"),
    "trainer state without a position": ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text(
        json.dumps({"global_step": 2, "epoch": 0, "global_batch": 1, "ema_num_updates": 2})), "['position']"),
    "trainer state that is a list": ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text("[2]"),
                                     "not a JSON object"),
    "garbage trainer state": ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text("{not json"),
                              "not valid JSON"),
    "trainer state of another step": ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text(
        json.dumps({"global_step": 7, "epoch": 0, "position": 7, "global_batch": 1, "ema_num_updates": 7})), "does not match"),
    "truncated EMA": ("ip-adapter-ema.bin", lambda d: _truncate(d / "ip-adapter-ema.bin"), "truncated"),
    "missing EMA": ("ip-adapter-ema.bin", lambda d: (d / "ip-adapter-ema.bin").unlink(), "without --use_ema"),
    "missing scheduler state": ("custom_checkpoint_0.pkl", lambda d: (d / "custom_checkpoint_0.pkl").unlink(),
                                "missing"),
    "missing rng state": ("random_states_0.pkl", lambda d: (d / "random_states_0.pkl").unlink(), "missing"),
    "a flipped bit in the model": ("model.safetensors", lambda d: _flip_a_bit_in_tensor_data(d / "model.safetensors"),
                                   "content differs from the sha256 in manifest.json"),
    "a flipped bit in the optimizer": ("optimizer.bin", lambda d: _flip_a_bit_in_tensor_data(d / "optimizer.bin"),
                                       "content differs from the sha256 in manifest.json"),
    "a flipped bit in the EMA": ("ip-adapter-ema.bin", lambda d: _flip_a_bit_in_tensor_data(
        d / "ip-adapter-ema.bin"), "content differs"),
    "an edited trainer state": ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text(
        (d / "trainer_state.json").read_text().replace('"position": 2', '"position": 3')), "content differs"),
    "an archive that grew": ("random_states_0.pkl", lambda d: _grow_archive(d / "random_states_0.pkl"),
                             "bytes, manifest.json records"),
    "garbage manifest": ("manifest.json", lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_one_clear_error_naming_the_file(run, case):
    name, damage, problem = DAMAGE[case]
    run.train(2)
    path = run.save()
    assert ckpt.validate_checkpoint(path, expect_ema=True) == []
    damage(path)
    problems = ckpt.validate_checkpoint(path, expect_ema=True)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: ") and problem in problems[0], problems
    if name == ckpt.EMA_FILE:  # a run resumed without --use_ema does not read it
        assert ckpt.validate_checkpoint(path, expect_ema=False) == []
    with pytest.raises(CheckpointError) as err:
        ckpt.resolve_resume(run.out, str(path), expect_ema=True)
    assert "\n" not in str(err.value) and name in str(err.value)

    before = run.weights()
    run.train()  # the live state moves on; a failed load must not touch it
    moved = run.weights()
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(run.acc, path, run.ema)
    assert "\n" not in str(err.value) and name in str(err.value) and str(path) in str(err.value)
    after = run.weights()
    assert all(torch.equal(after[k], moved[k]) for k in after) and not all(torch.equal(after[k], before[k])
                                                                           for k in after)


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert ckpt.validate_checkpoint(tmp_path) == [f"{tmp_path}: not a checkpoint folder (none of trainer_state.json, "
                                                  f"ip-adapter.bin, model.safetensors, optimizer.bin)"]
    assert ckpt.validate_checkpoint(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a folder"]
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        ckpt.resolve_resume(tmp_path, str(tmp_path))


def test_num_tokens_differing_from_the_checkpoint(tmp_path):
    path = Run(tmp_path / "out", num_tokens=8).save(1)
    other = Run(tmp_path / "other", num_tokens=4)
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(other.acc, path, other.ema)
    msg = str(err.value)
    assert "\n" not in msg and "model.safetensors" in msg and "--num_tokens" in msg, msg


def test_load_restores_weights_optimizer_scheduler_and_ema(run):
    run.train(3)
    path = run.save()
    saved, ema, lr = run.weights(), {k: v.clone() for k, v in run.ema.shadow.items()}, run.scheduler.get_last_lr()
    opt_steps = [s["step"].item() for s in run.optimizer.state_dict()["state"].values()]
    run.train(2)
    state = ckpt.load_checkpoint(run.acc, path, run.ema)
    assert state["global_step"] == 3 and run.ema.num_updates == 3
    assert all(torch.equal(run.weights()[k], saved[k]) for k in saved)
    assert all(torch.equal(run.ema.shadow[k], ema[k]) for k in ema)
    assert run.scheduler.get_last_lr() == lr and run.scheduler.last_epoch == 3
    assert [s["step"].item() for s in run.optimizer.state_dict()["state"].values()] == opt_steps == [3.0] * len(
        opt_steps)


def test_latest_falls_back_to_the_newest_intact_checkpoint(run):
    for _ in range(3):
        run.train()
        run.save()
    _truncate(run.out / "checkpoint-3" / "optimizer.bin")
    notes = []
    assert ckpt.resolve_resume(run.out, "latest", expect_ema=True, log=notes.append) == run.out / "checkpoint-2"
    assert len(notes) == 1 and "checkpoint-3" in notes[0] and "optimizer.bin: truncated" in notes[0], notes
    assert "using checkpoint-2" in notes[0]
    (run.out / "checkpoint-2" / "model.safetensors").unlink()
    (run.out / "checkpoint-1" / "trainer_state.json").write_text("[]")
    with pytest.raises(CheckpointError) as err:
        ckpt.resolve_resume(run.out, "latest", expect_ema=True, log=notes.append)
    msg = str(err.value)
    assert "no usable checkpoint" in msg and "checkpoint-3: optimizer.bin" in msg
    assert "checkpoint-2: model.safetensors: missing" in msg and "checkpoint-1: trainer_state.json" in msg


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_latest_falls_back_past_a_flipped_bit_or_a_missing_state_file(run, name):
    for _ in range(2):
        run.train()
        run.save()
    file = run.out / "checkpoint-2" / name
    if name.endswith(".pkl"):
        file.unlink()  # accelerate's load_state would fail on it, after validation
    else:
        _flip_a_bit_in_tensor_data(file)
        from safetensors.torch import load_file

        load_file(file) if name.endswith(".safetensors") else torch.load(file, weights_only=False)  # loaders accept it
    notes = []
    assert ckpt.resolve_resume(run.out, "latest", expect_ema=True, log=notes.append) == run.out / "checkpoint-1"
    assert len(notes) == 1 and f"skipping damaged {run.out / 'checkpoint-2'} ({name}: " in notes[0], notes


def test_latest_without_checkpoints_starts_fresh_with_a_note(tmp_path):
    notes = []
    assert ckpt.resolve_resume(tmp_path, "latest", log=notes.append) is None
    assert notes == [f"--resume_from_checkpoint latest: no checkpoint in {tmp_path}, starting fresh"]
    assert ckpt.resolve_resume(tmp_path, None, log=notes.append) is None and len(notes) == 1


def test_only_complete_checkpoints_are_listed(run):
    run.save(1)
    run.save(2)
    (run.out / "checkpoint-2" / ckpt.ADAPTER_FILE).unlink()
    (run.out / "checkpoint-3").mkdir()
    (run.out / "checkpoint-3" / ckpt.ADAPTER_FILE).write_bytes(b"x")
    (run.out / "checkpoint-x").mkdir()
    assert steps(run.out) == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(run.out)] == [1]
    assert ckpt.latest_checkpoint(run.out) == run.out / "checkpoint-1"
    assert ckpt.latest_checkpoint(run.out / "nothing") is None


# ---------------------------------------------------------------------------- flags on resume
BASE = {"model_type": "flux", "num_tokens": 8, "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 0,
        "gradient_accumulation_steps": 2, "max_train_steps": 100, "mixed_precision": "no", "use_ema": True,
        "train_batch_size": 2, "masked_loss_weight": 1.0, "output_dir": "a", "checkpointing_steps": 10,
        "adam_epsilon": 1e-8, "seed": 0, "use_8bit_adam": False}


def flags(saved_step=50, saved=BASE, **changes):
    return ckpt.check_resume_flags(dict(saved), dict(BASE, **changes), saved_step)


def test_unchanged_flags_pass_silently():
    assert flags() == ([], [])
    assert flags(output_dir="b", checkpointing_steps=5, report_to="none") == ([], [])  # bookkeeping only


PAIRS = {"model_type": ("flux", "sd3"), "lr_scheduler": ("cosine", "linear"), "use_8bit_adam": (False, True),
         "use_rl": (False, True), "rl_method": ("grpo", "nft")}


@pytest.mark.parametrize("key", sorted(ckpt.MUST_MATCH))
def test_flags_the_restored_state_would_ignore_are_errors(key):
    old, new = PAIRS.get(key, (BASE.get(key, 0.9), 3))
    saved = dict(BASE, **{key: old})
    notes, errors = ckpt.check_resume_flags(saved, dict(saved, **{key: new}), 50)
    assert notes == [] and len(errors) == 1
    assert errors[0].startswith(f"--{key} {new} differs from the checkpoint's {old}: {ckpt.MUST_MATCH[key]}. ")
    assert f"Resume with --{key} {old}" in errors[0] and "--initial_ip_adapter_path" in errors[0]


def test_the_flags_a_restored_state_contradicts_are_all_in_the_table():
    """Independent of the table: each of these, changed on resume, is an error."""
    for key, value in (("gradient_accumulation_steps", 4), ("learning_rate", 1e-3), ("lr_warmup_steps", 5),
                       ("num_tokens", 16), ("adam_epsilon", 1e-6), ("lr_scheduler", "linear")):
        notes, errors = flags(**{key: value})
        assert len(errors) == 1 and errors[0].startswith(f"--{key} {value} differs"), (key, errors)


def test_new_learning_rate_with_a_new_schedule_names_both():
    notes, errors = flags(learning_rate=1e-3, lr_scheduler="constant")
    assert [e.split(" ")[0] for e in errors] == ["--learning_rate", "--lr_scheduler"] and notes == []


def test_max_train_steps_against_the_checkpoint_step():
    notes, errors = flags(max_train_steps=40)
    assert errors == ["--max_train_steps 40 is below the checkpoint's step 50: a run cannot go back; raise "
                      "--max_train_steps or resume from an earlier checkpoint"]
    notes, errors = flags(max_train_steps=50)
    assert errors == [] and "--max_train_steps 50 equals the checkpoint's step: nothing left to train" in notes
    notes, errors = flags(max_train_steps=200)
    assert errors == [] and notes == ["--max_train_steps 100 -> 200: the cosine LR schedule now spans 200 steps, "
                                      "so the learning rate jumps here"]
    constant = dict(BASE, lr_scheduler="constant")
    assert ckpt.check_resume_flags(constant, dict(constant, max_train_steps=200), 50) == (
        ["--max_train_steps 100 -> 200"], [])
    assert flags(saved_step=None, max_train_steps=1)[1] == []


def test_other_changes_are_notes():
    notes, errors = flags(masked_loss_weight=2.0, use_ema=False, train_batch_size=1, mixed_precision="bf16",
                          new_flag=1)
    assert errors == []
    assert sorted(notes) == ["--masked_loss_weight changed from 1.0 to 2.0; the new value applies from here on",
                             "--mixed_precision changed from no to bf16; the new value applies from here on",
                             "--train_batch_size 2 -> 1 (the global batch must stay the same)",
                             "--use_ema is off: the checkpoint's EMA weights are not carried on"]


def test_fp16_needs_a_loss_scaler_state():
    notes, errors = flags(mixed_precision="fp16")
    assert errors == ["--mixed_precision fp16 differs from the checkpoint's no: it holds no fp16 loss-scaler state. "
                      "Resume with --mixed_precision no"]


def test_a_checkpoint_without_saved_flags():
    assert ckpt.check_resume_flags(None, BASE, 50) == (["the checkpoint holds no saved flags, so they cannot be "
                                                        "compared"], [])
    assert ckpt.check_resume_flags(None, dict(BASE, max_train_steps=10), 50)[1][0].startswith("--max_train_steps 10")


def test_load_checkpoint_checks_flags_before_loading_anything(run):
    run.train(2)
    path = run.save(config=BASE)
    run.train()
    moved = run.weights()
    with pytest.raises(CheckpointError, match=r"--learning_rate 0.001 differs") as err:
        ckpt.load_checkpoint(run.acc, path, run.ema, config=dict(BASE, learning_rate=1e-3))
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, moved[k]) for k, v in run.weights().items())
    notes = []
    state = ckpt.load_checkpoint(run.acc, path, run.ema, config=dict(BASE, seed=1), log=notes.append)
    assert state["global_step"] == 2 and state["config"] == BASE
    assert notes == ["resuming from checkpoint-2: --seed changed from 0 to 1; the new value applies from here on"]


def test_model_weights_are_checked_against_the_adapter_being_resumed(run):
    path = run.save(1)
    shapes = {k: tuple(v.shape) for k, v in run.acc.unwrap_model(run.adapter).state_dict().items()}
    assert ckpt.validate_checkpoint(path, model_shapes=shapes) == []
    more = dict(shapes, **{"ip_adapter.9.to_k_ip.weight": (32, 32)})
    assert ckpt.validate_checkpoint(path, model_shapes=more) == [
        "model.safetensors: lacks 1 adapter tensor(s) ['ip_adapter.9.to_k_ip.weight']"]
    fewer = {k: v for k, v in shapes.items() if k != "image_proj.mlp.norm.bias"}
    assert ckpt.validate_checkpoint(path, model_shapes=fewer) == [
        "model.safetensors: has 1 tensor(s) this adapter does not ['image_proj.mlp.norm.bias']"]
