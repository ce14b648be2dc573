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


def _encoders(tiny_models, dest):
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_models["flux"] / sub, dest / sub)
    return dest


def test_every_encoder_folder_and_every_file_name_counts_but_hidden_entries_do_not(tiny_models, tmp_path):
    flux = _encoders(tiny_models, tmp_path / "flux")
    base = encoder_identity(flux, 32)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        first = sorted((flux / sub).iterdir())[0]
        content = first.read_bytes()
        first.write_bytes(content + b" ")
        assert encoder_identity(flux, 32) != base, sub
        first.write_bytes(content)
    assert encoder_identity(flux, 32) == base
    (flux / "tokenizer" / "a_notes.txt").write_text("x")
    with_notes = encoder_identity(flux, 32)
    (flux / "tokenizer" / "a_notes.txt").rename(flux / "tokenizer" / "b_notes.txt")  # same place in the order
    assert encoder_identity(flux, 32) not in (with_notes, base)
    (flux / "tokenizer" / "b_notes.txt").unlink()
    (flux / "text_encoder" / ".cache" / "huggingface").mkdir(parents=True)  # download metadata, lock files
    (flux / "text_encoder" / ".cache" / "huggingface" / "model.lock").write_text("1")
    (flux / "tokenizer_2" / ".gitattributes").write_text("*.bin filter=lfs")
    assert encoder_identity(flux, 32) == base


def test_large_weight_files_count_by_size_and_both_edges(tiny_models, tmp_path):
    flux = _encoders(tiny_models, tmp_path / "flux")
    weights = flux / "text_encoder_2" / "weights.bin"
    mib = 1 << 20

    def identity_with(data: bytes) -> str:
        weights.write_bytes(data)
        return encoder_identity(flux, 32)

    zeros = identity_with(bytes(5 * mib))
    assert identity_with(bytes(6 * mib)) != zeros  # same first and last MiB, another size
    for at in (10, 5 * mib - 10):  # a byte inside the first MiB, then inside the last
        changed = bytearray(5 * mib)
        changed[at] = 1
        assert identity_with(bytes(changed)) != zeros, at
    four = identity_with(bytes(4 * mib))  # up to 4 MiB a file is hashed whole
    changed = bytearray(4 * mib)
    changed[2 * mib] = 1
    assert identity_with(bytes(changed)) != four


def test_the_template_and_a_hub_name_count(monkeypatch):
    from train.data import prompt_cache

    name = "black-forest-labs/FLUX.1-Fill-dev"  # not a local folder: the name stands for the files
    base = encoder_identity(name, 512)
    assert base == encoder_identity(name, 512) != encoder_identity("someone/FLUX.1-Fill-finetune", 512)
    monkeypatch.setattr(prompt_cache, "PROMPT_TEMPLATE", prompt_cache.PROMPT_TEMPLATE + " ")
    assert encoder_identity(name, 512) != base


def test_each_entry_is_one_row_in_batches_and_an_entry_of_another_text_is_not_served(calligrapher, tmp_path):
    encode, calls = counting(make_encode_fn(calligrapher, MAX_LEN))
    cache = PromptCache(encode, "enc", cache_dir=tmp_path, batch_size=2)
    embeds, pooled, _ = cache.get(["a", "b", "c"])
    assert calls == [["a", "b"], ["c"]]
    entry = torch.load(cache._path("a"), weights_only=True)
    assert entry["embeds"].untyped_storage().nbytes() == embeds[0].nbytes  # one row, not the whole batch
    assert entry["pooled"].untyped_storage().nbytes() == pooled[0].nbytes
    shutil.copyfile(cache._path("a"), cache._path("d"))  # a file under another text's name
    fresh = PromptCache(encode, "enc", cache_dir=tmp_path)
    got = fresh.get(["d"])[0]
    assert calls[-1] == ["d"] and fresh.disk_hits == 0
    assert torch.equal(got[0], calligrapher.encode_prompt(["d"], MAX_LEN)[0][0])
