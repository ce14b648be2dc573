"""The reward client against real servers on loopback ports: retries, timeouts, fallbacks,
a killed server, rejections and many concurrent clients. Nothing failed is ever given a number."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace

import pytest
from PIL import Image

from train.reward_server import create_app
from train.rewards import BackgroundScorer, RewardItem, decode_png_b64
from train.rl_ip.reward import (LocalReward, RemoteReward, RewardError, build_reward_fn, check_failure_budget,
                                reward_table)
from train.tests.reward_helpers import (FaultInjector, ServerThread, free_port, render_scene, spawn_server,  # noqa: F401
                                        tiny_siglip)


def bg_app(**kw):
    return create_app({"background": BackgroundScorer()}, **kw)


def items(n: int, prefix: str = "i") -> list[RewardItem]:
    """Tiny items whose background score encodes their index: a known value per id."""
    out = []
    for i in range(n):
        src = Image.new("RGB", (16, 16), (100, 100, 100))
        img = src.copy()
        img.paste((100 + (i % 100) + 1, 100, 100), (0, 0, 16, 8))  # top half differs by (i%100)+1 in R
        mask = Image.new("L", (16, 16), 0)
        mask.paste(255, (12, 12, 16, 16))
        out.append(RewardItem(f"{prefix}{i}", img, "t", mask=mask, source=src))
    return out


def expected(i: int) -> float:
    """Background score of ``items()[i]``: MAE over the 240 unmasked pixels, all 3 channels."""
    return 1.0 - ((i % 100) + 1) * 128 / (240 * 3) / 255.0


def client(url, **kw) -> RemoteReward:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("health_wait", 5.0)
    return RemoteReward(url, {"background": 1.0}, **kw)


def test_rank_spreads_urls_and_falls_back_in_order():
    urls = ["http://a:1", "http://b:2", "http://c:3"]
    assert RemoteReward(urls, "background=1", rank=4, world_size=6).urls == ["http://b:2", "http://c:3", "http://a:1"]
    assert RemoteReward("http://a:1,http://b:2", "background=1", rank=0).urls == ["http://a:1", "http://b:2"]


def test_server_never_comes_up_errors_within_the_wait():
    fn = client(f"http://127.0.0.1:{free_port()}", health_wait=1.0)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"no reward server answered /health within 1s"):
        fn.wait_healthy()
    assert time.monotonic() - t0 < 4.0
    with pytest.raises(RewardError, match="no reward server"):
        build_reward_fn(f"http://127.0.0.1:{free_port()}", "background=1", health_wait=0.5)


def test_a_health_reply_outside_the_schema_is_not_healthy():
    from fastapi import FastAPI

    other = FastAPI()  # e.g. a different service on the port, or an incompatible server version

    @other.get("/health")
    def health():
        return {"status": "ok", "scorers": "background"}

    with ServerThread(other) as srv:
        with pytest.raises(RewardError, match=r"within 0.5s \(tried .* \[unexpected /health reply: scorers: "
                                              r"Input should be a valid array; \.\.\. 7 more\]\)"):  # the 7 missing fields
            client(srv.url, health_wait=0.5).wait_healthy()


def test_chunked_results_match_ids_and_submit_overlaps():
    with ServerThread(FaultInjector(bg_app(), ["sleep:1"])) as srv:
        fn = client(srv.url, chunk_size=3, max_workers=2)
        fn.wait_healthy()
        batch = items(10)
        t0 = time.monotonic()
        fut = fn.submit(batch)  # returns at once: the caller rolls out while the server scores
        assert time.monotonic() - t0 < 0.5 and not fut.done()
        res = fut.result(timeout=30)
        assert [r.id for r in res] == [it.id for it in batch]
        assert all(r.reward == pytest.approx(expected(i), abs=1e-6) for i, r in enumerate(res))
        assert fn.stats["requests"] == 4 and fn.stats["retries"] == 0
        fn.close()


def test_results_are_matched_by_id_when_the_server_reorders():
    app = FaultInjector(bg_app(), ["reverse"])
    with ServerThread(app) as srv:
        fn = client(srv.url)
        res = fn(items(5))
        fn.close()
    assert app.seen == ["reverse"]
    assert [r.id for r in res] == [f"i{i}" for i in range(5)]
    assert [r.reward for r in res] == pytest.approx([expected(i) for i in range(5)], abs=1e-9)


def test_only_real_numbers_in_0_1_count_as_scores():
    bad = [True, False, 1.5, -0.1, 1.0000001, float("nan"), float("inf"), "0.9", None, [0.5]]
    good = [1, 0, 0.25, 1.0]
    values = bad + good

    def rewrite(body):
        for r, v in zip(body["results"], values):
            r["scores"]["background"] = v
        return body

    app = FaultInjector(bg_app(), ["rewrite"], rewrite=rewrite)
    with ServerThread(app) as srv:
        fn = client(srv.url)
        res = fn(items(len(values)))
        fn.close()
    assert app.seen == ["rewrite"]
    for r, v in zip(res, bad):
        assert r.reward is None and r.scores == {}, (v, r)
        assert r.error.startswith("invalid reply from the reward server: scores.background: Input should be"), (v, r)
    assert [(r.reward, r.error) for r in res[len(bad):]] == [(1.0, None), (0.0, None), (0.25, None), (1.0, None)]
    with pytest.raises(RewardError, match=f"{len(bad)}/{len(values)} rewards failed"):
        check_failure_budget(reward_table(res)[:, 0], 0.5, res, "rewards failed")


def test_http_500_then_recovery_is_retried():
    app = FaultInjector(bg_app(), ["500", "500", "ok"])
    with ServerThread(app) as srv:
        fn = client(srv.url, retries=3)
        res = fn(items(2))
        assert [r.reward for r in res] == pytest.approx([expected(0), expected(1)])
        assert app.seen == ["500", "500", "ok"] and fn.stats["retries"] == 2
        fn.close()


def test_500_past_the_retries_fails_the_items_and_the_step():
    app = FaultInjector(bg_app(), ["500"] * 10)
    with ServerThread(app) as srv:
        fn = client(srv.url, retries=2)
        res = fn(items(2))
        assert all(r.reward is None and "HTTP 500" in r.error and "3 attempt" in r.error for r in res)
        with pytest.raises(RewardError, match="2/2 rewards failed"):
            check_failure_budget(reward_table(res)[:, 0], 0.0, res, "rewards failed")
        fn.close()


def test_timeout_is_retried_then_reported():
    app = FaultInjector(bg_app(), ["sleep:2", "ok", "sleep:2", "sleep:2"])
    with ServerThread(app) as srv:
        fn = client(srv.url, timeout=0.5, retries=1)
        res = fn(items(1))  # first attempt times out, the retry succeeds
        assert res[0].reward == pytest.approx(expected(0))
        t0 = time.monotonic()
        res = fn(items(1))  # both attempts time out
        assert time.monotonic() - t0 < 3.0
        assert res[0].reward is None and "timed out after 0.5s" in res[0].error
        fn.close()


def test_malformed_json_reply_is_retried_then_reported():
    app = FaultInjector(bg_app(), ["garbage", "ok", "garbage", "garbage"])
    with ServerThread(app) as srv:
        fn = client(srv.url, retries=1)
        assert fn(items(1))[0].reward == pytest.approx(expected(0))
        res = fn(items(1))
        assert res[0].reward is None and "malformed reply" in res[0].error
        fn.close()


def test_oversized_request_and_wrong_token_raise_clearly():
    with ServerThread(bg_app(max_items=2, max_pixels=200, token="right")) as srv:
        with pytest.raises(RewardError, match="rejected the token"):
            client(srv.url, token="wrong").wait_healthy()
        fn = client(srv.url, token="right", chunk_size=4)
        with pytest.raises(RewardError, match=r"HTTP 413.*above the limit of 2"):
            fn(items(3))
        fn = client(srv.url, token="right", chunk_size=2)
        big = replace(items(1)[0], image=Image.new("RGB", (20, 20)))
        with pytest.raises(RewardError, match=r"HTTP 413.*pixels"):
            fn([big])


def test_bad_item_errors_alone_through_the_client():
    with ServerThread(bg_app()) as srv:
        fn = client(srv.url)
        batch = items(3)
        batch[1] = replace(batch[1], mask=Image.new("L", (4, 4), 255))
        res = fn(batch)
        assert res[1].reward is None and "mask is 4x4" in res[1].error
        assert res[0].reward == pytest.approx(expected(0)) and res[2].reward == pytest.approx(expected(2))
        rewards = reward_table(res)[:, 0]
        assert rewards.isnan().tolist() == [False, True, False]
        assert check_failure_budget(rewards, 0.5, res, "rewards failed") == 1


def test_local_and_remote_give_the_same_results():
    batch = [render_scene("Same", seed=i) for i in range(3)]
    batch[1] = replace(batch[1], image=batch[0].image)  # background differs from its source
    local = build_reward_fn(None, {"background": 1.0})(batch)
    with ServerThread(bg_app()) as srv:
        remote = build_reward_fn(srv.url, {"background": 1.0}, health_wait=5)(batch)
    assert [(r.id, r.reward, r.scores, r.error) for r in local] == [(r.id, r.reward, r.scores, r.error) for r in remote]
    assert local[1].reward < 1.0


def test_cropped_transport_scores_like_in_process(tiny_siglip):
    """With only crop-reading scorers weighted the client sends the mask window, not the image."""
    from train.rewards import OCRScorer, StyleScorer

    scorers = {"ocr": OCRScorer(), "style": StyleScorer(tiny_siglip)}
    weights = {"ocr": 0.5, "style": 0.5}
    batch = [render_scene("Crop"), render_scene("书法", box=(0, 0, 120, 60), seed=1),  # box at the corner
             render_scene("Loose", font_size=18, box=(10, 10, 246, 118), seed=2)]
    local = LocalReward(scorers, weights)(batch)
    with ServerThread(create_app(scorers)) as srv:
        fn = RemoteReward(srv.url, weights, health_wait=5)
        sent = fn._payload(batch)["items"]
        remote = fn(batch)
    assert all(decode_png_b64(s["image"]).size[0] < 256 for s in sent) and "source" not in sent[0]
    assert [(r.id, r.scores, r.error) for r in local] == [(r.id, r.scores, r.error) for r in remote]
    assert all(r.scores["ocr"] >= 0.9 for r in remote)


@pytest.mark.slow
def test_server_killed_mid_run_fails_cleanly_or_falls_back():
    a, url_a = spawn_server("--scorers", "background")
    b, url_b = spawn_server("--scorers", "background")
    try:
        alone = client(url_a, retries=1)
        with_fallback = client([url_a, url_b], retries=1)
        assert alone(items(2))[1].reward == pytest.approx(expected(1))
        a.kill()
        a.wait(timeout=10)
        res = alone(items(2))
        assert all(r.reward is None and "ConnectError" in r.error for r in res)
        with pytest.raises(RewardError, match="2/2 rewards failed"):
            check_failure_budget(reward_table(res)[:, 0], 0.0, res, "rewards failed")
        res = with_fallback(items(2))
        assert [r.reward for r in res] == pytest.approx([expected(0), expected(1)])
    finally:
        for p in (a, b):
            p.kill()
            p.wait(timeout=10)


def test_eight_concurrent_clients_fifty_requests_each():
    with ServerThread(bg_app()) as srv:
        errors, done = [], []

        def run(c: int):
            fn = client(srv.url, chunk_size=2, max_workers=1)
            batch = items(100, prefix=f"c{c}-")
            try:
                for r in range(50):
                    res = fn(batch[2 * r:2 * r + 2])
                    for k, out in enumerate(res):
                        i = 2 * r + k
                        if out.id != f"c{c}-{i}" or out.reward != pytest.approx(expected(i), abs=1e-6):
                            errors.append((c, i, out))
                done.append(c)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append((c, exc))
            finally:
                fn.close()

        threads = [threading.Thread(target=run, args=(c,)) for c in range(8)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        assert not errors, errors[:3]
        assert sorted(done) == list(range(8))


def test_shared_images_are_encoded_once_by_content_and_the_wire_is_unchanged():
    from train.rewards.schema import item_json

    fn = RemoteReward("http://127.0.0.1:9", "background=1.0", encode_cache_mb=1)  # never connects here
    group = items(4)  # equal masks and sources, each its own object
    assert fn._payload(group) == {"items": [item_json(it, ["mask", "source"]) for it in group],
                                  "weights": {"background": 1.0}}
    assert (fn.shared_pngs.misses, fn.shared_pngs.hits) == (2, 6)  # one mask, one source
    fn._payload(items(4, "again"))
    assert (fn.shared_pngs.misses, fn.shared_pngs.hits) == (2, 14)
    moved = items(1)[0]
    moved.source.putpixel((0, 0), (1, 2, 3))
    sent = fn._payload([moved])["items"][0]["source"]
    assert fn.shared_pngs.misses == 3 and decode_png_b64(sent).tobytes() == moved.source.tobytes()
    small = RemoteReward("http://127.0.0.1:9", "background=1.0", encode_cache_mb=1e-3)  # ~1 kB
    for i in range(12):  # 13 distinct PNGs of ~200 bytes (text + 100 counted per entry)
        small._payload([replace(items(1)[0], source=Image.new("RGB", (16, 16), (i, 0, 0)))])
    assert 0 < len(small.shared_pngs) < 13 and small.shared_pngs.bytes <= small.shared_pngs.max_bytes
    for f in (fn, small):
        f.close()
    with pytest.raises(ValueError, match="encode_cache_mb >= 0"):
        RemoteReward("http://127.0.0.1:9", "background=1.0", encode_cache_mb=-1)


def test_the_timeout_bounds_a_whole_request_even_while_bytes_keep_coming():
    """A reply trickling one byte every 50 ms never idles a read for a second: the deadline still ends it."""
    app = FaultInjector(bg_app(), ["trickle", "trickle"])
    with ServerThread(app) as srv:
        fn = client(srv.url, timeout=1.0, retries=1)
        fn.wait_healthy()
        t0 = time.monotonic()
        res = fn(items(1))
        elapsed = time.monotonic() - t0
        fn.close()
    assert app.seen == ["trickle", "trickle"]
    assert res[0].reward is None and "timed out after 1s" in res[0].error and "2 attempt(s)" in res[0].error
    assert elapsed < 3.0, elapsed


def test_after_the_primary_fails_every_url_is_tried_at_once():
    failing, stalled, good = (FaultInjector(bg_app(), plan) for plan in (["500"] * 10, ["sleep:5"] * 10, []))
    with ServerThread(failing) as a, ServerThread(stalled) as b, ServerThread(good) as c:
        fn = client([a.url, b.url, c.url], timeout=3.0, retries=2)
        fn.wait_healthy()
        t0 = time.monotonic()
        res = fn(items(2))
        elapsed = time.monotonic() - t0
        fn.close()
    assert [r.reward for r in res] == pytest.approx([expected(0), expected(1)])
    assert elapsed < 1.5, elapsed  # one after another: 3 x HTTP 500, then 3 x 3 s waiting on the stalled server
    assert failing.seen[0] == "500" and good.seen == ["ok"] and fn.stats["retries"] == 1


def test_with_every_url_down_a_chunk_fails_after_the_retry_rounds_not_once_per_url():
    apps = [FaultInjector(bg_app(), ["sleep:5"] * 10) for _ in range(3)]
    with ServerThread(apps[0]) as s0, ServerThread(apps[1]) as s1, ServerThread(apps[2]) as s2:
        fn = client([s0.url, s1.url, s2.url], timeout=0.5, retries=1)
        fn.wait_healthy()
        t0 = time.monotonic()
        res = fn(items(1))
        elapsed = time.monotonic() - t0
        fn.close()
    assert res[0].reward is None and "failed after 4 attempt(s)" in res[0].error
    assert "timed out after 0.5s" in res[0].error
    assert elapsed < 1.6, elapsed  # the primary, then all three at once; one after another: 3 URLs x 2 x 0.5 s
    assert [len(a.seen) for a in apps] == [2, 1, 1]


def test_bad_urls_timeout_and_retries_are_refused_at_start_up():
    from train.config import parse_args, validate

    t0 = time.monotonic()
    for url, reason in [("ftp://h:1", "'ftp://h:1'"), ("not a url", "'not a url'"),
                        ("localhost:8000", "'localhost:8000'"), ("http://:80", "'http://:80'"),
                        ("http://h:0", "'http://h:0'"), ("http://h/?a=1", "'http://h/?a=1'"),
                        ("http://h:99999", "'http://h:99999' (Port out of range 0-65535)"),
                        ("http://h:1,http://h:x", "'http://h:x' (Port could not be cast")]:
        with pytest.raises(ValueError, match=r"^not an http\(s\)://host\[:port\] URL: " + re.escape(reason)):
            RemoteReward(url, "background=1")
    assert time.monotonic() - t0 < 1.0  # refused, not waited on
    assert RemoteReward("https://h:443/reward/, http://[::1]:8000", "background=1").urls == [
        "https://h:443/reward", "http://[::1]:8000"]
    problems = validate(parse_args(["--use_rl", "--reward_server_url", "http://ok:1,ftp://h,not a url",
                                    "--reward_timeout", "0", "--reward_retries", "-1"]))
    assert [p for p in problems if "--reward" in p] == [
        "--reward_timeout must be > 0, got 0.0", "--reward_retries must be >= 0, got -1",
        "--reward_server_url: not an http(s)://host[:port] URL: 'ftp://h', 'not a url'"]
    problems = validate(parse_args(["--use_rl", "--reward_timeout", "inf", "--reward_server_url", "http://ok:1"]))
    assert [p for p in problems if "--reward" in p] == ["--reward_timeout must be a finite number, got inf"]
    cfg = parse_args(["--reward_timeout", "7.5", "--reward_retries", "0"])
    assert (cfg.reward_timeout, cfg.reward_retries) == (7.5, 0)


def test_a_server_of_another_protocol_version_is_refused_at_once():
    from fastapi import FastAPI

    old = FastAPI()

    @old.get("/health")
    def health():  # what a server of protocol version 1 answers
        return {"status": "ok", "scorers": ["background"], "version": "1", "device": "cpu", "max_items": 256,
                "max_pixels": 2**24, "max_request_pixels": 2**26, "max_body_bytes": 2**28}

    with ServerThread(old) as srv:
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=rf"reward server {srv.url} speaks protocol version '1', this client "
                                              r"'2': run the same release"):
            client(srv.url, health_wait=5.0).wait_healthy()
        assert time.monotonic() - t0 < 2.0


def test_servers_that_run_different_models_for_a_weighted_scorer_are_refused():
    from train.rewards import ContrastScorer

    class Retrained(BackgroundScorer):  # another model behind the same scorer name
        pass

    with ServerThread(bg_app()) as a, ServerThread(bg_app()) as b, \
            ServerThread(create_app({"background": Retrained(), "contrast": ContrastScorer()})) as c:
        health = client([a.url, b.url]).wait_healthy()
        assert {u: h["models"] for u, h in health.items()} == {a.url: {"background": "BackgroundScorer"},
                                                                b.url: {"background": "BackgroundScorer"}}
        with pytest.raises(RewardError, match=rf"run different models for the background scorer: 'BackgroundScorer' "
                                              rf"at {a.url}, {b.url}; 'Retrained' at {c.url}$"):
            client([a.url, b.url, c.url]).wait_healthy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train.data.synthesize import synthesize

    return synthesize(tmp_path_factory.mktemp("data"), num=8, resolution=64, langs=("en",), seed=3)


def test_training_gives_the_client_its_reward_timeout_and_retries(tiny_models, data, tmp_path, capsys):
    """Every reply comes after 2 s: a reward within the default 60 s; with --reward_timeout 1 and no retry
    the first reward step fails, one clear line."""
    from train.rewards import ContrastScorer
    from train.tests.rl_helpers import rl_args
    from train.train import main

    app = FaultInjector(create_app({"contrast": ContrastScorer()}), ["sleep:2"] * 100)
    with ServerThread(app) as srv:
        argv = rl_args(tiny_models, data, tmp_path / "run", 2, reward_server_url=srv.url, reward_timeout=1,
                       reward_retries=0)
        assert main(argv) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rewards could not be computed" in errors[0], errors
    assert "failed after 1 attempt(s)" in errors[0] and "timed out after 1s" in errors[0], errors
    assert app.seen == ["sleep:2"]
