"""Style and background scores pinned against straightforward reference computations (one image
at a time, float64 where it matters), whatever the batching, sharing and caching; the caches are
keyed by content and bounded; bad items still fail alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from train.data.preprocess import style_image
from train.rewards import BackgroundScorer, RewardItem
from train.rewards.style import StyleScorer, style_pixels
from train.tests.reward_helpers import render_scene, tiny_siglip  # noqa: F401


def noise(size, seed: int, mode: str = "RGB") -> Image.Image:
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("size", [64, 384])
def test_style_pixels_equal_one_pil_resize_of_the_style_image(size):
    """The two-pass resize over the image's rows gives exactly PIL's single bicubic resize."""
    cases = [noise((209, 81), 0), noise((81, 209), 1), noise((1, 1), 2), noise((700, 3), 3), noise((3, 700), 4),
             noise((512, 512), 5), noise((123, 77), 6, "L"), noise((90, 60), 7, "RGBA"), Image.new("RGB", (40, 30))]
    edged = np.asarray(noise((160, 90), 8)).copy()
    edged[:20] = 0  # black rows at the image's own top: still inside the padded band
    edged[:, -7:] = 0
    cases.append(Image.fromarray(edged))
    for im in cases:
        want = np.asarray(style_image(im).resize((size, size), Image.BICUBIC))
        got = style_pixels(im, size)
        assert got.dtype == np.uint8 and np.array_equal(got, want), (im.size, im.mode)


def reference_style_scores(path, items: list[RewardItem]) -> list[float]:
    """(cos + 1) / 2 of the official preprocessing, one image per SigLIP forward, normalised in float64."""
    import json

    import torch
    from transformers import SiglipVisionModel

    model = SiglipVisionModel.from_pretrained(path).eval()
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    size = cfg["size"]["height"]
    mean, std = np.array(cfg["image_mean"]), np.array(cfg["image_std"])

    def embed(im) -> np.ndarray:
        x = (np.asarray(style_image(im).resize((size, size), Image.BICUBIC), dtype=np.float64) / 255 - mean) / std
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(x).permute(2, 0, 1)[None].float()).pooler_output[0]
        v = out.double().numpy()
        return v / np.linalg.norm(v)

    scores = []
    for it in items:
        ys, xs = np.nonzero(np.asarray(it.mask) > 127)
        crop = it.image.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        scores.append((float(embed(crop) @ embed(it.reference)) + 1) / 2)
    return scores


def style_items() -> list[RewardItem]:
    """Two groups of three images sharing a reference (equal content, distinct objects) and a stranger."""
    out = []
    for g, text in enumerate(["Style", "书法"]):
        ref = render_scene(text, seed=g).reference
        for k in range(3):
            it = render_scene(text, seed=g * 3 + k, color=(30 + 60 * k, 20, 110))
            out.append(replace(it, id=f"g{g}-{k}", reference=ref.copy()))
    out.append(replace(render_scene("Other", seed=9), id="x", reference=noise((120, 60), 9)))
    return out


def test_style_scores_match_the_one_by_one_reference_and_the_cache_is_keyed_by_content(tiny_siglip):
    items = style_items()
    want = reference_style_scores(tiny_siglip, items)
    style = StyleScorer(tiny_siglip, threads=2)
    first = [r.score for r in style.score_batch(items)]
    assert first == pytest.approx(want, abs=1e-6)
    assert style.embedded == 7 + 3 - 1  # every crop and each distinct reference once (g0-0's crop is its reference)
    assert len(style.references) == 3
    # A later request with the same references (new objects, same pixels): only the crops are embedded.
    again = [replace(it, reference=it.reference.copy()) for it in reversed(items)]
    assert [r.score for r in style.score_batch(again)] == pytest.approx(want[::-1], abs=1e-6)
    assert style.embedded == 9 + 7 and style.references.hits == 3
    # One changed pixel is another reference: its own embedding and its own score.
    moved = items[0].reference.copy()
    moved.putpixel((0, 0), (255, 0, 255))
    other = replace(items[0], reference=moved)
    assert style.score_batch([other])[0].score == pytest.approx(reference_style_scores(tiny_siglip, [other])[0],
                                                                abs=1e-6)
    assert style.embedded == 16 + 2 and len(style.references) == 4
    style.close()


def test_reference_cache_is_bounded_and_evicts_the_least_recent(tiny_siglip):
    style = StyleScorer(tiny_siglip, reference_cache=2, threads=1)
    base = render_scene("Ab")
    refs = [noise((40, 20), s) for s in range(3)]
    for ref in refs:
        style.score_batch([replace(base, reference=ref)])
    assert len(style.references) == 2 and style.embedded == 6
    style.score_batch([replace(base, reference=refs[2].copy())])  # still cached: the crop alone
    assert style.embedded == 7
    style.score_batch([replace(base, reference=refs[0].copy())])  # evicted first: embedded again
    assert style.embedded == 9
    assert StyleScorer(tiny_siglip, reference_cache=0, threads=1).references.max_bytes == 0
    with pytest.raises(ValueError, match="reference_cache"):
        StyleScorer(tiny_siglip, reference_cache=-1)


def test_style_bad_items_fail_alone_next_to_cached_references(tiny_siglip):
    style = StyleScorer(tiny_siglip, threads=2)
    good = render_scene("Ok")
    empty = replace(good, id="e", mask=Image.new("L", good.image.size, 0))
    small = replace(good, id="s", mask=Image.new("L", (8, 8), 255))
    res = style.score_batch([empty, good, small, replace(good, id="g2")])
    assert res[0].error == "style: mask is empty" and res[2].error == "style: mask is 8x8 but image is 256x128"
    want = reference_style_scores(tiny_siglip, [good])[0]
    assert res[1].score == pytest.approx(want, abs=1e-6) and res[3].score == res[1].score
    style.close()


def reference_background(it: RewardItem) -> float:
    img, src = (np.asarray(x.convert("RGB"), dtype=np.float64) for x in (it.image, it.source))
    outside = ~(np.asarray(it.mask.convert("L")) > 127)
    return 1.0 - np.abs(img - src)[outside].mean() / 255.0


def test_background_matches_float64_and_shared_masks_and_sources_are_per_image_size():
    shared_mask = Image.new("L", (64, 48), 0)
    shared_mask.paste(255, (10, 10, 40, 30))
    shared_src = noise((64, 48), 1)
    good = [RewardItem(f"a{i}", noise((64, 48), 10 + i), "t", mask=shared_mask, source=shared_src) for i in range(3)]
    good.append(RewardItem("own", noise((64, 48), 20), "t", mask=shared_mask.copy(), source=noise((64, 48), 21)))
    tall_mask = Image.new("L", (30, 50), 0)
    tall_mask.paste(255, (0, 0, 30, 5))
    good.append(RewardItem("tall", noise((30, 50), 22), "t", mask=tall_mask, source=noise((30, 50), 23)))
    bad = [RewardItem("size", noise((32, 32), 30), "t", mask=shared_mask, source=noise((32, 32), 31)),
           RewardItem("src", noise((64, 48), 32), "t", mask=shared_mask, source=noise((32, 32), 33)),
           RewardItem("empty", noise((64, 48), 34), "t", mask=Image.new("L", (64, 48), 0), source=shared_src),
           RewardItem("full", noise((64, 48), 35), "t", mask=Image.new("L", (64, 48), 255), source=shared_src)]
    res = BackgroundScorer().score_batch([bad[0], *good[:2], bad[1], *good[2:], *bad[2:]])
    by_id = {it.id: r for it, r in zip([bad[0], *good[:2], bad[1], *good[2:], *bad[2:]], res)}
    for it in good:
        assert by_id[it.id].error is None
        assert by_id[it.id].score == pytest.approx(reference_background(it), abs=1e-9)
    assert by_id["size"].error == "background: mask is 64x48 but image is 32x32"
    assert by_id["src"].error == "background: source is 32x32 but image is 64x48"
    assert by_id["empty"].error == "background: mask is empty"
    assert by_id["full"].error == "background: mask covers the whole image; nothing to compare"
