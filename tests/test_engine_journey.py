"""The one generation engine, end to end against the reference: chat template -> processor -> greedy tokens for mixed
batches (audio and text-only rows, audios past one window, system / think prompts, history), stop and pad handling,
and the `generate()` arguments (sampling values, seeds, a batch without an attention mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_model import make_reference_model
from tiny_assets import TINY_IDS, write_reference_processor

from musicflamingo import MusicFlamingo
from musicflamingo.chat import think_prompt
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import generate_answers
from musicflamingo.processor import MusicFlamingoProcessor

transformers = pytest.importorskip("transformers")

PAD, EOS = TINY_IDS.pad_token_id, TINY_IDS.eos_token_id
SR = 16000


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(reference model, our model, reference processor, our processor) over the same files."""
    d = tmp_path_factory.mktemp("journey")
    make_reference_model(seed=0).save_pretrained(d / "model")
    write_reference_processor(d / "proc")
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(d / "model").eval()
    ours = MusicFlamingo.from_pretrained(d / "model", dtype=torch.float32)
    return (
        ref,
        ours,
        transformers.MusicFlamingoProcessor.from_pretrained(str(d / "proc")),
        MusicFlamingoProcessor.from_pretrained(d / "proc"),
    )


def _noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR), dtype=np.float32) * np.float32(0.1)


def _conv(audio, text, system=None):
    head = [{"role": "system", "content": system}] if system else []
    items = ([{"type": "audio", "audio": audio}] if audio is not None else []) + [
        {"type": "text", "text": text}
    ]
    return head + [{"role": "user", "content": items}]


def _ref_generate(ref, inputs, **kw):
    with torch.no_grad():
        return ref.generate(**inputs, do_sample=False, **kw)


def _text_batch(op) -> dict:
    return op.apply_chat_template(
        [_conv(None, "Hi"), _conv(None, "A much longer question, please answer it")]
    )


# ------------------------------------------------------------------------------------------------ greedy parity
def test_mixed_batch_matches_reference_generate_and_engine_slots(assets):
    """Text-only rows next to audio rows (65 s: three windows; 31 s: two), a system prompt, the think suffix and a
    history with an earlier audio: the chat template's ids are the reference processor's (row by row, where the
    reference takes the conversation), `generate` gives the reference's greedy tokens, and the engine's
    continuous batching (each conversation prepared alone, 1, 2 or 4 slots) gives each row's."""
    ref, ours, rp, op = assets
    history = [
        {"role": "system", "content": "Be terse."},
        {
            "role": "user",
            "content": [{"type": "audio", "audio": _noise(2.5, 5)}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "A piano."},
        {"role": "user", "content": [{"type": "text", "text": "And the tempo?"}]},
    ]
    convs = [
        _conv(None, "Hi there"),
        _conv(_noise(65, 3), think_prompt("Key?"), system="Be brief."),
        _conv(None, think_prompt("Why?")),
        _conv(_noise(31, 4), "Describe the track."),
        history,
    ]
    for c in convs[1:2] + convs[3:]:  # the reference processor takes one audio per conversation
        r = rp.apply_chat_template([c], tokenize=True, return_dict=True, add_generation_prompt=True)
        o = op.apply_chat_template([c])
        assert torch.equal(r["input_ids"], o["input_ids"]) and torch.equal(
            r["input_features_mask"], o["input_features_mask"]
        )
    inputs = op.apply_chat_template(convs)
    assert inputs["input_features"].shape[0] == 3 + 2 + 1
    S, n = inputs["input_ids"].shape[1], 12
    expected = _ref_generate(ref, inputs, max_new_tokens=n, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=n, stop_token_ids=[]), expected)
    want = [op.tokenizer.decode(row) for row in expected[:, S:].tolist()]
    labels = [str(i) for i in range(len(convs))]
    for slots in (1, 2, len(convs)):
        got = generate_answers(ours, op, convs, labels, SamplingParams(max_new_tokens=n), slots=slots)
        assert got == want, slots


def test_rows_stopping_early_pad_equal_to_eos_and_one_token(assets):
    """A row that emits the stop id keeps it and is padded while the other goes on, also when the pad id is the
    stop id; max_new_tokens=1 gives one token per row (the reference's generate)."""
    ref, ours, _, op = assets
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 290, (n,), generator=g) for n in (17, 9)]
    ids = torch.full((2, 17), PAD)
    mask = torch.zeros(2, 17, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 17 - len(r) :], mask[b, 17 - len(r) :] = r, 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    free = ours.generate(**inputs, max_new_tokens=10, stop_token_ids=[])
    stop = int(free[0, 17 + 2])
    assert stop not in free[1, 17:].tolist()  # row 0 stops on its 3rd token, row 1 runs all 10
    for pad in (PAD, stop):
        expected = _ref_generate(ref, inputs, max_new_tokens=10, eos_token_id=stop, pad_token_id=pad)
        got = ours.generate(**inputs, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=pad)
        assert torch.equal(got, expected), pad
        assert got[0, 17 + 3 :].eq(pad).all()
    one = ours.generate(**inputs, max_new_tokens=1)
    assert torch.equal(one, _ref_generate(ref, inputs, max_new_tokens=1)) and one.shape == (2, 18)


def test_left_padded_batch_without_attention_mask_reads_the_pad_id(assets):
    """No attention_mask: the reference masks the pad id's positions (unless pad is a stop id); ours took every
    row whole, so the shorter row was continued after its left padding and got other tokens."""
    ref, ours, _, op = assets
    inputs = _text_batch(op)
    ids = inputs["input_ids"]
    assert ids[0, 0] == PAD
    with_mask = ours.generate(**inputs, max_new_tokens=6, stop_token_ids=[])
    no_mask = ours.generate(ids, max_new_tokens=6, stop_token_ids=[])
    assert torch.equal(no_mask, with_mask)
    assert torch.equal(no_mask, _ref_generate(ref, {"input_ids": ids}, max_new_tokens=6, eos_token_id=None))
    # pad == a stop id: a pad cannot be told from a real token, every position counts (as the reference)
    same = _ref_generate(ref, {"input_ids": ids}, max_new_tokens=6, eos_token_id=PAD, pad_token_id=PAD)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, stop_token_ids=[PAD], pad_token_id=PAD), same)


# ------------------------------------------------------------------------------------------------ sampling
def test_unseeded_sampling_follows_torch_manual_seed(assets):
    """`generate(do_sample=True)` without a seed repeats under `torch.manual_seed` (it drew a fresh random seed,
    so a seeded script never gave the same text twice); a given seed still wins."""
    _, ours, _, op = assets
    inputs = _text_batch(op)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, stop_token_ids=[])
    runs = []
    for s in (0, 0, 1):
        torch.manual_seed(s)
        runs.append(ours.generate(**inputs, **kw))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(5)
    a = ours.generate(**inputs, seed=9, **kw)
    torch.manual_seed(6)
    assert torch.equal(a, ours.generate(**inputs, seed=9, **kw))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(do_sample="false"), "do_sample must be true or false, got 'false'"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 1, got -3"),
        (dict(do_sample=True, temperature=0), "temperature must be >= 0.01 when sampling"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be >= 0.01 when sampling"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
        (dict(do_sample=True, temperature="0.7"), "temperature must be a finite number, got '0.7'"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=float("nan")), "top_p must be a finite number"),
        (dict(do_sample=True, top_k=-1), "top_k must be an integer >= 0"),
        (dict(do_sample=True, top_k=2.5), "top_k must be an integer >= 0"),
        (dict(do_sample=True, seed="7"), "seed must be a 64-bit integer"),
    ],
)
def test_bad_sampling_values_are_refused(assets, kwargs, message):
    """Each bad value is a ValueError naming the setting (max_new_tokens=0 returned the prompt unchanged and
    do_sample='false', a truthy string, sampled 128 tokens)."""
    _, ours, _, op = assets
    with pytest.raises(ValueError, match=message):
        ours.generate(**_text_batch(op), **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match=message.split(",")[0]):
        SamplingParams(**{"max_new_tokens": 4, **kwargs})


def test_top_k_past_the_vocabulary_keeps_every_token(assets):
    _, ours, _, op = assets
    inputs = _text_batch(op)
    kw = dict(max_new_tokens=6, do_sample=True, seed=3, stop_token_ids=[])
    assert torch.equal(ours.generate(**inputs, top_k=10**6, **kw), ours.generate(**inputs, top_k=0, **kw))


# ------------------------------------------------------------------------------------------------ bad inputs
def test_malformed_batches_get_clear_errors(assets):
    """A 1-d prompt, a mask of another shape or an empty row: a ValueError saying which (a tuple unpacking error
    or a deep traceback before)."""
    _, ours, _, op = assets
    inputs = _text_batch(op)
    with pytest.raises(
        ValueError, match=r"input_ids must be a \(batch, length\) tensor of token ids, got \(9,\)"
    ):
        ours.generate(torch.arange(9), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"][:, 1:], max_new_tokens=2)
    mask = inputs["attention_mask"].clone()
    mask[1] = 0
    with pytest.raises(ValueError, match="row 1 of the batch: a request needs at least one prompt token"):
        ours.generate(inputs["input_ids"], attention_mask=mask, max_new_tokens=2)


def test_several_audios_in_one_message_name_the_message(assets):
    """The template gives a message one <sound>; two audio items in one message were refused blaming the text
    ("1 placeholder but 2 audios"); the reference refuses too. The error names the message."""
    _, _, rp, op = assets
    two = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": _noise(1, 1)},
                {"type": "audio", "audio": _noise(1, 2)},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    with pytest.raises(ValueError):
        rp.apply_chat_template(two, tokenize=True, return_dict=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="message 0 has 2 audio items.*in a message of its own"):
        op.apply_chat_template(two)
    with pytest.raises(ValueError, match="conversation 1 message 0 has 2 audio items"):
        op.apply_chat_template([_conv(None, "Hi"), two])


def test_generate_defaults_come_from_generation_config_as_the_reference(tmp_path):
    """The release's generation_config.json gives `max_new_tokens=2048`; `generate()` without a length uses the
    file's value, and the file's eos ids in place of the config's, as the reference's does (ours used 128 and the
    config's eos), and a save keeps them."""
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    outs = {}
    for name, eos in (("other_eos", 296), ("mid_eos", None)):
        ref = make_reference_model(seed=1)  # this random model says the config's eos (299) as its 5th token
        ref.generation_config.max_new_tokens = 9
        if eos is None:  # stop at the 2nd token of the run above, from the file alone
            eos = int(outs["other_eos"][0, ids.shape[1] + 1])
        ref.generation_config.eos_token_id = [eos]
        ref.save_pretrained(tmp_path / name)
        ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(tmp_path / name).eval()
        ours = MusicFlamingo.from_pretrained(tmp_path / name, dtype=torch.float32)
        with torch.no_grad():
            want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
        outs[name] = got = ours.generate(ids)
        assert torch.equal(got, want), name
    assert outs["other_eos"].shape[1] == ids.shape[1] + 9 and EOS in outs["other_eos"][0, ids.shape[1] :]
    assert outs["mid_eos"].shape[1] == ids.shape[1] + 2
    ours.save_pretrained(tmp_path / "saved")
    assert MusicFlamingo.from_pretrained(tmp_path / "saved").generation_defaults == ours.generation_defaults
    assert ours.generation_defaults["max_new_tokens"] == 9
