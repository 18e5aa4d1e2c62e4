"""Review 20 (the feature extractor's settings): a processor folder whose WhisperFeatureExtractor settings change the
reference's features in a way ours does not follow is refused by name, not featurized differently without a word."""

import json
import shutil

import numpy as np
import pytest
import torch

from musicflamingo.audio.features import LogMelExtractor
from musicflamingo.processor import MusicFlamingoProcessor

SR = 16000


def _folder(ref_dir, tmp_path, name="proc", **settings):
    d = tmp_path / name
    shutil.copytree(ref_dir, d)
    cfg = json.loads((d / "processor_config.json").read_text())
    cfg["feature_extractor"].update(settings)
    (d / "processor_config.json").write_text(json.dumps(cfg))
    return d


def _conv(seconds=1.0):
    wave = (np.random.default_rng(20).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)
    return [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "Key?"}]}]


@pytest.mark.parametrize(
    "settings, says",
    [
        ({"padding_value": 1.0}, "padding_value=1.0 is not supported (expected 0.0"),
        ({"padding_side": "left"}, "padding_side='left' is not supported (expected 'right'"),
    ],
)
def test_padding_settings_the_reference_featurizes_with_are_refused(ref_dir, tmp_path, settings, says):
    """Both were read as the defaults: the reference pads a 1-s audio's window with 1.0 (or before the audio), so
    its features differed from ours by up to 2.7 with the same ids."""
    transformers = pytest.importorskip("transformers")
    d = _folder(ref_dir, tmp_path, **settings)
    ref = transformers.MusicFlamingoProcessor.from_pretrained(str(d))
    default = transformers.MusicFlamingoProcessor.from_pretrained(str(ref_dir))
    kw = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}
    changed = ref.apply_chat_template(_conv(), **kw)["input_features"]
    assert (changed - default.apply_chat_template(_conv(), **kw)["input_features"]).abs().max() > 0.1
    with pytest.raises(ValueError) as e:
        MusicFlamingoProcessor.from_pretrained(d)
    assert str(e.value).startswith(f"{d / 'processor_config.json'}: feature extractor {says}"), str(e.value)
    # The defaults, written out or left out, still load and featurize as before.
    ours = MusicFlamingoProcessor.from_pretrained(
        _folder(ref_dir, tmp_path, "defaults", padding_value=0, padding_side="right")
    )
    base = MusicFlamingoProcessor.from_pretrained(ref_dir)
    assert torch.equal(
        ours.apply_chat_template(_conv())["input_features"],
        base.apply_chat_template(_conv())["input_features"],
    )
    settings = base.feature_extractor.to_dict()
    for key in ("padding_value", "padding_side", "feature_extractor_type"):
        settings.pop(key)
    assert LogMelExtractor.from_dict(settings).to_dict() == base.feature_extractor.to_dict()


def test_another_feature_extractor_type_is_refused(ref_dir, tmp_path):
    """The reference builds the extractor the folder names (a Wav2Vec2 one gives 'input_values', no
    'input_features'); ours built Whisper log-mel whatever it said."""
    d = _folder(ref_dir, tmp_path, feature_extractor_type="Wav2Vec2FeatureExtractor")
    with pytest.raises(
        ValueError, match=r"feature_extractor_type='Wav2Vec2FeatureExtractor' is not supported"
    ):
        MusicFlamingoProcessor.from_pretrained(d)


def test_an_n_fft_longer_than_a_window_is_named(ref_dir, tmp_path):
    """n_fft=1e9 in a folder was a MemoryError (a 484-GiB mel filter bank), from deep inside numpy."""
    with pytest.raises(
        ValueError, match=r"n_fft=1000000000 must be at most the 480000 samples of a 30-s window"
    ):
        MusicFlamingoProcessor.from_pretrained(_folder(ref_dir, tmp_path, n_fft=10**9))
    with pytest.raises(ValueError, match=r"n_fft=16001 must be at most the 16000 samples of a 1-s window"):
        LogMelExtractor(chunk_length=1.0, n_fft=16001)
    assert LogMelExtractor(chunk_length=1.0, n_fft=16000).n_fft == 16000
