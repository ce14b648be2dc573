"""The reward service's wire format (docs/ARCHITECTURE.md §10), shared by ``train.reward_server`` and the client
``train.rl_ip.reward``: request and reply models, field names and limits, in one place.

    POST /score  {"items": [{"id", "image", "text", "mask"?, "reference"?, "source"?}], "weights"?: {...}}
             ->  {"results": [{"id", "reward", "scores", "details", "error"}]}

Images are base64 PNG strings. A score is a real number in [0, 1]: booleans, strings, NaN and
values outside the range are rejected, never coerced.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .base import API_VERSION, one_line  # noqa: F401 - the protocol version belongs to the wire format

if TYPE_CHECKING:
    from .base import RewardItem, RewardResult

IMAGE_FIELDS = ("image", "mask", "reference", "source")
OPTIONAL_IMAGE_FIELDS = IMAGE_FIELDS[1:]
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 1000

# Server defaults (each is a flag of train.reward_server).
DEFAULT_MAX_ITEMS = 256
DEFAULT_MAX_PIXELS = 4096 * 4096  # one image
DEFAULT_MAX_REQUEST_PIXELS = 4 * DEFAULT_MAX_PIXELS  # all images one request (or one merged batch) decodes
DEFAULT_MAX_BODY_MB = 256.0

# strict: no bool -> 1.0, no "0.5" -> 0.5.
Score = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ItemIn(BaseModel):
    """One item of a ``POST /score`` request."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    image: str
    text: str = Field(max_length=MAX_TEXT_CHARS)
    mask: str | None = None
    reference: str | None = None
    source: str | None = None


class ScoreRequest(BaseModel):
    """``POST /score`` body. Without ``weights`` every loaded scorer runs and ``reward`` is their mean."""

    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn]
    weights: dict[str, Number] | None = None


class ItemResult(BaseModel):
    """One item of the reply; ``reward`` is null exactly when ``error`` is set."""

    id: str
    reward: Number | None
    scores: dict[str, Score] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class ScoreResponse(BaseModel):
    results: list[ItemResult]


class Health(BaseModel):
    """``GET /health`` reply. ``version`` is the protocol (``API_VERSION``); ``models`` maps each scorer
    to its ``Scorer.identity``."""

    status: str
    scorers: list[str]
    version: str
    models: dict[str, str]
    device: str
    max_items: int
    max_pixels: int
    max_request_pixels: int
    max_body_bytes: int


def item_json(item: "RewardItem", fields=OPTIONAL_IMAGE_FIELDS, encode_shared=None) -> dict:
    """A ``RewardItem`` as a request item, with the optional images in ``fields`` that it has.

    ``encode_shared`` (default ``encode_png_b64``) encodes those optional images, which items share
    (e.g. ``EncodeCache.encode``); the generated image is always encoded afresh.
    """
    from .codec import encode_png_b64

    encode_shared = encode_shared or encode_png_b64
    out = {"id": item.id, "text": item.text, "image": encode_png_b64(item.image)}
    for f in fields:
        if getattr(item, f) is not None:
            out[f] = encode_shared(getattr(item, f))
    return out


def _finite(value):
    """JSON-safe copy of a details value: non-finite floats become ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def result_json(result: "RewardResult") -> dict:
    """A ``RewardResult`` as a reply item (the field names of ``ItemResult``)."""
    out = {f: getattr(result, f) for f in ItemResult.model_fields}
    out["details"] = _finite(out["details"])
    return out


def short_errors(exc: ValidationError, limit: int = 3) -> str:
    """``items.0.image: Field required; ...``: the first ``limit`` problems on one line."""
    errs = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errs[:limit]]
    if len(errs) > limit:
        parts.append(f"... {len(errs) - limit} more")
    return one_line("; ".join(parts))
