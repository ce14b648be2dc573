"""The demo, the example scripts and the docs, checked against the code they describe.

* The guide's flag table and ``python -m train.train --help`` list the same flags with the same defaults.
* Paths and ``python -m`` modules the README and the guide name exist; the TensorBoard tags the guide
  explains are exactly the ones a run writes (read back from the reduced demo's event files).
* Example scripts parse (``bash -n``); with ``DRY_RUN=1`` the commands they print are accepted by
  training's parser and start-up validation, fit the accelerate config's process count, and name
  the missing environment variable when one is unset.
* ``examples/serve_reward.sh`` starts one real server per "GPU" and stops them all on Ctrl-C.
* ``scripts/demo.sh`` interrupted leaves no process behind; the reduced demo (``DEMO_FAST=1``) runs
  end to end and reports a held-out reward for every phase.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from train.config import build_parser, parse_args, validate

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "RL_TRAINING_GUIDE.md"
README = REPO / "README.md"
EXAMPLES = REPO / "examples"
FLAG_ROW = re.compile(r"^\|\s*`--([a-z0-9_]+)`\s*\|\s*`([^`]*)`")
TAG_ROW = re.compile(r"^\|\s*`((?:train|reward|adv|eval|eval_ema|timing|ema|memory|perf|rl|nft|images)/[a-z0-9_{}]+)`")
GPU_ONLY = "--use_8bit_adam needs a CUDA GPU"


# ---------------------------------------------------------------------------------------------- the guide's flags
def guide_table(pattern: re.Pattern) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        m = pattern.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} appears twice in the guide's table"
            rows[m.group(1)] = m.group(2) if m.lastindex > 1 else ""
    return rows


def help_defaults() -> dict[str, object]:
    parser = build_parser()
    text = parser.format_help()
    flags = {a.dest: a.default for a in parser._actions if a.option_strings and a.dest != "help"}
    for name in flags:
        assert f"--{name}" in text
    return flags


def same_default(documented: str, actual) -> bool:
    """The guide writes defaults as Python would print them: None, False, 512, 0.0001 or 1e-4, 'grpo' bare."""
    if actual is None or isinstance(actual, bool):
        return documented == str(actual)
    if isinstance(actual, int):
        return documented.lstrip("-").isdigit() and int(documented) == actual
    if isinstance(actual, float):
        try:
            return float(documented) == actual
        except ValueError:
            return False
    return documented == actual


def test_every_flag_in_the_guide_exists_in_help_with_its_documented_default():
    documented, actual = guide_table(FLAG_ROW), help_defaults()
    assert len(documented) > 50, "the guide's flag table was not found"
    unknown = sorted(set(documented) - set(actual))
    assert not unknown, f"the guide documents flags --help does not have: {unknown}"
    wrong = {f"--{k}": (v, actual[k]) for k, v in documented.items() if not same_default(v, actual[k])}
    assert not wrong, f"documented vs actual defaults differ: {wrong}"


def test_every_flag_in_help_is_in_the_guide():
    missing = sorted(f"--{k}" for k in set(help_defaults()) - set(guide_table(FLAG_ROW)))
    assert not missing, f"flags of python -m train.train --help missing from RL_TRAINING_GUIDE.md: {missing}"


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]+)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


@pytest.mark.parametrize("doc", [README, GUIDE], ids=lambda p: p.name)
def test_paths_and_modules_the_docs_name_exist(doc):
    text = doc.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w./-])((?:examples|scripts|train|benchmarks)/[\w./{},-]*\.(?:sh|py|yaml|md))", text))
    assert paths, f"no repository paths found in {doc.name}"
    missing = sorted(p for raw in paths for p in _expand(raw) if not (REPO / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    modules = set(re.findall(r"python -m (train(?:\.\w+)+)", text))
    absent = sorted(m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).is_file())
    assert not absent, f"{doc.name} runs modules that do not exist: {absent}"


# ---------------------------------------------------------------------------------------------- example scripts
MY_SCRIPTS = sorted(EXAMPLES.glob("*.sh")) + [REPO / "scripts" / "demo.sh"]


@pytest.mark.parametrize("script", MY_SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def example_env(tiny_models, tmp_path_factory):
    """Environment for the example scripts: tiny model folders, a synthetic dataset and held-out set."""
    from train.data.synthesize import synthesize

    root = tmp_path_factory.mktemp("examples")
    adapter = root / "calligrapher.bin"
    adapter.write_bytes(b"weights")  # validation only checks that the file exists
    return {"FLUX": str(tiny_models["flux"]), "SIGLIP": str(tiny_models["siglip"]),
            "DATA": str(synthesize(root / "data", num=2, resolution=64)),
            "EVAL_DATA": str(synthesize(root / "heldout", num=1, resolution=64, seed=3)),
            "OUT": str(root / "out"), "REWARD_URLS": "http://127.0.0.1:8000,http://127.0.0.1:8001",
            "ROOT": str(root), "ADAPTER": str(adapter)}


SCRIPT_VARIABLES = ("FLUX", "SIGLIP", "DATA", "OUT", "EVAL_DATA", "REWARD_URLS", "REWARD_WEIGHTS", "INIT_ADAPTER",
                    "CALLIGRAPHER_BIN", "WARMUP_STEPS", "MAX_STEPS", "ACCELERATE_CONFIG", "LAUNCH_ARGS", "SKIP_VERIFY",
                    "NUM_GPUS", "BASE_PORT", "HOST", "PUBLIC_HOST", "SCORERS", "DEVICE", "VLM_URL", "VLM_MODEL",
                    "LOG_DIR", "CALLER_DIR")


def dry_run(script: str, env: dict, *extra: str, cwd=None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}
    full.update(env, DRY_RUN="1")
    return subprocess.run(["bash", str(REPO / script), *extra], env=full, capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=60)


def printed_commands(stdout: str) -> tuple[list[str], list[str], list[str]]:
    """``(accelerate launch args before -m, train.train argv, verify_deployment argv)`` of a dry run."""
    lines = [shlex.split(line) for line in stdout.splitlines() if line.strip()]
    train = [c for c in lines if "train.train" in c]
    verify = [c for c in lines if any(a.endswith("verify_deployment.py") for a in c)]
    assert len(train) == 1 and len(verify) == 1, stdout
    cmd = train[0]
    assert cmd[1] == "launch" and cmd[cmd.index("train.train") - 1] == "-m", cmd
    v = verify[0]
    return cmd[2:cmd.index("-m")], cmd[cmd.index("train.train") + 1:], v[[a.endswith(".py") for a in v].index(True) + 1:]


def num_processes(launch_args: list[str]) -> int:
    config = REPO / launch_args[launch_args.index("--config_file") + 1]
    return int(re.search(r"^num_processes:\s*(\d+)", config.read_text(), re.M).group(1))


RL_EXAMPLES = {
    "examples/train_grpo.sh": dict(method="grpo", init=True),
    "examples/train_nft.sh": dict(method="nft", init=True),
    "examples/train_grpo_from_calligrapher_bin.sh": dict(method="grpo", init=True),
    "examples/train_supervised.sh": dict(method=None, init=True),
}


@pytest.mark.parametrize("script", sorted(RL_EXAMPLES))
def test_example_command_is_accepted_by_training(example_env, script):
    from train.verify import VERIFY_ONLY, training_config

    env = {k: example_env[k] for k in ("FLUX", "SIGLIP", "DATA", "EVAL_DATA", "OUT", "REWARD_URLS")}
    if "calligrapher" in script:  # the released weights, straight into RL whatever WARMUP_STEPS says
        env.update(CALLIGRAPHER_BIN=example_env["ADAPTER"], WARMUP_STEPS="500")
    else:
        env["INIT_ADAPTER"] = example_env["ADAPTER"]
    res = dry_run(script, env, "--seed", "7")
    assert res.returncode == 0, res.stderr
    launch, argv, verify = printed_commands(res.stdout)

    cfg = parse_args(argv)
    problems = validate(cfg)
    import torch

    allowed = [] if torch.cuda.is_available() else [p for p in problems if p.startswith(GPU_ONLY)]
    assert problems == allowed and (torch.cuda.is_available() or cfg.use_8bit_adam == bool(allowed)), problems
    assert cfg.seed == 7, "extra arguments must reach train.train"
    assert cfg.pretrained_model_name_or_path == example_env["FLUX"] and cfg.output_dir == example_env["OUT"]
    assert cfg.initial_ip_adapter_path == example_env["ADAPTER"]
    expected = RL_EXAMPLES[script]["method"]
    assert cfg.use_rl == (expected is not None)
    if expected:
        assert cfg.rl_method == expected and cfg.rl_warmup_steps == 0  # starts RL from the given adapter
        assert cfg.reward_server_url == env["REWARD_URLS"] and cfg.rl_eval_data == example_env["EVAL_DATA"]
        # what only set-up can check: the global rollout batch holds whole groups
        assert cfg.train_batch_size * num_processes(launch) % cfg.rl_num_images_per_prompt == 0
        assert cfg.rl_per_prompt_stat_tracking and cfg.rl_num_images_per_prompt == 8
        assert cfg.resolution == 512 and cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
        assert cfg.use_ema and cfg.ema_device == "cpu"
    # the pre-flight check runs on the very same flags (plus its own), all of which it knows
    assert verify == ["--require_gpu", *argv]
    _, unknown = training_config(verify)
    assert [a for a in unknown if a.startswith("--") and a not in VERIFY_ONLY] == []


@pytest.mark.parametrize("missing", ["FLUX", "SIGLIP", "DATA", "OUT"])
def test_example_names_the_unset_variable(example_env, missing):
    env = {k: example_env[k] for k in ("FLUX", "SIGLIP", "DATA", "OUT") if k != missing}
    res = dry_run("examples/train_nft.sh", env)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"error: environment variable {missing} is not set"), res.stderr


def test_example_resolves_relative_paths_against_the_callers_folder(example_env, tmp_path):
    env = dict(FLUX=example_env["FLUX"], SIGLIP=example_env["SIGLIP"], DATA="data/train.jsonl", OUT="runs/x")
    res = dry_run("examples/train_grpo.sh", env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = parse_args(printed_commands(res.stdout)[1])
    assert cfg.train_data_json == str(tmp_path / "data/train.jsonl") and cfg.output_dir == str(tmp_path / "runs/x")
    assert cfg.initial_ip_adapter_path is None and cfg.rl_warmup_steps == 1000  # no adapter: warm up first


def test_serve_reward_dry_run_prints_one_server_per_gpu_and_the_url_list():
    res = dry_run("examples/serve_reward.sh", dict(NUM_GPUS="3", BASE_PORT="9100", SIGLIP="/models/siglip"))
    assert res.returncode == 0, res.stderr
    lines = [shlex.split(line) for line in res.stdout.splitlines()]
    for i, cmd in enumerate(lines[:3]):
        assert cmd[:2] == ["env", f"CUDA_VISIBLE_DEVICES={i}"]
        assert cmd[cmd.index("--port") + 1] == str(9100 + i) and cmd[cmd.index("--device") + 1] == "cuda"
        assert "train.reward_server" in cmd and cmd[cmd.index("--siglip_path") + 1] == "/models/siglip"
    assert lines[3] == ["--reward_server_url", "http://127.0.0.1:9100,http://127.0.0.1:9101,http://127.0.0.1:9102"]
    refused = dry_run("examples/serve_reward.sh", dict(HOST="0.0.0.0", SCORERS="contrast", REWARD_SERVER_TOKEN=""))
    assert refused.returncode == 2 and "REWARD_SERVER_TOKEN" in refused.stderr


def processes_with(*needles: str) -> list[int]:
    """Live (non-zombie) process ids whose command line contains every needle."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(n in cmdline for n in needles):
            found.append(int(proc.name))
    return found


def wait_gone(*needles: str, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(*needles)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_serve_reward_starts_healthy_servers_and_ctrl_c_stops_them(tmp_path):
    from train.tests.reward_helpers import free_port

    base = free_port()
    env = dict(os.environ, NUM_GPUS="2", BASE_PORT=str(base), DEVICE="cpu", SCORERS="contrast",
               PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(["bash", str(EXAMPLES / "serve_reward.sh")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        urls = None
        deadline = time.monotonic() + 120
        while urls is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            if line.strip().startswith("--reward_server_url"):
                urls = line.split()[1].split(",")
        assert urls == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        for url in urls:
            health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
            assert "contrast" in health["scorers"]
        assert len(processes_with("train.reward_server", f"--port {base} ")) == 1
        os.kill(proc.pid, signal.SIGINT)  # the script alone: its trap must stop the servers
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for port in (base, base + 1):
        assert not wait_gone("train.reward_server", f"--port {port} "), f"server on port {port} still runs"


# ---------------------------------------------------------------------------------------------- the demo
def demo_env(demo_dir: Path) -> dict:
    return dict(os.environ, DEMO_FAST="1", DEMO_DIR=str(demo_dir), PYTHON_BIN=sys.executable, HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    """The demo replaces its results in DEMO_DIR, so it must never clear a folder of someone else's files."""
    precious = tmp_path / "mine" / "data" / "keep.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("user data")
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=demo_env(tmp_path / "mine"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # it went ahead: stop it and everything it started
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 2 and "was not made by this demo" in err, err
    assert precious.read_text() == "user data"


@pytest.mark.slow
def test_interrupted_demo_leaves_no_process_behind(tmp_path):
    demo = tmp_path / "demo"
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=demo_env(demo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (demo / "reward_server.url").exists():  # written once the server answers /health
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the demo's reward server did not come up"
            time.sleep(0.2)
        server = int((demo / "reward_server.pid").read_text())
        assert processes_with("train.reward_server", str(demo)) == [server]
        time.sleep(1.0)  # the next step (the warm-up) is starting
        os.kill(proc.pid, signal.SIGINT)  # the script alone: only its trap can stop the server and the step
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert not wait_gone("train.reward_server", str(demo)), "the reward server outlived the demo"
    assert not wait_gone("train.train", str(demo)), "a training step outlived the demo"
    assert not (demo / "reward_server.pid").exists()


@pytest.mark.slow
def test_reduced_demo_reports_a_held_out_reward_for_every_phase(tmp_path):
    demo = tmp_path / "demo"
    res = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=demo_env(demo),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((demo / "summary.json").read_text())
    phases = summary["phases"]
    assert set(phases) == {"warmup", "grpo", "nft"}
    assert math.isfinite(phases["warmup"]["heldout_reward"]) and 0 <= phases["warmup"]["heldout_reward"] <= 1
    for key in ("grpo", "nft"):
        ph = phases[key]
        assert all(math.isfinite(ph[k]) and 0 <= ph[k] <= 1 for k in ("start", "end")), ph
        assert ph["start"] == phases["warmup"]["heldout_reward"]  # both start from the warm-up weights
        assert ph["steps"] >= 2 and Path(ph["checkpoint"], "ip-adapter-ema.bin").is_file()
        assert f"start {ph['start']:.4f} -> end {ph['end']:.4f}" in res.stdout
    assert set(summary["report"]["mean_reward"]) == {"base (no style)", "warm-up", "GRPO (EMA)", "NFT (EMA)"}
    assert (demo / "eval" / "report.html").is_file()
    assert "examples/train_grpo.sh" in res.stdout and "tensorboard --logdir" in res.stdout
    assert not processes_with("train.reward_server", str(demo)) and not (demo / "reward_server.pid").exists()
    check_tensorboard_tags_match_the_guide(demo)
    check_app_command(summary)


def check_app_command(summary: dict) -> None:
    """The printed ``python -m train.app`` line is accepted by the app's own parser (when the app exists)."""
    if not (REPO / "train" / "app.py").is_file():
        assert summary["app_command"] is None
        return
    from train.app import build_parser as app_parser

    command = summary["app_command"]
    assert command[:3] == ["python", "-m", "train.app"]
    args = app_parser().parse_args(command[3:])
    assert len(args.ip_adapter_path) == 3 and args.label == ["warm-up", "GRPO (EMA)", "NFT (EMA)"]
    for spec in args.ip_adapter_path:
        assert Path(spec.removesuffix("@ema")).is_dir(), spec


def check_tensorboard_tags_match_the_guide(demo: Path) -> None:
    """Every tag the guide explains is written by the demo's runs, and every tag they write is explained."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = set()
    for phase in ("warmup", "grpo", "nft"):
        for events in (demo / phase / "logs").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
            acc.Reload()
            written |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    documented = {t.replace("{scorer}", "contrast") for t in guide_table(TAG_ROW)}
    assert len(documented) > 30, "the guide's TensorBoard table was not found"
    assert not documented - written, f"the guide explains tags no run writes: {sorted(documented - written)}"
    assert not written - documented, f"runs write tags the guide does not explain: {sorted(written - documented)}"
