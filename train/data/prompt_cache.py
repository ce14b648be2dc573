"""Prompt-embedding cache: T5/CLIP run once per unique text, ever (docs/ARCHITECTURE.md §4, §13).

Prompt embeddings are a pure function of (text, text encoders, template, max length), so they are
kept in memory and, optionally, on disk under ``cache_dir/<encoder id>/<hash of text>.pt``. Once
every training text is cached, T5 can be offloaded to the CPU or freed (:func:`release_text_encoders`).

``encoder_calls`` counts ``encode_fn`` invocations and ``encoded_texts`` the texts they encoded;
after a warm-up pass both stay constant (the benchmark target is zero calls per epoch).
"""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from train.models.calligrapher import PROMPT_TEMPLATE

ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_FULL_HASH_LIMIT = 4 << 20  # files up to 4 MiB (configs, tokenizers) are hashed whole
_EDGE = 1 << 20  # larger files (weights): size + first and last MiB, so start-up stays fast

EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class UncachedPromptError(LookupError):
    """A text was requested that is not cached, and no encoder is available."""


def _file_fingerprint(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))


def encoder_identity(model_path, max_sequence_length: int, extra: str = "") -> str:
    """Stable 16-hex-digit id of everything the embeddings depend on.

    Covers the prompt template, ``max_sequence_length``, ``extra`` (pass e.g. the dtype) and the
    files under ``text_encoder*/`` and ``tokenizer*/`` of a diffusers folder (configs and tokenizers
    hashed whole; weight files by size and their first and last MiB). A path that is not a local
    folder is hashed as a string.
    """
    h = hashlib.sha256(b"prompt-cache-v1\0")
    h.update(f"{PROMPT_TEMPLATE}\0{int(max_sequence_length)}\0{extra}\0".encode())
    root = Path(model_path)
    if not root.is_dir():
        h.update(f"path:{model_path}".encode())
        return h.hexdigest()[:16]
    for sub in ENCODER_FOLDERS:
        folder = root / sub
        if not folder.is_dir():
            h.update(f"{sub}:absent\0".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(n for n in filenames if not n.startswith(".")):
                path = Path(dirpath) / name
                h.update(f"{path.relative_to(root).as_posix()}\0".encode())
                _file_fingerprint(h, path)
    return h.hexdigest()[:16]


class PromptCache:
    """text -> (T5 embeds ``[T, D]``, CLIP pooled ``[P]``, text ids ``[T, 3]``), memory + optional disk.

    ``encode_fn(texts) -> (embeds [B, T, D], pooled [B, P], text_ids [T, 3])``, e.g.
    ``lambda t: model.encode_prompt(t, max_sequence_length)``; ``None`` when the encoders are gone
    (then every requested text must already be cached). Entries are stored on the CPU in the
    encoder's dtype; move the results to the device yourself.
    """

    def __init__(self, encode_fn: EncodeFn | None, encoder_id: str, cache_dir: Path | None = None,
                 batch_size: int = 32):
        self.encode_fn, self.encoder_id, self.batch_size = encode_fn, encoder_id, batch_size
        self.dir = Path(cache_dir) / encoder_id if cache_dir is not None else None
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.encoder_calls = 0
        self.encoded_texts = 0
        self.disk_hits = 0

    def __len__(self) -> int:
        return len(self.memory)

    def __contains__(self, text: str) -> bool:
        return text in self.memory or (self.dir is not None and self._path(text).is_file())

    def stats(self) -> dict[str, int]:
        return {"encoder_calls": self.encoder_calls, "encoded_texts": self.encoded_texts,
                "disk_hits": self.disk_hits, "cached_texts": len(self.memory)}

    # ------------------------------------------------------------------ disk
    def _path(self, text: str) -> Path:
        key = hashlib.sha256(f"{self.encoder_id}\0{text}".encode("utf-8")).hexdigest()[:40]
        return self.dir / f"{key}.pt"

    def _load(self, text: str):
        path = self._path(text)
        if not path.is_file():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file is re-encoded and overwritten
            warnings.warn(f"prompt cache: unreadable entry {path} ({e}); encoding again")
            return None
        if d.get("text") != text or d.get("encoder_id") != self.encoder_id:
            return None
        return d["embeds"], d["pooled"], d["text_ids"]

    def _save(self, text: str, entry) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        embeds, pooled, text_ids = entry
        payload = {"text": text, "encoder_id": self.encoder_id, "embeds": embeds, "pooled": pooled,
                   "text_ids": text_ids}
        # temp file + rename: readers (other ranks, a crash) never see a half-written entry
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, self._path(text))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ lookup
    def warm(self, texts) -> int:
        """Make every text available (memory, then disk, then the encoder); returns how many were encoded."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
        to_encode = []
        for text in missing:
            entry = self._load(text) if self.dir is not None else None
            if entry is None:
                to_encode.append(text)
            else:
                self.memory[text] = entry
                self.disk_hits += 1
        if to_encode and self.encode_fn is None:
            raise UncachedPromptError(
                f"prompt embedding for {to_encode[0]!r} is not cached (encoder {self.encoder_id}"
                f"{', ' + str(self.dir) if self.dir else ''}) and no text encoder is available"
                + (f"; {len(to_encode) - 1} more text(s) missing" if len(to_encode) > 1 else ""))
        if not to_encode:
            return 0
        for i in range(0, len(to_encode), self.batch_size):
            self._encode(to_encode[i:i + self.batch_size])
        return len(to_encode)

    def _encode(self, chunk: list[str]) -> None:
        embeds, pooled, text_ids = self.encode_fn(chunk)
        self.encoder_calls += 1
        self.encoded_texts += len(chunk)
        text_ids = text_ids.detach().cpu().clone()
        for j, text in enumerate(chunk):
            # clone: saving a view would write the whole batch's storage into every file
            entry = (embeds[j].detach().cpu().clone(), pooled[j].detach().cpu().clone(), text_ids)
            self.memory[text] = entry
            if self.dir is not None:
                self._save(text, entry)

    def get(self, texts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts (list, or one string) -> (embeds ``[B, T, D]``, pooled ``[B, P]``, text ids ``[T, 3]``), in order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        self.warm(texts)
        entries = [self.memory[t] for t in texts]
        shapes = {tuple(e[0].shape) for e in entries}
        if len(shapes) > 1:
            raise ValueError(f"cached embeddings have different shapes {sorted(shapes)}: "
                             "one encoder id must mean one max_sequence_length")
        return (torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries]), entries[0][2])


# ---------------------------------------------------------------------- text encoders around the cache
def make_encode_fn(model, max_sequence_length: int) -> EncodeFn:
    """``encode_fn`` for a :class:`~train.models.calligrapher.Calligrapher`.

    The encoders run where they live: after :func:`release_text_encoders` (``"offload"``) or with
    ``text_encoder_device="cpu"`` that is the CPU, so cache misses never need accelerator memory.
    """
    def encode(texts: list[str]):
        return model.encode_prompt(texts, max_sequence_length)
    return encode


def release_text_encoders(model, mode: str = "offload") -> None:
    """After warming the cache: ``"offload"`` moves T5 to the CPU; ``"free"`` drops CLIP and T5."""
    pipe = model.pipe
    if mode == "offload":
        if pipe.text_encoder_2 is not None:
            pipe.text_encoder_2.to("cpu")
    elif mode == "free":
        pipe.text_encoder = None
        pipe.text_encoder_2 = None
    else:
        raise ValueError(f"mode must be 'offload' or 'free', got {mode!r}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
