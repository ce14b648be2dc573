"""The style reward sees a reference exactly as the model's SigLIP input sees it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from train.data.preprocess import STYLE_SIZE, prepare_inputs, style_image
from train.rewards.style import StyleScorer, style_pixels


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_reward_pixels_and_embeddings_equal_the_models(calligrapher, tiny_models):
    scorer = StyleScorer(tiny_models["siglip"])
    images = [_noise(50, 17, 0), _noise(13, 40, 1), _noise(300, 300, 2)]
    processor = calligrapher.siglip_processor
    expected = processor(images=[style_image(im) for im in images], return_tensors="pt").pixel_values
    ours = torch.from_numpy(np.stack([style_pixels(im, scorer.size) for im in images])).float()
    ours = ours.mul(scorer._scale).add(scorer._shift).permute(0, 3, 1, 2)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    model_emb = torch.nn.functional.normalize(calligrapher.encode_style([style_image(im) for im in images]), dim=-1)
    torch.testing.assert_close(scorer.embed(images), model_emb.float(), atol=1e-5, rtol=0)


def test_prepared_style_image_is_the_shared_helper():
    ref = _noise(40, 10, 3)
    mask = Image.new("L", (32, 32))
    mask.paste(255, (2, 2, 20, 20))
    sample = prepare_inputs(_noise(32, 32, 4), mask, "x", ref=ref, resolution=32)
    assert sample.style_image.size == (STYLE_SIZE, STYLE_SIZE)
    assert np.array_equal(np.asarray(sample.style_image), np.asarray(style_image(ref)))
    # official resize_img_and_pad: 40x10 -> scale 12.8 -> 512x128, pasted at row (512 - 128) // 2 = 192
    arr = np.asarray(sample.style_image)
    assert (arr[:192] == 0).all() and (arr[320:] == 0).all()
    assert np.array_equal(arr[192:320], np.asarray(ref.resize((512, 128), Image.BILINEAR)))
