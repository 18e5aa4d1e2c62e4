"""Review 8: processor, chat format and tokenizer parity with transformers' MusicFlamingoProcessor, swept at random.

A seeded sweep builds conversations (system turn or not, string or list content, text before/after the audio,
empty/whitespace/unicode/long text, audio in a later user turn, batches, generation prompt on/off, left/right
padding, labels) and compares the rendered text and every output tensor with the reference built from the same
tiny files. Also: audio lengths and sample formats at the window edges, continue_final_message, the reference's
processor_kwargs/return_tensors/sampling_rate, ``.to(device, dtype)`` on the output, and the tokenizer against
``AutoTokenizer`` with added (special and plain, lstrip/rstrip) tokens.
"""

import json
import random

import numpy as np
import pytest
import torch
from tiny_assets import SPECIAL_TOKENS, write_audio, write_tiny_tokenizer

from musicflamingo.audio.io import AudioError
from musicflamingo.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

SR = 16000
TEXTS = [
    "",
    " ",
    "\n",
    "\t \n",
    "What key?",
    " leading",
    "trailing ",
    "日本語の音楽",
    "🎸🎹 emoji",
    "e\u0301 combining",
    "A\u030a",
    "ﬁ",
    "Line\nbreak\r\n",
    "It's 128 BPM",
    "\u200b",
    "한국어",
    "<sound",
]
# Samples: the smallest audio with one token, < a window, a window -1/0, a window + 1 token, 59.99 s.
LENGTHS = [321, 1600, 40000, 480000 - 1, 480000, 480321, 959840]


def _noise(n, seed, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _assert_same(r, o, where=""):
    assert sorted(r.keys()) == sorted(o.keys()), where
    for k in r:
        assert o[k].dtype == r[k].dtype and o[k].shape == r[k].shape, (where, k)
        if k == "input_features":
            assert (o[k] - r[k]).abs().max() <= 1e-4, (where, k)
        else:
            assert torch.equal(o[k], r[k]), (where, k)


def _text(rng):
    return "".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 3)))


def _conversation(rng, with_audio, lengths):
    msgs = []
    if rng.random() < 0.5:
        content = _text(rng) if rng.random() < 0.7 else [{"type": "text", "text": _text(rng)}]
        msgs.append({"role": "system", "content": content})
    turns = rng.randint(1, 4)
    audio_turn = rng.randrange(0, turns, 2) if with_audio else -1  # a user turn, possibly a later one
    for t in range(turns):
        role = "user" if t % 2 == 0 else rng.choice(["assistant", "assistant", "system", "tool"])
        if t == audio_turn:
            parts = [{"type": "text", "text": _text(rng)} for _ in range(rng.randint(0, 3))]
            audio = _noise(rng.choice(lengths), rng.randrange(1 << 30))
            parts.insert(rng.randint(0, len(parts)), {"type": "audio", "audio": audio})
            msgs.append({"role": role, "content": parts})
        elif (
            rng.random() < 0.5
        ):  # string content may hold special tokens (the template emits them as they are)
            extra = rng.choice(
                ["", "<|im_end|>x", "<|endoftext|>", "<|sound_bos|>y<|sound_eos|>", "x" * 3000]
            )
            msgs.append({"role": role, "content": _text(rng) + extra})
        else:
            msgs.append({"role": role, "content": [{"type": "text", "text": _text(rng)} for _ in range(3)]})
    return msgs


def _sweep(ref, ours, seed, n, lengths):
    rng = random.Random(seed)
    for it in range(n):
        # The reference takes one audio per sample: every conversation of a batch has one, or none has.
        with_audio = rng.random() < 0.6
        convs = [_conversation(rng, with_audio, lengths) for _ in range(rng.randint(1, 3))]
        gen, side, labels = rng.random() < 0.5, rng.choice(["left", "right"]), rng.random() < 0.5
        x = convs if len(convs) > 1 or rng.random() < 0.5 else convs[0]
        where = f"seed {seed} case {it}"
        rendered = ref.apply_chat_template(x, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(x, tokenize=False, add_generation_prompt=gen) == rendered, where
        r = ref.apply_chat_template(
            x,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=gen,
            processor_kwargs={"output_labels": labels, "padding_side": side},
        )
        o = ours.apply_chat_template(x, add_generation_prompt=gen, output_labels=labels, padding_side=side)
        _assert_same(r, o, where)


def test_random_conversations_match_reference(ref, ours):
    _sweep(ref, ours, seed=8, n=12, lengths=LENGTHS[:4] + LENGTHS[5:6])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_conversations_match_reference_long(ref, ours, seed):
    _sweep(ref, ours, seed=seed, n=60, lengths=LENGTHS)


def test_audios_in_later_turns_of_one_conversation_expand_as_the_reference(ref, ours):
    """The reference's __call__ takes one audio per sample; its expansion step (get_text_with_replacements) is
    row-major over any number: ours with two audios in one conversation equals that step's output."""
    audios = [_noise(40000, 0), _noise(500000, 1), _noise(1000, 2)]
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": audios[0]}, {"type": "text", "text": "first"}],
            },
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "and "}, {"type": "audio", "audio": audios[1]}],
            },
        ],
        [{"role": "user", "content": "no audio here"}],
        [{"role": "user", "content": [{"type": "audio", "audio": audios[2]}]}],
    ]
    texts = ref.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    feats, replacements = ref._process_audio(
        audios, sampling_rate=SR, return_attention_mask=True, return_tensors="pt"
    )
    expanded, _ = ref.get_text_with_replacements(list(texts), audio_replacements=replacements)
    tok = ref.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
    o = ours.apply_chat_template(convs)
    assert torch.equal(o["input_ids"], tok["input_ids"]) and torch.equal(
        o["attention_mask"], tok["attention_mask"]
    )
    assert torch.equal(o["input_features_mask"], feats["input_features_mask"])
    assert (o["input_features"] - feats["input_features"]).abs().max() <= 1e-4


def _one(audio, text="Key?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]}]


def _both(ref, ours, audio):
    r = ref.apply_chat_template(_one(audio), tokenize=True, return_dict=True, add_generation_prompt=True)
    return r, ours.apply_chat_template(_one(audio))


@pytest.mark.parametrize("n", LENGTHS)
def test_audio_lengths_at_window_edges_match_reference(ref, ours, n):
    r, o = _both(ref, ours, _noise(n, n))
    _assert_same(r, o, n)
    assert int((o["input_ids"] == ours.audio_token_id).sum()) == ours.audio_token_count(n)


def test_sample_formats_and_levels_match_reference(ref, ours):
    base = _noise(40000, 3)
    cases = {
        "silence": np.zeros(40000, np.float32),
        "clipping": base * 50,  # far above 1: not clipped, as the reference
        "float64": base.astype(np.float64),
        "float16": base.astype(np.float16),
        "strided": np.repeat(base, 2)[::2],
        "big-endian": base.astype(">f4"),
    }
    for name, audio in cases.items():
        _assert_same(*_both(ref, ours, audio), name)


def test_too_short_audio_is_refused_by_name(ours):
    """1 sample, < 1 frame and <= 2 frames give the reference 0 audio tokens (its model then fails in RoTE): ours
    refuses them by name, deliberately."""
    for n in (1, 159, 320):
        with pytest.raises(AudioError, match=r"too short for one audio token"):
            ours.apply_chat_template(_one(_noise(n, 0)))


def test_stereo_and_resampled_files_match_reference(ref, ours, tmp_path):
    path = write_audio(tmp_path / "stereo.wav", _noise(2 * 44100, 4).reshape(-1, 2).repeat(2, 0), 44100)
    conv = [
        {"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "?"}]}
    ]
    r = ref.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
    _assert_same(r, ours.apply_chat_template(conv))


@pytest.mark.slow
@pytest.mark.parametrize("n", [40 * 480000, 40 * 480000 + 1])
def test_twenty_minutes_exactly_and_one_sample_over_match_reference(ref, ours, n):
    r, o = _both(ref, ours, _noise(n, 5, scale=1e-3))
    _assert_same(r, o, n)
    assert o["input_features"].shape[0] == 40 and int((o["input_ids"] == ours.audio_token_id).sum()) == 30000


def test_integer_pcm_is_scaled_unlike_the_reference(ref, ours):
    """Documented difference: integer arrays are PCM scaled to [-1, 1] (as a decoded file); the reference casts
    them as they are (int16 audio 32768x too loud). Ours equals the reference fed the scaled floats."""
    pcm = (_noise(40000, 6) * 32767).astype(np.int16)
    r, o = _both(ref, ours, pcm.astype(np.float32) / 32768)
    _assert_same(r, o)
    _assert_same(r, ours.apply_chat_template(_one(pcm)))


# ------------------------------------------------------------------------------- the reference's keyword arguments
@pytest.mark.parametrize(
    "conv",
    [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The key is "}],
        [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": _noise(30000, 7)}, {"type": "text", "text": "?"}],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "in "}],
            },
        ],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Describe "}]},
        ],
    ],
)
def test_continue_final_message_matches_reference(ref, ours, conv):
    """The last message is left open for the model to continue (was: TypeError, unknown argument)."""
    text = ref.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert ours.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=False, continue_final_message=True
    ) == (text)
    assert not text.endswith("<|im_end|>\n")
    kw = {"output_labels": True, "padding_side": "right"}
    r = ref.apply_chat_template(
        conv, tokenize=True, return_dict=True, continue_final_message=True, processor_kwargs=kw
    )
    o = ours.apply_chat_template(
        conv, add_generation_prompt=False, continue_final_message=True, processor_kwargs=kw
    )
    _assert_same(r, o)


def test_continue_final_message_errors(ours):
    with pytest.raises(ValueError, match="exclude each other"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], continue_final_message=True)
    only_audio = [{"role": "user", "content": [{"type": "audio", "audio": _noise(1000, 0)}]}]
    with pytest.raises(ValueError, match="message 0.* no text to continue"):
        ours.apply_chat_template(only_audio, add_generation_prompt=False, continue_final_message=True)


def test_reference_call_keywords(ref, ours):
    """processor(..., sampling_rate=16000, return_tensors="pt") and processor_kwargs, as HF code writes them (were a
    TypeError); another rate or tensor type is refused as the reference refuses it."""
    audio = _noise(20000, 8)
    r = ref(text=["<sound>Key?"], audio=[audio], sampling_rate=SR, return_tensors="pt")
    _assert_same(r, ours(["<sound>Key?"], audio=[audio], sampling_rate=SR, return_tensors="pt"))
    with pytest.raises(ValueError, match="sampling rate of 16000"):
        ref(text="<sound>x", audio=audio, sampling_rate=44100)
    with pytest.raises(ValueError, match=r"sampling_rate=44100: this processor takes 16000 Hz"):
        ours("<sound>x", audio=audio, sampling_rate=44100)
    assert "input_ids" in ours(
        "no audio", sampling_rate=44100
    )  # no audio, nothing to check (as the reference)
    with pytest.raises(ValueError, match="return_tensors='np'"):
        ours("x", return_tensors="np")
    kw = {"output_labels": True, "padding_side": "right", "sampling_rate": SR}
    conv = [_one(audio), [{"role": "user", "content": [{"type": "audio", "audio": _noise(900, 9)}]}]]
    r = ref.apply_chat_template(conv, tokenize=True, return_dict=True, processor_kwargs=kw)
    _assert_same(r, ours.apply_chat_template(conv, add_generation_prompt=False, processor_kwargs=kw))
    with pytest.raises(ValueError, match=r"processor_kwargs \['truncation'\] are not supported"):
        ours.apply_chat_template(conv, processor_kwargs={"truncation": True})


def test_output_moves_like_batch_feature(ref, ours):
    """``inputs = processor.apply_chat_template(...).to(model.device)`` as the reference's examples (was:
    AttributeError, 'dict' object has no attribute 'to'); .to(dtype) casts only the features."""
    conv = _one(_noise(20000, 10))
    r = ref.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
    o = ours.apply_chat_template(conv)
    assert isinstance(o, dict) and o.input_ids is o["input_ids"]
    assert o.to("cpu") is o
    r, o = r.to(torch.float16), o.to(torch.float16)
    assert {k: v.dtype for k, v in o.items()} == {k: v.dtype for k, v in r.items()}
    assert o["input_features"].dtype == torch.float16 and o["input_features_mask"].dtype == torch.int32
    o.to(device="cpu", dtype=torch.bfloat16)
    assert o["input_features"].dtype == torch.bfloat16 and o["input_ids"].dtype == torch.int64
    with pytest.raises(AttributeError):
        _ = o.labels


def test_decode_default_keeps_documented_difference(ref, ours):
    """Documented difference: our decode skips special tokens by default (the reference keeps them); with the
    argument given, both agree."""
    ids = ours.tokenizer.encode("<|im_start|>assistant\nC major.<|im_end|>")
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.batch_decode([ids], skip_special_tokens=skip) == ref.batch_decode(
            [ids], skip_special_tokens=skip
        )
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_with_added_tokens(d):
    from tokenizers import AddedToken, Tokenizer

    write_tiny_tokenizer(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    extra = [
        AddedToken("<think>", special=False, normalized=False),
        AddedToken("</think>", special=False, normalized=False),
        AddedToken("<|rs|>", special=True, rstrip=True, normalized=False),
        AddedToken("<|ls|>", special=True, lstrip=True, normalized=False),
        AddedToken("musicx", special=False, normalized=True),
    ]
    tok.add_tokens(extra)
    tok.save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for t in extra:
        cfg["added_tokens_decoder"][str(tok.token_to_id(t.content))] = {
            "content": t.content,
            "lstrip": t.lstrip,
            "rstrip": t.rstrip,
            "normalized": t.normalized,
            "single_word": False,
            "special": t.special,
        }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return [t.content for t in extra]


def test_tokenizer_sweep_with_added_tokens_matches_reference(tmp_path):
    extra = _tokenizer_with_added_tokens(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    pieces = [
        *SPECIAL_TOKENS,
        *extra,
        *TEXTS,
        "a",
        "  ",
        "The",
        " tempo",
        "128",
        "MUSICX",
        "Musicx",
        "sound>",
    ]
    rng = random.Random(8)
    for _ in range(400):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        ids = ours.encode(s)
        assert ids == ref(s, add_special_tokens=False)["input_ids"] == ref(s)["input_ids"], s
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s
    for _ in range(300):  # arbitrary id sequences (partial UTF-8 bytes, specials anywhere)
        ids = [rng.randrange(len(ref)) for _ in range(rng.randint(0, 8))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (
                ids
            )
