"""Scorers on rendered images, pure helpers against hand-computed values, the VLM judge
against a local OpenAI-protocol server, and the in-process reward function + failure policy."""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from train.rewards import (BackgroundScorer, RewardItem, RewardResult, build_scorers, decode_png_b64,
                           encode_png_b64, parse_reward_weights, text_accuracy)
from train.rewards.codec import PNG_SIGNATURE, ImageDecodeError, ImageTooLargeError, _chunk
from train.rewards.ocr import edit_distance
from train.rewards.vlm import VLMScorer, chat_completions_url, parse_judge_score
from train.rl_ip.reward import (LocalReward, RewardError, build_reward_fn, check_failure_budget, reward_stats,
                                reward_table)
from train.tests.reward_helpers import ChatJudgeStub, prompt_text, render_scene, tiny_siglip  # noqa: F401


@pytest.fixture(scope="module")
def ocr():
    from train.rewards import OCRScorer

    return OCRScorer()


# -- pure helpers -----------------------------------------------------------------------------
@pytest.mark.parametrize("recognised,target,expected", [
    ("Hello", "hello", 1.0),                 # case-folded
    ("He llo", "hello", 1.0),                # spaces stripped
    ("helo", "hello", 1 - 1 / 5),            # one deletion
    ("kitten", "sitting", 1 - 3 / 7),        # classic distance 3
    ("", "abc", 0.0),                        # nothing read
    ("zzzzzzzzzz", "ab", 0.0),               # distance capped at len(target)
    ("xx Hello World !!", "hello world", 1.0),  # target contained
    ("书法之", "书法之美", 0.75),
    ("书 法", "书法", 1.0),
    ("ＡＢＣ", "abc", 1.0),                  # full-width forms (NFKC)
    ("春眠不觉", "书法之美", 0.0),
])
def test_text_accuracy_hand_computed(recognised, target, expected):
    assert text_accuracy(recognised, target) == pytest.approx(expected)


def test_text_accuracy_rejects_empty_target():
    assert edit_distance("abc", "") == 3
    with pytest.raises(ValueError, match="empty"):
        text_accuracy("abc", "  ")


def test_parse_reward_weights():
    assert parse_reward_weights("ocr=0.7, style=0.2,background=0.1") == {"ocr": 0.7, "style": 0.2, "background": 0.1}
    for bad, msg in [("ocr=0.7,clip=0.3", "unknown scorer 'clip'"), ("ocr=abc", "not a number"),
                     ("ocr", "name=number"), ("", "empty"), ("ocr=1,ocr=2", "twice"), ("ocr=-1", ">= 0"),
                     ("ocr=0", "positive"), ("ocr=nan", "finite")]:
        with pytest.raises(ValueError, match=msg):
            parse_reward_weights(bad)


def test_png_codec_roundtrip_and_errors():
    img = render_scene("Hi").image
    for im in (img, img.convert("L"), img.convert("RGBA"), img.convert("1"), img.convert("P"), img.crop((3, 5, 4, 6))):
        back = decode_png_b64(encode_png_b64(im))
        assert back.mode == im.mode and back.size == im.size and back.tobytes() == im.tobytes()
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # Pillow's own (filtered) PNGs decode too
    assert decode_png_b64(base64.b64encode(buf.getvalue()).decode()).tobytes() == img.tobytes()
    zero = (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 1, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b""))  # a 0x1 image
    with pytest.raises(ImageDecodeError, match="image is 0x1 pixels"):
        decode_png_b64(base64.b64encode(zero).decode())
    for raw in (base64.b64decode(encode_png_b64(img)), buf.getvalue()):
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0xFF
        for bad in ["", "%%%not-base64", base64.b64encode(b"GIF89a....").decode(),
                    base64.b64encode(raw[: len(raw) // 2]).decode(), base64.b64encode(bytes(flipped)).decode()]:
            with pytest.raises(ImageDecodeError):
                decode_png_b64(bad)
        with pytest.raises(ImageTooLargeError, match="limit"):
            decode_png_b64(base64.b64encode(raw).decode(), max_pixels=100)


def test_decoding_to_rgb_or_l_scales_16_bit_and_composites_alpha():
    grey16 = Image.fromarray(np.array([[0x2000, 0x8000, 0xFFFF]], dtype=np.uint16))  # I;16
    assert grey16.mode == "I;16"
    data = encode_png_b64(grey16)
    assert decode_png_b64(data).mode == "I;16"  # no mode: kept as sent
    assert np.asarray(decode_png_b64(data, mode="RGB"))[0].tolist() == [[32] * 3, [128] * 3, [255] * 3]
    assert np.asarray(decode_png_b64(data, mode="L")).tolist() == [[32, 128, 255]]
    rgba = Image.new("RGBA", (1, 1), (200, 100, 50, 128))
    assert np.asarray(decode_png_b64(encode_png_b64(rgba), mode="RGB")).tolist() == [[[100, 50, 25]]]
    with pytest.raises(ValueError, match="mode must be"):
        decode_png_b64(data, mode="CMYK")


# -- OCR ----------------------------------------------------------------------------------------
def test_ocr_right_wrong_and_blank_latin_and_chinese(ocr):
    items = [render_scene("Calligraphy"), render_scene("书法之美", seed=1),
             replace(render_scene("Hello"), text="Zebra"), replace(render_scene("书法之美", seed=2), text="春眠不觉"),
             replace(render_scene(""), text="Hello"), replace(render_scene("", seed=1), text="书法"),
             # small text in a loose mask: recognition alone is unsure, detection finds it
             render_scene("春眠不觉晓", font_size=20, box=(10, 10, 246, 118), seed=3)]
    res = ocr.score_batch(items)
    assert all(r.error is None for r in res), res
    right_latin, right_cjk, wrong_latin, wrong_cjk, blank_latin, blank_cjk, loose = res
    assert right_latin.score >= 0.9 and right_cjk.score >= 0.9 and loose.score >= 0.9
    assert right_cjk.details["recognised"] == "书法之美"
    assert wrong_latin.score <= 0.3 and wrong_cjk.score <= 0.3
    assert blank_latin.score == 0.0 and blank_cjk.score == 0.0
    assert loose.details["engine"] == "det+rec"


def test_ocr_extreme_shapes_score_without_errors(ocr):
    """A blank 20000x20 strip (unsure recognition -> detection) once raised ``ResizeImgError`` with
    an empty message. Every shape gets a score: blank reads as nothing."""
    items = [RewardItem(str(i), Image.new("RGB", size, (255, 255, 255)), "Hello", mask=Image.new("L", size, 255))
             for i, size in enumerate([(20000, 20), (20, 20000), (1, 1)])]
    res = [ocr.score_batch([it])[0] for it in items]  # one by one: a batch is padded to its widest crop
    assert [(r.score, r.error, r.details["recognised"]) for r in res] == [(0.0, None, "")] * 3


def test_ocr_crops_have_bounded_width(ocr):
    """Recognition scales crops to 48 px high: a 20000x1 crop would be 960000 px wide (~10 GB).
    Checked on the crops, not by recognising them, so a regression cannot take the machine's memory."""
    from train.rewards.ocr import MAX_REC_ASPECT

    image = Image.new("RGB", (20000, 1), (30, 20, 10))  # BGR (10, 20, 30) in the crop
    image.paste((200, 200, 200), (15000, 0, 20000, 1))
    crop = ocr._crop(RewardItem("w", image, "t", mask=Image.new("L", image.size, 255)))
    assert crop.shape == (-(-20000 // MAX_REC_ASPECT), 20000, 3) and MAX_REC_ASPECT == 64
    middle = crop.shape[0] // 2  # the strip, centred on its median colour
    assert (crop[middle] == np.asarray(image)[0, :, ::-1]).all()
    assert (crop[:middle] == (10, 20, 30)).all() and (crop[middle + 1:] == (10, 20, 30)).all()
    normal = ocr._crop(render_scene("Hello"))
    assert normal.shape == (60 + 8, 208 + 8, 3)  # the mask box plus the scorer's 4 px pad


def test_scorer_errors_are_one_line_from_the_root_cause():
    from train.rewards.base import Scorer, describe_exception, one_line

    class Wrapped(Scorer):
        name = "wrapped"

        def _score_batch(self, items):
            try:
                raise OSError("cannot open /opt/models/rec.onnx\n  (permission denied)")
            except OSError as exc:
                raise RuntimeError("") from exc

    item = render_scene("x")
    res = Wrapped().score_batch([item, replace(item, id="2")])
    assert [r.error for r in res] == ["wrapped: RuntimeError: cannot open rec.onnx (permission denied)"] * 2
    assert all(r.details == {} for r in res)
    assert describe_exception(KeyError()) == "KeyError: no message"
    wrapped_tb = RuntimeError('Traceback (most recent call last):\n  File "/a/b.py", line 1\nMemoryError: bad_alloc')
    assert describe_exception(wrapped_tb) == "RuntimeError: MemoryError: bad_alloc"
    assert one_line("x" * 400) == "x" * 297 + "..."
    assert one_line("see http://host:8000/score and a/b/c") == "see http://host:8000/score and a/b/c"


def test_ocr_bad_item_errors_alone(ocr):
    good = render_scene("Hello")
    wrong_mask = replace(render_scene("Hello"), id="m", mask=Image.new("L", (10, 10), 255))
    empty_text = replace(render_scene("Hello"), id="e", text="   ")
    res = ocr.score_batch([good, wrong_mask, empty_text])
    assert res[0].score >= 0.9
    assert res[1].score is None and "mask is 10x10" in res[1].error
    assert res[2].score is None and "empty" in res[2].error


# -- style / background ------------------------------------------------------------------------
def test_style_identical_is_one_and_different_is_lower(tiny_siglip):
    style = build_scorers(["style"], siglip_path=tiny_siglip)["style"]
    same = render_scene("Style")
    other = replace(render_scene("Style"), id="o", reference=Image.effect_noise((120, 60), 80).convert("RGB"))
    no_ref = replace(render_scene("Style"), id="n", reference=None)
    res = style.score_batch([same, other, no_ref])
    assert res[0].score == pytest.approx(1.0, abs=1e-5)
    assert res[1].score < res[0].score - 1e-3 and 0.0 <= res[1].score <= 1.0
    assert res[2].error == "style: item needs reference"
    # batching does not change a score
    assert style.score_batch([other])[0].score == pytest.approx(res[1].score, abs=1e-5)


@pytest.fixture(scope="module")
def colour_siglip(tmp_path_factory):
    """A real SigLIP vision tower whose weights make the pooled embedding of a uniform image
    proportional to ``[f1, -f1, f2, -f2, 0, ...]`` with ``f1 = R - B`` and ``f2 = G - B`` (normalised
    channels): red (1, -1, -1) -> [2, -2, 0, 0], green -> [0, 0, 2, -2] (orthogonal to red), cyan -> -red.

    Encoder layers are identities (zero output projections), the pooling head averages the tokens
    (zero keys) and passes them through (identity values, zero MLP output)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=64, patch_size=16))
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight", "head.layernorm.weight")):
            sd[k].fill_(1.0)
    patch = sd["embeddings.patch_embedding.weight"]  # [32, 3, 16, 16]: output = mean over the patch
    for out, (channel, sign) in enumerate([(0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)]):
        patch[out, channel] = sign / 256
        patch[out, 2] = -sign / 256
    sd["head.probe"].fill_(1.0)
    sd["head.attention.in_proj_weight"][64:96] = torch.eye(32)  # values; keys stay zero: uniform attention
    sd["head.attention.out_proj.weight"].copy_(torch.eye(32))
    model.load_state_dict(sd)
    path = tmp_path_factory.mktemp("colour-siglip")
    model.save_pretrained(path)
    return path


def test_style_maps_cosine_to_half_plus_half_cosine(colour_siglip):
    """score = (cos + 1) / 2: identical 1, orthogonal 0.5, opposite 0, 45 degrees (1 + 1/sqrt 2) / 2."""
    from train.rewards import StyleScorer

    style = StyleScorer(colour_siglip)

    def item(ref_colour, i):
        image = Image.new("RGB", (80, 60), (128, 128, 128))
        image.paste((255, 0, 0), (10, 10, 58, 50))  # red under the mask (a 48x40 box: padded to square)
        mask = Image.new("L", (80, 60), 0)
        mask.paste(255, (10, 10, 58, 50))
        return RewardItem(str(i), image, "t", mask=mask, reference=Image.new("RGB", (30, 50), ref_colour))

    refs = [(255, 0, 0), (0, 255, 0), (0, 255, 255), (255, 255, 0)]  # red, green, cyan, yellow
    res = style.score_batch([item(c, i) for i, c in enumerate(refs)])
    assert [r.details["cosine"] for r in res] == pytest.approx([1.0, 0.0, -1.0, 1 / math.sqrt(2)], abs=1e-6)
    assert [r.score for r in res] == pytest.approx([1.0, 0.5, 0.0, (1 + 1 / math.sqrt(2)) / 2], abs=1e-6)


def test_background_untouched_is_one():
    bg = BackgroundScorer()
    item = render_scene("Text")
    changed = item.image.copy()
    changed.paste((0, 0, 0), (0, 0, 20, 20))  # outside the mask box
    res = bg.score_batch([item, replace(item, id="c", image=changed), replace(item, id="s", source=None)])
    assert res[0].score == 1.0 and res[0].details["mae"] == 0.0
    assert 0.0 < res[1].score < 1.0
    assert res[2].error == "background: item needs source"


def _contrast_item(pixels: list[tuple[int, int, int]], mask_values: list[int], id: str = "c") -> RewardItem:
    """A 1-row image with the given RGB pixels and mask values."""
    img = Image.new("RGB", (len(pixels), 1))
    img.putdata(pixels)
    mask = Image.new("L", (len(pixels), 1))
    mask.putdata(mask_values)
    return RewardItem(id, img, "t", mask=mask)


def test_contrast_hand_computed():
    from train.rewards import ContrastScorer

    scorer = build_scorers("contrast")["contrast"]
    assert isinstance(scorer, ContrastScorer)
    black, white, grey = (0, 0, 0), (255, 255, 255), (90, 140, 30)
    half = _contrast_item([black, white, grey] * 4, [255, 255, 0] * 4)  # the grey pixels are outside
    uniform = _contrast_item([grey] * 5 + [white, black], [255] * 5 + [0, 0], id="u")
    # luminances 0.299, 0.587, 0.114, 1.0: mean 0.5, variance (0.201² + 0.087² + 0.386² + 0.5²) / 4
    four = _contrast_item([(255, 0, 0), black, (0, 255, 0), (0, 0, 255), white, black],
                          [255, 127, 200, 128, 128, 0], id="f")  # 127 is outside: the threshold is "> 127"
    std4 = math.sqrt((0.201 ** 2 + 0.087 ** 2 + 0.386 ** 2 + 0.5 ** 2) / 4)
    res = scorer.score_batch([half, uniform, four])
    assert res[0].score == pytest.approx(1.0, abs=1e-12) and res[0].details == {"std": pytest.approx(0.5)}
    assert res[1].score == pytest.approx(0.0, abs=1e-12)
    assert res[2].score == pytest.approx(2 * std4, abs=1e-12) and res[2].details["std"] == pytest.approx(std4)


def test_scorers_read_16_bit_images_scaled():
    """In-process scoring too: 16-bit samples are scaled to 8 bits (image_modes), not clipped to white."""
    from train.rewards.base import mask_region

    arr = np.full((4, 8), 0x2000, dtype=np.uint16)
    arr[:, 4:] = 0x8000  # 32 and 128 at 8 bits
    image = Image.fromarray(arr)
    mask16 = np.full((4, 8), 0x7000, dtype=np.uint16)  # 112: outside
    mask16[:, 2:6] = 0x8000  # 128: inside
    source = Image.fromarray((arr >> 8).astype(np.uint8)).convert("RGB")
    item = RewardItem("a", image, "t", mask=Image.fromarray(mask16), source=source)
    inside, box = mask_region(item)
    assert box == (2, 0, 6, 4) and inside.sum() == 16
    contrast = build_scorers("contrast")["contrast"].score_batch([item])[0]
    assert contrast.score == pytest.approx(96 / 255, abs=1e-12)
    assert BackgroundScorer().score_batch([item])[0].score == 1.0  # equals its 8-bit version


def test_contrast_bad_items_and_crop_window():
    from train.rewards.base import CROP_ONLY_SCORERS, SCORER_INPUTS, crop_window

    scorer = build_scorers(["contrast"])["contrast"]
    empty = _contrast_item([(0, 0, 0), (255, 255, 255)], [127, 0], id="e")
    wrong = replace(_contrast_item([(0, 0, 0)], [255], id="w"), mask=Image.new("L", (3, 3), 255))
    res = scorer.score_batch([empty, wrong, replace(empty, id="n", mask=None)])
    assert res[0].score is None and res[0].error == "contrast: mask is empty"
    assert res[1].score is None and "contrast: mask is 3x3 but image is 1x1" == res[1].error
    assert res[2].error == "contrast: item needs mask"
    assert SCORER_INPUTS["contrast"] == ("mask",) and "contrast" in CROP_ONLY_SCORERS
    item = render_scene("Contrast")  # the client may send only the crop window: same score
    box = crop_window(item)
    cropped = replace(item, image=item.image.crop(box), mask=item.mask.crop(box))
    full, crop = scorer.score_batch([item, cropped])
    assert 0.05 < full.score < 1.0 and crop.score == full.score


# -- VLM judge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,expected", [
    ('{"score": 8, "reason": "good"}', 0.8),
    ('Sure!\n```json\n{"score": 7}\n```', 0.7),
    ('<think>maybe 3</think>{"Score": 9.0}', 0.9),
    ('{"score": 0.85}', 0.85),
    ("Score: 6/10. The style is close.", 0.6),
    ("rating = 4 out of 10", 0.4),
    ("7", 0.7),
    ('{"score": "10"}', 1.0),
    ('Verdict: {"score": 7, "notes": {"style": "close"}}', 0.7),
])
def test_parse_judge_score_good(reply, expected):
    assert parse_judge_score(reply) == pytest.approx(expected)


@pytest.mark.parametrize("reply", ["", "I like it.", '{"score": "high"}', '{"score": 12}', "Score: 11",
                                   "score 3 ... final score 8", '{"score": null}', "-2"])
def test_parse_judge_score_bad(reply):
    with pytest.raises(ValueError):
        parse_judge_score(reply)


def test_vlm_scorer_against_local_chat_server():
    def reply(body):
        text = prompt_text(body)
        if "'Garble'" in text or '"Garble"' in text:
            return "The lettering looks lovely."  # no score -> per-item error
        if '"Boom"' in text:
            return 500
        return '{"score": 8, "reason": "reads correctly"}'

    with ChatJudgeStub(reply) as stub:
        assert chat_completions_url(stub.url + "/v1/") == stub.url + "/v1/chat/completions"
        vlm = VLMScorer(stub.url, "qwen2.5-vl-test", api_key="k", timeout=5, retries=1, backoff=0.01)
        items = [render_scene("Good"), replace(render_scene("Garble"), id="g"), replace(render_scene("Boom"), id="b")]
        res = vlm.score_batch(items)
        vlm.close()
    assert res[0].score == pytest.approx(0.8) and res[0].error is None
    assert res[1].score is None and "no score found" in res[1].error
    assert res[2].score is None and "HTTP 500" in res[2].error
    first = next(r for r in stub.requests if '"Good"' in prompt_text(r["body"]))
    parts = first["body"]["messages"][0]["content"]
    assert first["body"]["model"] == "qwen2.5-vl-test" and first["headers"]["Authorization"] == "Bearer k"
    assert sum(p["type"] == "image_url" for p in parts) == 3  # result, close-up, reference
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


# -- in-process reward function + failure policy ------------------------------------------------
def test_local_reward_and_failure_policy():
    fn = build_reward_fn(None, "background=1.0")
    assert isinstance(fn, LocalReward)
    good = render_scene("A")
    bad = replace(render_scene("B"), id="bad", source=None)
    results = fn.submit([good, bad]).result(timeout=30)
    assert [r.id for r in results] == [good.id, "bad"]
    assert results[0].reward == 1.0 and results[1].reward is None and "needs source" in results[1].error
    rewards = reward_table(results)[:, 0]
    with pytest.raises(RewardError, match=r"1/2 rewards failed.*bad: background"):
        check_failure_budget(rewards, 0.0, results, "rewards failed")
    assert check_failure_budget(rewards, 0.5, results, "rewards failed") == 1
    assert rewards[0] == 1.0 and math.isnan(rewards[1])
    both = [results[1], replace(results[1], id="x")]
    with pytest.raises(RewardError, match="2/2"):
        check_failure_budget(reward_table(both)[:, 0], 1.0, both, "rewards failed")
    with pytest.raises(ValueError, match="not loaded"):
        LocalReward({"background": BackgroundScorer()}, {"ocr": 1.0})
    fn.close()


def test_failure_policy_never_fills_in_values():
    results = [RewardResult("a", 0.25, {"ocr": 0.25}, {}, None), RewardResult("b", None, {}, {}, "timeout"),
               RewardResult("c", float("nan"), {}, {}, None), RewardResult("d", 0.75, {"ocr": 0.75}, {}, None)]
    table = reward_table(results, ["ocr"])
    rewards = table[:, 0]
    assert check_failure_budget(rewards, 0.5, results, "rewards failed") == 2
    assert rewards[0] == 0.25 and math.isnan(rewards[1]) and math.isnan(rewards[2]) and rewards[3] == 0.75
    stats = reward_stats(rewards, {"ocr": table[:, 1]})
    assert stats["reward/failed"] == 2 and stats["reward/mean"] == 0.5 and stats["reward/ocr_mean"] == 0.5
    with pytest.raises(RewardError, match="2/4"):
        check_failure_budget(rewards, 0.25, results, "rewards failed")


def test_weighted_total_and_zero_weight_errors_do_not_fail(ocr):
    fn = LocalReward({"background": BackgroundScorer()}, {"background": 0.5})
    assert fn([render_scene("A")])[0].reward == pytest.approx(0.5)
    # a scorer with weight 0 is logged but cannot fail the item
    item = replace(render_scene("Hello"), source=None)
    out = LocalReward({"ocr": ocr, "background": BackgroundScorer()}, {"ocr": 1.0, "background": 0.0})([item])
    assert out[0].error is None and out[0].reward >= 0.9
    assert "needs source" in out[0].details["background"]["error"]
