"""Prompt-embedding cache on the tiny real text encoders: one encoder call per unique text, ever."""

from __future__ import annotations

import shutil

import pytest
import torch

from train.data.prompt_cache import (
    PromptCache, UncachedPromptError, encoder_identity, make_encode_fn, release_text_encoders,
)

MAX_LEN = 32
TEXTS = ["hello", "世界", "hello", "a much longer text with many words"]


def counting(fn):
    """Wrap the real encoder so the test counts its calls independently of the cache's own counter."""
    calls = []

    def wrapped(texts):
        calls.append(list(texts))
        return fn(texts)
    return wrapped, calls


def test_second_pass_makes_zero_encoder_calls(calligrapher, tiny_models, tmp_path):
    encode, calls = counting(make_encode_fn(calligrapher, MAX_LEN))
    cache = PromptCache(encode, encoder_identity(tiny_models["flux"], MAX_LEN), cache_dir=tmp_path)
    for start in (0, 2):  # first pass, batches of two
        embeds, pooled, text_ids = cache.get(TEXTS[start:start + 2])
        assert embeds.shape[:2] == (2, MAX_LEN) and pooled.shape[0] == 2 and text_ids.shape == (MAX_LEN, 3)
    assert calls == [["hello", "世界"], ["a much longer text with many words"]]
    assert cache.encoder_calls == 2 and cache.encoded_texts == 3
    for start in (0, 2):  # second pass
        cache.get(TEXTS[start:start + 2])
    assert len(calls) == 2 and cache.encoder_calls == 2 and cache.encoded_texts == 3


def test_batched_rows_equal_single_encoding(calligrapher):
    """Texts of different lengths share a batch: T5 pads to max_sequence_length, rows are independent."""
    cache = PromptCache(make_encode_fn(calligrapher, MAX_LEN), "tiny")
    embeds, pooled, _ = cache.get(["hi", "a much longer text with many words", "hi"])
    assert embeds.shape[0] == 3 and torch.equal(embeds[0], embeds[2])
    for row, text in ((0, "hi"), (1, "a much longer text with many words")):
        single_embeds, single_pooled, _ = calligrapher.encode_prompt([text], MAX_LEN)
        torch.testing.assert_close(embeds[row], single_embeds[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled[row], single_pooled[0], rtol=1e-5, atol=1e-5)
    assert cache.encoder_calls == 1 and cache.encoded_texts == 2


def test_disk_cache_serves_a_new_process_without_encoders(calligrapher, tmp_path):
    first = PromptCache(make_encode_fn(calligrapher, MAX_LEN), "enc-a", cache_dir=tmp_path)
    expected = first.get(TEXTS)
    files = sorted((tmp_path / "enc-a").iterdir())
    assert len(files) == 3 and all(f.suffix == ".pt" and not f.name.startswith(".tmp") for f in files)

    later = PromptCache(None, "enc-a", cache_dir=tmp_path)  # e.g. next run, encoders never loaded
    got = later.get(TEXTS)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert later.encoder_calls == 0 and later.disk_hits == 3
    with pytest.raises(UncachedPromptError, match="'never seen' is not cached"):
        later.get(["hello", "never seen"])
    other_encoder = PromptCache(None, "enc-b", cache_dir=tmp_path)  # keyed by encoder identity too
    with pytest.raises(UncachedPromptError, match="'hello' is not cached"):
        other_encoder.get(["hello"])


def test_text_encoders_can_be_freed_after_warm_up(calligrapher):
    cache = PromptCache(make_encode_fn(calligrapher, MAX_LEN), "tiny")
    cache.warm(TEXTS)
    release_text_encoders(calligrapher, "offload")  # T5 to CPU (a no-op move on this CPU machine)
    release_text_encoders(calligrapher, "free")
    assert calligrapher.pipe.text_encoder is None and calligrapher.pipe.text_encoder_2 is None
    cache.get(TEXTS)
    assert cache.encoder_calls == 1
    with pytest.raises(RuntimeError, match="text encoders were not loaded"):
        cache.get(["new text"])


def test_encoder_identity_tracks_length_files_and_extra(tiny_models, tmp_path):
    flux = tmp_path / "flux"
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_models["flux"] / sub, flux / sub)
    base = encoder_identity(flux, 32)
    assert base == encoder_identity(flux, 32) == encoder_identity(tiny_models["flux"], 32)
    assert encoder_identity(flux, 64) != base
    assert encoder_identity(flux, 32, extra="bf16") != base
    config = flux / "text_encoder_2" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert encoder_identity(flux, 32) != base
