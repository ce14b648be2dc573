"""The web app (``train.app``) on tiny real models: same pixels as ``train.infer``, clear input messages,
flags, the token, and a run driven in headless Chromium."""

from __future__ import annotations

import io
import json
import socket
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from train import app, infer
from train.cli_flags import is_loopback
from train.app_engine import flat_params
from train.data.synthesize import synthesize
from train.models.calligrapher import Calligrapher
from train.models.checkpoint_io import save_adapter_file

FAST = ["--resolution", "64", "--num_inference_steps", "2", "--max_sequence_length", "32"]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _perturbed_checkpoint(model, seed: int, path, num_tokens: int | None = None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter_file(model.adapter, path)
    return path


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    """Two checkpoints of one run (a, b), a dataset of two records (one with a reference, one without)."""
    root = tmp_path_factory.mktemp("app")
    data = synthesize(root / "data", 2, resolution=64, seed=3, layout="jsonl")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert "ref" in records[0] and "ref" not in records[1]
    model = Calligrapher.from_pretrained(tiny_models["flux"], tiny_models["siglip"], num_tokens=8)
    a = _perturbed_checkpoint(model, 1, root / "run" / "checkpoint-100" / "ip-adapter.bin").parent
    b = _perturbed_checkpoint(model, 2, root / "run" / "checkpoint-200" / "ip-adapter.bin").parent
    other = Calligrapher.from_pretrained(tiny_models["flux"], tiny_models["siglip"], num_tokens=4)
    four = _perturbed_checkpoint(other, 3, root / "four-tokens.bin")
    rec = [{k: str(data.parent / v) if k in ("source", "mask", "ref") else v for k, v in r.items()} for r in records]
    return {"root": root, "data": data, "a": a, "b": b, "four": four, "records": rec}


def _argv(tiny_models, files, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--ip_adapter_path", str(files["a"]), "--label", "a", "--ip_adapter_path", str(files["b"]),
            "--label", "b", *FAST, *map(str, extra)]


def _args(argv):
    parser = app.build_parser()
    args = parser.parse_args(argv)
    app.check_args(parser, args)
    return args


@pytest.fixture(scope="module")
def served(tiny_models, files):
    """``(args, engine)``: the model, both adapters and the three scorers, loaded once for the module."""
    args = _args(_argv(tiny_models, files, "--examples", files["data"]))
    return args, app.build_engine(args)


def _pixels(image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _run(engine, editor, mask=None, ref=None, text="Hello", seed=0, steps=2, guidance=30.0, scale=1.0):
    """Press Generate as the page does; returns the last update ``(status, images, scores)``."""
    out = list(app.make_handler(engine)(editor, mask, ref, text, seed, steps, guidance, scale))[-1]
    n = len(engine.columns)
    return out[0], list(out[1:1 + n]), list(out[1 + n:])


def _editor(source_path, layer: Image.Image | None = None) -> dict:
    """The ImageEditor's value as Gradio hands it over (background decoded in its own mode, RGBA layers)."""
    with Image.open(source_path) as im:
        background = im.convert(None)
    return {"background": background, "layers": [layer] if layer is not None else [], "composite": None}


def _stroke(size, box) -> Image.Image:
    """A painted layer: opaque red inside ``box``, transparent elsewhere."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), box)
    return layer


def _infer(tiny_models, adapter, out, source, mask, text, seed, ref=None) -> np.ndarray:
    """``python -m train.infer`` for one sample (in this process)."""
    argv = ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--ip_adapter_path", str(adapter), "--source", str(source), "--mask", str(mask), "--text", text,
            "--seed", str(seed), "--output", str(out), *FAST] + (["--ref", str(ref)] if ref else [])
    assert infer.main(argv) == 0
    return _pixels(out)


# ---------------------------------------------------------------------------- same pixels as train.infer
@pytest.mark.slow
def test_every_column_equals_train_infer_pixel_for_pixel(tiny_models, files, served, tmp_path):
    """Adapter a lives in the model, b is evaluated through params=: both columns match the CLI bit for bit,
    for a painted mask with an uploaded reference and for an uploaded mask with the self-reference."""
    from train.rewards.base import RewardItem, score_items

    _, engine = served
    painted_rec, uploaded_rec = files["records"]
    layer = _stroke((64, 64), (10, 40, 50, 56))
    layer.getchannel("A").save(tmp_path / "painted.png")  # what the painting means: opaque = paint here
    cases = [  # (editor, uploaded mask, reference, record for train.infer); train.infer gives record i seed 7 + i
        (_editor(painted_rec["source"], layer), None, painted_rec["ref"],
         {"id": "painted", "source": painted_rec["source"], "mask": str(tmp_path / "painted.png"),
          "ref": painted_rec["ref"], "text": "Hi there"}),
        (_editor(uploaded_rec["source"]), uploaded_rec["mask"], None,
         {"id": "uploaded", "source": uploaded_rec["source"], "mask": uploaded_rec["mask"], "text": "Hi there"}),
    ]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c[3]) + "\n" for c in cases))
    for column in ("a", "b"):
        argv = ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path",
                str(tiny_models["siglip"]), "--ip_adapter_path", str(files[column]), "--data",
                str(tmp_path / "cases.jsonl"), "--output_dir", str(tmp_path / column), "--seed", "7", *FAST]
        assert infer.main(argv) == 0
    for seed, (editor, mask_upload, ref, rec) in enumerate(cases, start=7):
        status, images, scores = _run(engine, editor, mask_upload, ref, text="Hi there", seed=seed)
        assert status.startswith("Done: 2 result(s)") and f"seed {seed}" in status, status
        for column, image, shown in zip(("a", "b"), images, scores):
            want = tmp_path / column / f"{rec['id']}.png"
            assert np.array_equal(_pixels(image), _pixels(want)), f"{rec['id']}: column {column} differs from infer"
            # The scores shown are those of this very image, with the inputs the scorers read.
            with Image.open(rec["source"]) as src, Image.open(rec["mask"]) as m, Image.open(want) as out:
                src, m = src.convert("RGB"), m.convert("L")
                reference = _pixels(ref) if ref else None
                item = RewardItem(id="x", image=out.convert("RGB"), text="Hi there", mask=m, source=src,
                                  reference=Image.fromarray(reference) if ref else src.crop(m.getbbox()))
            assert shown == app.format_scores(score_items(engine.scorers, [item], engine.weights)[0])
            for name in ("ocr", "style", "background", "total"):
                assert f"**{name}** " in shown
        assert not np.array_equal(_pixels(images[0]), _pixels(images[1])), "both columns ran the same weights"


def test_other_adapters_run_through_params_and_leave_the_model_as_it_was(files, served):
    """Column b is evaluated with its own weights on the shared base: the model's adapter (a) and its
    scale are untouched, and no second copy of the base model exists."""
    _, engine = served
    model = engine.model
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    b = engine.columns[1].params.params()
    assert set(b) == set(before) and all(not torch.equal(b[k], before[k]) for k in before if k.endswith("weight"))
    rec = files["records"][1]
    with Image.open(rec["source"]) as src, Image.open(rec["mask"]) as m:
        inputs = app.check_inputs(src.convert("RGB"), None, m.convert("L"), None, "Hi", engine.limits)
    sample = engine.prepare(inputs)
    out_b = engine.generate(engine.columns[1], sample, seed=0, steps=1, guidance=30.0, scale=0.5)
    after = model.adapter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "generating b changed the model's weights"
    assert model.adapter.ip_adapter[0].scale == 1.0
    out_a = engine.generate(engine.columns[0], sample, seed=0, steps=1, guidance=30.0, scale=0.5)
    assert not np.array_equal(_pixels(out_a), _pixels(out_b))
    assert engine.columns[0].params is None and engine.columns[1].params is not None
    assert flat_params({"image_proj": {"x": 1}, "ip_adapter": {"y": 2}}) == {"image_proj.x": 1, "ip_adapter.y": 2}


def test_a_text_longer_than_the_prompt_is_noted(files, served):
    """--max_sequence_length 32 here: a long text is still run, with a note saying where it is cut."""
    _, engine = served
    rec = files["records"][1]
    with Image.open(rec["source"]) as src, Image.open(rec["mask"]) as m:
        short = app.check_inputs(src.convert("RGB"), None, m.convert("L"), None, "Hi", engine.limits)
        long = app.check_inputs(src.convert("RGB"), None, m.convert("L"), None, "word " * 30, engine.limits)
    engine.prepare(short)
    engine.prepare(long)
    assert short.notes == []
    assert len(long.notes) == 1 and long.notes[0].startswith("the text: text of 150 characters is ")
    assert "only the first 32 are used" in long.notes[0]


# ---------------------------------------------------------------------------- bad input
def _garbage(path):
    path.write_bytes(b"this is not an image")
    return path


@pytest.mark.parametrize("case, expected", [
    ("no source", "upload a source image first"),
    ("no mask", "paint the region for the text"),
    ("transparent strokes", "paint the region for the text"),
    ("empty text", "type the text to paint"),
    ("long text", "the text has 201 characters; at most 200 are allowed"),
    ("unreadable mask", "the mask image is not a readable image"),
    ("unreadable reference", "the reference image is not a readable image"),
    ("huge source", "the source image is 4097x8; the largest side allowed is 4096 pixels"),
    ("huge reference", "the reference image is 8x5000; the largest side allowed is 4096 pixels"),
    ("mask of another size", "the mask image is 32x32 but the source is 64x64"),
    ("steps 0", "steps must be in 1..1000, got 0"),
    ("seed 1.5", "seed must be a whole number, got 1.5"),
])
def test_bad_input_gives_one_message_and_no_result(files, served, tmp_path, case, expected):
    _, engine = served
    rec = files["records"][0]
    kwargs = dict(editor=_editor(rec["source"]), mask=rec["mask"], ref=None, text="Hello")
    if case == "no source":
        kwargs["editor"] = {"background": None, "layers": [_stroke((64, 64), (0, 0, 9, 9))], "composite": None}
    elif case == "no mask":
        kwargs["mask"] = None
    elif case == "transparent strokes":
        kwargs.update(mask=None, editor=_editor(rec["source"], Image.new("RGBA", (64, 64), (255, 0, 0, 100))))
    elif case == "empty text":
        kwargs["text"] = "   "
    elif case == "long text":
        kwargs["text"] = "x" * 201
    elif case == "unreadable mask":
        kwargs["mask"] = str(_garbage(tmp_path / "mask.png"))
    elif case == "unreadable reference":
        kwargs["ref"] = str(_garbage(tmp_path / "ref.png"))
    elif case == "huge source":
        kwargs.update(editor={"background": Image.new("RGB", (4097, 8)), "layers": [], "composite": None})
    elif case == "huge reference":
        Image.new("RGB", (8, 5000)).save(tmp_path / "tall.png")
        kwargs["ref"] = str(tmp_path / "tall.png")
    elif case == "mask of another size":
        Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
        kwargs["mask"] = str(tmp_path / "small.png")
    elif case == "steps 0":
        kwargs["steps"] = 0
    elif case == "seed 1.5":
        kwargs["seed"] = 1.5
    editor = kwargs.pop("editor")
    updates = list(app.make_handler(engine)(editor, kwargs.pop("mask"), kwargs.pop("ref"), kwargs.pop("text"),
                                            kwargs.get("seed", 0), kwargs.get("steps", 2), 30.0, 1.0))
    assert len(updates) == 1, "bad input must stop before any generation"
    status, *rest = updates[0]
    assert status.startswith(f"⚠️ {expected}"), status
    assert all(v is None or v == "" for v in rest)


def test_unreadable_upload_is_refused_by_the_component_with_a_message():
    """Gradio decodes uploads before the handler: the page's components turn a bad file into gr.Error."""
    import gradio as gr
    from gradio.data_classes import FileData

    component = app._checked(gr.Image, gr, "mask image")(type="filepath", image_mode="L")
    with pytest.raises(gr.Error, match="the mask image is not a readable image"):
        component.preprocess(FileData(path=__file__, orig_name="mask.png"))


def _png_header(path, width: int, height: int):
    """A PNG whose header says ``width`` x ``height`` and that holds no pixel data: decoding it fails."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_too_large_source_is_refused_from_its_header_before_decoding(tmp_path):
    """The editor's upload says 12000x12000 in its header and has no pixels: the size message (not
    "not readable") proves the side is checked before Gradio decodes the image, for a file and a blob."""
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    header = _png_header(tmp_path / "huge.png", 12000, 12000)
    editor = app._checked(gr.ImageEditor, gr, "source image", app.Limits(max_image_side=4096))(type="pil")
    message = "the source image is 12000x12000; the largest side allowed is 4096 pixels"
    with pytest.raises(gr.Error, match=message):
        editor.preprocess(EditorData(background=FileData(path=str(header), orig_name="huge.png"), layers=[]))
    with pytest.raises(gr.Error, match=message):
        editor.convert_and_format_image(header.read_bytes())
    Image.new("RGB", (4096, 8)).save(tmp_path / "wide.png")  # at the limit: decoded as before
    value = editor.preprocess(EditorData(background=FileData(path=str(tmp_path / "wide.png")), layers=[]))
    assert value["background"].size == (4096, 8)


# ---------------------------------------------------------------------------- flags
def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        app.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--pretrained_model_name_or_path", "--siglip_path", "--ip_adapter_path", "--label", "--host",
                 "--port", "--token", "--scorers", "--reward_weights", "--examples", "--max_text_length",
                 "--max_image_side", "--num_inference_steps", "--guidance_scale", "--seed", "--scale"):
        assert flag in out


@pytest.mark.parametrize("extra, message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: pass --token SECRET"),
    (["--host", "192.168.1.5"], "--host 192.168.1.5 is reachable from other machines"),
    (["--token", " "], "--token is empty"),
    (["--scorers", "ocr,speed"], "--scorers: unknown or missing scorer(s) ['speed']"),
    (["--scorers", "ocr", "--reward_weights", "style=1"], "--reward_weights names ['style']"),
    (["--label", "c"], "3 --label for 2 --ip_adapter_path"),
])
def test_flag_problems_stop_before_loading_with_one_line(files, capsys, monkeypatch, extra, message):
    monkeypatch.delenv(app.TOKEN_ENV, raising=False)
    argv = ["--pretrained_model_name_or_path", "/nonexistent/flux", "--siglip_path", "/nonexistent/siglip",
            "--ip_adapter_path", str(files["a"]), "--label", "a", "--ip_adapter_path", str(files["b"]),
            "--label", "b", *extra]
    with pytest.raises(SystemExit) as exc:
        app.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_loopback_needs_no_token_and_any_other_address_does():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_an_adapter_that_does_not_fit_the_first_is_refused_at_start(tiny_models, files, capsys, monkeypatch):
    def must_not_start(*_a, **_kw):
        raise AssertionError("the app started with an adapter that does not fit")

    monkeypatch.setattr(app, "launch", must_not_start)
    argv = ["--pretrained_model_name_or_path", str(tiny_models["flux"]), "--siglip_path", str(tiny_models["siglip"]),
            "--ip_adapter_path", str(files["a"]), "--ip_adapter_path", str(files["four"]), "--scorers", "background",
            *FAST]
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "four-tokens.bin (compared with" in err and "shape mismatch" in err


def test_an_adapter_with_non_finite_weights_is_refused_at_start(files, tmp_path, capsys):
    """One line naming the file and the tensor, before the base model loads (its folders do not exist)."""
    from train.models.checkpoint_io import read_adapter_file

    state = read_adapter_file(files["b"] / "ip-adapter.bin")
    key = next(iter(state["image_proj"]))
    state["image_proj"][key] = torch.full_like(state["image_proj"][key], float("nan"))
    save_adapter_file(state, tmp_path / "nan.bin")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-flux"), "--siglip_path", str(tmp_path / "no-siglip"),
            "--ip_adapter_path", str(files["a"]), "--ip_adapter_path", str(tmp_path / "nan.bin"),
            "--scorers", "background", *FAST]
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nan.bin'}: tensor 'image_proj.{key}' holds ") and err.count("\n") == 1


# ---------------------------------------------------------------------------- served over HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(args, engine, **overrides):
    for k, v in dict(port=_free_port(), **overrides).items():
        setattr(args, k, v)
    demo = app.build_app(args, engine)
    app.launch(demo, args, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{args.port}"
    finally:
        demo.close()


def test_the_token_guards_every_route(served):
    import httpx

    args, engine = served
    with _serving(argparse_copy(args), engine, token="s3cret") as url, httpx.Client(base_url=url) as client:
        assert client.get("/config").status_code == 401
        assert client.post("/gradio_api/queue/join", json={}).status_code == 401
        assert client.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert client.post("/login", data={"username": "me", "password": "s3cret"}).status_code == 200
        assert client.get("/config").status_code == 200


def test_a_too_large_source_uploaded_to_the_server_gets_the_size_message(served, tmp_path, monkeypatch):
    """Through the running server (upload, then the Generate event on the queue): the header-only PNG of
    12000x12000 comes back as the size message, and nothing leaves loopback."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    args, engine = served
    header = _png_header(tmp_path / "huge.png", 12000, 12000)
    with _outbound_audit(monkeypatch) as contacted, _serving(argparse_copy(args), engine) as url:
        client = Client(url, verbose=False, download_files=False)
        with pytest.raises(AppError, match="the source image is 12000x12000; the largest side allowed is 4096"):
            client.predict({"background": handle_file(str(header)), "layers": [], "composite": None}, None, None,
                           "Hello", 0, 2, 30.0, 1.0, api_name="/run")
    assert not sorted({h for h in contacted if h not in LOOPBACK})


def test_a_non_ascii_token_logs_in(served):
    """The login compares UTF-8 bytes: a non-ASCII token or password is checked, never a server error."""
    import httpx

    args, engine = served
    with _serving(argparse_copy(args), engine, token="pässwörd-字") as url, httpx.Client(base_url=url) as client:
        for wrong in ("passwort", "pässwort", "pässwörd-字x"):
            assert client.post("/login", data={"username": "me", "password": wrong}).status_code == 400, wrong
        assert client.get("/config").status_code == 401
        assert client.post("/login", data={"username": "me", "password": "pässwörd-字"}).status_code == 200
        assert client.get("/config").status_code == 200


def argparse_copy(args):
    import argparse

    return argparse.Namespace(**vars(args))


@contextmanager
def _outbound_audit(monkeypatch):
    """Records every host name looked up and every IP address connected to by this process."""
    seen: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *a, **kw):
        seen.append(host.decode() if isinstance(host, bytes) else str(host))
        return real_getaddrinfo(host, *a, **kw)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            seen.append(address[0])
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield seen


@pytest.mark.slow
def test_browser_compares_two_adapters_with_scores(files, served, tmp_path, monkeypatch):
    """Headless Chromium: the messages for an empty mask and an empty text, a painted run, then uploads of a
    source, a mask and a reference: two results with scores, pixel for pixel what the same files give
    without the browser (which is ``train.infer``'s result), each downloadable; nothing leaves loopback."""
    from playwright.sync_api import sync_playwright

    args, engine = served
    rec = files["records"][0]
    blocked: list[str] = []

    def only_loopback(route):
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            return route.continue_()
        blocked.append(url)
        return route.abort()

    def generate(page, expect: str):
        """Press Generate and wait for a new status that says ``expect``."""
        before = page.inner_text("#status")
        page.click("#run")
        page.wait_for_function("([e, b]) => { const t = document.querySelector('#status').innerText;"
                               " return t.includes(e) && t !== b; }", arg=[expect, before], timeout=120_000)
        return page.inner_text("#status")

    # The same files through the handler in this process: train.infer's pixels (see the test above).
    _, expected, _ = _run(engine, _editor(rec["source"]), rec["mask"], rec["ref"], text="Hello", seed=3)
    with _outbound_audit(monkeypatch) as contacted, _serving(argparse_copy(args), engine) as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)  # a loaded 2-core machine can be slow
            page.route("**/*", only_loopback)
            page.goto(url)
            page.wait_for_selector("#run")
            examples = page.locator(".gallery-item, table tbody tr").count()
            assert examples >= 2, "the examples from --examples are listed"

            page.set_input_files("#source input[type=file]", rec["source"])
            page.wait_for_function("() => !document.querySelector('#source').innerText.includes('Upload an image')")
            page.fill("#text textarea", "Hello")
            assert "paint the region for the text" in generate(page, "⚠️")

            box = page.locator("#source canvas").first.bounding_box()
            x, y = box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.7
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + 40, y, steps=5)
            page.mouse.up()
            page.fill("#text textarea", "")
            assert "type the text to paint" in generate(page, "⚠️")

            page.fill("#text textarea", "Hello")
            painted = generate(page, "Done")
            assert "seed 0" in painted and page.locator("#result-1 img").count() == 1

            page.set_input_files("#mask input[type=file]", rec["mask"])
            page.set_input_files("#reference input[type=file]", rec["ref"])
            for uploaded in ("#mask img", "#reference img"):  # uploads finished before Generate
                page.wait_for_selector(uploaded)
            page.fill("#seed input", "3")
            done = generate(page, "seed 3")
            assert done.startswith("Done: 2 result(s)") and "painted strokes were ignored" in done
            for i, column in enumerate(("a", "b")):
                scores = page.inner_text(f"#scores-{i}")
                for name in ("ocr", "style", "background", "total"):
                    assert name in scores
                src = page.get_attribute(f"#result-{i} img", "src")
                shown = tmp_path / f"shown-{column}.png"
                shown.write_bytes(page.request.get(src).body())
                assert np.array_equal(_pixels(shown), _pixels(expected[i])), f"column {column} differs in the page"
                download = f"#result-{i} button[aria-label='Download'], #result-{i} a[download]"
                assert page.locator(download).count() >= 1
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            results = [np.asarray(Image.open(io.BytesIO(page.locator(f"#result-{i} img").screenshot())))
                       for i in range(2)]

            # An example from --examples fills the inputs (this one has no reference: self-reference).
            page.locator("table tbody tr").nth(1).click()
            page.wait_for_function("t => document.querySelector('#text textarea').value === t",
                                   arg=files["records"][1]["text"], timeout=60_000)
            page.locator("#reference img").wait_for(state="detached", timeout=60_000)  # the old reference is cleared
            assert page.locator("#mask img").count() == 1
        finally:
            browser.close()
    page_pixels = _pixels(tmp_path / "page.png").astype(np.float64)
    assert page_pixels.std() > 20, "the page screenshot is blank"
    for shot in results:
        assert shot[..., :3].astype(np.float64).std() > 10, "a result image is blank on screen"
    assert not blocked, f"the page asked for outside resources: {blocked}"
    outside = sorted({h for h in contacted if h not in LOOPBACK})
    assert not outside, f"the server contacted {outside}"
