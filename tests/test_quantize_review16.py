"""QLoRA review (round 16, quantize-qlora journey): resuming a QLoRA run, and peft's numerics over a 4-bit base.

bitsandbytes' NF4 class runs on its CPU kernels here; `model.net.quantize_base` itself refuses machines without CUDA,
so the tests let it through (`check_quantize_base` with `here=False`, the check a plan for another machine makes).
As on a GPU, bitsandbytes quantizes each base as the model moves to its device, and Lightning restores a checkpoint
before that move.
"""

from __future__ import annotations

import pytest
import torch
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.lit import state_dict_mismatches
from musicflamingo.model.lora import QuantizedLoRALinear, check_quantize_base

pytest.importorskip("bitsandbytes")

TINY = {"audio": {"max_source_positions": 100}}
LORA = {"enabled": True, "rank": 4, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]}
FREEZE = {"audio_tower": True, "multi_modal_projector": False, "language_model": True}


def _let_cpu_quantize(monkeypatch) -> None:  # noqa: ANN001
    import musicflamingo.model.build as build
    import musicflamingo.settings as settings

    def plan_check(value, cuda_available=None, here=True):  # noqa: ANN001, ANN202, ARG001
        check_quantize_base(value, here=False)

    monkeypatch.setattr(build, "check_quantize_base", plan_check)
    monkeypatch.setattr(settings, "check_quantize_base", plan_check)


def _qlora(seed: int = 0):  # noqa: ANN202
    from musicflamingo.model.build import build_model

    return build_model(
        preset="tiny",
        overrides=TINY,
        init_from=None,
        seed=seed,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze=FREEZE,
        lora=LORA,
        quantize_base="nf4",
    )


def _batch(model):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.text.vocab_size, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def test_a_qlora_state_dict_loads_into_the_rebuilt_unquantized_model(monkeypatch):
    """What `ckpt_path=last` does with a QLoRA run: the model is rebuilt (its bases not yet quantized: that happens
    when it moves to its device) and the checkpoint's state loaded into it. The 4-bit weights were saved packed, with
    bitsandbytes' quant_state keys, so every QLoRA resume was refused ("another architecture": q_proj.base.weight
    [2048, 1] there, [64, 64] here). The frozen base is no longer stored: the state dict holds the adapters, the
    trained parts and each base's bias and digest, loads strictly before the move, and computes the same logits."""
    _let_cpu_quantize(monkeypatch)
    trained = _qlora().to("cpu")  # quantized here, as on the GPU
    adapter = trained.language_model.layers[0].self_attn.q_proj
    assert isinstance(adapter, QuantizedLoRALinear) and adapter.base.weight.bnb_quantized
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    state = trained.state_dict()
    assert not any(t.dtype == torch.uint8 or ".weight." in k for k, t in state.items()), "4-bit base stored"
    assert "language_model.layers.0.self_attn.q_proj.base.bias" in state  # Qwen2's q/k/v biases are kept

    resumed = _qlora()
    assert not resumed.language_model.layers[0].self_attn.q_proj.base.weight.bnb_quantized
    assert state_dict_mismatches(state, resumed.state_dict()) == []  # lit's check before Lightning's load
    resumed.load_state_dict(state, strict=True)
    resumed.to("cpu")
    batch = _batch(trained)
    with torch.no_grad():
        want = trained(**batch).logits
        got = resumed(**batch).logits
    assert torch.equal(got, want)


def test_a_qlora_resume_over_another_base_is_refused_naming_the_layer(monkeypatch):
    """The base a resume rebuilds must be the one the adapters were trained over (another init_from or seed would
    silently train them on over other weights): the checkpoint's digest of each base says so, by layer."""
    _let_cpu_quantize(monkeypatch)
    state = _qlora(seed=0).to("cpu").state_dict()
    other = _qlora(seed=1)
    with pytest.raises(
        RuntimeError, match=r"self_attn\.q_proj\.base: the frozen 4-bit base weight .* model\.net\.init_from"
    ):
        other.load_state_dict(state, strict=True)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-true", "bf16-mixed"])
def test_qlora_branch_is_peft_s_bnb_linear4bit_bit_for_bit(autocast):
    """The same NF4 base and float32 A/B in peft's bnb `Linear4bit` LoRA layer: identical outputs and A/B gradients
    with alpha / rank = 10 / 3. The branch was rounded to the base output's dtype before the scale (twice rounded: a
    bf16 ulp off peft's) and, under autocast, scaled in float32 where peft scales in bf16."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import bnb as peft_bnb

    from musicflamingo.model.lora import nf4_linear_class

    if not hasattr(peft_bnb, "Linear4bit"):
        pytest.skip("peft without its bitsandbytes layers")
    torch.manual_seed(0)
    base = nf4_linear_class().from_linear(torch.nn.Linear(64, 96).to(torch.bfloat16)).to("cpu")
    ours = QuantizedLoRALinear(base, 3, 10.0, 0.0, torch.bfloat16)
    with torch.no_grad():
        ours.lora_B.normal_()
    config = peft.LoraConfig(r=3, lora_alpha=10)
    theirs = peft_bnb.Linear4bit(base, adapter_name="default", config=config, r=3, lora_alpha=10)
    theirs.lora_A.float()  # peft's autocast_adapter_dtype
    theirs.lora_B.float()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 64, dtype=torch.float32 if autocast else torch.bfloat16)
    outputs = []
    for layer, (a, b) in (
        (ours, (ours.lora_A, ours.lora_B)),
        (theirs, (theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.float().square().sum().backward()
        outputs.append((y.detach(), a.grad.clone(), b.grad.clone()))
    (y1, a1, b1), (y2, a2, b2) = outputs
    assert y1.dtype == y2.dtype and torch.equal(y1, y2)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.slow
def test_qlora_training_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """`train.py experiment=lora model.net.quantize_base=nf4`: 2 steps + `ckpt_path=last` to 4 equal 4 steps (state,
    optimizer moments, loss) bit for bit; the 4-bit base is not in last.ckpt. The resume crashed before."""
    from musicflamingo.training import train

    _let_cpu_quantize(monkeypatch)
    proc, manifest = write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=4)
    base = [
        "experiment=lora",
        "model.net.quantize_base=nf4",
        "data.batch_max_tokens=800",
        "model.scheduler.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "export=false",
    ]

    def run(where: str, *more: str) -> dict:
        return train(compose_train(tmp_path / where, manifest, proc, base + list(more)))[0]

    whole = run("whole", "trainer.max_steps=4")
    run("cut", "trainer.max_steps=2")
    cut = run("cut", "trainer.max_steps=4", "ckpt_path=last")
    assert whole["train/loss"] == cut["train/loss"]
    a, b = (
        torch.load(tmp_path / w / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for w in ("whole", "cut")
    )
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert not any(v.dtype == torch.uint8 for v in a["state_dict"].values())
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(
            sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]
        )


@pytest.mark.parametrize("bias", ["lora_only", "all", "lora_only_on_a_linear_only_the_folder_adapts"])
def test_a_peft_folder_with_biases_starts_a_qlora_run_and_exports_them_back(tmp_path, monkeypatch, bias):
    """init_from_peft of a folder with trained biases (peft's bias="lora_only" / "all": an adapted linear's bias is
    `<linear>.base_layer.bias`) under quantize_base: the bias of an adapted linear lives in its 4-bit base
    (`q_proj.base.bias`), so the folder was refused ("q_proj.bias: not a parameter of this model"). It loads into
    the base, and the adapter export writes it back under peft's name; so does the bias of a linear that only the
    folder adapts (k_proj, not in model.net.lora.targets: a quantized base when the bias was read, wrapped after)."""
    import json

    from safetensors.torch import load_file, save_file

    from musicflamingo.model import MusicFlamingo
    from musicflamingo.model.config import MusicFlamingoConfig
    from musicflamingo.model.lora import apply_lora
    from musicflamingo.model.peft_format import save_peft_adapter

    _let_cpu_quantize(monkeypatch)
    plain = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", **TINY)).requires_grad_(False)
    extra = bias.startswith("lora_only_on")
    targets = ("q_proj", "v_proj", "down_proj", *(("k_proj",) if extra else ()))
    apply_lora(plain.language_model, rank=4, alpha=16, dropout=0.0, targets=targets)
    folder = save_peft_adapter(plain, tmp_path / "adapter", modules_to_save=[])
    tensors = load_file(folder / "adapter_model.safetensors")
    q_bias = "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.bias"
    k_bias = f"base_model.model.model.language_model.layers.0.self_attn.k_proj.{'base_layer.' if extra else ''}bias"
    trained = {q_bias: torch.randn(64)} | ({k_bias: torch.randn(32)} if bias != "lora_only" else {})
    save_file({**tensors, **trained}, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    bias = "lora_only" if extra else bias
    (folder / "adapter_config.json").write_text(json.dumps({**config, "bias": bias}))

    model = _qlora_with(init_from_peft=str(folder))
    attn = model.language_model.layers[0].self_attn
    assert torch.equal(attn.q_proj.base.bias.float(), trained[q_bias])
    if k_bias in trained:
        k = attn.k_proj.base if extra else attn.k_proj
        assert isinstance(attn.k_proj, QuantizedLoRALinear) == extra
        assert torch.equal(k.bias.float(), trained[k_bias])
    back = save_peft_adapter(model, tmp_path / "export", modules_to_save=[])
    written = load_file(back / "adapter_model.safetensors")
    assert json.loads((back / "adapter_config.json").read_text())["bias"] == bias
    for key, value in trained.items():
        assert torch.equal(written[key].float(), value), key


def _qlora_with(**lora):  # noqa: ANN003, ANN202
    from musicflamingo.model.build import build_model

    return build_model(
        preset="tiny",
        overrides=TINY,
        init_from=None,
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze=FREEZE,
        lora={**LORA, **lora},
        quantize_base="nf4",
    )
