"""Review 18 (the tokenizer in a researcher's own data scripts): calls written for transformers' Qwen2 tokenizer,
each compared with ``AutoTokenizer`` read from the same folder. ``encode(text, return_tensors="pt")`` and
``encode(text, text_pair)`` were TypeErrors (SentencePiece took the pair as ``add_special_tokens`` and dropped it);
``truncation=True, max_length=`` and ``padding="max_length"`` were refused; ``special_tokens_map``,
``model_max_length``, ``unk_token``, ``tokenize`` and ``add_tokens`` were AttributeErrors.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from musicflamingo.tokenizer import TokenizerError, load_tokenizer, train_sentencepiece

transformers = pytest.importorskip("transformers")

TEXTS = ["Key?", "What is the tempo of this <sound> piece?<|im_end|>", "<|im_start|>user\nA minor , 92 bpm"]


def _same(r, o):
    if isinstance(r, torch.Tensor) or isinstance(r, np.ndarray):
        assert type(o) is type(r) and o.dtype == r.dtype and o.tolist() == r.tolist()
        return
    if not hasattr(r, "keys"):  # transformers' BatchEncoding is a UserDict
        assert o == r
        return
    assert sorted(r.keys()) == sorted(o.keys())
    for k in r:
        _same(r[k], o[k])


@pytest.mark.parametrize(
    "kw",
    [
        {"return_tensors": "pt"},
        {"return_tensors": "np"},
        {"truncation": True, "max_length": 4},
        {"max_length": 3},  # max_length alone truncates, as there
        {"truncation": "longest_first", "max_length": 5, "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 40, "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 40, "padding_side": "left"},
        {"padding": True, "max_length": 3},  # max_length ignored with padding=True and no truncation
        {"truncation": True},  # model_max_length (8192 in the folder): nothing to cut
    ],
)
def test_encode_takes_transformers_keywords(ref_dir, kw):
    """encode(text, return_tensors="pt") and the truncation keywords were TypeErrors."""
    r, o = transformers.AutoTokenizer.from_pretrained(str(ref_dir)), load_tokenizer(ref_dir)
    for text in TEXTS:
        _same(r.encode(text, **kw), o.encode(text, **kw))


@pytest.mark.parametrize(
    "kw",
    [
        {"truncation": True, "max_length": 4, "padding": True, "return_tensors": "pt"},
        {"max_length": 6},
        {"truncation": "only_first", "max_length": 5, "padding": "max_length", "return_tensors": "np"},
        {"padding": "max_length", "max_length": 12},  # rows longer than max_length stay whole, as there
        {"truncation": True, "max_length": 5, "padding": "max_length", "padding_side": "left"},
    ],
)
def test_call_truncates_and_pads_to_max_length_as_transformers(ref_dir, kw):
    """tokenizer(texts, truncation=True, max_length=n) was refused; it gives transformers' rows now, and
    truncation_side="left" (set on the object) keeps the ends, as there."""
    r, o = transformers.AutoTokenizer.from_pretrained(str(ref_dir)), load_tokenizer(ref_dir)
    for text in (TEXTS, TEXTS[1]):
        _same(r(text, **kw), o(text, **kw))
    r.truncation_side = o.truncation_side = "left"
    _same(r(TEXTS, **kw), o(TEXTS, **kw))


def test_text_pairs_follow_transformers(ref_dir, tmp_path):
    """encode(a, b) was a TypeError for tokenizer.json and silently dropped b for SentencePiece (read as
    add_special_tokens); a pair's ids follow the text's as Qwen2's; encode(text, True) names add_special_tokens."""
    r, o = transformers.AutoTokenizer.from_pretrained(str(ref_dir)), load_tokenizer(ref_dir)
    assert o.encode("Key?", "C major") == r.encode("Key?", "C major")
    _same(r(TEXTS[:2], TEXTS[1:], padding=True), o(TEXTS[:2], TEXTS[1:], padding=True))
    sp = train_sentencepiece(["Tempo 96 BPM in C major.", "A minor, slow."] * 20, 300, tmp_path)
    assert sp.encode("Tempo", "A minor") == sp.encode("Tempo") + sp.encode("A minor")
    with pytest.raises(ValueError, match=r"second argument is text_pair.*add_special_tokens=True by name"):
        o.encode("Key?", True)
    with pytest.raises(ValueError, match=r"truncation=True of a text pair past 2 tokens is not supported"):
        o("Key?", "C major", truncation=True, max_length=2)
    with pytest.raises(ValueError, match=r"text_pair must be a string .* or a list of 3 strings"):
        o(TEXTS, ["a"])


def test_named_tokens_and_lengths_as_transformers(ref_dir, tmp_path):
    """special_tokens_map, model_max_length, unk_token(_id), truncation_side and tokenize were AttributeErrors."""
    r, o = transformers.AutoTokenizer.from_pretrained(str(ref_dir)), load_tokenizer(ref_dir)
    names = ("special_tokens_map", "model_max_length", "unk_token", "unk_token_id", "truncation_side")
    names += ("all_special_tokens", "all_special_ids")
    assert {n: getattr(o, n) for n in names} == {n: getattr(r, n) for n in names}
    for text in TEXTS:
        assert o.tokenize(text) == r.tokenize(text)
    # a folder without model_max_length: transformers' "no limit", so truncation=True cuts nothing
    config = json.loads((ref_dir / "tokenizer_config.json").read_text())
    folder = tmp_path / "nolimit"
    shutil.copytree(ref_dir, folder)
    config.pop("model_max_length")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    r, o = transformers.AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder)
    assert o.model_max_length == r.model_max_length
    _same(r(TEXTS, truncation=True, padding="max_length"), o(TEXTS, truncation=True, padding="max_length"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": "long"}))
    with pytest.raises(TokenizerError, match=r"model_max_length='long': expected a positive number"):
        load_tokenizer(folder)
    with pytest.raises(ValueError, match=r"max_length=0: expected a positive whole number"):
        o("Key?", max_length=0)
    sp = train_sentencepiece(["Tempo 96 BPM in C major.", "A minor, slow."] * 20, 300, tmp_path / "sp")
    assert sp.unk_token_id == 0 and sp.special_tokens_map["unk_token"] == sp.unk_token == "<unk>"
    with pytest.raises(
        NotImplementedError, match=r"SentencePieceTokenizer cannot add tokens: train it again"
    ):
        sp.add_tokens(["<think>"])


ADDED_TEXT = "a <think>tempo<x> b</think> <sound>"


def _add(tok):
    n = tok.add_tokens(["<think>", "tempo"]), tok.add_tokens("<x>", special_tokens=True)
    return (*n, tok.add_tokens(["<think>"]), tok.add_tokens([]))


@pytest.mark.parametrize("declared", [False, True])
def test_add_tokens_as_transformers_and_saved_where_it_reads_them(ref_dir, tmp_path, declared):
    """add_tokens was an AttributeError. The new ids, len(), encode and decode are transformers'; save_pretrained
    writes them so that AutoTokenizer reads the same ids, also from a folder whose tokenizer_config.json lists
    added_tokens_decoder (older transformers, the released checkpoint's layout): a stale list there made
    transformers read the new tokens as text pieces."""
    folder = tmp_path / "src"
    shutil.copytree(ref_dir, folder)
    if declared:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        tokens = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        config["added_tokens_decoder"] = {str(t["id"]): {**entry, "content": t["content"]} for t in tokens}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    r, o = transformers.AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder)
    assert _add(o) == _add(r) == (2, 1, 0, 0)
    assert len(o) == len(r) == 306 and o.vocab_size == r.vocab_size
    ids = r.encode(ADDED_TEXT)
    assert o.encode(ADDED_TEXT) == ids and o.tokenize(ADDED_TEXT) == r.tokenize(ADDED_TEXT)
    for skip in (True, False):
        assert o.decode(ids, skip_special_tokens=skip) == r.decode(ids, skip_special_tokens=skip)
    assert list(o.added_tokens_encoder.items()) == list(r.added_tokens_encoder.items())
    o.save_pretrained(tmp_path / "saved")
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert again.encode(ADDED_TEXT) == ids and len(again) == 306
    assert load_tokenizer(tmp_path / "saved").encode(ADDED_TEXT) == ids


def test_processor_attributes_and_conversation_keyword_as_transformers(ref, ours):
    """apply_chat_template(conversation=...) (transformers' name) was a TypeError (missing 'conversations');
    processor.model_input_names and processor.chat_template were AttributeErrors."""
    conv = [{"role": "user", "content": "Key?"}]
    text = ref.apply_chat_template(conversation=conv, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(conversation=conv, tokenize=False) == text
    ids = ref.apply_chat_template(conversation=[conv], tokenize=True, return_dict=True)["input_ids"]
    assert torch.equal(
        ours.apply_chat_template(conversation=[conv], add_generation_prompt=False)["input_ids"], ids
    )
    assert ours.model_input_names == ref.model_input_names
    assert ours.chat_template == ref.chat_template


def test_encode_of_what_is_not_a_string_is_named(ref_dir, tmp_path):
    """encode(["a", "b"]) was a bare TypeError ("TextInputSequence must be str") from tokenizer.json's library and
    a list of id lists from SentencePiece's (a batch where one text's ids were expected)."""
    sp = train_sentencepiece(["Tempo 96 BPM in C major.", "A minor, slow."] * 20, 300, tmp_path)
    for tok in (load_tokenizer(ref_dir), sp):
        for args in ((["Key?", "Tempo"],), ("Key?", ["Tempo"]), ([42, 68],)):
            with pytest.raises(
                ValueError, match=r"encode takes one string .* tokenizer\(texts\)\['input_ids'\]"
            ):
                tok.encode(*args)
