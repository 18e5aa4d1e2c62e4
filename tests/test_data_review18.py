"""Review round 18 (data journey 3), a researcher's own folder of songs indexed and trained on: one long raw AAC
file behind several records is decoded once by an index build (not once per record, each warning that it keeps an
hour), libmpg123's resync notes on a damaged MP3 are captured (the file is named once, by our warning) rather than
printed to the terminal at every read, an MP3 whose decoder gives up mid-file is decoded by ffmpeg (it was a tenth
of the song), and shard-record spool files of the version that named no host are cleaned up."""

from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch
from test_data2_review17 import long_aac  # noqa: F401 (fixture)
from test_data_review17 import _ffmpeg
from test_data_shards import _line, processor  # noqa: F401 (fixtures)
from tiny_assets import make_tone, write_audio


def test_one_long_raw_aac_behind_several_records_is_decoded_once_by_an_index_build(
    processor,  # noqa: F811
    long_aac,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """A song with several conversations (a record per question) in raw AAC, which no header times: the build
    decoded the file up to the hour's cap once per record (an hour of AAC each) and warned each time that it was
    "keeping its first 3600 s" (nothing is kept: the cap bounds a measurement). Now once, without that warning;
    the rows hold the same length. The cap is lowered to 5 s to stand for the hour."""
    from musicflamingo.data import dataset as dataset_module
    from musicflamingo.data import index as index_module

    monkeypatch.setattr(dataset_module, "DECODED_SECONDS_CAP", 5.0)
    d = shutil.copytree(long_aac, tmp_path / "d")
    (d / "m.jsonl").write_text("".join(_line(f"q{i}", "s.aac") + "\n" for i in range(4)), encoding="utf-8")
    decoded = []
    real = dataset_module.load_audio

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        decoded.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_audio", counting)
    with caplog.at_level(logging.INFO):
        report = index_module.build_index(d / "m.jsonl", processor)
    assert report.computed == 4 and report.unreadable_audio == 0
    assert len(decoded) == 1, decoded
    assert not [r for r in caplog.records if "keeping its first" in r.getMessage()]
    rows = index_module.StoredIndex.read(d / "m.jsonl.index.parquet").seconds()
    assert rows == [[5.0]] * 4
    # the file replaced (another size and mtime): decoded again, not taken from the earlier result
    shutil.copy(long_aac / "s.wav", d / "s.aac")
    assert dataset_module.decoded_seconds(str(d / "s.aac"), 16000) == 5.0
    assert len(decoded) == 2


def _damaged_mp3s(d):  # noqa: ANN001, ANN202
    """A 3-s tone as a 64 kbit/s MP3, and copies damaged: random bytes over its first frames, over a stretch of
    its middle, and over 100 bytes every 1500 (the same bytes at every run)."""
    src = write_audio(d / "tone.wav", make_tone(440.0, 3.0))
    mp3 = _ffmpeg(src, d / "tone.mp3", "-c:a", "libmp3lame", "-b:a", "64k")
    good = mp3.read_bytes()
    rng = np.random.default_rng(0)
    out = {}
    for name, spans in {
        "head": [(400, 2000)],
        "middle": [(len(good) // 3, 3000)],
        "stretches": [(k, 100) for k in range(2000, len(good) - 200, 1500)],
    }.items():
        b = bytearray(good)
        for at, n in spans:
            b[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        out[name] = d / f"{name}.mp3"
        out[name].write_bytes(bytes(b))
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):  # noqa: ANN001, ANN201
    return _damaged_mp3s(tmp_path_factory.mktemp("damaged"))


def test_libmpg123s_notes_are_captured_and_the_damaged_file_is_named_once(
    damaged, capfd, caplog, monkeypatch
):
    """libmpg123 printed "Note: Illegal Audio-MPEG-Header ...", "Note: Trying to resync...", "[src/libmpg123/
    parse.c:wetwork():1349] error: Giving up resync ..." straight to the terminal at each header read and each
    decode of a damaged MP3 (thousands of lines for an index build of a bad folder, again at every epoch). Now they
    are captured: each read names the file once, in our warning, with the first note; nothing else reaches
    stderr. What else is written to stderr meanwhile still gets there."""
    from musicflamingo.audio import io as audio_io

    for name, path in damaged.items():
        capfd.readouterr()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
            audio_io.audio_duration(path)
            x = audio_io.load_audio(path)
        err = capfd.readouterr().err
        assert "Note:" not in err and "mpg123" not in err, (name, err)
        named = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
        assert len(named) == 1 and "Illegal Audio-MPEG-Header" in named[0], (name, named)
        assert "does not exist" not in named[0], named[
            0
        ]  # libsndfile's words for a file whose frames are bad
        assert len(x) > 16000, name
    # a line of ours written to stderr while a capture runs is not lost with libmpg123's
    real = audio_io._decode_soundfile

    def speaking(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.write(2, b"a line of ours\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(audio_io, "_decode_soundfile", speaking)
    audio_io.load_audio(damaged["middle"])
    err = capfd.readouterr().err
    assert "a line of ours" in err and "Note:" not in err


def test_an_mp3_whose_decoder_gives_up_mid_file_is_decoded_by_ffmpeg(damaged, caplog, monkeypatch):
    """libmpg123 stopped at the first of a run of damaged stretches and soundfile returned what it had: 0.15 s of
    a 3-s song was trained on (the index, from the header, counted 3 s). ffmpeg resyncs past them: most of the song
    comes back, and the warning says which decoder stopped where."""
    from musicflamingo.audio.io import load_audio

    path = damaged["stretches"]
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        x = load_audio(path)
    assert len(x) > 2.0 * 16000, len(x) / 16000
    said = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(said) == 1 and "stopped at" in said[0] and "ffmpeg decoded" in said[0], said
    # no other decoder reads it: what libmpg123 decoded is kept, as before, and said so
    from musicflamingo.audio import io as audio_io

    def refusing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("not today")

    monkeypatch.setattr(audio_io, "_read_ffmpeg", refusing)
    monkeypatch.setattr(audio_io, "_read_torchcodec", refusing)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        y = load_audio(path)
    assert 0 < len(y) < 0.5 * 16000
    said = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(said) == 1 and "no other decoder read it" in said[0] and "not today" in said[0], said


def test_spooled_records_of_the_version_that_named_no_host_are_cleaned_once_unused(tmp_path):
    """Jobs of the version before the locked spool files (commit 41f4f68) wrote `.musicflamingo-records-XXXXXXXX.bin`
    (mkstemp's eight letters, no host, no lock): the cleanup matched only names with this machine's host, so each
    such file killed or left stayed for good. They go once nothing read or wrote them for a week (a live job of that
    version reads its records at every sample); recent ones, and other files, stay."""
    from musicflamingo.data import shards as shards_module

    folder = tmp_path / "tmp"
    folder.mkdir()
    week_ago = time.time() - 8 * 86400
    old = folder / ".musicflamingo-records-k1ll3d_x.bin"
    recent = folder / ".musicflamingo-records-r3cent_x.bin"
    kept = [
        recent,
        folder / ".musicflamingo-records-elsewhere-k1ll3d.bin",  # another machine's locked kind
        folder / ".musicflamingo-records-k1ll3d_x.txt",
        folder / "k1ll3d_x.bin",
    ]
    for p in [old, *kept]:
        p.write_bytes(b"x")
    for p in [old, *kept[1:]]:
        os.utime(p, (week_ago, week_ago))
    shards_module._spooled_records("s3://b/set/records", iter([b'{"index": 0}']), str(folder))
    assert not old.exists()
    assert all(p.exists() for p in kept)


def test_a_song_longer_than_the_kept_seconds_is_warned_about_once_not_at_every_read(
    processor,  # noqa: F811
    tmp_path,
    caplog,
):
    """Three conversations about one 6-s song (the tiny processor keeps 4 s, as the real one keeps 20 min of an
    hour-long mix): every read warned "lasts 6.0 s: keeping its first 4 s", for each record at every epoch. Now
    the first read does; the samples are the same."""
    from musicflamingo.data.dataset import ConversationDataset
    from musicflamingo.data.manifest import read_manifest

    write_audio(tmp_path / "mix.wav", make_tone(330.0, 6.0))
    write_audio(tmp_path / "short.wav", make_tone(330.0, 2.0))
    lines = [_line(f"q{i}", "mix.wav") for i in range(3)] + [_line("s", "short.wav")]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = ConversationDataset(read_manifest(tmp_path / "m.jsonl"), processor)
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        first = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]  # the next epoch
    said = [r.getMessage() for r in caplog.records if "keeping its first" in r.getMessage()]
    assert said == [f"Audio {tmp_path / 'mix.wav'} lasts 6.0 s: keeping its first 4 s."]
    for a, b in zip(first, again):
        assert torch.equal(a["input_features"], b["input_features"])
    assert first[0]["input_features"].shape[0] == 4 and first[3]["input_features"].shape[0] == 2


def test_an_audio_path_written_from_the_working_directory_is_named_as_such(
    processor,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """Relative audio paths resolve against the manifest's folder (README), not the working directory. A manifest
    written with paths from where it was made (`data/audio/a.wav` in `data/m.jsonl`) read `data/data/audio/a.wav:
    audio file not found`, in the index build's warning and in every bad sample, leaving the researcher to guess.
    Now both say which folder relative paths resolve against and that the path names a file from the working
    directory; a manifest-relative path loads, and a file missing from both says nothing more."""
    from musicflamingo.data.dataset import ConversationDataset
    from musicflamingo.data.index import build_index
    from musicflamingo.data.manifest import read_manifest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "audio").mkdir(parents=True)
    write_audio(tmp_path / "data" / "audio" / "a.wav", make_tone(440.0, 1.0))
    lines = [_line("ok", "audio/a.wav"), _line("cwd", "data/audio/a.wav"), _line("gone", "audio/b.wav")]
    (tmp_path / "data" / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="musicflamingo.data.index"):
        assert build_index("data/m.jsonl", processor).unreadable_audio == 2
    (said,) = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert "data/data/audio/a.wav, data/m.jsonl:2" in said
    assert "resolve against the manifest's folder, data/" in said and "data/audio/a.wav is a file" in said
    ds = ConversationDataset(read_manifest("data/m.jsonl"), processor, bad_sample_policy="skip")
    assert ds[0]["id"] == "ok"
    cwd, gone = ds[1], ds[2]
    assert cwd.reason.startswith("data/data/audio/a.wav: audio file not found (relative audio paths resolve")
    assert "data/audio/a.wav is a file" in cwd.reason
    assert gone.reason == "data/audio/b.wav: audio file not found"
