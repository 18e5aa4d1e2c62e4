"""Follow-ups on shards that store token counts (0654124): an error tokenizing a record is reported as itself, not
as a damaged shard; the counts' digest has its own version, so an index-format change keeps them valid; the data
module's length line says whether its lengths were stored or estimated."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("litdata")

from musicflamingo.chat import ChatEncoder  # noqa: E402
from musicflamingo.data.shards import ShardDataset, ShardError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_data_shards import litdata_cache  # noqa: E402,F401
from test_shards_review19 import processors, written  # noqa: E402,F401


def test_a_tokenizer_error_is_not_reported_as_a_damaged_shard(processors, written, monkeypatch):  # noqa: F811
    """Rewriting the shards would not fix a processor that cannot tokenize: its error surfaces as itself (it was
    'entry 0 is not a record this code wrote ... write the shards again')."""
    p, _, other = processors
    old, new = written

    def broken(*args, **kwargs):
        raise ValueError("the tokenizer's own complaint")

    monkeypatch.setattr(ChatEncoder, "num_tokens", broken)
    for shards, processor in ((old, p), (new, other)):  # no counts; counts for other settings
        with pytest.raises(ValueError, match="the tokenizer's own complaint") as caught:
            ShardDataset(shards, processor, bad_sample_policy="skip").estimate_lengths()
        assert not isinstance(caught.value, ShardError)
    assert ShardDataset(
        new, p, bad_sample_policy="skip"
    ).estimate_lengths()  # stored counts: nothing tokenized
