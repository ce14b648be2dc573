"""Input preparation shared by training, rollouts and inference (docs/ARCHITECTURE.md §3, §4).

This follows the official Calligrapher inference scripts, with every ambiguous point made explicit:

* **Source**: resized to ``resolution x resolution`` (bicubic, aspect ratio *not* kept), as the
  official scripts do; :func:`to_output_image` resizes the result back to the original size, so
  the output has the source's geometry.
* **Pixels**: every image goes through :mod:`train.data.image_modes` first (16-bit scaled to 8 bits,
  transparency composited on black), so no mode is clipped to white.
* **Mask**: read as luminance, resized with nearest neighbour, then ``pixel > 127`` (the 0.5
  threshold of docs/ARCHITECTURE.md §4) is 1 = paint here. The official scripts keep any pixel ``> 0``; both agree
  on binary 0/255 masks such as the benchmark's, and 0.5 is robust to anti-aliased or JPEG masks.
* **Style image** (SigLIP input): the reference, aspect-preserving resized (bilinear) into a
  512 x 512 square and centred on black (:func:`pad_to_square`).
* **In-context strip** (on by default): the reference resized to the canvas width, as the official
  ``generate_context_reference_image`` does: height ``int((width / ref_w) * ref_h)`` rounded to the
  nearest multiple of 16 (ties go down), then ``cv2.resize`` with its default ``INTER_LINEAR`` (no
  antialiasing: shrinking a 300 px reference to 32 px differs from PIL's bilinear by up to 90/255).
  It is pasted *above* the source, with a zero mask over it. The official code does not bound this
  height (a very wide reference even gives height 0, which it cannot resize to); here it is clamped to
  ``[16, resolution]`` (the reference is then fitted into a band of that height, centred on black) so a
  tall reference cannot blow up the canvas. ``strip_height=`` fixes the strip height for every sample
  (reference fitted into the band), which makes canvases batchable.
* **Self-reference**: without a reference image, the source cropped to the bounding box of all
  mask pixels (original resolution) is the reference.

Canvas sizes are multiples of 16 (FLUX packs 2x2 latents of an 8x VAE). Tensors: image
``[3, H, W]`` in ``[-1, 1]``, mask ``[1, H, W]`` in ``{0, 1}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .image_modes import MASK_THRESHOLD, to_luminance, to_rgb  # noqa: F401 - MASK_THRESHOLD re-exported
STYLE_SIZE = 512  # the official scripts pad the reference to 512 x 512 before the SigLIP processor
MULTIPLE = 16


# ---------------------------------------------------------------------- image helpers
def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` float32 in ``[-1, 1]``."""
    arr = np.asarray(to_rgb(img), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in ``[-1, 1]`` -> RGB PIL image (rounded to uint8)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(x.shape)}")
    arr = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """Mask image -> boolean ``[H, W]`` array (luminance > :data:`MASK_THRESHOLD`)."""
    return np.asarray(to_luminance(mask)) > MASK_THRESHOLD


def resize_mask(mask: Image.Image, resolution: int) -> Image.Image:
    """Mask luminance at ``resolution x resolution`` with nearest neighbour (then threshold it)."""
    return to_luminance(mask).resize((resolution, resolution), Image.NEAREST)


def mask_bbox(mask: Image.Image | np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of all mask pixels (right/bottom exclusive), or None if empty."""
    m = binarize_mask(mask) if isinstance(mask, Image.Image) else np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _pil_bilinear(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img.resize(size, Image.BILINEAR)


def cv2_linear(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``cv2.resize`` with its default ``INTER_LINEAR`` (what the official strip uses) of an RGB image."""
    import cv2

    return Image.fromarray(cv2.resize(np.asarray(to_rgb(img)), size, interpolation=cv2.INTER_LINEAR), mode="RGB")


def fit_into(img: Image.Image, size: tuple[int, int], fill=(0, 0, 0), resize=_pil_bilinear) -> Image.Image:
    """Aspect-preserving resize of ``img`` into ``size = (w, h)``, centred on ``fill``.

    Sizes truncate (``int(w * scale)``) as the official ``resize_img_and_pad``; ``resize(img, size)``
    does the resampling (PIL bilinear by default, as there).
    """
    w, h = img.size
    tw, th = size
    scale = min(tw / w, th / h)
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    canvas = Image.new("RGB", (tw, th), fill)
    canvas.paste(resize(to_rgb(img), (nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def pad_to_square(img: Image.Image, size: int | None = None, fill=(0, 0, 0)) -> Image.Image:
    """Resize into a ``size x size`` square keeping the aspect ratio, centred on ``fill``.

    ``size=None`` keeps the scale: the image is only padded to its longer side.
    """
    side = max(img.size) if size is None else int(size)
    return fit_into(img, (side, side), fill)


def style_image(ref: Image.Image) -> Image.Image:
    """What SigLIP sees of a reference: :func:`pad_to_square` to :data:`STYLE_SIZE` (the official
    ``resize_img_and_pad(ref, (512, 512))``). The model and the style reward both use this."""
    return pad_to_square(ref, STYLE_SIZE)


def nearest_multiple(x: float, m: int = MULTIPLE) -> int:
    """The multiple of ``m`` nearest to ``x`` (ties go down, as in the official code)."""
    lower = int(x // m) * m
    return lower if x - lower <= lower + m - x else lower + m


def official_strip_height(ref_size: tuple[int, int], width: int) -> int:
    """The official strip height for a ``(w, h)`` reference at canvas ``width``: the aspect-preserving
    height truncated to an integer (``int((width / w) * h)``, in that order of float operations),
    then rounded to the nearest multiple of 16 with ties going down. May be 0 for very wide references."""
    rw, rh = ref_size
    return nearest_multiple(int((width / rw) * rh))


def make_reference_strip(ref: Image.Image, width: int, height: int | None = None,
                         max_height: int | None = None) -> Image.Image:
    """The in-context strip: ``ref`` at the canvas ``width`` (see the module docstring).

    ``height=None``: the official rule (:func:`official_strip_height`, a slight stretch, ``cv2``
    linear resize). Outside ``[16, max_height]`` the height is clamped and the reference fitted into
    the band instead of stretched. A given ``height`` always fits the reference into the band.
    """
    h = strip_height(ref.size, width, height, max_height)
    if height is None and h == official_strip_height(ref.size, width):
        return cv2_linear(ref, (width, h))  # the official stretch
    return fit_into(ref, (width, h), resize=cv2_linear)


def strip_height(ref_size: tuple[int, int], width: int, height: int | None = None,
                 max_height: int | None = None) -> int:
    """Height of the strip :func:`make_reference_strip` builds for a ``(w, h)`` reference: ``height`` when
    given, else the official height clamped to ``[16, max_height]``. What decides a sample's canvas size
    (and so which samples can share a batch) before any pixel is decoded."""
    if height is None:
        natural = official_strip_height(ref_size, width)
        height = MULTIPLE if natural < MULTIPLE else natural if max_height is None else min(natural, max_height)
    if height <= 0 or height % MULTIPLE:
        raise ValueError(f"strip height must be a positive multiple of {MULTIPLE}, got {height}")
    return height


# ---------------------------------------------------------------------- samples
@dataclass
class PreparedSample:
    """One model-ready sample. ``image``/``mask`` cover the whole canvas (strip on top, then source)."""

    id: str
    text: str
    image: torch.Tensor  # [3, H, W] in [-1, 1]
    mask: torch.Tensor  # [1, H, W] in {0, 1}; zero over the strip
    style_image: Image.Image  # reference padded to a STYLE_SIZE square, for SigLIP
    source_box: tuple[int, int, int, int]  # (left, top, right, bottom) of the source inside the canvas
    source_size: tuple[int, int]  # (width, height) of the original source


def prepare_inputs(source: Image.Image, mask: Image.Image, text: str, ref: Image.Image | None = None,
                   resolution: int = 512, reference_strip: bool = True, id: str = "",
                   strip_height: int | None = None) -> PreparedSample:
    """Raw images -> :class:`PreparedSample` (see the module docstring for every rule).

    ``ref=None`` uses the self-reference (source cropped to the mask's bounding box).
    ``strip_height`` fixes the strip height (multiple of 16) instead of deriving it from the reference.
    """
    if resolution <= 0 or resolution % MULTIPLE:
        raise ValueError(f"resolution must be a positive multiple of {MULTIPLE}, got {resolution}")
    if source.size != mask.size:
        raise ValueError(f"source is {source.size[0]}x{source.size[1]} but mask is {mask.size[0]}x{mask.size[1]}")
    source = to_rgb(source)
    if ref is None:
        box = mask_bbox(mask)
        if box is None:
            raise ValueError("mask is empty: no self-reference can be cropped")
        ref = source.crop(box)
    ref = to_rgb(ref)

    src = source.resize((resolution, resolution), Image.BICUBIC)
    m = binarize_mask(resize_mask(mask, resolution))
    if not m.any():
        raise ValueError(f"mask is empty after resizing to {resolution}x{resolution}")

    strip_h = 0
    image = pil_to_tensor(src)
    mask_t = torch.from_numpy(m.astype(np.float32))[None]
    if reference_strip:
        strip = make_reference_strip(ref, resolution, strip_height, max_height=resolution)
        strip_h = strip.size[1]
        image = torch.cat([pil_to_tensor(strip), image], dim=1)
        mask_t = torch.cat([torch.zeros(1, strip_h, resolution), mask_t], dim=1)
    return PreparedSample(
        id=id, text=text, image=image, mask=mask_t,
        style_image=style_image(ref),
        source_box=(0, strip_h, resolution, strip_h + resolution),
        source_size=source.size,
    )


@dataclass
class SampleBatch:
    """B prepared samples stacked: ``image [B, 3, H, W]``, ``mask [B, 1, H, W]``.

    Prompts need no padding or attention mask here: their embeddings come from the prompt cache,
    already padded to ``max_sequence_length`` (FLUX uses no text attention mask).
    """

    ids: list[str]
    texts: list[str]
    image: torch.Tensor
    mask: torch.Tensor
    style_images: list[Image.Image]
    source_boxes: list[tuple[int, int, int, int]]
    source_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


def collate_samples(samples: list[PreparedSample]) -> SampleBatch:
    """Stack samples; all canvases must have the same size."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]
    for s in samples[1:]:
        if s.image.shape != first.image.shape:
            raise ValueError(
                f"cannot batch canvases of different sizes: {first.id!r} is {_hw(first)}, {s.id!r} is {_hw(s)} "
                "(the reference strip height follows each reference's aspect ratio: fix it with "
                "strip_height, turn the strip off, or use batch size 1)")
    return SampleBatch(
        ids=[s.id for s in samples], texts=[s.text for s in samples],
        image=torch.stack([s.image for s in samples]), mask=torch.stack([s.mask for s in samples]),
        style_images=[s.style_image for s in samples],
        source_boxes=[s.source_box for s in samples], source_sizes=[s.source_size for s in samples],
    )


def _hw(s: PreparedSample) -> str:
    return f"{s.image.shape[2]}x{s.image.shape[1]} (WxH)"


def to_output_image(canvas: torch.Tensor, sample_or_box_and_size) -> Image.Image:
    """Generated canvas ``[3, H, W]`` in ``[-1, 1]`` -> the source region at the original source size.

    ``sample_or_box_and_size``: a :class:`PreparedSample` or a ``(source_box, source_size)`` pair.
    Crops the strip off, then resizes (bicubic) back to the source's (width, height).
    """
    if isinstance(sample_or_box_and_size, PreparedSample):
        box, size = sample_or_box_and_size.source_box, sample_or_box_and_size.source_size
    else:
        box, size = sample_or_box_and_size
    left, top, right, bottom = box
    if canvas.ndim != 3 or bottom > canvas.shape[1] or right > canvas.shape[2]:
        raise ValueError(f"source box {tuple(box)} does not fit a canvas of shape {tuple(canvas.shape)}")
    region = tensor_to_pil(canvas[:, top:bottom, left:right])
    size = tuple(int(v) for v in size)
    return region if region.size == size else region.resize(size, Image.BICUBIC)
