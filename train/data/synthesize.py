"""Synthetic text images: source / mask / ref / text records for tests, the demo and smoke runs (docs/ARCHITECTURE.md §4).

    python -m train.data.synthesize --out data/synth --num 100 --resolution 512 --lang en,zh --seed 0

Each sample: a square background (solid, gradient or smooth noise), a word or two drawn in a random
font, size and contrasting colour; the mask is the ink's bounding box dilated by ``resolution // 64``
pixels (at least 2). Even-numbered samples get a reference image: other words in the same font, size
and colour on a background of the same kind, cropped to their own mask box; odd-numbered samples have
none (self-reference). Languages alternate over ``--lang``.

Layouts: ``jsonl`` writes ``OUT/data.jsonl`` (+ ``OUT/images/``, paths relative to the file);
``benchmark`` writes ``OUT/benchmark/`` in the official layout (``self_bench.txt`` + ``test{N}_*.png``,
N from 1; self-reference samples get their self-crop as ``test{N}_ref.png``, as the official
scripts expect a ref file); ``both`` writes both.

Latin text uses DejaVu fonts (Debian ``fonts-dejavu-core``); Chinese needs a CJK font
(``fonts-wqy-microhei`` or ``fonts-noto-cjk``). A missing font is an error naming the package.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
LATIN_FONTS = tuple(DEJAVU_DIR / n for n in (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
))
CJK_FONTS = tuple(Path(p) for p in (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
))
FONT_PACKAGES = {"en": "fonts-dejavu-core", "zh": "fonts-wqy-microhei (or fonts-noto-cjk)"}

EN_WORDS = (
    "hello world coffee garden river summer sunset bakery vintage music open sale fresh market "
    "ocean forest mountain city night dream light paper story coast harbor station library museum "
    "studio festival winter autumn spring morning golden silver velvet candle honey maple cedar "
    "Pizza Jazz Cafe Books Hotel Bistro Tea Bar Press Club Radio Cinema Studio Kitchen Garage Salon "
    "Welcome Thanks Happy Lucky Royal Grand Urban Wild Blue Red Green Black White North South East West"
).split()
ZH_WORDS = (
    "你好 世界 咖啡 花园 春天 书法 学习 快乐 城市 音乐 欢迎 美食 梦想 未来 阳光 大海 月亮 星空 山水 茶馆 "
    "书店 面包 微笑 旅行 家庭 朋友 自由 和平 健康 幸福 新年 红包 熊猫 长城 故宫 中秋 团圆 清风 明月 江南"
).split()
WORDS = {"en": EN_WORDS, "zh": ZH_WORDS}


class MissingFontError(RuntimeError):
    """No usable font for a language; the message names the Debian package to install."""


def find_fonts(lang: str, candidates: tuple[Path, ...] | None = None) -> list[Path]:
    """Installed font files for ``lang`` ("en" or "zh"); raises :class:`MissingFontError` if none."""
    if lang not in WORDS:
        raise ValueError(f"unknown language {lang!r} (choose from {', '.join(WORDS)})")
    if candidates is None:
        candidates = LATIN_FONTS if lang == "en" else CJK_FONTS
    found = [p for p in candidates if p.is_file()]
    if not found:
        what = "Chinese text needs a CJK font" if lang == "zh" else "Latin text needs the DejaVu fonts"
        raise MissingFontError(
            f"{what} and none was found (looked for {', '.join(str(p) for p in candidates)}); "
            f"install the Debian package {FONT_PACKAGES[lang]}: apt-get install {FONT_PACKAGES[lang].split()[0]}")
    return found


@lru_cache(maxsize=256)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size, index=0)


# ---------------------------------------------------------------------- rendering
def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _background(rng: np.random.Generator, size: int, kind: str, colors: np.ndarray) -> Image.Image:
    """``kind`` in solid / gradient / noise; ``colors`` ``[2, 3]`` uint8-range floats."""
    if kind == "solid":
        arr = np.broadcast_to(colors[0], (size, size, 3))
    elif kind == "gradient":
        t = np.linspace(0.0, 1.0, size)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]  # horizontal or vertical
        arr = colors[0] * (1 - t) + colors[1] * t
        arr = np.broadcast_to(arr, (size, size, 3))
    elif kind == "noise":
        # smooth noise: a coarse random field upsampled, around the first colour
        coarse = rng.normal(0.0, 25.0, (max(2, size // 16), max(2, size // 16), 3)) + colors[0]
        img = Image.fromarray(coarse.clip(0, 255).astype(np.uint8), "RGB")
        return img.resize((size, size), Image.BICUBIC)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return Image.fromarray(np.ascontiguousarray(arr).clip(0, 255).astype(np.uint8), "RGB")


def _text_color(rng: np.random.Generator, background: Image.Image) -> tuple[int, int, int]:
    """A random colour whose luminance differs from the background's mean by at least 100."""
    bg = _luma(np.asarray(background, dtype=np.float32).reshape(-1, 3).mean(0))
    for _ in range(50):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if abs(_luma(c) - bg) >= 100:
            return c
    return (0, 0, 0) if bg > 127 else (255, 255, 255)


def _draw_text(rng, background: Image.Image, text: str, font_path: Path, font_size: int, color, margin: int):
    """Draw ``text`` at a random place -> (image, ink box, mask box). Boxes: (left, top, right, bottom)."""
    size = background.size[0]
    font = _font(font_path, font_size)
    l, t, r, b = font.getbbox(text)
    w, h = r - l, b - t
    x = int(rng.integers(margin + 1, max(margin + 2, size - w - margin)))
    y = int(rng.integers(margin + 1, max(margin + 2, size - h - margin)))
    layer = Image.new("L", (size, size), 0)
    ImageDraw.Draw(layer).text((x - l, y - t), text, font=font, fill=255)
    ink = layer.getbbox()  # exact ink extent, whatever the font metrics say
    if ink is None:
        raise RuntimeError(f"font {font_path.name} drew no pixels for {text!r}")
    image = Image.composite(Image.new("RGB", (size, size), color), background, layer)
    box = (max(0, ink[0] - margin), max(0, ink[1] - margin), min(size, ink[2] + margin), min(size, ink[3] + margin))
    return image, ink, box


def _fit_font_size(text: str, font_path: Path, size: int, want: int, margin: int) -> int:
    """Largest font size <= ``want`` whose text fits inside the image with margins."""
    limit = size - 2 * margin - 4
    font_size = want
    while font_size > 6:
        l, t, r, b = _font(font_path, font_size).getbbox(text)
        if r - l <= limit and b - t <= limit:
            return font_size
        font_size = max(6, int(font_size * min(0.9, limit / max(r - l, b - t))))
    return font_size


def _words(rng, lang: str, avoid: str = "") -> str:
    pool = WORDS[lang]
    for _ in range(20):
        n = 1 if rng.random() < 0.6 else 2
        picked = [pool[int(i)] for i in rng.choice(len(pool), n, replace=False)]
        text = ("" if lang == "zh" else " ").join(picked)
        if text != avoid:
            return text
    return text


@dataclass
class RenderedSample:
    text: str
    lang: str
    font: Path
    font_size: int
    color: tuple[int, int, int]
    background: Image.Image  # the source without text
    source: Image.Image
    mask: Image.Image  # "L", 255 inside the dilated ink box
    ink_box: tuple[int, int, int, int]
    mask_box: tuple[int, int, int, int]
    ref: Image.Image | None


def render_sample(rng: np.random.Generator, resolution: int, lang: str, with_ref: bool,
                  fonts: list[Path] | None = None) -> RenderedSample:
    """One synthetic sample at ``resolution x resolution``."""
    fonts = fonts or find_fonts(lang)
    font_path = fonts[int(rng.integers(len(fonts)))]
    margin = max(2, resolution // 64)
    kind = ("solid", "gradient", "noise")[int(rng.integers(3))]
    colors = rng.integers(0, 256, (2, 3)).astype(np.float64)
    background = _background(rng, resolution, kind, colors)
    color = _text_color(rng, background)
    text = _words(rng, lang)
    want = int(rng.integers(max(8, resolution // 10), max(9, resolution // 4)))
    font_size = _fit_font_size(text, font_path, resolution, want, margin)
    source, ink, box = _draw_text(rng, background, text, font_path, font_size, color, margin)
    mask = Image.new("L", (resolution, resolution), 0)
    mask.paste(255, box)

    ref = None
    if with_ref:
        other = _words(rng, lang, avoid=text)
        ref_bg = _background(rng, resolution, kind, colors)
        ref_size = _fit_font_size(other, font_path, resolution, font_size, margin)
        ref_img, _, ref_box = _draw_text(rng, ref_bg, other, font_path, ref_size, color, margin)
        ref = ref_img.crop(ref_box)
    return RenderedSample(text=text, lang=lang, font=font_path, font_size=font_size, color=color,
                          background=background, source=source, mask=mask, ink_box=ink, mask_box=box, ref=ref)


# ---------------------------------------------------------------------- dataset writer
def synthesize(out, num: int, resolution: int = 512, langs=("en",), seed: int = 0, layout: str = "jsonl") -> Path:
    """Write ``num`` samples under ``out``; returns ``out/data.jsonl`` (or ``out/benchmark`` if only that layout)."""
    out = Path(out)
    langs = tuple(langs)
    if layout not in ("jsonl", "benchmark", "both"):
        raise ValueError(f"layout must be jsonl, benchmark or both, got {layout!r}")
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if resolution < 32 or resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 and at least 32, got {resolution}")
    if not langs:
        raise ValueError("no language given")
    fonts = {lang: find_fonts(lang) for lang in dict.fromkeys(langs)}  # fail before writing anything

    rng = np.random.default_rng(seed)
    jsonl_lines, bench_lines = [], []
    images, bench = out / "images", out / "benchmark"
    if layout in ("jsonl", "both"):
        images.mkdir(parents=True, exist_ok=True)
    if layout in ("benchmark", "both"):
        bench.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        lang = langs[i % len(langs)]
        s = render_sample(rng, resolution, lang, with_ref=i % 2 == 0, fonts=fonts[lang])
        if layout in ("jsonl", "both"):
            sid = f"syn{i:05d}"
            rec = {"id": sid, "source": f"images/{sid}_source.png", "mask": f"images/{sid}_mask.png", "text": s.text}
            s.source.save(out / rec["source"])
            s.mask.save(out / rec["mask"])
            if s.ref is not None:
                rec["ref"] = f"images/{sid}_ref.png"
                s.ref.save(out / rec["ref"])
            jsonl_lines.append(json.dumps(rec, ensure_ascii=False))
        if layout in ("benchmark", "both"):
            n = i + 1
            s.source.save(bench / f"test{n}_source.png")
            s.mask.save(bench / f"test{n}_mask.png")
            (s.ref if s.ref is not None else s.source.crop(s.mask_box)).save(bench / f"test{n}_ref.png")
            bench_lines.append(f"{n}-{s.text}")
    if bench_lines:
        (bench / "self_bench.txt").write_text("\n".join(bench_lines) + "\n", encoding="utf-8")
    if jsonl_lines:
        path = out / "data.jsonl"
        path.write_text("\n".join(jsonl_lines) + "\n", encoding="utf-8")
        return path
    return bench


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Render synthetic text-image samples (source, mask, ref, text).")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--num", type=int, default=100, help="number of samples")
    p.add_argument("--resolution", type=int, default=512, help="square image size (multiple of 16)")
    p.add_argument("--lang", default="en", help="comma-separated languages, alternating per sample: en, zh")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--layout", choices=("jsonl", "benchmark", "both"), default="jsonl",
                   help="data.jsonl + images/, the official benchmark layout under benchmark/, or both")
    args = p.parse_args(argv)
    langs = tuple(x.strip() for x in args.lang.split(",") if x.strip())
    try:
        path = synthesize(args.out, args.num, args.resolution, langs, args.seed, args.layout)
    except (MissingFontError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {args.num} samples: {path}")


if __name__ == "__main__":
    main()
