"""What the web app (``train.app``) runs behind its page: inputs checked, every adapter generated, scored.

One frozen base model is loaded once; the adapters to compare are held as parameter dicts (names
as in ``adapter.state_dict()``) on the CPU and evaluated through ``Calligrapher.sample(params=...)``
on that same model, so comparing N adapters costs no second base model. The first adapter lives in
the model itself (``params=None``). Generation is ``train.infer``'s: the same ``prepare_inputs``,
the same per-sample noise from the seed, the same crop back to the source size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from train import infer
from train.data.dataset import open_image
from train.data.image_modes import to_rgb
from train.data.preprocess import MASK_THRESHOLD, PreparedSample, mask_bbox, prepare_inputs, to_output_image
from train.models.calligrapher import Calligrapher
from train.models.checkpoint_io import OURS, check_compatible
from train.rl_ip.param_copy import ParamCopy


class InputError(ValueError):
    """Input the page reports to the user as one line (never a stack trace)."""


@dataclass
class Column:
    """One result column: an adapter (``params`` None = the weights inside the model) or the base model."""

    label: str
    params: ParamCopy | None = None  # kept on the CPU, moved to the model's device for each run
    base: bool = False  # the base FLUX.1-Fill without style (adapter scale 0)
    path: str | None = None


@dataclass
class Limits:
    max_text_length: int = 200
    max_image_side: int = 4096


@dataclass
class Inputs:
    """Checked raw inputs, as ``train.infer`` would read them from files."""

    source: Image.Image  # RGB
    mask: Image.Image  # L, same size as the source; > MASK_THRESHOLD = paint here
    text: str
    ref: Image.Image | None = None  # RGB; None = self-reference (the source cropped to the mask's box)
    notes: list[str] = field(default_factory=list)

    def reference(self) -> Image.Image:
        """The style reference the scorers compare with (the self-reference when none was given)."""
        return self.ref if self.ref is not None else self.source.crop(mask_bbox(self.mask))


def flat_params(state: dict) -> dict[str, torch.Tensor]:
    """Our two-part adapter layout -> ``adapter.state_dict()`` names (``image_proj.…``, ``ip_adapter.…``)."""
    return {f"{part}.{k}": v for part in OURS for k, v in state[part].items()}


def open_upload(path, what: str, mode: str, limits: Limits) -> Image.Image | None:
    """Decode an uploaded file with ``train.infer``'s reader (``open_image``), or raise ``InputError``."""
    if path is None:
        return None
    check_header(path, what, limits)
    try:
        return open_image(Path(path), mode)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"the {what} is not a readable image ({type(exc).__name__})") from None


def check_header(file, what: str, limits: Limits) -> None:
    """Refuse an image file (path or binary file) whose header is unreadable or names a side above the
    limit, with ``InputError``; only the header is read (``Image.open`` decodes nothing yet)."""
    try:
        with Image.open(file) as img:
            check_size(img, what, limits)
    except Image.DecompressionBombError as exc:
        raise InputError(f"the {what} is too large: {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"the {what} is not a readable image ({type(exc).__name__})") from None


def editor_source(background: Image.Image | None) -> Image.Image | None:
    """The editor's background (decoded by Gradio in its own mode) as 8-bit RGB, as ``open_image`` reads files."""
    return None if background is None else to_rgb(background)


def check_size(img: Image.Image, what: str, limits: Limits) -> None:
    w, h = img.size
    if max(w, h) > limits.max_image_side:
        raise InputError(f"the {what} is {w}x{h}; the largest side allowed is {limits.max_image_side} pixels")


def painted_mask(layers: list[Image.Image], size: tuple[int, int]) -> Image.Image | None:
    """The union of the painted layers' opacity as an L image; None if nothing was painted."""
    alphas = [np.asarray(layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L"))
              for layer in layers if layer is not None and layer.size == size]
    if not alphas:
        return None
    mask = Image.fromarray(np.maximum.reduce(alphas))
    return mask if mask.getextrema()[1] > MASK_THRESHOLD else None


def check_inputs(source: Image.Image | None, painted: Image.Image | None, uploaded_mask: Image.Image | None,
                 ref: Image.Image | None, text: str | None, limits: Limits) -> Inputs:
    """Every user-facing rule in one place; raises ``InputError`` with the message the page shows."""
    if source is None:
        raise InputError("upload a source image first")
    check_size(source, "source image", limits)
    text = text or ""
    if not text.strip():
        raise InputError("type the text to paint")  # the text itself goes to the model as typed, as in train.infer
    if len(text) > limits.max_text_length:
        raise InputError(f"the text has {len(text)} characters; at most {limits.max_text_length} are allowed")
    notes = []
    if uploaded_mask is not None:
        mask = uploaded_mask
        if painted is not None:
            notes.append("the uploaded mask was used; the painted strokes were ignored")
        if mask.size != source.size:
            raise InputError(f"the mask image is {mask.size[0]}x{mask.size[1]} but the source is "
                             f"{source.size[0]}x{source.size[1]}")
    else:
        mask = painted
    if mask is None or mask_bbox(mask) is None:
        raise InputError("paint the region for the text on the source image (or upload a mask image)")
    return Inputs(source, mask, text, ref, notes)


class Engine:
    """The model, the columns and the scorers the page runs."""

    def __init__(self, model: Calligrapher, columns: list[Column], scorers: dict, weights: dict[str, float],
                 resolution: int = 512, reference_strip: bool = True, strip_height: int | None = None,
                 max_sequence_length: int = 512, limits: Limits | None = None):
        self.model, self.columns, self.scorers, self.weights = model, columns, scorers, weights
        self.resolution, self.reference_strip, self.strip_height = resolution, reference_strip, strip_height
        self.max_sequence_length = max_sequence_length
        self.limits = limits or Limits()

    def prepare(self, inputs: Inputs) -> PreparedSample:
        """``train.infer``'s preprocessing; a text longer than the T5 prompt adds a note for the page."""
        from train.data.prompt_limits import truncation_warning

        if self.model.pipe.tokenizer_2 is not None:
            note = truncation_warning("the text", inputs.text, self.model.pipe.tokenizer_2, self.max_sequence_length)
            if note and note not in inputs.notes:
                inputs.notes.append(note)
        try:
            return prepare_inputs(inputs.source, inputs.mask, inputs.text, ref=inputs.ref,
                                  resolution=self.resolution, reference_strip=self.reference_strip,
                                  strip_height=self.strip_height)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def generate(self, column: Column, sample: PreparedSample, seed: int, steps: int, guidance: float,
                 scale: float) -> Image.Image:
        """One column's result at the source's size, exactly as ``python -m train.infer`` makes it."""
        scale = 0.0 if column.base else scale
        model = self.model if column.params is None else WithParams(self.model, column.params.params(self.model.device))
        canvas = infer.generate(model, [sample], steps, guidance, seed=seed, scale=scale,
                                max_sequence_length=self.max_sequence_length)[0]
        return to_output_image(canvas, sample)

    def score(self, inputs: Inputs, image: Image.Image):
        from train.rewards.base import RewardItem, score_items

        item = RewardItem(id="0", image=image, text=inputs.text, mask=inputs.mask, reference=inputs.reference(),
                          source=inputs.source)
        return score_items(self.scorers, [item], self.weights)[0]


class WithParams:
    """``model`` whose :meth:`sample` runs other adapter weights (``params``, names as in
    ``adapter.state_dict()``) on the same frozen base; everything else is the model itself.

    It lets ``infer.generate`` (prompt and style encoding, per-sample noise from the seed, VAE
    decoding) run unchanged for every adapter; ``infer.generate`` has no ``params`` argument.
    """

    def __init__(self, model: Calligrapher, params: dict[str, torch.Tensor]):
        self._model, self._params = model, params

    def __getattr__(self, name):
        return getattr(self._model, name)

    def sample(self, cond, num_steps: int, generator=None, latents=None, params=None):
        if params is not None:
            raise ValueError("WithParams.sample already evaluates its own params")
        return self._model.sample(cond, num_steps, generator=generator, latents=latents, params=self._params)


def load_engine(args, columns: list[dict], scorers: dict, weights: dict[str, float]) -> Engine:
    """Read every adapter (checking each fits the first), load the base model once, build the columns."""
    states = [(c, infer.read_adapter(c["path"], c["ema"], args.num_tokens) if c["path"] else None) for c in columns]
    first = next((s for _, s in states if s is not None), None)
    model = infer.load_model(args.pretrained_model_name_or_path, args.siglip_path, no_adapter=first is None,
                             device=args.device, dtype=args.dtype, adapter=first, num_tokens=args.num_tokens)
    out = []
    for c, state in states:
        if state is None:
            out.append(Column(c["label"], base=True))
        elif state is first:
            out.append(Column(c["label"], path=str(state[1])))
        else:
            check_compatible(model.adapter, state[0], f"{state[1]} (compared with {first[1]})")
            params = ParamCopy(flat_params(state[0]), dtype=model.dtype, device="cpu")
            out.append(Column(c["label"], params=params, path=str(state[1])))
    return Engine(model, out, scorers, weights, resolution=args.resolution,
                  reference_strip=not args.no_reference_strip, strip_height=args.reference_strip_height or None,
                  max_sequence_length=args.max_sequence_length,
                  limits=Limits(args.max_text_length, args.max_image_side))


def example_rows(path, resolution: int, limit: int) -> list[list]:
    """``[source, mask, ref or None, text]`` per record of a dataset file, for the page's example gallery."""
    from train.data.dataset import load_records

    return [[str(r.source), str(r.mask), str(r.ref) if r.ref else None, r.text]
            for r in load_records(Path(path), resolution=resolution)[:limit]]
