"""Log-mel features, windowing and token counts against the reference WhisperFeatureExtractor (spec 1.1, 1.2, 3.2)."""

import logging

import numpy as np
import pytest
import torch
from tiny_assets import make_tone

from musicflamingo.audio.features import (
    LogMelExtractor,
    audio_token_count,
    mel_filter_bank,
    split_windows,
    tokens_from_frames,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    return transformers.WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)


@pytest.fixture(scope="module")
def extractor():
    return LogMelExtractor()


def _ref(fe, windows):
    out = fe(windows, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    return out["input_features"], out["attention_mask"]


def test_mel_filters_match_reference(reference):
    ours = mel_filter_bank()
    assert ours.shape == (201, 128) and ours.dtype == np.float64
    np.testing.assert_array_equal(ours, reference.mel_filters)


def test_golden_sine(reference, extractor):
    x = make_tone(440, 1.0)  # 0.5*sin(2*pi*440*n/16000), n < 16000
    feats, mask = extractor([x])
    assert feats.shape == (1, 128, 3000) and feats.dtype == torch.float32
    assert mask.shape == (1, 3000) and mask.dtype == torch.int32 and int(mask.sum()) == 100
    # Golden values from spec 6.3 (HF 5.24.0).
    np.testing.assert_allclose(feats[0, 0:4, 0].numpy(), [0.90752, 1.005084, 0.986405, 0.95195], atol=1e-5)
    padded = feats[0, :, 102:]  # frames whose STFT window lies in the zero padding hold the floor
    assert float(padded.min()) == float(padded.max()) == pytest.approx(-0.5146459341, abs=1e-6)
    assert float(feats.max()) == pytest.approx(1.4853540659, abs=1e-6)
    assert float(feats.min()) == pytest.approx(-0.5146459341, abs=1e-6)
    assert float(feats.mean()) == pytest.approx(-0.5112686157, abs=1e-6)
    ref_feats, ref_mask = _ref(reference, [x])
    assert (feats - ref_feats).abs().max() <= 1e-4
    assert torch.equal(mask, ref_mask.int())


def test_random_windows_match_reference(reference, extractor):
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 65 + 77) * 0.2).astype(np.float32)  # 3 windows, short tail
    windows = split_windows(audio) + [audio[:1], audio[:161], audio[:159], audio[:112077]]
    feats, mask = extractor(windows)
    ref_feats, ref_mask = _ref(reference, windows)
    assert feats.shape == ref_feats.shape == (7, 128, 3000)
    assert (feats - ref_feats).abs().max() <= 1e-4
    assert torch.equal(mask, ref_mask.int())
    assert mask.sum(1).tolist() == [3000, 3000, 501, 1, 2, 1, 701]


def test_windowing_and_truncation_warning(caplog):
    audio = np.zeros(int(16000 * 95.5), dtype=np.float32)
    wins = split_windows(audio, source="song.wav")
    assert [len(w) for w in wins] == [480000, 480000, 480000, 88000]
    long = np.zeros(16000 * 1300, dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        wins = split_windows(long, source="long_song.flac")
    assert len(wins) == 40 and all(len(w) == 480000 for w in wins)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "long_song.flac" in msg and "1300.0" in msg and "1200.0" in msg
    # An empty audio still makes one (empty) window, as the reference.
    assert [len(w) for w in split_windows(np.zeros(0, np.float32))] == [0]


def test_short_chunk_length():
    ext = LogMelExtractor(chunk_length=10.0)
    feats, mask = ext([np.ones(160000, np.float32) * 0.1, np.ones(1000, np.float32) * 0.1])
    assert feats.shape == (2, 128, 1000) and mask.sum(1).tolist() == [1000, 7]
    wins = split_windows(np.zeros(25 * 16000, np.float32), chunk_length=10.0, max_audio_len=20)
    assert [len(w) for w in wins] == [160000, 160000]
    with pytest.raises(ValueError, match="chunk_length"):
        LogMelExtractor(chunk_length=0.0123)


def test_token_counts():
    assert tokens_from_frames(3000) == 750
    assert audio_token_count(35 * 16000) == 875
    assert audio_token_count(112077) == 175
    assert audio_token_count(21 * 60 * 16000) == 40 * 750
    assert [tokens_from_frames(n) for n in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 1]


def test_token_count_is_the_encoders_output_length():
    """One formula: the processor's `<sound>` count is the encoder's post-pool length, for ints and tensors."""
    from musicflamingo.model.encoder import conv_output_lengths

    frames = torch.arange(0, 3001)
    after_conv, post = conv_output_lengths(frames)
    assert post.tolist() == [tokens_from_frames(int(n)) for n in frames]
    assert conv_output_lengths(3000) == (1500, 750) and conv_output_lengths(np.int64(5))[1] == 1
    assert after_conv.dtype == post.dtype == frames.dtype


def test_window_too_long_is_an_error(extractor):
    with pytest.raises(ValueError, match="split_windows"):
        extractor([np.zeros(480001, np.float32)])
    with pytest.raises(ValueError, match="mono"):
        extractor([np.zeros((2, 100), np.float32)])
