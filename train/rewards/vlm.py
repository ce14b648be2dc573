"""VLM judge: a vision-language model behind an OpenAI-compatible chat endpoint (docs/ARCHITECTURE.md §10).

Works with any server speaking ``POST /v1/chat/completions`` with image parts as base64
data URLs (vLLM, SGLang, ... serving e.g. Qwen2.5-VL). Items are sent concurrently; the
inference server batches them. A reply whose score cannot be parsed is an error for that
item, never a score.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

from train.data.image_modes import to_rgb

from .base import ItemScore, RewardItem, Scorer, mask_region
from .codec import encode_png_b64

RUBRIC = (
    "You are a strict judge of text rendering in images. The task was to write the text "
    "\"{text}\" inside a region of a photo, in the lettering style of a reference image.\n"
    "Image 1 is the result{crop_note}{ref_note}.\n"
    "Rate the result from 0 to 10:\n"
    "- 10: the region reads exactly \"{text}\", the lettering matches the reference style, and it "
    "blends naturally with the surrounding image.\n"
    "- 5: the text is mostly right (a character wrong or missing) or the style clearly differs.\n"
    "- 0: the text is unreadable, wrong or missing.\n"
    "Text correctness matters most, then style, then blending.\n"
    "Answer with JSON only: {{\"score\": <integer 0-10>, \"reason\": \"<one short sentence>\"}}"
)

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_NUM = r"([-+]?\d+(?:\.\d+)?)"
_DENOM = r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
_LABELLED = re.compile(r"\b(?:score|rating)\b[\"']?\s*[:=]?\s*\**\s*" + _NUM + _DENOM, re.I)
_BARE = re.compile(r"^\s*" + _NUM + _DENOM + r"\s*\.?\s*$")


def _scaled(value: str | float | int, denom: str | None = None) -> float:
    raw = str(value).strip()
    v = float(raw)
    if denom is not None:
        scale = float(denom)
        if scale not in (1.0, 10.0, 100.0):
            raise ValueError(f"unsupported score scale /{denom}")
    elif v <= 1.0 and "." in raw:  # "0.8": the 0-1 scale; integers are read on the 0-10 scale asked for
        scale = 1.0
    else:
        scale = 10.0
    if not 0.0 <= v <= scale:
        raise ValueError(f"score {raw} is outside 0-{scale:g}")
    return v / scale


def parse_judge_score(content: str) -> float:
    """Judge reply -> score in [0, 1]; ``ValueError`` when there is no single clear score.

    Accepts JSON (``{"score": 8}``, possibly fenced or surrounded by prose), ``Score: 8/10``,
    ``rating = 0.8`` or a bare number. Integers without a denominator are on the 0-10 scale;
    decimals <= 1 without one are on the 0-1 scale.
    """
    if not isinstance(content, str) or not content.strip():
        raise ValueError("empty judge reply")
    text = _THINK.sub("", content).strip()
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text] + _OBJECT.findall(text)
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            for key in obj:
                if key.lower() in ("score", "rating"):
                    val = obj[key]
                    if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                        raise ValueError(f"judge score is not a number: {val!r}")
                    if isinstance(val, str):
                        m = _BARE.match(val)
                        if not m:
                            raise ValueError(f"judge score is not a number: {val!r}")
                        return _scaled(m.group(1), m.group(2))
                    return _scaled(repr(val))
    found = {(m.group(1), m.group(2)) for m in _LABELLED.finditer(text)}
    if len(found) == 1:
        return _scaled(*found.pop())
    if len(found) > 1:
        raise ValueError(f"judge reply has several different scores: {sorted(found)}")
    m = _BARE.match(text)
    if m:
        return _scaled(m.group(1), m.group(2))
    raise ValueError(f"no score found in judge reply: {content[:200]!r}")


def chat_completions_url(url: str) -> str:
    """Accept a server root, a ``/v1`` base or the full endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _data_url(image, max_side: int) -> str:
    image = to_rgb(image)
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    return "data:image/png;base64," + encode_png_b64(image)


class VLMScorer(Scorer):
    """Ask a judge model for a 0-10 rating of each item; score = rating / 10.

    Args:
        url: server root, ``.../v1`` or the full ``/v1/chat/completions`` URL.
        model: model name the server serves (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``).
        api_key: sent as ``Authorization: Bearer``; many local servers need none.
        timeout: seconds per request; retries: extra attempts on connection errors / 5xx.
    """

    name = "vlm"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 1, backoff: float = 0.5, max_workers: int = 16, max_side: int = 768,
                 max_tokens: int = 256):
        import httpx

        self.url, self.model = chat_completions_url(url), model
        self.retries, self.backoff, self.max_side, self.max_tokens = retries, backoff, max_side, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vlm")

    @property
    def identity(self) -> str:
        return f"{self.model} (max_side={self.max_side}, max_tokens={self.max_tokens})"

    def request_body(self, item: RewardItem) -> dict:
        """The chat-completions payload for one item (also useful to inspect the prompt)."""
        images = [item.image]
        crop_note = ref_note = ""
        if item.mask is not None:
            _, box = mask_region(item)
            images.append(item.image.crop(box))
            crop_note = f"; image {len(images)} is a close-up of the edited region"
        if item.reference is not None:
            images.append(item.reference)
            ref_note = f"; image {len(images)} is the style reference"
        prompt = RUBRIC.format(text=item.text, crop_note=crop_note, ref_note=ref_note)
        content = [{"type": "image_url", "image_url": {"url": _data_url(im, self.max_side)}} for im in images]
        content.append({"type": "text", "text": prompt})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0.0, "max_tokens": self.max_tokens}

    def _post(self, body: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._client.post(self.url, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                return resp.json()
            except ValueError:
                raise RuntimeError(f"judge returned invalid JSON: {resp.text[:200]!r}") from None
        raise RuntimeError(f"judge unreachable after {self.retries + 1} attempts: {last}")

    def _one(self, item: RewardItem) -> ItemScore:
        try:
            reply = self._post(self.request_body(item))
            content = reply["choices"][0]["message"]["content"]
            if isinstance(content, list):  # some servers return content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        except (KeyError, IndexError, TypeError) as exc:
            return ItemScore.fail(f"vlm: unexpected response shape ({type(exc).__name__}: {exc})")
        except (RuntimeError, ValueError) as exc:
            return ItemScore.fail(f"vlm: {exc}")
        try:
            return ItemScore.ok(parse_judge_score(content), reply=str(content)[:500])
        except ValueError as exc:
            return ItemScore.fail(f"vlm: {exc}", reply=str(content)[:500])

    def _score_batch(self, items: list[RewardItem]) -> list[ItemScore]:
        return list(self._pool.map(self._one, items))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()
