"""Review round 8 of the tokenizer: files that transformers reads otherwise than we do are said so."""

from __future__ import annotations

import logging

import pytest
from tiny_assets import write_tiny_tokenizer
from tokenizers import AddedToken, Tokenizer

from musicflamingo.tokenizer import HFTokenizer


@pytest.mark.parametrize("declared", [False, True])
def test_tokens_added_to_tokenizer_json_alone_are_named(tmp_path, caplog, declared):
    """`<think>` added with the `tokenizers` library (tokenizer.json only) is one id here but byte pieces in
    transformers, which follows tokenizer_config.json's added_tokens_decoder: a model fine-tuned here on that id
    never sees it from the reference processor. Said at load, naming the file and the tokens (silent before);
    tokens declared in both files load quietly."""
    import json

    import transformers

    d = write_tiny_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    tok.save(str(d / "tokenizer.json"))
    if declared:
        config = json.loads((d / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"][str(tok.token_to_id("<think>"))] = {
            "content": "<think>", "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": False,
        }  # fmt: skip
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    with caplog.at_level(logging.WARNING, logger="musicflamingo.tokenizer"):
        ours = HFTokenizer.from_dir(d)
    same = ours.encode("<think>hi") == ref("<think>hi").input_ids
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert same == declared  # what the warning is about: the two disagree exactly when undeclared
    if declared:
        assert not warned
    else:
        assert len(warned) == 1 and str(d) in warned[0] and "<think>" in warned[0]
        assert "added_tokens_decoder" in warned[0]
