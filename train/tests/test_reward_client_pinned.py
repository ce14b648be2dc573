"""The reward client's contract, pinned against a scripted HTTP server on a loopback port (replies
the real server never sends: 429, mismatched ids, missing scores) and by hand-computed numbers:
weighted rewards, the failure budget's boundaries, log statistics (docs/ARCHITECTURE.md §10)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from train.rewards import BackgroundScorer, RewardItem, schema
from train.rewards.base import RewardResult
from train.rl_ip.reward import (LocalReward, RemoteReward, RewardError, check_failure_budget, reward_stats,
                                reward_table)


class Scripted:
    """A loopback HTTP server: ``/health`` answers ``health``; each ``POST /score`` takes the next
    ``(status, body-or-callable)`` of ``replies`` (then echoes good scores). Requests are recorded."""

    def __init__(self, replies=(), scorers=("background",), token=None):
        self.replies, self.requests, self.health_calls = list(replies), [], 0
        self.scorers, self.token = list(scorers), token
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.health_calls += 1
                if outer.token and self.headers.get("authorization") != f"Bearer {outer.token}":
                    return self._send(401, {"detail": "bad token"})
                self._send(200, {"status": "ok", "scorers": outer.scorers, "version": schema.API_VERSION,
                                 "models": {n: "scripted" for n in outer.scorers}, "device": "cpu",
                                 "max_items": schema.DEFAULT_MAX_ITEMS, "max_pixels": schema.DEFAULT_MAX_PIXELS,
                                 "max_request_pixels": schema.DEFAULT_MAX_REQUEST_PIXELS,
                                 "max_body_bytes": int(schema.DEFAULT_MAX_BODY_MB * 2**20)})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append(body)
                status, reply = outer.replies.pop(0) if outer.replies else (200, good)
                self._send(status, reply(body) if callable(reply) else reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def good(body, score=0.8):
    return {"results": [{"id": it["id"], "reward": score, "scores": {"background": score}, "details": {},
                         "error": None} for it in body["items"]]}


def items(n: int) -> list[RewardItem]:
    img = Image.new("RGB", (8, 8), (90, 90, 90))
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (2, 2, 6, 6))
    return [RewardItem(f"i{i}", img, "t", mask=mask, source=img, reference=img) for i in range(n)]


def client(url, weights=None, **kw) -> RemoteReward:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("health_wait", 5.0)
    return RemoteReward(url, weights or {"background": 1.0}, **kw)


def test_the_reward_is_the_weighted_sum_of_the_returned_scores():
    with Scripted([(200, lambda b: good(b, 0.6))]) as srv, client(srv.url, {"background": 0.5}) as fn:
        res = fn(items(2))
    assert [(r.reward, r.scores) for r in res] == [(0.5 * 0.6, {"background": 0.6})] * 2
    assert srv.requests[0]["weights"] == {"background": 0.5}  # the server is told which scorers to run


def test_the_first_call_waits_for_health_and_checks_the_scorers():
    with Scripted() as srv, client(srv.url) as fn:
        assert fn(items(1))[0].reward == 0.8
        assert srv.health_calls == 1
        fn(items(1))
        assert srv.health_calls == 1  # once per client
    with Scripted(scorers=["ocr"]) as srv, client(srv.url) as fn:
        with pytest.raises(RewardError, match=r"does not run scorer\(s\) \['background'\]"):
            fn(items(1))
        assert srv.requests == []


def test_429_is_retried():
    with Scripted([(429, {"detail": "busy"}), (200, good)]) as srv, client(srv.url, retries=2) as fn:
        res = fn(items(1))
        assert res[0].reward == 0.8 and fn.stats["retries"] == 1 and len(srv.requests) == 2


def test_a_reply_for_other_ids_is_retried_then_fails_the_items():
    def wrong_ids(body):
        reply = good(body)
        reply["results"][0]["id"] = "someone-else"
        return reply

    with Scripted([(200, wrong_ids)] * 2) as srv, client(srv.url, retries=1) as fn:
        res = fn(items(2))
    assert all(r.reward is None and "reply ids do not match" in r.error for r in res)
    with Scripted([(200, lambda b: {"results": good(b)["results"][:1]})]) as srv, client(srv.url, retries=0) as fn:
        assert all("reply ids do not match" in r.error for r in fn(items(2)))


def test_a_reply_without_a_weighted_score_is_an_error_not_a_number():
    def no_scores(body):
        reply = good(body)
        reply["results"][0]["scores"] = {"ocr": 0.9}
        return reply

    with Scripted([(200, no_scores)]) as srv, client(srv.url) as fn:
        res = fn(items(2))
    assert res[0].reward is None and "lacks score(s) for ['background']" in res[0].error
    assert res[1].reward == 0.8


def test_token_from_the_environment(monkeypatch):
    with Scripted(token="s3cret") as srv:
        monkeypatch.setenv("REWARD_SERVER_TOKEN", "s3cret")
        with client(srv.url) as fn:
            assert fn(items(1))[0].reward == 0.8
        monkeypatch.delenv("REWARD_SERVER_TOKEN")
        with client(srv.url) as fn, pytest.raises(RewardError, match="rejected the token"):
            fn(items(1))


def test_only_the_images_the_weighted_scorers_read_are_sent():
    both = client("http://127.0.0.1:9", {"background": 0.5, "ocr": 0.5})
    sent = both._payload(items(1))["items"][0]
    assert {"mask", "source"} <= set(sent) and "reference" not in sent  # background reads the source
    assert "source" not in client("http://127.0.0.1:9", {"ocr": 1.0})._payload(items(1))["items"][0]


def test_duplicate_ids_and_unknown_local_scorers_are_refused():
    with pytest.raises(ValueError, match="unique"):
        client("http://127.0.0.1:9")(items(1) + items(1))
    with pytest.raises(ValueError, match=r"not loaded: \['ocr'\]"):
        LocalReward({"background": BackgroundScorer()}, {"ocr": 1.0})


def r(i, reward, error=None, **scores):
    return RewardResult(f"i{i}", reward, scores, {}, error)


def test_failure_budget_boundaries():
    results = [r(0, 0.5), r(1, None, "boom"), r(2, 0.25), r(3, 1.0)]
    rewards = reward_table(results)[:, 0]
    assert math.isnan(rewards[1]) and rewards[[0, 2, 3]].tolist() == [0.5, 0.25, 1.0]
    assert check_failure_budget(rewards, 0.25, results, "rewards failed") == 1  # 1 of 4 failed: allowed
    with pytest.raises(RewardError, match="1/4 rewards failed in epoch 3 .*first error: i1: boom"):
        check_failure_budget(rewards, 0.2, results, "rewards failed in epoch 3")
    both = [r(0, None, "a"), r(1, None, "b")]
    with pytest.raises(RewardError, match="2/2 rewards failed"):  # all failed: always an error
        check_failure_budget(reward_table(both)[:, 0], 1.0, both, "rewards failed")
    assert math.isnan(reward_table([r(0, float("inf")), r(1, 0.5)])[0, 0])  # a non-finite reward is a failure


def test_reward_stats_by_hand():
    results = [r(0, 0.2, background=0.2), r(1, 0.4, background=0.4), r(2, 0.9, background=0.9),
               r(3, None, "failed"), r(4, float("nan"))]
    table = reward_table(results, ["background"])
    assert table[:, 1].isnan().tolist() == [False, False, False, True, True]  # no score: NaN, not 0
    stats = reward_stats(table[:, 0], {"background": table[:, 1]})
    assert stats["reward/failed"] == 2.0
    assert stats["reward/mean"] == pytest.approx(0.5)
    assert (stats["reward/min"], stats["reward/max"]) == (0.2, 0.9)
    assert stats["reward/std"] == pytest.approx(math.sqrt((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 3))
    assert stats["reward/top25_mean"] == 0.9  # the best quarter of 3 rewards: the best one
    assert stats["reward/background_mean"] == pytest.approx(0.5)
    assert stats["reward/background_std"] == pytest.approx(stats["reward/std"])
