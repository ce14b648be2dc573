"""HTTP reward server (docs/ARCHITECTURE.md §10): batched scoring of generated images, JSON only.

    python -m train.reward_server --host 127.0.0.1 --port 8000 --scorers ocr,style,background \\
        --siglip_path /models/siglip-so400m-patch14-384 [--token_file /run/secrets/reward_token]

The wire format is ``train.rewards.schema``. ``GET /health`` -> ``Health`` (scorers, protocol
version, each scorer's model identity, device, limits). ``POST /score`` takes ``{"items": [{"id",
"image", "text", "mask"?, "reference"?, "source"?}], "weights"?: {...}}`` (images as base64 PNG;
masks white where text goes) and returns ``{"results": [{"id", "reward", "scores", "details",
"error"}]}`` in request order.
With ``weights`` only the named scorers run and ``reward`` is their weighted sum; without,
every loaded scorer runs and ``reward`` is their mean. An item that cannot be scored (corrupt
image, a scorer error) has ``reward: null`` and a one-line ``error``; other items are unaffected.

Limits (413 with the reason): more than ``--max_items`` items, an image above ``--max_pixels``,
images that together decode to more than ``--max_request_pixels`` (read from the PNG headers,
before anything is decoded), a body above ``--max_body_mb``. Malformed JSON or a schema
violation -> 422; a missing or wrong token -> 401. Slow or stalled clients: a request head must
arrive within ``--header_timeout`` seconds of connecting (or of the previous reply on a kept-alive
connection) and a body within ``--body_timeout`` (408), else the connection is closed; requests
arriving while ``--max_connections`` connections are open get 503, as does a body that would take
the bodies being received, all requests together, above ``--max_inflight_body_mb``. Memory: besides
those request bodies, the worker holds at most one batch of ``--max_request_pixels`` decoded pixels
(4 bytes each at most) plus one full image being cropped, and the decoded images items share (mask,
reference, source: ``--image_cache_mb``, LRU); only the images the requested scorers read are
decoded. Tracebacks go to the server's log, never into a reply.

Requests are parsed on the event loop; one worker thread decodes and scores, grouping
concurrent requests into a single call per scorer. Decoding there rather than in a thread
pool keeps threads from fighting over the GIL.

The start event (one JSON line on stdout) is printed once the port is bound and the server
accepts connections; a port already in use is one line on stderr and exit status 3. Bad flags, and
an address other machines can reach without a token, are refused (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from train.cli_flags import is_loopback
from train.rewards.base import (API_VERSION, CROP_ONLY_SCORERS, SCORER_INPUTS, SCORER_NAMES, ItemScore, RewardItem,
                                RewardResult, Scorer, combine_item, crop_window, describe_exception,
                                parse_reward_weights)
from train.rewards.codec import DecodeCache, ImageDecodeError, ImageTooLargeError, decode_png_b64, png_size_b64
from train.rewards.schema import (DEFAULT_MAX_BODY_MB, DEFAULT_MAX_ITEMS, DEFAULT_MAX_PIXELS,
                                  DEFAULT_MAX_REQUEST_PIXELS, IMAGE_FIELDS, OPTIONAL_IMAGE_FIELDS, Health, ItemIn,
                                  ScoreRequest, result_json, short_errors)

EXIT_PORT_BUSY = 3
DEFAULT_IMAGE_CACHE_MB = 256.0
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_MAX_INFLIGHT_BODY_MB = 4 * DEFAULT_MAX_BODY_MB
TOKEN_ENV = "REWARD_SERVER_TOKEN"
CLOSE = {"connection": "close"}  # on replies sent before the body is read: the client stops sending it


@dataclass
class Job:
    items: list  # ItemIn as received; each slot is emptied once decoded
    weights: dict[str, float]
    fields: tuple[str, ...]  # the images the weighted scorers read: only these are decoded
    crop: bool  # every weighted scorer reads only the mask window: keep just that part of image and mask
    pixels: int  # decoded pixels of ``fields``, from the PNG headers
    future: Future


class Batcher:
    """Worker thread that merges jobs from concurrent requests into one scorer call each.

    After taking a job it also takes every job already queued, and waits up to ``window_s``
    for more only while other requests are still being parsed, so a lone request is never delayed.
    A merged batch holds at most ``max_batch_items`` items and ``max_batch_pixels`` decoded
    pixels (a job that would exceed either starts the next batch). Images are decoded one item
    at a time, and cropped to the mask window right away when only crop-reading scorers run.
    The images items share (mask, reference, source) go through a ``DecodeCache`` of ``cache_bytes``:
    a group's k items, and later requests, decode each of them once.
    """

    def __init__(self, scorers: dict[str, Scorer], max_batch_items: int = DEFAULT_MAX_ITEMS, window_s: float = 0.005,
                 max_pixels: int | None = None, max_batch_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
                 cache_bytes: int = int(DEFAULT_IMAGE_CACHE_MB * 2**20)):
        self.scorers, self.max_batch_items, self.window_s = scorers, max_batch_items, window_s
        self.shared_images = DecodeCache(cache_bytes)
        self.max_pixels, self.max_batch_pixels = max_pixels, max_batch_pixels
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

    def submit(self, job: Job) -> Future:
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        carry = None
        while True:
            job, carry = (carry, None) if carry is not None else (self._queue.get(), None)
            if job is None:
                return
            jobs, n, px = [job], len(job.items), job.pixels
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
                if n + len(nxt.items) > self.max_batch_items or px + nxt.pixels > self.max_batch_pixels:
                    carry = nxt  # starts the next batch
                    break
                jobs.append(nxt)
                n, px = n + len(nxt.items), px + nxt.pixels
            self._process(jobs)

    def _process(self, jobs: list[Job]) -> None:
        try:
            decoded = [[self._decode(job, i) for i in range(len(job.items))] for job in jobs]
            verdicts: dict[tuple[int, int], dict[str, ItemScore]] = {}
            for name, scorer in self.scorers.items():
                keys = [(j, i) for j, job in enumerate(jobs) if name in job.weights
                        for i, it in enumerate(decoded[j]) if isinstance(it, RewardItem)]
                if not keys:
                    continue
                for key, v in zip(keys, scorer.score_batch([decoded[j][i] for j, i in keys])):
                    verdicts.setdefault(key, {})[name] = v
            self.batches += 1
            for j, job in enumerate(jobs):
                job.future.set_result([
                    it if isinstance(it, RewardResult) else combine_item(it.id, verdicts.get((j, i), {}), job.weights)
                    for i, it in enumerate(decoded[j])])
        except Exception as exc:  # noqa: BLE001 - a scorer bug fails these requests (HTTP 500), not the server
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _decode(self, job: Job, i: int):
        """Item ``i`` of ``job`` -> RewardItem, or RewardResult(error) for an unreadable image."""
        raw: ItemIn = job.items[i]
        job.items[i] = None  # the base64 text is no longer needed
        try:
            images = {f: (decode_png_b64 if f == "image" else self.shared_images.decode)(
                          getattr(raw, f), self.max_pixels, "L" if f == "mask" else "RGB")
                      if f in job.fields and getattr(raw, f) is not None else None for f in IMAGE_FIELDS}
        except (ImageDecodeError, ImageTooLargeError) as exc:
            return RewardResult(raw.id, None, {}, {}, f"bad image: {exc}")
        item = RewardItem(id=raw.id, text=raw.text, **images)
        if job.crop and item.mask is not None and item.mask.size == item.image.size:
            try:
                box = crop_window(item)
            except ValueError:
                return item  # an empty mask: the scorers report it
            item = replace(item, image=item.image.crop(box), mask=item.mask.crop(box))
        return item


def parse_score_request(body: bytes) -> ScoreRequest:
    """Body bytes -> ``ScoreRequest``; ``HTTPException(422)`` with a one-line reason for anything malformed
    (not JSON, not UTF-8, nested too deep, wrong fields)."""
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        errs = exc.errors(include_url=False, include_input=False)
        if errs and errs[0]["type"] == "json_invalid":
            raise HTTPException(422, f"malformed JSON: {errs[0]['msg'].removeprefix('Invalid JSON: ')}") from None
        raise HTTPException(422, f"invalid request: {short_errors(exc)}") from None


def _bearer_matches(header: str, token: str) -> bool:
    """``Authorization: Bearer <token>``; the scheme is case-insensitive, the token must match exactly."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def create_app(scorers: dict[str, Scorer], token: str | None = None, max_items: int = DEFAULT_MAX_ITEMS,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_body_mb: float = DEFAULT_MAX_BODY_MB,
               batch_window_ms: float = 5.0, max_batch_items: int | None = None, device: str | None = None,
               max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, max_inflight_body_mb: float = DEFAULT_MAX_INFLIGHT_BODY_MB):
    """The FastAPI app; see the module docstring for the protocol.

    With a ``token`` the interactive docs and the OpenAPI schema are not served.
    """
    if not scorers:
        raise ValueError("the reward server needs at least one scorer")
    if max_request_pixels < max_pixels:
        raise ValueError(f"max_request_pixels ({max_request_pixels}) must be >= max_pixels ({max_pixels})")
    if max_inflight_body_mb < max_body_mb:
        raise ValueError(f"max_inflight_body_mb ({max_inflight_body_mb:g}) must be >= max_body_mb ({max_body_mb:g})")
    device = device or next((s.device for s in scorers.values() if s.device != "cpu"), "cpu")
    batcher = Batcher(scorers, max_batch_items or max(max_items, 1), batch_window_ms / 1000.0, max_pixels,
                      max_request_pixels, int(image_cache_mb * 2**20))
    max_body, max_inflight = int(max_body_mb * 2**20), int(max_inflight_body_mb * 2**20)
    models = {name: scorer.identity for name, scorer in scorers.items()}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    docs = {} if token is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Calligrapher reward server", version=API_VERSION, lifespan=lifespan, **docs)
    app.state.batcher = batcher

    def check_token(request: Request) -> None:
        if token is not None and not _bearer_matches(request.headers.get("authorization", ""), token):
            raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer <token>')")

    @app.get("/health")
    def health(request: Request):
        check_token(request)
        return Health(status="ok", scorers=list(scorers), version=API_VERSION, models=models, device=device,
                      max_items=max_items, max_pixels=max_pixels, max_request_pixels=max_request_pixels,
                      max_body_bytes=max_body).model_dump()

    receiving = 0  # bytes of request bodies being received, all requests together

    async def read_body(request: Request) -> bytearray:
        """The body, within ``max_body`` bytes, ``body_timeout`` seconds and the shared ``max_inflight`` bytes."""
        nonlocal receiving
        body = bytearray()

        async def receive() -> None:
            nonlocal receiving
            async for chunk in request.stream():
                if len(body) + len(chunk) > max_body:
                    raise HTTPException(413, f"request body is above the limit of {max_body} bytes", CLOSE)
                if receiving + len(chunk) > max_inflight:
                    raise HTTPException(503, f"the server is receiving {receiving} bytes of request bodies, near "
                                             f"its limit of {max_inflight}; retry later", CLOSE)
                body.extend(chunk)
                receiving += len(chunk)

        try:
            await asyncio.wait_for(receive(), body_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"request body not received within {body_timeout:g}s", CLOSE) from None
        finally:
            receiving -= len(body)
        return body

    def plan(req: ScoreRequest) -> Job:
        """Check a parsed request against the limits (413/422) and turn it into a job."""
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
        fields = ("image", *[f for f in OPTIONAL_IMAGE_FIELDS
                             if any(f in SCORER_INPUTS.get(n, OPTIONAL_IMAGE_FIELDS) for n in weights)])
        total = 0
        for it in req.items:
            for f in fields:
                data = getattr(it, f)
                try:
                    w, h = png_size_b64(data) if data is not None else (0, 0)
                except ImageDecodeError:
                    continue  # reported for this item alone when it is decoded
                if w * h > max_pixels:
                    raise HTTPException(413, f"item {it.id!r}: {f} is {w}x{h} = {w * h} pixels, "
                                             f"above the limit of {max_pixels}")
                total += w * h
        if total > max_request_pixels:
            raise HTTPException(413, f"the request's images decode to {total} pixels, above the limit of "
                                     f"{max_request_pixels} per request; send fewer or smaller images")
        return Job(list(req.items), weights, fields, all(n in CROP_ONLY_SCORERS for n in weights), total, Future())

    @app.post("/score")
    async def score(request: Request):
        check_token(request)
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(415, "POST /score takes application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise HTTPException(413, f"request body is {declared} bytes, above the limit of {max_body}", CLOSE)
        body = await read_body(request)
        batcher.arriving(+1)
        try:
            job = plan(parse_score_request(body))
        finally:
            del body
            batcher.arriving(-1)  # before submit, so the batcher never waits for this request itself
        try:
            results = await asyncio.wrap_future(batcher.submit(job))
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(500, f"scoring failed: {describe_exception(exc)}") from None
        return JSONResponse({"results": [result_json(r) for r in results]})

    return app


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on each request head: a connection that has not sent a
    whole request head ``header_timeout`` seconds after it opened, or after its previous reply, is
    closed. (uvicorn alone waits for a partial head forever: its keep-alive timer stops at the first byte.)"""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None

    def _watch(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # no request of this connection is being served
        if idle and self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)
        elif not idle and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def uvicorn_config(app, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS, **kw):
    """uvicorn settings of the reward server: h11 with the request-head deadline, 503 for requests that
    arrive while ``max_connections`` connections are open, idle kept-alive connections closed after 5 s."""
    import uvicorn

    protocol = type("RewardServerProtocol", (HeadDeadlineProtocol,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, http=protocol, limit_concurrency=max_connections, timeout_keep_alive=5, **kw)


def _read_token(args) -> tuple[str | None, list[str]]:
    """The shared secret (``--token`` or ``--token_file``, not both; else ``$REWARD_SERVER_TOKEN``) and the problems."""
    if args.token_file is None:
        return args.token or os.environ.get(TOKEN_ENV) or None, []
    if args.token is not None:
        return None, ["give --token or --token_file, not both"]
    try:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"--token_file {args.token_file} cannot be read ({getattr(exc, 'strerror', None) or exc})"]
    return (token, []) if token else (None, [f"--token_file {args.token_file} is empty"])


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``; ``OSError`` if it cannot be bound."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (loopback by default; any other needs a token)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port, printed at start)")
    parser.add_argument("--scorers", default="ocr,style,background", help=f"comma-separated, from {SCORER_NAMES}")
    parser.add_argument("--siglip_path", default=None, help="SigLIP folder for the style scorer")
    parser.add_argument("--vlm_url", default=None, help="OpenAI-compatible judge server (vLLM / SGLang)")
    parser.add_argument("--vlm_model", default=None, help="model name served at --vlm_url")
    parser.add_argument("--vlm_api_key", default=os.environ.get("VLM_API_KEY"), help="or env VLM_API_KEY")
    parser.add_argument("--device", default="cpu", help="torch device for the style scorer")
    parser.add_argument("--token_file", default=None,
                        help=f"file holding the shared secret clients send as 'Authorization: Bearer …' (or env "
                             f"{TOKEN_ENV}, which training reads too); with a token /docs and /openapi.json are off")
    parser.add_argument("--token", default=None,
                        help="the shared secret itself; other users of the machine see it in ps, so prefer "
                             f"--token_file or {TOKEN_ENV}")
    parser.add_argument("--max_items", type=int, default=DEFAULT_MAX_ITEMS, help="most items per request (413 above)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="most pixels per image (413 above)")
    parser.add_argument("--max_request_pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                        help="most pixels all decoded images of one request (and of one merged batch) may have "
                             "(413 above); bounds the worker's memory at about 4 bytes per pixel")
    parser.add_argument("--max_body_mb", type=float, default=DEFAULT_MAX_BODY_MB, help="largest request body (413 above)")
    parser.add_argument("--max_inflight_body_mb", type=float, default=DEFAULT_MAX_INFLIGHT_BODY_MB,
                        help="most memory the request bodies being received may hold, all requests together "
                             "(503 above); at least --max_body_mb")
    parser.add_argument("--header_timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                        help="seconds a connection has to send a whole request head, from its opening or its "
                             "previous reply; then it is closed")
    parser.add_argument("--body_timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                        help="seconds a request has to send its whole body (408 after)")
    parser.add_argument("--max_connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="requests arriving while this many connections are open get 503")
    parser.add_argument("--image_cache_mb", type=float, default=DEFAULT_IMAGE_CACHE_MB,
                        help="memory for decoded masks, references and sources that items and requests share "
                             "(LRU, keyed by the base64 text; 0 = off)")
    parser.add_argument("--batch_window_ms", type=float, default=5.0,
                        help="how long the batcher waits for requests still being parsed")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="CPU threads for torch scorers (default: torch's choice)")
    parser.add_argument("--log_level", default="warning")
    args = parser.parse_args(argv)
    token, problems = _read_token(args)
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_items", "max_pixels", "max_request_pixels", "max_connections"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_body_mb", "header_timeout", "body_timeout"):
        if not 0 < getattr(args, flag) < float("inf"):
            problems.append(f"--{flag} must be a finite number > 0, got {getattr(args, flag)}")
    if not args.image_cache_mb >= 0:
        problems.append(f"--image_cache_mb must be >= 0, got {args.image_cache_mb}")
    if args.max_request_pixels < args.max_pixels:
        problems.append(f"--max_request_pixels ({args.max_request_pixels}) must be >= --max_pixels ({args.max_pixels})")
    if not args.max_inflight_body_mb >= args.max_body_mb:
        problems.append(f"--max_inflight_body_mb ({args.max_inflight_body_mb:g}) must be >= --max_body_mb "
                        f"({args.max_body_mb:g})")
    if not is_loopback(args.host) and not token and not any(p.startswith("--token") for p in problems):
        problems.append(f"--host {args.host} is reachable from other machines: set a shared secret with --token_file "
                        f"or {TOKEN_ENV}")
    if problems:
        parser.error("; ".join(problems))
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from train.rewards.registry import build_scorers

    if args.siglip_path and not Path(args.siglip_path).is_dir():
        parser.error(f"--siglip_path {args.siglip_path} is not a folder")
    try:
        scorers = build_scorers(args.scorers, siglip_path=args.siglip_path, vlm_url=args.vlm_url,
                                vlm_model=args.vlm_model, device=args.device, vlm_api_key=args.vlm_api_key)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:  # a model folder that does not load (transformers reports it as OSError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        parser.error(f"cannot load the scorers' models (--siglip_path {args.siglip_path}): {first}")
    app = create_app(scorers, token=token, max_items=args.max_items, max_pixels=args.max_pixels,
                     max_request_pixels=args.max_request_pixels, max_body_mb=args.max_body_mb,
                     batch_window_ms=args.batch_window_ms, device=args.device, image_cache_mb=args.image_cache_mb,
                     body_timeout=args.body_timeout, max_inflight_body_mb=args.max_inflight_body_mb)
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(EXIT_PORT_BUSY)
    import uvicorn

    port = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:  # listening: now clients can connect
                print(json.dumps({"event": "reward_server_start", "host": args.host, "port": port,
                                  "scorers": list(scorers), "version": API_VERSION}), flush=True)

    config = uvicorn_config(app, header_timeout=args.header_timeout, max_connections=args.max_connections,
                            log_level=args.log_level, timeout_graceful_shutdown=5)
    _Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
