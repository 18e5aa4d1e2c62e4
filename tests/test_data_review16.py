"""Review round 16, shard records at scale: a local shard set's records are held as their places in the records/
chunk files (16 bytes a record), not as their text; same records, order, digests and errors as read through
litdata."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_shards import _even_manifest, litdata_cache, processor  # noqa: F401 (fixtures)

from musicflamingo.data.datamodule import records_fingerprint
from musicflamingo.data.shards import ShardDataset, ShardError, ShardRecords, read_shard_records, write_shards


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """7 records over several records/ chunks (and as many audio chunks), written once."""
    tmp = tmp_path_factory.mktemp("written")
    out = tmp / "shards"
    write_shards(_even_manifest(tmp / "m", 7), str(out), chunk_bytes=900)
    assert len(list((out / "records").glob("chunk-*.bin"))) >= 3
    return out


@pytest.fixture
def shard_set(written, tmp_path):
    """A copy of ``written`` of this test's own (tests change chunks)."""
    return shutil.copytree(written, tmp_path / "shards")


def _through_litdata(folder) -> ShardRecords:
    """The records read sample by sample through litdata into memory (how every shard set was read before)."""
    from litdata import StreamingDataset

    where = f"{folder}/records"
    ds = StreamingDataset(where)
    return ShardRecords([ds[i].encode("utf-8") for i in range(len(ds))], where)


def _held_bytes(records: ShardRecords) -> tuple[int, int]:
    """(bytes of the numpy arrays, bytes of the bytes/str values) a ShardRecords holds."""
    arrays = text = 0
    for value in vars(records).values():
        if isinstance(value, np.ndarray):
            arrays += value.nbytes
        elif isinstance(value, (bytes, bytearray)):
            text += len(value)
        elif isinstance(value, list):
            text += sum(len(v) for v in value if isinstance(v, (bytes, str)))
    return arrays, text


def test_a_local_shard_sets_records_are_held_as_offsets_not_their_text(shard_set, processor):  # noqa: F811
    """ShardRecords held every record's JSON text (104 MiB per rank and worker at 200k records; ~45 s to read a
    million of them record by record through litdata at every launch). A local folder's records are now their
    offsets in the chunk files and their digests: 16 bytes a record, the text read on access."""
    records = read_shard_records(str(shard_set))
    n = len(records)
    text_size = sum(p.stat().st_size for p in (shard_set / "records").glob("chunk-*.bin"))
    assert text_size > 250 * n
    arrays, text = _held_bytes(records)
    # the chunk files' paths are the only text held; no buffer of records
    chunks = len(list((shard_set / "records").glob("chunk-*.bin")))
    assert text <= chunks * (len(str(shard_set / "records" / "chunk-0-0.bin")) + 2)
    assert not any(isinstance(v, (bytes, bytearray)) for v in vars(records).values())
    assert arrays <= 16 * n + 8 * (
        chunks + 1
    )  # offsets (2 x uint32) and digest (uint64) per record, chunk starts
    # ... and a ShardDataset over the folder uses them
    assert not any(
        isinstance(v, (bytes, bytearray)) for v in vars(ShardDataset(shard_set, processor).records).values()
    )


def test_records_read_from_chunk_offsets_equal_litdatas(shard_set, processor):  # noqa: F811
    """Same records in the same order, same digests (DDP fingerprint), same stored record digests and seconds as the
    text read through litdata; a ShardDataset gives the same samples and lengths as over the litdata path."""
    on_disk, in_memory = read_shard_records(str(shard_set)), _through_litdata(shard_set)
    assert len(on_disk) == len(in_memory) == 7
    assert on_disk.digests.dtype == np.dtype("<u8")
    assert np.array_equal(on_disk.digests, in_memory.digests)
    assert records_fingerprint(on_disk) == records_fingerprint(in_memory)
    for i in range(-7, 7):
        assert on_disk.parse(i) == in_memory.parse(i)
        assert on_disk.record_digest(i) == in_memory.record_digest(i) is not None
    assert [r.id for r in on_disk] == [f"c{i}" for i in range(7)]
    assert on_disk[2:5] == in_memory[2:5]
    with pytest.raises(IndexError, match="record 7 out of range for 7 records"):
        on_disk[7]
    local = ShardDataset(shard_set, processor)
    remote = ShardDataset(f"local:{shard_set}", processor)  # the object-store path: litdata, text in memory
    assert local.estimate_lengths() == remote.estimate_lengths()
    for i in (6, 0, 3):
        a, b = local[i], remote[i]
        assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_a_records_chunk_changed_after_opening_is_named_not_read_at_its_old_offsets(shard_set):
    """Records are read from the chunk files on access: a chunk rewritten under a running job (an --overwrite of
    the folder, a copy) is named with the record, not parsed from shifted bytes."""
    records = read_shard_records(str(shard_set))
    with open(shard_set / "records" / "index.json", encoding="utf-8") as f:
        listed = json.load(f)["chunks"]
    chunk = str(shard_set / "records" / listed[1]["filename"])  # the second chunk and its first record
    first_of_chunk = int(listed[0]["chunk_size"])
    with open(chunk, "rb") as f:
        data = bytearray(f.read())
    at = data.find(b"tone ")
    data[at : at + 5] = b"TONE "  # the chunk's first record: as long as before
    with open(chunk, "wb") as f:
        f.write(data)
    assert records[first_of_chunk - 1].id == f"c{first_of_chunk - 1}"  # another chunk's record still reads
    with pytest.raises(ShardError, match=rf"{chunk}: record {first_of_chunk} is no longer the one read"):
        records[first_of_chunk]
    os.unlink(chunk)
    with pytest.raises(ShardError, match=rf"{chunk}: cannot read record {first_of_chunk}"):
        records.record_digest(first_of_chunk)


@pytest.mark.parametrize("damage", ["utf8", "index", "cut_char"])
def test_a_damaged_records_chunk_gives_the_errors_it_gave(shard_set, damage):
    """A records/ chunk whose bytes are no UTF-8, or whose record is not the one at its place, is named as the
    litdata path named it (the chunk index falls back to it for anything it does not expect)."""
    chunk = shard_set / "records" / "chunk-0-0.bin"
    data = bytearray(chunk.read_bytes())
    where = f"{shard_set}/records"
    if damage == "utf8":
        at = data.find(b'"messages"')
        data[at : at + 4] = b"\xff" * 4
        expected = rf"{where}: entry 0 is not a record's text \('utf-8' codec can't decode byte 0xff"
    elif damage == "index":
        at = data.find(b'{"index": 0,')
        data[at : at + 12] = b'{"index": 9,'
        expected = rf"{where}: entry 0 is b'{{\"index\": 9, "
    else:  # record 0's last byte made the lead byte of a 2-byte character (what follows: a size, or the end)
        end = struct.unpack_from("<I", data, 8)[
            0
        ]  # litdata's offsets table: count, then where each sample ends
        assert data[end - 1 : end] == b"}"  # the end of its JSON object
        data[end - 1] = 0xC3
        expected = rf"{where}: entry 0 is not a record's text"
    chunk.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=expected):
        read_shard_records(str(shard_set))


# ---------------------------------------------------------------------------------------------- writer cleanup
@pytest.mark.timeout(120)
def test_a_writer_killed_where_litdatas_internals_are_not_hooked_is_still_an_error(tmp_path, monkeypatch):
    """A killed writing process was told only by hooks on litdata 0.2.76's internals (requirements say
    litdata>=0.2.76): under a litdata whose internals are named otherwise, the hooks were skipped without a word and
    the set was written short of the killed process's samples, the command printing {"records": 6}. Each half's
    sample count is now checked after writing, whatever litdata's internals."""
    from test_data_review15 import FAIL_SCRIPT

    # no hook applied (as when every hooked name is gone), the audio of record 3 killing its writing process
    script = "import contextlib\nfrom musicflamingo.data import shards\n"
    script += "shards._interruptible = contextlib.nullcontext\n" + FAIL_SCRIPT
    manifest = _even_manifest(tmp_path / "data", 6)
    out = tmp_path / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIL_IN": "audio", "FAIL_AT": "3", "KILLED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    # output to files: without the hooks the killed process's uploader is left holding them (a pipe never ends)
    with open(tmp_path / "out", "w") as o, open(tmp_path / "err", "w") as e:
        cmd = [sys.executable, "-c", script, "shard", str(manifest), str(out), "--workers", "2"]
        proc = subprocess.Popen(cmd, env=env, stdout=o, stderr=e, start_new_session=True)
        try:
            rc = proc.wait(timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the run left behind
            proc.wait()
    stdout, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert rc == 2 and '"records"' not in stdout, stdout + err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: the audio half holds "), err[-3000:]
    assert "samples for 6 records: a writing process ended without writing its share" in line
    assert "the shards there are incomplete: write them again with --overwrite" in line


def test_a_litdata_without_the_hooked_internals_is_warned_about(monkeypatch, caplog):
    from litdata.processing.data_processor import DataProcessor

    from musicflamingo.data import shards

    monkeypatch.delattr(DataProcessor, "_stop_chunk_writers")  # renamed in another litdata
    with caplog.at_level("WARNING", logger="musicflamingo.data.shards"), shards._interruptible():
        pass
    assert "has no DataProcessor._stop_chunk_writers" in caplog.text
    assert "a write short of its samples is still refused" in caplog.text


@pytest.mark.timeout(120)
def test_a_failing_writer_leaves_no_process_where_proc_cannot_be_read(tmp_path, monkeypatch):
    """The processes a failed writing process left (litdata's uploader, holding the command's output open) were
    found in /proc only: where there is none (macOS) they were left waiting forever and `shard ... | tee log` never
    ended. Each writing process's own process group is now ended too."""
    import test_data_review15 as r15

    script = "from musicflamingo.data import shards\nshards._descendants = lambda pids: []  # no /proc\n"
    monkeypatch.setattr(r15, "FAIL_SCRIPT", script + r15.FAIL_SCRIPT)
    manifest = _even_manifest(tmp_path / "data", 6)
    out = tmp_path / "shards"
    args = ["shard", str(manifest), str(out), "--workers", "2"]
    rc, _stdout, err, left = r15._run_failing(tmp_path, args, FAIL_IN="audio", FAIL_AT="3")
    assert not left, f"processes left running: {left}; {err[-2000:]}"
    assert rc == 2, err[-3000:]
    assert "(id 'c3'): writing the shards to" in err.strip().splitlines()[-1]
