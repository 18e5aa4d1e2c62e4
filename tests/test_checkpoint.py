"""Checkpoint loading errors, presets, and the config round trip."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from reference_model import build_batch, random_audio
from safetensors.torch import load_file, save_file

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.checkpoint import NAME_TABLE, CheckpointError, hf_to_ours, ours_to_hf
from musicflamingo.model.config import ConfigError


@pytest.fixture()
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny"))
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return model, path


def _edit_weights(path, fn):
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_preset_parameter_count_on_meta():
    config = MusicFlamingoConfig.from_name("music_flamingo_2601")
    assert config.text.vocab_size == 151672
    with torch.device("meta"):
        model = MusicFlamingo(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == 8_267_215_360 == config.num_parameters()
    assert len(model.state_dict()) == 830
    assert config.window_seconds == 30.0


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_count(name):
    config = MusicFlamingoConfig.from_name(name)
    model = MusicFlamingo(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def test_config_hf_round_trip():
    config = MusicFlamingoConfig.from_name("small", text={"num_hidden_layers": 3})
    back = MusicFlamingoConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
    assert back == config
    assert back.window_seconds == 3.0


def test_name_table_covers_every_parameter():
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny"))
    for name in model.state_dict():
        hf = ours_to_hf(name)
        assert hf_to_ours(hf) == name
    assert (
        hf_to_ours("language_model.model.layers.3.mlp.up_proj.weight")
        == "language_model.layers.3.mlp.up_proj.weight"
    )
    assert (
        hf_to_ours("model.language_model.layers.3.mlp.up_proj.weight")
        == "language_model.layers.3.mlp.up_proj.weight"
    )
    assert hf_to_ours("lm_head.weight") == "lm_head.weight"
    assert all(k.count("{}") == v.count("{}") for k, v in NAME_TABLE.items())


def test_missing_key(tiny_dir):
    _, path = tiny_dir
    _edit_weights(path, lambda sd: sd.pop("audio_tower.layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys.*audio_tower\.layers\.1\.fc2\.bias"):
        MusicFlamingo.from_pretrained(path)


def test_unexpected_key(tiny_dir):
    _, path = tiny_dir
    _edit_weights(path, lambda sd: sd.__setitem__("audio_tower.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*audio_tower\.extra\.weight"):
        MusicFlamingo.from_pretrained(path)


def test_wrong_shape(tiny_dir):
    _, path = tiny_dir
    _edit_weights(path, lambda sd: sd.__setitem__("multi_modal_projector.linear_1.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"wrong shapes.*multi_modal_projector\.linear_1\.bias.*\[7\]"):
        MusicFlamingo.from_pretrained(path)


def test_placeholder_count_mismatch(tiny_dir):
    model, _ = tiny_dir
    batch = build_batch([random_audio(3.0)], [4])
    ids = batch["input_ids"].clone()
    first = int((ids[0] == 300).nonzero()[0])
    ids[0, first] = 5  # one <sound> fewer than audio frames
    with pytest.raises(ValueError, match=r"74 <sound> tokens.*75 valid audio frames|74 <sound>.*75"):
        model(ids, input_features=batch["input_features"], input_features_mask=batch["input_features_mask"])
    with pytest.raises(ValueError, match="no input_features"):
        model(batch["input_ids"])


def test_missing_folder_and_config(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        MusicFlamingo.from_pretrained(tmp_path / "nope")
    _, path = tiny_dir
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        MusicFlamingo.from_pretrained(path)


def test_unknown_model_type(tiny_dir):
    _, path = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model_type='llama', expected 'musicflamingo'"):
        MusicFlamingo.from_pretrained(path)


def test_truncated_safetensors(tiny_dir):
    _, path = tiny_dir
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        MusicFlamingo.from_pretrained(path)


def test_pickle_is_refused_without_execution(tiny_dir, tmp_path):
    _, path = tiny_dir
    (path / "model.safetensors").unlink()
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle formats are refused"):
        MusicFlamingo.from_pretrained(path)
    assert not marker.exists()


def test_absurd_config_refused_before_allocation(tiny_dir):
    _, path = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 60000
    cfg["text_config"]["intermediate_size"] = 400000
    cfg["text_config"]["num_hidden_layers"] = 500
    cfg["text_config"]["head_dim"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="parameters, above the limit"):
        MusicFlamingo.from_pretrained(path)
    cfg["text_config"]["vocab_size"] = 10**12
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"text_config\.vocab_size"):
        MusicFlamingo.from_pretrained(path)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"text_config\.num_attention_heads=6 must be a multiple"):
        MusicFlamingoConfig.from_name(
            "tiny", text={"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 96}
        )
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        MusicFlamingoConfig.from_name("huge")
    with pytest.raises(ConfigError, match=r"audio_config\.hidden_size must be an integer"):
        MusicFlamingoConfig.from_name("tiny", audio={"hidden_size": "64"})


def test_tied_embeddings_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", text={"tie_word_embeddings": True}))
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    model.save_pretrained(tmp_path / "t")
    back = MusicFlamingo.from_pretrained(tmp_path / "t")
    assert back.lm_head.weight is back.language_model.embed_tokens.weight
    ids = torch.randint(0, 290, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
