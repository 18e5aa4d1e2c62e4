"""Encoder dropout where the reference applies it (training only), read from and written to config.json."""

from __future__ import annotations

import pytest
import torch
from reference_model import build_batch, make_reference_model, random_audio

from musicflamingo import MusicFlamingo
from musicflamingo.model import ConfigError, MusicFlamingoConfig
from musicflamingo.model import encoder as encoder_module
from musicflamingo.model.encoder import AudioEncoder

KINDS = ("dropout", "attention_dropout", "activation_dropout")


def _encoder(seed: int = 0, **dropouts: float) -> AudioEncoder:
    """A tiny encoder (2 s windows: 200 mel frames) with random weights from `seed` and the given dropouts."""
    config = MusicFlamingoConfig.from_name("tiny", audio={"max_source_positions": 100, **dropouts}).audio
    torch.manual_seed(seed)
    enc = AudioEncoder(config)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, 0.2)
    return enc


def _features(windows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(windows, 128, 200, generator=g)
    mask = torch.ones(windows, 200, dtype=torch.int32)
    mask[-1, 150:] = 0  # a short last window: the attention mask is in use
    return feats, mask


def _train_out(enc: AudioEncoder, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One training forward (autograd recording, as in a training step) under `seed`."""
    feats, mask = _features()
    enc.train()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return enc(feats, mask).float().detach()


def _eval_out(enc: AudioEncoder) -> torch.Tensor:
    feats, mask = _features()
    enc.eval()
    with torch.no_grad():
        return enc(feats, mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_each_dropout_acts_in_training_only(kind, dtype):
    """Each field on its own changes training outputs, differently per seed and reproducibly for one seed."""
    enc = _encoder(**{kind: 0.3})
    a, b, again = _train_out(enc, 0, dtype), _train_out(enc, 1, dtype), _train_out(enc, 0, dtype)
    assert torch.equal(a, again)
    assert not torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(a, _eval_out(enc).float(), atol=1e-3)


def test_eval_equals_the_model_without_dropout():
    with_dropout = _encoder(seed=3, dropout=0.2, attention_dropout=0.2, activation_dropout=0.2)
    without = _encoder(seed=3)
    assert torch.equal(_eval_out(with_dropout), _eval_out(without))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_zero_dropout_keeps_the_fused_path_and_draws_no_random_numbers(dtype, monkeypatch):
    """With every probability 0 a training forward runs the fused kernels exactly as before dropout existed:
    no dropout call, no random number drawn, `gelu_linear` (and for bf16 on CPU `softmax_attention`) used."""
    calls = {"gelu_linear": 0, "softmax_attention": 0}

    def spy(name):
        real = getattr(encoder_module, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapped

    def no_dropout(*args, **kwargs):
        raise AssertionError("dropout called with p = 0")

    for name in calls:
        monkeypatch.setattr(encoder_module, name, spy(name))
    monkeypatch.setattr(encoder_module.F, "dropout", no_dropout)
    enc = _encoder()
    out = _train_out(enc, 0, dtype)
    after = torch.random.get_rng_state()
    assert torch.equal(after, torch.manual_seed(0).get_state())  # nothing random ran after the seeding
    assert torch.equal(out, _train_out(enc, 1, dtype))
    layers = len(enc.layers)
    assert calls["gelu_linear"] == 2 * layers
    assert calls["softmax_attention"] == (2 * layers if dtype == torch.bfloat16 else 0)


def test_config_json_round_trip_keeps_dropouts(tmp_path):
    config = MusicFlamingoConfig.from_name(
        "tiny",
        audio={"dropout": 0.1, "attention_dropout": 0.2, "activation_dropout": 0.3},
        text={"attention_dropout": 0.15},
    )
    config.to_json(tmp_path / "config.json")
    back = MusicFlamingoConfig.from_json(tmp_path / "config.json")
    assert back == config
    assert (back.audio.dropout, back.audio.attention_dropout, back.audio.activation_dropout) == (
        0.1,
        0.2,
        0.3,
    )
    assert back.text.attention_dropout == 0.15
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoConfig.from_pretrained(tmp_path)  # the reference reads the same values
    a = ref.audio_config
    assert (a.dropout, a.attention_dropout, a.activation_dropout) == (0.1, 0.2, 0.3)
    assert ref.text_config.attention_dropout == 0.15


def test_config_json_without_dropout_keys_reads_zero():
    d = MusicFlamingoConfig.from_name("tiny").to_hf_dict()
    for sub in (d["audio_config"], d["text_config"]):
        for kind in KINDS:
            sub.pop(kind, None)
    config = MusicFlamingoConfig.from_hf_dict(d)
    assert config.audio.dropout == config.audio.attention_dropout == config.audio.activation_dropout == 0.0
    assert config.text.attention_dropout == 0.0


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), "0.1"])
@pytest.mark.parametrize(
    "field",
    ["audio.dropout", "audio.attention_dropout", "audio.activation_dropout", "text.attention_dropout"],
)
def test_dropout_outside_0_1_is_refused(field, value):
    part, name = field.split(".")
    with pytest.raises(ConfigError, match=name):
        MusicFlamingoConfig.from_name("tiny", **{part: {name: value}})


def test_reference_gives_the_same_eval_output(tmp_path):
    """A reference checkpoint with every dropout set: our model reads them and, in eval, computes the reference's
    encoder output and logits."""
    transformers = pytest.importorskip("transformers")
    ref = make_reference_model(seed=0)
    ref.config.audio_config.dropout = 0.1
    ref.config.audio_config.attention_dropout = 0.2
    ref.config.audio_config.activation_dropout = 0.3
    ref.config.text_config.attention_dropout = 0.15
    ref.save_pretrained(tmp_path)
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32
    ).eval()
    assert ref.model.audio_tower.layers[0].dropout == 0.1  # the reference runs with them
    ours = MusicFlamingo.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (ours.config.audio.dropout, ours.config.audio.attention_dropout) == (0.1, 0.2)
    assert (ours.config.audio.activation_dropout, ours.config.text.attention_dropout) == (0.3, 0.15)
    batch = build_batch([random_audio(7.0, seed=4)], [6])
    with torch.no_grad():
        r_enc = ref.model.audio_tower(batch["input_features"], batch["input_features_mask"]).last_hidden_state
        o_enc = ours.audio_tower(batch["input_features"], batch["input_features_mask"])
        r, o = ref(**batch), ours(**batch)
    assert (o_enc - r_enc).abs().max().item() <= 1e-5
    assert (o.logits - r.logits).abs().max().item() <= 1e-5
