"""GRPO review 20: the think length a step logs (train/think_length) and its completions per second
(train/samples_per_s), each against a hand computation on fixed rollouts."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from test_grpo import _metrics
from train_fixtures import ANSWERS, compose_train, write_dataset, write_processor

from musicflamingo import grpo
from musicflamingo.grpo import GRPOLit
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.training import train

# per record's answer: (completion text, ended by the stop id, the thinking it holds)
THINK_ROLLOUTS = {
    ANSWERS[0]: [
        ("<think>low and steady</think><answer>a low hum</answer>", True, "low and steady"),
        ("<think></think><answer>a bright tone</answer>", True, ""),  # an empty think block
        ("a low hum", False, ""),  # no tags at all
    ],
    ANSWERS[1]: [
        ("<think>bright</think><answer>a bright tone</answer>", True, "bright"),
        ("<think>unclosed and long", False, "unclosed and long"),  # cut at the token limit mid-thought
        ("<think>x</think><answer>a low hum</answer>", True, "x"),
    ],
}


def _fixed_rollouts(monkeypatch, tok) -> None:  # noqa: ANN001
    def fixed(self, prompts, features, mask, group_size, params, generator):  # noqa: ANN001, ANN202
        eos = self._stop_ids()[0]
        return [
            [tok.encode(t) + ([eos] if stop else []) for t, stop, _ in THINK_ROLLOUTS[p.target.answer]]
            for p in prompts
        ]

    monkeypatch.setattr(GRPOLit, "generate", fixed)


def _clock(monkeypatch, tick: float) -> None:  # noqa: ANN001
    """grpo's `time.perf_counter` advances `tick` seconds a call: a training step (two calls) lasts `tick`."""
    now = iter(range(1000))
    clock = SimpleNamespace(perf_counter=lambda: tick * next(now), monotonic=time.monotonic)
    monkeypatch.setattr(grpo, "time", clock)


OVERRIDES = [
    "experiment=grpo",
    "model.rollout.group_size=3",
    "model.rollout.max_new_tokens=64",
    "trainer.max_steps=1",
    "trainer.log_every_n_steps=1",
    "export=false",
]


def _one_step(tmp_path, monkeypatch, overrides: list[str]) -> tuple[dict[str, str], object]:  # noqa: ANN001
    """The metrics row of one GRPO step on THINK_ROLLOUTS (a step lasting 2 s), and the tokenizer."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    tok = MusicFlamingoProcessor.from_pretrained(proc).tokenizer
    _fixed_rollouts(monkeypatch, tok)
    _clock(monkeypatch, 2.0)
    train(compose_train(tmp_path, manifest, proc, overrides))
    return next(r for r in _metrics(tmp_path / "run") if "train/reward" in r), tok


def test_a_think_run_logs_the_mean_think_length(tmp_path, monkeypatch):
    """Two prompts of three fixed completions in think mode: train/think_length is the mean over the six of their
    thinking's tokens (an empty block, no tags at all: 0; a thought cut at the token limit: what was thought)."""
    row, tok = _one_step(tmp_path, monkeypatch, OVERRIDES)
    thoughts = [thinking for group in THINK_ROLLOUTS.values() for _, _, thinking in group]
    expected = sum(len(tok.encode(t)) for t in thoughts if t) / 6
    assert expected > 0
    assert float(row["train/think_length"]) == pytest.approx(expected)
    lengths = [len(tok.encode(t)) + stop for g in THINK_ROLLOUTS.values() for t, stop, _ in g]
    assert float(row["train/completion_length"]) == pytest.approx(sum(lengths) / 6)
    assert float(row["train/truncated"]) == pytest.approx(2 / 6)


def test_samples_per_s_counts_completions_not_rewards(tmp_path, monkeypatch):
    """train/samples_per_s is the 6 completions over the step's 2 s. It was the sum of the rewards over the seconds
    (an index into the summed metrics went stale when train/reward_std joined them): 0 on a run whose rewards
    were all 0, as a GRPO run starting from a model that never writes the think tags has."""
    row, _ = _one_step(tmp_path, monkeypatch, OVERRIDES)
    assert float(row["train/reward"]) * 6 != pytest.approx(6.0)  # the rewards' sum is not the count
    assert float(row["train/samples_per_s"]) == pytest.approx(6 / 2.0)


def test_an_answer_only_run_logs_no_think_length(tmp_path, monkeypatch):
    """model.think=false: no completion is parsed for a think block, so there is no think length to log (a 0 would
    read as a model that stopped thinking)."""
    row, _ = _one_step(tmp_path, monkeypatch, [*OVERRIDES, "model.think=false", "model.rewards.format=null"])
    assert "train/completion_length" in row and "train/think_length" not in row


class Constant:
    """A reward that is 0 on every completion (as the format reward of a model that never writes the tags)."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return 0.0


def test_a_run_whose_groups_all_tie_is_warned_once_that_nothing_trains(tmp_path, monkeypatch, caplog):
    """Six batches whose every group ties: no step has a gradient, and the progress lines said only 'loss 0.0000 |
    reward 0.000'. After the fifth such batch in a row one warning says so, with the rewards' means; not again."""
    overrides = [
        *OVERRIDES,
        "trainer.max_steps=6",
        "model.rewards.format=null",
        "model.rewards.accuracy=null",
        "+model.rewards.const={_target_:test_grpo_review20.Constant,weight:1.0}",
    ]
    with caplog.at_level(logging.WARNING, logger="musicflamingo.grpo"):
        _one_step(tmp_path, monkeypatch, overrides)
    rows = [r for r in _metrics(tmp_path / "run") if "train/reward" in r]
    assert len(rows) == 6 and all(float(r["train/zero_variance_groups"]) == 1.0 for r in rows)
    said = [r.getMessage() for r in caplog.records if "every group tied" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(
        "the last 5 batches had every group tied (each prompt's 3 completions rewarded alike): no gradient, the "
        "weights have not moved (mean rewards: const 0.000)"
    )
