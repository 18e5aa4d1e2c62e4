"""Generation settings, review 8: `generate` against the reference's `generate` with the same settings (explicit
None for eos/pad, the pad of a generation_config.json without one, top_k's default when sampling, the file's sampling
and length fields, fields the engine does not implement), rows cut by the context, and the default stops of a chat."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from reference_model import make_reference_model
from tiny_assets import TINY_IDS
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoConfig, MusicFlamingoProcessor
from musicflamingo.engine import unsupported_generation_fields
from musicflamingo.inference import ChatSession, _decoding

transformers = pytest.importorskip("transformers")

PAD, EOS = TINY_IDS.pad_token_id, TINY_IDS.eos_token_id
PROMPT = torch.tensor([[5, 17, 42, 8, 99, 3]])  # the seed-1 model below says EOS as its 5th greedy token


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "base"
    make_reference_model(seed=1).save_pretrained(d)
    return d


def _pair(folder, tmp_path, generation: dict | None = None):
    """(reference, ours) loaded from a copy of `folder` whose generation_config.json is `generation`."""
    d = folder
    if generation is not None:
        d = tmp_path / "variant"
        shutil.copytree(folder, d)
        (d / "generation_config.json").write_text(json.dumps(generation))
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(d).eval()
    return ref, MusicFlamingo.from_pretrained(d, dtype=torch.float32)


def _batch(lengths=(17, 3)) -> dict:
    g = torch.Generator().manual_seed(3)
    S = max(lengths)
    ids, mask = torch.full((len(lengths), S), PAD), torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n :], mask[b, S - n :] = torch.randint(0, 290, (n,), generator=g), 1
    return {"input_ids": ids, "attention_mask": mask}


def _ref(ref, inputs, **kw):
    with torch.no_grad():
        return ref.generate(**inputs, **kw)


# ------------------------------------------------------------------------------------------------ greedy parity
def test_settings_the_tests_before_did_not_cover_match_the_reference(folder, tmp_path):
    """Rows of very different lengths (1 and 24 tokens), a row that stops early (padded, the other unaffected), eos
    as an int and as a list, max_new_tokens=1, and the streamed tokens equal to generate's."""
    ref, ours = _pair(folder, tmp_path)
    inputs = _batch((24, 1))
    S = inputs["input_ids"].shape[1]
    free = ours.generate(**inputs, max_new_tokens=10, stop_token_ids=[])
    stop = int(free[1, S + 1])
    assert stop not in free[0, S:].tolist()
    for eos in (stop, [7, stop]):
        want = _ref(ref, inputs, max_new_tokens=10, eos_token_id=eos)
        got = ours.generate(**inputs, max_new_tokens=10, eos_token_id=eos)
        assert torch.equal(got, want), eos
        assert torch.equal(got[0], free[0]) and got[1, S + 2 :].eq(PAD).all()
    streamed = torch.stack(list(ours.stream_generate(**inputs, max_new_tokens=10, eos_token_id=stop)), 1)
    assert torch.equal(streamed, got[:, S:])
    assert torch.equal(ours.generate(**inputs, max_new_tokens=1), _ref(ref, inputs, max_new_tokens=1))


def test_eos_and_pad_given_as_none_mean_none_as_in_the_reference(folder, tmp_path):
    """`eos_token_id=None` stops on nothing in the reference (ours stopped on the file's eos) and
    `pad_token_id=None` pads finished rows with the first eos id (ours padded with the file's pad)."""
    ref, ours = _pair(folder, tmp_path)
    one = {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}
    want = _ref(ref, one, max_new_tokens=8, eos_token_id=None)
    assert EOS in want[0, 6:-1].tolist()  # the reference goes on past the eos
    assert torch.equal(ours.generate(**one, max_new_tokens=8, eos_token_id=None), want)
    inputs = _batch()
    stop = int(ours.generate(**inputs, max_new_tokens=3, stop_token_ids=[])[0, -1])
    kw = dict(max_new_tokens=8, eos_token_id=[stop, 5], pad_token_id=None)
    want = _ref(ref, inputs, **kw)
    assert want[0, -1] == stop and stop != PAD  # the finished row is filled with eos[0]
    assert torch.equal(ours.generate(**inputs, **kw), want)


def test_generation_config_without_pad_pads_with_its_first_eos(folder, tmp_path):
    """A generation_config.json naming eos ids and no pad: the reference fills finished rows with the first eos id;
    ours used the config.json pad."""
    inputs = _batch()
    _, ours = _pair(folder, tmp_path)
    stop = int(ours.generate(**inputs, max_new_tokens=3, stop_token_ids=[])[0, -1])
    ref, ours = _pair(folder, tmp_path, {"eos_token_id": [stop, 7]})
    want = _ref(ref, inputs, max_new_tokens=8)
    assert want[0, -1] == stop
    assert torch.equal(ours.generate(**inputs, max_new_tokens=8), want)


# ------------------------------------------------------------------------------------------------ sampling
def _top(ours, inputs, k: int) -> set[int]:
    with torch.no_grad():
        logits = ours(**inputs).logits[0, -1]
    return set(logits.topk(k).indices.tolist())


def test_sampling_without_top_k_keeps_the_references_top_50(folder, tmp_path):
    """`generate(do_sample=True)` without top_k samples among the 50 likeliest tokens in the reference (its
    default); ours drew from the whole vocabulary. top_k=0 still turns it off."""
    ref, ours = _pair(folder, tmp_path)
    one = {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}
    top50 = _top(ours, one, 50)
    rows = {"input_ids": PROMPT.repeat(16, 1), "attention_mask": torch.ones(16, 6, dtype=torch.long)}
    kw = dict(do_sample=True, temperature=50.0, max_new_tokens=1)
    torch.manual_seed(0)
    assert set(_ref(ref, rows, **kw)[:, -1].tolist()) <= top50
    assert set(ours.generate(**rows, seed=0, **kw)[:, -1].tolist()) <= top50
    assert not set(ours.generate(**rows, seed=0, top_k=0, **kw)[:, -1].tolist()) <= top50


def test_generation_config_sampling_and_length_fields_apply_as_in_the_reference(folder, tmp_path):
    """The file's do_sample/temperature/top_k and max_length are the reference's defaults for `generate()`; the
    engine ignored them (greedy, 128 tokens); `from_pretrained` reads them into `model.generation_defaults`."""
    ref, ours = _pair(folder, tmp_path, {"eos_token_id": [1], "max_length": 9})
    one = {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}
    want = _ref(ref, one)
    assert want.shape == (1, 9) and torch.equal(ours.generate(**one), want)
    sample = {"eos_token_id": [1], "do_sample": True, "temperature": 50.0, "top_k": 3, "max_new_tokens": 1}
    ref, ours = _pair(folder, tmp_path / "s", sample)
    rows = {"input_ids": PROMPT.repeat(16, 1), "attention_mask": torch.ones(16, 6, dtype=torch.long)}
    top3 = _top(ours, rows, 3)
    torch.manual_seed(0)
    assert set(_ref(ref, rows)[:, -1].tolist()) <= top3
    drawn = set(ours.generate(**rows, seed=0)[:, -1].tolist())
    assert drawn <= top3 and len(drawn) > 1  # sampled (greedy gives one token)
    greedy = ours.generate(**rows, do_sample=False)[:, -1]
    assert greedy.unique().numel() == 1  # the caller's do_sample=False wins over the file's


def test_generation_config_fields_the_engine_does_not_implement_are_named(folder, tmp_path, caplog):
    """no_repeat_ngram_size, suppress_tokens, min_new_tokens, ... change the reference's tokens: a file setting one is
    named in a warning (generate and infer.py) instead of being dropped in silence; infer.py also names
    repetition_penalty, which generate applies and infer.py's settings do not have."""
    raw = {"no_repeat_ngram_size": 0, "suppress_tokens": [270], "min_p": None, "repetition_penalty": 1.5}
    assert unsupported_generation_fields(raw) == ["suppress_tokens=[270]"]  # (the engine applies the penalty)
    _, ours = _pair(folder, tmp_path, {"eos_token_id": [1], "min_new_tokens": 4, "bad_words_ids": [[3]]})
    with caplog.at_level(logging.WARNING, logger="musicflamingo.engine"):
        ours.generate(PROMPT, max_new_tokens=2)
    assert "min_new_tokens=4, bad_words_ids=[[3]]" in caplog.text and "does not implement" in caplog.text

    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):  # our own file: nothing to say
        _decoding({"max_new_tokens": None, "do_sample": True, "temperature": 0.5}, ckpt)
    assert "generation_config.json" not in caplog.text
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.05)
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
        _decoding({"max_new_tokens": None, "do_sample": False}, ckpt)
    assert "do_sample=True temperature=0.7 top_p=0.8: infer.py decodes with its own settings" in caplog.text
    assert "repetition_penalty=1.05" in caplog.text


# ------------------------------------------------------------------------------------------------ context, chat
def test_rows_cut_by_the_context_are_named(caplog):
    """A prompt that nearly fills the context: the reference goes on past it, ours stops there; a warning says so
    (the row just came back shorter). A prompt that fills it is refused naming the row."""
    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", text={"max_position_embeddings": 40})).eval()
    ids = torch.randint(0, 290, (2, 36))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    with caplog.at_level(logging.WARNING, logger="musicflamingo.engine"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=[], pad_token_id=-1)
    assert out[0, 36:].tolist()[-2:] == [-1, -1] and -1 not in out[1, 36:].tolist()
    assert "context of 40 positions ends before max_new_tokens=6 new tokens (row 0: 4 at most)" in caplog.text
    with pytest.raises(ValueError, match="row 0 of the batch: the prompt would end at position 40"):
        model.generate(torch.randint(0, 290, (1, 40)), max_new_tokens=1)


def test_chat_session_stops_on_the_generation_config_eos_by_default(tmp_path):
    """`ChatSession(model, processor)` stopped on the config's eos alone; infer.py's chat on the file's too."""
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [298, 296]}))
    model = MusicFlamingo.from_pretrained(ckpt, dtype=torch.float32)
    session = ChatSession(model, MusicFlamingoProcessor.from_pretrained(ckpt))
    assert session.stops == (296, 298, EOS)
