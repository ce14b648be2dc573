"""Image transport for the reward service: PNG, base64, JSON-safe. Never pickle."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import struct
import threading
import zlib
from collections import OrderedDict

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """The payload is not a readable base64 PNG."""


class ImageTooLargeError(ValueError):
    """The PNG decodes to more pixels than allowed."""


_COLOR_TYPE = {"L": 0, "RGB": 2, "RGBA": 6}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: Image.Image, compress_level: int = 1) -> bytes:
    """PIL image -> PNG bytes.

    8-bit L / RGB / RGBA are written directly (filter type 0 + zlib): on the small crops
    the reward client sends this is ~3x faster than Pillow's encoder, whose per-image set-up
    dominates. Other modes go through Pillow.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode not in _COLOR_TYPE:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=compress_level)
        return buf.getvalue()
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    rows = np.zeros((h, arr.size // max(h, 1) + 1), dtype=np.uint8)  # leading 0 = "no filter" per row
    rows[:, 1:] = arr.reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[image.mode], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level))
            + _chunk(b"IEND", b""))


def encode_png_b64(image: Image.Image, compress_level: int = 1) -> str:
    """PIL image -> base64 PNG string (low compression: zlib time matters more than bytes here)."""
    return base64.b64encode(encode_png(image, compress_level)).decode("ascii")


_CHANNELS = {0: ("L", 1), 2: ("RGB", 3), 6: ("RGBA", 4)}


def png_size_b64(data: str) -> tuple[int, int]:
    """``(width, height)`` from a base64 PNG's header without decoding the pixels."""
    try:
        head = base64.b64decode(data[:44], validate=True) if isinstance(data, str) else b""
    except (binascii.Error, ValueError):
        head = b""
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ImageDecodeError("image is not a base64 PNG")
    return struct.unpack_from(">II", head, 16)


def _decode_plain_png(raw: bytes, max_pixels: int | None) -> Image.Image | None:
    """Decode 8-bit, non-interlaced L/RGB/RGBA PNGs whose rows are unfiltered (what
    ``encode_png`` writes) with zlib + numpy; ``None`` hands any other PNG to Pillow.

    Chunk CRCs, lengths and the pixel count are checked; damage raises ``ImageDecodeError``.
    """
    pos, header, idat = len(PNG_SIGNATURE), None, []
    while True:
        if pos + 12 > len(raw):
            raise ImageDecodeError("corrupt PNG: truncated (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", raw, pos)
        end = pos + 8 + length
        if end + 4 > len(raw):
            raise ImageDecodeError(f"corrupt PNG: truncated {kind!r} chunk")
        data = raw[pos + 8:end]
        if zlib.crc32(kind + data) != struct.unpack_from(">I", raw, end)[0]:
            raise ImageDecodeError(f"corrupt PNG: CRC mismatch in {kind!r} chunk")
        pos = end + 4
        if kind == b"IHDR":
            if length != 13:
                raise ImageDecodeError("corrupt PNG: bad IHDR")
            header = struct.unpack(">IIBBBBB", data)
            w, h = header[:2]
            if w == 0 or h == 0:
                raise ImageDecodeError(f"corrupt PNG: image is {w}x{h} pixels")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"IEND":
            break
        elif not kind[0] & 0x20:  # an unknown critical chunk (e.g. PLTE): not a plain PNG
            return None
    if header is None:
        raise ImageDecodeError("corrupt PNG: no IHDR chunk")
    w, h, depth, color, _, _, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace:
        return None
    mode, c = _CHANNELS[color]
    expected = h * (w * c + 1)
    try:
        dec = zlib.decompressobj()
        rows = dec.decompress(b"".join(idat), expected + 1)
    except zlib.error as exc:
        raise ImageDecodeError(f"corrupt PNG: {exc}") from None
    if len(rows) != expected or not dec.eof:
        raise ImageDecodeError(f"corrupt PNG: pixel data is {len(rows)} bytes, expected {expected}")
    if np.frombuffer(rows, dtype=np.uint8).reshape(h, w * c + 1)[:, 0].any():
        return None  # filtered rows: Pillow undoes the filters
    # Rows are [filter byte, pixels...]: read the pixels in place with a row stride of w*c + 1.
    return Image.frombytes(mode, (w, h), memoryview(rows)[1:], "raw", mode, w * c + 1, 1)


def decode_png_b64(data: str, max_pixels: int | None = None, mode: str | None = None) -> Image.Image:
    """Base64 PNG string -> fully loaded PIL image.

    ``mode="RGB"`` / ``"L"`` converts with ``train.data.image_modes`` (16-bit samples scaled,
    transparency composited on black, as everywhere else in the project); ``None`` keeps the
    PNG's own mode. Raises ``ImageDecodeError`` for anything that is not a complete PNG and
    ``ImageTooLargeError`` (checked from the header, before decoding) above ``max_pixels``.
    """
    img = _decode(data, max_pixels)
    if mode is None:
        return img
    from train.data.image_modes import to_luminance, to_rgb

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be None, 'RGB' or 'L', got {mode!r}")
    return to_rgb(img) if mode == "RGB" else to_luminance(img)


def _decode(data: str, max_pixels: int | None) -> Image.Image:
    if not isinstance(data, str) or not data:
        raise ImageDecodeError("image is empty or not a string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"image is not valid base64: {exc}") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise ImageDecodeError("image is not a PNG (bad signature)")
    img = _decode_plain_png(raw, max_pixels)
    if img is not None:
        return img
    try:
        img = Image.open(io.BytesIO(raw), formats=["PNG"])
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
        img.load()
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt PNG: {exc}") from None
    return img



def content_key(image: Image.Image) -> bytes:
    """SHA-256 of an image's mode, size and pixels: equal exactly when those are (collisions aside)."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.digest()


class LRU:
    """A thread-safe mapping that keeps at most ``max_bytes`` (as each ``put`` sizes its value) and
    drops the least recently used entries first; ``max_bytes=0`` keeps nothing."""

    def __init__(self, max_bytes: int):
        if not max_bytes >= 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key):
        """The value stored under ``key`` (now the most recent), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, value, size: int) -> None:
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped


def pil_bytes(image: Image.Image) -> int:
    """Memory Pillow holds for ``image``'s pixels (multi-band 8-bit images take 4 bytes a pixel)."""
    return image.width * image.height * (1 if image.mode in ("L", "P", "1") else 4)


class DecodeCache(LRU):
    """Decoded images of repeated base64 PNGs, keyed by the exact base64 text (plus the mode and
    pixel limit asked for); sized by decoded pixels plus the text.

    The reward server decodes the images that items share through it (a group's source, mask and
    reference; the same references every epoch), so each is decoded once while it stays cached.
    Errors are never cached. Cached images are shared between items: callers must not modify them
    in place (``crop`` and the like return new images).
    """

    def decode(self, data: str, max_pixels: int | None = None, mode: str | None = None) -> Image.Image:
        """``decode_png_b64(data, max_pixels, mode)``, from the cache when the same text was decoded before."""
        key = (data, mode, max_pixels)
        img = self.get(key)
        if img is None:
            img = decode_png_b64(data, max_pixels, mode)  # raises for bad input: nothing is stored
            self.put(key, img, pil_bytes(img) + len(data))
        return img


class EncodeCache(LRU):
    """Base64 PNGs of images seen before, keyed by :func:`content_key`; sized by the text."""

    def encode(self, image: Image.Image) -> str:
        """``encode_png_b64(image)``, from the cache when an image with the same pixels was encoded before."""
        key = content_key(image)
        data = self.get(key)
        if data is None:
            data = encode_png_b64(image)
            self.put(key, data, len(data) + 100)
        return data
