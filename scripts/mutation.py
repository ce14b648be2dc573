"""Mutation testing: does each test suite notice when the code it guards is broken?

Each mutant is one exact edit (file, original snippet, replacement) to a copy of the working tree
under a temporary folder; the live tree is never touched. A mutant is *killed* when its tests fail,
*survives* when they pass. ``equivalent`` marks a mutant that cannot change behaviour (with the
reason); it is run and listed but left out of the score.

    python scripts/mutation.py                      # every module (use scripts/mutation.sh: nice'd)
    python scripts/mutation.py -m checkpointing -m ema
    python scripts/mutation.py --list               # the mutants, nothing run
    python scripts/mutation.py -k flow_matching#3   # one mutant by id

Adding a mutant is one line in ``MUTANTS``: ``M(module, path, original, replacement)``; its tests
are the module's entry in ``TESTS`` unless given (``tests=(...)``, pytest arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"

TESTS = {
    "flow_matching": ("train/tests/test_flow_matching.py", "train/tests/test_learning.py"),
    "checkpointing": ("train/tests/test_checkpointing.py",),
    "ema": ("train/tests/test_ema.py", "train/tests/test_ema_copy.py"),
    "data_order": ("train/tests/test_data_order.py",),
    "reward_client": ("train/tests/test_reward_client_pinned.py", "train/tests/test_reward_client.py"),
}


@dataclass
class Mutant:
    module: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...] = ()
    equivalent: str | None = None
    id: str = field(default="", compare=False)


def M(module, path, original, replacement, tests=(), equivalent=None) -> Mutant:
    return Mutant(module, path, original, replacement, tuple(tests) or TESTS[module], equivalent)


FM, SUP = "train/flow_matching.py", "train/supervised.py"
CK, EMA, PC = "train/checkpointing.py", "train/rl_ip/ema.py", "train/rl_ip/param_copy.py"
TR, RW = "train/trainer.py", "train/rl_ip/reward.py"
LEARN = ("train/tests/test_learning.py::test_one_training_step_computes_the_flow_matching_loss_by_hand",
         "train/tests/test_learning.py::test_training_lowers_the_sampling_error_on_held_out_noise")

MUTANTS = [
    # ------------------------------------------------------------------ flow matching
    M("flow_matching", FM, "u = torch.sigmoid(normal)", "u = torch.sigmoid(-normal)"),
    M("flow_matching", FM, "idx = (u * len(train_sigmas)).long()", "idx = (u * (len(train_sigmas) - 1)).long()"),
    M("flow_matching", FM, ".clamp_(0, len(train_sigmas) - 1)", ".clamp_(0, len(train_sigmas))"),
    M("flow_matching", FM, "return train_sigmas[idx]", "return u"),
    M("flow_matching", FM, "return (1 - s) * x0 + s * noise", "return (1 - s) * noise + s * x0"),
    M("flow_matching", FM, "return (1 - s) * x0 + s * noise", "return x0 + s * noise"),
    M("flow_matching", FM, "s = sigma.view(-1, *([1] * (x0.ndim - 1)))", "s = sigma.view(*([1] * (x0.ndim - 1)), -1)"),
    M("flow_matching", FM, "    return noise - x0", "    return x0 - noise"),
    M("flow_matching", FM, "return region * (1 + (masked_weight - 1) * mask)", "return region * (1 + masked_weight * mask)"),
    M("flow_matching", FM, "return region * (1 + (masked_weight - 1) * mask)", "return 1 + (masked_weight - 1) * mask"),
    M("flow_matching", FM, "(pred.float() - target.float()).square().mean(-1)", "(pred - target).square().mean(-1)"),
    M("flow_matching", FM, "(pred.float() - target.float()).square().mean(-1)",
      "(pred.float() - target.float()).abs().mean(-1)"),
    M("flow_matching", FM, ".square().mean(-1)", ".square().sum(-1)"),
    M("flow_matching", FM, "/ weights.sum(-1).clamp_min(1e-8)", "/ weights.shape[-1]"),
    M("flow_matching", FM, "return per_sample.mean()", "return per_sample.sum()"),
    M("flow_matching", FM, "avg_pool2d(mask.float(), patch)", "max_pool2d(mask.float(), patch)"),
    M("flow_matching", FM, "return pooled.flatten(1)", "return pooled.transpose(-1, -2).flatten(1)"),
    M("flow_matching", SUP, "target = noise - x0", "target = x0 - noise", LEARN),
    M("flow_matching", SUP, "x_t = interpolate(x0, noise, sigma)", "x_t = interpolate(noise, x0, sigma)", LEARN),
    M("flow_matching", SUP, "pixel_mask_to_tokens(region),\n                            cfg.masked_loss_weight)",
      "pixel_mask_to_tokens(region),\n                            1.0)", LEARN),
    M("flow_matching", SUP, "region[i, :, top:bottom, left:right] = 1", "region[i] = 1", LEARN),
    M("flow_matching", SUP, "normal = torch.stack([torch.randn((), generator=g) for g in draws])",
      "normal = torch.zeros(len(draws))", LEARN),

    # ------------------------------------------------------------------ checkpointing
    M("checkpointing", CK, "return sorted(found, key=lambda sp: sp[0])", "return sorted(found, key=lambda sp: sp[1].name)"),
    M("checkpointing", CK, "if (p / STATE_FILE).is_file() and (p / ADAPTER_FILE).is_file()]", "if (p / STATE_FILE).is_file()]"),
    M("checkpointing", CK, "return found[-1][1] if found else None", "return found[0][1] if found else None"),
    M("checkpointing", CK, "            if final.exists():\n                shutil.rmtree(aside",
      "            if not final.exists():\n                shutil.rmtree(aside"),
    M("checkpointing", CK, 'stale = list(root.glob(".checkpoint-*.partial"))', "stale = []"),
    M("checkpointing", CK, "if overwrite and resume:", "if False:"),
    M("checkpointing", CK, "if not existing or resume:", "if not existing:"),
    M("checkpointing", CK, "    if not overwrite:\n        raise CheckpointError", "    if False:\n        raise CheckpointError"),
    M("checkpointing", CK, "[root / name for name in RUN_LOGS if (root / name).exists()]", "[]"),
    M("checkpointing", CK, "    if remove:\n        for p in doomed:", "    if True:\n        for p in doomed:"),
    M("checkpointing", CK, '            state["config"] = config', "            pass"),
    M("checkpointing", CK, "            save_adapter_file(split_adapter_state(ema.shadow), tmp / EMA_FILE)", "            pass"),
    M("checkpointing", CK, "    os.replace(final, aside)\n    os.replace(tmp, final)\n",
      "    shutil.rmtree(final)\n    os.replace(tmp, final)\n"),
    M("checkpointing", CK, "if s <= step]", "]"),
    M("checkpointing", CK, "doomed = older[:-total_limit] if", "doomed = older[:-total_limit - 1] if"),
    M("checkpointing", CK, "doomed = older[:-total_limit] if", "doomed = older[total_limit:] if"),
    M("checkpointing", CK, "    if size == 0:\n        return \"empty (0 bytes)\"", "    if False:\n        pass"),
    M("checkpointing", CK, "    if size <= _FULL_LOAD_BYTES:", "    if False:"),
    M("checkpointing", CK, "        if 8 + n > size:", "        if False:"),
    M("checkpointing", CK, "    if 8 + n + end != size:", "    if 8 + n + end > size:"),
    M("checkpointing", CK, "    if diff:", "    if False:"),
    M("checkpointing", CK, "    if missing:\n        out.append", "    if False:\n        out.append"),
    M("checkpointing", CK, "    if bad:\n        return f\"missing or non-integer", "    if False:\n        return f\"missing or non-integer"),
    M("checkpointing", CK, "    if not isinstance(state, dict):\n        return", "    if False:\n        return"),
    M("checkpointing", CK, "    if m and int(m.group(1)) != state[\"global_step\"]:", "    if False:"),
    M("checkpointing", CK, 'required = [STATE_FILE, ADAPTER_FILE] + ([EMA_FILE] if expect_ema else [])',
      "required = [STATE_FILE, ADAPTER_FILE]"),
    M("checkpointing", CK, "required += [OPTIMIZER_FILE] + ", "required += "),
    M("checkpointing", CK, "    if not names & {STATE_FILE, ADAPTER_FILE, MODEL_FILE, OPTIMIZER_FILE}:", "    if False:"),
    M("checkpointing", CK, "    for _, path in reversed(found):", "    for _, path in found:"),
    M("checkpointing", CK, "                log(f\"--resume_from_checkpoint latest: skipping", "                (f\"--resume_from_checkpoint latest: skipping"),
    M("checkpointing", CK, "        problems = validate_checkpoint(spec, expect_ema, model_shapes)\n", "        problems = []\n"),
    M("checkpointing", CK, "    problems = validate_checkpoint(path, expect_ema=ema is not None, model_shapes=shapes)",
      "    problems = []"),
    M("checkpointing", CK, "validate_checkpoint(path, expect_ema=ema is not None, model_shapes=shapes)",
      "validate_checkpoint(path, expect_ema=False, model_shapes=shapes)"),
    M("checkpointing", CK, "        shapes = {k: tuple(v.shape) for k, v in sd.items()}", "        shapes = None"),
    M("checkpointing", CK, "        if errors:\n            raise CheckpointError", "        if False:\n            raise CheckpointError"),
    M("checkpointing", CK, "        if total < saved_step:", "        if total <= saved_step:"),
    M("checkpointing", CK, "        elif total == saved_step:", "        elif False:"),
    M("checkpointing", CK, "if k in saved_config and saved_config[k] != v and k not in FREE}",
      "if k in saved_config and saved_config[k] != v}"),
    M("checkpointing", CK, "        if key in MUST_MATCH:", "        if False:"),
    M("checkpointing", CK, '        elif key == "mixed_precision" and new == "fp16":', "        elif False:"),
    M("checkpointing", CK, '    "learning_rate": "the restored', '    "learning_rate_": "the restored'),
    M("checkpointing", CK, '    "gradient_accumulation_steps": "every', '    "gradient_accumulation_steps_": "every'),
    M("checkpointing", CK, '"" if sched in _CONSTANT_LR else', '"" if True else'),

    # ------------------------------------------------------------------ EMA and its parameter copy
    M("ema", EMA, "return min((1 + update) / (10 + update), max_decay)", "return min((1 + update) / (10 + update), 1.0)"),
    M("ema", EMA, "return min((1 + update) / (10 + update), max_decay)", "return max_decay"),
    M("ema", EMA, "if optimizer_step % self.update_interval:", "if False:"),
    M("ema", EMA, "d = ema_decay_at(self.num_updates, self.decay)", "d = ema_decay_at(optimizer_step, self.decay)"),
    M("ema", EMA, "self.copy.lerp_from(self.params, d)", "self.copy.lerp_from(self.params, 1 - d)"),
    M("ema", EMA, "        self.num_updates += 1\n", "        pass\n"),
    M("ema", EMA, "self.params = {n: p for n, p in named_parameters if p.requires_grad}",
      "self.params = {n: p for n, p in named_parameters}"),
    M("ema", EMA, "                    p.copy_(backup[n])", "                    pass"),
    M("ema", EMA, "            p.copy_(self.shadow[n].to(p.device, p.dtype))", "            pass"),
    M("ema", EMA, "        if missing:\n            raise ValueError", "        if False:\n            raise ValueError"),
    M("ema", EMA, "        self.num_updates = int(state[\"num_updates\"])", "        pass"),
    M("ema", EMA, "            self.shadow[n].copy_(t)", "            pass"),
    M("ema", PC, "            if keep == 0.0:\n                t.copy_(value)", "            if False:\n                t.copy_(value)"),
    M("ema", PC, "                t.mul_(keep).add_(value, alpha=1 - keep)", "                t.mul_(keep).add_(value, alpha=keep)"),
    M("ema", PC, "            elif t.dtype == torch.float32:", "            elif True:"),
    M("ema", PC, "t.copy_(t.float().mul_(keep).add_(value, alpha=1 - keep))", "t.copy_(value)"),
    M("ema", PC, "        if src.keys() != self.tensors.keys():\n            raise", "        if False:\n            raise"),
    M("ema", PC, "source = getattr(source, \"module\", source)", "pass"),
    M("ema", PC, "self.tensors = {n: t.detach().to(self.device or t.device, dtype, copy=True)",
      "self.tensors = {n: t.detach().to(self.device or t.device, dtype)"),
    M("ema", PC, "            return self.tensors\n", "            return dict(self.tensors)\n",
      equivalent="returns a new dict holding the same tensors: callers only read it"),
    M("ema", PC, "            p.data.copy_(self.tensors[n].to(p.device, p.dtype))", "            pass"),
    M("ema", PC, "return sum(t.numel() * t.element_size() for t in self.tensors.values())",
      "return sum(t.numel() for t in self.tensors.values())"),
    M("ema", PC, "        if state.keys() != self.tensors.keys():\n            raise", "        if False:\n            raise"),
    M("ema", PC, "            t.copy_(state[n].to(t.device, t.dtype))", "            pass"),

    # ------------------------------------------------------------------ data order (a copy of trainer.py)
    M("data_order", TR, "(seed * 1_000_003 + epoch) * 1_000_000_007 + position", "(seed * 1_000_003) * 1_000_000_007 + position"),
    M("data_order", TR, "(seed * 1_000_003 + epoch) * 1_000_000_007 + position", "(seed * 1_000_003 + epoch) * 1_000_000_007"),
    M("data_order", TR, "(seed * 1_000_003 + epoch) * 1_000_000_007 + position", "epoch * 1_000_000_007 + position"),
    M("data_order", TR, "manual_seed(self.cfg.seed * 7919 + epoch)", "manual_seed(self.cfg.seed * 7919)"),
    M("data_order", TR, "manual_seed(self.cfg.seed * 7919 + epoch)", "manual_seed(epoch)"),
    M("data_order", TR, "return torch.randperm(len(self.dataset), generator=g).tolist()",
      "return list(range(len(self.dataset)))"),
    M("data_order", TR, "start = m * self.global_batch + rank * b", "start = m * self.global_batch"),
    M("data_order", TR, "start = m * self.global_batch + rank * b", "start = m * b + rank * b"),
    M("data_order", TR, "for m in range(position, self.batches_per_epoch):", "for m in range(0, self.batches_per_epoch):"),
    M("data_order", TR, "epoch, position = epoch + 1, 0", "epoch, position = epoch + 1, position"),
    M("data_order", TR, "yield [(order[p], epoch, p) for p in range(start, start + b)]",
      "yield [(order[p], 0, p) for p in range(start, start + b)]"),
    M("data_order", TR, "yield [(order[p], epoch, p) for p in range(start, start + b)]",
      "yield [(order[p], epoch, p - start) for p in range(start, start + b)]"),
    M("data_order", TR, "            if self.position >= self.batches_per_epoch:", "            if self.position > self.batches_per_epoch:"),
    M("data_order", TR, "            self.position += 1\n", "            self.position += 2\n"),
    M("data_order", TR, "batch_sampler=self._rank_batches(self.epoch, self.position)", "batch_sampler=self._rank_batches(self.epoch, 0)"),

    # ------------------------------------------------------------------ reward client
    M("reward_client", RW, "self.urls = [urls[(rank + i) % n].rstrip(\"/\") for i in range(n)]",
      "self.urls = [urls[i % n].rstrip(\"/\") for i in range(n)]"),
    M("reward_client", RW, "            for attempt in range(self.retries + 1):", "            for attempt in range(self.retries):"),
    M("reward_client", RW, "            for attempt in range(self.retries + 1):", "            for attempt in range(1):"),
    M("reward_client", RW, "        for url in self.urls:\n            for attempt", "        for url in self.urls[:1]:\n            for attempt"),
    M("reward_client", RW, "if resp.status_code >= 500 or resp.status_code == 429:", "if resp.status_code >= 500:"),
    M("reward_client", RW, "if resp.status_code >= 500 or resp.status_code == 429:", "if resp.status_code > 500 or resp.status_code == 429:"),
    M("reward_client", RW, "        if resp.status_code != 200:\n            raise RewardError", "        if False:\n            raise RewardError"),
    M("reward_client", RW, "        if len(raw) != len(chunk) or set(by_id) != {it.id for it in chunk}:", "        if False:"),
    M("reward_client", RW, "        if res.error:", "        if False:"),
    M("reward_client", RW, "        if missing:\n            return RewardResult(item_id", "        if False:\n            return RewardResult(item_id"),
    M("reward_client", RW, "except ValidationError as exc:\n            return RewardResult(item_id, None, {}, {}, f\"invalid",
      "except ValidationError as exc:\n            raise _Retryable(f\"invalid"),
    M("reward_client", RW, "RewardResult(item_id, sum(w * res.scores[n] for n, w in self.weights.items() if w != 0)",
      "RewardResult(item_id, sum(res.scores[n] for n, w in self.weights.items() if w != 0)"),
    M("reward_client", RW, "return [self._result(it.id, by_id[it.id]) for it in chunk]",
      "return [self._result(r[\"id\"], r) for r in raw]"),
    M("reward_client", RW, "chunks = [items[i:i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]",
      "chunks = [items[i:i + self.chunk_size] for i in range(0, len(items) - 1, self.chunk_size)]"),
    M("reward_client", RW, "        if not self._healthy:\n            self.wait_healthy()", "        pass"),
    M("reward_client", RW, "                if resp.status_code == 401:\n                    raise RewardError",
      "                if False:\n                    raise RewardError"),
    M("reward_client", RW, "                if missing:\n                    raise RewardError(f\"reward server {url} does not run",
      "                if False:\n                    raise RewardError(f\"reward server {url} does not run"),
    M("reward_client", RW, "            if time.monotonic() >= deadline:", "            if False:"),
    M("reward_client", RW, "    if len(set(ids)) != len(ids):", "    if False:"),
    M("reward_client", RW, "missing = [n for n, w in self.weights.items() if w != 0 and n not in scorers]", "missing = []"),
    M("reward_client", RW, "    if n_bad and (n_bad > max_failed_fraction * n or n_bad == n):",
      "    if n_bad and n_bad > max_failed_fraction * n:"),
    M("reward_client", RW, "    if n_bad and (n_bad > max_failed_fraction * n or n_bad == n):",
      "    if n_bad and (n_bad >= max_failed_fraction * n or n_bad == n):"),
    M("reward_client", RW, "r.reward if ok else float(\"nan\")", "r.reward if ok else 0.0"),
    M("reward_client", RW, "valid = [r.error is None and r.reward is not None and math.isfinite(r.reward) for r in results]",
      "valid = [r.error is None and r.reward is not None for r in results]"),
    M("reward_client", RW, "    if not 0.0 <= max_failed_fraction <= 1.0:", "    if False:"),
    M("reward_client", RW, "sum((v - mean) ** 2 for v in valid) / len(valid)", "sum((v - mean) ** 2 for v in valid) / (len(valid) - 1 or 1)"),
    M("reward_client", RW, "valid = [r.reward for r in results if r.ok and math.isfinite(r.reward)]",
      "valid = [r.reward for r in results if r.ok]"),
    M("reward_client", RW, "\"reward/min\": min(valid), \"reward/max\": max(valid)", "\"reward/min\": max(valid), \"reward/max\": max(valid)"),
    M("reward_client", RW, "self._crop = all(n in CROP_ONLY_SCORERS for n in self.weights)", "self._crop = False"),
    M("reward_client", RW, "if any(f in SCORER_INPUTS[name] for name in self.weights)]",
      "if all(f in SCORER_INPUTS[name] for name in self.weights)]"),
    M("reward_client", RW, "        return {\"items\": items, \"weights\": self.weights}", "        return {\"items\": items}"),
    M("reward_client", RW, "            raise _Retryable(f\"timed out after", "            raise RewardError(f\"timed out after"),
    M("reward_client", RW, "token = token if token is not None else os.environ.get(\"REWARD_SERVER_TOKEN\")", "token = token"),
]
for _i, _m in enumerate(MUTANTS):
    _m.id = f"{_m.module}#{sum(1 for x in MUTANTS[:_i] if x.module == _m.module) + 1}"


# ---------------------------------------------------------------------------- running
def copy_tree(dest: Path) -> Path:
    """The working tree as it is now (tracked and untracked, not ignored files), without .git or caches."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_tests(tree: Path, tests, timeout: float) -> tuple[str, float]:
    """``"pass"``, ``"fail"`` or ``"timeout"``, and seconds taken."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode of a mutant can survive its restore
    cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    # Own process group: a hung run is killed with every server or worker process its tests started.
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - t0
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal error, usage error, no tests collected
        return f"error (pytest exit {proc.returncode}): {out[-600:]}", time.monotonic() - t0
    return ("pass" if proc.returncode == 0 else "fail"), time.monotonic() - t0


def check(tree: Path, m: Mutant) -> str:
    """The file's text; raises unless the original snippet occurs exactly once."""
    text = (tree / m.path).read_text()
    count = text.count(m.original)
    if count != 1:
        raise ValueError(f"{m.id}: the original snippet occurs {count} times in {m.path}, not once: {m.original!r}")
    return text


def apply(tree: Path, m: Mutant) -> str:
    """Apply ``m`` inside ``tree``; returns the original file text for the restore."""
    text = check(tree, m)
    (tree / m.path).write_text(text.replace(m.original, m.replacement))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--module", action="append", choices=sorted(TESTS), help="only these modules")
    parser.add_argument("-k", "--id", action="append", help="only these mutant ids (e.g. ema#3)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for a baseline test run; a mutant "
                        "gets 3x its baseline time plus a minute (a mutant that hangs counts as killed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="where to put the copy (default: a new temporary folder)")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTANTS if (not args.module or m.module in args.module) and (not args.id or m.id in args.id)]
    if args.list:
        for m in chosen:
            check(REPO, m)  # read-only
            print(f"{m.id:18} {m.path}: {m.original!r} -> {m.replacement!r}"
                  + (f"  [equivalent: {m.equivalent}]" if m.equivalent else ""))
        return 0
    work = Path(tempfile.mkdtemp(prefix="mutation-", dir=args.workdir))
    tree = copy_tree(work / "repo")
    for m in chosen:  # every snippet must match exactly once before anything runs
        check(tree, m)
    print(f"copy of the working tree: {tree}", flush=True)

    baseline, limit = {}, {}
    for tests in dict.fromkeys(m.tests for m in chosen):
        baseline[tests], secs = run_tests(tree, tests, args.timeout)
        limit[tests] = 3 * secs + 60
        print(f"baseline {' '.join(tests)}: {baseline[tests]} ({secs:.0f}s)", flush=True)
    results = []
    for m in chosen:
        if baseline[m.tests] != "pass":
            outcome, secs = "skipped (tests fail without the mutant)", 0.0
        else:
            original = apply(tree, m)
            try:
                outcome, secs = run_tests(tree, m.tests, limit[m.tests])
            finally:
                (tree / m.path).write_text(original)
            outcome = {"fail": "killed", "timeout": "killed (timeout)", "pass": "SURVIVED"}.get(outcome, outcome)
        if outcome == "SURVIVED" and m.equivalent:
            outcome = "equivalent"
        results.append({"id": m.id, "module": m.module, "path": m.path, "original": m.original,
                        "replacement": m.replacement, "outcome": outcome, "seconds": round(secs, 1),
                        "equivalent": m.equivalent})
        print(f"{m.id:18} {outcome:10} {secs:6.0f}s  {m.original.strip()[:60]!r} -> {m.replacement.strip()[:60]!r}",
              flush=True)

    print("\nmodule          killed / scored   score   (equivalent, other)")
    for module in dict.fromkeys(r["module"] for r in results):
        rs = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"].startswith("killed") for r in rs)
        scored = sum(r["outcome"].startswith("killed") or r["outcome"] == "SURVIVED" for r in rs)
        eq = sum(r["outcome"] == "equivalent" for r in rs)
        score = f"{100 * killed / scored:5.1f}%" if scored else "  n/a"
        print(f"{module:15} {killed:6} / {scored:<6}   {score}   ({eq}, {len(rs) - scored - eq})")
    for r in results:
        if r["outcome"] in ("SURVIVED", "equivalent") or r["outcome"].startswith(("error", "skipped")):
            print(f"  {r['id']}: {r['outcome']}: {r['original'].strip()!r} -> {r['replacement'].strip()!r}"
                  + (f" ({r['equivalent']})" if r["equivalent"] else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["outcome"] != "SURVIVED" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
