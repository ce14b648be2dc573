"""Training records: three input formats, validation of everything up front, and the torch Dataset (docs/ARCHITECTURE.md §4).

``--train_data_json`` may be

1. a ``.json`` file holding a list of records, or
2. a ``.jsonl`` file with one record per line, each ``{"source", "mask", "text", "ref"?, "id"?}``
   (paths relative to the file; no ``ref`` = self-reference, the source cropped to the mask's box), or
3. a directory in the official benchmark layout: ``self_bench.txt`` with lines ``N-text`` and files
   ``test{N}_source.png``, ``test{N}_mask.png`` and optionally ``test{N}_ref.png`` (absent = self-reference).

Every record is checked before training starts; all problems are reported together in one
:class:`DatasetError`, each naming the record and what is wrong. Nothing is skipped.

Identity: a record's ``id`` is the given one, else ``sha256(source bytes, mask bytes, ref bytes, text)``
(16 hex digits). Content-derived ids are identical for the same files in any format, across runs,
and across machines that mount the data at different paths (rollout groups are keyed by id).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .image_modes import to_luminance, to_rgb
from .preprocess import (MASK_THRESHOLD, PreparedSample, binarize_mask, collate_samples, mask_bbox, prepare_inputs,
                         resize_mask, strip_height)

ALLOWED_KEYS = ("source", "mask", "text", "ref", "id")
BENCH_PROMPTS = "self_bench.txt"


class DatasetError(ValueError):
    """An invalid dataset; ``problems`` holds one line per problem, each naming the record.

    The message starts with ``where`` (the dataset path, preceded by ``flag`` when given, e.g.
    ``--rl_eval_data data/eval.jsonl``), so callers print it as is rather than adding the path again.
    """

    def __init__(self, where, problems: list[str], flag: str | None = None):
        self.where, self.flag, self.problems = str(where), flag, list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        head = f"{flag} {where}" if flag else f"{where}"
        super().__init__(f"{head}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Record:
    """One training sample on disk; paths are absolute."""

    id: str
    source: Path
    mask: Path
    text: str
    ref: Path | None = None
    ref_size: tuple[int, int] | None = None  # (w, h) of the reference (or self-reference crop), if known


# ---------------------------------------------------------------------- reading the three formats
@dataclass
class _Raw:
    """A record as read from the file, before validation."""

    index: int
    where: str  # extra locator for messages, e.g. "line 5" or "test12"
    fields: dict | None
    problems: list[str]


def _read_json(path: Path) -> list[_Raw]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(path, [f"cannot read the JSON file: {e}"]) from None
    if not isinstance(data, list):
        raise DatasetError(path, [f"a .json dataset must hold a list of records, got {type(data).__name__}"])
    return [_Raw(i, "", r, []) for i, r in enumerate(data)]


def _read_jsonl(path: Path) -> list[_Raw]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, [f"cannot read the JSONL file: {e}"]) from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(_Raw(len(out), f"line {lineno}", json.loads(line), []))
        except json.JSONDecodeError as e:
            out.append(_Raw(len(out), f"line {lineno}", None, [f"invalid JSON: {e.msg} (column {e.colno})"]))
    return out


def _read_benchmark(root: Path) -> tuple[list[_Raw], list[str]]:
    """Records of a benchmark folder, and problems of ``self_bench.txt`` itself (reported beside the
    records' own problems, so one bad line does not hide a missing image)."""
    prompts = root / BENCH_PROMPTS
    if not prompts.is_file():
        raise DatasetError(root, [f"a dataset directory needs {BENCH_PROMPTS} (official benchmark layout: "
                                  f"lines 'N-text' and files test{{N}}_source.png, test{{N}}_mask.png, test{{N}}_ref.png)"])
    try:
        lines = prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(root, [f"cannot read {BENCH_PROMPTS}: {e}"]) from None
    problems, texts, where = [], {}, {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        key, sep, text = line.partition("-")
        if not sep or not key.strip().isdigit():
            problems.append(f"{BENCH_PROMPTS} line {lineno}: expected 'N-text', got {line!r}")
        elif int(key) in texts:
            problems.append(f"{BENCH_PROMPTS} line {lineno}: duplicate sample number {int(key)} "
                            f"(also line {where[int(key)]})")
        else:
            texts[int(key)], where[int(key)] = text, lineno
    for f in sorted(root.glob("test*_source.png")):
        m = re.fullmatch(r"test(\d+)_source\.png", f.name)
        if m and int(m.group(1)) not in texts:
            problems.append(f"{f.name} has no line in {BENCH_PROMPTS}")
    out = []
    for i, n in enumerate(sorted(texts)):
        ref = root / f"test{n}_ref.png"
        fields = {"source": f"test{n}_source.png", "mask": f"test{n}_mask.png", "text": texts[n],
                  "ref": ref.name if ref.exists() else None}
        out.append(_Raw(i, f"test{n}", fields, []))
    return out, problems


# ---------------------------------------------------------------------- validation
def _load_image(label: str, value, base: Path, problems: list[str]) -> tuple[Path, bytes, Image.Image] | None:
    """Resolve and fully decode one image file; on failure append a problem and return None."""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{label} must be a non-empty path string, got {value!r}")
        return None
    path = Path(value)
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_file():
        problems.append(f"{label} file not found: {path}")
        return None
    try:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()  # decode fully: truncated files fail here, not mid-training
        img = to_luminance(img) if label == "mask" else to_rgb(img)  # modes Pillow cannot convert fail here too
    except Exception as e:  # PIL raises many types for bad files
        problems.append(f"{label} is not a readable image: {path} ({type(e).__name__}: {e})")
        return None
    return path, data, img


def _content_id(source: bytes, mask: bytes, ref: bytes | None, text: str) -> str:
    h = hashlib.sha256(b"calligrapher-record-v1")
    for part in (source, mask, ref if ref is not None else b"", text.encode("utf-8")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _check(raw: _Raw, base: Path, resolution: int | None) -> tuple[Record | None, str | None, list[str]]:
    """Validate one raw record -> (record or None, id if known, problems)."""
    problems = list(raw.problems)
    f = raw.fields
    if f is None:
        return None, None, problems
    if not isinstance(f, dict):
        return None, None, problems + [f"a record must be a JSON object, got {type(f).__name__}"]
    unknown = sorted(set(f) - set(ALLOWED_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown} (allowed: {', '.join(ALLOWED_KEYS)})")
    given_id = f.get("id")
    if given_id is not None and (isinstance(given_id, bool) or not isinstance(given_id, (str, int))
                                 or not str(given_id).strip()):
        problems.append(f"id must be a non-empty string or an integer, got {given_id!r}")
        given_id = None
    given_id = None if given_id is None else str(given_id)

    text = f.get("text")
    if "text" not in f:
        problems.append("missing key 'text'")
    elif not isinstance(text, str):
        problems.append(f"text must be a string, got {type(text).__name__}")
    elif not text.strip():
        problems.append("empty text")
    for key in ("source", "mask"):
        if key not in f:
            problems.append(f"missing key {key!r}")
    source = _load_image("source", f["source"], base, problems) if "source" in f else None
    mask = _load_image("mask", f["mask"], base, problems) if "mask" in f else None
    ref = _load_image("ref", f["ref"], base, problems) if f.get("ref") is not None else None
    ref_failed = f.get("ref") is not None and ref is None

    if mask is not None:
        m = binarize_mask(mask[2])
        if not m.any():
            problems.append(f"mask is empty (no pixel above {MASK_THRESHOLD}): {mask[0]}")
        elif m.all():
            problems.append(f"mask is all white (it covers the whole image): {mask[0]}")
        elif resolution and not binarize_mask(resize_mask(mask[2], resolution)).any():
            problems.append(f"mask vanishes when resized (nearest neighbour) to the training resolution "
                            f"{resolution}x{resolution}: {mask[0]}; draw it thicker or use a larger --resolution")
        if source is not None and source[2].size != mask[2].size:
            (sw, sh), (mw, mh) = source[2].size, mask[2].size
            problems.append(f"size mismatch: source is {sw}x{sh} but mask is {mw}x{mh}")

    rid = given_id
    if rid is None and source and mask and not ref_failed and isinstance(text, str):
        rid = _content_id(source[1], mask[1], ref[1] if ref else None, text)
    if problems or rid is None:
        return None, rid, problems
    ref_size = ref[2].size if ref else _self_reference_size(mask[2])
    return (Record(id=rid, source=source[0], mask=mask[0], text=text, ref=ref[0] if ref else None, ref_size=ref_size),
            rid, problems)


def _self_reference_size(mask: Image.Image) -> tuple[int, int]:
    left, top, right, bottom = mask_bbox(mask)
    return right - left, bottom - top


def _label(raw: _Raw, rid: str | None) -> str:
    parts = [raw.where] if raw.where else []
    if rid is not None and rid != raw.where:
        parts.append(f"id {rid!r}")
    return f"record {raw.index}" + (f" ({', '.join(parts)})" if parts else "")


def load_records(path, resolution: int | None = None, flag: str | None = None) -> list[Record]:
    """Read and validate a dataset (``.json``, ``.jsonl`` or benchmark directory) -> records in file order.

    ``resolution`` additionally checks that every mask survives resizing to that size.
    Raises :class:`DatasetError` listing every problem found; ``flag`` (e.g. ``"--rl_eval_data"``)
    names the command-line flag the path came from in its message.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(path, ["dataset not found"], flag)
    file_problems: list[str] = []
    try:
        if path.is_dir():
            raws, file_problems = _read_benchmark(path)
            base = path.resolve()
        elif path.suffix.lower() == ".jsonl":
            raws, base = _read_jsonl(path), path.resolve().parent
        elif path.suffix.lower() == ".json":
            raws, base = _read_json(path), path.resolve().parent
        else:
            raise DatasetError(path, ["expected a .json or .jsonl file, or a benchmark directory"])
    except DatasetError as exc:
        raise DatasetError(path, exc.problems, flag) from None
    if not raws and not file_problems:
        raise DatasetError(path, ["the dataset has no records"], flag)
    records, problems = _validate(raws, base, resolution)
    if file_problems or problems:
        raise DatasetError(path, file_problems + problems, flag)
    return records


def _validate(raws: list[_Raw], base: Path, resolution: int | None) -> tuple[list[Record], list[str]]:
    records, problems, seen = [], [], {}
    for raw in raws:
        record, rid, probs = _check(raw, base, resolution)
        label = _label(raw, rid)
        if rid is not None:
            if rid in seen:
                derived = raw.fields.get("id") is None if isinstance(raw.fields, dict) else True
                why = " (same source, mask, ref and text)" if derived else ""
                probs.append(f"duplicate id {rid!r}: also {seen[rid]}{why}")
            else:
                seen[rid] = label
        problems += [f"{label}: {p}" for p in probs]
        if record is not None and not probs:
            records.append(record)
    return records, problems


def load_sample(source, mask, text: str, ref=None, resolution: int | None = None) -> Record:
    """Validate one sample given as files (``infer --source/--mask/--ref/--text``) with the dataset's
    rules; the record id is the source file's stem. Raises :class:`DatasetError` naming each problem."""
    fields = {"source": str(Path(source).expanduser().resolve()), "mask": str(Path(mask).expanduser().resolve()),
              "text": text, "ref": None if ref is None else str(Path(ref).expanduser().resolve()),
              "id": Path(source).stem or "sample"}
    records, problems = _validate([_Raw(0, "", fields, [])], Path.cwd(), resolution)
    if problems:
        raise DatasetError("--source/--mask/--ref/--text", [p.split(": ", 1)[1] for p in problems])
    return records[0]


# ---------------------------------------------------------------------- torch dataset
def open_image(path: Path, mode: str) -> Image.Image:
    """Read an image file as 8-bit ``"RGB"`` or ``"L"`` through :mod:`train.data.image_modes`."""
    convert = {"RGB": to_rgb, "L": to_luminance}.get(mode)
    if convert is None:
        raise ValueError(f"open_image reads 'RGB' or 'L', not {mode!r}")
    with Image.open(path) as img:
        img.load()
        out = convert(img)
        return out.copy() if out is img else out  # closing the file invalidates ``img`` itself


class CalligraphyDataset(torch.utils.data.Dataset):
    """Records -> :class:`PreparedSample` (official preprocessing, see ``train.data.preprocess``).

    Use ``collate_fn=CalligraphyDataset.collate_fn`` in a DataLoader. ``strip_height`` fixes the
    reference-strip height so that samples with differently shaped references can share a batch.
    """

    collate_fn = staticmethod(collate_samples)

    def __init__(self, records: list[Record], resolution: int = 512, reference_strip: bool = True,
                 strip_height: int | None = None):
        self.records = list(records)
        self.resolution, self.reference_strip, self.strip_height = resolution, reference_strip, strip_height

    @classmethod
    def from_path(cls, path, **kwargs) -> "CalligraphyDataset":
        return cls(load_records(path, resolution=kwargs.get("resolution", 512)), **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PreparedSample:
        r = self.records[index]
        return prepare_inputs(
            open_image(r.source, "RGB"), open_image(r.mask, "L"), r.text,
            ref=open_image(r.ref, "RGB") if r.ref is not None else None,
            resolution=self.resolution, reference_strip=self.reference_strip, id=r.id,
            strip_height=self.strip_height,
        )

    def canvas_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of sample ``index``'s canvas, from the reference's size alone (no preprocessing):
        only samples of one canvas size can share a batch (see :mod:`train.data.buckets`)."""
        if not self.reference_strip:
            return self.resolution, self.resolution
        if self.strip_height:
            return self.resolution, self.strip_height + self.resolution
        r = self.records[index]
        size = r.ref_size
        if size is None:
            if r.ref is not None:
                with Image.open(r.ref) as img:  # the header only
                    size = img.size
            else:
                size = _self_reference_size(open_image(r.mask, "L"))
        return self.resolution, strip_height(size, self.resolution, max_height=self.resolution) + self.resolution

    @property
    def texts(self) -> list[str]:
        """Unique texts in first-seen order (what the prompt cache must hold)."""
        return list(dict.fromkeys(r.text for r in self.records))



def main(argv=None) -> None:
    """``python -m train.data.dataset PATH [--resolution R]``: validate a dataset; exit 1 listing every problem."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m train.data.dataset",
                                description="Validate a Calligrapher dataset (.json, .jsonl or benchmark dir).")
    p.add_argument("path", type=Path)
    p.add_argument("--resolution", type=int, default=512, help="also check masks survive resizing to this size")
    args = p.parse_args(argv)
    try:
        records = load_records(args.path, resolution=args.resolution)
    except DatasetError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None
    self_ref = sum(r.ref is None for r in records)
    print(f"{args.path}: {len(records)} valid records ({self_ref} self-reference, "
          f"{len({r.text for r in records})} unique texts)")


if __name__ == "__main__":
    main()
