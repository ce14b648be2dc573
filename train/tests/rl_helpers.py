"""Helpers for tests that drive the RL trainers on tiny components."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from train.rewards.base import ItemScore, Scorer
from train.rewards.contrast import ContrastScorer
from train.tests.train_helpers import tiny_train_args

EVAL_WEIGHTS = "contrast=0.5"  # held-out score = contrast / 2, whatever the training reward is


class InvertedContrast(Scorer):
    """``1 - contrast``: the negated reward, still in [0, 1], from the real contrast scorer."""

    name, requires = "contrast", ("mask",)

    def __init__(self):
        self.inner = ContrastScorer()

    def _score_batch(self, items):
        return [ItemScore.ok(1.0 - s.score) if s.error is None else s for s in self.inner.score_batch(items)]


@pytest.fixture()
def negated_reward(monkeypatch):
    """Train on ``1 - contrast`` (in-process); a held-out evaluation with other weights keeps the real contrast."""
    from train.rl_ip import reward as reward_mod
    from train.rl_logic import rollout

    real = rollout.build_reward_fn

    def build(urls, weights, **kw):
        if weights == {"contrast": 1.0}:
            return reward_mod.LocalReward({"contrast": InvertedContrast()}, weights)
        return real(urls, weights, **kw)

    monkeypatch.setattr(rollout, "build_reward_fn", build)


def rl_args(tiny_models, data, out: Path, steps: int, method: str = "grpo", **flags) -> list[str]:
    """A short RL run: 4 rollout images per batch in groups of 2, 4 sampler steps, the contrast reward."""
    base = dict(use_rl=True, rl_method=method, rl_warmup_steps=0, reward_weights="contrast=1",
                rl_num_images_per_prompt=2, train_batch_size=4, rl_num_inference_steps=4, checkpointing_steps=1,
                rl_copy_dtype="fp32")
    base.update(flags)
    return tiny_train_args(tiny_models, data, out, steps, **base)


def eval_curve(out: Path) -> list[float]:
    """Held-out mean rewards in the order they were logged."""
    lines = (Path(out) / "eval_rewards.jsonl").read_text().splitlines()
    return [json.loads(line)["eval/reward_mean"] for line in lines]


def rl_state(checkpoint: Path) -> dict:
    """The RL run state (epoch, reference and old copies) stored in a checkpoint by accelerate."""
    path = Path(checkpoint) / "custom_checkpoint_1.pkl"
    try:
        return torch.load(path, weights_only=False)
    except pickle.UnpicklingError:
        with open(path, "rb") as f:
            return pickle.load(f)


def metric(history, name: str) -> list[float]:
    return [m[name] for _, m in history if name in m]
