"""Per-sample encoder caches (``train/sample_cache.py``, ``--latent_cache``): each sample's VAE latents are
computed once, alone, keyed by content, and training with the cache equals training without it."""

from __future__ import annotations

import os

import pytest
import torch

from train import trainer as trainer_module
from train.config import parse_args
from train.data.preprocess import collate_samples
from train.data.synthesize import synthesize
from train.plan import canvas
from train.sample_cache import EncoderCache, available_host_bytes, content_key, latent_bytes_per_sample
from train.tests.train_helpers import tiny_train_args
from train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cache-data"), num=4, resolution=64, seed=6)


def _encoded_samples(model) -> list[int]:
    """Batch sizes of every VAE encoder forward, recorded by a forward hook on the real module."""
    sizes = []
    model.vae.encoder.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes


def _trained(tiny_models, data, out, cache: str, steps: int = 6):
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, out, steps, train_batch_size=2,
                                                 latent_cache=cache, checkpointing_steps=1000,
                                                 logging_steps=1)))
    trainer.setup()
    sizes = _encoded_samples(trainer.model)
    trainer.run()
    return trainer, sizes


@pytest.mark.slow
def test_each_sample_is_encoded_once_alone_and_training_equals_the_uncached_run(tiny_models, data, tmp_path):
    """Three epochs of 4 samples in batches of 2: the cache encodes each sample's source and masked source
    once, one at a time; without it both are encoded for every micro-batch. The adapters agree."""
    cached, sizes_cached = _trained(tiny_models, data, tmp_path / "host", "host")
    plain, sizes_plain = _trained(tiny_models, data, tmp_path / "off", "off")
    assert sizes_cached == [1] * 8  # 4 samples x (source, masked source), all in the first epoch
    assert sizes_plain == [2] * 12  # 6 micro-batches x 2 encodes of the whole batch
    assert len(cached.encoders.clean) == len(cached.encoders.masked) == 4
    assert not plain.encoders.clean and not plain.encoders.masked
    # batched and single encodes round differently in the last bits only (Adam then amplifies that in
    # coordinates whose gradient is ~0, so the weights are compared through the losses they give)
    got = [m["train/loss"] for _, m in cached.history]
    want = [m["train/loss"] for _, m in plain.history]
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-4, abs=0)
    # the bytes the planner prints per sample are what the cache holds (a fixed strip: every canvas is the tallest)
    per_sample = latent_bytes_per_sample(*canvas(cached.cfg), cached.model.vae.config, cached.model.dtype.itemsize)
    assert cached.encoders.host_bytes() == 4 * per_sample
    assert all(t.device.type == "cpu" for t in cached.encoders.clean.values())


def test_cached_latents_are_the_fresh_encodes_keyed_by_content(calligrapher, data, tmp_path):
    """Samples with equal ids but different pixels (a held-out set reusing ids) get their own latents."""
    from train.data.dataset import CalligraphyDataset, load_records

    dataset = CalligraphyDataset(load_records(data, resolution=64), resolution=64, strip_height=16)
    a, b = collate_samples([dataset[0], dataset[1]]), collate_samples([dataset[2], dataset[3]])
    b.ids[:] = a.ids
    cache = EncoderCache(calligrapher)
    for batch in (a, b, a):
        clean = cache.clean_latents(batch.image)
        masked = cache.masked_latents(batch.image, batch.mask)
        for i in range(2):
            fresh = calligrapher.encode_latents(batch.image[i:i + 1])[0]
            assert torch.equal(clean[i], fresh)
            fresh = calligrapher.masked_image_latents(batch.image[i:i + 1], batch.mask[i:i + 1])[0]
            assert torch.equal(masked[i], fresh)
    assert len(cache.clean) == len(cache.masked) == 4
    # a different mask over the same source is another masked-source entry, the same source entry
    other = a.mask.flip(-1)
    cache.masked_latents(a.image, other)
    assert len(cache.masked) == 6 and len(cache.clean) == 4
    off = EncoderCache(calligrapher, latents=False)
    assert off.masked_latents(a.image, a.mask) is None
    assert torch.equal(off.clean_latents(a.image), calligrapher.encode_latents(a.image))


def test_conditioning_from_cached_masked_latents_equals_the_encoded_one(calligrapher, data):
    from train.data.dataset import CalligraphyDataset, load_records

    dataset = CalligraphyDataset(load_records(data, resolution=64), resolution=64, strip_height=16)
    batch = collate_samples([dataset[0]])
    embeds = torch.randn(1, 32, calligrapher.transformer.config.joint_attention_dim)
    pooled = torch.randn(1, calligrapher.transformer.config.pooled_projection_dim)
    ids, style = torch.zeros(32, 3), torch.randn(1, calligrapher.siglip.config.hidden_size)
    plain = calligrapher.prepare_condition(batch.image, batch.mask, embeds, pooled, ids, style, 30.0)
    raw = calligrapher.masked_image_latents(batch.image, batch.mask)
    cached = calligrapher.prepare_condition(batch.image, batch.mask, embeds, pooled, ids, style, 30.0,
                                            masked_latents=raw)
    assert torch.equal(plain.cond_latents, cached.cond_latents)
    shifted = calligrapher.prepare_condition(batch.image, batch.mask, embeds, pooled, ids, style, 30.0,
                                             masked_latents=raw + 1)  # the given latents are the ones used
    assert not torch.allclose(shifted.cond_latents, plain.cond_latents)
    with pytest.raises(ValueError, match="posterior"):
        calligrapher.prepare_condition(batch.image, batch.mask, embeds, pooled, ids, style, 30.0,
                                       generator=torch.Generator().manual_seed(0), masked_latents=raw)


def test_the_cache_turns_itself_off_when_host_memory_is_short(tiny_models, data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "available_host_bytes", lambda: 4096)
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, tmp_path / "run", 1)))
    trainer.setup()
    assert not trainer.encoders.latents_on
    trainer.run()
    log = (tmp_path / "run" / "train_log.txt").read_text()
    assert "--latent_cache host needs up to" in log and "encoded every step instead" in log
    monkeypatch.setattr(trainer_module, "available_host_bytes", lambda: 2**40)
    trainer = Trainer(parse_args(tiny_train_args(tiny_models, data, tmp_path / "again", 1)))
    trainer.setup()
    assert trainer.encoders.latents_on


def test_content_key_covers_shape_dtype_and_every_byte():
    t = torch.arange(12, dtype=torch.int16).view(3, 4)
    bumped = t.clone()
    bumped[2, 3] += 1
    keys = [content_key(t), content_key(t.view(4, 3)), content_key(t.view(torch.float16)), content_key(bumped),
            content_key(t, t.view(4, 3))]
    assert len(set(keys)) == 5
    assert content_key(t.clone()) == keys[0]
    assert content_key(t.t()) == content_key(t.t().contiguous())  # a strided view is keyed by its values


def test_style_embeddings_are_encoded_once_per_distinct_image(calligrapher):
    """Keyed by mode, size and pixels: the same bytes laid out as another size are another image."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    raw = [bytes(torch.randint(0, 256, (32 * 32 * 3,), generator=g, dtype=torch.uint8).tolist()) for _ in range(2)]
    a, b = (Image.frombytes("RGB", (32, 32), r) for r in raw)
    wide = Image.frombytes("RGB", (16, 64), raw[0])
    calls = []
    calligrapher.siglip.register_forward_hook(lambda module, args, out: calls.append(1))
    cache = EncoderCache(calligrapher)
    got = cache.style([a, b, a, wide])
    assert len(calls) == 3 and len(cache.styles) == 3
    again = cache.style([wide, b])
    assert len(calls) == 3
    fresh = {name: calligrapher.encode_style([image])[0] for name, image in (("a", a), ("b", b), ("wide", wide))}
    assert not torch.allclose(fresh["a"], fresh["wide"])
    for out, names in ((got, ["a", "b", "a", "wide"]), (again, ["wide", "b"])):
        assert torch.equal(out, torch.stack([fresh[n] for n in names]))


def test_latent_bytes_per_sample_by_hand():
    # FLUX's VAE: 4 blocks (downsampling 8), 16 channels. 512 px wide, 512 + 128 px strip tall, bf16:
    # 2 encodes x 16 x (640 / 8) x (512 / 8) x 2 bytes = 320 KiB.
    flux_vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}
    assert latent_bytes_per_sample(640, 512, flux_vae, 2) == 320 * 1024
    assert latent_bytes_per_sample(512, 1024, {"block_out_channels": [8, 8], "latent_channels": 4}, 4) == \
        2 * 4 * 256 * 512 * 4


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo")
def test_available_host_bytes_is_memavailable_in_bytes():
    kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert available_host_bytes() == pytest.approx(kib * 1024, rel=0.05)
