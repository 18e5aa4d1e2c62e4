"""Audio decoding: formats, resampling, mono, segments and errors that name the file."""

import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_assets import make_tone, write_audio

from musicflamingo.audio.io import AudioError, audio_duration, load_audio, load_or_validate, validate_waveform


def _peak_hz(x: np.ndarray, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_formats_recover_frequency_and_duration(tmp_path, ext):
    path = write_audio(tmp_path / f"tone.{ext}", make_tone(660, 1.5), 16000)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / 16000 - 1.5) < 0.03  # lossy codecs may pad a few ms
    assert abs(_peak_hz(x) - 660) < 2
    assert 0.3 < np.abs(x).max() <= 1.0


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line")
def test_ffmpeg_fallback_for_other_formats(tmp_path):
    wav = write_audio(tmp_path / "src.wav", make_tone(700, 2.0, sr=44100), 44100)
    m4a = tmp_path / "tone.m4a"  # AAC: libsndfile cannot read it
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), str(m4a)], check=True)
    x = load_audio(m4a)
    assert abs(len(x) / 16000 - 2.0) < 0.05 and abs(_peak_hz(x) - 700) < 2
    assert len(load_audio(m4a, offset=0.5, duration=1.0)) == 16000


def test_stereo_44k1_becomes_16k_mono(tmp_path):
    left, right = make_tone(440, 1.0, sr=44100, amp=0.4), make_tone(1000, 1.0, sr=44100, amp=0.2)
    path = tmp_path / "stereo.flac"
    sf.write(str(path), np.stack([left, right], axis=1), 44100, subtype="PCM_24")
    x = load_audio(path)
    assert x.shape == (16000,)
    spec = np.abs(np.fft.rfft(x))
    freqs = np.fft.rfftfreq(len(x), 1 / 16000)
    peaks = sorted(freqs[np.argsort(spec)[-2:]].tolist())
    assert peaks == [440.0, 1000.0]
    # Averaged, not summed: the 440 Hz component has amplitude 0.4 / 2.
    assert spec[440] / (len(x) / 2) == pytest.approx(0.2, rel=0.02)


def test_integer_pcm_is_scaled(tmp_path):
    path = tmp_path / "pcm16.wav"
    sf.write(str(path), np.full(1600, 0.5, np.float32), 16000, subtype="PCM_16")
    assert load_audio(path).max() == pytest.approx(0.5, abs=1e-4)
    ints = (np.full(100, 16384)).astype(np.int16)
    assert validate_waveform(ints).max() == pytest.approx(0.5)
    # unsigned PCM is centred on half its range (uint16 divided by 0 before: every sample inf)
    for dtype in (np.uint8, np.uint16, np.uint32):
        half = 2 ** (8 * np.dtype(dtype).itemsize - 1)
        x = validate_waveform(np.array([half, half + half // 2, 0], dtype=dtype))
        assert x.tolist() == pytest.approx([0.0, 0.5, -1.0])


def test_resampled_files_match_the_references_reader(tmp_path):
    """A file at another rate gives the reference's waveform (transformers' soundfile + soxr path, which
    apply_chat_template takes without torchcodec), so the same features: it used soxr's very high quality."""
    if importlib.util.find_spec("torchcodec") is not None:
        pytest.skip("the reference reads files with torchcodec (ffmpeg's resampler) when it is installed")
    from transformers.audio_utils import load_audio as reference_load

    rng = np.random.default_rng(0)
    for sr, channels in ((44100, 1), (8000, 1), (48000, 2)):
        path = tmp_path / f"noise_{sr}_{channels}.wav"
        sf.write(str(path), (rng.standard_normal((sr * 2, channels)) * 0.2).astype(np.float32), sr, "FLOAT")
        ours, theirs = load_audio(path), reference_load(str(path), 16000)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-6, (sr, channels)


def test_segment_read_returns_requested_span(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    path = tmp_path / "noise.wav"
    sf.write(str(path), x, 16000, subtype="FLOAT")
    seg = load_audio(path, offset=1.25, duration=0.5)
    np.testing.assert_array_equal(seg, x[20000:28000])
    tail = load_audio(path, offset=2.5)
    np.testing.assert_array_equal(tail, x[40000:])
    # A segment of a 44.1 kHz file is resampled on its own and has the requested length.
    path44 = write_audio(tmp_path / "tone44.flac", make_tone(500, 2.0, sr=44100), 44100)
    seg44 = load_audio(path44, offset=0.5, duration=1.0)
    assert len(seg44) == 16000 and abs(_peak_hz(seg44) - 500) < 2


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav.*not found"):
        load_audio(tmp_path / "nope.wav")


def test_undecodable_file(tmp_path):
    bad = tmp_path / "garbage.ogg"
    bad.write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(AudioError, match=r"garbage\.ogg.*cannot decode"):
        load_audio(bad)


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav.*empty"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"clip.*empty"):
        validate_waveform(np.zeros(0, np.float32), name="clip")
    with pytest.raises(AudioError, match=r"past the end"):
        write_audio(tmp_path / "short.wav", make_tone(440, 0.5))
        load_audio(tmp_path / "short.wav", offset=1.0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_audio(tmp_path, value):
    x = make_tone(440, 0.2)
    x[100] = value
    path = tmp_path / "broken.wav"
    sf.write(str(path), x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"broken\.wav.*non-finite.*sample 100"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"my_tensor.*non-finite"):
        validate_waveform(torch.from_numpy(x), name="my_tensor")


def test_too_short_when_asked(tmp_path):
    path = write_audio(tmp_path / "tiny.wav", make_tone(440, 0.005))  # 80 samples
    assert len(load_audio(path)) == 80
    with pytest.raises(AudioError, match=r"tiny\.wav.*80 samples.*160"):
        load_audio(path, min_samples=160)


def test_in_memory_inputs():
    stereo = np.stack([np.full(1000, 0.2), np.full(1000, 0.4)]).astype(np.float64)
    x = validate_waveform(stereo)
    assert x.dtype == np.float32 and x.shape == (1000,) and x[0] == pytest.approx(0.3)
    y, name = load_or_validate(torch.ones(10, dtype=torch.bfloat16) * 0.5, name="t")
    assert y.dtype == np.float32 and name == "t" and y[0] == 0.5
    with pytest.raises(AudioError, match="shape"):
        validate_waveform(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(AudioError, match="expected a file path"):
        load_or_validate(3.0)


def test_audio_duration_from_header_segment_or_unknown(tmp_path):
    """What load_audio will yield: the header length after ``offset``, or ``duration`` when given; None if unknown."""
    path = write_audio(tmp_path / "a.wav", make_tone(440, 2.0, sr=44100), 44100)
    assert audio_duration(path) == pytest.approx(2.0, abs=1e-4)
    assert audio_duration(path, offset=0.5) == pytest.approx(1.5, abs=1e-4)
    assert audio_duration(path, offset=3.0) == 0.0
    assert audio_duration(path, offset=0.5, duration=0.25) == 0.25
    assert audio_duration(tmp_path / "missing.wav", duration=1.0) == 1.0  # the file is not opened
    assert audio_duration(tmp_path / "missing.wav") is None
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    assert audio_duration(tmp_path / "junk.wav") is None


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    """`'audio="~/song.flac"'` reaches us unexpanded (quoted for Hydra, so not by the shell): read as a shell would,
    messages keep the name as given."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_audio(tmp_path / "song.flac", make_tone(440, 0.5))
    assert len(load_audio("~/song.flac")) == 8000 and audio_duration("~/song.flac") == 0.5
    with pytest.raises(AudioError, match=r"^~/nope.flac: audio file not found"):
        load_audio("~/nope.flac")
