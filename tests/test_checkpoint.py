"""Checkpoint loading errors, presets, and the config round trip."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_model import build_batch, random_audio
from safetensors.torch import load_file, save_file

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.checkpoint import (
    NAME_TABLE,
    CheckpointError,
    check_checkpoint_dir,
    hf_to_ours,
    load_config,
    ours_to_hf,
    read_state_dict,
    recover_interrupted_save,
    stop_token_ids,
    write_state_dict,
)
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


def test_ignored_rotary_buffers_are_ignored_in_either_layout(tiny_dir):
    """The rotary buffers IGNORED_KEYS lists are skipped under the transformers >= 5.10 names too (`model.*`
    prefixes, top-level `lm_head`): they were compared before the prefix rewrite and refused as unexpected."""
    from musicflamingo.checkpoint import IGNORED_KEYS

    model, path = tiny_dir
    alt = [("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model.")]
    alt += [(p, "model." + p) for p in ("audio_tower.", "multi_modal_projector.", "pos_emb.")]

    def relayout(name: str) -> str:
        return next((b + name[len(a) :] for a, b in alt if name.startswith(a)), name)

    def to_alt_layout(sd):
        moved = {relayout(k): v for k, v in sd.items()}
        sd.clear()
        sd.update(moved)
        for name in IGNORED_KEYS:
            sd[relayout(name)] = torch.zeros(4)

    _edit_weights(path, to_alt_layout)
    assert {relayout(k) for k in IGNORED_KEYS} == {
        "model.pos_emb.inv_freq",
        "model.pos_emb.original_inv_freq",
        "model.pos_emb.position_angles",
        "model.language_model.rotary_emb.inv_freq",
        "model.audio_tower.pos_emb.freqs",
    }
    loaded = MusicFlamingo.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_max_shard_size_units(tmp_path):
    """Every unit the size pattern admits parses (`1TiB` was a bare KeyError 'TIB'); anything else is refused
    naming the value."""
    from musicflamingo.checkpoint import _parse_size

    assert (
        _parse_size("1TiB") == 2**40 and _parse_size("1.5 gib") == 3 * 2**29 and _parse_size("40KB") == 40_000
    )
    assert _parse_size(".5MB") == 500_000 and _parse_size(7) == 7
    for bad in ("1IB", "1.2.3GB", "5XB", ".", 5.0):
        with pytest.raises(ValueError, match=rf"max_shard_size={bad!r}: expected"):
            _parse_size(bad)


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


def _rope(value):
    return lambda c: c["text_config"]["rope_parameters"].update(rope_theta=value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_rope("abc"), "text_config.rope_parameters.rope_theta must be a number, got 'abc'"),
        (
            lambda c: c["rope_parameters"].update(rope_theta="fast"),
            "rope_parameters.rope_theta must be a number",
        ),
        (
            lambda c: c["rope_parameters"].update(partial_rotary_factor="x"),
            "rope_parameters.partial_rotary_factor must be a number, got 'x'",
        ),
        (
            lambda c: c["text_config"].update(rope_parameters=[1]),
            "text_config.rope_parameters must be a JSON object, got [1]",
        ),
        (
            lambda c: c.update(rope_parameters="default"),
            "rope_parameters must be a JSON object, got 'default'",
        ),
        (
            lambda c: c["text_config"].update(tie_word_embeddings="false"),
            "text_config.tie_word_embeddings must be a JSON boolean (true or false), got 'false'",
        ),
        (
            lambda c: c.update(projector_bias=1),
            "projector_bias must be a JSON boolean (true or false), got 1",
        ),
        (
            lambda c: c["audio_config"].update(scale_embedding="no"),
            "audio_config.scale_embedding must be a JSON boolean",
        ),
    ],
)
def test_malformed_config_json_values_name_the_file_and_field(tiny_dir, edit, message):
    """A string where config.json wants a number, a non-object rope_parameters, or a string where it wants a
    boolean: a one-line error naming the file and the field, never a bare float() ValueError or AttributeError, and
    never `bool("false")`: a tied head read so loads as tied."""
    from musicflamingo.cli import user_error_line

    _, path = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert f"{path / 'config.json'}: {message}" in str(err.value)
    assert isinstance(err.value, (CheckpointError, ConfigError))
    assert user_error_line(err.value) == str(err.value)


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


# ---------------------------------------------------------------------------------------------- reading is read-only
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_reading_leaves_an_interrupted_save_alone(tiny_dir):
    """A save killed between its two renames leaves only the backup: reading names it and changes nothing;
    the next save, or `recover_interrupted_save`, puts it back."""
    model, path = tiny_dir
    backup = path.with_name(f".{path.name}.old-{_dead_pid()}")
    path.rename(backup)
    before = _tree(path.parent)
    expected = rf"{path.name}: checkpoint folder does not exist; .*{backup.name} holds it, left by an interrupted save"
    with pytest.raises(CheckpointError, match=expected):
        load_config(path)
    with pytest.raises(CheckpointError, match=expected):
        MusicFlamingo.from_pretrained(path)
    with pytest.raises(
        CheckpointError, match=rf"is not a folder .*run the save again, or rename {backup.name}"
    ):
        check_checkpoint_dir(path)
    assert _tree(path.parent) == before
    recover_interrupted_save(path)
    assert path.is_dir() and not backup.exists()
    back = MusicFlamingo.from_pretrained(path)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_reading_leaves_a_sibling_backup_alone(tiny_dir):
    model, path = tiny_dir
    backup = path.with_name(f".{path.name}.old-{_dead_pid()}")
    shutil.copytree(path, backup)
    (path / "tokenizer.json").write_text("{}")
    before = _tree(path.parent)
    load_config(path)
    check_checkpoint_dir(path)
    MusicFlamingo.from_pretrained(path)
    stop_token_ids(path, model.config)
    assert _tree(path.parent) == before
    model.save_pretrained(path)  # a write cleans up what dead writers left
    assert not backup.exists() and (path / "tokenizer.json").is_file()


def test_check_checkpoint_dir_names_what_is_missing(tiny_dir, tmp_path):
    _, path = tiny_dir
    with pytest.raises(CheckpointError, match="ckpt is not set"):
        check_checkpoint_dir(None)
    with pytest.raises(CheckpointError, match=r"ckpt=.*nope is not a folder"):
        check_checkpoint_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"ckpt=.*config.json is a file, not a folder"):
        check_checkpoint_dir(path / "config.json")
    with pytest.raises(CheckpointError, match=rf"ckpt={path} has no tokenizer.json or tokenizer.model"):
        check_checkpoint_dir(path)
    assert check_checkpoint_dir(path, need_tokenizer=False) == path
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"ckpt={path} has no config.json"):
        check_checkpoint_dir(path, need_tokenizer=False)


def test_stop_token_ids_read_generation_config(tiny_dir):
    model, path = tiny_dir
    eos = model.config.text.eos_token_id
    assert stop_token_ids(path, model.config) == [eos]  # save_pretrained writes the config's eos
    gen = path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [7, eos, 3]}))
    assert stop_token_ids(path, model.config) == sorted({3, 7, eos})
    gen.write_text(json.dumps({"eos_token_id": 9}))
    assert stop_token_ids(path, model.config) == sorted({9, eos})
    gen.unlink()
    assert stop_token_ids(path, model.config) == stop_token_ids(None, model.config) == [eos]
    gen.write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        stop_token_ids(path, model.config)
    for bad in ("299", [3, "299"], [True]):  # a string used to become the ids of its digits
        gen.write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(CheckpointError, match="eos_token_id must be an integer id"):
            stop_token_ids(path, model.config)


def test_state_dict_round_trip_by_name_table(tmp_path):
    """`write_state_dict` / `read_state_dict` work on plain dicts of our names, without the model class."""
    torch.manual_seed(0)
    config = MusicFlamingoConfig.from_name("tiny")
    state = MusicFlamingo(config).state_dict()
    write_state_dict(state, config, tmp_path / "c", max_shard_size="200KB")
    assert len(list((tmp_path / "c").glob("model-*.safetensors"))) > 1
    expected = {k: t.shape for k, t in state.items()}
    back = read_state_dict(tmp_path / "c", expected, dtype="bf16")
    assert back.keys() == state.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], state[k].bfloat16()) for k in state)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == "float32"


def _mapped_file_of(t: torch.Tensor) -> str | None:
    """The file whose mapping holds t's data (from /proc/self/maps), or None for anonymous memory."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            name = parts[5] if len(parts) > 5 else ""
            return name if name.startswith("/") else None  # [heap], [anon:...]: memory of its own
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_mapped_loading_uses_the_file_without_a_copy_and_equals_the_copying_path(tmp_path):
    """mmap=True (default): weights in the checkpoint's dtype are views of the safetensors file's mapping, bit for
    bit the weights of the copying path; a dtype change or mmap=False gives memory of its own."""
    from musicflamingo import MusicFlamingo, MusicFlamingoConfig

    torch.manual_seed(0)
    MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).save_pretrained(
        tmp_path / "ck", max_shard_size="200KB"
    )
    mapped = MusicFlamingo.from_pretrained(tmp_path / "ck")
    copied = MusicFlamingo.from_pretrained(tmp_path / "ck", mmap=False)
    converted = MusicFlamingo.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    for (name, a), b in zip(mapped.state_dict().items(), copied.state_dict().values()):
        assert torch.equal(a, b), name
    w = mapped.language_model.layers[0].mlp.up_proj.weight
    assert (_mapped_file_of(w) or "").endswith(".safetensors")
    assert _mapped_file_of(copied.language_model.layers[0].mlp.up_proj.weight) is None
    assert _mapped_file_of(converted.language_model.layers[0].mlp.up_proj.weight) is None
    with torch.no_grad():  # copy-on-write: training a mapped model never writes the checkpoint
        w.add_(1.0)
    again = MusicFlamingo.from_pretrained(tmp_path / "ck", mmap=False)
    assert torch.equal(
        again.language_model.layers[0].mlp.up_proj.weight, copied.language_model.layers[0].mlp.up_proj.weight
    )


def test_init_from_names_the_overrides_its_checkpoint_does_not_hold(tmp_path, caplog):
    """model.net.overrides beside init_from: the checkpoint's shapes are used, and overrides it contradicts are
    named in a warning (they were dropped silently); ones it agrees with pass quietly."""
    import logging

    from tiny_checkpoint import write_tiny_checkpoint

    from musicflamingo.model.build import create_model

    ckpt = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    config = load_config(ckpt)
    with caplog.at_level(logging.WARNING):
        model = create_model("tiny", {"audio": {"max_source_positions": 50}}, init_from=ckpt)
    assert model.config.audio.max_source_positions == config.audio.max_source_positions != 50
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "model.net.overrides audio.max_source_positions ignored" in message
    assert f"audio.max_source_positions={config.audio.max_source_positions}" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_model(
            "tiny", {"audio": {"max_source_positions": config.audio.max_source_positions}}, init_from=ckpt
        )
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_quantized_save_does_not_replace_other_weights_unless_told(tmp_path):
    """`from_pretrained(DIR, quantize="int8")` then `save_pretrained(DIR)` (the README's DIR_INT8 mistyped) replaced
    the downloaded bf16 weights by int8 ones without a word, for good. Refused now unless `overwrite`; the folder is
    left byte for byte; re-saving into a folder of the same quantization is fine."""
    from musicflamingo.model.quantize import quantize_model

    torch.manual_seed(0)
    src = tmp_path / "release"
    MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).to(torch.bfloat16).save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    model = MusicFlamingo.from_pretrained(src, quantize="int8")
    with pytest.raises(
        CheckpointError, match=r"release holds unquantized weights.*release-int8.*overwrite=True"
    ):
        model.save_pretrained(src)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    model.save_pretrained(tmp_path / "release-int8")
    model.save_pretrained(tmp_path / "release-int8")  # its own kind: replaced as any re-save
    int4 = quantize_model(MusicFlamingo.from_pretrained(src), "int4")
    with pytest.raises(CheckpointError, match=r"release-int8 holds int8 weights: saving the int4 model"):
        int4.save_pretrained(tmp_path / "release-int8")
    model.save_pretrained(src, overwrite=True)
    assert MusicFlamingo.from_pretrained(src).quantization == "int8"
    assert (src / "tokenizer.json").read_text() == "{}"
    # and the copy without the processor files says how to get them, rather than only that they are missing
    with pytest.raises(CheckpointError, match=r"no tokenizer.json .*MusicFlamingoProcessor.from_pretrained"):
        check_checkpoint_dir(tmp_path / "release-int8")


def test_weights_quantized_otherwise_than_config_json_says_are_named(tmp_path):
    """A quantized folder whose config.json lost (or changed) its quantization_config listed ~30 unexpected keys and
    wrong dtypes; the message now starts with the one fact behind them."""
    from musicflamingo.model.quantize import quantize_model

    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).to(torch.bfloat16).eval()
    quantize_model(model, "int4").save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"its weights are int4 but config.json says not quantized"):
        MusicFlamingo.from_pretrained(tmp_path / "q")
    cfg["quantization_config"] = {"quant_method": "musicflamingo_int8"}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"its weights are int4 but config.json says int8"):
        MusicFlamingo.from_pretrained(tmp_path / "q")
