"""Repetition penalty, review 19: `generate(repetition_penalty=...)` (and generation_config.json's) against the
reference's `generate`, greedy and sampled, on a left-padded batch; a chat slot's penalty counts its earlier turns
as a from-scratch prompt would, minus the tokens a stop string's rewind dropped. The engine refused the setting."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from reference_model import make_reference_model
from tiny_assets import TINY_IDS

from musicflamingo import MusicFlamingo
from musicflamingo.engine import Engine, Request, SamplingParams

transformers = pytest.importorskip("transformers")

PAD = TINY_IDS.pad_token_id


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference, ours) over one tiny random checkpoint whose generation_config.json has no penalty."""
    d = tmp_path_factory.mktemp("ref") / "base"
    make_reference_model(seed=1).save_pretrained(d)
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(d).eval()
    return d, ref, MusicFlamingo.from_pretrained(d, dtype=torch.float32)


def _batch(lengths=(17, 3)) -> dict:
    """Left-padded rows of random ids (each row repeats some of its ids: the penalty has prompt tokens to see)."""
    g = torch.Generator().manual_seed(3)
    S = max(lengths)
    ids, mask = torch.full((len(lengths), S), PAD), torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n :], mask[b, S - n :] = torch.randint(0, 40, (n,), generator=g), 1
    return {"input_ids": ids, "attention_mask": mask}


def _ref(ref, inputs, **kw):
    with torch.no_grad():
        return ref.generate(**inputs, **kw)


@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_greedy_repetition_penalty_matches_the_reference_on_a_left_padded_batch(pair, penalty):
    """A penalty above 1 (discourage) and below 1 (encourage), rows of 17 and 3 tokens: the reference's tokens. The
    short row's padding holds the tokens it generates: the reference does not count them (seen from a row's first
    real position on), so penalizing them would change its answer."""
    _, ref, ours = pair
    inputs = _batch()
    kw = dict(max_new_tokens=12, eos_token_id=None)
    S = inputs["input_ids"].shape[1]
    answer = _ref(ref, inputs, do_sample=False, repetition_penalty=penalty, **kw)[1, S:]
    inputs["input_ids"][1, S - 3 - len(answer) : S - 3] = answer  # (14 pads, 12 tokens)
    want = _ref(ref, inputs, do_sample=False, repetition_penalty=penalty, **kw)
    assert torch.equal(want[1, S:], answer)  # (padding is padding)
    assert not torch.equal(want, _ref(ref, inputs, do_sample=False, **kw))  # the penalty changes these tokens
    assert torch.equal(ours.generate(**inputs, repetition_penalty=penalty, **kw), want)


def test_sampled_repetition_penalty_comes_before_top_k(pair):
    """Sampling with top_k=1 draws the argmax of the penalized logits: the reference's greedy tokens with the same
    penalty (the penalty applied after the sampling filters, or not at all when sampling, would differ)."""
    _, ref, ours = pair
    inputs = _batch()
    kw = dict(max_new_tokens=12, eos_token_id=None, repetition_penalty=1.3)
    want = _ref(ref, inputs, do_sample=False, **kw)
    assert torch.equal(ours.generate(**inputs, do_sample=True, top_k=1, temperature=0.7, seed=0, **kw), want)


def test_generation_config_repetition_penalty_applies_as_in_the_reference(pair, tmp_path):
    """A generation_config.json setting repetition_penalty: the reference's generate() applies it by default (ours
    warned and ignored it); an explicit repetition_penalty=1.0 still turns it off."""
    d, _, _ = pair
    variant = tmp_path / "variant"
    shutil.copytree(d, variant)
    gen = json.loads((variant / "generation_config.json").read_text())
    (variant / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 1.3}))
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(variant).eval()
    ours = MusicFlamingo.from_pretrained(variant, dtype=torch.float32)
    inputs = _batch()
    want = _ref(ref, inputs, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=12, eos_token_id=None), want)
    off = _ref(ref, inputs, max_new_tokens=12, eos_token_id=None, repetition_penalty=1.0)
    assert not torch.equal(off, want)
    assert torch.equal(
        ours.generate(**inputs, max_new_tokens=12, eos_token_id=None, repetition_penalty=1.0), off
    )


def _run(engine: Engine, slot) -> list[int]:
    while engine.decoding:
        engine.step()
    return slot.tokens


@pytest.mark.parametrize("first_penalty", [1.0, 3.0])
def test_a_chat_turn_sees_the_earlier_turns_as_a_from_scratch_prompt(pair, first_penalty):
    """Turn 2 of a chat slot, with turn 1 cut back to 3 tokens (`rewind`, as after a stop string): the tokens of the
    whole conversation given as one prompt. The penalty sees the first turn's prompt and kept tokens whatever the
    first turn's own settings, and not the dropped ones (with a penalty turn 1's tokens differ: some dropped ones are
    among turn 2's)."""
    _, _, ours = pair
    first = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(5))
    second = torch.tensor([7, 11, 7, 13])
    params = SamplingParams(max_new_tokens=10, repetition_penalty=3.0)
    engine = Engine(ours)
    slot = engine.admit(Request(first, SamplingParams(max_new_tokens=8, repetition_penalty=first_penalty)))
    answer = list(_run(engine, slot))
    engine.rewind(slot.index, 3)
    engine.extend(slot.index, second, params)
    chat = _run(engine, slot)

    alone = Engine(ours)
    whole = torch.cat([first, torch.tensor(answer[:3]), second])
    assert chat == _run(alone, alone.admit(Request(whole, params)))
    free = Engine(ours)
    assert chat != _run(free, free.admit(Request(whole, replace(params, repetition_penalty=1.0))))


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "1.2", True])
def test_bad_repetition_penalty_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"repetition_penalty must be a number > 0 \(1 = off\), got"):
        SamplingParams(repetition_penalty=value)
