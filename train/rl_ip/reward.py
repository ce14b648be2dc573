"""Reward functions for RL: in-process scorers or remote reward servers, one interface (docs/ARCHITECTURE.md §10).

    reward_fn = build_reward_fn(args.reward_server_url, parse_reward_weights(args.reward_weights), ...)
    future = reward_fn.submit(items)        # overlaps the next rollout
    results = future.result()
    table = reward_table(results, names)    # [N, 1 + len(names)]; all-gathered by the trainer
    check_failure_budget(table[:, 0], max_failed_fraction, results, "rewards failed in RL epoch 3")
    metrics = reward_stats(table[:, 0], {n: table[:, 1 + i] for i, n in enumerate(names)})

A reward that could not be computed stays ``None`` with an error on its ``RewardResult``;
``reward_table`` turns it into NaN (dropped from advantages) and ``check_failure_budget`` raises
``RewardError`` when too many failed. It is never replaced by a number.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import ValidationError

from train.rewards.base import (API_VERSION, CROP_ONLY_SCORERS, SCORER_INPUTS, RewardItem, RewardResult, Scorer,
                                crop_window, parse_reward_weights, score_items)
from train.rewards.registry import build_scorers
from train.rewards.codec import EncodeCache
from train.rewards.schema import OPTIONAL_IMAGE_FIELDS, Health, ItemResult, item_json, short_errors

if TYPE_CHECKING:
    import torch

__all__ = ["RewardError", "RewardFunction", "LocalReward", "RemoteReward", "build_reward_fn", "parse_server_urls",
           "reward_table", "check_failure_budget", "reward_stats", "RewardItem", "RewardResult"]


class RewardError(RuntimeError):
    """Rewards could not be computed (server unreachable, rejected request, too many failures)."""


class RewardFunction:
    """``fn(items) -> list[RewardResult]`` in item order; ``fn.submit(items)`` returns a Future."""

    weights: dict[str, float]

    def __init__(self):
        self._submit_pool: ThreadPoolExecutor | None = None
        self._submit_lock = threading.Lock()

    def __call__(self, items: list[RewardItem]) -> list[RewardResult]:
        raise NotImplementedError

    def submit(self, items: list[RewardItem]) -> Future:
        """Score in a background thread so the caller can start the next rollout meanwhile."""
        with self._submit_lock:
            if self._submit_pool is None:
                self._submit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-submit")
        return self._submit_pool.submit(self.__call__, list(items))

    def close(self) -> None:
        if self._submit_pool is not None:
            self._submit_pool.shutdown(wait=True)
            self._submit_pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_ids(items: list[RewardItem]) -> None:
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("reward item ids must be unique within one call")


def _weights(weights) -> dict[str, float]:
    return parse_reward_weights(weights) if isinstance(weights, (str, dict)) else dict(weights)


class LocalReward(RewardFunction):
    """The scorers in this process. ``weights`` names must all be loaded scorers."""

    def __init__(self, scorers: dict[str, Scorer], weights):
        super().__init__()
        self.scorers, self.weights = scorers, _weights(weights)
        missing = [n for n, w in self.weights.items() if w != 0 and n not in scorers]
        if missing:
            raise ValueError(f"reward weights name scorers that are not loaded: {missing}")
        self._lock = threading.Lock()  # scorers are not required to be thread-safe

    def __call__(self, items: list[RewardItem]) -> list[RewardResult]:
        _check_ids(items)
        with self._lock:
            return score_items(self.scorers, list(items), self.weights)

    def close(self) -> None:
        super().close()
        for scorer in self.scorers.values():
            if hasattr(scorer, "close"):
                scorer.close()


class _Retryable(Exception):
    """A failed attempt worth repeating (connection error, timeout, 5xx, unreadable reply)."""


def parse_server_urls(spec: str | list[str]) -> list[str]:
    """``--reward_server_url`` (comma-separated, or a list) -> the URLs without a trailing slash.

    Raises ``ValueError`` naming every URL that is not ``http(s)://host[:port][/path]`` (port 1..65535).
    """
    urls = [u.strip() for u in (spec.split(",") if isinstance(spec, str) else spec)]
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("no reward server URL given")
    bad = []
    for url in urls:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            bad.append(f"{url!r} ({exc})")
            continue
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0 or parts.query or parts.fragment:
            bad.append(repr(url))
    if bad:
        raise ValueError(f"not an http(s)://host[:port] URL: {', '.join(bad)}")
    return [u.rstrip("/") for u in urls]


class RemoteReward(RewardFunction):
    """Client for one or more ``train.reward_server`` instances.

    Rank ``r`` sends to ``urls[r % len(urls)]`` first. Items go out in chunks of ``chunk_size`` on
    ``max_workers`` threads. Every request, connecting, sending and reading together, ends within
    ``timeout`` seconds. A chunk whose request fails with a connection error, a timeout, 5xx/429 or
    an unreadable reply is sent again up to ``retries`` times, after exponential backoff (with
    jitter), to every URL at once: the first good reply wins and the other requests are cancelled.
    A chunk that fails every attempt yields per-item errors. Rejections that retrying cannot fix
    (401, 413, 422, ...) raise ``RewardError``. The reward is recomputed here from the returned
    scores with ``weights``. Masks, references and sources repeat (a group's k items, every epoch):
    their PNGs are kept by content (``encode_cache_mb``, LRU), so each is encoded once while it stays cached.
    """

    def __init__(self, urls: list[str] | str, weights, rank: int = 0, world_size: int = 1, chunk_size: int = 16,
                 max_workers: int = 4, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 health_wait: float = 60.0, token: str | None = None, encode_cache_mb: float = 64.0):
        import httpx

        super().__init__()
        urls = parse_server_urls(urls)
        if (chunk_size < 1 or max_workers < 1 or retries < 0 or not 0 < timeout < math.inf
                or not encode_cache_mb >= 0):
            raise ValueError("chunk_size and max_workers must be >= 1, retries >= 0, timeout finite and > 0, "
                             "encode_cache_mb >= 0")
        n = len(urls)
        self.urls = [urls[(rank + i) % n] for i in range(n)]  # primary first
        self.weights, self.rank, self.world_size = _weights(weights), rank, world_size
        self.chunk_size, self.timeout, self.retries, self.backoff = chunk_size, timeout, retries, backoff
        self.health_wait = health_wait
        # PNG encoding dominates the client's cost: send only the images the weighted scorers read.
        self._fields = [f for f in OPTIONAL_IMAGE_FIELDS if any(f in SCORER_INPUTS[name] for name in self.weights)]
        # ... and only the part of the image they read, when no scorer needs the whole picture.
        self._crop = all(n in CROP_ONLY_SCORERS for n in self.weights)
        self.shared_pngs = EncodeCache(int(encode_cache_mb * 2**20))
        token = token if token is not None else os.environ.get("REWARD_SERVER_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Requests run on an event loop of their own (started at the first one), where a deadline
        # cancels a request wherever it is; httpx's own timeouts bound each read, not the request.
        self._client = httpx.AsyncClient(headers=headers, timeout=None,
                                         limits=httpx.Limits(max_connections=max_workers * n + 2))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward-http")
        self._healthy = False
        self.stats = {"requests": 0, "retries": 0, "failed_chunks": 0}
        self._stats_lock = threading.Lock()

    def _run(self, coro):
        """Run ``coro`` on the client's event loop and wait for it."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="reward-loop", daemon=True)
                self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _bounded(self, seconds: float, request):
        """``await request`` (an httpx call), cancelled after ``seconds``: ``_Retryable`` on a timeout or a
        transport error."""
        import httpx

        try:
            return await asyncio.wait_for(request, seconds)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"timed out after {seconds:g}s") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    # -- start-up -----------------------------------------------------------------------------
    def wait_healthy(self, timeout: float | None = None) -> dict[str, dict]:
        """Poll ``/health`` of every URL at once until a server answers; returns ``{url: health}`` of those that did.

        Raises ``RewardError`` if none answers within ``timeout`` (default ``health_wait``) seconds, if a
        server rejects the token, speaks another protocol version (``API_VERSION``), lacks a scorer named
        in ``weights``, or if the servers that answered run different models for a weighted scorer.
        """
        return self._run(self._wait_healthy(self.health_wait if timeout is None else timeout))

    async def _wait_healthy(self, wait: float) -> dict[str, dict]:
        deadline = time.monotonic() + wait
        last: dict[str, str] = {}
        while True:
            probe = min(5.0, self.timeout, max(0.5, deadline - time.monotonic()))
            replies = await asyncio.gather(*(self._health(url, probe) for url in self.urls), return_exceptions=True)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            healthy = {}
            for url, reply in zip(self.urls, replies):
                if isinstance(reply, str):
                    last[url] = reply
                else:
                    healthy[url] = reply
            if healthy:
                self._check_models(healthy)
                self._healthy = True
                return {url: h.model_dump() for url, h in healthy.items()}
            if time.monotonic() >= deadline:
                tried = ", ".join(f"{u} [{last.get(u, '?')}]" for u in self.urls)
                raise RewardError(f"no reward server answered /health within {wait:g}s (tried {tried})")
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def _health(self, url: str, seconds: float) -> Health | str:
        """``url``'s health, or why it is not healthy yet; ``RewardError`` for what waiting cannot fix."""
        try:
            resp = await self._bounded(seconds, self._client.get(f"{url}/health"))
        except _Retryable as exc:
            return str(exc)
        if resp.status_code == 401:
            raise RewardError(f"reward server {url} rejected the token (HTTP 401); check REWARD_SERVER_TOKEN")
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}"
        try:
            raw = json.loads(resp.content)
        except ValueError:
            return "unexpected /health reply: not JSON"
        version = raw.get("version") if isinstance(raw, dict) else None
        if version is not None and version != API_VERSION:
            raise RewardError(f"reward server {url} speaks protocol version {version!r}, this client "
                              f"{API_VERSION!r}: run the same release of the code on the servers and in training")
        try:
            health = Health.model_validate_json(resp.content)
        except ValidationError as exc:
            return f"unexpected /health reply: {short_errors(exc, limit=1)}"
        if health.status != "ok":
            return f"status {health.status!r}"
        missing = [n for n, w in self.weights.items() if w != 0 and n not in health.scorers]
        if missing:
            raise RewardError(f"reward server {url} does not run scorer(s) {missing} named in the "
                              f"reward weights; it runs {health.scorers}")
        return health

    def _check_models(self, healthy: dict[str, Health]) -> None:
        """Every weighted scorer runs the same model on every server, or a reward would depend on the URL."""
        for name, w in self.weights.items():
            seen: dict[str, list[str]] = {}
            for url, health in healthy.items():
                seen.setdefault(health.models.get(name, "?"), []).append(url)
            if w != 0 and len(seen) > 1:
                runs = "; ".join(f"{model!r} at {', '.join(urls)}" for model, urls in seen.items())
                raise RewardError(f"reward servers run different models for the {name} scorer: {runs}")

    # -- scoring ------------------------------------------------------------------------------
    def __call__(self, items: list[RewardItem]) -> list[RewardResult]:
        items = list(items)
        _check_ids(items)
        if not items:
            return []
        if not self._healthy:
            self.wait_healthy()
        chunks = [items[i:i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]
        futures = [self._pool.submit(self._score_chunk, c) for c in chunks]
        results: list[RewardResult] = []
        for fut in futures:
            results.extend(fut.result())  # RewardError from a chunk propagates
        return results

    def _payload(self, chunk: list[RewardItem]) -> dict:
        items = []
        for it in chunk:
            if self._crop and it.mask is not None and it.mask.size == it.image.size:
                try:
                    box = crop_window(it)
                    it = RewardItem(it.id, it.image.crop(box), it.text, it.mask.crop(box), it.reference, it.source)
                except ValueError:
                    pass  # an empty mask: send it whole and let the server report the error
            items.append(item_json(it, self._fields, self.shared_pngs.encode))
        return {"items": items, "weights": self.weights}

    def _score_chunk(self, chunk: list[RewardItem]) -> list[RewardResult]:
        body = json.dumps(self._payload(chunk)).encode()  # encoded on this thread, sent from the loop
        return self._run(self._score_async(body, chunk))

    async def _score_async(self, body: bytes, chunk: list[RewardItem]) -> list[RewardResult]:
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                with self._stats_lock:
                    self.stats["retries"] += 1
                await asyncio.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
            result = await self._first_reply(self.urls if attempt else self.urls[:1], body, chunk, errors)
            if result is not None:
                return result
        with self._stats_lock:
            self.stats["failed_chunks"] += 1
        msg = f"reward request failed after {len(errors)} attempt(s); last: {errors[-1]}"
        return [RewardResult(it.id, None, {}, {}, msg) for it in chunk]

    async def _first_reply(self, urls: list[str], body: bytes, chunk: list[RewardItem],
                           errors: list[str]) -> list[RewardResult] | None:
        """``body`` to every URL at once: the first good reply, or None (each failure appended to ``errors``)."""
        tasks = [asyncio.ensure_future(self._post(url, body, chunk)) for url in urls]
        try:
            for done in asyncio.as_completed(tasks):
                try:
                    return await done
                except _Retryable as exc:
                    errors.append(str(exc))
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _post(self, url: str, body: bytes, chunk: list[RewardItem]) -> list[RewardResult]:
        with self._stats_lock:
            self.stats["requests"] += 1
        try:
            resp = await self._bounded(self.timeout, self._client.post(
                f"{url}/score", content=body, headers={"content-type": "application/json"}))
        except _Retryable as exc:
            raise _Retryable(f"{url}: {exc}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retryable(f"{url}: HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code != 200:
            raise RewardError(f"reward server {url} rejected the request: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            raw = resp.json()["results"]
            by_id = {r["id"]: r for r in raw}
        except (ValueError, KeyError, TypeError) as exc:
            raise _Retryable(f"{url}: malformed reply ({type(exc).__name__}): {resp.text[:120]!r}") from None
        if len(raw) != len(chunk) or set(by_id) != {it.id for it in chunk}:
            raise _Retryable(f"{url}: reply ids do not match the request ({len(raw)} results for {len(chunk)} items)")
        return [self._result(it.id, by_id[it.id]) for it in chunk]  # matched by id, whatever the reply's order

    def _result(self, item_id: str, r: dict) -> RewardResult:
        """One reply item -> RewardResult. Scores must be real numbers in [0, 1] (``schema.Score``);
        the reward is recomputed here from the weighted scores."""
        try:
            res = ItemResult.model_validate(r)
        except ValidationError as exc:
            return RewardResult(item_id, None, {}, {}, f"invalid reply from the reward server: {short_errors(exc)}")
        if res.error:
            return RewardResult(item_id, None, res.scores, res.details, res.error)
        missing = [n for n, w in self.weights.items() if w != 0 and n not in res.scores]
        if missing:
            return RewardResult(item_id, None, res.scores, res.details, f"server reply lacks score(s) for {missing}")
        return RewardResult(item_id, sum(w * res.scores[n] for n, w in self.weights.items() if w != 0),
                            res.scores, res.details, None)

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=True)
        if self._loop is not None:
            self._run(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._loop.close()
            self._loop = None


def build_reward_fn(urls: str | list[str] | None, weights, siglip_path=None, vlm_url=None, vlm_model=None,
                    device: str = "cpu", rank: int = 0, world_size: int = 1, wait: bool = True,
                    **remote_kwargs) -> RewardFunction:
    """``RemoteReward`` for ``--reward_server_url`` (waiting for health unless ``wait=False``), else ``LocalReward``.

    Locally only the scorers named in ``weights`` are built.
    """
    weights = _weights(weights)
    if isinstance(urls, str):
        urls = [u.strip() for u in urls.split(",") if u.strip()]
    if urls:
        fn = RemoteReward(urls, weights, rank=rank, world_size=world_size, **remote_kwargs)
        if wait:
            fn.wait_healthy()
        return fn
    scorers = build_scorers(list(weights), siglip_path=siglip_path, vlm_url=vlm_url, vlm_model=vlm_model,
                            device=device)
    return LocalReward(scorers, weights)


def reward_table(results: list[RewardResult], names=()) -> torch.Tensor:
    """``[N, 1 + len(names)]`` float64: each result's reward (NaN where it failed or is not finite), then its score of
    each of ``names`` (NaN where it has none). Failures stay NaN: none is given a value."""
    import torch

    return torch.tensor([[r.reward if r.ok and r.reward is not None and math.isfinite(r.reward) else math.nan]
                         + [r.scores.get(n, math.nan) for n in names] for r in results], dtype=torch.float64)


def check_failure_budget(rewards: torch.Tensor, max_failed_fraction: float, results: list[RewardResult],
                         what: str) -> int:
    """How many of ``rewards [N]`` (NaN = failed; every process's) failed; ``RewardError`` when more than
    ``max_failed_fraction`` of them or all of them did. ``results`` (this process's) give the first error,
    ``what`` says what failed where (``"rewards failed in RL epoch 3"``)."""
    import torch

    failed, total = int(torch.isnan(rewards).sum()), rewards.numel()
    if failed and (failed > max_failed_fraction * total or failed == total):
        first = next((f"{r.id}: {r.error}" for r in results if not r.ok), "on another process")
        raise RewardError(f"{failed}/{total} {what} (allowed fraction {max_failed_fraction:g}); first error: "
                          f"{first[:300]}")
    return failed


def reward_stats(rewards: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Log-ready figures of rewards ``[N]`` (NaN = failed, not all) and per-scorer scores ``{name: [N]}`` (NaN where
    absent): ``reward/mean``, ``std`` (population), ``min``, ``max`` of the computed rewards, ``reward/failed``,
    each scorer's ``reward/{name}_mean`` and ``_std`` over its computed scores, and ``reward/top25_mean`` (the
    mean of the best quarter of the rewards, at least one)."""
    import torch

    ok = rewards[~torch.isnan(rewards)]
    metrics = {"reward/mean": ok.mean().item(), "reward/std": ok.std(unbiased=False).item(),
               "reward/min": ok.min().item(), "reward/max": ok.max().item(),
               "reward/failed": float(rewards.numel() - ok.numel())}
    for n, s in scores.items():
        s = s[~torch.isnan(s)]
        if s.numel():
            metrics[f"reward/{n}_mean"], metrics[f"reward/{n}_std"] = s.mean().item(), s.std(unbiased=False).item()
    top = ok.sort(descending=True).values
    metrics["reward/top25_mean"] = top[:max(1, len(top) // 4)].mean().item()
    return metrics
