"""Texts longer than the T5 prompt: one warning per record instead of the tokenizers' dumps.

FLUX reads at most ``max_sequence_length`` T5 tokens of ``The text is '{text}'.``; CLIP only
contributes a pooled vector from its first 77 tokens. For a longer text diffusers logs the whole
cut-off remainder on every encoder call (a 5,000-character text prints ~10 kB per call).
:func:`truncation_warning` says once which record is cut and where; :func:`quiet_truncation`
silences the per-call dumps while prompts are encoded.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from train.models.calligrapher import prompt_for

# Loggers that print the truncated remainder / the over-length notice on each call.
_NOISY_LOGGERS = ("diffusers.pipelines.flux.pipeline_flux_fill", "diffusers.pipelines.flux.pipeline_flux",
                  "transformers.tokenization_utils_base", "transformers.tokenization_utils_fast")
logger = logging.getLogger(__name__)


def prompt_tokens(text: str, tokenizer) -> int:
    """T5 tokens of the prompt for ``text`` (with the closing ``</s>``), counted without truncation."""
    return len(tokenizer(prompt_for(text), truncation=False, verbose=False).input_ids)


def truncation_warning(record: str, text: str, tokenizer, max_sequence_length: int) -> str | None:
    """A one-line warning when the prompt for ``text`` exceeds ``max_sequence_length`` T5 tokens, else None."""
    n = prompt_tokens(text, tokenizer)
    if n <= max_sequence_length:
        return None
    return (f"{record}: text of {len(text)} characters is {n} T5 tokens as a prompt; only the first "
            f"{max_sequence_length} are used (--max_sequence_length), the rest is ignored")


class TruncationNotes:
    """Warn once per record id and text about prompts that will be cut, through ``emit``
    (default: this module's logger)."""

    def __init__(self, tokenizer, max_sequence_length: int, emit=None):
        self.tokenizer, self.max_sequence_length = tokenizer, int(max_sequence_length)
        self.emit = emit or logger.warning
        self._seen: set[tuple[str, str]] = set()

    def check(self, record_id: str, text: str) -> None:
        if self.tokenizer is None or (record_id, text) in self._seen:
            return
        self._seen.add((record_id, text))
        message = truncation_warning(f"record {record_id!r}", text, self.tokenizer, self.max_sequence_length)
        if message:
            self.emit(message)


@contextmanager
def quiet_truncation():
    """Raise the per-call truncation loggers of diffusers / transformers to ERROR for the block."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
