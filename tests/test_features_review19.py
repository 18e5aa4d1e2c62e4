"""Review 19 (features by use): ``feature_extractor.pad`` as transformers' ``SequenceFeatureExtractor.pad`` (a
Whisper-style collator's call), ``mel_filters`` as its float64 array."""

import copy

import numpy as np
import pytest
import torch

from musicflamingo.audio.features import LogMelExtractor

transformers = pytest.importorskip("transformers")


_RNG = np.random.default_rng(19)
_WINDOWS = [
    _RNG.standard_normal((128, 3000)).astype(np.float32) for _ in range(3)
]  # the processor's features
_STEPS = [_RNG.standard_normal((n, 128)) for n in (5, 9, 7)]  # float64 [T_i, feature_size] sequences

PAD_CASES = {
    "collator, numpy in, pt out": ([{"input_features": f} for f in _WINDOWS], {"return_tensors": "pt"}),
    "collator, tensors in": ([{"input_features": torch.from_numpy(f)} for f in _WINDOWS], {}),
    "collator, float64 lists": (
        [{"input_features": f.astype(np.float64).tolist()} for f in _WINDOWS[:2]],
        {},
    ),
    "a [B, ...] array": ({"input_features": np.stack(_WINDOWS)}, {"return_tensors": "pt"}),
    "longest, labels kept": ([{"input_features": f, "labels": i} for i, f in enumerate(_STEPS)], {}),
    "max_length, multiple": (
        {"input_features": _STEPS},
        {"padding": "max_length", "max_length": 12, "pad_to_multiple_of": 5},
    ),
    "truncation": ({"input_features": _STEPS}, {"max_length": 6, "truncation": True, "return_tensors": "pt"}),
    "truncation, multiple": (
        {"input_features": _STEPS},
        {"max_length": 6, "truncation": True, "pad_to_multiple_of": 4},
    ),
    "no padding, one length": ({"input_features": _STEPS[:1]}, {"padding": False}),
    "mask given": ([{"input_features": f, "attention_mask": np.ones(len(f), np.int64)} for f in _STEPS], {}),
}


@pytest.mark.parametrize("return_attention_mask", [True, False])
@pytest.mark.parametrize("case", list(PAD_CASES))
def test_pad_is_transformers_pad(case, return_attention_mask):
    inputs, kwargs = PAD_CASES[case]
    ref = transformers.WhisperFeatureExtractor(feature_size=128, return_attention_mask=return_attention_mask)
    ours = LogMelExtractor(return_attention_mask=return_attention_mask)
    if case == "mask given" and not return_attention_mask:
        # transformers leaves a given mask unpadded then (a numpy object array of ragged rows); ours pads it
        o = ours.pad(copy.deepcopy(inputs), **kwargs)
        assert torch.equal(
            torch.from_numpy(o["attention_mask"]), (torch.arange(9) < torch.tensor([[5], [9], [7]])).long()
        )
        return
    r = ref.pad(copy.deepcopy(inputs), **kwargs)
    o = ours.pad(copy.deepcopy(inputs), **kwargs)
    assert sorted(o) == sorted(r)
    for key in r:
        assert type(o[key]) is type(r[key]), key
        assert o[key].dtype == r[key].dtype and o[key].shape == r[key].shape, key
        assert (np.asarray(o[key]) == np.asarray(r[key])).all(), key


def test_pad_errors_name_what_is_wrong():
    fe = LogMelExtractor()
    with pytest.raises(ValueError, match=r"holding 'input_features', got \['x'\]"):
        fe.pad([{"x": 1}])
    with pytest.raises(ValueError, match=r"example 1 has keys \['input_features', 'labels'\], example 0 has"):
        fe.pad([{"input_features": _STEPS[0]}, {"input_features": _STEPS[1], "labels": 1}])
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        fe.pad({"input_features": _STEPS}, padding="max_length")
    with pytest.raises(ValueError, match="truncation=True needs max_length"):
        fe.pad({"input_features": _STEPS}, truncation=True)
    with pytest.raises(
        ValueError, match=r"input_features examples have shapes \[\(5, 128\), \(7, 128\), \(9, 128\)\]"
    ):
        fe.pad({"input_features": _STEPS}, padding=False)
    with pytest.raises(ValueError, match="different sizes"):
        fe.pad({"input_features": _STEPS, "labels": [1]})


def test_pad_pads_waveforms_along_their_one_axis():
    # transformers' np.pad fails on 1-D examples when feature_size > 1 (it pads two axes); raw audio is padded here
    out = LogMelExtractor().pad({"input_features": [np.ones(3), np.ones(5)]}, pad_to_multiple_of=4)
    assert out["input_features"].dtype == np.float32
    np.testing.assert_array_equal(out["input_features"], [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])


def test_pad_makes_a_processor_batch_collatable(ours):
    """A Whisper-style collator over per-clip processor outputs gives the processor's own batch features."""
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 40000)]
    single = [ours("<sound>", audio=c)["input_features"][0] for c in clips]
    batch = ours.feature_extractor.pad([{"input_features": f} for f in single], return_attention_mask=False)
    assert torch.equal(batch["input_features"], ours(["<sound>", "<sound>"], audio=clips)["input_features"])


def test_mel_filters_are_the_reference_float64_array():
    ref = transformers.WhisperFeatureExtractor(feature_size=128)
    ours = LogMelExtractor()
    # Was a float32 torch tensor: numpy code given it (transformers.audio_utils.spectrogram) computed in float32.
    assert isinstance(ours.mel_filters, np.ndarray) and ours.mel_filters.dtype == np.float64
    np.testing.assert_array_equal(ours.mel_filters, ref.mel_filters)
    from transformers.audio_utils import spectrogram, window_function

    x = np.random.default_rng(2).standard_normal(8000)
    args = {"window": window_function(400, "hann"), "frame_length": 400, "hop_length": 160, "power": 2.0}
    np.testing.assert_array_equal(
        spectrogram(x, mel_filters=ours.mel_filters, **args),
        spectrogram(x, mel_filters=ref.mel_filters, **args),
    )
