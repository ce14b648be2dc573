"""The reward server over real HTTP on a loopback port: protocol, limits, auth, batching,
malformed bodies, memory bounds and start-up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from train.reward_server import Batcher, Job, create_app
from train.rewards import API_VERSION, BackgroundScorer, ContrastScorer, ItemScore, OCRScorer, Scorer
from train.rewards.codec import encode_png_b64
from train.rewards.schema import ItemIn, item_json
from train.tests.reward_helpers import REPO, ServerThread, peak_rss_mb, render_scene, spawn_server, tiny_siglip  # noqa: F401


def payload(items, weights=None) -> dict:
    return {"items": [item_json(it) for it in items], **({"weights": weights} if weights is not None else {})}


@pytest.fixture(scope="module")
def server():
    app = create_app({"ocr": OCRScorer(), "background": BackgroundScorer()}, token="s3cret",
                     max_items=8, max_pixels=300 * 300, batch_window_ms=20)
    with ServerThread(app) as srv:
        yield srv, app


AUTH = {"Authorization": "Bearer s3cret"}
# Peak memory a reward server may gain at the default limits (--max_request_pixels 67 M): one
# merged batch of decoded images (at most 4 bytes per pixel: 256 MiB) plus the copies a scorer
# makes of one 4096² image, plus request bodies. Without the limits, 256 items of 4096² images decode to 48 GiB.
MEMORY_BOUND_MB = 700


def test_health(server):
    srv, _ = server
    body = httpx.get(f"{srv.url}/health", headers=AUTH).json()
    assert body["status"] == "ok" and body["scorers"] == ["ocr", "background"]
    assert body["version"] == API_VERSION == "2" and body["device"] == "cpu" and body["max_items"] == 8
    assert body["max_pixels"] == 300 * 300 and body["max_request_pixels"] == 4 * 4096 * 4096
    assert body["models"] == {"ocr": f"rapidocr {version('rapidocr')} (detect=auto, min_confidence=0.5, "
                                     "confident=0.9, pad=4)", "background": "BackgroundScorer"}


def test_score_with_a_corrupt_image_in_one_item(server):
    srv, _ = server
    items = [render_scene("Hello"), render_scene("书法", seed=1), render_scene("World", seed=2)]
    body = payload(items, weights={"ocr": 0.75, "background": 0.25})
    body["items"][1]["image"] = body["items"][1]["image"][:200]  # truncated PNG
    resp = httpx.post(f"{srv.url}/score", json=body, headers=AUTH, timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    res = resp.json()["results"]
    assert [r["id"] for r in res] == [it.id for it in items]
    assert res[1]["reward"] is None and "bad image: corrupt PNG" in res[1]["error"]
    for r in (res[0], res[2]):
        assert r["error"] is None and r["scores"]["background"] == 1.0 and r["scores"]["ocr"] >= 0.9
        assert r["reward"] == pytest.approx(0.75 * r["scores"]["ocr"] + 0.25)
        assert r["details"]["ocr"]["recognised"]


def test_default_reward_is_the_mean_and_subsets_run_only_named_scorers(server):
    srv, _ = server
    item = replace(render_scene(""), text="Hello")  # blank: ocr 0, background 1
    res = httpx.post(f"{srv.url}/score", json=payload([item]), headers=AUTH, timeout=30).json()["results"][0]
    assert res["scores"] == {"ocr": 0.0, "background": 1.0} and res["reward"] == pytest.approx(0.5)
    res = httpx.post(f"{srv.url}/score", json=payload([item], {"background": 1.0}), headers=AUTH,
                     timeout=30).json()["results"][0]
    assert res["scores"] == {"background": 1.0} and res["reward"] == 1.0


def test_limits_and_bad_requests(server):
    srv, _ = server
    url = f"{srv.url}/score"
    small = render_scene("a", size=(64, 64), box=(8, 8, 56, 56))
    exactly = payload([replace(small, id=str(i)) for i in range(8)], weights={"background": 1.0})
    r = httpx.post(url, json=exactly, headers=AUTH, timeout=30)
    assert r.status_code == 200 and [x["reward"] for x in r.json()["results"]] == [1.0] * 8
    many = payload([replace(small, id=str(i)) for i in range(9)])
    r = httpx.post(url, json=many, headers=AUTH)
    assert r.status_code == 413 and r.json()["detail"] == "9 items in one request, above the limit of 8"
    big = payload([render_scene("a", size=(400, 300), box=(8, 8, 56, 56))])
    r = httpx.post(url, json=big, headers=AUTH)
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    r = httpx.post(url, content=b'{"items": [', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["detail"]
    r = httpx.post(url, json={"items": [{"id": "x"}]}, headers=AUTH)
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = httpx.post(url, json={**payload([small]), "weights": {"vlm": 1.0}}, headers=AUTH)
    assert r.status_code == 422 and "does not run" in r.json()["detail"]
    r = httpx.post(url, json={**payload([small]), "weights": {"ocr": -1.0}}, headers=AUTH)
    assert r.status_code == 422 and "invalid weights" in r.json()["detail"]
    dup = payload([small, small])
    assert httpx.post(url, json=dup, headers=AUTH).status_code == 422
    r = httpx.post(url, content=b"items=1", headers={**AUTH, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


def test_token(server):
    srv, _ = server
    wrong = ["", "Bearer nope", "Bearer s3cret2", "Bearer xs3cret", "Bearer s3cre", "Bearer s3cret s3cret",
             "Basic s3cret", "s3cret", "Bearers3cret", "Bearer"]
    for value in wrong:
        headers = {"Authorization": value} if value else {}
        assert httpx.get(f"{srv.url}/health", headers=headers).status_code == 401, value
        r = httpx.post(f"{srv.url}/score", json={"items": []}, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["detail"], value
    for value in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):  # the scheme is case-insensitive
        assert httpx.get(f"{srv.url}/health", headers={"Authorization": value}).status_code == 200, value


def test_docs_are_not_served_when_a_token_is_set(server):
    srv, _ = server
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        for headers in ({}, AUTH):
            assert httpx.get(f"{srv.url}{path}", headers=headers).status_code == 404, path
    with ServerThread(create_app({"background": BackgroundScorer()})) as open_srv:  # no token: docs are public
        assert httpx.get(f"{open_srv.url}/openapi.json").json()["info"]["title"] == "Calligrapher reward server"


def test_body_limit_declared_and_chunked():
    with ServerThread(create_app({"background": BackgroundScorer()}, max_body_mb=0.01)) as srv:  # 10485 bytes
        # A declared Content-Length above the limit is refused before the body is read: the
        # server answers although the client sent only the headers.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n{")
            reply = b""
            while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 71:
                part = sock.recv(4096)
                if not part:
                    break
                reply += part
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413") and "1000000000 bytes, above the limit of 10485" in reply
        # Chunked transfer (no Content-Length): counted while streaming.
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        big = json.dumps(payload([replace(render_scene("a", size=(64, 64), box=(8, 8, 56, 56)), image=noise)])).encode()
        assert 10485 < len(big) < 100000

        def chunks(data):
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        r = httpx.post(f"{srv.url}/score", content=chunks(big), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413 and r.json()["detail"] == "request body is above the limit of 10485 bytes"
        small = json.dumps(payload([render_scene("", size=(8, 8), box=(2, 2, 6, 6))])).encode()
        r = httpx.post(f"{srv.url}/score", content=chunks(small), headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["results"][0]["reward"] == 1.0


def test_malformed_bodies_are_422_and_keep_the_connection(server):
    srv, _ = server
    cases = [  # (body, start of the reason)
        (b'{"items": [], "weights": {"\xff\xfe": 1}}', "malformed JSON: invalid unicode code point"),  # not UTF-8
        (b"\xe9t\xe9", "malformed JSON: expected value at line 1 column 1"),
        (b"[" * 50000 + b"]" * 50000, "malformed JSON: recursion limit exceeded"),
        (b'{"items": ' + b"[" * 50000, "malformed JSON: recursion limit exceeded"),
        (b'{"items": [{"id": "\\ud800", "image": "", "text": "t"}]}', "malformed JSON:"),  # lone surrogate
        (b"", "malformed JSON: EOF"),
        (b"[]", "invalid request: body: Input should be an object"),
        (b'{"items": [], "weights": {"background": true}}', "invalid request: weights.background: Input should be a valid number"),
        (b'{"items": [], "weights": {"background": NaN}}', "invalid request: weights.background: Input should be a finite number"),
        (b'{"items": {"id": "a"}}', "invalid request: items: Input should be a valid array"),
        (b'{"items": [], "extra": 1}', "invalid request: extra: Extra inputs are not permitted"),
    ]
    with httpx.Client(headers={**AUTH, "content-type": "application/json"}) as http:
        addr = None
        for body, reason in cases:
            r = http.post(f"{srv.url}/score", content=body)
            assert r.status_code == 422, (body[:40], r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert detail.startswith(reason) and "\n" not in detail and len(detail) < 300, (body[:40], detail)
            here = r.extensions["network_stream"].get_extra_info("client_addr")
            assert addr in (None, here), f"{body[:40]!r}: the server closed the keep-alive connection"
            addr = here


def test_concurrent_requests_share_scorer_calls(server):
    srv, app = server
    batcher = app.state.batcher
    before = batcher.batches
    items = [render_scene("Batch", seed=i) for i in range(8)]
    bodies = [payload([replace(it, id=f"r{i}")]) for i, it in enumerate(items)]
    barrier, out = threading.Barrier(len(bodies)), {}

    def send(i):
        barrier.wait(timeout=10)
        out[i] = httpx.post(f"{srv.url}/score", json=bodies[i], headers=AUTH, timeout=30).json()["results"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert sorted(out) == list(range(8))
    assert all(out[i][0]["id"] == f"r{i}" and out[i][0]["error"] is None for i in out)
    assert batcher.batches - before < len(bodies)  # several requests were scored in one call


class PathError(Scorer):
    """Fails like third-party engines do: an empty message wrapping one that names a file."""

    name = "patherror"

    def _score_batch(self, items):
        try:
            raise FileNotFoundError(2, "No such file or directory", "/opt/models/ocr/rec.onnx")
        except FileNotFoundError as exc:
            raise RuntimeError() from exc


class BrokenBatch(Scorer):
    """A scorer whose batch call itself is broken (not per item): the request fails with HTTP 500."""

    name = "broken"

    def score_batch(self, items):
        raise ValueError("model at /srv/secret/weights/model.bin\nfailed to load")


class NaNDetail(Scorer):
    """Scores 0.5 and reports a non-finite number among its details."""

    name = "nandetail"

    def _score_batch(self, items):
        return [ItemScore.ok(0.5, ratio=float("nan"), nested={"x": [1.0, float("inf")]}) for _ in items]


def test_non_finite_details_become_null_not_a_500():
    item = render_scene("", size=(32, 32), box=(4, 4, 28, 28))
    with ServerThread(create_app({"nandetail": NaNDetail()})) as srv:
        r = httpx.post(f"{srv.url}/score", json=payload([item]), timeout=30)
    assert r.status_code == 200 and "NaN" not in r.text and "Infinity" not in r.text
    assert r.json()["results"][0] == {"id": item.id, "reward": 0.5, "scores": {"nandetail": 0.5},
                                      "details": {"nandetail": {"ratio": None, "nested": {"x": [1.0, None]}}},
                                      "error": None}


def test_errors_are_one_line_without_tracebacks_or_paths():
    item = render_scene("", size=(32, 32), box=(4, 4, 28, 28))
    with ServerThread(create_app({"patherror": PathError(), "background": BackgroundScorer()})) as srv:
        res = httpx.post(f"{srv.url}/score", json=payload([item]), timeout=30).json()["results"][0]
    assert res["reward"] is None and res["scores"] == {"background": 1.0}
    assert res["error"] == "patherror: RuntimeError: [Errno 2] No such file or directory: 'rec.onnx'"
    assert res["details"] == {"background": {"mae": 0.0, "pixels": 448}}  # no traceback anywhere
    with ServerThread(create_app({"broken": BrokenBatch()})) as srv:
        r = httpx.post(f"{srv.url}/score", json=payload([item]), timeout=30)
    assert r.status_code == 500
    assert r.json() == {"detail": "scoring failed: ValueError: model at model.bin failed to load"}


def test_16_bit_images_are_scaled_not_clipped():
    arr = np.full((8, 8), 0x2000, dtype=np.uint16)
    arr[:, 4:] = 0x8000  # 32 and 128 at 8 bits (a clipping conversion makes both 255)
    image, mask = Image.fromarray(arr), Image.fromarray(np.full((8, 8), 0xFFFF, dtype=np.uint16))
    assert image.mode == mask.mode == "I;16"
    item = {"id": "a", "text": "t", "image": encode_png_b64(image), "mask": encode_png_b64(mask)}
    modes = []

    class Recording(ContrastScorer):  # the real scorer, recording the image modes it gets
        def _score_batch(self, items):
            modes.extend((it.image.mode, it.mask.mode) for it in items)
            return super()._score_batch(items)

    with ServerThread(create_app({"contrast": Recording()})) as srv:
        res = httpx.post(f"{srv.url}/score", json={"items": [item]}, timeout=30).json()["results"][0]
    assert res["error"] is None and res["scores"]["contrast"] == pytest.approx(96 / 255, abs=1e-12)
    assert modes == [("RGB", "L")]  # every scorer (style included) gets 8-bit images


def test_batches_merge_within_the_item_and_pixel_budgets():
    """Jobs queued together are merged into one scorer call only while both budgets hold."""
    seen = []

    class Recording(ContrastScorer):  # the real scorer, recording each batch it gets
        def _score_batch(self, items):
            seen.append([it.id for it in items])
            return super()._score_batch(items)

    img, mask = encode_png_b64(Image.new("RGB", (8, 8))), encode_png_b64(Image.new("L", (8, 8), 255))

    def job(*ids):  # 64 + 64 pixels per item
        return Job([ItemIn(id=i, image=img, mask=mask, text="t") for i in ids], {"contrast": 1.0},
                   ("image", "mask"), False, 128 * len(ids), Future())

    for kw, expected in [({"max_batch_items": 2, "max_batch_pixels": 10**6}, [["a"], ["b", "c"], ["d", "e"]]),
                         ({"max_batch_items": 10, "max_batch_pixels": 400}, [["a", "b", "c"], ["d", "e"]]),
                         ({"max_batch_items": 10, "max_batch_pixels": 10**6}, [["a", "b", "c", "d", "e"]])]:
        seen.clear()
        batcher = Batcher({"contrast": Recording()}, **kw)
        jobs = [job("a"), job("b", "c"), job("d"), job("e")]
        for j in jobs:  # all queued before the worker starts: merging is deterministic
            batcher.submit(j)
        batcher.start()
        results = [j.future.result(timeout=30) for j in jobs]
        batcher.stop()
        assert seen == expected, kw
        assert [[r.id for r in rs] for rs in results] == [["a"], ["b", "c"], ["d"], ["e"]]
        assert all(r.error is None and r.reward == 0.0 for rs in results for r in rs)


def test_only_the_images_the_scorers_read_are_decoded_and_crops_stay_crops():
    sizes = []

    class Recording(ContrastScorer):  # the real scorer, recording the image sizes it gets
        def _score_batch(self, items):
            sizes.extend(it.image.size for it in items)
            return super()._score_batch(items)

    item = render_scene("Crop", size=(256, 128), box=(24, 34, 232, 94))
    body = item_json(item)
    body["source"] = body["source"][:100]  # corrupt, but the weighted scorers do not read it
    with ServerThread(create_app({"contrast": Recording(), "background": BackgroundScorer()})) as srv:
        url = f"{srv.url}/score"
        res = httpx.post(url, json={"items": [body], "weights": {"contrast": 1.0}}, timeout=30).json()["results"][0]
        assert res["error"] is None and sizes == [(208 + 16, 60 + 16)]  # the mask box plus CROP_MARGIN around it
        res = httpx.post(url, json={"items": [body], "weights": {"contrast": 0.5, "background": 0.5}},
                         timeout=30).json()["results"][0]
        assert res["error"].startswith("bad image: corrupt PNG") and sizes == [(224, 76)]  # not scored
        body["source"] = item_json(item)["source"]
        res = httpx.post(url, json={"items": [body], "weights": {"contrast": 0.5, "background": 0.5}},
                         timeout=30).json()["results"][0]
        assert res["error"] is None and sizes == [(224, 76), (256, 128)]  # background reads the whole image
        assert res["scores"]["contrast"] == Recording().score_batch([item])[0].score


@pytest.mark.slow
def test_memory_stays_bounded_with_many_4096px_images():
    """256 items of 4096² images: 413 from the PNG headers; requests within the pixel budget are
    scored, concurrently, with the server's peak memory below the documented bound."""
    side = 4096
    image = Image.new("RGB", (side, side), (40, 80, 120))
    image.paste((0, 0, 0), (1000, 1000, 1200, 1200))
    image.paste((255, 255, 255), (1200, 1000, 1400, 1200))  # inside the mask: half black, half white
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (1000, 1000, 1400, 1200))
    png, mask_png = encode_png_b64(image, compress_level=9), encode_png_b64(mask, compress_level=9)

    def body(n, weights, source=False) -> bytes:
        items = [{"id": str(i), "text": "t", "image": png, "mask": mask_png, **({"source": png} if source else {})}
                 for i in range(n)]
        return json.dumps({"items": items, "weights": weights}).encode()

    proc, url = spawn_server("--scorers", "contrast,background")
    try:
        small = {"items": [item_json(render_scene("", size=(32, 32), box=(4, 4, 28, 28)))], "weights": None}
        assert httpx.post(f"{url}/score", json=small, timeout=60).status_code == 200  # imports done
        baseline = peak_rss_mb(proc.pid)
        bound = baseline + MEMORY_BOUND_MB
        stop = threading.Event()

        def watchdog():  # kill the server before it can take the machine's memory
            while not stop.wait(0.01):
                if peak_rss_mb(proc.pid) > bound:
                    proc.kill()
                    return

        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as http:
            r = http.post(f"{url}/score", content=body(256, {"contrast": 1.0}))
            assert r.status_code == 413, r.text[:300]
            assert r.json()["detail"] == ("the request's images decode to 8589934592 pixels, above the limit of "
                                          "67108864 per request; send fewer or smaller images")
            r = http.post(f"{url}/score", content=body(256, {"background": 1.0}, source=True))
            assert r.status_code == 413 and "above the limit of 67108864" in r.json()["detail"]
            out = {}

            def send(k, data):
                out[k] = http.post(f"{url}/score", content=data)

            # two full decodes (image, mask, source: 50 M pixels each) and a crop-only request
            # (2 items x 2 images: 67 M pixels) at once: the batcher must not merge them past the budget
            full, crop = body(1, {"background": 0.5, "contrast": 0.5}, source=True), body(2, {"contrast": 1.0})
            threads = [threading.Thread(target=send, args=job) for job in [(0, full), (1, full), (2, crop)]]
            [t.start() for t in threads]
            [t.join(timeout=120) for t in threads]
        stop.set()
        peak = peak_rss_mb(proc.pid) if proc.poll() is None else float("inf")
        print(f"reward server peak RSS {peak:.0f} MiB, baseline {baseline:.0f} MiB")
        assert peak <= bound, f"peak RSS {peak:.0f} MiB, above {bound:.0f} MiB (baseline {baseline:.0f} MiB)"
        results = [res for k in range(3) for res in out[k].json()["results"]]
        assert len(results) == 4 and all(res["error"] is None and res["reward"] == 1.0 for res in results), results
        assert [res["scores"] for res in results] == [{"background": 1.0, "contrast": 1.0}] * 2 + [{"contrast": 1.0}] * 2
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_cli_rejects_bad_flags(capsys):
    from train.reward_server import main

    for argv, reason in [(["--scorers", "style"], "siglip_path"), (["--scorers", "ocr,clip"], "unknown scorer(s) clip"),
                         (["--scorers", "background", "--max_pixels", "100", "--max_request_pixels", "99"],
                          "--max_request_pixels (99) must be >= --max_pixels (100)"),
                         (["--scorers", "background", "--image_cache_mb", "-1"], "--image_cache_mb must be >= 0")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and reason in capsys.readouterr().err


def test_start_event_once_listening_and_busy_port_exits_3():
    proc, url = spawn_server("--scorers", "contrast")  # returns as soon as the start event is read
    try:
        assert httpx.get(f"{url}/health", timeout=10).json()["scorers"] == ["contrast"]  # no retry needed
        port = int(url.rsplit(":", 1)[1])
        busy = subprocess.run([sys.executable, "-m", "train.reward_server", "--scorers", "contrast", "--port",
                               str(port)], cwd=REPO, capture_output=True, timeout=120)
        assert busy.returncode == 3 and busy.stdout == b""
        assert busy.stderr.decode().strip().splitlines()[-1] == (
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_shared_images_are_decoded_once_and_references_embedded_once_across_requests(tiny_siglip):
    """Same content in two requests (encoded afresh each time) hits the caches; scores equal the uncached ones."""
    from train.rewards.style import StyleScorer

    ref, src = render_scene("Ref", seed=7).reference, render_scene("", seed=0).source
    group = [replace(render_scene("Same", color=(40 * k, 20, 110)), id=f"k{k}", reference=ref.copy(), source=src.copy())
             for k in range(3)]  # a group: one reference, source and mask (equal content, distinct objects)
    group.append(replace(render_scene("Else", seed=5), id="x", reference=render_scene("Other", seed=6).image))
    style = StyleScorer(tiny_siglip, threads=1)
    app = create_app({"style": style, "background": BackgroundScorer()})
    cold = create_app({"style": StyleScorer(tiny_siglip, threads=1, reference_cache=0),
                       "background": BackgroundScorer()}, image_cache_mb=0)
    with ServerThread(app) as srv, ServerThread(cold) as ref:
        first = httpx.post(f"{srv.url}/score", json=payload(group), timeout=60).json()["results"]
        decoder = app.state.batcher.shared_images
        assert style.embedded == 4 + 2 and len(style.references) == 2  # 4 crops, 2 distinct references
        assert (decoder.misses, decoder.hits) == (1 + 2 + 2, 12 - 5)  # distinct masks, references, sources
        second = httpx.post(f"{srv.url}/score", json=payload(group[::-1]), timeout=60).json()["results"]
        assert style.embedded == 6 + 4  # the crops alone: both references came from the cache
        assert (decoder.misses, decoder.hits) == (5, 7 + 12)
        uncached = httpx.post(f"{ref.url}/score", json=payload(group), timeout=60).json()["results"]
        assert cold.state.batcher.shared_images.hits == 0 and len(cold.state.batcher.shared_images) == 0
    for a, b in zip(first, uncached):
        assert a["scores"].keys() == b["scores"].keys() == {"style", "background"}
        assert all(abs(a["scores"][n] - b["scores"][n]) <= 1e-6 for n in a["scores"])
    assert [r["scores"] for r in second[::-1]] == [pytest.approx(r["scores"], abs=1e-6) for r in first]


def test_decode_cache_is_bounded_and_never_stores_errors():
    from train.rewards.codec import DecodeCache, ImageDecodeError, pil_bytes

    pngs = [encode_png_b64(Image.new("RGB", (32, 32), (i, 0, 0))) for i in range(5)]
    one = pil_bytes(Image.new("RGB", (32, 32))) + max(map(len, pngs))
    cache = DecodeCache(2 * one + 10)
    for data in pngs:
        cache.decode(data, None, "RGB")
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes and cache.misses == 5
    assert cache.decode(pngs[4], None, "RGB").getpixel((0, 0)) == (4, 0, 0) and cache.hits == 1
    assert cache.decode(pngs[4], None, "L").mode == "L" and cache.misses == 6  # the mode is part of the key
    assert cache.decode(pngs[0], None, "RGB").getpixel((0, 0)) == (0, 0, 0) and cache.misses == 7  # evicted
    for _ in range(2):
        with pytest.raises(ImageDecodeError):
            cache.decode(pngs[1][:60], None, "RGB")
    assert cache.misses == 9 and all(k[0] != pngs[1][:60] for k in cache._entries)


def read_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    reply = b""
    while part := sock.recv(65536):
        reply += part
    return reply


def test_stalled_request_heads_are_closed_and_connections_capped():
    proc, url = spawn_server("--scorers", "contrast", "--header_timeout", "1", "--max_connections", "4")
    port = int(url.rsplit(":", 1)[1])
    try:
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        stalled[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        t0 = time.monotonic()
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 503  # a fourth connection while three are open
        stop = threading.Event()

        def trickle():  # bytes keep coming, but the head never completes
            while not stop.wait(0.2):
                try:
                    stalled[1].send(b"X-Slow: 1\r\n")
                except OSError:
                    return

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        try:
            for sock in stalled:
                try:
                    assert read_reply(sock) == b""  # closed by the server without a reply
                except ConnectionResetError:
                    pass  # closed while our bytes were unread
        finally:
            stop.set()
            feeder.join(timeout=5)
            for sock in stalled:
                sock.close()
        assert 0.9 < time.monotonic() - t0 < 3.0
        assert httpx.get(f"{url}/health", timeout=10).json()["scorers"] == ["contrast"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_slow_bodies_time_out_and_bodies_being_received_share_a_budget():
    app = create_app({"background": BackgroundScorer()}, max_body_mb=0.2, max_inflight_body_mb=0.3, body_timeout=1.5)
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
    with ServerThread(app) as srv:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        t0 = time.monotonic()
        slow.sendall(head + b" " * 150_000)  # then nothing more
        other = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        other.sendall(head + b" " * 164_000)  # 314 000 bytes being received: within 0.3 MB = 314 572
        time.sleep(0.5)
        other.sendall(b" " * 1000)
        reply = read_reply(other).decode()
        assert reply.startswith("HTTP/1.1 503") and "connection: close" in reply.lower()
        assert "the server is receiving 314000 bytes of request bodies, near its limit of 314572" in reply
        reply = read_reply(slow).decode()
        assert reply.startswith("HTTP/1.1 408") and "request body not received within 1.5s" in reply
        assert 1.4 < time.monotonic() - t0 < 3.0
        for sock in (slow, other):
            sock.close()
        item = render_scene("", size=(8, 8), box=(2, 2, 6, 6))
        r = httpx.post(f"{srv.url}/score", json=payload([item]), timeout=30)  # the budget was given back
        assert r.status_code == 200 and r.json()["results"][0]["reward"] == 1.0
    with pytest.raises(ValueError, match=r"max_inflight_body_mb \(1\) must be >= max_body_mb \(2\)"):
        create_app({"background": BackgroundScorer()}, max_body_mb=2, max_inflight_body_mb=1)


def test_cli_refuses_a_public_address_without_a_token_and_ports_out_of_range(tmp_path):
    """Refused before anything is bound: one line and exit status 2 (a server that started would hang this test)."""
    env = {k: v for k, v in os.environ.items() if k != "REWARD_SERVER_TOKEN"}
    for args, reason in [(["--host", "0.0.0.0"], ("--host 0.0.0.0 is reachable from other machines: set a shared "
                                                  "secret with --token_file or REWARD_SERVER_TOKEN")),
                         (["--port", "99999"], "--port must be in 0..65535, got 99999"),
                         (["--port", "-1", "--header_timeout", "0"],
                          "--port must be in 0..65535, got -1; --header_timeout must be a finite number > 0, got 0.0")]:
        res = subprocess.run([sys.executable, "-m", "train.reward_server", "--scorers", "contrast", *args], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stdout == "", (args, res.stdout)
        assert res.stderr.strip().splitlines()[-1].endswith(f"error: {reason}"), (args, res.stderr)


def test_cli_token_from_a_file_not_the_command_line(tmp_path, capsys):
    from train.reward_server import main

    secret = tmp_path / "token"
    secret.write_text("s3cret-from-file\n")
    proc, url = spawn_server("--scorers", "contrast", "--token_file", str(secret))
    try:
        assert b"s3cret" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # what ps shows
        assert httpx.get(f"{url}/health", timeout=10).status_code == 401
        health = httpx.get(f"{url}/health", headers={"Authorization": "Bearer s3cret-from-file"}, timeout=10)
        assert health.status_code == 200 and health.json()["scorers"] == ["contrast"]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    (tmp_path / "empty").write_text("\n")
    for argv, reason in [(["--token_file", str(tmp_path / "empty")], "is empty"),
                         (["--token_file", str(tmp_path / "nope")], "cannot be read (No such file or directory)"),
                         (["--token_file", str(secret), "--token", "x"], "give --token or --token_file, not both"),
                         (["--body_timeout", "nan", "--max_connections", "0"],
                          "--max_connections must be >= 1, got 0; --body_timeout must be a finite number > 0, got nan"),
                         (["--max_body_mb", "8", "--max_inflight_body_mb", "4"],
                          "--max_inflight_body_mb (4) must be >= --max_body_mb (8)")]:
        with pytest.raises(SystemExit) as exc:
            main(["--scorers", "contrast", *argv])
        assert exc.value.code == 2 and reason in capsys.readouterr().err, argv


def test_health_names_each_scorers_model(tiny_siglip, tmp_path):
    """The style scorer's identity follows its weights: equal for the same folder, different for other weights
    or another dtype."""
    import torch

    from train.models.tiny import write_tiny_siglip
    from train.rewards.style import StyleScorer

    other = write_tiny_siglip(tmp_path / "siglip", seed=1)
    a, b, c = StyleScorer(tiny_siglip), StyleScorer(tiny_siglip, threads=1), StyleScorer(other)
    half = StyleScorer(tiny_siglip, dtype=torch.bfloat16)
    assert a.identity == b.identity and a.identity.startswith(f"SigLIP {Path(tiny_siglip).name} ")
    assert len({a.identity, c.identity, half.identity}) == 3
    with ServerThread(create_app({"style": a, "contrast": ContrastScorer()})) as srv:
        models = httpx.get(f"{srv.url}/health", timeout=10).json()["models"]
    assert models == {"style": a.identity, "contrast": "ContrastScorer"}


def test_cli_refuses_a_siglip_path_that_does_not_load(tmp_path):
    """One line and exit status 2 for a missing folder and for one whose model does not load, no traceback."""
    broken = tmp_path / "broken-siglip"
    broken.mkdir()
    (broken / "config.json").write_text("not json")
    for path, reason in [(tmp_path / "nope", f"--siglip_path {tmp_path / 'nope'} is not a folder"),
                         (broken, f"cannot load the scorers' models (--siglip_path {broken}):")]:
        res = subprocess.run([sys.executable, "-m", "train.reward_server", "--scorers", "style", "--siglip_path",
                              str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert reason in res.stderr.strip().splitlines()[-1], res.stderr[-500:]
