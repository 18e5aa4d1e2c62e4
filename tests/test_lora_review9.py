"""Our LoRA against `peft`'s on the reference model (review round 9, lora-peft journey).

Same A and B give the same logits, loss and A/B gradients as `peft.get_peft_model` on the reference with the same
rank, alpha, dropout and targets, and the same merged weights. peft's folder layout (`adapter_config.json` +
`adapter_model.safetensors`) had no reader or writer here: an adapter trained with peft could not be used, and ours
could not go to peft. `load_peft_adapter` / `save_peft_adapter` (model/peft_format.py) do both, rank and alpha
patterns, rsLoRA, the audio tower peft's bare names also adapt, and the projector `experiment=lora` trains
(peft's `modules_to_save`) included; variants we do not compute (DoRA, ...) are refused by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from reference_model import make_reference_model
from safetensors.torch import load_file

from musicflamingo import MusicFlamingo
from musicflamingo.checkpoint import CheckpointError
from musicflamingo.model.build import add_lora
from musicflamingo.model.lora import LORA_TARGETS, LoRALinear, QuantizedLoRALinear, merge_lora
from musicflamingo.model.peft_format import load_peft_adapter, save_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cases import Int8StandIn  # noqa: E402  (the CPU stand-in for bitsandbytes' NF4 base, as test_planner's)

LORA = {"enabled": True, "rank": 4, "alpha": 12, "dropout": 0.0, "targets": list(LORA_TARGETS)}


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    make_reference_model(seed=0).save_pretrained(path)
    return path


def _ref(ref_dir):
    return transformers.MusicFlamingoForConditionalGeneration.from_pretrained(ref_dir, dtype=torch.float32)


def _ours(ref_dir):
    return MusicFlamingo.from_pretrained(ref_dir, dtype=torch.float32)


def _batch(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text, one audio window between its markers, more text; labels on the last 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, config.audio_token_id, (n,), generator=g)  # noqa: E731
    audio = [config.audio_bos_token_id] + [config.audio_token_id] * config.audio.tokens_per_window
    ids = torch.cat([text(3), torch.tensor(audio + [config.audio_eos_token_id]), text(8)])[None]
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": 0.5
        * torch.randn(1, config.audio.num_mel_bins, config.audio.mel_frames, generator=g),
        "input_features_mask": torch.ones(1, config.audio.mel_frames, dtype=torch.int32),
        "labels": labels,
    }


def _randomise(model, names=("lora_B",), std=0.05, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(names):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


def test_our_adapters_are_peft_ones_and_our_folder_loads_in_peft(ref_dir, tmp_path):
    """Ours, trained (B and the projector changed, dropout 0.3), saved with save_peft_adapter: PeftModel.from_pretrained on the
    reference adapts exactly our 21 linears (not the audio tower's q/k/v_proj a bare target list reaches), stores the
    trained projector (modules_to_save), and gives the same loss (dropout masks included), A/B gradients, merged weights and logits."""
    ours = _ours(ref_dir)
    ours.audio_tower.requires_grad_(
        False
    )  # experiment=lora: encoder frozen, projector trained, LM under adapters
    add_lora(ours, {**LORA, "dropout": 0.3})
    _randomise(ours, ("lora_B", "multi_modal_projector.linear_1.weight"))
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(ref_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12, 0.3)
    assert config["modules_to_save"] == ["multi_modal_projector"]

    ref = peft.PeftModel.from_pretrained(_ref(ref_dir), tmp_path / "adapter", is_trainable=True)
    adapted = sorted(n for n, m in ref.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert len(adapted) == 7 * ours.config.text.num_hidden_layers
    assert all(".language_model.layers." in n for n in adapted)
    bare = peft.get_peft_model(
        _ref(ref_dir), peft.LoraConfig(r=4, lora_alpha=12, target_modules=list(LORA_TARGETS))
    )
    assert any(
        "audio_tower" in n for n, m in bare.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    )

    batch = _batch(ours.config)
    ours.train()
    ref.train()
    # dropout on the adapters' input only, as peft's: the same seed draws the same masks in the same order
    torch.manual_seed(5)
    out = ours(**batch)
    torch.manual_seed(5)
    want = ref(**batch)
    torch.testing.assert_close(out.loss, want.loss, atol=1e-6, rtol=0)
    out.loss.backward()
    want.loss.backward()
    ours_grads = _grads(
        ours
    )  # language_model.layers.0.self_attn.q_proj.lora_A: the reference's name, trimmed
    ref_grads = {
        n.replace("base_model.model.model.", "").replace(".default.weight", ""): g
        for n, g in _grads(ref).items()
    }
    assert len(ours_grads) == len(ref_grads) == 2 * len(adapted)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5)

    merged = ref.merge_and_unload()
    merge_lora(ours)
    torch.testing.assert_close(
        ours.language_model.layers[1].mlp.down_proj.weight,
        merged.model.language_model.layers[1].mlp.down_proj.weight,
        atol=1e-6,
        rtol=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(**batch).logits, merged.eval()(**batch).logits, atol=1e-5, rtol=0
        )


def test_a_peft_adapter_folder_loads_into_ours_with_identical_logits(ref_dir, tmp_path):
    """peft's usual setup on the reference: bare target names (the audio tower's q/v_proj adapted too), a rank and an
    alpha pattern, the projector in modules_to_save, rsLoRA scaling. load_peft_adapter on our model of the same base
    computes its logits; merged, too."""
    ref = peft.get_peft_model(
        _ref(ref_dir),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
            modules_to_save=["multi_modal_projector"],
        ),
    )
    _randomise(ref, ("lora_B.default.weight", "modules_to_save.default.linear_2.weight"))
    ref.save_pretrained(tmp_path / "adapter")

    ours = _ours(ref_dir)
    names = load_peft_adapter(ours, tmp_path / "adapter")
    assert "audio_tower.layers.0.self_attn.q_proj" in names and len(names) == 2 * 2 + 3 * 3
    q1 = ours.language_model.layers[1].self_attn.q_proj
    assert isinstance(q1, LoRALinear) and q1.scale == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(r)
    assert ours.language_model.layers[0].mlp.down_proj.rank == 2

    batch = _batch(ours.config, seed=3)
    batch.pop("labels")
    with torch.no_grad():
        want = ref.eval()(**batch).logits
        torch.testing.assert_close(ours.eval()(**batch).logits, want, atol=1e-5, rtol=0)

    # and back to peft: the audio tower's adapters, both patterns and rsLoRA's scale survive the trip
    with pytest.raises(
        CheckpointError, match=r"audio_tower.*which holds adapters, requires grad.*modules_to_save"
    ):
        save_peft_adapter(ours, tmp_path / "again")  # from_pretrained: every part trainable, adapters in all
    save_peft_adapter(ours, tmp_path / "again", modules_to_save=["multi_modal_projector"])
    back = peft.PeftModel.from_pretrained(_ref(ref_dir), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, want, atol=1e-5, rtol=0)
        merge_lora(ours)
        torch.testing.assert_close(ours(**batch).logits, want, atol=1e-5, rtol=0)


def test_peft_folders_we_cannot_compute_are_refused_by_name(ref_dir, tmp_path):
    """A DoRA adapter, a model folder given for the adapter, an adapter of another model's shapes, and adapters for
    an inference-quantized (int8) model: one CheckpointError each, naming what is wrong, and nothing is loaded."""
    ours = _ours(ref_dir)
    ref = peft.get_peft_model(
        _ref(ref_dir),
        peft.LoraConfig(r=2, target_modules=[r"model.language_model.layers.0.self_attn.q_proj"]),
    )
    ref.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())

    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
    )
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"use_dora=True.*LoRA variant"):
        load_peft_adapter(ours, tmp_path / "dora")
    with pytest.raises(CheckpointError, match=r"not a peft adapter folder.*MusicFlamingo.from_pretrained"):
        load_peft_adapter(ours, ref_dir)

    (tmp_path / "rank").mkdir()
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    (tmp_path / "rank" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj.*rank 2, the config says 3"):
        load_peft_adapter(ours, tmp_path / "rank")
    assert type(ours.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing was loaded

    from musicflamingo.model.quantize import quantize_model

    with pytest.raises(CheckpointError, match=r"q_proj: a Int8Linear, which takes no adapter.*merge_lora"):
        load_peft_adapter(quantize_model(_ours(ref_dir), "int8"), tmp_path / "plain")


def test_qlora_adapters_round_trip_through_the_peft_layout(ref_dir, tmp_path):
    """QLoRA (a quantized stand-in base under the adapters): its adapters save in peft's layout, load onto a fresh
    QLoRA model and onto a plain float one; both compute what the saved model does (the plain one on the float
    weights the base was quantized from: close, not equal)."""
    qlora = _ours(ref_dir)
    add_lora(qlora, LORA, quantized=Int8StandIn)
    _randomise(qlora)
    save_peft_adapter(qlora, tmp_path / "adapter", modules_to_save=[])
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(keys) == 2 * 7 * qlora.config.text.num_hidden_layers and all(".lora_" in k for k in keys)

    again = _ours(ref_dir)
    add_lora(again, {**LORA, "alpha": 1}, quantized=Int8StandIn)  # another alpha: the file's wins
    load_peft_adapter(again, tmp_path / "adapter")
    assert isinstance(again.language_model.layers[0].mlp.up_proj, QuantizedLoRALinear)
    plain = _ours(ref_dir)
    load_peft_adapter(plain, tmp_path / "adapter")
    batch = _batch(qlora.config, seed=5)
    batch.pop("labels")
    with torch.no_grad():
        want = qlora.eval()(**batch).logits
        torch.testing.assert_close(again.eval()(**batch).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(plain.eval()(**batch).logits, want, atol=0.05, rtol=0)


def test_qlora_adapters_lie_where_a_bias_free_base_lies():
    """QuantizedLoRALinear put its adapters where the base's bias was, else on the CPU: over a bias-free base on the
    GPU (o_proj, the MLP), A and B stayed on the CPU and the first forward failed on two devices. The meta device
    stands in for the GPU here."""
    with torch.device("meta"):
        base = Int8StandIn.from_linear(torch.nn.Linear(32, 16, bias=False))
    adapter = QuantizedLoRALinear(base, rank=4, alpha=8, dropout=0.0, dtype=torch.float32)
    assert adapter.lora_A.device.type == adapter.lora_B.device.type == "meta"


def test_training_starts_from_a_peft_adapter_folder(ref_dir, tmp_path):
    """`model.net.lora.init_from_peft=<folder>`: the model training builds carries that folder's adapters (same
    logits as the model that wrote it), still trainable; without LoRA enabled, or pointing at no adapter folder,
    the setting is refused by name before anything is built."""
    from omegaconf import OmegaConf
    from train_fixtures import compose_train

    from musicflamingo.model.build import build_model
    from musicflamingo.settings import SettingsError, check_train_settings

    def build(**lora_extra):
        lora = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
        freeze = {"audio_tower": True, "multi_modal_projector": True, "language_model": False}
        return build_model(
            preset=None, overrides={}, init_from=str(ref_dir), seed=0, rote_quirk=True,
            gradient_checkpointing=False, compile=False, freeze=freeze, lora=lora | lora_extra,
        )  # fmt: skip

    trained = build()
    _randomise(trained, ("lora_A", "lora_B"))
    folder = save_peft_adapter(trained, tmp_path / "adapter")
    resumed, fresh = build(init_from_peft=str(folder)), build(init_from_peft=None)
    batch = _batch(trained.config)
    with torch.no_grad():
        want = trained(**batch).logits
        assert torch.equal(resumed(**batch).logits, want)
        assert not torch.allclose(fresh(**batch).logits, want)
    assert all(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)

    def settings(*overrides):
        cfg = compose_train(tmp_path, tmp_path / "m.jsonl", tmp_path / "proc", list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)

    with pytest.raises(SettingsError, match=r"init_from_peft=.*needs model.net.lora.enabled=true"):
        check_train_settings(settings(f"model.net.lora.init_from_peft={folder}"))
    with pytest.raises(SettingsError, match=r"init_from_peft=.*expected a peft adapter folder"):
        check_train_settings(settings("experiment=lora", f"model.net.lora.init_from_peft={tmp_path}"))
    check_train_settings(settings("experiment=lora", f"model.net.lora.init_from_peft={folder}"))


def test_a_lora_run_exports_its_adapters_in_peft_layout(tmp_path):
    """`export_adapters=true` writes <run>/export_adapter beside export/: loaded over the base with other adapters
    and another projector, it computes the trained model (its trained projector came along as modules_to_save).
    Refused up front without LoRA."""
    import copy

    from omegaconf import OmegaConf
    from train_fixtures import compose_train, write_dataset, write_processor

    from musicflamingo.settings import SettingsError, check_train_settings
    from musicflamingo.training import train

    proc, manifest = write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=2)
    overrides = ["experiment=lora", "debug=fast", "export=false", "export_adapters=true"]
    _, objects = train(compose_train(tmp_path, manifest, proc, overrides))
    folder = objects["export_adapter_dir"]
    assert folder == tmp_path / "run" / "export_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["multi_modal_projector"]
    trained = objects["model"].model.eval()
    other = copy.deepcopy(trained)
    _randomise(other, ("lora_A", "lora_B", "linear_1.weight"), std=0.5, seed=7)
    ids = torch.randint(0, 290, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, trained(ids).logits)
        load_peft_adapter(other, folder)
        assert torch.equal(other(ids).logits, trained(ids).logits)

    cfg = compose_train(tmp_path / "full", manifest, proc, ["export_adapters=true"])
    with pytest.raises(SettingsError, match=r"export_adapters=True: needs model.net.lora.enabled=true"):
        check_train_settings(OmegaConf.to_container(cfg, resolve=True))
