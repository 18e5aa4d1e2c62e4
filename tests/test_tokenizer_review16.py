"""Review round 16, tokenizer: the incremental decoder's work per token stays bounded through a run of special
tokens that decoding skips (each such token decoded the whole run again: quadratic in the run's length)."""

from __future__ import annotations

import pytest
from tiny_assets import write_tiny_tokenizer

from musicflamingo.tokenizer import IncrementalDecoder, load_tokenizer


class _Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tok) -> None:  # noqa: ANN001
        self.tok, self.decoded = tok, 0

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self.tok, name)

    def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001, ANN201
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens)


@pytest.mark.parametrize("skip", [True, False])
def test_a_run_of_special_tokens_costs_each_token_a_bounded_decode(tmp_path, skip):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    special = sorted(tok.special_token_ids)[0]
    text = tok.encode("a slow ballad in A minor, étude 🎵")
    ids = text[:5] + [special] * 400 + text[5:] + [special] * 3
    counting = _Counting(tok)
    dec = IncrementalDecoder(counting, skip_special_tokens=skip)
    out = "".join(dec.push(t) for t in ids) + dec.flush()
    assert out == tok.decode(ids, skip)  # the same text as decoding it whole
    assert dec.ids == ids  # every token kept (AnswerText.kept_tokens reads them)
    if skip:
        # a few ids of window per token (left context), not the run so far: 400 specials cost nothing
        assert counting.decoded <= 12 * len(text), counting.decoded
