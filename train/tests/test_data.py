"""Data: record formats and validation, official preprocessing, the synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from train.data.dataset import CalligraphyDataset, DatasetError, Record, load_records, main as validate_main
from train.data.preprocess import (
    collate_samples, make_reference_strip, mask_bbox, nearest_multiple, official_strip_height, pad_to_square,
    pil_to_tensor, prepare_inputs, tensor_to_pil, to_output_image,
)
from train.data.synthesize import MissingFontError, find_fonts, main as synth_main, render_sample, synthesize


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def cv2_strip(ref: Image.Image, width: int, height: int) -> torch.Tensor:
    """The official strip computed independently: ``cv2.resize`` (default INTER_LINEAR) of the RGB array."""
    arr = cv2.resize(np.asarray(ref.convert("RGB")), (width, height))
    return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def box_mask(w: int, h: int, box, value: int = 255) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(value, box)
    return m


@pytest.fixture()
def files(tmp_path):
    """A few image files in tmp_path: a 32x32 source, good / empty / white / 16x16 masks, junk."""
    noise_image(32, 32).save(tmp_path / "src.png")
    box_mask(32, 32, (4, 8, 20, 16)).save(tmp_path / "mask.png")
    box_mask(32, 32, (0, 0, 0, 0)).save(tmp_path / "empty.png")
    box_mask(32, 32, (0, 0, 32, 32)).save(tmp_path / "white.png")
    box_mask(16, 16, (2, 2, 8, 8)).save(tmp_path / "small.png")
    noise_image(20, 10, seed=1).save(tmp_path / "ref.png")
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    return tmp_path


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


GOOD = {"source": "src.png", "mask": "mask.png", "text": "hello"}


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("change, message", [
    ({"source": "missing.png"}, "source file not found: "),
    ({"source": "junk.png"}, "source is not a readable image: "),
    ({"mask": "empty.png"}, "mask is empty (no pixel above 127)"),
    ({"mask": "white.png"}, "mask is all white"),
    ({"mask": "small.png"}, "size mismatch: source is 32x32 but mask is 16x16"),
    ({"text": "   "}, "empty text"),
    ({"ref": "junk.png"}, "ref is not a readable image: "),
])
def test_each_invalid_input_has_its_own_message(files, change, message):
    path = write_json(files / "data.json", [dict(GOOD, id="fine"), dict(GOOD, id="bad", **change)])
    with pytest.raises(DatasetError) as err:
        load_records(path)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("record 1 (id 'bad'): ")
    assert message in err.value.problems[0]


def test_duplicate_ids_given_and_derived(files):
    path = write_json(files / "data.json", [dict(GOOD, id="a"), dict(GOOD, text="x", id="a"), GOOD, GOOD])
    with pytest.raises(DatasetError) as err:
        load_records(path)
    first, second = err.value.problems
    assert first == "record 1 (id 'a'): duplicate id 'a': also record 0 (id 'a')"
    assert second.startswith("record 3 (id '") and "(same source, mask, ref and text)" in second


def test_three_problems_are_reported_together_and_exit_nonzero(files, capsys):
    path = write_json(files / "data.json", [
        dict(GOOD, mask="nope.png"), dict(GOOD, text=""), GOOD, dict(GOOD, mask="small.png"),
    ])
    with pytest.raises(DatasetError) as err:
        load_records(path)
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("record 0") and "mask file not found" in problems[0]
    assert problems[1].startswith("record 1") and problems[1].endswith("empty text")
    assert problems[2].startswith("record 3") and "size mismatch" in problems[2]
    assert str(err.value).count("\n") == 3  # header + one line per problem
    with pytest.raises(SystemExit) as code:
        validate_main([str(path)])
    assert code.value.code == 1
    assert "3 problem(s)" in capsys.readouterr().err


def test_structural_problems(files):
    lines = [json.dumps(GOOD), "{oops", json.dumps(dict(GOOD, text="other", refs="ref.png"))]
    (files / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        load_records(files / "data.jsonl")
    bad_json, bad_key = err.value.problems
    assert bad_json.startswith("record 1 (line 2): invalid JSON")
    assert bad_key.startswith("record 2 (line 3, id '") and "unknown key(s) ['refs']" in bad_key
    (files / "self_bench.txt").write_text("1-hi\nbad line\n")
    with pytest.raises(DatasetError, match="line 2: expected 'N-text'"):
        load_records(files)


# ---------------------------------------------------------------------- formats and identity
def test_json_jsonl_and_benchmark_yield_the_same_samples(tmp_path):
    bench = synthesize(tmp_path, num=2, resolution=64, langs=("en", "zh"), layout="benchmark")
    (bench / "test2_ref.png").unlink()  # sample 2 becomes self-reference in every format
    texts = dict(line.split("-", 1) for line in (bench / "self_bench.txt").read_text().splitlines())
    recs = [{"source": f"benchmark/test{n}_source.png", "mask": f"benchmark/test{n}_mask.png", "text": texts[str(n)]}
            for n in (1, 2)]
    recs[0]["ref"] = "benchmark/test1_ref.png"
    from_json = load_records(write_json(tmp_path / "d.json", recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    from_jsonl = load_records(tmp_path / "d.jsonl")
    from_bench = load_records(bench)
    assert from_json == from_jsonl == from_bench
    assert from_bench[0].ref == (bench / "test1_ref.png").resolve() and from_bench[1].ref is None
    assert load_records(bench) == from_bench  # ids are stable across runs
    a, b = CalligraphyDataset(from_json, resolution=64)[1], CalligraphyDataset(from_bench, resolution=64)[1]
    assert a.id == b.id and a.text == b.text and torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)


def test_self_reference_is_the_source_cropped_to_the_mask_box(files):
    source, mask = Image.open(files / "src.png"), Image.open(files / "mask.png")
    assert mask_bbox(mask) == (4, 8, 20, 16)
    crop = source.crop((4, 8, 20, 16))
    selfref = prepare_inputs(source, mask, "hi", ref=None, resolution=32)
    explicit = prepare_inputs(source, mask, "hi", ref=crop, resolution=32)
    assert np.array_equal(np.asarray(selfref.style_image), np.asarray(explicit.style_image))
    assert torch.equal(selfref.image, explicit.image)
    # a 16x8 crop -> 32x16 strip on top of the 32x32 source
    assert selfref.image.shape == (3, 48, 32)
    assert torch.equal(selfref.image[:, :16], cv2_strip(crop, 32, 16))


# ---------------------------------------------------------------------- preprocessing
def test_pad_to_square_by_hand():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    out = np.asarray(pad_to_square(red, 8))  # scale 0.2 -> 8x4, centred: rows 2..5
    assert out.shape == (8, 8, 3)
    assert (out[:2] == 0).all() and (out[6:] == 0).all() and (out[2:6] == [255, 0, 0]).all()
    assert pad_to_square(red).size == (40, 40)


def test_strip_heights_by_hand():
    assert nearest_multiple(40) == 32 and nearest_multiple(41) == 48 and nearest_multiple(7) == 0
    assert nearest_multiple(24) == 16 and nearest_multiple(8) == 0  # ties go down
    # official: int((64 / 200) * 76) = int(24.32) = 24, a tie -> 16 (rounding 24.32 itself would give 32)
    assert official_strip_height((200, 76), 64) == 16
    assert make_reference_strip(Image.new("RGB", (200, 76)), 64).size == (64, 16)
    assert official_strip_height((200, 78), 64) == 16  # 24.96 truncates to 24 before rounding
    assert official_strip_height((200, 79), 64) == 32  # 25.28 -> 25 -> 32
    assert official_strip_height((3, 2), 512) == 336  # int(341.33) = 341 -> 336
    assert make_reference_strip(Image.new("RGB", (40, 20)), 64).size == (64, 32)  # official: 64*20/40 = 32
    assert make_reference_strip(Image.new("RGB", (30, 20)), 64).size == (64, 48)  # 42.7 -> 48
    assert make_reference_strip(Image.new("RGB", (1000, 10)), 64).size == (64, 16)  # too wide: at least 16
    assert make_reference_strip(Image.new("RGB", (10, 1000)), 64, max_height=64).size == (64, 64)  # capped
    assert make_reference_strip(Image.new("RGB", (40, 20)), 64, height=16).size == (64, 16)


def test_strip_is_the_official_cv2_linear_resize():
    """A 300 px reference shrunk to a 32 px strip: cv2 INTER_LINEAR samples without antialiasing,
    PIL's bilinear averages; the official strip is cv2's, pixel for pixel."""
    rng = np.random.default_rng(5)
    ref = Image.fromarray(rng.integers(0, 256, (150, 300, 3), dtype=np.uint8), "RGB")
    strip = make_reference_strip(ref, 32)
    assert strip.size == (32, 16)  # int((32 / 300) * 150) = 16
    assert torch.equal(pil_to_tensor(strip), cv2_strip(ref, 32, 16))
    pil = np.asarray(ref.resize((32, 16), Image.BILINEAR), dtype=int)
    assert np.abs(np.asarray(strip, dtype=int) - pil).max() > 40  # the two resamplers really differ here
    s = prepare_inputs(noise_image(32, 32), box_mask(32, 32, (4, 4, 20, 20)), "x", ref=ref, resolution=32)
    assert torch.equal(s.image[:, :16], cv2_strip(ref, 32, 16))
    # a band (fixed height) is filled with the same resampler, aspect preserved
    band = make_reference_strip(ref, 32, height=32)  # 300x150 fitted into 32x32 -> 32x16, rows 8..23
    assert np.array_equal(np.asarray(band)[8:24], np.asarray(cv2_strip(ref, 32, 16).add(1).mul(127.5).round()
                                                             .to(torch.uint8).permute(1, 2, 0)))
    assert (np.asarray(band)[:8] == 0).all() and (np.asarray(band)[24:] == 0).all()


def test_mask_threshold_and_strip_mask():
    src = noise_image(32, 32)
    mask = box_mask(32, 32, (0, 0, 16, 32), value=100)  # 100 <= 127: not painted
    mask.paste(200, (16, 0, 32, 32))
    s = prepare_inputs(src, mask, "x", ref=noise_image(32, 16, 2), resolution=64)
    assert s.image.shape == (3, 96, 64) and s.mask.shape == (1, 96, 64)
    assert set(s.mask.unique().tolist()) == {0.0, 1.0}
    assert s.mask[:, :32].sum() == 0  # zero over the strip
    assert s.mask[0, 32:, :32].sum() == 0 and s.mask[0, 32:, 32:].sum() == 64 * 32


def test_strip_and_crop_round_trip_restore_source_geometry():
    src, ref = noise_image(64, 64), noise_image(40, 20, seed=3)
    mask = box_mask(64, 64, (10, 10, 50, 30))
    s = prepare_inputs(src, mask, "hi", ref=ref, resolution=64, id="a")
    assert s.source_box == (0, 32, 64, 96) and s.source_size == (64, 64)
    assert torch.equal(s.image[:, :32], cv2_strip(ref, 64, 32))
    assert np.array_equal(np.asarray(to_output_image(s.image, s)), np.asarray(src))
    assert np.array_equal(np.asarray(to_output_image(s.image, (s.source_box, s.source_size))), np.asarray(src))
    off = prepare_inputs(src, mask, "hi", ref=ref, resolution=64, reference_strip=False)
    assert off.image.shape == (3, 64, 64) and off.source_box == (0, 0, 64, 64)
    assert np.array_equal(np.asarray(to_output_image(off.image, off)), np.asarray(src))
    # a 96x48 source is stretched to 64x64 (as the official scripts do) and comes back at 96x48
    grad = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (48, 1, 3)), "RGB")
    g = prepare_inputs(grad, box_mask(96, 48, (10, 10, 40, 30)), "hi", ref=ref, resolution=64)
    out = to_output_image(g.image, g)
    assert out.size == (96, 48)
    assert np.abs(np.asarray(out, dtype=float) - np.asarray(grad, dtype=float)).mean() < 2.0


def test_tensor_pil_round_trip_is_exact():
    img = noise_image(8, 8)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img))), np.asarray(img))


def test_collate_batches_and_rejects_mixed_canvases():
    src, mask = noise_image(32, 32), box_mask(32, 32, (4, 4, 20, 20))
    a = prepare_inputs(src, mask, "a", ref=noise_image(32, 16), resolution=32, id="a", strip_height=16)
    b = prepare_inputs(src, mask, "a longer text", ref=noise_image(16, 32), resolution=32, id="b", strip_height=16)
    batch = collate_samples([a, b])
    assert batch.image.shape == (2, 3, 48, 32) and batch.mask.shape == (2, 1, 48, 32)
    assert batch.ids == ["a", "b"] and batch.texts == ["a", "a longer text"] and len(batch.style_images) == 2
    tall = prepare_inputs(src, mask, "c", ref=noise_image(16, 32), resolution=32, id="c")
    with pytest.raises(ValueError, match="different sizes: 'a' is 32x48 .* 'c' is 32x64"):
        collate_samples([a, tall])


# ---------------------------------------------------------------------- synthetic generator
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_rendered_glyphs_lie_inside_the_mask_only(lang):
    rng = np.random.default_rng(1)
    for i in range(4):
        s = render_sample(rng, 128, lang, with_ref=i % 2 == 0)
        changed = (np.asarray(s.source) != np.asarray(s.background)).any(axis=2)
        inside = np.asarray(s.mask) > 127
        assert changed[inside].sum() > 20, s.text  # glyph pixels in the mask
        assert changed[~inside].sum() == 0, s.text  # and none outside it
        assert (s.ref is not None) == (i % 2 == 0)
        if lang == "zh":
            assert all("\u4e00" <= ch <= "\u9fff" for ch in s.text)


def test_synthesize_writes_a_valid_dataset_in_both_layouts(tmp_path):
    path = synthesize(tmp_path, num=4, resolution=64, langs=("en", "zh"), seed=0, layout="both")
    assert path == tmp_path / "data.jsonl"
    records = load_records(path, resolution=64)
    assert [r.id for r in records] == ["syn00000", "syn00001", "syn00002", "syn00003"]
    assert [r.ref is None for r in records] == [False, True, False, True]  # both reference kinds occur
    assert any("\u4e00" <= ch <= "\u9fff" for ch in records[1].text)
    bench = load_records(tmp_path / "benchmark")
    assert [r.text for r in bench] == [r.text for r in records] and all(r.ref is not None for r in bench)
    same_seed = synthesize(tmp_path / "again", num=4, resolution=64, langs=("en", "zh"), seed=0)
    assert same_seed.read_text() == path.read_text()
    assert Image.open(tmp_path / "again/images/syn00002_source.png").tobytes() == \
        Image.open(tmp_path / "images/syn00002_source.png").tobytes()


def test_synthesize_cli_and_missing_cjk_font(tmp_path, capsys):
    synth_main(["--out", str(tmp_path), "--num", "2", "--resolution", "64", "--lang", "en,zh"])
    assert "wrote 2 samples" in capsys.readouterr().out
    assert len(load_records(tmp_path / "data.jsonl")) == 2
    with pytest.raises(MissingFontError, match="install the Debian package fonts-wqy-microhei"):
        find_fonts("zh", candidates=(Path("/nonexistent/font.ttc"),))
    assert find_fonts("zh")  # the set-up installs one


def test_dataset_items_are_prepared_samples(tmp_path):
    records = load_records(synthesize(tmp_path, num=2, resolution=64))
    ds = CalligraphyDataset(records, resolution=64)
    assert isinstance(records[0], Record) and len(ds) == 2 and ds.texts == [r.text for r in records]
    item = ds[1]
    assert item.id == "syn00001" and item.image.shape[1:] == (item.source_box[3], 64)
    assert item.image.min() >= -1 and item.image.max() <= 1 and item.style_image.size == (512, 512)


def _glyph(font_path, ch: str, size: int = 32) -> np.ndarray:
    from PIL import ImageDraw, ImageFont

    img = Image.new("L", (64, 64))
    ImageDraw.Draw(img).text((8, 8), ch, font=ImageFont.truetype(str(font_path), size, index=0), fill=255)
    return np.asarray(img)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fonts_draw_real_glyphs_not_tofu(lang):
    """Every character the generator uses has its own glyph in every font it picks: a missing glyph
    draws the font's .notdef box, identical for all characters."""
    from train.data.synthesize import WORDS

    chars = sorted(set("".join(WORDS[lang])) - {" "})
    for font in find_fonts(lang):
        notdef = _glyph(font, "\U0010FFFD")
        glyphs = [_glyph(font, ch) for ch in chars]
        tofu = [ch for ch, g in zip(chars, glyphs) if np.array_equal(g, notdef) or not g.any()]
        assert not tofu, f"{font.name} has no glyph for {''.join(tofu)}"
        assert len({g.tobytes() for g in glyphs}) == len(chars), font.name


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_rendered_text_is_visible_ink_in_the_mask(lang):
    """The text stands out from what it covers: enough ink pixels, in a clearly different luminance."""
    rng = np.random.default_rng(7)
    for i in range(6):
        s = render_sample(rng, 128, lang, with_ref=False)
        lum_src = np.asarray(s.source.convert("L"), dtype=float)
        lum_bg = np.asarray(s.background.convert("L"), dtype=float)
        inside = np.asarray(s.mask) > 127
        ink = (np.asarray(s.source) != np.asarray(s.background)).any(axis=2) & inside
        assert ink.sum() >= 0.03 * inside.sum(), (s.text, s.font.name)
        assert np.abs(lum_src - lum_bg)[ink].mean() > 30, (s.text, s.font.name)
        assert np.percentile(lum_src[inside], 98) - np.percentile(lum_src[inside], 2) > 30, s.text


# ---------------------------------------------------------------------- validation messages
def test_mask_that_vanishes_at_the_training_resolution_is_refused(files):
    line = Image.new("L", (512, 512))
    line.paste(255, (40, 101, 400, 102))  # one pixel high: nearest neighbour to 64 px drops it
    line.save(files / "line.png")
    noise_image(512, 512).save(files / "big.png")
    path = write_json(files / "data.json", [{"source": "big.png", "mask": "line.png", "text": "x", "id": "thin"}])
    assert load_records(path, resolution=512)  # fine at full size
    with pytest.raises(DatasetError) as err:
        load_records(path, resolution=64)
    (problem,) = err.value.problems
    assert problem.startswith("record 0 (id 'thin'): mask vanishes when resized")
    assert "64x64" in problem and "line.png" in problem


def test_error_names_the_dataset_once_and_the_flag(files):
    path = write_json(files / "data.json", [dict(GOOD, text="")])
    with pytest.raises(DatasetError) as err:
        load_records(path, flag="--rl_eval_data")
    message = str(err.value)
    assert message.startswith(f"--rl_eval_data {path}: 1 problem(s):\n")
    assert message.count(str(path)) == 1 and "training data" not in message


def test_benchmark_line_problems_do_not_hide_missing_files(files):
    bench = files / "bench"
    bench.mkdir()
    (bench / "self_bench.txt").write_text("1-hello\noops\n2-world\n")
    noise_image(32, 32).save(bench / "test1_source.png")
    box_mask(32, 32, (4, 4, 20, 20)).save(bench / "test1_mask.png")  # test2 has no files
    with pytest.raises(DatasetError) as err:
        load_records(bench)
    problems = err.value.problems
    assert problems[0] == "self_bench.txt line 2: expected 'N-text', got 'oops'"
    assert any(p.startswith("record 1 (test2): source file not found") for p in problems)
    assert any(p.startswith("record 1 (test2") and "mask file not found" in p for p in problems)


def test_16bit_images_load_scaled_not_white(tmp_path):
    """A 16-bit grayscale source (Pillow mode I;16) reaches the model with its real pixel values."""
    gray = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    Image.fromarray(gray).save(tmp_path / "src16.png")
    box_mask(32, 32, (4, 4, 20, 20)).save(tmp_path / "mask.png")
    path = write_json(tmp_path / "d.json", [{"source": "src16.png", "mask": "mask.png", "text": "x"}])
    sample = CalligraphyDataset(load_records(path), resolution=32, reference_strip=False)[0]
    want = torch.from_numpy((gray >> 8).astype(np.float32)) / 127.5 - 1.0
    assert Image.open(tmp_path / "src16.png").mode == "I;16"
    torch.testing.assert_close(sample.image[0], want, atol=1e-6, rtol=0)
    assert sample.image.min() < -0.9  # not clipped to white


def test_single_sample_validation_names_the_files(files):
    from train.data.dataset import load_sample

    record = load_sample(files / "src.png", files / "mask.png", "hi", ref=files / "ref.png", resolution=32)
    assert record.id == "src" and record.ref == (files / "ref.png").resolve()
    with pytest.raises(DatasetError) as err:
        load_sample(files / "src.png", files / "small.png", "hi")
    assert str(err.value).startswith("--source/--mask/--ref/--text: 1 problem(s):")
    assert err.value.problems == ["size mismatch: source is 32x32 but mask is 16x16"]
