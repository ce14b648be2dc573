"""Reward service throughput: images/s batched vs one image per request, same scorer (docs/ARCHITECTURE.md §13).

Starts the real reward server (``python -m train.reward_server``) on a loopback port and
scores the same rendered images twice through ``RemoteReward``: in chunks sent on several
threads, and one image per request, sequentially; the two modes alternate and each reports the
median of ``--repeats`` (5) runs. For OCR it also times, in this process, where the scorer's
time goes: the batched fast recognition of every crop, and the detection pass that the crops it
is unsure of get. Prints one JSON line per scorer:

    python benchmarks/reward_throughput.py --scorers style,background,ocr --images 128

Without ``--siglip_path`` the style scorer uses a tiny random SigLIP written to a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from train.rewards.base import RewardItem  # noqa: E402
from train.rl_ip.reward import RemoteReward  # noqa: E402

WORDS = ["Calligraphy", "Reward", "Style", "书法之美", "Flux", "春眠不觉晓", "Adapter", "Hello"]


def scene(i: int, size: int) -> RewardItem:
    font_path = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
    if not os.path.exists(font_path):
        font_path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    text = WORDS[i % len(WORDS)]
    source = Image.new("RGB", (size, size), (200 + i % 50, 190, 170))
    image = source.copy()
    box = (size // 8, size * 3 // 8, size * 7 // 8, size * 5 // 8)
    font = ImageFont.truetype(font_path, max(8, size // 10))
    ImageDraw.Draw(image).text((box[0] + 4, box[1] + 4), text, font=font, fill=(20, 20, 90 + i % 100))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return RewardItem(f"img{i}", image, text, mask=mask, reference=image.crop(box), source=source)


def start_server(scorer: str, siglip_path: str | None, device: str, torch_threads: int):
    """The real server on a free port; returns once its start event says it accepts connections."""
    cmd = [sys.executable, "-m", "train.reward_server", "--port", "0", "--scorers", scorer,
           "--device", device, "--max_items", "1024", "--torch_threads", str(torch_threads)]
    if siglip_path:
        cmd += ["--siglip_path", siglip_path]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"reward server for {scorer} exited with status {proc.wait()}")
    return proc, f"http://127.0.0.1:{json.loads(line)['port']}"


def measure(scorer: str, items: list[RewardItem], url: str, chunk_size: int, workers: int, repeats: int) -> dict:
    weights = {scorer: 1.0}
    batched = RemoteReward(url, weights, chunk_size=chunk_size, max_workers=workers, health_wait=120)
    single = RemoteReward(url, weights, chunk_size=1, max_workers=1, health_wait=120)
    batched.wait_healthy()
    batched(items[:chunk_size])  # warm-up: model load, first-call allocations
    single(items[:2])

    # Median of `repeats` per mode, interleaved, so load from other processes hits both alike.
    times_b, times_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res_b = batched(items)
        times_b.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res_s = [r for it in items for r in single([it])]
        times_s.append(time.perf_counter() - t0)
    t_b, t_s = statistics.median(times_b), statistics.median(times_s)
    failed = sum(r.error is not None for r in res_b + res_s)
    if failed:
        raise SystemExit(f"{failed} items failed to score; first: {next(r.error for r in res_b + res_s if r.error)}")
    diff = max(abs(a.reward - b.reward) for a, b in zip(res_b, res_s))
    batched.close()
    single.close()
    n = len(items)
    row = {"scorer": scorer, "images": n, "batched_images_per_s": round(n / t_b, 2),
           "single_images_per_s": round(n / t_s, 2), "speedup": round(t_s / t_b, 2),
           "chunk_size": chunk_size, "workers": workers, "repeats": repeats, "statistic": "median",
           "max_reward_difference": round(diff, 6)}
    if scorer == "ocr":
        engines = [r.details.get("ocr", {}).get("engine") for r in res_b]
        row["detection_fraction"] = round(sum(e == "det+rec" for e in engines) / n, 3)
    return row


def ocr_breakdown(items: list[RewardItem], repeats: int) -> dict:
    """Where the OCR scorer's time goes, timed in this process on the same items: batched fast recognition
    of every crop, and the detection pass (detect, then recognise each found line) per crop."""
    from train.rewards.ocr import OCRScorer

    scorer = OCRScorer()
    crops = [scorer._crop(it) for it in items]
    scorer._recognise(crops[:2])
    scorer._detect_and_recognise(crops[0])
    rec = statistics.median(_timed(lambda: scorer._recognise(crops)) for _ in range(repeats))
    sample = crops[: max(4, len(crops) // 4)]
    det = statistics.median(_timed(lambda: [scorer._detect_and_recognise(c) for c in sample]) for _ in range(repeats))
    unsure = sum(conf < scorer.confident for _, conf in scorer._recognise(crops))  # these get the detection pass
    detection = unsure * det / len(sample)
    return {"recognition_ms_per_image_batched": round(1000 * rec / len(crops), 2),
            "detection_pass_ms_per_image": round(1000 * det / len(sample), 2),
            "unsure_fraction": round(unsure / len(crops), 3),
            "detection_share_of_time": round(detection / (detection + rec), 3)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(scorers="style,background,ocr", images: int = 64, size: int = 256, chunk_size: int = 16, workers: int = 4,
        repeats: int = 5, siglip_path: str | None = None, device: str = "cpu", torch_threads: int = 1) -> list[dict]:
    """One row per scorer (see the module docstring)."""
    items = [scene(i, size) for i in range(images)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        siglip = siglip_path
        for scorer in [s.strip() for s in scorers.split(",") if s.strip()]:
            if scorer == "style" and siglip is None:
                from train.models.tiny import write_tiny_siglip

                siglip = str(write_tiny_siglip(Path(tmp) / "siglip"))
            proc, url = start_server(scorer, siglip if scorer == "style" else None, device, torch_threads)
            try:
                row = measure(scorer, items, url, chunk_size, workers, repeats)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            if scorer == "ocr":
                row["time_split"] = ocr_breakdown(items, repeats)
            row.update(image_size=size, torch_threads=torch_threads)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers", default="style,background,ocr",
                        help="comma-separated; each is measured on its own server")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--chunk_size", type=int, default=16,
                        help="images per request in batched mode (default: the trainer's reward client)")
    parser.add_argument("--workers", type=int, default=4,
                        help="concurrent requests in batched mode (default: the trainer's reward client)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode; the median is reported")
    parser.add_argument("--siglip_path", default=None, help="SigLIP folder (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="server torch threads; 1 leaves a core to the client on small machines")
    args = parser.parse_args(argv)
    for row in run(args.scorers, args.images, args.size, args.chunk_size, args.workers, args.repeats,
                   args.siglip_path, args.device, args.torch_threads):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
