"""Review round 13, checkpoint-load journey: Hugging Face layout folders as a researcher downloads, exports and
hands them around (sharded bf16, both name layouts, older config.json field names, peft adapter folders)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from reference_model import build_batch, make_reference_model, random_audio
from safetensors.torch import load_file, save_file

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.checkpoint import CheckpointError, check_checkpoint_dir, load_config
from musicflamingo.model.config import ConfigError
from musicflamingo.model.lora import apply_lora
from musicflamingo.model.peft_format import load_peft_adapter, save_peft_adapter

transformers = pytest.importorskip("transformers")


def _tiny(tmp_path, name="ck", shard="40KB", dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", **overrides)).to(dtype)
    with torch.no_grad():  # distinct values everywhere (norms start at one, biases at zero)
        for p in model.parameters():
            p.normal_()
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size=shard)
    return model, path


def _add_tensor(path, name, tensor):
    """Put `name` into the folder's first shard and its index, as a shard holding both layouts' names would."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(path / shard)
    tensors[name] = tensor
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index["weight_map"][name] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------------------------------------- both layouts
@pytest.mark.parametrize(
    "ours, other",
    [
        ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("audio_tower.conv1.weight", "model.audio_tower.conv1.weight"),
    ],
)
def test_a_weight_stored_under_both_layouts_names_is_refused_not_overwritten(tmp_path, ours, other):
    """A sharded folder holding one weight under the <= 5.9 name and the >= 5.10 name (e.g. `lm_head.weight` added
    beside `language_model.lm_head.weight`): both map to one parameter and the one read last silently replaced the
    other (a zero embedding loaded without a word)."""
    model, path = _tiny(tmp_path)
    shape = dict(
        load_file(path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][ours])
    )[ours].shape
    _add_tensor(path, other, torch.zeros(shape))
    with pytest.raises(CheckpointError) as err:
        MusicFlamingo.from_pretrained(path)
    message = str(err.value)
    assert "stored twice" in message and ours in message and other in message, message


# ---------------------------------------------------------------------------------------------- config.json names
def _ours_and_reference(d, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(d))
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = MusicFlamingoConfig.from_hf_dict(copy.deepcopy(d))
    return ours, ref


def _text(edit):
    return lambda d: edit(d["text_config"])


@pytest.mark.parametrize(
    "edit",
    [
        _text(lambda t: t.pop("rope_parameters")),  # no rope_theta anywhere: Qwen2Config's 10000
        _text(lambda t: t.update(rope_parameters=None)),
        _text(lambda t: (t.pop("rope_parameters"), t.update(rope_theta=5000.0))),  # transformers 4.x: flat
        _text(
            lambda t: (
                t.pop("rope_parameters"),
                t.update(rope_scaling={"rope_type": "default", "rope_theta": 5e3}),
            )
        ),
        _text(lambda t: t.update(rope_scaling={"rope_type": "default"})),  # the older name wins, theta or not
        lambda d: (d["rope_parameters"].pop("rope_theta"), d.update(rope_theta=600.0)),  # RoTE's, flat
        lambda d: (d["rope_parameters"].pop("partial_rotary_factor"), d.update(partial_rotary_factor=0.25)),
        lambda d: (
            d.pop("rope_parameters"),
            d.update(rope_scaling={"rope_theta": 600.0, "rope_type": "default"}),
        ),
        lambda d: d["rope_parameters"].pop("partial_rotary_factor"),
    ],
    ids=[
        "text-none",
        "text-null",
        "text-flat",
        "text-rope_scaling",
        "text-both",
        "rote-flat-theta",
        "rote-flat-factor",
        "rote-rope_scaling",
        "rote-no-factor",
    ],
)
def test_rope_fields_of_older_and_newer_config_json_read_as_the_reference(tmp_path, edit):
    """Where transformers' config classes find rope_theta / partial_rotary_factor (rope_scaling before
    rope_parameters, the flat field of older files, the class default): ours read rope_parameters only and took the
    release's 1e6 for a text_config without one (the reference: 10000), and ignored RoTE's flat fields."""
    d = MusicFlamingoConfig.from_name("tiny").to_hf_dict()
    edit(d)
    ours, ref = _ours_and_reference(d, tmp_path)
    assert ours.text.rope_theta == ref.text_config.rope_parameters["rope_theta"]
    assert ours.rote_theta == ref.rope_parameters["rope_theta"]
    assert ours.rote_partial_rotary_factor == ref.rope_parameters["partial_rotary_factor"]


def test_a_text_config_without_rope_theta_computes_the_references_logits(tmp_path, caplog):
    """The same folder, the same numbers: a config.json whose text_config gives no rope_theta (written by hand or
    with only the fields that differ from Qwen2Config's) is 10000 in the reference; ours rotated with 1e6."""
    ref = make_reference_model(seed=0, rope_theta=10000.0)
    ref.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["text_config"].pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(d))
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32
    ).eval()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.model.config"):
        ours = MusicFlamingo.from_pretrained(tmp_path, dtype=torch.float32)
    assert "text_config leaves out rope_theta (= 10000.0)" in caplog.text
    batch = build_batch([random_audio(4.0, seed=1)], [9])
    with torch.no_grad():
        r, o = ref(**batch).logits, ours(**batch).logits
    assert (o - r).abs().max().item() <= 1e-5


def test_text_fields_left_out_are_qwen2configs_defaults_and_named(tmp_path):
    """num_key_value_heads left out is Qwen2Config's 32 in the reference (ours took the release's 4): a 4-head model
    is then refused, naming the fields the file left out and what they were read as."""
    d = MusicFlamingoConfig.from_name("tiny").to_hf_dict()
    d["text_config"].pop("num_key_value_heads")
    assert transformers.AutoConfig.for_model(**copy.deepcopy(d)).text_config.num_key_value_heads == 32
    with pytest.raises(ConfigError) as err:
        MusicFlamingoConfig.from_hf_dict(d, source="x/config.json")
    message = str(err.value)
    assert message.startswith("x/config.json: ") and "num_key_value_heads=32" in message, message
    assert "leaves them out" in message, message
    d["text_config"]["num_attention_heads"] = 32
    d["text_config"]["head_dim"] = 16
    assert MusicFlamingoConfig.from_hf_dict(d).text.num_key_value_heads == 32


def test_rope_type_error_names_the_file_once():
    d = MusicFlamingoConfig.from_name("tiny").to_hf_dict()
    d["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(ConfigError) as err:
        MusicFlamingoConfig.from_hf_dict(d, source="x/config.json")
    assert str(err.value) == "x/config.json: rope_parameters.rope_type='yarn', expected 'default'"


# ---------------------------------------------------------------------------------------------- wrong folders
@pytest.fixture()
def adapter_folder(tmp_path):
    model, path = _tiny(tmp_path, shard="5GB")
    model.requires_grad_(False)  # the adapters alone, as export_adapter/ of a LoRA run
    apply_lora(model.language_model, rank=2, alpha=4, dropout=0.0, targets=("q_proj",))
    with torch.no_grad():  # trained adapters: B is no longer zero
        for layer in model.language_model.layers:
            layer.self_attn.q_proj.lora_B.normal_()
    return save_peft_adapter(model, tmp_path / "export_adapter", base_model_name_or_path=str(path))


def test_a_peft_adapter_folder_given_as_the_model_says_what_it_is(adapter_folder, tmp_path):
    """`ckpt=<run>/export_adapter` or `model.net.init_from=<peft folder>`: the error said only that config.json is
    missing; it now names the adapter folder, its base model and where the adapters go."""
    for call in (load_config, check_checkpoint_dir, MusicFlamingo.from_pretrained):
        with pytest.raises(CheckpointError) as err:
            call(adapter_folder)
        message = str(err.value)
        assert "peft LoRA adapter folder" in message and "model.net.lora.init_from_peft" in message, message
        assert str(tmp_path / "ck") in message, message  # base_model_name_or_path


def test_a_run_folder_given_as_the_model_names_its_export(tmp_path):
    _, path = _tiny(tmp_path / "run", name="export")
    with pytest.raises(CheckpointError, match=rf"its model is {path}"):
        load_config(tmp_path / "run")


@pytest.mark.parametrize(
    "text, expected",
    [("{}", "no weight_map"), ("[1]", "a JSON list, not an object")],
)
def test_a_shard_index_without_weight_map_says_so(tmp_path, text, expected):
    _, path = _tiny(tmp_path)
    (path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as err:
        MusicFlamingo.from_pretrained(path)
    assert f"malformed shard index ({expected}" in str(err.value), str(err.value)


def test_a_peft_adapter_holding_one_tensor_under_both_layouts_is_refused(adapter_folder, tmp_path):
    """peft keys in the 5.5-5.9 layout (`language_model.model.layers...`) beside the >= 5.10 ones: the last read
    replaced the other's A silently."""
    f = adapter_folder / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    old = key.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
    tensors[old] = torch.zeros_like(tensors[key])
    save_file(tensors, f)
    model = MusicFlamingo.from_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="in the file twice"):
        load_peft_adapter(model, adapter_folder)


# ---------------------------------------------------------------------------------------------- round trips
def test_a_bf16_tied_sharded_export_round_trips_bit_exact_through_transformers(tmp_path):
    """Our bf16 save of a tied model, in several shards, loads in transformers with every tensor equal (the head
    written as its own tensor); transformers' sharded save of it loads back in ours tied, bf16, equal."""
    model, path = _tiny(tmp_path, shard="60KB", dtype=torch.bfloat16, text={"tie_word_embeddings": True})
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    ref_sd = ref.state_dict()
    from musicflamingo.model.peft_format import reference_module_name

    for name, t in model.state_dict().items():
        r = ref_sd[reference_module_name(name)]
        assert r.dtype == torch.bfloat16 and torch.equal(r, t), name
    ref.save_pretrained(tmp_path / "back", max_shard_size="60KB")
    back = MusicFlamingo.from_pretrained(tmp_path / "back")
    assert back.dtype == torch.bfloat16 and back.lm_head.weight is back.language_model.embed_tokens.weight
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_and_init_from_peft_read_a_leading_tilde_as_the_home_folder(
    adapter_folder, tmp_path, monkeypatch
):
    """`model.net.init_from=~/ck` reaches Python as typed (a shell expands ~ only at a word's start): the settings
    check read model.net.lora.init_from_peft with the home folder, then the build said the folder does not exist;
    ckpt= of infer/eval/serve already took ~ as home."""
    from musicflamingo.model.build import build_model

    monkeypatch.setenv("HOME", str(tmp_path))
    model = build_model(
        preset=None,
        overrides={},
        init_from="~/ck",
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze={"audio_tower": True, "multi_modal_projector": True, "language_model": False},
        lora={
            "enabled": True,
            "rank": 2,
            "alpha": 4,
            "dropout": 0.0,
            "targets": ["q_proj"],
            "init_from_peft": "~/export_adapter",
        },
    )
    trained = load_file(adapter_folder / "adapter_model.safetensors")
    key = next(k for k in trained if k.endswith("layers.1.self_attn.q_proj.lora_B.weight"))
    assert trained[key].abs().sum() > 0
    assert torch.equal(model.language_model.layers[1].self_attn.q_proj.lora_B, trained[key])


def test_shards_without_their_index_are_named(tmp_path):
    """A download that fetched the shards but not model.safetensors.index.json: the error said only that neither
    weights file is there."""
    _, path = _tiny(tmp_path)
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError) as err:
        MusicFlamingo.from_pretrained(path)
    message = str(err.value)
    assert "model-00001-of-" in message and "not the index" in message, message
