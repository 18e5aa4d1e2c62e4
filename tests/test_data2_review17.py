"""Review round 17 (second data pass), a large manifest and shards under SIGKILLed jobs, long files and odd segments:
a killed job's spooled shard records are removed at the next open (a live job's never), a segment past its file's
end is named with its manifest line, raw AAC longer than the kept seconds is indexed by its length (not as
unreadable), and an undecodable shard sample's reason names no in-memory buffer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
from test_data_review17 import _ffmpeg
from test_data_shards import _line, litdata_cache, processor  # noqa: F401 (fixtures)
from tiny_assets import make_tone, write_audio

from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest

# A process that flocks a file (as a spool's writer does) and then either stays alive or is SIGKILLed
_HOLDER = """
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
os.write(fd, b'{"index": 0, "x": 1}')
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


def _holder(path, mode):  # noqa: ANN001, ANN202
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    if mode == "kill":
        assert proc.wait(timeout=30) == -signal.SIGKILL
    return proc


def test_a_killed_jobs_spooled_records_go_at_the_next_open_and_a_live_jobs_stay(tmp_path):
    """An object store's records are copied to `.musicflamingo-records-*.bin` in the temporary folder and removed by
    an exit handler, which a SIGKILLed (or out-of-memory killed) job never runs: each killed launch left its copy
    (hundreds of MiB for millions of records) for good. Now each copy is flocked while its process lives, and the
    next open removes those nobody holds; a live job's copy (whatever its pid) and other files stay."""
    from musicflamingo.data import shards as shards_module

    folder = tmp_path / "tmp"
    folder.mkdir()
    here = f".musicflamingo-records-{shards_module._spool_host()}-"
    dead = folder / f"{here}k1ll3d.bin"
    _holder(dead, "kill")
    assert dead.exists()  # the killed job's copy, its lock gone with it
    live = folder / f"{here}l1v3.bin"
    holder = _holder(live, "hold")
    # another machine's (a shared folder's locks may be local to each machine), and files not spools
    others = [
        folder / ".musicflamingo-records-elsewhere-k1ll3d.bin",
        folder / f"{here}x.txt",
        folder / "mine.bin",
    ]
    for p in others:
        p.write_bytes(b"keep")
    text = b'{"index": 0, "id": "r0"}'
    try:
        records = shards_module._spooled_records("s3://b/set/records", iter([text]), str(folder))
        assert not dead.exists()
        assert live.exists() and all(p.exists() for p in others)
        # this process's own copy is held too: a second open (another shard set) leaves it
        again = shards_module._spooled_records("s3://b/other/records", iter([text]), str(folder))
        assert records.text(0) == text and again.text(0) == text
        mine = sorted(folder.glob(f"{here}*.bin"))
        assert len(mine) == 3 and live in mine  # the live job's and this process's two
        assert not list(folder.glob("*.new"))  # created under a temporary name, renamed once locked
    finally:
        holder.kill()
        holder.wait()
        for p in folder.glob(f"{here}*.bin"):
            if p != live:
                shards_module._remove_spool(str(p), os.getpid())
    # the holder has ended: its copy is now a dead job's
    shards_module._spooled_records("s3://b/set/records", iter([text]), str(folder))
    assert not live.exists() and all(p.exists() for p in others)
    for p in folder.glob(f"{here}*.bin"):
        shards_module._remove_spool(str(p), os.getpid())


def test_a_segment_past_its_files_end_is_named_with_its_manifest_line(processor, tmp_path, caplog):  # noqa: F811
    """A manifest segment running past its audio's end warned naming the audio file only: in a manifest of a
    million lines, with several segments of one long file, the record to fix could not be found. The warning now
    names the record's `manifest:line` too."""
    write_audio(tmp_path / "a.wav", make_tone(440.0, 1.0))
    lines = [_line("ok", {"path": "a.wav", "offset": 0.0, "duration": 0.5})]
    lines.append(_line("over", {"path": "a.wav", "offset": 0.5, "duration": 2.0}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = read_manifest(tmp_path / "m.jsonl")
    ds = ConversationDataset(records, processor)
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        ds[0], ds[1]
    warned = [r.getMessage() for r in caplog.records if "runs past the end" in r.getMessage()]
    assert len(warned) == 1
    assert records[1].source.endswith("m.jsonl:2")
    assert f"a.wav ({records[1].source}): the segment [0.5, 2.5) s runs past the end" in warned[0]


@pytest.fixture(scope="module")
def long_aac(tmp_path_factory):  # noqa: ANN001, ANN201
    """A raw ADTS AAC clip of 6.3 s (no length in any header), longer than the tiny processor's 4 kept seconds."""
    d = tmp_path_factory.mktemp("aac")
    src = write_audio(d / "s.wav", make_tone(330.0, 6.3, sr=44100), sr=44100)
    _ffmpeg(src, d / "s.aac", "-c:a", "aac", "-f", "adts")
    (d / "m.jsonl").write_text(_line("long", "s.aac") + "\n", encoding="utf-8")
    return d


def test_raw_aac_longer_than_the_kept_seconds_is_indexed_by_its_length(
    processor,  # noqa: F811
    long_aac,
    tmp_path,
    caplog,
):
    """The index build decoded a raw AAC clip (no header length) only up to the kept 20 minutes and stored NaN for
    a longer one: every launch decoded it again and warned that it "could not be read" (it reads fine), and the
    build counted it as unreadable audio. The build decodes further (an hour), so the row holds its length."""
    from musicflamingo.data.index import StoredIndex, build_index, load_manifest

    manifest = shutil.copytree(long_aac, tmp_path / "d") / "m.jsonl"
    built = len(ConversationDataset(read_manifest(manifest), processor)[0]["input_ids"])
    assert build_index(manifest, processor).unreadable_audio == 0
    (seconds,) = StoredIndex.read(manifest.parent / "m.jsonl.index.parquet").seconds()
    assert 6.0 < seconds[0] < 6.7  # the clip's own length, not the 4 s kept
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.index"):
        found = load_manifest(manifest, processor, index="require")
    assert found.tokens.tolist() == [built]
    assert not [r for r in caplog.records if "could not be read" in r.getMessage()]


def test_a_stored_lower_bound_is_decoded_again_by_a_processor_keeping_more(
    processor,  # noqa: F811
    long_aac,
    tmp_path,
    monkeypatch,
):
    """A clip longer than the decode cap is stored as exactly the cap, a lower bound: exact for a processor keeping
    less, decoded again (not counted short) by one keeping more. The cap is lowered to 5 s here."""
    from musicflamingo.data import dataset as dataset_module
    from musicflamingo.data import index as index_module

    monkeypatch.setattr(dataset_module, "DECODED_SECONDS_CAP", 5.0)
    manifest = shutil.copytree(long_aac, tmp_path / "d") / "m.jsonl"
    assert index_module.build_index(manifest, processor).unreadable_audio == 0
    (seconds,) = index_module.StoredIndex.read(manifest.parent / "m.jsonl.index.parquet").seconds()
    assert seconds[0] == 5.0
    built = len(ConversationDataset(read_manifest(manifest), processor)[0]["input_ids"])
    assert index_module.load_manifest(manifest, processor, index="require").tokens.tolist() == [built]
    more = type(processor)(processor.tokenizer, chunk_length=1.0, max_audio_len=8.0)  # keeps the whole 6.3 s
    longer = ConversationDataset(read_manifest(manifest), more)
    stale = index_module.load_manifest(manifest, more)  # counts of other settings: the durations are used
    assert (stale.tokens < 0).all() and stale.seconds == {0: [5.0]}
    assert longer.estimate_lengths(stale.tokens, stale.seconds) == [len(longer[0]["input_ids"])]


def test_an_undecodable_shard_samples_reason_names_no_in_memory_buffer(tmp_path):
    """A shard sample's audio is decoded from its bytes: libsndfile's refusal read "soundfile: Error opening
    <_io.BytesIO object at 0x7f0e1d0e5440>: Format not recognised." in the reason written to bad_samples.jsonl (an
    address, different in every worker). The reason names the file and what each decoder said."""
    from musicflamingo.audio.io import AudioError, load_audio

    with pytest.raises(AudioError) as e:
        load_audio(str(tmp_path / "junk.m4a"), data=b"\x00junk" * 40)
    assert str(e.value).startswith(f"{tmp_path / 'junk.m4a'}: cannot decode audio (soundfile: ")
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value), str(e.value)
    assert json.dumps(str(e.value))  # one readable line


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory):  # noqa: ANN001, ANN201
    """A manifest of a WAV, a zero-byte MP3 and an m4a cut to its first third (its index atom lost: ffmpeg itself
    cannot decode it)."""
    d = tmp_path_factory.mktemp("undecodable")
    src = write_audio(d / "a.wav", make_tone(440.0, 1.5, sr=44100), sr=44100)
    whole = _ffmpeg(src, d / "whole.m4a", "-c:a", "aac").read_bytes()
    (d / "cut.m4a").write_bytes(whole[: len(whole) // 3])
    (d / "empty.mp3").write_bytes(b"")
    lines = [_line("wav", "a.wav"), _line("empty", "empty.mp3"), _line("cut", "cut.m4a")]
    (d / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "m.jsonl"


def test_an_index_build_names_the_first_audio_it_could_not_read(
    processor,  # noqa: F811
    undecodable,
    tmp_path,
    caplog,
):
    """The build printed "2 with unreadable audio" and nothing else: which of a million files to look at, it did
    not say. It now warns naming the first such audio file and its record's manifest line."""
    from musicflamingo.data.index import build_index

    manifest = shutil.copytree(undecodable.parent, tmp_path / "d") / "m.jsonl"
    with caplog.at_level(logging.WARNING, logger="musicflamingo.data.index"):
        assert build_index(manifest, processor).unreadable_audio == 2
    warned = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warned) == 1
    assert (
        f"2 records have audio that could not be read (first: {manifest.parent / 'empty.mp3'}, " in warned[0]
    )
    assert f"{manifest}:2)" in warned[0]


def test_the_shard_writer_names_audio_it_cannot_decode(undecodable, caplog):
    """The shard writer decodes audio no header or container states the length of; one that does not decode at all
    (a zero-byte MP3, an m4a cut short) was stored without a word, to be named only when trained on. It is warned
    about as the record is written, naming the record's manifest line and the decoders' reasons."""
    from dataclasses import asdict

    from musicflamingo.data import shards as shards_module

    records = read_manifest(undecodable)
    with caplog.at_level(logging.WARNING, logger="musicflamingo.data.shards"):
        texts = [json.loads(shards_module._record_item((i, asdict(r)))) for i, r in enumerate(records)]
    assert [t["seconds"][0] is None for t in texts] == [False, True, True]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert warned[0].startswith(f"{records[1].source}: {records[1].audios[0].path}: the file is empty")
    assert warned[1].startswith(f"{records[2].source}: {records[2].audios[0].path}: cannot decode audio")
    assert all(w.endswith("written as it is, a bad sample when trained on") for w in warned)


def test_shards_holding_audio_of_no_known_length_say_so_when_batched(
    processor,  # noqa: F811
    undecodable,
    tmp_path,
    caplog,
    litdata_cache,  # noqa: F811
):
    """Shards estimate from the seconds stored with each record; a record whose audio had none (it did not decode
    when written, or a raw AAC clip in shards an older version wrote) was counted as no audio without a word: a
    long clip passed the batch budget. Batching now warns, naming the first such audio and its manifest line."""
    from musicflamingo.data.shards import ShardDataset, write_shards

    out = tmp_path / "set"
    write_shards(undecodable, str(out))
    shards = ShardDataset(str(out), processor, bad_sample_policy="skip")
    with caplog.at_level(logging.WARNING, logger="musicflamingo.data.shards"):
        lengths = shards.estimate_lengths()
    assert lengths[1] == lengths[2] < lengths[0]  # no audio counted
    warned = [r.getMessage() for r in caplog.records if "no known length" in r.getMessage()]
    assert len(warned) == 1
    first = read_manifest(undecodable)[1]
    assert (
        f"2 records hold audio of no known length (first: {first.audios[0].path}, {first.source})"
        in warned[0]
    )
