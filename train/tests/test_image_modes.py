"""Every PIL mode converts to 8-bit RGB / luminance with the documented pixel values.

16-bit files are written byte by byte (a minimal PNG encoder below) and decoded by the installed
Pillow, so the tests see exactly the modes that Pillow gives for real files.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from train.data.image_modes import to_luminance, to_rgb


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(arr: np.ndarray, color_type: int, trns: bytes | None = None) -> Image.Image:
    """Encode ``arr`` (uint16, [H, W] or [H, W, C]) as a 16-bit PNG and open it with Pillow."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + (_chunk(b"tRNS", trns) if trns else b"") + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def rgb(img):
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def lum(img):
    out = to_luminance(img)
    assert out.mode == "L" and out.size == img.size
    return np.asarray(out)


GRAY16 = np.array([[0, 255, 256, 0x7FFF, 0x8000, 0xFF00, 0xFFFF]], np.uint16)
GRAY16_8 = np.array([[0, 0, 1, 127, 128, 255, 255]], np.uint8)  # v >> 8


def test_16bit_gray_png_scales_by_high_byte():
    img = png16(GRAY16, color_type=0)
    assert img.mode == "I;16"
    assert np.asarray(img.convert("L")).max() == 255 and np.asarray(img.convert("L"))[0, 2] == 255  # Pillow clips
    np.testing.assert_array_equal(lum(img), GRAY16_8)
    np.testing.assert_array_equal(rgb(img), np.repeat(GRAY16_8[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_16bit_modes_from_bytes(mode):
    order = ">u2" if mode == "I;16B" else "<u2"
    img = Image.frombytes(mode, (GRAY16.shape[1], 1), GRAY16.astype(order).tobytes())
    np.testing.assert_array_equal(lum(img), GRAY16_8)


def test_16bit_rgb_png_matches_16bit_gray_of_same_samples():
    img = png16(np.stack([GRAY16, GRAY16[:, ::-1], np.full_like(GRAY16, 0x1234)], axis=-1), color_type=2)
    assert img.mode == "RGB"  # Pillow (12.3 and 13.0) keeps the high bytes itself
    expected = np.stack([GRAY16_8, GRAY16_8[:, ::-1], np.full_like(GRAY16_8, 0x12)], axis=-1)
    np.testing.assert_array_equal(rgb(img), expected)


def test_16bit_gray_alpha_png_composites_on_black():
    arr = np.array([[[0xFFFF, 0xFFFF], [0xFFFF, 0x8000], [0xC800, 0x0000], [0x6400, 0xFFFF]]], np.uint16)
    img = png16(arr, color_type=4)
    # 255·128/255 = 128; 200·0 = 0; 100·255/255 = 100
    np.testing.assert_array_equal(lum(img), [[255, 128, 0, 100]])
    np.testing.assert_array_equal(rgb(img)[..., 1], [[255, 128, 0, 100]])


def test_16bit_transparency_entries_become_black():
    gray = png16(GRAY16, color_type=0, trns=struct.pack(">H", 0xFF00))
    expected = GRAY16_8.copy()
    expected[0, 5] = 0  # exactly the 16-bit tRNS value; 0xFFFF (same high byte) stays opaque
    np.testing.assert_array_equal(lum(gray), expected)
    colour = png16(np.array([[[0x0100, 0x0200, 0xFFFF], [0x0300, 0x0200, 0xFFFF]]], np.uint16), color_type=2,
                   trns=struct.pack(">HHH", 0x0100, 0x0200, 0xFFFF))
    np.testing.assert_array_equal(rgb(colour), [[[0, 0, 0], [3, 2, 255]]])


def test_32bit_int_is_read_as_16bit_samples():
    img = Image.fromarray(np.array([[-5, 0, 255, 256, 0x8000, 65535, 10**6]], np.int32))
    assert img.mode == "I"
    np.testing.assert_array_equal(lum(img), [[0, 0, 0, 1, 128, 255, 255]])


def test_float_is_read_as_unit_range():
    img = Image.fromarray(np.array([[-0.5, 0.0, 0.2, 0.5, 1.0, 7.0, np.nan]], np.float32))
    assert img.mode == "F"
    np.testing.assert_array_equal(lum(img), [[0, 0, 51, 128, 255, 255, 0]])  # round(0.2·255) = 51


def test_rgba_and_la_composite_on_black():
    rgba = Image.fromarray(np.array([[[200, 100, 50, 128], [10, 20, 30, 255], [255, 255, 255, 0],
                                      [130, 1, 2, 200]]], np.uint8), "RGBA")
    # round(200·128/255) = 100, round(100·128/255) = 50, round(50·128/255) = 25;
    # round(130·200/255) = round(101.96) = 102, round(0.78) = 1, round(1.57) = 2
    np.testing.assert_array_equal(rgb(rgba), [[[100, 50, 25], [10, 20, 30], [0, 0, 0], [102, 1, 2]]])
    la = Image.fromarray(np.array([[[200, 128], [77, 255], [255, 0]]], np.uint8), "LA")
    np.testing.assert_array_equal(lum(la), [[100, 77, 0]])
    np.testing.assert_array_equal(rgb(la)[..., 0], [[100, 77, 0]])
    # luminance of a composited colour image is Pillow's luma of the composite
    np.testing.assert_array_equal(lum(rgba), np.asarray(Image.fromarray(rgb(rgba)).convert("L")))


def test_premultiplied_modes_keep_their_colour_bands():
    rgba = Image.fromarray(np.array([[[200, 100, 50, 128]]], np.uint8), "RGBA")
    premult = rgba.convert("RGBa")
    np.testing.assert_array_equal(rgb(premult), np.asarray(premult)[..., :3])
    np.testing.assert_allclose(rgb(premult).astype(int), [[[100, 50, 25]]], atol=1)


def test_palette_with_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.putdata([0, 1, 2])
    img.info["transparency"] = 1  # index 1 fully transparent
    np.testing.assert_array_equal(rgb(img), [[[255, 0, 0], [0, 0, 0], [0, 0, 255]]])
    img.info["transparency"] = bytes([255, 255, 51])  # per-index alpha: 51/255 = 0.2 on blue
    np.testing.assert_array_equal(rgb(img), [[[255, 0, 0], [0, 255, 0], [0, 0, 51]]])
    np.testing.assert_array_equal(lum(img), [[76, 150, 6]])  # Pillow luma of those composites
    plain = Image.new("P", (1, 1))
    plain.putpalette([9, 8, 7])
    np.testing.assert_array_equal(rgb(plain), [[[9, 8, 7]]])


def test_gray_with_transparency_value():
    img = Image.fromarray(np.array([[0, 10, 200]], np.uint8))
    img.info["transparency"] = 10
    np.testing.assert_array_equal(lum(img), [[0, 0, 200]])


def test_cmyk_bilevel_and_other_colour_spaces():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 0, 128]]], np.uint8),
                           "CMYK")
    # R = (255 - K)·(1 - C/255), etc.
    np.testing.assert_array_equal(rgb(cmyk), [[[255, 255, 255], [0, 255, 255], [0, 0, 0], [127, 0, 127]]])
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    np.testing.assert_array_equal(lum(bilevel), [[0, 255]])
    for colour in [(200, 30, 60), (255, 255, 255), (0, 0, 0)]:
        src = Image.new("RGB", (1, 1), colour)
        for mode in ("YCbCr", "HSV", "RGBX"):
            np.testing.assert_allclose(rgb(src.convert(mode))[0, 0].astype(int), colour, atol=2)
    from PIL import ImageCms

    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(Image.new("RGB", (1, 1), (200, 30, 60)), to_lab)
    assert lab.mode == "LAB"
    np.testing.assert_allclose(rgb(lab)[0, 0].astype(int), (200, 30, 60), atol=2)
    assert lum(lab)[0, 0] == np.asarray(Image.fromarray(rgb(lab)).convert("L"))[0, 0]


def test_8bit_images_pass_through_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    assert to_rgb(img) is img
    np.testing.assert_array_equal(lum(img), np.asarray(img.convert("L")))
    gray = Image.fromarray(arr[..., 0])
    assert to_luminance(gray) is gray
    np.testing.assert_array_equal(rgb(gray), np.repeat(arr[..., :1], 3, axis=2))
