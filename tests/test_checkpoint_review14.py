"""Review round 14, peft-checkpoint journey: adapters and checkpoints brought from the Hugging Face ecosystem (peft
folders with per-module ranks and alphas, biases, config.json dtype and sub-config variations) and exported back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_lora_review9 import _batch, _randomise

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.checkpoint import CheckpointError, load_config
from musicflamingo.model.build import build_model
from musicflamingo.model.config import ConfigError
from musicflamingo.model.lora import LoRALinear, apply_lora
from musicflamingo.model.peft_format import load_peft_adapter, save_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FREEZE = {"audio_tower": True, "multi_modal_projector": True, "language_model": False}


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from reference_model import make_reference_model

    path = tmp_path_factory.mktemp("ref")
    make_reference_model(seed=0).save_pretrained(path)
    return path


def _ref(ref_dir, dtype=torch.float32):
    return transformers.MusicFlamingoForConditionalGeneration.from_pretrained(ref_dir, dtype=dtype)


def _build(ref_dir, **lora):
    lora = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]} | lora
    return build_model(
        preset=None, overrides={}, init_from=str(ref_dir), seed=0, rote_quirk=True,
        gradient_checkpointing=False, compile=False, freeze=FREEZE, lora=lora,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- rank / alpha patterns
def test_a_peft_adapter_with_rank_and_alpha_patterns_trains_and_exports_them_back(ref_dir, tmp_path):
    """A peft adapter whose v_proj layers have their own rank and alpha (rank_pattern / alpha_pattern) could not start
    training: model.net.lora.rank's adapters were refused as 'rank 2 in the file, 4 in this model's adapter'. The
    pattern's layers are made at the file's rank; the model computes peft's logits, trains, and its exported
    adapter_config.json reproduces the patterns, which peft loads onto the reference with our outputs."""
    ref = peft.get_peft_model(
        _ref(ref_dir),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=r".*language_model.*\.(q_proj|v_proj)",
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 6},
        ),
    )
    _randomise(ref, ("lora_B.default.weight",))
    ref.save_pretrained(tmp_path / "adapter")

    model = _build(ref_dir, init_from_peft=str(tmp_path / "adapter"))
    v = model.language_model.layers[1].self_attn.v_proj
    assert isinstance(v, LoRALinear) and v.rank == 2 and v.scale == pytest.approx(3.0)
    assert model.language_model.layers[1].self_attn.q_proj.rank == 4
    assert v.lora_A.requires_grad and v.lora_B.requires_grad and not v.weight.requires_grad
    batch = _batch(model.config, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(**batch).logits, ref.eval()(**batch).logits, atol=1e-5, rtol=0
        )

    # a few steps of training on the adapters only
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = v.lora_A.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    assert not torch.equal(v.lora_A, before)

    save_peft_adapter(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["rank_pattern"].values()) == {2} and len(config["rank_pattern"]) == 3
    assert set(config["alpha_pattern"].values()) == {6} and len(config["alpha_pattern"]) == 3
    back = peft.PeftModel.from_pretrained(_ref(ref_dir), tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_a_peft_adapter_whose_plain_rank_is_not_model_net_lora_rank_names_the_setting(ref_dir, tmp_path):
    """Without a pattern, a file rank other than model.net.lora.rank stays refused, naming the setting to change."""
    ref = peft.get_peft_model(_ref(ref_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ref.save_pretrained(tmp_path / "adapter")
    message = r"rank 2 in the file, 4 in this model's adapter \(the file's r is 2.*model.net.lora.rank=2\)"
    with pytest.raises(CheckpointError, match=message):
        _build(ref_dir, init_from_peft=str(tmp_path / "adapter"))


def test_a_lora_run_from_a_mixed_rank_peft_folder_exports_the_patterns(tmp_path):
    """train() with experiment=lora from a folder whose v_proj adapters have another rank and alpha: it trains and
    its export_adapter/ keeps each layer's rank and alpha."""
    from train_fixtures import compose_train, write_dataset, write_processor

    from musicflamingo.training import train

    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", audio={"max_source_positions": 100}))
    model.requires_grad_(False)
    apply_lora(model.language_model, rank=8, alpha=16, dropout=0.0, targets=("q_proj", "k_proj", "o_proj"))
    apply_lora(model.language_model, rank=2, alpha=6, dropout=0.0, targets=("v_proj",))
    save_peft_adapter(model, tmp_path / "adapter", modules_to_save=[])
    proc, manifest = write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=2)
    overrides = [
        "experiment=lora",
        "debug=fast",
        "export_adapters=true",
        f"model.net.lora.init_from_peft={tmp_path / 'adapter'}",
    ]
    _, objects = train(compose_train(tmp_path, manifest, proc, overrides))
    trained = objects["model"].model
    assert trained.language_model.layers[0].self_attn.v_proj.rank == 2
    config = json.loads((objects["export_adapter_dir"] / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert sorted(config["rank_pattern"].values()) == [2, 2]
    assert sorted(config["alpha_pattern"].values()) == [6, 6]


# ---------------------------------------------------------------------------------------------- whole tensors
@pytest.mark.parametrize(
    "extra, trained",
    [
        ({"modules_to_save": ["lm_head"]}, ("modules_to_save.default.weight",)),
        ({"modules_to_save": ["norm"]}, ("modules_to_save.default.weight", "modules_to_save.default.bias")),
        ({"bias": "all"}, ("bias",)),
        ({"bias": "lora_only"}, ("base_layer.bias",)),
    ],
    ids=["lm_head", "norms", "bias_all", "bias_lora_only"],
)
def test_whole_tensors_of_a_peft_folder_survive_training_and_export(ref_dir, tmp_path, extra, trained):
    """init_from_peft of an adapter with an lm_head in modules_to_save (or trained biases): training froze them as
    base weights and export_adapters wrote the adapters alone, so the exported folder on the reference computed
    another model than the one trained, silently. They are written back (modules_to_save / bias as peft names them).
    bias="all" / "lora_only" folders did not even load: an adapted linear's bias is stored as peft's
    `<linear>.base_layer.bias`, refused as 'no parameter of Music Flamingo has this name'."""
    ref = peft.get_peft_model(
        _ref(ref_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **extra)
    )
    _randomise(ref, ("lora_B.default.weight", *trained))
    ref.save_pretrained(tmp_path / "adapter")
    model = _build(ref_dir, targets=["q_proj"], init_from_peft=str(tmp_path / "adapter")).eval()
    batch = _batch(model.config, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref.eval()(**batch).logits, atol=1e-5, rtol=0)
        _randomise(model, ("lora_B",), seed=5)  # as training would
        want = model(**batch).logits
    save_peft_adapter(model, tmp_path / "export")
    back = peft.PeftModel.from_pretrained(_ref(ref_dir), tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- config.json dtype
def _with_config(src, dst, edit):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    edit(raw)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(dtype="bfloat16"),
        lambda c: (c.pop("dtype", None), c.update(torch_dtype="bfloat16")),
        lambda c: c.update(dtype="float16", torch_dtype="bfloat16"),
        lambda c: (c.pop("dtype", None), c["text_config"].update(dtype="bfloat16")),
        lambda c: c.pop("dtype", None),
    ],
    ids=["dtype", "torch_dtype", "both", "text_config_only", "none"],
)
def test_dtype_none_loads_in_config_jsons_dtype_as_transformers_does(ref_dir, tmp_path, edit):
    """from_pretrained(dtype=None) kept the stored float32 where config.json says bfloat16; transformers (whose None
    is "auto") loads config.json's top-level `dtype`, else `torch_dtype`, else the weights' own."""
    path = _with_config(ref_dir, tmp_path / "ck", edit)
    want = {
        p.dtype for p in transformers.MusicFlamingoForConditionalGeneration.from_pretrained(path).parameters()
    }
    for dtype in (None, "auto"):
        assert {p.dtype for p in MusicFlamingo.from_pretrained(path, dtype=dtype).parameters()} == want
    assert {p.dtype for p in MusicFlamingo.from_pretrained(path, dtype="float32").parameters()} == {
        torch.float32
    }


def test_a_config_json_dtype_that_is_no_float_type_is_named(ref_dir, tmp_path):
    path = _with_config(ref_dir, tmp_path / "ck", lambda c: c.update(dtype="int8"))
    with pytest.raises(CheckpointError, match=r"config.json: dtype='int8': expected a floating dtype"):
        MusicFlamingo.from_pretrained(path)
    assert MusicFlamingo.from_pretrained(path, dtype=torch.float32) is not None


# ---------------------------------------------------------------------------------------------- sub-config model_type
@pytest.mark.parametrize(
    "key, value",
    [("text_config", "llama"), ("text_config", "qwen3"), ("audio_config", "whisper")],
)
def test_a_sub_config_of_another_model_type_is_refused_by_name(ref_dir, tmp_path, key, value):
    """text_config.model_type "llama" was read as qwen2 (the reference builds a Llama decoder: no q/k/v biases);
    refused naming the field, before any weight is read."""
    path = _with_config(ref_dir, tmp_path / "ck", lambda c: c[key].update(model_type=value))
    with pytest.raises(CheckpointError, match=rf"config.json: {key}.model_type='{value}': expected"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"{key}.model_type='{value}'"):
        MusicFlamingoConfig.from_hf_dict(json.loads((path / "config.json").read_text()))


def test_sub_config_model_types_the_reference_reads_as_ours_still_load(ref_dir, tmp_path):
    """No model_type (the reference's defaults) and the older musicflamingo_encoder audio name load as before."""

    def edit(c):
        c["text_config"].pop("model_type")
        c["audio_config"]["model_type"] = "musicflamingo_encoder"

    path = _with_config(ref_dir, tmp_path / "ck", edit)
    assert transformers.AutoConfig.from_pretrained(path).text_config.model_type == "qwen2"
    assert load_config(path) == load_config(ref_dir)


# ---------------------------------------------------------------------------------------------- residual inits
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_folder_whose_init_changed_the_base_is_refused_by_name(ref_dir, tmp_path, init):
    """PiSSA / OLoRA folders saved as trained (no path_initial_model_for_weight_conversion): peft loads them over the
    base minus the initial adapters, so ours computed another model (logits 3e-3 apart on the tiny reference)."""
    ref = peft.get_peft_model(
        _ref(ref_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)
    )
    ref.save_pretrained(tmp_path / "adapter")
    ours = MusicFlamingo.from_pretrained(ref_dir, dtype=torch.float32)
    with pytest.raises(
        CheckpointError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"
    ):
        load_peft_adapter(ours, tmp_path / "adapter")
    assert not any("lora_" in n for n, _ in ours.named_parameters())  # nothing loaded


def test_a_folder_holding_named_adapters_in_subfolders_names_them(ref_dir, tmp_path):
    """peft saves an adapter not named "default" in a subfolder of its name: the parent folder was refused as 'not a
    peft adapter folder' without a word about the adapters inside it."""
    ref = peft.get_peft_model(
        _ref(ref_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="music"
    )
    ref.save_pretrained(tmp_path / "saved")
    ours = MusicFlamingo.from_pretrained(ref_dir, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"subfolder\(s\) music hold peft adapters"):
        load_peft_adapter(ours, tmp_path / "saved")
    load_peft_adapter(ours, tmp_path / "saved" / "music")


def test_the_fsdp_exports_plain_copy_keeps_the_tensors_a_peft_folder_replaced_whole(ref_dir, tmp_path):
    """Under FSDP, export_adapters saves from a plain CPU copy of the trained model (`training._plain_copy`); the copy
    lost `peft_whole_tensors`, so an FSDP run started from a folder with lm_head in modules_to_save exported adapters
    without it: the exported folder on the reference computed another model than the one trained."""
    from types import SimpleNamespace

    from musicflamingo.training import _plain_copy

    ref = peft.get_peft_model(
        _ref(ref_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    _randomise(ref, ("lora_B.default.weight", "modules_to_save.default.weight"))
    ref.save_pretrained(tmp_path / "adapter")
    model = _build(ref_dir, targets=["q_proj"], init_from_peft=str(tmp_path / "adapter")).eval()
    plain = _plain_copy(model, SimpleNamespace(freeze=FREEZE), model.state_dict())
    assert plain.peft_whole_tensors == model.peft_whole_tensors and plain.peft_whole_tensors
    save_peft_adapter(plain, tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"], saved["modules_to_save"]
    batch = _batch(model.config, seed=4)
    back = peft.PeftModel.from_pretrained(_ref(ref_dir), tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
