"""Review round 12, "records memory": what every rank and DataLoader worker holds of a JSONL manifest (offsets and
digests, not the file's text), reading records whose manifest changed under the run, record sequences sliced as
sequences are, and a killed forced index build's rerun after audio files changed again."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import time
import tracemalloc
from dataclasses import asdict

import numpy as np
import pytest
import test_data_review10
from test_data_review10 import _counting, _is_partial, _manifest, _Stop, _table
from tiny_assets import make_tone, write_audio

from musicflamingo.data import index as index_module
from musicflamingo.data import manifest as manifest_module
from musicflamingo.data.index import build_index, load_manifest
from musicflamingo.data.manifest import CompactRecords, JsonlRecords, ManifestError, read_manifest
from musicflamingo.data.shards import ShardRecords

# the processor fixtures of test_data_review10 (a tiny tokenizer, 1 s windows)
proc_dir, processor = test_data_review10.proc_dir, test_data_review10.processor


# ---------------------------------------------------------------------------------------------- JSONL records
def test_jsonl_records_hold_offsets_not_the_manifest_text(tmp_path):
    """JsonlRecords kept the whole file's bytes: 113 MiB per rank at 200k records (about 550 MB at a million), and
    a pickled copy (spawned workers) as large; now 32 bytes per record."""
    path = _manifest(tmp_path, 10_000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        records = JsonlRecords(path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 0.25 * size, (held, size)  # was 1.0 x: the text
    assert len(pickle.dumps(records)) < 0.25 * size
    listed = read_manifest(path)
    assert len(records) == len(listed) and [records[i] for i in (0, 1, 7_777, -1)] == [
        listed[i] for i in (0, 1, 7_777, -1)
    ]
    copy = pickle.loads(pickle.dumps(records))  # a spawned worker's: opens the file again
    assert copy[-1] == listed[-1] and copy[5] == listed[5]


def test_a_jsonl_manifest_is_read_in_blocks(tmp_path, monkeypatch):
    """Every rank read the whole file at once to split it (a 5 GB manifest: 5 GB on each rank at launch); now
    blocks of whole lines, with the same records as read_manifest's wherever a block ends."""
    path = _manifest(tmp_path, 20_000)
    size = path.stat().st_size
    monkeypatch.setattr(manifest_module, "_BLOCK", size // 10, raising=False)
    tracemalloc.start()
    try:
        records = JsonlRecords(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.6 * size, (peak, size)  # was 1.2 x
    assert records[-1] == read_manifest(path)[-1]

    monkeypatch.setattr(manifest_module, "_BLOCK", 7, raising=False)  # blocks end everywhere, mid-line too
    recs = [test_data_review10._record(i) for i in range(6)]
    recs[2]["conversations"][1]["content"] = "é — 音楽 " * 30
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    for name, text in {
        "bom_crlf_blank": "\ufeff" + "\r\n\n".join(lines) + "\r\n  \n",
        "no_last_newline": "\n\n" + "\n".join(lines),
        "cr_late": "\n".join(lines[:4])
        + "\r"
        + "\n".join(lines[4:]),  # the split falls back to the whole text
    }.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(text.encode())
        assert list(JsonlRecords(path)) == read_manifest(path), name
    (tmp_path / "blank.jsonl").write_text("\n \n" * 10)
    with pytest.raises(ManifestError, match="holds no records"):
        JsonlRecords(tmp_path / "blank.jsonl")
    (tmp_path / "list.jsonl").write_text("\n\n  " + json.dumps(recs))
    with pytest.raises(ManifestError, match="a JSON list, not JSONL"):
        JsonlRecords(tmp_path / "list.jsonl")


def _read_ids(records: JsonlRecords, which: list[int]) -> list[str]:
    return [records[i].id for i in which]


def test_jsonl_records_read_in_forked_workers_as_in_the_main_process(tmp_path):
    path = _manifest(tmp_path, 300)
    records = JsonlRecords(path)
    records[0]  # the main process reads first, then forks (as Lightning's DataLoader workers are)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.starmap(_read_ids, [(records, list(range(0, 300, 2))), (records, list(range(1, 300, 2)))])
    assert got == [[f"r{i}" for i in range(k, 300, 2)] for k in (0, 1)]


def test_a_manifest_edited_under_a_run_is_named_not_read_at_shifted_offsets(tmp_path):
    """Records are read by their byte offsets: an edit that moves them raises naming file:line instead of parsing
    another record's bytes (or half of two); lines appended, or the file replaced by a new one, change nothing for a
    process that opened it."""
    path = _manifest(tmp_path, 5)
    lines = path.read_text().splitlines(keepends=True)
    records = JsonlRecords(path)
    with open(path, "a") as f:  # appended: the records read stay where they were
        f.write(lines[0])
    assert [r.id for r in records] == [f"r{i}" for i in range(5)]

    moved = tmp_path / "new.jsonl"  # a new file moved over the manifest: this process keeps reading its own
    moved.write_text("".join(reversed(lines)))
    os.replace(moved, path)
    assert records[1].id == "r1"
    with pytest.raises(ManifestError, match=f"{path}:2: the manifest changed after it was read"):
        pickle.loads(pickle.dumps(records))[1]  # a copy opening the path finds another file

    records = JsonlRecords(path)  # edited in place: the first line longer shifts every other one
    assert records[4].id == "r0"
    with open(path, "r+") as f:
        f.write(lines[4].replace('"id": "r4"', '"id": "r4-longer"') + "".join(lines[3::-1]))
    for i in (0, 4):  # not the edited record's text, nor a slice of two records'
        with pytest.raises(
            ManifestError, match=f"{path}:{i + 1}: the manifest changed after it was read.*restart"
        ):
            records[i]


def test_jsonl_records_with_other_line_breaks_read_each_line_from_the_file(tmp_path):
    """CR, CRLF and form-feed breaks, a BOM and non-ASCII text: records read by their byte offsets are the ones
    read_manifest reads."""
    recs = [test_data_review10._record(i) for i in range(4)]
    recs[1]["conversations"][1]["content"] += " é — 音楽 \u2028 lyrics"
    for bom, sep in ((b"", "\r"), (b"\xef\xbb\xbf", "\r\n"), (b"", "\x0c\n\n")):
        path = tmp_path / f"m{len(sep)}{len(bom)}.jsonl"
        path.write_bytes(bom + "".join(json.dumps(r, ensure_ascii=False) + sep for r in recs).encode())
        assert list(JsonlRecords(path)) == read_manifest(path)


def test_json_list_records_hold_offsets_not_pickles(tmp_path, processor):
    """A JSON list's records were held as their pickles (CompactRecords): 1.3 times the file per rank, 150 MiB at
    200k records (about 750 MB at a million); now as JSONL's are, 32 bytes per record, read from the file."""
    n = 5000
    path = tmp_path / "m.json"
    path.write_text(json.dumps([test_data_review10._record(i) for i in range(n)], indent=1))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        records = load_manifest(path, processor, index="off").records
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 0.25 * size, (held, size)
    assert len(pickle.dumps(records)) < 0.25 * size
    listed = read_manifest(path)
    assert len(records) == n and list(records) == listed and records[7].source == f"{path}:{2 + 13 * 7}"
    text = path.read_text()
    path.write_text(text.replace('"id": "r0"', '"id": "r0-longer"'))  # every record after the first moves
    with pytest.raises(ManifestError, match=f"{path}:{2 + 13 * 7}: the manifest changed after it was read"):
        records[7]


# ---------------------------------------------------------------------------------------------- slices, indices
def _sequence(tmp_path, kind: str):
    path = _manifest(tmp_path / "m", 4)
    listed = read_manifest(path)
    if kind == "jsonl":
        return JsonlRecords(path)
    if kind == "json_list":
        listed_path = tmp_path / "m.json"
        listed_path.write_text(json.dumps([test_data_review10._record(i) for i in range(4)], indent=1))
        return manifest_module.JsonListRecords(listed_path)
    if kind == "compact":
        return CompactRecords(listed)
    return ShardRecords([json.dumps({**asdict(r), "seconds": []}).encode() for r in listed], where="shards")


@pytest.mark.parametrize("kind", ["jsonl", "json_list", "compact", "shards"])
def test_record_sequences_take_slices_and_any_integer_index(tmp_path, kind):
    """`records[1:3]` raised TypeError ('<=' not supported between int and slice) though they are Sequences."""
    records = _sequence(tmp_path, kind)
    ids = [f"r{i}" for i in range(4)]
    assert [r.id for r in records[1:3]] == ids[1:3]
    assert [r.id for r in records[::-1]] == ids[::-1] and [r.id for r in records[-2:]] == ids[-2:]
    assert records[5:] == [] and [r.id for r in records[:]] == ids
    assert [records[i].id for i in (-1, -4, np.int64(2), np.int32(-1))] == ["r3", "r0", "r2", "r3"]
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range"):
            records[bad]
    with pytest.raises(TypeError, match="integers or slices"):
        records[1.0]


# ---------------------------------------------------------------------------------------------- forced builds
def test_a_forced_rerun_recomputes_the_rows_whose_audio_changed_since_the_killed_forced_build(
    tmp_path, processor, monkeypatch
):
    """--force after replacing audio, killed; the audio replaced again; --force once more took the killed build's
    rows as they were: b.wav's old durations and counts in an index that says it is complete."""
    monkeypatch.setattr(
        index_module, "_CTIME_SLACK_NS", 0, raising=False
    )  # files written a moment ago count as older
    folder, straight = tmp_path / "m", tmp_path / "straight"
    for d in (folder, straight):
        write_audio(d / "a.wav", make_tone(440, 1.0))
        write_audio(d / "b.wav", make_tone(660, 1.0))
    path = _manifest(folder, 300, audio=["a.wav", "b.wav"])
    build_index(path, processor)
    time.sleep(0.05)
    _counting(monkeypatch, stop_after=270)
    with pytest.raises(_Stop):
        build_index(path, processor, force=True, save_every=0)
    assert _is_partial(path)  # 256 rows: 128 of a.wav, 128 of b.wav
    time.sleep(0.05)
    write_audio(folder / "b.wav", make_tone(660, 3.0))  # replaced in place again
    calls = _counting(monkeypatch)
    report = build_index(path, processor, force=True)
    assert report.reused == 128 and calls[0] == 300 - 128  # a.wav's rows kept, b.wav's recomputed
    write_audio(straight / "b.wav", make_tone(660, 3.0))
    build_index(_manifest(straight, 300, audio=["a.wav", "b.wav"]), processor)
    assert _table(path) == _table(straight / "m.jsonl")
