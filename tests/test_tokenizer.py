"""Tokenizers: byte-level BPE parity with transformers, SentencePiece training round trip, CLI."""

import json
import subprocess
import sys

import pytest
from tiny_assets import _CORPUS, SPECIAL_TOKENS, TINY_IDS, write_tiny_tokenizer

from musicflamingo.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

STRINGS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<sound>What is it?<|im_end|>",
    "<|sound_bos|><sound><sound><sound><|sound_eos|>Describe the tempo.",
    "Line one\nline two\n\n\nthree\r\n\ttabbed   spaces  ",
    "Unicode: café, naïve, Ångström, 日本語の音楽, emoji 🎸🎹, ﬁ ligature, e\u0301 combining",
    "Numbers 128 BPM, 4/4, 3.14159 and don't, I'LL, they're",
    "",
    " ",
    "<|endoftext|>trailing<|im_end|>",
    "<sound",  # incomplete special token is plain text
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_hf_tokenizer_matches_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = load_tokenizer(tok_dir)
    assert isinstance(ours, HFTokenizer)
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == ref(s)["input_ids"], s
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s
    assert len(ours) == len(ref) == TINY_IDS.vocab_size and ours.vocab_size == ref.vocab_size
    assert ours.pad_token_id == ref.pad_token_id == TINY_IDS.pad_token_id
    assert ours.eos_token_id == ref.eos_token_id == TINY_IDS.eos_token_id


def test_hf_tokenizer_ids_and_exact_decode(tok_dir):
    tok = load_tokenizer(tok_dir)
    for name, expected in zip(SPECIAL_TOKENS, range(297, 303)):
        assert tok.token_to_id(name) == expected and tok.id_to_token(expected) == name
        assert tok.encode(name) == [expected]
    assert TINY_IDS.audio_token_id == tok.token_to_id("<sound>")
    assert tok.encode("\n") == [tok.token_to_id("Ċ")]
    for s in STRINGS:
        if "e\u0301" in s:  # NFC normalisation composes e + combining accent
            continue
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == s
    assert tok.decode(tok.encode(STRINGS[0])) == "system\nYou are a helpful assistant.\nuser\nWhat is it?"


def test_hf_tokenizer_save_reload(tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for s in STRINGS:
        assert again.encode(s) == tok.encode(s) == ref(s)["input_ids"]
    assert again.pad_token_id == ref.pad_token_id and again.eos_token_id == ref.eos_token_id


def test_sentencepiece_train_and_round_trip(tmp_path):
    tok = train_sentencepiece([_CORPUS] * 3, 400, tmp_path / "sp")
    again = load_tokenizer(tmp_path / "sp")
    assert isinstance(again, SentencePieceTokenizer)
    assert (tmp_path / "sp" / "tokenizer.model").is_file()
    assert json.loads((tmp_path / "sp" / "special_tokens.json").read_text())["eos_token"] == "<|im_end|>"
    assert [again.token_to_id(t) for t in SPECIAL_TOKENS] == [1, 2, 3, 4, 5, 6]
    assert again.pad_token_id == 1 and again.eos_token_id == 3 and again.vocab_size == tok.vocab_size <= 400
    for s in STRINGS:
        ids = again.encode(s)
        assert again.decode(ids, skip_special_tokens=False) == s, s
    ids = again.encode("<|im_start|>user\n<sound>Tempo?<|im_end|>")
    assert ids[0] == 2 and ids[-1] == 3 and 4 in ids
    assert again.decode(ids) == "user\nTempo?"


def test_sentencepiece_cli(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_CORPUS * 2, encoding="utf-8")
    out = tmp_path / "cli_tok"
    cmd = [sys.executable, "-m", "musicflamingo.tokenizer", "train", "--input", str(corpus)]
    res = subprocess.run(cmd + ["--vocab-size", "350", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(out)
    assert tok.encode("<sound>") == [4] and tok.decode(tok.encode("a tempo\n")) == "a tempo\n"


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(["abc"], 100, tmp_path / "sp")
