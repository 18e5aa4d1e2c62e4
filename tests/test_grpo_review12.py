"""GRPO and think mode, review round 12 (grpo-think journey)."""

from __future__ import annotations

import pytest
import torch
from test_grpo import AUDIO, _net
from train_fixtures import grpo_module

from musicflamingo.grpo import GRPOConfigError


def test_encoder_layerdrop_is_refused_as_dropout():
    """Encoder layerdrop skips layers at random in training mode (a frozen tower too): the policy's pass read other
    audio features than the rollouts, `old` and the KL reference (eval mode), so the KL at step 0 was not 0 and
    a ratio moved by noise alone. GRPO accepted it silently; it is refused as dropout is, naming the setting."""
    net = _net(lora=False, overrides={"audio": {**AUDIO["audio"], "layerdrop": 0.5}})
    net.train()
    torch.manual_seed(0)
    # the symptom: with audio, the training-mode pass differs from the eval-mode pass of the same weights
    frames = net.config.audio.mel_frames
    feats = torch.randn(1, net.config.audio.num_mel_bins, frames)
    mask = torch.ones(1, frames, dtype=torch.long)
    with torch.no_grad():
        a = net.audio_tower(feats, mask)
        net.eval()
        b = net.audio_tower(feats, mask)
    assert not torch.equal(a, b)
    with pytest.raises(GRPOConfigError, match=r"audio\.layerdrop=0\.5"):
        grpo_module(net)


@pytest.mark.parametrize(
    "question, answer, thinking, error",
    [
        ("<sound>Key?", None, "the bass holds C", r"the last answer's 'content' must be a string, got None"),
        (["<sound>Key?"], "C major", "the bass holds C", r"the last question's 'content' must be a string"),
        ("<sound>Key?", ["C major"], "the bass holds C", r"the last answer's 'content' must be a string"),
        ("<sound>Key?", "C major", None, r"the thinking must be a string, got None"),
    ],
)
def test_think_record_refuses_content_that_is_not_text(question, answer, thinking, error):
    """think_record wrote str() of anything: a None answer became "<answer>None</answer>", list contents their
    Python repr ("['<sound>Key?']"), a None thinking "<think>None</think>"; the manifest loader, which refuses
    such contents, then read the result as ordinary text and SFT/GRPO learnt or scored it."""
    from musicflamingo.reasoning import think_record

    record = {
        "id": "q1",
        "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }
    with pytest.raises(ValueError, match=r"record 'q1': " + error):
        think_record(record, thinking)
    # text contents are still wrapped, and a record already in the layout needs no thinking
    ok = think_record(
        {
            **record,
            "conversations": [
                record["conversations"][0] | {"content": "Key?"},
                {"role": "assistant", "content": "C major"},
            ],
        },
        "C",
    )
    assert ok["conversations"][1]["content"] == "<think>C</think><answer>C major</answer>"
    assert think_record(ok, None) == ok


@pytest.mark.parametrize("value", [True, ["yes", False]])
def test_a_boolean_caption_fact_is_refused(value):
    """{"instrumental": true} made the spelling "True": every caption had to contain the word "true" to state it,
    so the fact scored 0 whatever the caption said. Refused at fit start, naming the record and the fact."""
    from musicflamingo.rewards import record_facts

    with pytest.raises(ValueError, match=r"train\.jsonl:7: facts\.instrumental must be a string or a list"):
        record_facts({"facts": {"instrumental": value, "genre": "jazz"}}, "train.jsonl:7")
    assert len(record_facts({"facts": {"bpm": 120, "genre": ["jazz", "swing"]}}, "train.jsonl:7")) == 2


@pytest.mark.parametrize("labels", ["({}) ", "{}. ", "{}) "])
def test_choices_that_carry_their_letters_are_refused(labels):
    """Choices written with their labels ("(A) 60 BPM") passed the fit-start check when the answer was a letter,
    but eval's option parser reads a completion against each choice's whole text: a right answer given as the
    option's text ("120 BPM", the synthetic corpus' own answer layout) earned 0, a letter 1."""
    from musicflamingo.reasoning import plain_output
    from musicflamingo.rewards import AccuracyReward, Target

    texts = ["60 BPM", "120 BPM", "160 BPM"]
    lettered = [labels.format(L) + t for L, t in zip("ABC", texts)]
    with pytest.raises(ValueError, match=r"train\.jsonl:2: 'choices' carry their option letters"):
        Target.from_record({"task": "mcq", "choices": lettered, "answer": "B"}, "B", "train.jsonl:2")
    # the texts alone: the option's text and its letter both earn the reward
    target = Target.from_record({"task": "mcq", "choices": texts, "answer": "B"}, "B", "train.jsonl:2")
    assert (
        AccuracyReward()(plain_output("120 BPM"), target)
        == AccuracyReward()(plain_output("(B)"), target)
        == 1.0
    )
    # options whose texts merely start with a capital and a dot are no labels
    Target.from_record({"task": "mcq", "choices": ["A. Vivaldi", "J. S. Bach"], "answer": "J. S. Bach"}, "x")
