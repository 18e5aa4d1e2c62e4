"""Review round 14, shard and compact records: DDP fingerprints over every record, shards changed after writing,
remote URLs."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import asdict

import numpy as np
import pytest
from test_data_shards import _even_manifest, litdata_cache, processor  # noqa: F401 (fixtures)

from musicflamingo.data import shards as shards_module
from musicflamingo.data.datamodule import records_fingerprint
from musicflamingo.data.manifest import AudioRef, CompactRecords, Message, Record
from musicflamingo.data.shards import ShardDataset, ShardError, ShardRecords, write_shards


# ---------------------------------------------------------------------------------------------- fingerprints
def _records(n: int, edited: int | None = None) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            audios=[AudioRef(f"/data/{i}.flac")],
            messages=[
                Message("user", "<sound>Describe the track."),
                Message("assistant", f"tone {i}" + (" (edited)" if i == edited else "")),
            ],
            source=f"/data/train.jsonl:{i + 1}",
        )
        for i in range(n)
    ]


def _shard_records(records: list[Record]) -> ShardRecords:
    texts = [json.dumps({"index": i, **asdict(r), "seconds": [1.0]}).encode() for i, r in enumerate(records)]
    return ShardRecords(texts, where="shards/records")


@pytest.mark.parametrize("kind", ["shards", "compact"])
def test_ranks_reading_sets_that_differ_in_any_record_get_other_fingerprints(kind):
    """ShardRecords and CompactRecords kept no per-record digests, so a rank's fingerprint covered the count and 1024
    spread records: two ranks whose shard sets differed in a record outside those trained on other data unnoticed.
    Now every record's digest is kept (8 bytes a record) and compared, as for JSONL manifests."""
    n = 3000
    sampled = set(np.unique(np.linspace(0, n - 1, num=1024).astype(np.int64)).tolist())
    edited = next(i for i in range(n // 2, n) if i not in sampled)  # a record the old fingerprint never read
    make = _shard_records if kind == "shards" else CompactRecords
    base, same, other = make(_records(n)), make(_records(n)), make(_records(n, edited=edited))
    assert records_fingerprint(base) == records_fingerprint(same)
    assert records_fingerprint(base) != records_fingerprint(other)
    assert base.digests.dtype == np.dtype("<u8") and base.digests.shape == (n,)
    assert np.flatnonzero(base.digests != other.digests).tolist() == [edited]
    assert [r.id for r in other[edited - 1 : edited + 1]] == [f"r{edited - 1}", f"r{edited}"]


# ---------------------------------------------------------------------------------------------- changed shards
@pytest.fixture
def two_writes(tmp_path):
    """Two shard sets of 4 one-chunk samples each, of manifests that differ only in their ids (same audio)."""
    out = []
    for name in ("a", "b"):
        manifest = _even_manifest(tmp_path / f"m{name}", 4, prefix=name)
        write_shards(manifest, str(tmp_path / f"s{name}"), chunk_bytes=20000)
        out.append(tmp_path / f"s{name}")
    return out


def _read_all(folder, processor):  # noqa: F811
    ds = ShardDataset(folder, processor)
    return [ds[i] for i in range(len(ds))]


def test_a_shard_changed_after_writing_is_named_not_trained_on(processor, two_writes, tmp_path):  # noqa: F811
    """Each of these read without error and trained on the wrong audio: a chunk copied from another write (the
    same size), bytes zeroed inside a chunk (WAV samples decode either way), a grown chunk, a records/ half of
    another write of as many records. Now the sample's digests (of its bytes, of its record) and the chunk's size
    written in index.json name the folder, the chunk and what changed."""
    a, b = two_writes
    assert len(_read_all(a, processor)) == 4
    chunk = "chunk-0-2.bin"
    assert (a / chunk).stat().st_size == (b / chunk).stat().st_size

    other = tmp_path / "other_chunk"
    shutil.copytree(a, other)
    shutil.copy(b / chunk, other / chunk)
    ds = ShardDataset(other, processor)
    ds[1]
    with pytest.raises(
        ShardError, match=rf"{other}: audio sample 2 \(in {chunk}\) was written for another record"
    ):
        ds[2]

    zeroed = tmp_path / "zeroed"
    shutil.copytree(a, zeroed)
    data = bytearray((zeroed / chunk).read_bytes())
    data[-3000:-1000] = bytes(2000)
    (zeroed / chunk).write_bytes(bytes(data))
    with pytest.raises(
        ShardError, match=rf"audio sample 2 \(in {chunk}\) .* is damaged \(its bytes are not those written"
    ):
        ShardDataset(zeroed, processor)[2]

    grown = tmp_path / "grown"
    shutil.copytree(a, grown)
    size = (grown / chunk).stat().st_size
    with open(grown / chunk, "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(
        ShardError, match=rf"{chunk}: {size + 100} bytes, {size} when written \(it changed after"
    ):
        _read_all(grown, processor)

    records = tmp_path / "other_records"
    shutil.copytree(a, records)
    shutil.rmtree(records / "records")
    shutil.copytree(b / "records", records / "records")
    with pytest.raises(
        ShardError, match=r"audio sample 0 \(in chunk-0-0\.bin\) was written for another record"
    ):
        _read_all(records, processor)


def _old_audio_item(item):
    """The audio sample as written before the digests: index, count, sizes, bytes."""
    i, rec = item
    blobs = [shards_module._read_bytes(a) for a in rec["audios"]]
    return struct.pack(f"<QI{len(blobs)}Q", i, len(blobs), *map(len, blobs)) + b"".join(blobs)


_record_item = shards_module._record_item  # this code's, before a test replaces it


def _old_record_item(item):
    text = json.loads(_record_item(item))
    del text["digest"]
    return json.dumps(text, ensure_ascii=False)


def test_shards_written_before_the_digests_still_read(processor, tmp_path, monkeypatch):  # noqa: F811
    """A shard set written by the code before the digests reads back the same samples; its audio half beside a
    newer write's records/ (or the reverse) is refused as halves of different writes."""
    manifest = _even_manifest(tmp_path / "m", 3)
    write_shards(manifest, str(tmp_path / "new"), chunk_bytes=20000)
    with monkeypatch.context() as m:
        m.setattr(shards_module, "_audio_item", _old_audio_item)
        m.setattr(shards_module, "_record_item", _old_record_item)
        write_shards(manifest, str(tmp_path / "old"), chunk_bytes=20000)
    assert b'"digest"' not in b"".join(p.read_bytes() for p in (tmp_path / "old" / "records").glob("*.bin"))
    new, old = _read_all(tmp_path / "new", processor), _read_all(tmp_path / "old", processor)
    for x, y in zip(new, old):
        assert x.keys() == y.keys() and all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x)
    shutil.rmtree(tmp_path / "old" / "records")
    shutil.copytree(tmp_path / "new" / "records", tmp_path / "old" / "records")
    with pytest.raises(ShardError, match="the audio and records halves come from different writes"):
        _read_all(tmp_path / "old", processor)


# ---------------------------------------------------------------------------------------------- remote URLs
def test_urls_litdata_cannot_reach_are_refused_naming_them(processor, tmp_path, monkeypatch):  # noqa: F811
    """`shard m.jsonl https://host/set` wrote a local folder ./https:/host/set and reported success (litdata takes
    an unknown scheme for a relative path), and data.train=https://host/set said the folder
    <cwd>/https:/host/set did not exist; an s3:// URL without credentials raised botocore's bare
    "Unable to locate credentials", naming no URL."""
    pytest.importorskip("boto3")
    manifest = _even_manifest(tmp_path / "m", 1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardError, match=r"https://host/set: shards are written to s3://, gs://, r2:// URLs"):
        write_shards(manifest, "https://host/set")
    assert not (tmp_path / "https:").exists()
    with pytest.raises(
        ShardError, match=r"https://host/set/records: shards are read from s3://.* not https://"
    ):
        ShardDataset("https://host/set", processor)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(
        ShardError, match=r"s3://no-such-bucket/set/records: cannot read the shards there \(.*boto3"
    ):
        ShardDataset("s3://no-such-bucket/set", processor)
    with pytest.raises(ShardError, match=r"s3://no-such-bucket/set: cannot write the shards there \(.*boto3"):
        write_shards(manifest, "s3://no-such-bucket/set")
