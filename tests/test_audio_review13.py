"""Audio files as researchers feed them (review round 13): long multichannel files are read, averaged to mono and
resampled a block at a time, by soundfile and by ffmpeg (the whole [T, C] float32 array, then its mono, were held:
660 MB for 20 min of 48 kHz stereo, now 92 MB); a WAV or AIFF cut short warns as other truncated files do
(libsndfile quietly takes the length the file holds); a manifest segment past the end of its file is said; an empty
file read with a probe duration (serve's [0, limit + 1) s) is said to be empty, without a window it never asked for.

Every file is made here with soundfile, numpy and Debian's ffmpeg."""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import musicflamingo.audio.io as audio_io
from musicflamingo.audio.io import AudioError, load_audio

transformers = pytest.importorskip("transformers")
from transformers.audio_utils import load_audio as reference_load  # noqa: E402


def _noise(path: Path, seconds: float, sr: int, channels: int, fmt: str = "WAV", seed: int = 0) -> Path:
    """16-bit noise, different in every channel."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3000, 3000, (int(round(seconds * sr)), channels), dtype=np.int16)
    sf.write(str(path), x * np.arange(1, channels + 1, dtype=np.int16), sr, format=fmt, subtype="PCM_16")
    return path


@pytest.mark.parametrize("seconds, sr, channels", [(60.0, 48000, 6), (3.0, 192000, 2)])
def test_a_long_multichannel_file_is_averaged_and_resampled_a_block_at_a_time(
    tmp_path, monkeypatch, seconds, sr, channels
):
    """A 48 kHz 5.1 file held 24 bytes a frame of float32 channels at once, then 4 of mono, then the output (1.4 GB
    for 20 min; 660 MB for 20 min of stereo); read, averaged and resampled a block at a time, the peak is the 16-kHz
    output and a block, and the samples are still the reference reader's, bit for bit."""
    path = _noise(tmp_path / "long.wav", seconds, sr, channels)
    block = 1 << 20
    monkeypatch.setattr(audio_io, "_READ_BLOCK_BYTES", block, raising=False)
    tracemalloc.start()
    try:
        ours = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(ours, reference_load(str(path), 16000))
    if channels == 6:  # a whole-file read: 66 MiB of channels, 11 MiB of 48-kHz mono; the output is 3.7 MiB
        assert peak < 2 * ours.nbytes + 2 * block, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("fmt", ["WAV", "WAVEX", "AIFF", "RF64"])
def test_a_wav_or_aiff_cut_short_warns_naming_both_lengths(tmp_path, caplog, fmt):
    """A download cut at half: libsndfile reads the 1.5 s there are as if the file were whole (its header says
    3 s); FLAC and MP3 warned, WAV and AIFF said nothing."""
    whole = _noise(tmp_path / "whole.wav", 3.0, 44100, 2, fmt)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        assert load_audio(cut, duration=1.0).shape == (16000,)  # a segment in what is there: nothing to say
        assert not caplog.records
        x = load_audio(cut)
    np.testing.assert_array_equal(x, reference_load(str(cut), 16000))
    assert 1.4 < x.shape[0] / 16000 < 1.6
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and str(cut) in said[0] and "truncated" in said[0], said
    assert "its header says 3.00 s" in said[0] and "end at 1.5" in said[0], said


def test_a_wav_of_unknown_size_and_an_intact_one_do_not_warn(tmp_path, caplog):
    """A WAV that ffmpeg wrote to a pipe says 0xFFFFFFFF bytes of data (unknown, not 4 GB): it is not cut short."""
    whole = _noise(tmp_path / "whole.wav", 1.0, 44100, 2)
    raw = bytearray(whole.read_bytes())
    data_at = raw.index(b"data")
    raw[4:8] = raw[data_at + 4 : data_at + 8] = struct.pack("<I", 0xFFFFFFFF)
    piped = tmp_path / "piped.wav"
    piped.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        for path in (whole, piped):
            assert load_audio(path).shape == (16000,)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_an_empty_file_read_with_a_probe_duration_is_said_to_be_empty(tmp_path):
    """serve reads a file whose header gives no length as [0, limit + 1) s: an empty WAV said 'audio is empty
    (0 samples in [0.0, 1201.0) s)', a window the user never asked for. A span that holds nothing is still named."""
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError) as e:
        load_audio(empty, duration=1201.0)
    assert str(e.value) == f"{empty}: audio is empty (0 samples)"
    tone = _noise(tmp_path / "tone.wav", 1.0, 16000, 1)
    for offset in (0.0, 0.5):  # a duration under one sample at 16 kHz
        with pytest.raises(AudioError, match=rf"0 samples in \[{offset}, {offset + 1e-5}\) s"):
            load_audio(tone, offset=offset, duration=1e-5)


def test_a_segment_past_the_end_of_the_file_is_said(tmp_path, caplog):
    """A manifest's `{"offset": 2.5, "duration": 5}` on a 3-s file trained on 0.5 s without a word; ends within
    0.1 s of the file's (rounded annotations) and a cap that ends first say nothing more."""
    path = _noise(tmp_path / "a.wav", 3.0, 44100, 2)
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        assert load_audio(path, offset=2.5, duration=0.55).shape == (8000,)
        assert load_audio(path, offset=0.5, duration=100.0, max_seconds=2.0).shape == (32000,)
        assert not [r for r in caplog.records if "past the end" in r.getMessage()]
        assert load_audio(path, offset=2.5, duration=5.0).shape == (8000,)
    said = [r.getMessage() for r in caplog.records if "past the end" in r.getMessage()]
    assert said == [
        f"Audio {path}: the segment [2.5, 7.5) s runs past the end of the audio (3.00 s): keeping [2.5, 3.00) s."
    ]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command (make setup)")
def test_a_long_file_only_ffmpeg_reads_is_resampled_as_it_comes(tmp_path):
    """ffmpeg's mono blocks were all kept, joined (a second copy) and then resampled: for a 48 kHz file 3 times the
    16-kHz output, twice over. Now each block is resampled as it comes; the samples are the WAV's, bit for bit."""
    wav = _noise(tmp_path / "src.wav", 60.0, 48000, 6)
    mka = tmp_path / "long.mka"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), "-c:a", "pcm_s16le", str(mka)], check=True
    )
    tracemalloc.start()
    try:
        ours = load_audio(mka)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(ours, reference_load(str(wav), 16000))
    assert peak < 3 * ours.nbytes + (4 << 20), f"peak {peak / 2**20:.1f} MiB"  # 11 MiB of 48-kHz mono, twice
