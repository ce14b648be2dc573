"""Test helpers for the reward service: rendered text scenes, a real server on a loopback
port (in a thread or a subprocess), a fault-injecting wrapper around the real app, and a
small OpenAI chat-completions server standing in for the VLM judge."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from train.rewards.base import RewardItem

REPO = Path(__file__).resolve().parents[2]
FONT_LATIN = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
FONT_CJK = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def font_for(text: str) -> str:
    return FONT_CJK if any(ord(c) > 0x2E80 for c in text) else FONT_LATIN


def background(size=(256, 128), seed: int = 0) -> Image.Image:
    """A smooth two-colour gradient, different per seed."""
    w, h = size
    c0 = (200 + seed * 7 % 50, 190 + seed * 13 % 60, 160 + seed * 3 % 90)
    c1 = (c0[0] - 60, c0[1] - 40, c0[2] - 20)
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for x in range(w):
        t = x / max(1, w - 1)
        draw.line([(x, 0), (x, h)], fill=tuple(int(a + (b - a) * t) for a, b in zip(c0, c1)))
    return img


def render_scene(text: str, size=(256, 128), box=(24, 34, 232, 94), font_size: int = 40, seed: int = 0,
                 color=(30, 20, 110)) -> RewardItem:
    """``text`` painted in ``box`` on a gradient: image, mask (box), source (no text), reference (the box)."""
    source = background(size, seed)
    image = source.copy()
    draw = ImageDraw.Draw(image)
    if text:
        font = ImageFont.truetype(font_for(text), font_size)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        x = box[0] + (box[2] - box[0] - (r - l)) // 2 - l
        y = box[1] + (box[3] - box[1] - (b - t)) // 2 - t
        draw.text((x, y), text, font=font, fill=color)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return RewardItem(id=f"{text or 'blank'}-{seed}", image=image, text=text or "x", mask=mask,
                      reference=image.crop(box), source=source)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    """A tiny random SigLIP vision folder (the real class, saved and reloaded like real weights)."""
    from train.models.tiny import write_tiny_siglip

    return write_tiny_siglip(tmp_path_factory.mktemp("siglip"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Run an ASGI app with uvicorn, configured as the reward server configures it (``uvicorn_config``:
    ``config`` are its keywords), on a free loopback port in a thread (context manager)."""

    def __init__(self, app, port: int | None = None, **config):
        import uvicorn

        from train.reward_server import uvicorn_config

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=1, lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test reward server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FaultInjector:
    """ASGI wrapper around the real app: ``POST /score`` calls follow ``plan`` in order, then pass.

    Actions: ``"ok"`` (pass through), ``"500"``, ``"garbage"`` (200 with a body that is not JSON),
    ``"sleep:S"`` (hold the request S seconds, then pass through), ``"reverse"`` (the real reply
    with its results in reverse order), ``"rewrite"`` (the real reply passed through ``rewrite(body)``),
    ``"trickle"`` (a 200 whose 300-byte body comes one byte every 50 ms: 15 s, never a silent second).
    """

    def __init__(self, app, plan: list[str], rewrite=None):
        self.app, self.plan, self.seen, self.rewrite = app, list(plan), [], rewrite
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        action = "ok"
        if scope["type"] == "http" and scope["path"] == "/score":
            with self._lock:
                action = self.plan.pop(0) if self.plan else "ok"
                self.seen.append(action)
        if action in ("500", "garbage"):
            body = b"internal error" if action == "500" else b"{not json"
            await send({"type": "http.response.start", "status": 500 if action == "500" else 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if action == "trickle":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"300")]})
            for _ in range(300):
                await send({"type": "http.response.body", "body": b" ", "more_body": True})
                await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b""})
            return
        if action.startswith("sleep:"):
            await asyncio.sleep(float(action.split(":", 1)[1]))
        if action in ("reverse", "rewrite"):
            await self.app(scope, receive, self._edited(send, action))
            return
        await self.app(scope, receive, send)

    def _edited(self, send, action: str):
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = json.loads(b"".join(chunks))
            if action == "reverse":
                body["results"] = body["results"][::-1]
            else:
                body = self.rewrite(body)
            data = json.dumps(body).encode()  # NaN stays NaN (allow_nan), as a careless server would send it
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        return capture


def spawn_server(*args: str, wait: float = 60.0):
    """``python -m train.reward_server --port 0`` as a subprocess; returns ``(proc, url)`` once its
    start event (printed when the port accepts connections) is read. stderr goes to ``proc.log``."""
    import select
    import tempfile

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "train.reward_server", "--port", "0", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log)
    proc.log = log
    ready, _, _ = select.select([proc.stdout], [], [], wait)
    line = proc.stdout.readline() if ready else b""
    if not line:
        proc.kill()
        proc.wait(timeout=10)
        log.seek(0)
        raise RuntimeError(f"reward server did not start: {log.read().decode()[-2000:]}")
    event = json.loads(line)
    assert event["event"] == "reward_server_start", event
    return proc, f"http://127.0.0.1:{event['port']}"


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class ChatJudgeStub:
    """A loopback HTTP server speaking OpenAI ``POST /v1/chat/completions``.

    ``reply(body) -> str | int``: a string becomes the assistant message; an int is an HTTP status.
    """

    def __init__(self, reply):
        stub = self
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                out = reply(body) if self.path == "/v1/chat/completions" else 404
                if isinstance(out, int):
                    self.send_response(out)
                    self.end_headers()
                    return
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": out}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def prompt_text(body: dict) -> str:
    """The text part of a chat-completions request."""
    return "".join(p.get("text", "") for p in body["messages"][0]["content"] if p.get("type") == "text")
