"""The HTML evaluation report: one self-contained page beside ``metrics.json`` and the images.

Layout: settings, a table of mean scores per checkpoint (with the change from the first
column), then one row per sample: source with the mask outlined | style reference | one
output per checkpoint, each captioned with the recognised text and its scores. Image paths
are relative, so the folder can be copied or served as is. When every image has loaded, a
script puts ``[images N/N]`` into ``document.title`` (headless browser checks read it).
"""

from __future__ import annotations

import html
from pathlib import Path

METRICS = ("ocr", "style", "background")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.settings { color: #555; font-size: 13px; }
table.means { border-collapse: collapse; font-size: 14px; }
table.means th, table.means td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; background: #fff; }
table.means th:first-child, table.means td:first-child { text-align: left; }
.grid { display: grid; gap: 10px; align-items: start; }
.cell { background: #fff; border: 1px solid #e2e2e2; border-radius: 6px; padding: 6px; font-size: 12px; }
.cell img { width: 100%; height: auto; display: block; image-rendering: auto; background: #eee; }
.head { font-weight: 600; font-size: 13px; background: transparent; border: none; }
.target { font-size: 14px; font-weight: 600; word-break: break-all; }
.read { font-family: ui-monospace, monospace; word-break: break-all; }
.scores span { display: inline-block; margin-right: 6px; }
.good { color: #0a7d32; } .mid { color: #9a6a00; } .bad { color: #b3261e; }
.up { color: #0a7d32; } .down { color: #b3261e; }
.error { color: #b3261e; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  document.title = document.title + ' [images ' + ok + '/' + imgs.length + ']';
});
"""


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _grade(value) -> str:
    if value is None:
        return ""
    return "good" if value >= 0.8 else "mid" if value >= 0.5 else "bad"


def _delta(value, base) -> str:
    if value is None or base is None:
        return ""
    d = value - base
    cls = "up" if d > 1e-9 else "down" if d < -1e-9 else ""
    return f' <span class="{cls}">({d:+.3f})</span>'


def _weights_text(weights: dict) -> str:
    return " + ".join(f"{w:.3g}·{name}" for name, w in weights.items()) or "no weights"


def _note(metrics: dict) -> str:
    note = metrics.get("reward_weights_note")
    return f" ({html.escape(note)})" if note else ""


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" loading="eager">'


def _means_table(metrics: dict) -> str:
    cols = ["reward", *METRICS]
    runs = metrics["checkpoints"]
    first = runs[0]["mean"]
    head = "".join(f"<th>{c}</th>" for c in ["checkpoint", *cols, "errors"])
    rows = []
    for i, run in enumerate(runs):
        cells = [f"<td>{html.escape(run['label'])}<br><small>{html.escape(str(run.get('path') or 'base model'))}"
                 f"{' (EMA)' if run.get('ema') else ''}</small></td>"]
        for c in cols:
            v = run["mean"].get(c)
            cells.append(f'<td class="{_grade(v)}">{_fmt(v)}{_delta(v, first.get(c)) if i else ""}</td>')
        cells.append(f"<td>{run.get('errors', 0)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="means"><tr>{head}</tr>{"".join(rows)}</table>'


def _output_cell(label: str, out: dict, base: dict | None) -> str:
    parts = [_img(out["image"], f"{label} output")]
    if out.get("error") and not out.get("scores"):
        parts.append(f'<div class="error">{html.escape(out["error"])}</div>')
    if "recognised" in out:
        parts.append(f'<div>read: <span class="read">“{html.escape(out["recognised"] or "")}”</span></div>')
    spans = []
    for m in ("reward", *METRICS):
        v = out.get("scores", {}).get(m) if m != "reward" else out.get("reward")
        b = None if base is None else (base.get("scores", {}).get(m) if m != "reward" else base.get("reward"))
        spans.append(f'<span class="{_grade(v)}">{m} {_fmt(v)}{_delta(v, b) if base is not None else ""}</span>')
    parts.append(f'<div class="scores">{"".join(spans)}</div>')
    if out.get("error") and out.get("scores"):
        parts.append(f'<div class="error">{html.escape(out["error"])}</div>')
    return f'<div class="cell">{"".join(parts)}</div>'


def render_report(metrics: dict, title: str = "Calligrapher evaluation") -> str:
    """``metrics`` (the ``metrics.json`` dict) -> HTML text."""
    labels = [run["label"] for run in metrics["checkpoints"]]
    ncols = 3 + len(labels)
    s = metrics.get("settings", {})
    settings = ", ".join(f"{k} {html.escape(str(v))}" for k, v in s.items())
    head = ["<div class='cell head'>sample</div>", "<div class='cell head'>source (mask outlined)</div>",
            "<div class='cell head'>reference</div>"]
    head += [f"<div class='cell head'>{html.escape(label)}</div>" for label in labels]
    cells = list(head)
    for sample in metrics["samples"]:
        ident = f'id {html.escape(str(sample["id"]))}, seed {sample.get("seed", "")}'
        cells.append(f'<div class="cell"><small>target</small><div class="target">{html.escape(sample["text"])}</div>'
                     f'<div><small>{ident}</small></div></div>')
        cells.append(f'<div class="cell">{_img(sample["source_image"], "source")}</div>')
        cells.append(f'<div class="cell">{_img(sample["reference_image"], "reference")}</div>')
        base = None
        for i, label in enumerate(labels):
            out = sample["outputs"][label]
            cells.append(_output_cell(label, out, base if i else None))
            base = out if i == 0 else base
    grid_style = f"grid-template-columns: 140px repeat({ncols - 1}, minmax(120px, 1fr));"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="settings">{html.escape(str(metrics.get("dataset", "")))} — {metrics.get("num_samples", 0)} samples;
{settings}</div>
<h2>Mean scores</h2>
{_means_table(metrics)}
<p class="settings">reward = {html.escape(_weights_text(metrics.get("reward_weights", {})))}{_note(metrics)};
changes in brackets are against the first checkpoint column.</p>
<h2>Samples</h2>
<div class="grid" style="{grid_style}">
{chr(10).join(cells)}
</div>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(metrics: dict, path: str | Path, title: str = "Calligrapher evaluation") -> Path:
    """Write the report atomically (temporary file, then rename)."""
    from train.models.checkpoint_io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, render_report(metrics, title))
    return path
