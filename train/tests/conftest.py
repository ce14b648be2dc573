"""Shared fixtures: tiny real FLUX.1-Fill / SigLIP folders, written once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``{"flux": Path, "siglip": Path}``: diffusers-layout folders with tiny random weights."""
    from train.models.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture()
def calligrapher(tiny_models):
    """A freshly loaded tiny Calligrapher (8 style tokens), loaded like real weights."""
    from train.models.calligrapher import Calligrapher

    torch.manual_seed(0)
    return Calligrapher.from_pretrained(tiny_models["flux"], tiny_models["siglip"], num_tokens=8)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test's run starts from a clean state."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
