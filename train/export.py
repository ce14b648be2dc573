"""Write a trained adapter as the official ``calligrapher.bin`` (or our ``ip-adapter.bin`` layout).

    python -m train.export --checkpoint runs/exp/checkpoint-2000 --out calligrapher.bin
    python -m train.export --checkpoint runs/exp/checkpoint-2000 --ema --out calligrapher-ema.bin
    python -m train.export --checkpoint calligrapher.bin --layout ours --out ip-adapter.bin

``--checkpoint`` is a ``checkpoint-N`` folder (``ip-adapter.bin``, or ``ip-adapter-ema.bin``
with ``--ema``) or a weight file in either layout. Weights holding NaN or inf are refused. The
export never writes into a training checkpoint folder (a resume would load the file as the run's
own weights) and replaces an existing ``--out`` only with ``--overwrite``. The written file is
read back and compared tensor by tensor before the command reports success.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from train.models.checkpoint_io import (AdapterFileError, check_finite, read_adapter_file, resolve_adapter_file,
                                       save_adapter_file)



def describe(state: dict) -> dict:
    """Geometry of an adapter state (our layout): tokens, dims, style blocks, parameter count."""
    proj, attn = state["image_proj"], state["ip_adapter"]
    try:
        num_tokens, token_dim = proj["qformer.query_embeds"].shape
        style_dim = proj["mlp.proj.0.weight"].shape[1]
    except KeyError as exc:
        raise AdapterFileError(f"adapter state lacks {exc.args[0]!r}; cannot tell its geometry") from exc
    blocks = sorted({int(k.split(".", 1)[0]) for k in attn if k.endswith("to_k_ip.weight")})
    return {
        "num_tokens": int(num_tokens), "token_dim": int(token_dim), "style_dim": int(style_dim),
        "style_blocks": len(blocks),
        "parameters": sum(v.numel() for part in (proj, attn) for v in part.values()),
    }


def same_weights(a: dict, b: dict) -> bool:
    """Two states (our layout) hold the same keys with equal values, shapes and dtypes."""
    return set(a) == set(b) and all(
        set(a[p]) == set(b[p]) and all(a[p][k].dtype == b[p][k].dtype and torch.equal(a[p][k], b[p][k]) for k in a[p])
        for p in a)


def checkpoint_folder(folder: Path) -> bool:
    """``folder`` is (or is being written as) a training checkpoint: named ``checkpoint-N`` or holding its state."""
    from train.checkpointing import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE

    return bool(re.fullmatch(r"\.?checkpoint-\d+(\.partial|\.old)?", folder.name)) or \
        any((folder / name).exists() for name in (STATE_FILE, MODEL_FILE, OPTIMIZER_FILE))


def out_problem(out: Path, source: Path, overwrite: bool) -> str | None:
    """Why ``out`` must not be written (a folder, a checkpoint's file, an existing file), or None."""
    if out.is_dir():
        return f"--out {out} is a folder; give a file name such as {out / 'calligrapher.bin'}"
    folder = out.absolute().parent.resolve()
    if checkpoint_folder(folder):
        return f"--out {out} lies in the training checkpoint {folder}; write the export outside checkpoint folders"
    if out.exists() and out.resolve() == source.resolve():
        return f"--out {out} would overwrite the checkpoint it reads"
    if out.exists() and not overwrite:
        return f"--out {out} already exists; pass --overwrite to replace it"
    return None


def export(checkpoint: str | Path, out: str | Path, ema: bool = False, layout: str = "official",
           overwrite: bool = False) -> dict:
    """Read ``checkpoint`` (either layout), write ``out`` in ``layout``, verify the round trip.

    An existing ``out`` is replaced only with ``overwrite``; a checkpoint folder is never written.
    """
    from train.cli_flags import split_ema

    source = resolve_adapter_file(*split_ema(str(checkpoint), ema))
    out = Path(out)
    problem = out_problem(out, source, overwrite)
    if problem:
        raise ValueError(problem)
    state = read_adapter_file(source)
    check_finite(state, str(source))
    save_adapter_file(state, out, layout=layout)
    if not same_weights(state, read_adapter_file(out)):
        raise RuntimeError(f"{out} does not read back to the same weights as {source}")
    return {"source": str(source), "out": str(out), "layout": layout, **describe(state)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint-N folder or adapter weight file; append @ema for the folder's ip-adapter-ema.bin")
    parser.add_argument("--ema", action="store_true", help="export ip-adapter-ema.bin of the checkpoint folder")
    parser.add_argument("--out", required=True, help="file to write, e.g. calligrapher.bin")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (never a file in a training checkpoint folder)")
    parser.add_argument("--layout", choices=("official", "ours"), default="official",
                        help="official: {image_proj_mlp, image_proj_qformer, attn_adapter} for the official "
                             "inference code; ours: {image_proj, ip_adapter} like ip-adapter.bin")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, args.ema, args.layout, args.overwrite)
    except (AdapterFileError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
