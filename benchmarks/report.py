"""The results table of ``benchmarks/README.md``, rebuilt from ``benchmarks/results/*.json``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _tf(gflop: float) -> str:
    return f"{gflop / 1000:.2f} TFLOP" if gflop >= 100 else f"{gflop:.3g} GFLOP"


def _ok(value: float, target: float, below: bool = True) -> str:
    return "✅" if (value <= target if below else value >= target) else "❌"


def flops_rows(r: dict) -> list[tuple[str, str, str]]:
    rows = []
    if "full_512_strip_0" in r:
        base = r["full_512_strip_0"]["parts_gflop"]
        rows.append(("Base transformer forward, 512², 512 text tokens, no strip", _tf(base["base_forward"]),
                     "≈ 21.5 TFLOP (docs/ARCHITECTURE.md §13)"))
        for strip in (0, 128, 512):
            rep = r[f"full_512_strip_{strip}"]
            p = rep["parts_gflop"]
            label = f"512² + {strip} px strip" if strip else "512², no strip"
            rows.append((f"Transformer + adapter forward / backward, {label}",
                         f"{_tf(p['forward'])} / {_tf(p['backward'])} (adapter {_pct(rep['adapter_share_of_forward'])} "
                         "of the forward)", ""))
        rep = r["full_512_strip_128"]
        p = rep["parts_gflop"]
        rows.append(("VAE encode / decode, SigLIP, T5 + CLIP (512² + 128 px strip)",
                     f"{_tf(p['vae_encode'])} / {_tf(p['vae_decode'])}, {_tf(p['siglip'])}, {_tf(p['text_encoders'])}",
                     "SigLIP and T5 once per sample / text (cached)"))
        for step, item in rep["steps"].items():
            share = ", ".join(f"{k} {_pct(v)}" for k, v in item["share"].items())
            rows.append((f"{step[0].upper() + step[1:]}, full size, 512² + 128 px strip", _tf(item["gflop"]), share))
    shares = r["transformer_share"]
    for key, label in (("supervised_step", "supervised step"), ("rollout_50_steps", "rollout (50 steps)")):
        if "full_512_strip_128" in shares:
            rows.append((f"Transformer share of a {label}'s FLOPs: full size vs CPU proxy",
                         f"{_pct(shares['full_512_strip_128'][key])} vs {_pct(shares['proxy'][key])}", "close"))
        else:
            rows.append((f"Transformer share of a {label}'s FLOPs: CPU proxy", _pct(shares["proxy"][key]), ""))
    return rows


def train_rows(r: dict) -> list[tuple[str, str, str]]:
    if "skipped" in r:
        return [("Full-size step times and MFU", r["skipped"], "GPU")]
    sup, rows = r["supervised"], []
    accumulation = sup.get("gradient_accumulation_steps", 1)
    rows.append((f"Supervised step ÷ forward + backward (proxy), accumulation {accumulation}, VAE latents cached",
                 f"{sup['overhead']:.2f} {_ok(sup['overhead'], 1.25)} (optimizer step {_pct(sup['optimizer_step_share'])}"
                 " of it)", "≤ 1.25"))
    for key, label in (("supervised_latent_cache_off", "with `--latent_cache off`"),
                       ("supervised_accumulation_1", "at accumulation 1")):
        other = r.get(key)
        if other:
            rows.append((f"  the same {label}: step ÷ (fwd+bwd); of the step VAE encodes / optimizer step",
                         f"{other['overhead']:.2f}; {_pct(other['vae_encodes_share_of_step'])} / "
                         f"{_pct(other['optimizer_step_share'])}", ""))
    for method in ("grpo", "nft"):
        t, ro = r[method]["train"], r[method]["rollout"]
        rows.append((f"{method.upper()} trained step ÷ ({t['pure_model']}) (proxy)",
                     f"{t['overhead']:.2f} {_ok(t['overhead'], 1.25)}", "≤ 1.25"))
        rows.append((f"{method.upper()} rollout ÷ ({ro['steps']} steps × batched forward) (proxy)",
                     f"{ro['overhead']:.2f} {_ok(ro['overhead'], 1.15)} (sampling loop alone "
                     f"{ro['sampling_loop_overhead']:.2f})", "≤ 1.15"))
    rows.append(("Text-encoder calls during training after the prompt cache filled",
                 f"{sup['text_encoder_calls_during_training']} in {sup['epochs_trained']} epochs "
                 f"{_ok(sup['text_encoder_calls_during_training'], 0)}", "0"))
    for name in ("supervised", "grpo", "nft"):
        run = sup if name == "supervised" else r[name]
        rows.append(_bytes_row(name, "measured (proxy)", run["bytes_per_trainable_param"]))
    return rows


def _bytes_row(method: str, source: str, b: dict) -> tuple[str, str, str]:
    """Bytes per trainable parameter of one run kind (``b``: without EMA, EMA on the device / on the CPU)."""
    return (f"Bytes per trainable param beyond the base, {method}, {source}",
            f"{b['no_ema']:g} without EMA; {b['ema_on_device']:g} EMA on device; "
            f"{b['ema_on_cpu']:g} + {b['ema_on_cpu_host']:g} host with EMA on CPU",
            "≤ 24 for NFT + EMA" if method == "nft" else "")


def memory_rows(r: dict) -> list[tuple[str, str, str]]:
    rows, size = [], "full size" if r["model"].startswith("FLUX.1-Fill-dev") else "CPU proxy"
    for name, c in r["configurations"].items():
        verdict = "fits 80 GB" if c["fits_80gb"] else "does not fit 80 GB" + (
            f"; fits with {c['fits_with'][0]}" if c["fits_with"] else "")
        rows.append((f"Peak GPU memory per process ({size}): {name}", f"{c['peak_gib']:.2f} GiB, {verdict} "
                     f"({c['peak_phase']}; host {c['host_gib']:.1f} GiB)", f"≤ {c['usable_gib']:.2f} GiB usable"))
    for method, b in r["bytes_per_trainable_param"].items():
        rows.append(_bytes_row(method, f"planner ({size})", b))
    return rows


def reward_rows(r: list) -> list[tuple[str, str, str]]:
    rows = []
    for row in r:
        s = row["scorer"]
        target = "≥ 5×" if s in ("style", "background") else ""
        rows.append((f"Reward `{s}`: images/s batched vs one per request (median of {row['repeats']})",
                     f"{row['batched_images_per_s']:g} vs {row['single_images_per_s']:g}: {row['speedup']:g}×"
                     + (f" {_ok(row['speedup'], 5, below=False)}" if target else ""), target))
        if "time_split" in row:
            t = row["time_split"]
            rows.append(("  OCR time split: recognition (batched) vs detection pass",
                         f"{t['recognition_ms_per_image_batched']:g} ms/image for every crop; "
                         f"{t['detection_pass_ms_per_image']:g} ms/image for the {_pct(t['unsure_fraction'])} "
                         f"unsure crops = {_pct(t['detection_share_of_time'])} of the time", ""))
    return rows


BUILDERS = {"flops": flops_rows, "memory": memory_rows, "train_step": train_rows, "reward_throughput": reward_rows}


def _short_machine(machine: str) -> str:
    return machine.split(", torch")[0].split(" (")[0]


def render_table(payloads: list[dict]) -> str:
    lines = ["| Figure | Value | Target | Machine | Date | Commit |", "|---|---|---|---|---|---|"]
    for p in sorted(payloads, key=lambda p: list(BUILDERS).index(p["benchmark"])):
        stamp = f"{_short_machine(p['machine'])}{' (quick)' if p.get('quick') else ''} | {p['date']} | {p['commit']}"
        for figure, value, target in BUILDERS[p["benchmark"]](p["results"]):
            lines.append(f"| {figure} | {value} | {target} | {stamp} |")
    machines = sorted({p["machine"] for p in payloads})
    lines += ["", "Machines: " + "; ".join(machines) + "."]
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    """Replace the text between the results markers (appended at the end when absent), atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
