"""RoTE golden values (spec §2.6), window-index reconstruction (§2.3, §6.1) and the zero-length-window quirk."""

from __future__ import annotations

import pytest
import torch

from musicflamingo import MusicFlamingoConfig
from musicflamingo.model.rote import RotaryTimeEmbedding, apply_rotary_time_emb, build_audio_timestamps

AUDIO = 151669


def _release_rote():
    return RotaryTimeEmbedding(MusicFlamingoConfig.from_name("music_flamingo_2601"))


def test_inv_freq_sample_values():
    rote = _release_rote()
    assert rote.inv_freq.dtype == torch.float32 and rote.inv_freq.shape == (128,)
    expected = torch.tensor([1.0, 0.94611496, 0.89513344, 0.84689915])
    assert torch.allclose(rote.inv_freq[:4], expected, atol=1e-7)
    assert torch.allclose(rote.inv_freq[126:], torch.tensor([9.3096e-4, 8.8080e-4]), rtol=1e-4)


def test_golden_cos_sin_and_application():
    rote = _release_rote()
    ids = torch.full((1, 1500), AUDIO)
    t = build_audio_timestamps(ids, torch.tensor([750, 750]), 750, AUDIO, 0.01)
    assert t.shape == (2, 750) and t.dtype == torch.float32
    cos, sin = rote(t)
    assert cos.shape == (2, 750, 512)
    golden = {
        (0, 1, 0): (1.0, -0.0),
        (0, 1, 256): (0.999999166, -0.00131594704),
        (1, 0, 0): (0.987688363, -0.156434476),
        (1, 0, 2): (0.988977015, -0.14806895),
        (1, 10, 300): (-0.982969224, -0.18377015),
        (1, 749, 511): (0.266189963, -0.963920593),
    }
    for (w, j, d), (c, s) in golden.items():
        assert cos[w, j, d].item() == pytest.approx(c, abs=2e-6), (w, j, d)
        assert sin[w, j, d].item() == pytest.approx(s, abs=2e-6), (w, j, d)
    y = apply_rotary_time_emb(torch.ones(2, 750, 1280), cos, sin)
    assert y[1, 10, 300].item() == pytest.approx(-0.799199104, abs=1e-6)
    assert y[1, 10, 301].item() == pytest.approx(-1.166739345, abs=1e-6)
    assert torch.equal(y[..., 512:], torch.ones(2, 750, 768))


def test_window_axis_resets_per_audio():
    # Row 0 has 45 tokens over 3 windows of 15, row 1 has 30 over 2 windows: indices 0,1,2 | 0,1.
    ids = torch.zeros(2, 50, dtype=torch.long)
    ids[0, 2:47] = AUDIO
    ids[1, 5:35] = AUDIO
    t = build_audio_timestamps(ids, torch.full((5,), 15), 15, AUDIO, 0.01)
    window_idx = torch.round(t[:, 0] / (15 * 0.04)).long().tolist()
    assert window_idx == [0, 1, 2, 0, 1]
    assert torch.allclose(t[1, :3], torch.tensor([0.6, 0.64, 0.68]))
    rote = RotaryTimeEmbedding(MusicFlamingoConfig.from_name("tiny"))
    cos, sin = rote(t)
    assert torch.equal(cos[0], cos[3]) and torch.equal(cos[1], cos[4]) and torch.equal(sin[1], sin[4])
    assert not torch.equal(cos[0], cos[1])


def test_zero_length_last_window_quirk():
    # Audio 0: windows of 15 and 0 frames (its tail held <= 2 mel frames); audio 1: two windows of 15.
    ids = torch.zeros(1, 60, dtype=torch.long)
    ids[0, 1:16] = AUDIO
    ids[0, 20:50] = AUDIO
    post = torch.tensor([15, 0, 15, 15])
    quirk = build_audio_timestamps(ids, post, 15, AUDIO, 0.01, quirk=True)
    fixed = build_audio_timestamps(ids, post, 15, AUDIO, 0.01, quirk=False)
    step = 15 * 0.04
    # Reference: the empty window is attributed to audio 1, whose windows then count 1, 2.
    assert torch.round(quirk[:, 0] / step).long().tolist() == [0, 0, 1, 2]
    assert torch.round(fixed[:, 0] / step).long().tolist() == [0, 1, 0, 1]
    # As the last audio of the batch, the reference raises.
    ids2 = torch.zeros(1, 20, dtype=torch.long)
    ids2[0, 1:16] = AUDIO
    with pytest.raises(IndexError, match="quirk"):
        build_audio_timestamps(ids2, torch.tensor([15, 0]), 15, AUDIO, 0.01, quirk=True)
    fixed2 = build_audio_timestamps(ids2, torch.tensor([15, 0]), 15, AUDIO, 0.01, quirk=False)
    assert torch.round(fixed2[:, 0] / step).long().tolist() == [0, 1]
