"""Inference and export (docs/ARCHITECTURE.md §3, §5, §11) on tiny real FLUX.1-Fill / SigLIP folders."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from train import export, infer
from train.models import checkpoint_io
from train.data.dataset import CalligraphyDataset, load_records
from train.data.synthesize import synthesize
from train.models.calligrapher import Calligrapher, prompt_for
from train.models.checkpoint_io import OFFICIAL, AdapterFileError, read_adapter_file, save_adapter_file

FAST = ["--resolution", "64", "--num_inference_steps", "2", "--max_sequence_length", "32"]


def _perturb(adapter, seed: int, amount: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * amount)


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    """``checkpoint-7/`` with distinct live and EMA weights (8 style tokens)."""
    model = Calligrapher.from_pretrained(tiny_models["flux"], tiny_models["siglip"], num_tokens=8)
    folder = tmp_path_factory.mktemp("run") / "checkpoint-7"
    _perturb(model.adapter, 1)
    save_adapter_file(model.adapter, folder / "ip-adapter.bin")
    _perturb(model.adapter, 2)
    save_adapter_file(model.adapter, folder / "ip-adapter-ema.bin")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three synthetic records plus one whose source is 96x40 (not the model resolution)."""
    root = tmp_path_factory.mktemp("data")
    path = synthesize(root, 3, resolution=64, seed=0, layout="jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    for key, size in (("source", (96, 40)), ("mask", (96, 40))):
        with Image.open(path.parent / first[key]) as im:
            resample = Image.NEAREST if key == "mask" else Image.BICUBIC
            im.resize(size, resample).save(root / f"wide_{key}.png")
    wide = {"id": "wide", "source": "wide_source.png", "mask": "wide_mask.png", "text": "Wide"}
    path.write_text(path.read_text() + json.dumps(wide) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tiny_models, checkpoint):
    return infer.load_model(tiny_models["flux"], tiny_models["siglip"], checkpoint)


@pytest.fixture(scope="module")
def samples(dataset):
    ds = CalligraphyDataset(load_records(dataset), resolution=64)
    return [ds[i] for i in range(len(ds))]


def _model_args(tiny_models, adapter) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--ip_adapter_path", str(adapter)]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_generate_is_reproducible_and_independent_of_batch_size(model, samples):
    kwargs = dict(num_inference_steps=2, guidance_scale=30.0, max_sequence_length=32)
    one = infer.generate(model, samples, seed=3, batch_size=1, **kwargs)
    again = infer.generate(model, samples, seed=3, batch_size=1, **kwargs)
    batched = infer.generate(model, samples, seed=3, batch_size=3, **kwargs)
    other = infer.generate(model, samples[:1], seed=4, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    for a, b in zip(one, batched):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (one[0] - other[0]).abs().max() > 1e-2
    # Sample i uses seed + i: the second sample alone with seed 4 matches its place in the seed-3 run.
    alone = infer.generate(model, samples[1:2], seed=4, **kwargs)
    torch.testing.assert_close(alone[0], one[1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_scale_zero_is_flux_fill_pipeline_with_the_same_seed(model, samples):
    """With the adapter off, generate() is diffusers' FluxFillPipeline for the same seed, bit for bit."""
    s = samples[0]
    ours = infer.generate(model, [s], num_inference_steps=3, guidance_scale=30.0, seed=11, scale=0.0,
                          max_sequence_length=32)[0]
    assert model.adapter.ip_adapter[0].scale == 1.0  # restored after the call
    with warnings.catch_warnings():  # the pipeline warns about [-1, 1] tensors; it still uses them as given
        warnings.simplefilter("ignore", FutureWarning)
        ref = model.pipe(prompt=prompt_for(s.text), image=s.image[None], mask_image=s.mask[None],
                         height=s.image.shape[1], width=s.image.shape[2], num_inference_steps=3,
                         guidance_scale=30.0, generator=[torch.Generator().manual_seed(11)],
                         max_sequence_length=32, output_type="pt").images[0]
    torch.testing.assert_close((ours + 1) / 2, ref, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_official_export_gives_identical_inference(tiny_models, checkpoint, dataset, tmp_path):
    exported = tmp_path / "calligrapher.bin"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(exported)]) == 0
    assert set(torch.load(exported, weights_only=True)) == set(OFFICIAL)
    rec = json.loads(dataset.read_text().splitlines()[0])
    one = ["--source", str(dataset.parent / rec["source"]), "--mask", str(dataset.parent / rec["mask"]),
           "--text", rec["text"], "--seed", "5", *FAST]
    if rec.get("ref"):
        one += ["--ref", str(dataset.parent / rec["ref"])]
    outs = {}
    for name, adapter in (("folder", checkpoint), ("official", exported), ("file", checkpoint / "ip-adapter.bin")):
        assert infer.main(_model_args(tiny_models, adapter) + one + ["--output", str(tmp_path / f"{name}.png")]) == 0
        outs[name] = _pixels(tmp_path / f"{name}.png")
    ema = _model_args(tiny_models, checkpoint) + one + ["--ema", "--output", str(tmp_path / "ema.png")]
    assert infer.main(ema) == 0
    assert np.array_equal(outs["folder"], outs["official"])
    assert np.array_equal(outs["folder"], outs["file"])
    assert not np.array_equal(outs["folder"], _pixels(tmp_path / "ema.png"))


@pytest.mark.slow
def test_batch_inference_writes_one_output_per_record_at_source_size(tiny_models, checkpoint, dataset, tmp_path):
    out = tmp_path / "outputs"
    argv = _model_args(tiny_models, checkpoint) + ["--data", str(dataset), "--output_dir", str(out),
                                                   "--batch_size", "3", *FAST]
    assert infer.main(argv) == 0
    records = load_records(dataset)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [r.id for r in records]
    assert len(list(out.glob("*.png"))) == len(records)
    for line, record in zip(lines, records):
        with Image.open(out / line["image"]) as im, Image.open(record.source) as src:
            assert im.size == src.size
    with Image.open(out / "wide.png") as im:
        assert im.size == (96, 40)


def test_adapter_source_errors_are_clear(tiny_models, checkpoint, dataset, tmp_path, capsys):
    rec = json.loads(dataset.read_text().splitlines()[1])
    one = ["--source", str(dataset.parent / rec["source"]), "--mask", str(dataset.parent / rec["mask"]),
           "--text", "x", "--output", str(tmp_path / "o.png"), *FAST]
    live_only = tmp_path / "checkpoint-1"
    live_only.mkdir()
    save_adapter_file(read_adapter_file(checkpoint / "ip-adapter.bin"), live_only / "ip-adapter.bin")
    cases = [
        (_model_args(tiny_models, live_only) + ["--ema"], "has no ip-adapter-ema.bin"),
        (_model_args(tiny_models, checkpoint) + ["--num_tokens", "16"], "has 8 style tokens but --num_tokens is 16"),
        (_model_args(tiny_models, tmp_path / "missing.bin"), "adapter path not found"),
        (_model_args(tiny_models, checkpoint)[:4], "--no_adapter"),
    ]
    for argv, message in cases:
        assert infer.main(argv + one) == 2
        assert message in capsys.readouterr().err
    assert infer.main(_model_args(tiny_models, checkpoint)[:4] + ["--no_adapter"] + one) == 0


def test_export_round_trips_both_layouts(checkpoint, tmp_path):
    official, ours = tmp_path / "calligrapher.bin", tmp_path / "ip-adapter.bin"
    info = export.export(checkpoint, official, ema=True)
    assert info["num_tokens"] == 8 and info["source"].endswith("ip-adapter-ema.bin")
    export.export(official, ours, layout="ours")
    assert set(torch.load(ours, weights_only=True)) == {"image_proj", "ip_adapter"}
    a, b = read_adapter_file(checkpoint / "ip-adapter-ema.bin"), read_adapter_file(ours)
    assert all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p])
    with pytest.raises(ValueError, match="overwrite"):
        export.export(ours, ours, layout="ours")
    with pytest.raises(AdapterFileError, match="--ema needs a checkpoint-N folder"):
        checkpoint_io.resolve_adapter_file(official, ema=True)


# ---------------------------------------------------------------------- command-line errors and papercuts
def _one_sample(dataset, tmp_path, output) -> list[str]:
    rec = json.loads(dataset.read_text().splitlines()[0])
    ref = ["--ref", str(dataset.parent / rec["ref"])] if rec.get("ref") else []
    return ["--source", str(dataset.parent / rec["source"]), "--mask", str(dataset.parent / rec["mask"]),
            "--text", rec["text"], "--output", str(output), *ref]


@pytest.mark.parametrize("output, message", [
    ("out.xyz", "--output {}: '.xyz' image extension; use one of .png"),
    ("out", "--output {}: no image extension; use one of .png"),
    (".", "--output {} is a folder; give an image file name"),
])
def test_bad_output_path_is_one_line_before_anything_loads(dataset, tmp_path, capsys, output, message):
    target = tmp_path if output == "." else tmp_path / output
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--siglip_path", str(tmp_path / "no-siglip"),
            "--no_adapter", *_one_sample(dataset, tmp_path, target)]
    with pytest.raises(SystemExit) as code:
        infer.main(argv)  # the model folders do not exist: reaching them would fail differently
    err = capsys.readouterr().err
    assert code.value.code == 2 and message.format(target) in err and "Traceback" not in err
    assert not (tmp_path / "no-model").exists()


def test_export_to_a_folder_is_one_line(checkpoint, tmp_path, capsys):
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path} is a folder; give a file name such as ") and err.count("\n") == 1


def test_export_replaces_an_existing_out_only_with_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "calligrapher.bin"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    live = out.read_bytes()
    capsys.readouterr()
    assert export.main(["--checkpoint", str(checkpoint), "--ema", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out} already exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == live
    assert export.main(["--checkpoint", str(checkpoint), "--ema", "--out", str(out), "--overwrite"]) == 0
    assert export.same_weights(read_adapter_file(out), read_adapter_file(checkpoint / "ip-adapter-ema.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calligrapher.bin"]  # no temporary file left


def test_export_never_writes_into_a_checkpoint_folder(checkpoint, tmp_path, capsys, monkeypatch):
    """Not even with --overwrite: a resume would take the exported file for the run's own weights. A checkpoint
    folder is one named checkpoint-N or one holding training state; a relative or symlinked --out counts too."""
    stateful = tmp_path / "best"
    stateful.mkdir()
    (stateful / "trainer_state.json").write_text("{}")
    (tmp_path / "link").symlink_to(checkpoint)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    cases = [checkpoint / "ip-adapter-ema.bin", checkpoint / "calligrapher.bin", stateful / "calligrapher.bin",
             tmp_path / "link" / "calligrapher.bin", "calligrapher.bin"]
    monkeypatch.chdir(checkpoint)
    for out in cases:
        capsys.readouterr()
        assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} lies in the training checkpoint ") and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert sorted(p.name for p in stateful.iterdir()) == ["trainer_state.json"]


def test_non_finite_weights_are_refused_naming_file_and_tensor(tiny_models, checkpoint, dataset, tmp_path, capsys):
    """infer and export stop with one line naming the file and the first tensor holding inf or NaN,
    before any model loads (the model folders here do not exist) and without writing anything."""
    state = read_adapter_file(checkpoint / "ip-adapter.bin")
    state = {p: {k: v.clone() for k, v in part.items()} for p, part in state.items()}
    keys = list(state["ip_adapter"])
    state["ip_adapter"][keys[1]].view(-1)[:2] = float("inf")
    state["ip_adapter"][keys[3]].view(-1)[0] = float("nan")
    bad = tmp_path / "run" / "checkpoint-3" / "ip-adapter.bin"
    save_adapter_file(state, bad)
    message = f"error: {bad}: tensor 'ip_adapter.{keys[1]}' holds 0 NaN and 2 inf values"
    out = tmp_path / "calligrapher.bin"
    assert export.main(["--checkpoint", str(bad.parent), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and keys[3] not in err
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--siglip_path", str(tmp_path / "no-siglip"),
            "--ip_adapter_path", str(bad.parent), *_one_sample(dataset, tmp_path, tmp_path / "o.png"), *FAST]
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "o.png").exists()


def test_export_read_back_compares_values(checkpoint):
    state = read_adapter_file(checkpoint / "ip-adapter.bin")
    assert export.same_weights(state, read_adapter_file(checkpoint / "ip-adapter.bin"))
    changed = {p: {k: v.clone() for k, v in part.items()} for p, part in state.items()}
    key = next(iter(changed["ip_adapter"]))
    changed["ip_adapter"][key].view(-1)[3] += 1e-3  # same keys, same shapes, one value differs
    assert not export.same_weights(state, changed)
    halved = {p: {k: v.to(torch.bfloat16) for k, v in part.items()} for p, part in state.items()}
    assert not export.same_weights(state, halved)


def test_adapter_files_get_the_usual_permissions(checkpoint, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "calligrapher.bin"
        export.export(checkpoint, out)
        save_adapter_file(read_adapter_file(out), tmp_path / "ip-adapter.bin")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    for name in ("calligrapher.bin", "ip-adapter.bin", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_no_adapter_output_is_the_base_flux_fill_pipeline(tiny_models, dataset, tmp_path):
    """``infer --no_adapter`` writes exactly what diffusers' FluxFillPipeline (with its own attention
    processors) makes of the same prepared canvas and seed, cropped and resized back."""
    from diffusers import FluxFillPipeline

    from train.data.preprocess import to_output_image

    out = tmp_path / "base.png"
    argv = ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--no_adapter", "--seed", "9", *_one_sample(dataset, tmp_path, out), *FAST]
    assert infer.main(argv) == 0
    sample = CalligraphyDataset(load_records(dataset), resolution=64)[0]
    pipe = FluxFillPipeline.from_pretrained(tiny_models["flux"])
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = pipe(prompt=prompt_for(sample.text), image=sample.image[None], mask_image=sample.mask[None],
                   height=sample.image.shape[1], width=sample.image.shape[2], num_inference_steps=2,
                   guidance_scale=30.0, generator=[torch.Generator().manual_seed(9)], max_sequence_length=32,
                   output_type="pt").images[0]
    want = np.asarray(to_output_image(ref * 2 - 1, sample))
    got = _pixels(out)
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_ema_suffix_equals_the_ema_flag(tiny_models, checkpoint, dataset, tmp_path):
    base = _model_args(tiny_models, checkpoint)
    assert infer.main(base + ["--ema"] + _one_sample(dataset, tmp_path, tmp_path / "flag.png") + FAST) == 0
    base[-1] = f"{checkpoint}@ema"
    assert infer.main(base + _one_sample(dataset, tmp_path, tmp_path / "suffix.png") + FAST) == 0
    assert np.array_equal(_pixels(tmp_path / "flag.png"), _pixels(tmp_path / "suffix.png"))


def test_help_names_the_module_and_the_ema_suffix():
    from train import evaluate

    for module, parser in (("train.infer", infer.build_parser()), ("train.evaluate", evaluate.build_parser())):
        text = parser.format_help()
        assert text.startswith(f"usage: python -m {module} ")
        assert "@ema" in text and "ip-adapter-ema.bin" in text


def test_shared_flags_have_one_definition():
    from train import evaluate, verify

    parsers = {"infer": infer.build_parser(), "evaluate": evaluate.build_parser(), "verify": verify.build_parser()}

    def spec(parser, flag):
        a = parser._option_string_actions[flag]
        return a.help.split("; give it once")[0], a.type, a.choices

    for flag in ("--pretrained_model_name_or_path", "--siglip_path", "--ip_adapter_path", "--ema", "--num_tokens"):
        assert len({spec(p, flag) for p in parsers.values()}) == 1, flag
    for flag in ("--resolution", "--reference_strip_height", "--num_inference_steps", "--guidance_scale", "--seed",
                 "--dtype", "--max_sequence_length"):
        a, b = (parsers[n]._option_string_actions[flag] for n in ("infer", "evaluate"))
        assert (a.help, a.default, a.type, a.choices) == (b.help, b.default, b.type, b.choices), flag


@pytest.mark.slow
def test_long_text_warns_once_naming_the_record(model, samples, capfd):
    import logging
    from dataclasses import replace

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    noisy = [logging.getLogger(n) for n in ("diffusers.pipelines.flux.pipeline_flux_fill",
                                             "transformers.tokenization_utils_base")]
    keep = Keep()
    for lg in noisy:
        lg.addHandler(keep)
    long = replace(samples[1], id="long-one", text="x" * 5000)
    capfd.readouterr()
    try:
        for _ in range(2):
            infer.generate(model, [long, samples[0]], num_inference_steps=1, max_sequence_length=32)
    finally:
        for lg in noisy:
            lg.removeHandler(keep)
    err = capfd.readouterr().err
    assert err.count("record 'long-one': text of 5000 characters") == 1, err[:500]
    assert "T5 tokens" in err and "only the first 32 are used" in err
    assert "xxxxxxxxxx" not in err and len(err) < 2000
    assert not [m for m in records if "truncated" in m], records[:1]  # no per-call dump of the cut-off text
