"""Side-by-side evaluation: metrics.json, the HTML report, and the report rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import evaluate
from train.data.dataset import load_records
from train.data.synthesize import synthesize
from train.models.calligrapher import Calligrapher
from train.models.checkpoint_io import save_adapter_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_RECORDS = 3


class _ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory):
    """A benchmark folder with three synthetic records and two checkpoints (before / after)."""
    root = tmp_path_factory.mktemp("eval")
    data = synthesize(root / "data", NUM_RECORDS, resolution=64, seed=1, layout="benchmark")
    model = Calligrapher.from_pretrained(tiny_models["flux"], tiny_models["siglip"], num_tokens=8)
    g = torch.Generator().manual_seed(0)
    for step in (100, 200):
        with torch.no_grad():
            for p in model.adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        save_adapter_file(model.adapter, root / "run" / f"checkpoint-{step}" / "ip-adapter.bin")
    return {"data": data.parent / "benchmark", "run": root / "run", "root": root}


def _argv(tiny_models, inputs, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--data", str(inputs["data"]), "--output_dir", str(out), "--resolution", "64",
            "--num_inference_steps", "2", "--max_sequence_length", "32", *map(str, extra)]


@pytest.fixture(scope="module")
def evaluation(tiny_models, inputs):
    """Both checkpoints side by side, scored in-process; returns the output folder."""
    out = inputs["root"] / "report"
    run = inputs["run"]
    assert evaluate.main(_argv(tiny_models, inputs, out, "--ip_adapter_path", run / "checkpoint-100",
                               "--ip_adapter_path", run / "checkpoint-200", "--label", "before", "--label", "after",
                               "--batch_size", "2", "--reference_strip_height", "16")) == 0
    return out


@pytest.mark.slow
def test_metrics_have_per_sample_and_mean_scores(evaluation):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert [c["label"] for c in metrics["checkpoints"]] == ["before", "after"]
    assert metrics["num_samples"] == len(metrics["samples"]) == NUM_RECORDS
    for run in metrics["checkpoints"]:
        assert run["errors"] == 0
        for name in ("ocr", "style", "background", "reward"):
            assert 0.0 <= run["mean"][name] <= 1.0
    for sample in metrics["samples"]:
        assert sample["text"]
        for label in ("before", "after"):
            out = sample["outputs"][label]
            assert set(out["scores"]) == {"ocr", "style", "background"}
            assert isinstance(out["recognised"], str)
            with Image.open(evaluation / out["image"]) as im, \
                    Image.open(evaluation / sample["source_image"]) as src:
                assert im.size == src.size
    runs = metrics["checkpoints"]
    mean_ocr = np.mean([s["outputs"]["after"]["scores"]["ocr"] for s in metrics["samples"]])
    assert runs[1]["mean"]["ocr"] == pytest.approx(mean_ocr)
    # Different weights, same seeds: the two columns differ only through the adapter.
    first = metrics["samples"][0]["outputs"]
    a, b = (np.asarray(Image.open(evaluation / first[k]["image"])) for k in ("before", "after"))
    assert not np.array_equal(a, b)


@pytest.mark.slow
def test_report_references_existing_images(evaluation):
    html = (evaluation / "report.html").read_text(encoding="utf-8")
    parser = _ImageSources()
    parser.feed(html)
    # source + reference + one output per checkpoint, for every sample
    assert len(parser.sources) == NUM_RECORDS * 4
    for src in parser.sources:
        assert not Path(src).is_absolute() and (evaluation / src).is_file(), src
    metrics = json.loads((evaluation / "metrics.json").read_text())
    for sample in metrics["samples"]:
        assert sample["text"] in html


def _chromium(*args, timeout=60) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (scripts/setup.sh --test installs it)")
def test_report_renders_in_headless_chromium(evaluation, tmp_path):
    url = (evaluation / "report.html").as_uri()
    dom = _chromium("--dump-dom", url)
    total = NUM_RECORDS * 4
    # The page's own script counts the images that decoded once everything loaded.
    assert f"[images {total}/{total}]" in dom.stdout, dom.stdout[:500] + dom.stderr[-500:]
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,900", url)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (900, 1200, 3)
    assert pixels.std() > 20  # not a blank page
    # The grid's images are in view: the page background is near-white, generated noise is colourful.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 60).mean() > 0.05


@pytest.mark.slow
def test_base_model_column_scored_by_a_reward_server(tiny_models, inputs, tmp_path):
    """--no_adapter adds the base model; --reward_server_url scores through a real loopback server."""
    from train.reward_server import create_app
    from train.rewards.background import BackgroundScorer
    from train.rewards.base import RewardItem
    from train.rewards.registry import build_scorers
    from train.tests.reward_helpers import ServerThread

    out = tmp_path / "remote"
    with ServerThread(create_app(build_scorers("background"))) as server:
        argv = _argv(tiny_models, inputs, out, "--no_adapter", "--ip_adapter_path", inputs["run"] / "checkpoint-200",
                     "--reward_weights", "background=1", "--reward_server_url", server.url, "--limit", "2")
        assert evaluate.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["label"] for c in metrics["checkpoints"]] == [evaluate.BASE_LABEL, "checkpoint-200"]
    assert metrics["num_samples"] == 2
    records = {r.id: r for r in load_records(inputs["data"])}
    scorer = BackgroundScorer()
    for sample in metrics["samples"]:
        record = records[sample["id"]]
        for output in sample["outputs"].values():
            assert set(output["scores"]) == {"background"} and output["error"] is None
            item = RewardItem(id="x", image=Image.open(out / output["image"]).convert("RGB"), text=record.text,
                              mask=Image.open(record.mask).convert("L"),
                              source=Image.open(record.source).convert("RGB"))
            local = scorer.score_batch([item])[0].score
            assert output["scores"]["background"] == pytest.approx(local, abs=1e-9)
            assert output["reward"] == pytest.approx(local, abs=1e-9)


@pytest.mark.slow
def test_default_reward_weights_are_trainings_and_the_report_says_so(evaluation):
    from train.config import TrainConfig
    from train.rewards.base import parse_reward_weights

    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["reward_weights"] == pytest.approx(parse_reward_weights(TrainConfig().reward_weights))
    assert metrics["reward_weights_note"] == "training's default --reward_weights"
    assert "(training&#x27;s default --reward_weights)" in (evaluation / "report.html").read_text(encoding="utf-8")


def test_other_reward_weights_are_labelled_as_such():
    parser = evaluate.build_parser()
    base = ["--pretrained_model_name_or_path", "f", "--siglip_path", "s", "--data", "d", "--output_dir", "o"]
    weights, note = evaluate.reward_weights(parser.parse_args(base + ["--scorers", "ocr,background"]))
    assert weights == {"ocr": 0.5, "background": 0.5}
    assert note == "equal weights over --scorers; training's default is ocr=0.7,style=0.2,background=0.1"
    _, note = evaluate.reward_weights(parser.parse_args(base + ["--reward_weights", "ocr=0.7,style=0.2,background=0.1"]))
    assert note == "--reward_weights, the same as training's default"


def test_output_dir_that_is_a_file_is_one_line(tiny_models, inputs, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as code:
        evaluate.main(_argv(tiny_models, inputs, blocker, "--no_adapter"))
    err = capsys.readouterr().err
    assert code.value.code == 2 and f"--output_dir {blocker} is a file, not a folder" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        evaluate.main(_argv(tiny_models, inputs, blocker / "sub", "--no_adapter"))
    assert f"--output_dir {blocker / 'sub'} lies under {blocker}, which is a file" in capsys.readouterr().err
