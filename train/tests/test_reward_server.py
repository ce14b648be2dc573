"""The reward server over real HTTP on a loopback port: protocol, limits, auth, batching."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import httpx
import pytest

from train.reward_server import create_app
from train.rewards import BackgroundScorer, OCRScorer, encode_png_b64
from train.tests.reward_helpers import ServerThread, render_scene


def payload(items, weights=None) -> dict:
    out = []
    for it in items:
        d = {"id": it.id, "text": it.text, "image": encode_png_b64(it.image)}
        for f in ("mask", "reference", "source"):
            if getattr(it, f) is not None:
                d[f] = encode_png_b64(getattr(it, f))
        out.append(d)
    return {"items": out, **({"weights": weights} if weights is not None else {})}


@pytest.fixture(scope="module")
def server():
    app = create_app({"ocr": OCRScorer(), "background": BackgroundScorer()}, token="s3cret",
                     max_items=8, max_pixels=300 * 300, batch_window_ms=20)
    with ServerThread(app) as srv:
        yield srv, app


AUTH = {"Authorization": "Bearer s3cret"}


def test_health(server):
    srv, _ = server
    body = httpx.get(f"{srv.url}/health", headers=AUTH).json()
    assert body["status"] == "ok" and body["scorers"] == ["ocr", "background"]
    assert body["version"] and body["device"] == "cpu" and body["max_items"] == 8


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
    many = payload([replace(small, id=str(i)) for i in range(9)])
    r = httpx.post(url, json=many, headers=AUTH)
    assert r.status_code == 413 and "above the limit of 8" in r.json()["detail"]
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
    for headers in ({}, {"Authorization": "Bearer nope"}):
        assert httpx.get(f"{srv.url}/health", headers=headers).status_code == 401
        r = httpx.post(f"{srv.url}/score", json={"items": []}, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["detail"]


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


def test_cli_rejects_missing_siglip(capsys):
    from train.reward_server import main

    with pytest.raises(SystemExit) as exc:
        main(["--scorers", "style"])
    assert exc.value.code == 2 and "siglip_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--scorers", "ocr,clip"])
    assert json.dumps  # JSON only: the server never unpickles anything
