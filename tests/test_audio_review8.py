"""Audio files as researchers have them (review round 8): formats only ffmpeg reads are averaged to mono and
resampled as soundfile's files are; a VBR MP3 without a Xing frame is decoded whole; truncated files warn; files
that are no audio are one line naming the file and what is wrong; odd names, extensions and links decode.

Every file is made here with soundfile and Debian's ffmpeg (``make setup`` installs it); the ffmpeg tests skip only
when the ``ffmpeg`` command is missing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musicflamingo.audio.io import AudioError, audio_duration, load_audio, resample

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="needs the ffmpeg command (make setup)"
)


def _noise(
    path: Path, seconds: float, sr: int, channels: int, subtype: str = "PCM_16", seed: int = 0
) -> Path:
    """Different noise in every channel (so a downmix that weights channels unequally shows)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(round(seconds * sr)), channels)) * 0.1 * np.arange(1, channels + 1)
    sf.write(str(path), np.clip(x, -1, 1).astype(np.float32), sr, subtype=subtype)
    return path


def _ffmpeg(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *args, str(dst)], check=True)
    return dst


def _mono_16k(path: Path) -> np.ndarray:
    """What the reference's soundfile reader gives: channels averaged, soxr HQ to 16 kHz."""
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(x.mean(axis=1), sr, 16000)


@needs_ffmpeg
@pytest.mark.parametrize(
    "suffix, codec, channels",
    [(".m4a", "alac", 2), (".mka", "pcm_s16le", 2), (".mka", "pcm_s16le", 6), (".mp4", "alac", 1)],
)
def test_formats_only_ffmpeg_reads_are_averaged_and_resampled_as_soundfile_files(
    tmp_path, suffix, codec, channels
):
    """Lossless audio in containers libsndfile cannot open (ALAC in m4a/mp4, PCM in Matroska) gives the samples of
    the same audio read from a WAV: the mean of the channels, soxr to 16 kHz. ffmpeg's `-ac 1 -ar 16000` gave
    (L + R) / sqrt(2) for stereo (3 dB louder), dropped 5.1's LFE and weighted its centre, and resampled with
    swr, not soxr."""
    wav = _noise(tmp_path / "src.wav", 1.5, 44100, channels)
    other = _ffmpeg(wav, tmp_path / f"clip{suffix}", "-c:a", codec)
    ours, expected = load_audio(other), _mono_16k(wav)
    assert ours.shape == expected.shape == (24000,)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    # a segment: the requested length, the whole file's samples away from the resampler's edges (Matroska keeps
    # millisecond timestamps, so ffmpeg's seek there lands within a few samples: only the length is checked)
    seg = load_audio(other, offset=0.5, duration=0.5)
    assert seg.shape == (8000,)
    if suffix != ".mka":
        np.testing.assert_allclose(seg[400:-400], expected[8400:15600], atol=1e-4)


@needs_ffmpeg
def test_a_vbr_mp3_without_a_xing_frame_is_decoded_whole(tmp_path):
    """libsndfile guesses the length of an MP3 without a Xing/Info/VBRI frame from its first frame's bit rate and
    reads no further: a 3 s VBR file decoded to 0.9 s, silently (transformers' soundfile reader does the same).
    Its frames are counted now, and such a file goes to ffmpeg; a Xing-less CBR file stays with soundfile."""
    from musicflamingo.serve import audio as serve_audio
    from musicflamingo.serve.errors import APIError

    wav = _noise(tmp_path / "src.wav", 3.0, 44100, 2)
    vbr = _ffmpeg(wav, tmp_path / "vbr.mp3", "-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0")
    assert sf.info(str(vbr)).frames / 44100 < 2.5  # libsndfile's guess is this wrong
    assert len(load_audio(vbr)) / 16000 == pytest.approx(3.0, abs=0.06)
    assert audio_duration(vbr) is None  # unknown, not the guess
    assert len(load_audio(vbr, offset=1.0, duration=1.5)) == 24000
    cbr = _ffmpeg(wav, tmp_path / "cbr.mp3", "-c:a", "libmp3lame", "-b:a", "64k", "-write_xing", "0")
    np.testing.assert_array_equal(load_audio(cbr), _mono_16k(cbr))
    assert audio_duration(cbr) == pytest.approx(3.0, abs=0.06)
    # an upload over the server's limit is refused (the guess passed it, and 0.9 s of the song was heard)
    with pytest.raises(APIError) as e:
        serve_audio.decode_bytes(vbr.read_bytes(), "mp3", 2.0, "input_audio")
    assert e.value.code == "audio_too_long"


@needs_ffmpeg
def test_truncated_files_decode_what_is_there_with_a_warning_naming_them(tmp_path, caplog):
    """A download cut short (the header promises 3 s) decoded its first second without a word."""
    wav = _noise(tmp_path / "src.wav", 3.0, 44100, 2)
    flac = tmp_path / "cut.flac"
    sf.write(str(flac), sf.read(str(wav))[0], 44100, subtype="PCM_16")
    mp3 = _ffmpeg(wav, tmp_path / "cut.mp3", "-c:a", "libmp3lame", "-b:a", "128k")
    for path in (flac, mp3):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
            x = load_audio(path)
        assert 0.5 < len(x) / 16000 < 1.5
        assert [r for r in caplog.records if str(path) in r.getMessage() and "truncated" in r.getMessage()], (
            path
        )


@needs_ffmpeg
def test_files_that_are_no_audio_are_one_line_naming_the_file_and_the_problem(tmp_path):
    """A 0-byte mp3 said libsndfile's 'File does not exist or is not a regular file (possibly a pipe?)' for a file
    that exists; a video without sound said ffmpeg's 'Output file #0 does not contain any stream'."""
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    image = tmp_path / "cover.mp3"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2000))
    video = tmp_path / "silent film.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc=s=32x32:d=0.5:r=5"]
        + ["-c:v", "mpeg4", str(video)],
        check=True,
    )
    cases = {empty: "the file is empty (0 bytes)", image: "cannot decode audio", video: "no audio stream"}
    for path, said in cases.items():
        with pytest.raises(AudioError) as e:
            load_audio(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and said in msg and "\n" not in msg, msg
        assert "does not exist" not in msg and "Output file #0" not in msg, msg


@needs_ffmpeg
def test_files_as_researchers_name_them_decode(tmp_path):
    """Upper-case and wrong extensions, spaces and non-ASCII names, symlinks, cover art in the ID3 tag, Opus and
    Vorbis: all decode to the right length (ffmpeg-only formats through ffmpeg, whatever the name says)."""
    wav = _noise(tmp_path / "src.wav", 2.0, 48000, 2)
    cover = tmp_path / "cover.png"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=64x64", "-frames:v", "1"]
        + [str(cover)],
        check=True,
    )
    tagged = tmp_path / "Künstler – Lied (live).MP3"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), "-i", str(cover), "-map", "0", "-map", "1"]
        + [
            "-c:a",
            "libmp3lame",
            "-c:v",
            "png",
            "-id3v2_version",
            "3",
            "-metadata",
            "title=Lied",
            str(tagged),
        ],
        check=True,
    )
    m4a_as_mp3 = tmp_path / "actually aac.mp3"
    shutil.copy(_ffmpeg(wav, tmp_path / "aac.m4a", "-c:a", "aac"), m4a_as_mp3)
    link = tmp_path / "link.wav"
    os.symlink(wav, link)
    files = {
        tagged: 0.0,
        m4a_as_mp3: 0.05,  # AAC's last frame is padded
        _ffmpeg(wav, tmp_path / "opus.OPUS", "-c:a", "libopus"): 0.0,
        _ffmpeg(wav, tmp_path / "vorbis.ogg", "-c:a", "libvorbis"): 0.0,
        link: 0.0,
        _ffmpeg(wav, tmp_path / "mp3 named.wav", "-c:a", "libmp3lame", "-f", "mp3"): 0.0,
    }
    for path, pad in files.items():
        x = load_audio(path)
        assert 2.0 - 1e-3 <= len(x) / 16000 <= 2.0 + pad + 1e-3, path
        assert 0.05 < np.sqrt(np.mean(x**2)) < 0.2, path  # the mean of 0.1 and 0.2 noise, not a louder mix
