"""HTTP reward server (SPEC §10): batched scoring of generated images, JSON only.

    python -m train.reward_server --host 127.0.0.1 --port 8000 --scorers ocr,style,background \\
        --siglip_path /models/siglip-so400m-patch14-384 [--token SECRET]

``GET /health`` -> ``{"status": "ok", "scorers": [...], "version": ..., "device": ..., "max_items": ..., "max_pixels": ...}``

``POST /score`` takes ``{"items": [{"id", "image", "text", "mask"?, "reference"?, "source"?}], "weights"?: {...}}``
(images as base64 PNG; masks white where text goes) and returns
``{"results": [{"id", "reward", "scores", "details", "error"}]}`` in request order.
With ``weights`` only the named scorers run and ``reward`` is their weighted sum; without,
every loaded scorer runs and ``reward`` is their mean. An item that cannot be scored (corrupt
image, a scorer error) has ``reward: null`` and an ``error``; other items are unaffected.
Limits: more than ``max_items`` items, an image above ``max_pixels`` or a body above
``max_body_mb`` -> 413; malformed JSON or a schema violation -> 422; wrong token -> 401.

Requests are parsed on the event loop (image sizes read from PNG headers); one worker thread
decodes and scores, grouping concurrent requests into a single call per scorer. Decoding there
rather than in a thread pool keeps threads from fighting over the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.rewards.base import (API_VERSION, SCORER_NAMES, ItemScore, RewardItem, RewardResult, Scorer, combine_item,
                                parse_reward_weights)
from train.rewards.codec import ImageDecodeError, ImageTooLargeError, decode_png_b64, png_size_b64

IMAGE_FIELDS = ("image", "mask", "reference", "source")


@dataclass
class _Job:
    raw_items: list[dict]  # JSON items as received
    weights: dict[str, float]
    future: Future
    items: list | None = None  # RewardItem, or RewardResult for an item that failed to decode


class Batcher:
    """Worker thread that merges jobs from concurrent requests into one scorer call each.

    After taking a job it also takes every job already queued, and waits up to ``window_s``
    for more only while other requests are still being parsed, so a lone request is never delayed.
    """

    def __init__(self, scorers: dict[str, Scorer], max_batch_items: int = 256, window_s: float = 0.005,
                 max_pixels: int | None = None):
        self.scorers, self.max_batch_items, self.window_s = scorers, max_batch_items, window_s
        self.max_pixels = max_pixels
        self._queue: queue.Queue = queue.Queue()
        self._incoming = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0  # scorer rounds run, for tests and logs

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def arriving(self, delta: int) -> None:
        with self._lock:
            self._incoming += delta

    def submit(self, raw_items: list[dict], weights: dict[str, float]) -> Future:
        fut: Future = Future()
        self._queue.put(_Job(raw_items, weights, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.raw_items)
            deadline = time.monotonic() + self.window_s
            while n < self.max_batch_items:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if self._incoming <= 0 or left <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if nxt is None:
                    self._queue.put(None)  # stop after this round
                    break
                jobs.append(nxt)
                n += len(nxt.raw_items)
            self._process(jobs)

    def _process(self, jobs: list[_Job]) -> None:
        try:
            for job in jobs:
                job.items = _decode_items(job.raw_items, self.max_pixels)
            verdicts: dict[tuple[int, int], dict[str, ItemScore]] = {}
            for name, scorer in self.scorers.items():
                keys = [(j, i) for j, job in enumerate(jobs) if name in job.weights
                        for i, it in enumerate(job.items) if isinstance(it, RewardItem)]
                if not keys:
                    continue
                for key, v in zip(keys, scorer.score_batch([jobs[j].items[i] for j, i in keys])):
                    verdicts.setdefault(key, {})[name] = v
            self.batches += 1
            for j, job in enumerate(jobs):
                job.future.set_result([
                    it if isinstance(it, RewardResult) else combine_item(it.id, verdicts.get((j, i), {}), job.weights)
                    for i, it in enumerate(job.items)])
        except Exception as exc:  # noqa: BLE001 - a scorer bug fails these requests (HTTP 500), not the server
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)


def _decode_items(raw_items: list[dict], max_pixels: int | None) -> list:
    """JSON items -> RewardItem, or RewardResult(error) for an item with an unreadable image."""
    out = []
    for raw in raw_items:
        try:
            images = {f: decode_png_b64(raw[f], max_pixels) if raw.get(f) is not None else None for f in IMAGE_FIELDS}
        except (ImageDecodeError, ImageTooLargeError) as exc:
            out.append(RewardResult(raw["id"], None, {}, {}, f"bad image: {exc}"))
            continue
        out.append(RewardItem(id=raw["id"], text=raw["text"], **images))
    return out


def create_app(scorers: dict[str, Scorer], token: str | None = None, max_items: int = 256,
               max_pixels: int = 4096 * 4096, max_body_mb: float = 256.0, batch_window_ms: float = 5.0,
               max_batch_items: int | None = None, device: str | None = None):
    """The FastAPI app; see the module docstring for the protocol."""

    class ItemIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str = Field(min_length=1, max_length=256)
        image: str
        text: str = Field(max_length=1000)
        mask: str | None = None
        reference: str | None = None
        source: str | None = None

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[ItemIn]
        weights: dict[str, float] | None = None

    if not scorers:
        raise ValueError("the reward server needs at least one scorer")
    device = device or next((s.device for s in scorers.values() if s.device != "cpu"), "cpu")
    batcher = Batcher(scorers, max_batch_items or max(max_items, 1), batch_window_ms / 1000.0, max_pixels)
    max_body = int(max_body_mb * 1024 * 1024)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="Calligrapher reward server", version=API_VERSION, lifespan=lifespan)
    app.state.batcher = batcher

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer <token>')")

    @app.get("/health")
    def health(request: Request):
        check_token(request)
        return {"status": "ok", "scorers": list(scorers), "version": API_VERSION, "device": device,
                "max_items": max_items, "max_pixels": max_pixels}

    @app.post("/score")
    async def score(request: Request):
        check_token(request)
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(415, "POST /score takes application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise HTTPException(413, f"request body is {declared} bytes, above the limit of {max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise HTTPException(413, f"request body is above the limit of {max_body} bytes")
        batcher.arriving(+1)
        try:
            try:
                req = ScoreRequest.model_validate(json.loads(body))
            except json.JSONDecodeError as exc:
                raise HTTPException(422, f"malformed JSON: {exc}") from None
            except ValidationError as exc:
                raise HTTPException(422, f"invalid request: {exc.errors(include_url=False, include_input=False)}") from None
            if len(req.items) > max_items:
                raise HTTPException(413, f"{len(req.items)} items in one request, above the limit of {max_items}")
            ids = [it.id for it in req.items]
            if len(set(ids)) != len(ids):
                raise HTTPException(422, "item ids must be unique within a request")
            if req.weights is not None:
                try:
                    weights = parse_reward_weights(req.weights)
                except ValueError as exc:
                    raise HTTPException(422, f"invalid weights: {exc}") from None
                unknown = [n for n in weights if n not in scorers]
                if unknown:
                    raise HTTPException(422, f"weights name scorers this server does not run: {unknown}; "
                                             f"it runs {list(scorers)}")
            else:
                weights = {n: 1.0 / len(scorers) for n in scorers}
            for it in req.items:
                for f in IMAGE_FIELDS:
                    data = getattr(it, f)
                    try:
                        w, h = png_size_b64(data) if data is not None else (0, 0)
                    except ImageDecodeError:
                        continue  # reported for this item alone when it is decoded
                    if w * h > max_pixels:
                        raise HTTPException(413, f"item {it.id!r}: {f} is {w}x{h} = {w * h} pixels, "
                                                 f"above the limit of {max_pixels}")
        finally:
            batcher.arriving(-1)  # before submit, so the batcher never waits for this request itself
        fut = batcher.submit([it.model_dump() for it in req.items], weights)
        try:
            results = await asyncio.wrap_future(fut)
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        return JSONResponse({"results": [{"id": r.id, "reward": r.reward, "scores": r.scores, "details": r.details,
                                          "error": r.error} for r in results]})

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--scorers", default="ocr,style,background", help=f"comma-separated, from {SCORER_NAMES}")
    parser.add_argument("--siglip_path", default=None, help="SigLIP folder for the style scorer")
    parser.add_argument("--vlm_url", default=None, help="OpenAI-compatible judge server (vLLM / SGLang)")
    parser.add_argument("--vlm_model", default=None, help="model name served at --vlm_url")
    parser.add_argument("--vlm_api_key", default=os.environ.get("VLM_API_KEY"), help="or env VLM_API_KEY")
    parser.add_argument("--device", default="cpu", help="torch device for the style scorer")
    parser.add_argument("--token", default=os.environ.get("REWARD_SERVER_TOKEN"),
                        help="shared secret clients send as 'Authorization: Bearer …' (or env REWARD_SERVER_TOKEN)")
    parser.add_argument("--max_items", type=int, default=256, help="most items per request (413 above)")
    parser.add_argument("--max_pixels", type=int, default=4096 * 4096, help="most pixels per image (413 above)")
    parser.add_argument("--max_body_mb", type=float, default=256.0, help="largest request body (413 above)")
    parser.add_argument("--batch_window_ms", type=float, default=5.0,
                        help="how long the batcher waits for requests still being parsed")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="CPU threads for torch scorers (default: torch's choice)")
    parser.add_argument("--log_level", default="warning")
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from train.rewards.base import build_scorers

    try:
        scorers = build_scorers(args.scorers, siglip_path=args.siglip_path, vlm_url=args.vlm_url,
                                vlm_model=args.vlm_model, device=args.device, vlm_api_key=args.vlm_api_key)
    except ValueError as exc:
        parser.error(str(exc))
    if not _is_loopback(args.host) and not args.token:
        print(f"warning: serving on {args.host} without --token; anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(scorers, token=args.token, max_items=args.max_items, max_pixels=args.max_pixels,
                     max_body_mb=args.max_body_mb, batch_window_ms=args.batch_window_ms, device=args.device)
    import uvicorn

    print(json.dumps({"event": "reward_server_start", "host": args.host, "port": args.port,
                      "scorers": list(scorers)}), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
