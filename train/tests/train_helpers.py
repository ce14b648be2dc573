"""Helpers for tests that drive the training CLI on tiny components."""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import to_argv
from train.models.checkpoint_io import read_adapter_file


def tiny_train_args(tiny_models, data: Path, out: Path, steps: int, **flags) -> list[str]:
    """argv for ``python -m train.train`` on the tiny model: 64 px, 8 style tokens, 32 text tokens."""
    base = {
        "pretrained_model_name_or_path": tiny_models["flux"], "siglip_path": tiny_models["siglip"],
        "train_data_json": data, "output_dir": out, "resolution": 64, "max_train_steps": steps,
        "num_tokens": 8, "max_sequence_length": 32, "reference_strip_height": 16, "report_to": "none",
        "learning_rate": 1e-3,
    }
    return to_argv({**base, **flags})


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    state = read_adapter_file(path)
    return {f"{part}.{k}": v for part, sd in state.items() for k, v in sd.items()}


def assert_weights_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max().item())
