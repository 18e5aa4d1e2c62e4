"""LoRA under trainer.precision=bf16-true (review round 10, lora-precision journey).

Lightning's bf16-true casts the whole module to bfloat16, the adapters included: AdamW's updates below half a bf16
ulp of A and B rounded away, and the moments were bf16 too. peft keeps adapters float32 over a bf16 base
(`autocast_adapter_dtype`); so do we now (`lora.FloatAdapters`), with peft's numerics, an exact resume, and the
merged export computed from the float32 adapters and stored in the base's dtype.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.model.lora import LoRALinear, QuantizedLoRALinear, apply_lora
from musicflamingo.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cases import Int8StandIn  # noqa: E402  (the CPU stand-in for bitsandbytes' NF4 base)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.o_proj = nn.Linear(24, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.tanh(self.q_proj(x)))


def _randomised_b(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_over_a_bf16_base_computes_peft_s_float32_adapters_bit_for_bit():
    """The same bf16 base and A/B under peft's default (float32 adapters, the input cast to them, the sum rounded to
    the base's bf16): identical outputs and A/B gradients (our adapters were bf16 over a bf16 base)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Block().to(torch.bfloat16)
    ours = copy.deepcopy(base)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj"]))
    _randomised_b(ref)
    apply_lora(ours, rank=4, alpha=12, dropout=0.0, targets=["q_proj", "o_proj"])
    for name in ("q_proj", "o_proj"):
        theirs = getattr(ref.base_model.model, name)
        mine = getattr(ours, name)
        assert theirs.lora_A["default"].weight.dtype == mine.lora_A.dtype == torch.float32
        assert mine.weight.dtype == torch.bfloat16
        with torch.no_grad():
            mine.lora_A.copy_(theirs.lora_A["default"].weight)
            mine.lora_B.copy_(theirs.lora_B["default"].weight)
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    out, want = ours(x), ref(x)
    assert out.dtype == want.dtype == torch.bfloat16
    assert torch.equal(out, want)
    out.float().square().sum().backward()
    want.float().square().sum().backward()
    for name in ("q_proj", "o_proj"):
        theirs, mine = getattr(ref.base_model.model, name), getattr(ours, name)
        assert torch.equal(mine.lora_A.grad, theirs.lora_A["default"].weight.grad)
        assert torch.equal(mine.lora_B.grad, theirs.lora_B["default"].weight.grad)


@pytest.mark.parametrize("kind", ["plain", "quantized"])
def test_adapters_stay_float32_through_a_half_cast_and_follow_moves_and_widening(kind):
    """`module.to(torch.bfloat16)` (bf16-true's convert_module) and `.half()` leave A, B and their gradients
    float32 with the bits they had; the base is cast; `.double()` and device moves still apply to them."""
    block = _Block()
    apply_lora(
        block,
        rank=4,
        alpha=8,
        dropout=0.0,
        targets=["q_proj"],
        quantized=Int8StandIn if kind == "quantized" else None,
    )
    layer = block.q_proj
    assert isinstance(layer, QuantizedLoRALinear if kind == "quantized" else LoRALinear)
    _randomised_b(block)
    block(torch.randn(2, 16)).sum().backward()
    a, b, grad = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.lora_A.grad.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(block)
        assert (layer.base if kind == "quantized" else layer).bias.dtype in (torch.bfloat16, torch.float16)
        assert torch.equal(layer.lora_A, a) and torch.equal(layer.lora_B, b)
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.lora_A.grad.dtype == torch.float32
        assert torch.equal(layer.lora_A.grad, grad)
    block.to(torch.bfloat16)
    y = block(torch.randn(2, 16, dtype=torch.bfloat16))  # runs with a bf16 input over float32 adapters
    assert y.dtype == torch.bfloat16
    block.double()
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.grad.dtype == torch.float64
    block.to("meta")
    assert layer.lora_A.is_meta and layer.lora_A.dtype == torch.float64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_bf16")
    return write_processor(root / "proc"), write_dataset(root / "data", n=4)


BF16_LORA = [
    "experiment=lora",
    "trainer.precision=bf16-true",
    "model.net.gradient_checkpointing=true",
    "model.net.lora.dropout=0.1",
    "data.batch_max_tokens=800",
    "model.scheduler.max_steps=6",
    "model.scheduler.warmup_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.log_every_n_steps=1",
]


def _train(tmp: Path, assets, overrides: list[str]) -> dict:  # noqa: ANN001
    proc, manifest = assets
    return train(compose_train(tmp, manifest, proc, BF16_LORA + overrides))[1]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert v.dtype == b["state_dict"][k].dtype and torch.equal(v, b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


def test_bf16_true_lora_trains_float32_adapters_resumes_exactly_and_exports_from_them(assets, tmp_path):
    """experiment=lora trainer.precision=bf16-true (gradient checkpointing, adapter dropout): the frozen base is
    bf16, the adapters and their AdamW moments float32; 2 steps + a resume to 4 equal 4 steps bit for bit; the
    merged export is bf16 computed from the float32 adapters, the peft export float32 (adapters were bf16)."""
    whole = _train(tmp_path / "whole", assets, ["trainer.max_steps=4", "export=true", "export_adapters=true"])
    _train(tmp_path / "cut", assets, ["trainer.max_steps=2", "export=false"])
    _train(tmp_path / "cut", assets, ["trainer.max_steps=4", "export=false", "ckpt_path=last"])
    a, b = _ckpt(tmp_path / "whole" / "run"), _ckpt(tmp_path / "cut" / "run")
    assert a["global_step"] == b["global_step"] == 4
    _assert_same_training_state(a, b)

    state = a["state_dict"]
    adapters = {k: v for k, v in state.items() if k.endswith(("lora_A", "lora_B"))}
    assert adapters and {v.dtype for v in adapters.values()} == {torch.float32}
    assert state["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    optimizer = a["optimizer_states"][0]
    dtypes = {
        g["name"]: {optimizer["state"][i][m].dtype for i in g["params"] for m in ("exp_avg", "exp_avg_sq")}
        for g in optimizer["param_groups"]
    }
    # the adapters' moments float32; the projector experiment=lora trains whole is cast with the base (as peft's
    # modules_to_save)
    assert dtypes == {
        "language_model": {torch.float32},
        "multi_modal_projector": {torch.bfloat16},
        "multi_modal_projector_no_decay": {torch.bfloat16},
    }

    lit = whole["model"]
    layer = lit.model.language_model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    prefix = "model.language_model.layers.0.self_attn.q_proj."
    merged = (
        state[prefix + "weight"].float() + (state[prefix + "lora_B"] @ state[prefix + "lora_A"]) * layer.scale
    ).to(torch.bfloat16)
    exported = {}
    for f in sorted(Path(whole["export_dir"]).glob("*.safetensors")):
        exported.update(load_file(f))
    q = exported["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and torch.equal(q, merged)
    adapter = load_file(Path(whole["export_adapter_dir"]) / "adapter_model.safetensors")
    a_key = next(k for k in adapter if "layers.0.self_attn.q_proj.lora_A" in k)
    assert adapter[a_key].dtype == torch.float32 and torch.equal(adapter[a_key], state[prefix + "lora_A"])


def test_a_checkpoint_with_bf16_adapters_resumes_in_float32_and_says_so(assets, tmp_path, caplog):
    """A bf16-true LoRA checkpoint written before this change (adapters and moments bf16) resumes: the saved values
    load exactly into float32 adapters and moments, and a warning names the checkpoint and why."""
    _train(tmp_path / "old", assets, ["trainer.max_steps=2", "export=false"])
    path = tmp_path / "old" / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        if k.endswith(("lora_A", "lora_B")):
            ckpt["state_dict"][k] = v.to(torch.bfloat16)
    for s in ckpt["optimizer_states"][0]["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            s[key] = s[key].to(torch.bfloat16)
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        objects = _train(tmp_path / "old", assets, ["trainer.max_steps=3", "export=false", "ckpt_path=last"])
    assert objects["trainer"].global_step == 3
    assert any(
        "LoRA adapter tensors in bfloat16" in r.getMessage() and str(path) in r.getMessage()
        for r in caplog.records
    )
    layer = objects["model"].model.language_model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.float32
    state = objects["trainer"].optimizers[0].state[layer.lora_A]
    assert state["exp_avg"].dtype == torch.float32


@pytest.mark.slow
def test_full_fine_tune_under_bf16_true_is_all_bf16(assets, tmp_path):
    """No adapters: bf16-true still casts every weight and AdamW moment to bf16 (nothing kept float32 by mistake)."""
    proc, manifest = assets
    overrides = [
        "trainer.precision=bf16-true",
        "trainer.max_steps=1",
        "export=false",
        "data.batch_max_tokens=800",
    ]
    _, objects = train(compose_train(tmp_path, manifest, proc, overrides))
    params = list(objects["model"].model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    states = objects["trainer"].optimizers[0].state.values()
    assert {s["exp_avg"].dtype for s in states} == {torch.bfloat16}


def test_fsdp_keeps_adapters_following_the_base_cast_and_says_so(caplog):
    """FSDP flattens a block's weights into one tensor of one dtype: under Lightning's own FSDP strategy the adapters
    follow bf16-true's cast (as before) with a warning naming what keeps them float32, instead of FSDP's error on
    mixed dtypes; configs/trainer/fsdp.yaml's strategy keeps them float32 (tests/test_lora_review12.py) and says
    nothing."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from musicflamingo.distributed import fsdp_strategy
    from musicflamingo.lit import MusicFlamingoLit
    from musicflamingo.model.build import PARTS

    block = _Block()
    apply_lora(block, rank=2, alpha=2, dropout=0.0, targets=["q_proj"])
    lit = MusicFlamingoLit(
        block,
        torch.optim.AdamW,
        None,
        dict.fromkeys(PARTS),
        "stop",  # type: ignore[arg-type]
    )
    lit._trainer = SimpleNamespace(strategy=fsdp_strategy(), precision="bf16-true")
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        lit.setup("fit")
    assert "LoRA adapters" not in caplog.text and block.q_proj.keep_float32
    lit._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="bf16-true")
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        lit.setup("fit")
    assert "trainer.precision=bf16-mixed keeps them float32" in caplog.text
    block.to(torch.bfloat16)
    assert block.q_proj.lora_A.dtype == torch.bfloat16
