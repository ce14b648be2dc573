"""Try checkpoints in the browser: paint a mask, type a text, compare adapters side by side with their scores.

    python -m train.app --pretrained_model_name_or_path FLUX.1-Fill-dev --siglip_path siglip-so400m \\
        --ip_adapter_path runs/sft/checkpoint-1000 --label sft \\
        --ip_adapter_path runs/rl/checkpoint-3000@ema --label rl_ema \\
        --examples bench/data.jsonl

then open http://127.0.0.1:7860. Upload a source image and paint the region for the text on it
(or upload a mask image: white = paint here), optionally upload a style reference (without one
the source cropped to the mask's box is the reference, as in the datasets), type the text and
press Generate. Every adapter runs on the same inputs and seed, exactly as ``python -m train.infer``
would (same preprocessing, noise and crop), on one base model loaded once; each result shows its
OCR / style / background scores (``--scorers``) and can be downloaded as PNG.

The server listens on loopback only unless ``--host`` says otherwise; any other address needs
``--token`` (or ``CALLIGRAPHER_APP_TOKEN``), asked for on a login page. Gradio's telemetry is off.

Page element ids (stable, for browser automation): ``source`` (image editor), ``mask``, ``reference``,
``text``, ``seed``, ``steps``, ``guidance``, ``scale``, ``run``, ``status``, and per column ``i``
``result-i`` and ``scores-i``.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import argparse  # noqa: E402
import hmac  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from train.app_engine import (Engine, InputError, Limits, check_header, check_inputs, editor_source,  # noqa: E402
                              example_rows, open_upload, painted_mask)
from train.cli_flags import is_loopback  # noqa: E402
from train.infer import add_model_args, check_common_args, quiet_loading  # noqa: E402

TOKEN_ENV = "CALLIGRAPHER_APP_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, multiple_adapters=True)
    parser.add_argument("--label", action="append", help="column name per --ip_adapter_path, in order")
    app = parser.add_argument_group("web app")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on; not loopback needs --token")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                     help=f"shared secret asked for on a login page (default: ${TOKEN_ENV}); any user name")
    app.add_argument("--scorers", default="ocr,style,background",
                     help="scorers shown under each result (style needs --siglip_path)")
    app.add_argument("--reward_weights", default=None,
                     help="weights of the total shown per result, e.g. ocr=0.7,style=0.2,background=0.1 "
                          "(default: equal weights over --scorers)")
    app.add_argument("--reward_device", default="cpu", help="device for the scorers")
    app.add_argument("--examples", default=None, help="a .json/.jsonl record file or benchmark folder to pick from")
    app.add_argument("--max_examples", type=int, default=50, help="at most this many examples on the page")
    app.add_argument("--max_text_length", type=int, default=200, help="longest text accepted (characters)")
    app.add_argument("--max_image_side", type=int, default=4096, help="largest image side accepted (pixels)")
    app.add_argument("--max_file_size", default="50mb", help="largest upload Gradio accepts")
    return parser


def check_args(parser, args) -> None:
    """Everything knowable from the flags, checked before the model loads (one line each)."""
    check_common_args(parser, args)
    if not is_loopback(args.host) and not args.token:
        parser.error(f"--host {args.host} is reachable from other machines: pass --token SECRET "
                     f"(or set {TOKEN_ENV}) so that only people who know it can use the app")
    if args.token is not None and not args.token.strip():
        parser.error("--token is empty")
    if not 0 < args.port < 65536:
        parser.error("--port must be in 1..65535")
    if args.max_text_length < 1 or args.max_image_side < 16 or args.max_examples < 0:
        parser.error("--max_text_length, --max_image_side (>= 16) and --max_examples must be positive")
    from train.evaluate import parse_columns
    from train.rewards.base import SCORER_NAMES, parse_reward_weights

    try:
        args.columns = parse_columns(args)
        names = [n.strip() for n in args.scorers.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCORER_NAMES]
        if not names or unknown:
            raise ValueError(f"--scorers: unknown or missing scorer(s) {unknown}; known: {', '.join(SCORER_NAMES)}")
        args.weights = parse_reward_weights(args.reward_weights or {n: 1.0 / len(names) for n in names})
        missing = [n for n in args.weights if n not in names]
        if missing:
            raise ValueError(f"--reward_weights names {missing}, which are not in --scorers {args.scorers}")
    except ValueError as exc:
        parser.error(str(exc))
    args.scorer_names = names


def build_engine(args) -> Engine:
    from train.app_engine import load_engine
    from train.rewards.registry import build_scorers

    scorers = build_scorers(args.scorer_names, siglip_path=args.siglip_path, device=args.reward_device)
    return load_engine(args, args.columns, scorers, args.weights)


# ---------------------------------------------------------------------------- the page
def format_scores(result) -> str:
    """One result's scores as Markdown: ``ocr 0.83 (read "Helo") · style 0.71 · … · total 0.84``."""
    parts = []
    for name, value in result.scores.items():
        part = f"**{name}** {value:.3f}"
        read = result.details.get(name, {}).get("recognised")
        if name == "ocr" and read is not None:
            part += f" (read “{read}”)"
        parts.append(part)
    for name, details in result.details.items():
        if "error" in details:
            parts.append(f"**{name}** failed: {details['error']}")
    if result.reward is not None:
        parts.append(f"**total** {result.reward:.3f}")
    elif result.error:
        parts.append(f"**total** not computed: {result.error}")
    return " · ".join(parts)


def make_handler(engine: Engine):
    """The Generate button: a generator that fills the result columns one by one."""
    n = len(engine.columns)

    def run(editor, mask_file, ref_file, text, seed, steps, guidance, scale):
        images, scores = [None] * n, [""] * n
        try:
            editor = editor or {}
            source = editor_source(editor.get("background"))
            painted = painted_mask(editor.get("layers") or [], source.size) if source is not None else None
            limits = engine.limits
            mask = open_upload(mask_file, "mask image", "L", limits)
            ref = open_upload(ref_file, "reference image", "RGB", limits)
            inputs = check_inputs(source, painted, mask, ref, text, limits)
            seed, steps = _int(seed, "seed", 0, 2**63 - 1), _int(steps, "steps", 1, 1000)
            guidance, scale = _float(guidance, "guidance"), _float(scale, "adapter scale")
            sample = engine.prepare(inputs)
        except InputError as exc:
            yield f"⚠️ {exc}", *images, *scores
            return
        t0 = time.perf_counter()
        for i, column in enumerate(engine.columns):
            yield f"Generating {column.label} ({i + 1}/{n})…", *images, *scores
            try:
                images[i] = engine.generate(column, sample, seed, steps, guidance, scale)
                scores[i] = format_scores(engine.score(inputs, images[i]))
            except Exception as exc:  # noqa: BLE001 - shown in the page; the traceback goes to the server log
                traceback.print_exc()
                yield f"⚠️ {column.label} failed: {type(exc).__name__}: {exc}", *images, *scores
                return
        notes = "".join(f" ({note})" for note in inputs.notes)
        yield f"Done: {n} result(s) in {time.perf_counter() - t0:.1f} s, seed {seed}.{notes}", *images, *scores

    return run


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if v != value:
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not lo <= v <= hi:
        raise InputError(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number") from None
    if not (v == v and abs(v) < 1e6):
        raise InputError(f"{name} must be a finite number")
    return v


def _checked(component, gr, what: str, limits: Limits | None = None):
    """``component`` (gr.Image / gr.ImageEditor) whose unreadable or too large uploads give one clear
    message in the page; a too large image is refused from its header, before Gradio decodes it."""
    from PIL import Image, UnidentifiedImageError

    limits = limits or Limits()

    class Checked(component):
        is_template = True  # the browser draws it as its base component (its props come from the base __init__)

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise gr.Error(f"the {what} is not a readable image ({type(exc).__name__})",
                               print_exception=False) from None

        def convert_and_format_image(self, file, *args, **kwargs):  # gr.ImageEditor decodes each of its images here
            try:
                if file is not None:
                    check_header(file.path if hasattr(file, "path") else io.BytesIO(file), what, limits)
            except InputError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            return super().convert_and_format_image(file, *args, **kwargs)

    # Gradio tells component classes apart by name (and module): one name per kind of upload.
    Checked.__name__ = Checked.__qualname__ = f"Checked{component.__name__}_{what.replace(' ', '_')}"
    return Checked


def build_app(args, engine: Engine | None = None):
    """The Gradio page (``gr.Blocks``) over ``engine`` (built from ``args`` when not given)."""
    import gradio as gr

    engine = engine or build_engine(args)
    examples = example_rows(args.examples, args.resolution, args.max_examples) if args.examples else []
    Editor = _checked(gr.ImageEditor, gr, "source image", engine.limits)
    MaskUpload, RefUpload = (_checked(gr.Image, gr, what, engine.limits) for what in ("mask image", "reference image"))
    with gr.Blocks(title="Calligrapher", analytics_enabled=False) as demo:
        gr.Markdown("## Calligrapher: paint a region, type a text, compare adapters")
        with gr.Row():
            with gr.Column(scale=1):
                source = Editor(
                    label="Source image: upload, then paint the region for the text",
                    elem_id="source", type="pil", image_mode=None, format="png", sources=["upload", "clipboard"],
                    transforms=(), layers=False, brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"))
                with gr.Row():
                    mask = MaskUpload(label="Mask (optional; white = paint here; replaces the painting)",
                                  elem_id="mask", type="filepath", image_mode=None, format="png", height=180,
                                  sources=["upload", "clipboard"])
                    reference = RefUpload(label="Style reference (optional; default: the "
                                       "masked region)", elem_id="reference", type="filepath", image_mode=None,
                                       format="png", height=180, sources=["upload", "clipboard"])
                text = gr.Textbox(label="Text", elem_id="text", placeholder="the text to paint", max_lines=2)
                with gr.Row():
                    seed = gr.Number(label="Seed", value=args.seed, precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(1, 100, value=args.num_inference_steps, step=1, label="Steps",
                                      elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(0, 100, value=args.guidance_scale, step=0.5, label="Guidance",
                                         elem_id="guidance")
                    scale = gr.Slider(0, 2, value=args.scale, step=0.05, label="Adapter scale", elem_id="scale")
                run = gr.Button("Generate", variant="primary", elem_id="run")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2), gr.Row():
                images, scores = [], []
                for i, column in enumerate(engine.columns):
                    with gr.Column(min_width=220):
                        images.append(gr.Image(label=column.label, elem_id=f"result-{i}", type="pil", format="png",
                                               height=320, interactive=False, buttons=["download", "fullscreen"]))
                        scores.append(gr.Markdown("", elem_id=f"scores-{i}"))
        if examples:
            gr.Examples(examples=examples, inputs=[source, mask, reference, text],
                        label=f"Examples from {Path(args.examples).name}", examples_per_page=12)
        run.click(make_handler(engine), inputs=[source, mask, reference, text, seed, steps, guidance, scale],
                  outputs=[status, *images, *scores], concurrency_limit=1, show_progress_on=images)
    return demo


def launch(demo, args, **kwargs):
    """Serve ``demo`` as the flags say (host, port, token, upload limit); extra ``launch`` keywords pass on."""
    token = args.token
    # Bytes, not str: compare_digest refuses non-ASCII strings. surrogatepass: a token from a non-UTF-8 argv.
    auth = (lambda _user, password: hmac.compare_digest(str(password).encode("utf-8", "surrogatepass"),
                                                        token.encode("utf-8", "surrogatepass"))) if token else None
    return demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, auth=auth, max_file_size=args.max_file_size,
        auth_message="Enter any user name and the app's token." if token else None,
        share=False, show_error=False, **kwargs)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    quiet_loading()
    from train.data.dataset import DatasetError
    from train.models.checkpoint_io import AdapterFileError

    try:
        demo = build_app(args)
    except (DatasetError, AdapterFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launch(demo, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
