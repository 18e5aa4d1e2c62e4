"""Review 17 (processor API): code ported from transformers' ``MusicFlamingoProcessor`` with the keywords it used.

``padding=True``, ``sanitize_control_tokens=``, ``chat_template=``, ``text_kwargs=`` ... were bare ``TypeError``s
("unexpected keyword argument"); those whose output we give exactly are taken (each compared here with the reference
processor), the others are refused naming the keyword and what to do instead. ``content=None`` follows the
template's rule; the truncation warning names the seconds kept when ``max_audio_len`` is not whole windows.
"""

import logging

import numpy as np
import pytest
import torch

from musicflamingo import chat
from musicflamingo.processor import MusicFlamingoProcessor

transformers = pytest.importorskip("transformers")

SR = 16000
BASE = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}


def _noise(n, seed, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _one(audio, text="Key?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def batch():
    # a 3-s clip (a short window, which the reference's padding=True shortens) and a 31-s one (two windows)
    return [_one(_noise(3 * SR, 1)), _one(_noise(31 * SR, 2), "Tempo of this longer one?")]


def _assert_same(r, o, keys=None):
    if keys is None:
        assert sorted(r.keys()) == sorted(o.keys())
    for k in keys or r.keys():
        assert o[k].dtype == r[k].dtype and o[k].shape == r[k].shape, k
        if k == "input_features":
            assert (o[k] - r[k]).abs().max() <= 1e-4, k
        else:
            assert torch.equal(o[k], r[k]), k


TEXT_KEYS = ("input_ids", "attention_mask", "labels")


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": True},
        {"padding": "longest", "output_labels": True},
        {"processor_kwargs": {"padding": True, "output_labels": True}},
        {"common_kwargs": {"padding": True}},
    ],
)
def test_padding_true_gives_the_reference_ids_and_whole_windows(ref, ours, batch, kw):
    """padding=True (the usual transformers call) was a TypeError (in processor_kwargs a ValueError). The ids, mask
    and labels are the reference's; the features stay whole 30-s windows, the reference's without padding=True
    (with it the reference pads the 3-s window to 300 frames, which its own encoder cannot take)."""
    o = ours.apply_chat_template(batch, **BASE, **kw)
    r = ref.apply_chat_template(batch, **BASE, **kw)
    _assert_same(r, o, [k for k in TEXT_KEYS if k in r])
    assert r["input_features"].shape[-1] == 3000  # the batch's longest window is a whole one
    _assert_same(r, o, ["input_features", "input_features_mask"])
    # one short clip alone: the reference's features are shortened, ours are its default call's
    alone = ref.apply_chat_template(batch[0], **BASE)
    o = ours.apply_chat_template(batch[0], **BASE, **kw)
    _assert_same(alone, o, ["input_features", "input_features_mask"])
    short = ref.apply_chat_template(batch[0], **BASE, **kw)
    assert short["input_features"].shape[-1] == 300  # the reference's padding=True difference, documented
    _assert_same(short, o, [k for k in TEXT_KEYS if k in short])


@pytest.mark.parametrize(
    "kw",
    [
        {"truncation": False, "return_attention_mask": True, "add_special_tokens": False},
        {"add_special_tokens": True},  # was refused: Qwen2's tokenizer adds nothing with it, as ours
        {"text_kwargs": {"padding_side": "right", "padding": True}},
        {"audio_kwargs": {"sampling_rate": SR}, "common_kwargs": {"padding_side": "right"}},
        {"return_tensors": "auto", "sampling_rate": SR},
        {"sanitize_control_tokens": True, "tools": None, "documents": None},
        {"return_assistant_tokens_mask": False, "load_audio_from_video": False, "chat_template": None},
    ],
)
def test_reference_keywords_that_change_nothing_match_the_reference(ref, ours, batch, kw):
    """Each of these was a TypeError here; the output is the reference's with the same keywords."""
    _assert_same(ref.apply_chat_template(batch, **BASE, **kw), ours.apply_chat_template(batch, **BASE, **kw))


def test_chat_template_of_our_shape_is_used(ref, ours, batch):
    """chat_template= with the Music Flamingo template (the folder's, or one with another system prompt) renders as
    the reference renders it (was a TypeError); another template is refused by name."""
    for template in (ref.chat_template, chat.build_chat_template("Answer in one word.")):
        r = ref.apply_chat_template(batch, chat_template=template, **BASE)
        _assert_same(r, ours.apply_chat_template(batch, chat_template=template, **BASE))
        text = ours.apply_chat_template(batch[0], chat_template=template, tokenize=False)
        assert text == ref.apply_chat_template(batch[0], chat_template=template, add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"chat_template=.*only the Music Flamingo template"):
        ours.apply_chat_template(batch, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_processor_call_takes_the_reference_keywords(ref, ours, batch):
    """processor(text=..., audio=..., padding=True, return_tensors="pt"), the transformers idiom, was a TypeError."""
    texts = ours.apply_chat_template(batch, tokenize=False)
    audios = [c[0]["content"][0]["audio"] for c in batch]
    kw = {"padding": True, "return_tensors": "pt", "text_kwargs": {"padding_side": "left"}}
    _assert_same(ref(text=texts, audio=audios, **kw), ours(text=texts, audio=audios, **kw))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"padding": False}, ValueError, r"padding=False is not supported \(True or 'longest' only\)"),
        ({"padding": "max_length", "max_length": 512}, ValueError, r"padding='max_length'.*max_length=512"),
        ({"truncation": True}, ValueError, r"truncation=True is not supported.*shorten the text"),
        ({"return_attention_mask": False}, ValueError, r"return_attention_mask=False is not supported"),
        (
            {"audio_kwargs": {"padding": True}},
            ValueError,
            r"audio_kwargs\['padding'\]=True .*whole 30-s windows",
        ),
        ({"text_kwargs": ["padding"]}, ValueError, r"text_kwargs must be a dict"),
        ({"tools": [{"name": "tuner"}]}, ValueError, r"tools=.*no tools section"),
        ({"documents": [{"text": "liner notes"}]}, ValueError, r"documents=.*no documents section"),
        (
            {"return_assistant_tokens_mask": True},
            ValueError,
            r"return_assistant_tokens_mask=True.*chat_encoder",
        ),
        ({"load_audio_from_video": True}, ValueError, r"load_audio_from_video=True is not supported"),
        ({"sanitize_control_tokens": True, "tokenize": False}, ValueError, r"requires tokenize=True"),
        ({"temperature": 0.2}, TypeError, r"unexpected keyword argument\(s\) \['temperature'\]: it takes"),
        (
            {"processor_kwargs": {"padding": False}},
            ValueError,
            r"processor_kwargs \['padding'\].*padding=False",
        ),
        (
            {"processor_kwargs": {"audio": []}},
            ValueError,
            r"processor_kwargs \['audio'\].*from the conversations",
        ),
    ],
)
def test_keywords_whose_output_would_differ_are_refused_by_name(ours, batch, kw, error, match):
    """Each was a bare "unexpected keyword argument" TypeError (or ran with another meaning); now the keyword, the
    value and what to do instead are named."""
    with pytest.raises(error, match=match):
        ours.apply_chat_template(batch, **{**BASE, **kw})


def test_sanitize_control_tokens_refuses_typed_control_tokens_by_name(ours):
    """sanitize_control_tokens=True (was a TypeError) keeps user text from writing control tokens: here by refusing
    them, naming the message, item and token (the reference tokenizes them as plain text, ids the model never saw)."""
    conv = [{"role": "user", "content": [{"type": "text", "text": "Stop here<|im_end|> please"}]}]
    with pytest.raises(ValueError, match=r"message 0 content item 0 \(text\) contains .*'<\|im_end\|>'"):
        ours.apply_chat_template(conv, sanitize_control_tokens=True)


def test_processor_call_refuses_unknown_and_differing_keywords_by_name(ours):
    with pytest.raises(ValueError, match=r"padding=False is not supported"):
        ours(["a", "bb"], padding=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['images'\]: it takes"):
        ours(["a"], images=[])


def test_content_none_is_skipped_as_the_template_says(ref, ours):
    """Decision pinned (see chat.render_chat): a message with content None is skipped, as the checkpoint template's
    ``if m['content'] is not none`` and transformers' own template renderer say; transformers 5.25's processor
    drops None-valued keys first and renders an empty turn. content="" is an empty turn in both."""
    from transformers.utils.chat_template_utils import render_jinja_template

    conv = [
        {"role": "user", "content": "Play it."},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again?"},
    ]
    (template_says,), _ = render_jinja_template(
        conversations=[conv], chat_template=ref.chat_template, add_generation_prompt=True
    )
    assert ours.apply_chat_template(conv, tokenize=False) == template_says
    assert "<|im_start|>assistant\n<|im_end|>" not in template_says
    empty = [dict(m, content="") if m["content"] is None else m for m in conv]
    said = ref.apply_chat_template(empty, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(empty, tokenize=False) == said and "assistant\n<|im_end|>" in said


def test_truncation_warning_names_the_seconds_kept(ours, caplog):
    """max_audio_len=100 with 30-s windows keeps 3 windows (90 s): a 95-s clip was said to be "longer than
    max_audio_len=100s"; now the 90 s kept are named."""
    p = MusicFlamingoProcessor(ours.tokenizer, chunk_length=30.0, max_audio_len=100)
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        out = p("<sound>Key?", audio=_noise(95 * SR, 3), sources=["take3.wav"])
    assert out["input_features"].shape[0] == 3
    (msg,) = [r.getMessage() for r in caplog.records if "take3.wav" in r.getMessage()]
    assert "lasts 95.0 s, longer than the 90s that max_audio_len=100s keeps (3 whole windows of 30s)" in msg
    assert "keeping the first 90.0 s" in msg


def test_decode_takes_clean_up_tokenization_spaces_false_as_the_reference(ref, ours):
    """processor.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False), the transformers
    idiom, was a TypeError; False gives the reference's text (spaces before punctuation kept), True is refused."""
    ids = ours.tokenizer.encode("It is in A minor , at 92 bpm . Isn't it ?<|im_end|>")
    rows = torch.tensor([ids, ids[::-1]])
    kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    assert ours.batch_decode(rows, **kw) == ref.batch_decode(rows, **kw)
    assert ours.decode(ids, **kw) == ref.decode(ids, **kw) == "It is in A minor , at 92 bpm . Isn't it ?"
    assert ours.decode(rows, clean_up_tokenization_spaces=None) == ref.decode(rows, skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"clean_up_tokenization_spaces=True is not supported"):
        ours.batch_decode(rows, clean_up_tokenization_spaces=True)
