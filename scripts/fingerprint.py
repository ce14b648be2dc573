"""Behaviour fingerprint: sha256 of the weights that fixed-seed supervised, GRPO and NFT runs write on the tiny
model (batch 2, gradient accumulation 2, EMA). A change meant to leave behaviour alone (a refactor, a move, a
formatter) must print the same JSON before and after:

    .venv/bin/python scripts/fingerprint.py > before.json   # on the old commit
    .venv/bin/python scripts/fingerprint.py | diff before.json -

Offline and CPU only (about a minute on two cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = {
    "supervised": {},
    "grpo": {"use_rl": True, "rl_method": "grpo", "rl_warmup_steps": 1, "rl_num_images_per_prompt": 2,
             "rl_num_inference_steps": 4, "rl_num_batches_per_epoch": 2, "rl_kl_beta": 0.1,
             "reward_weights": "contrast=1"},
    "nft": {"use_rl": True, "rl_method": "nft", "rl_warmup_steps": 1, "rl_num_images_per_prompt": 2,
            "rl_num_inference_steps": 4, "rl_num_batches_per_epoch": 2, "nft_decay_type": 1,
            "reward_weights": "contrast=1"},
}


def tensor_digest(path: Path) -> str:
    from train.models.checkpoint_io import read_adapter_file

    h = hashlib.sha256()
    for part, sd in sorted(read_adapter_file(path).items()):
        for key, t in sorted(sd.items()):
            h.update(f"{part}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    from train.data.synthesize import synthesize
    from train.models.tiny import write_tiny_models
    from train.train import main as train_main

    root = Path(tempfile.mkdtemp(prefix="fingerprint-"))
    models = write_tiny_models(root / "models", seed=0)
    data = synthesize(root / "data", num=8, resolution=64, seed=0)
    out = {}
    for name, flags in RUNS.items():
        run = root / name
        argv = {"pretrained_model_name_or_path": models["flux"], "siglip_path": models["siglip"],
                "train_data_json": data, "output_dir": run, "resolution": 64, "num_tokens": 8,
                "max_sequence_length": 32, "reference_strip_height": 16, "report_to": "none",
                "learning_rate": 1e-3, "max_train_steps": 3, "train_batch_size": 2,
                "gradient_accumulation_steps": 2, "use_ema": True, "ema_decay": 0.9, "seed": 7, **flags}
        args = []
        for k, v in argv.items():
            args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            code = train_main(args)
        if code != 0:
            raise SystemExit(f"the {name} run failed")
        ckpt = run / "checkpoint-3"
        out[name] = {f: tensor_digest(ckpt / f) for f in ("ip-adapter.bin", "ip-adapter-ema.bin")}
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
