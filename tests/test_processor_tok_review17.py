"""Review 17 (processor.tokenizer the transformers way): code ported from transformers uses ``processor.tokenizer``
as a ``PreTrainedTokenizer``: ``tokenizer(texts, padding=True, return_tensors="pt")``, ``convert_tokens_to_ids``,
``convert_ids_to_tokens``, ``get_vocab``, ``added_tokens_encoder``, ``batch_decode``, ``padding_side``, ``decode`` of
one id. Each was an AttributeError/TypeError; each is compared here with transformers' tokenizer read from the same
folder. The processor's contradictory duplicate options (``padding_side="right"`` with ``text_kwargs``' "left") were
resolved silently; keyword checks ran with ``tokenize=False`` where the reference renders the text.
"""

import json

import numpy as np
import pytest
import torch

from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import TokenizerError, load_tokenizer, train_sentencepiece

transformers = pytest.importorskip("transformers")

SR = 16000
TEXTS = ["Key?", "What is the tempo of this <sound> piece?<|im_end|>", "<|im_start|>user\nA minor , 92 bpm"]


def _same(r, o):
    assert sorted(r.keys()) == sorted(o.keys())
    for k in r:
        a, b = r[k], o[k]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), k
        elif isinstance(a, np.ndarray):
            assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), k
        else:
            assert a == b, k


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"padding": True},
        {"padding": "longest", "return_tensors": "pt"},
        {"padding": True, "padding_side": "left", "return_tensors": "np"},
        {"return_attention_mask": False, "add_special_tokens": False},
        {"padding": False, "truncation": False, "max_length": None},
    ],
)
def test_tokenizer_call_gives_the_reference_output(ref, ours, kw):
    """tokenizer(texts, padding=True, return_tensors="pt") was a TypeError ('HFTokenizer' object is not callable)."""
    for text in (TEXTS, TEXTS[1]):
        if kw.get("return_tensors") and not kw.get("padding") and not isinstance(text, str):
            continue
        _same(ref.tokenizer(text, **kw), ours.tokenizer(text, **kw))
    out = ours.tokenizer(TEXTS, padding=True, return_tensors="pt").to("cpu")
    assert out.input_ids.shape == out.attention_mask.shape  # BatchEncoding's attribute access and .to


def test_tokenizer_padding_side_attribute_as_the_reference(ref_dir, ref, ours, tmp_path):
    """`tokenizer.padding_side = "left"` (the batched-generation idiom) set an attribute nothing read; __call__ now
    pads on it, and tokenizer_config.json's padding_side is read and written as transformers does."""
    r = transformers.AutoTokenizer.from_pretrained(str(ref_dir))
    o = load_tokenizer(ref_dir)
    assert o.padding_side == r.padding_side == "right"
    r.padding_side = o.padding_side = "left"
    _same(r(TEXTS, padding=True), o(TEXTS, padding=True))
    # the processor pads on its own side (left), not the tokenizer's, in the reference too
    texts, audio = ["<sound>Key?", "<sound>Tempo of this one?"], [np.zeros(2 * SR, np.float32)] * 2
    r.padding_side = o.padding_side = "right"
    reference = transformers.MusicFlamingoProcessor.from_pretrained(str(ref_dir))
    reference.tokenizer.padding_side = "right"
    _same(reference(text=texts, audio=audio), MusicFlamingoProcessor(o)(texts, audio=audio))
    assert MusicFlamingoProcessor(o)(texts, audio=audio)["attention_mask"][0, 0] == 0
    o.padding_side = "left"
    o.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["padding_side"] == "left"
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.padding_side == load_tokenizer(tmp_path).padding_side == "left"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "middle"}))
    with pytest.raises(
        TokenizerError, match=r"tokenizer_config.json: padding_side='middle': expected 'left'"
    ):
        load_tokenizer(tmp_path)


def test_tokenizer_lookups_and_decoding_give_the_reference_output(ref, ours):
    """convert_tokens_to_ids / convert_ids_to_tokens / get_vocab / added_tokens_encoder / batch_decode were
    AttributeErrors; decode(one id) and decode(a batch) were TypeErrors; encode(add_special_tokens=) a TypeError."""
    r, o = ref.tokenizer, ours.tokenizer
    for tokens in ("<sound>", "Ċ", "not-a-token", ["<|im_end|>", "not-a-token", "a"], ("<|sound_bos|>",)):
        assert o.convert_tokens_to_ids(tokens) == r.convert_tokens_to_ids(tokens), tokens
    ids = o.encode(TEXTS[1])
    for x in (300, ids, torch.tensor(ids), 10**6):
        for skip in (False, True):
            assert o.convert_ids_to_tokens(x, skip_special_tokens=skip) == r.convert_ids_to_tokens(
                x, skip_special_tokens=skip
            ), (x, skip)
    assert o.get_vocab() == r.get_vocab() and len(o.get_vocab()) == len(o) == len(r)
    assert list(o.added_tokens_encoder.items()) == list(r.added_tokens_encoder.items())
    rows = torch.tensor([ids[:6], ids[-6:]])
    for skip in (False, True):
        assert o.decode(300, skip_special_tokens=skip) == r.decode(300, skip_special_tokens=skip)
        assert o.decode(rows, skip_special_tokens=skip) == r.decode(rows, skip_special_tokens=skip)
        assert o.decode(rows[0], skip_special_tokens=skip) == r.decode(rows[0], skip_special_tokens=skip)
        assert o.batch_decode(rows, skip_special_tokens=skip) == r.batch_decode(
            rows, skip_special_tokens=skip
        )
        assert o.batch_decode(rows.tolist(), skip) == r.batch_decode(rows.tolist(), skip_special_tokens=skip)
        kw = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": False}
        assert o.batch_decode(rows, **kw) == r.batch_decode(rows, **kw) and o.decode(ids, **kw) == r.decode(
            ids, **kw
        )
    for add in (True, False):
        for t in TEXTS:
            assert o.encode(t, add_special_tokens=add) == r.encode(t, add_special_tokens=add)
    names = ("eos_token", "eos_token_id", "pad_token", "pad_token_id", "bos_token", "bos_token_id")
    names += ("all_special_tokens", "all_special_ids", "padding_side")
    assert {n: getattr(o, n) for n in names} == {n: getattr(r, n) for n in names}


def test_tokenizer_refusals_name_what_to_use(ours):
    """What cannot give the reference's output is refused naming what to use (was an AttributeError)."""
    tok = ours.tokenizer
    conv = [{"role": "user", "content": "Key?"}]
    with pytest.raises(
        NotImplementedError, match=r"processor.apply_chat_template\(conversation, tokenize=False"
    ):
        tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"truncation='only_second' is not supported"):
        tok(TEXTS, truncation="only_second", max_length=4)
    with pytest.raises(ValueError, match=r"padding='max_len' is not supported"):
        tok(TEXTS, padding="max_len")
    with pytest.raises(ValueError, match=r"return_tensors='pt' with rows of .* tokens: pass padding=True"):
        tok(TEXTS, return_tensors="pt")
    with pytest.raises(ValueError, match=r"text must be a string or a non-empty list of strings"):
        tok([])
    with pytest.raises(ValueError, match=r"clean_up_tokenization_spaces=True is not supported"):
        tok.batch_decode([[1, 2]], clean_up_tokenization_spaces=True)


def test_sentencepiece_tokenizer_takes_the_same_calls(tmp_path):
    """The from-scratch SentencePiece tokenizer offers the same calls (no reference: checked by hand)."""
    tok = train_sentencepiece(["Tempo 96 BPM in C major.", "A minor, slow."] * 20, 300, tmp_path)
    ids = tok.encode("Tempo<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == ids[-1]
    assert tok.convert_ids_to_tokens(ids)[-1] == "<|im_end|>"
    assert "<|im_end|>" not in tok.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tok.get_vocab()["<|im_end|>"] == tok.eos_token_id and len(tok.get_vocab()) == len(tok)
    assert tok.added_tokens_encoder["<|endoftext|>"] == tok.pad_token_id
    out = tok(["Tempo", "A minor, slow."], padding=True, padding_side="left", return_tensors="pt")
    n = len(tok.encode("Tempo"))
    assert out["input_ids"][0, -n:].tolist() == tok.encode("Tempo")
    assert (out["input_ids"][0, :-n] == tok.pad_token_id).all() and out["attention_mask"][0].sum() == n
    assert tok.decode(ids[-1], skip_special_tokens=False) == "<|im_end|>"
    assert tok.batch_decode([ids, ids[:1]]) == [tok.decode(ids), tok.decode(ids[:1])]


def _conv(seconds=2):
    audio = np.zeros(seconds * SR, np.float32)
    return [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Key?"}]}
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p(["<sound>a"], audio=[np.zeros(2 * SR, np.float32)], padding_side="right", **_TK_LEFT),
        lambda p: p.apply_chat_template(_conv(), padding_side="right", **_TK_LEFT),
        lambda p: p.apply_chat_template(_conv(), processor_kwargs={"padding_side": "right", **_TK_LEFT}),
        lambda p: p(["a", "bb"], text_kwargs={"padding": True}, padding="longest"),
        lambda p: p(["a"], common_kwargs={"output_labels": False}, output_labels=True),
    ],
)
def test_contradictory_duplicate_options_are_refused(ours, ref, call):
    """padding_side="right" with text_kwargs={"padding_side": "left"} ran with "left" without a word; the reference
    raises ("passed two times"); now the keyword and both values are named."""
    with pytest.raises(ValueError, match=r"is given twice with different values \(.*: give it once"):
        call(ours)
    with pytest.raises(ValueError, match=r"passed two times"):
        ref(text=["<sound>a"], audio=[np.zeros(2 * SR, np.float32)], padding_side="right", **_TK_LEFT)


_TK_LEFT = {"text_kwargs": {"padding_side": "left"}}


def test_options_given_once_still_apply(ref, ours):
    """The None defaults change nothing: text_kwargs alone, an argument alone and the same value twice are taken."""
    texts = ["<sound>Key?", "<sound>Tempo of this longer one?"]
    audio = [np.zeros(2 * SR, np.float32), np.zeros(3 * SR, np.float32)]
    for kw in ({"padding_side": "right"}, {"text_kwargs": {"padding_side": "right"}}, {}):
        _same(ref(text=texts, audio=audio, **kw), ours(texts, audio=audio, **kw))
    same = ours(texts, audio=audio, padding_side="right", text_kwargs={"padding_side": "right"})
    assert same["attention_mask"][0, 0] == 1 and same["attention_mask"][0, -1] == 0
    assert ours(texts, audio=audio)["attention_mask"][0, 0] == 0  # left by default
    assert "labels" not in ours(texts, audio=audio) and "labels" in ours(
        texts, audio=audio, output_labels=True
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": False},
        {"truncation": True, "max_length": 8},
        {"processor_kwargs": {"padding": False, "audio": []}},
        {"text_kwargs": ["padding"]},
        {"return_assistant_tokens_mask": True},
        {"load_audio_from_video": True},
        {"return_tensors": "np", "sampling_rate": 8000},
    ],
)
def test_tokenize_false_renders_whatever_the_tokenization_keywords(ref, ours, kw):
    """With tokenize=False nothing is tokenized: these were refused here while the reference renders the text."""
    conv = _conv()
    expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **kw)
    assert ours.apply_chat_template(conv, tokenize=False, **kw) == expected


def test_tokenize_false_still_refuses_unknown_keywords(ours):
    """A misspelt keyword would change the text without a word (the reference takes it as a template variable)."""
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['add_generation_promt'\]"):
        ours.apply_chat_template(_conv(), tokenize=False, add_generation_promt=False)
