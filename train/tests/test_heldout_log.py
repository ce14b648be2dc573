"""What the RL phase writes about its rewards stays true: a generated image with NaN/Inf pixels fails its reward
(never scored as the black image it turns into); ``eval_rewards.jsonl`` is valid JSON with one row per
evaluation, however often the run was interrupted and resumed; a held-out evaluation whose rewards fail beyond
``--reward_failure_budget`` stops the run cleanly instead of logging a made-up figure."""

from __future__ import annotations

import json

import pytest

from train.config import parse_args
from train.data.dataset import CalligraphyDataset, load_records
from train.data.preprocess import collate_samples
from train.data.synthesize import synthesize
from train.rewards.base import ItemScore, Scorer
from train.rewards.contrast import ContrastScorer
from train.rl_ip.reward import LocalReward
from train.rl_logic import rollout
from train.tests.rl_helpers import EVAL_WEIGHTS, eval_curve, rl_args
from train.train import main
from train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("heldout-log-data"), num=8, resolution=64, seed=3)


class CountingContrast(ContrastScorer):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def _score_batch(self, items):
        self.seen.extend(item.id for item in items)
        return super()._score_batch(items)


def test_a_rollout_image_with_non_finite_pixels_fails_its_reward_and_is_never_scored(data):
    ds = CalligraphyDataset(load_records(data, resolution=64), resolution=64, strip_height=16)
    batch = collate_samples([ds[i] for i in range(3)])
    pixels = batch.image.clone()
    pixels[1, 0, 20, 5] = float("nan")
    pixels[2, 2, 70, 9] = float("inf")
    scorer = CountingContrast()
    pending = rollout.submit_rewards(LocalReward({"contrast": scorer}, {"contrast": 1.0}), batch, pixels, "e0b0",
                                     [0, 1, 2])
    results = pending.result()
    assert [r.ok for r in results] == [True, False, False]
    assert all(r.reward is None and r.error == rollout.NONFINITE for r in results[1:])
    assert scorer.seen == ["e0b0-0"] and [r.id for r in results] == [i.id for i in pending.items]
    pending = rollout.submit_rewards(LocalReward({"contrast": scorer}, {"contrast": 1.0}),
                                     collate_samples([ds[1], ds[2]]), pixels[1:], "e0b1", [1, 2])
    assert [r.ok for r in pending.result()] == [False, False] and scorer.seen == ["e0b0-0"]  # nothing sent


def _args(tiny_models, data, out, steps, **flags):
    return rl_args(tiny_models, data, out, steps, rl_eval_data=data, rl_eval_every=1, rl_eval_reward_weights=EVAL_WEIGHTS,
                   checkpointing_steps=2, **flags)


def test_a_resumed_run_writes_each_evaluation_once(tiny_models, data, tmp_path):
    """Interrupted after step 3 (evaluated, not yet checkpointed): the resume evaluates step 3 again; the file
    then holds the uninterrupted run's rows, in order, each once."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_args(tiny_models, data, straight, 4)) == 0
    trainer = Trainer(parse_args(_args(tiny_models, data, resumed, 4)))
    trainer.setup()
    trainer.run(stop_at=3)
    rows = [json.loads(line) for line in (resumed / "eval_rewards.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [0, 1, 2, 3]  # step 3 is newer than checkpoint-2
    assert main(_args(tiny_models, data, resumed, 4, resume_from_checkpoint="latest")) == 0
    rows = [json.loads(line) for line in (resumed / "eval_rewards.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [0, 1, 2, 3, 4]
    assert eval_curve(resumed) == eval_curve(straight)


class FailingFor(Scorer):
    """Contrast, except for the held-out items whose index is in ``bad`` (a reward service that fails them)."""

    name, requires = "contrast", ("mask",)

    def __init__(self, bad):
        self.inner, self.bad = ContrastScorer(), set(bad)

    def _score_batch(self, items):
        scores = self.inner.score_batch(items)
        return [ItemScore.fail("connection refused") if int(it.id.rsplit("-", 1)[1]) in self.bad else s
                for it, s in zip(items, scores)]


@pytest.fixture()
def failing_eval(monkeypatch):
    """The held-out reward function (its weights differ from training's) fails for the indices in ``bad``."""
    bad: set[int] = set()
    real = rollout.build_reward_fn

    def build(urls, weights, **kw):
        if weights == {"contrast": 0.5}:
            return LocalReward({"contrast": FailingFor(bad)}, weights)
        return real(urls, weights, **kw)

    monkeypatch.setattr(rollout, "build_reward_fn", build)
    return bad


def test_held_out_rewards_failing_beyond_the_budget_stop_the_run_and_write_no_row(tiny_models, data, tmp_path,
                                                                                     failing_eval, capsys):
    failing_eval.update(range(8))
    out = tmp_path / "run"
    assert main(_args(tiny_models, data, out, 2)) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "8/8 held-out rewards (eval/) failed at global_step 0" in errors[0], errors
    assert "connection refused" in errors[0]
    assert not (out / "eval_rewards.jsonl").exists() or not (out / "eval_rewards.jsonl").read_text()


def test_held_out_rewards_failing_within_the_budget_are_left_out_of_a_valid_row(tiny_models, data, tmp_path,
                                                                                   failing_eval):
    failing_eval.update({1, 6})
    out = tmp_path / "run"
    assert main(_args(tiny_models, data, out, 1, reward_failure_budget=0.25)) == 0
    text = (out / "eval_rewards.jsonl").read_text()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in eval_rewards.jsonl")) for line in
            text.splitlines()]
    assert len(rows) == 2 and all(r["eval/failed"] == 2.0 for r in rows)
    assert all(isinstance(r["eval/reward_mean"], float) and r["eval/reward_mean"] == r["eval/reward_mean"]
               for r in rows)

