"""Shards written with ``--processor`` store each record's token count and the digest of the settings it holds for:
a launch with that processor takes the counts and tokenizes nothing (it parsed and tokenized every record on every
rank, ~0.4 ms each: minutes per launch at a million clips); other settings fall back to the estimate with a warning;
shards without counts are estimated as before. The counts used are the estimate's, exactly."""

import json
import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("litdata")

from musicflamingo.chat import ChatEncoder  # noqa: E402
from musicflamingo.data.shards import RECORDS, ShardDataset, ShardError, ShardRecords, read_shard_records  # noqa: E402
from musicflamingo.processor import MusicFlamingoProcessor  # noqa: E402
from musicflamingo.tokenizer import load_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_data_shards import _mixed_manifest, litdata_cache  # noqa: E402,F401
from tiny_assets import write_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """A processor saved to a folder (what ``--processor`` reads) and one whose window settings differ."""
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    p = MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0)
    folder = tmp_path_factory.mktemp("proc")
    p.save_pretrained(folder, overwrite=True)
    other = MusicFlamingoProcessor(
        tok, chunk_length=1.0, max_audio_len=2.0
    )  # 2.6 s clips count fewer windows
    return p, folder, other


@pytest.fixture
def written(processors, tmp_path):
    """The mixed manifest (segments, two audios, text only, missing / NaN / corrupt audio) written twice: without
    and with ``--processor``."""
    from musicflamingo.data.__main__ import main

    manifest = _mixed_manifest(tmp_path / "data")
    main(["shard", str(manifest), str(tmp_path / "old"), "--chunk-bytes", "20kB"])
    main(
        ["shard", str(manifest), str(tmp_path / "new"), "--chunk-bytes", "20kB", "--workers", "2"]
        + ["--processor", str(processors[1])]
    )
    return tmp_path / "old", tmp_path / "new"


def _entries(folder: Path) -> list[dict]:
    records = read_shard_records(str(folder))
    return [records.entry(i) for i in range(len(records))]


def test_counts_stored_and_used_without_tokenizing(processors, written, monkeypatch, caplog):
    p, _, _ = processors
    old, new = written
    assert all("tokens" not in e and "counted_with" not in e for e in _entries(old))
    stored = _entries(new)
    assert all(isinstance(e["tokens"], int) and len(e["counted_with"]) == 16 for e in stored)
    estimate = ShardDataset(old, p, bad_sample_policy="skip").estimate_lengths()  # parsed and tokenized
    assert [e["tokens"] for e in stored] == estimate  # stored = today's estimate, NaN/missing audio included

    def boom(*args, **kwargs):
        raise AssertionError("tokenized at launch")

    monkeypatch.setattr(ChatEncoder, "num_tokens", boom)
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.shards"):
        assert ShardDataset(new, p, bad_sample_policy="skip").estimate_lengths() == estimate
    assert "stored token counts" not in caplog.text  # no fallback
    assert "2 records hold audio of no known length" in caplog.text  # still warned (missing, corrupt)
    with pytest.raises(AssertionError, match="tokenized at launch"):  # the old shards do tokenize
        ShardDataset(old, p, bad_sample_policy="skip").estimate_lengths()


def test_other_settings_fall_back_to_the_estimate_with_one_warning(processors, written, caplog):
    p, _, other = processors
    old, new = written
    want = ShardDataset(old, other, bad_sample_policy="skip").estimate_lengths()
    assert want != [e["tokens"] for e in _entries(new)]  # the stored counts would be wrong here
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.shards"):
        assert ShardDataset(new, other, bad_sample_policy="skip").estimate_lengths() == want
    warned = [r.getMessage() for r in caplog.records if "stored token counts" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        f"{new}: 7 records' stored token counts were made with other"
    )
    assert "--processor <data.processor folder> --overwrite" in warned[0]


def test_shards_without_counts_are_estimated_as_before(processors, written, caplog):
    p, _, _ = processors
    old, _ = written
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.shards"):
        lengths = ShardDataset(old, p, bad_sample_policy="skip").estimate_lengths()
    assert f"{old}: no stored token counts; estimating 7 records' lengths" in caplog.text
    assert "other processor settings" not in caplog.text
    assert len(lengths) == 7 and all(n > 0 for n in lengths)


def test_a_stored_count_that_is_not_a_number_is_estimated(processors, written):
    """A count damaged into a string (or a bool) is not taken: the entry is estimated instead."""
    p, _, _ = processors
    _, new = written
    texts = [json.dumps({**e, "tokens": "12"}).encode() for e in _entries(new)]
    ds = ShardDataset(new, p, bad_sample_policy="skip")
    want = ds.estimate_lengths()
    ds.records = ShardRecords(texts, f"{new}/{RECORDS}")
    assert ds.estimate_lengths() == want


def test_texts_reads_blocks_across_chunks_and_names_a_changed_record(
    processors, written, monkeypatch, tmp_path
):
    """``ShardRecords.texts`` (what a launch reads every record through) gives each record's text as ``text(i)``
    does, across blocks and chunk files, local or spooled (an object store's); a record changed after the set was
    opened is named, as ``text(i)`` names it, not taken."""
    p, _, _ = processors
    _, new = written
    monkeypatch.setattr(
        "musicflamingo.data.shards._BLOCK", 2
    )  # 7 records: blocks end inside and at chunk ends
    for url in (str(new), f"local:{new}"):
        records = read_shard_records(url, cache_dir=str(tmp_path / "cache"))
        assert list(records.texts()) == [records.text(i) for i in range(len(records))]
    ds = ShardDataset(new, p, bad_sample_policy="skip")
    assert len(ds.records._chunks) > 1  # several chunk files read across
    chunk = Path(ds.records._chunks[-1])
    data = bytearray(chunk.read_bytes())
    at = data.rindex(b'"tokens": ') + len(b'"tokens": ')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # another count, the same length
    chunk.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"record 6 is no longer the one read at the start"):
        ds.estimate_lengths()
