"""Reward functions for RL: in-process scorers or remote reward servers, one interface (SPEC §10).

    reward_fn = build_reward_fn(args.reward_server_url, parse_reward_weights(args.reward_weights), ...)
    future = reward_fn.submit(items)        # overlaps the next rollout
    results = future.result()
    rewards, valid = apply_failure_policy(results, max_failed_fraction=0.0)

A reward that could not be computed stays ``None`` with an error on its ``RewardResult``;
``apply_failure_policy`` turns it into NaN plus ``valid=False`` (dropped from advantages)
or raises ``RewardError`` when too many failed. It is never replaced by a number.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from pydantic import ValidationError

from train.rewards.base import (CROP_ONLY_SCORERS, SCORER_INPUTS, RewardItem, RewardResult, Scorer,
                                build_scorers, crop_window, parse_reward_weights, score_items)
from train.rewards.codec import EncodeCache
from train.rewards.schema import OPTIONAL_IMAGE_FIELDS, Health, ItemResult, item_json, short_errors

__all__ = ["RewardError", "RewardFunction", "LocalReward", "RemoteReward", "build_reward_fn",
           "apply_failure_policy", "reward_stats", "RewardItem", "RewardResult"]


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


class RemoteReward(RewardFunction):
    """Client for one or more ``train.reward_server`` instances.

    Rank ``r`` sends to ``urls[r % len(urls)]`` first and falls back to the others in turn.
    Items go out in chunks of ``chunk_size`` on ``max_workers`` threads. Each URL gets
    ``retries`` extra attempts with exponential backoff (and jitter) on connection errors,
    timeouts, 5xx/429 and unreadable replies; a chunk that fails on every URL yields
    per-item errors. Rejections that retrying cannot fix (401, 413, 422, ...) raise
    ``RewardError``. The reward is recomputed here from the returned scores with ``weights``.
    Masks, references and sources repeat (a group's k items, every epoch): their PNGs are kept by
    content (``encode_cache_mb``, LRU), so each is encoded once while it stays cached.
    """

    def __init__(self, urls: list[str] | str, weights, rank: int = 0, world_size: int = 1, chunk_size: int = 16,
                 max_workers: int = 4, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 health_wait: float = 60.0, token: str | None = None, encode_cache_mb: float = 64.0):
        import httpx

        super().__init__()
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("RemoteReward needs at least one server URL")
        if chunk_size < 1 or max_workers < 1 or retries < 0 or timeout <= 0 or not encode_cache_mb >= 0:
            raise ValueError("chunk_size and max_workers must be >= 1, retries >= 0, timeout > 0, encode_cache_mb >= 0")
        n = len(urls)
        self.urls = [urls[(rank + i) % n].rstrip("/") for i in range(n)]  # primary first
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
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                    limits=httpx.Limits(max_connections=max_workers * n + 2))
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward-http")
        self._healthy = False
        self.stats = {"requests": 0, "retries": 0, "failed_chunks": 0}
        self._stats_lock = threading.Lock()

    # -- start-up -----------------------------------------------------------------------------
    def wait_healthy(self, timeout: float | None = None) -> dict[str, dict]:
        """Poll ``/health`` until a server answers; returns ``{url: health}`` of those that did.

        Raises ``RewardError`` if none answers within ``timeout`` (default ``health_wait``) seconds,
        if a server rejects the token, or if a server lacks a scorer named in ``weights``.
        """
        import httpx

        wait = self.health_wait if timeout is None else timeout
        deadline = time.monotonic() + wait
        last: dict[str, str] = {}
        while True:
            healthy = {}
            for url in self.urls:
                try:
                    resp = self._client.get(f"{url}/health", timeout=min(5.0, self.timeout))
                except httpx.TransportError as exc:
                    last[url] = f"{type(exc).__name__}"
                    continue
                if resp.status_code == 401:
                    raise RewardError(f"reward server {url} rejected the token (HTTP 401); "
                                      "check --token / REWARD_SERVER_TOKEN")
                if resp.status_code != 200:
                    last[url] = f"HTTP {resp.status_code}"
                    continue
                try:
                    health = Health.model_validate_json(resp.content)
                except ValidationError as exc:
                    last[url] = f"unexpected /health reply: {short_errors(exc, limit=1)}"
                    continue
                if health.status != "ok":
                    last[url] = f"status {health.status!r}"
                    continue
                missing = [n for n, w in self.weights.items() if w != 0 and n not in health.scorers]
                if missing:
                    raise RewardError(f"reward server {url} does not run scorer(s) {missing} named in the "
                                      f"reward weights; it runs {health.scorers}")
                healthy[url] = health.model_dump()
            if healthy:
                self._healthy = True
                return healthy
            if time.monotonic() >= deadline:
                tried = ", ".join(f"{u} [{last.get(u, '?')}]" for u in self.urls)
                raise RewardError(f"no reward server answered /health within {wait:g}s (tried {tried})")
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

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
        payload = self._payload(chunk)
        errors = []
        for url in self.urls:
            for attempt in range(self.retries + 1):
                if attempt:
                    with self._stats_lock:
                        self.stats["retries"] += 1
                    time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
                try:
                    return self._post(url, payload, chunk)
                except _Retryable as exc:
                    errors.append(f"{url}: {exc}")
        with self._stats_lock:
            self.stats["failed_chunks"] += 1
        msg = f"reward request failed after {len(errors)} attempt(s); last: {errors[-1]}"
        return [RewardResult(it.id, None, {}, {}, msg) for it in chunk]

    def _post(self, url: str, payload: dict, chunk: list[RewardItem]) -> list[RewardResult]:
        import httpx

        with self._stats_lock:
            self.stats["requests"] += 1
        try:
            resp = self._client.post(f"{url}/score", json=payload)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out after {self.timeout:g}s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code != 200:
            raise RewardError(f"reward server {url} rejected the request: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            raw = resp.json()["results"]
            by_id = {r["id"]: r for r in raw}
        except (ValueError, KeyError, TypeError) as exc:
            raise _Retryable(f"malformed reply ({type(exc).__name__}): {resp.text[:120]!r}") from None
        if len(raw) != len(chunk) or set(by_id) != {it.id for it in chunk}:
            raise _Retryable(f"reply ids do not match the request ({len(raw)} results for {len(chunk)} items)")
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
        self._client.close()


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


def apply_failure_policy(results: list[RewardResult], max_failed_fraction: float = 0.0):
    """``(rewards [N] float32 with NaN where failed, valid [N] bool)``; raises ``RewardError`` if too many failed.

    ``max_failed_fraction`` is the share of items allowed to fail (0 = any failure fails the
    step). Failed items must be dropped from advantages via ``valid``; none is given a value.
    A batch in which every item failed always raises.
    """
    import torch

    if not 0.0 <= max_failed_fraction <= 1.0:
        raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
    valid = [r.error is None and r.reward is not None and math.isfinite(r.reward) for r in results]
    n, n_bad = len(results), valid.count(False)
    if n_bad and (n_bad > max_failed_fraction * n or n_bad == n):
        first = "; ".join(f"{r.id}: {r.error or 'no reward'}" for r, ok in zip(results, valid) if not ok)
        raise RewardError(f"{n_bad}/{n} rewards failed (allowed fraction {max_failed_fraction:g}); "
                          f"first errors: {first[:600]}")
    rewards = torch.tensor([r.reward if ok else float("nan") for r, ok in zip(results, valid)], dtype=torch.float32)
    return rewards, torch.tensor(valid, dtype=torch.bool)


def reward_stats(results: list[RewardResult]) -> dict[str, float]:
    """Log-ready numbers: ``reward/failed`` count, mean/std/min/max of the valid rewards, and each scorer's mean."""
    valid = [r.reward for r in results if r.ok and math.isfinite(r.reward)]
    out: dict[str, float] = {"reward/failed": float(len(results) - len(valid))}
    if valid:
        mean = sum(valid) / len(valid)
        out.update({"reward/mean": mean, "reward/min": min(valid), "reward/max": max(valid),
                    "reward/std": math.sqrt(sum((v - mean) ** 2 for v in valid) / len(valid))})
    per: dict[str, list[float]] = {}
    for r in results:
        for name, v in r.scores.items():
            per.setdefault(name, []).append(v)
    out.update({f"reward/{name}": sum(vs) / len(vs) for name, vs in per.items()})
    return out
