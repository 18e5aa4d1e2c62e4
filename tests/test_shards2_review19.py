"""Follow-ups on shards that store token counts (0654124): an error tokenizing a record is reported as itself, not
as a damaged shard; the counts' digest has its own version, so an index-format change keeps them valid; the data
module's length line says whether its lengths were stored or estimated."""

import json
import logging
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("litdata")

from musicflamingo.chat import ChatEncoder  # noqa: E402
from musicflamingo.data.index import counts_digest  # noqa: E402
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
    # stored counts: nothing tokenized
    assert ShardDataset(new, p, bad_sample_policy="skip").estimate_lengths()


def test_counts_outlive_an_index_change_not_a_counting_one(processors, written, monkeypatch, caplog):  # noqa: F811
    """The counts' digest has its own version: bumping INDEX_VERSION (an index-format change) keeps every stored
    count (it made them all 'other processor settings' and tokenized every record at every launch); bumping
    COUNTS_VERSION does not, and the warning says counting may be why. Shards written by 0654124 (both 1) keep
    their digest."""
    from musicflamingo.data import index

    p, _, _ = processors
    _, new = written
    settings = index.index_settings(p, None, "")  # counts_digest as 0654124 computed it (INDEX_VERSION 1)
    del settings["hashes"], settings["audio_root"]
    assert index.INDEX_VERSION == 1 and counts_digest(p) == index._digest(
        json.dumps(settings, sort_keys=True)
    )
    stored = ShardDataset(new, p, bad_sample_policy="skip").estimate_lengths()

    def boom(*args, **kwargs):
        raise AssertionError("tokenized at launch")

    with monkeypatch.context() as m:
        m.setattr(index, "INDEX_VERSION", 2)
        m.setattr(ChatEncoder, "num_tokens", boom)
        assert ShardDataset(new, p, bad_sample_policy="skip").estimate_lengths() == stored
    monkeypatch.setattr(index, "COUNTS_VERSION", 2)
    with caplog.at_level(logging.WARNING, logger="musicflamingo.data.shards"):
        assert ShardDataset(new, p, bad_sample_policy="skip").estimate_lengths() == stored  # estimated anew
    assert "7 records' stored token counts were made with other processor settings" in caplog.text
    assert "or by an older way of counting" in caplog.text


def _length_line(train, processor, caplog, record_filter=None) -> str:
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    dm = MusicFlamingoDataModule(
        train=str(train),
        processor=processor,
        batch_max_tokens=100_000,
        num_workers=0,
        bad_sample_policy="skip",
        record_filter=record_filter,
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.datamodule"):
        dm.setup("fit")
    (line,) = [r.getMessage() for r in caplog.records if " tokens (" in r.getMessage()]
    return line


def test_the_length_line_says_stored_or_estimated(processors, written, tmp_path, caplog):  # noqa: F811
    """The data module's 'N records, T tokens (...)' line said 'estimated' of every data set, even one whose
    lengths were all stored counts (nothing tokenized): it says which, or how many of each."""
    from musicflamingo.data.index import build_index

    p, _, other = processors
    old, new = written
    assert _length_line(new, p, caplog).endswith(" tokens (stored counts)")
    assert _length_line(new, other, caplog).endswith(" tokens (estimated)")  # counts for other settings
    assert _length_line(old, p, caplog).endswith(" tokens (estimated)")  # written without --processor
    manifest = tmp_path / "data" / "m.jsonl"
    assert _length_line(manifest, p, caplog).endswith(" tokens (estimated)")  # no index
    unread = build_index(manifest, p).unreadable_audio  # their rows hold no count: estimated at each launch
    assert 0 < unread < 7
    assert _length_line(manifest, p, caplog).endswith(
        f" tokens ({7 - unread} stored counts, {unread} estimated)"
    )
    # under a record filter, of the records it keeps: both are read ones, with counts in the index
    kept = _length_line(manifest, p, caplog, record_filter=lambda r: r.id in ("flac", "text"))
    assert re.search(r": 2 records, \d+ tokens \(stored counts\)$", kept), kept
