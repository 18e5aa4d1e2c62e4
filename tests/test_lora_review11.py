"""LoRA adapters kept float32 over a half-precision base (review round 11, lora-fp32 journey: a second look at
round 10's `lora.FloatAdapters`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from musicflamingo.model.lora import QuantizedLoRALinear, apply_lora, merge_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cases import Int8StandIn  # noqa: E402  (the CPU stand-in for bitsandbytes' NF4 base)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.k_proj = nn.Linear(16, 24)
        self.o_proj = nn.Linear(24, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.tanh(self.q_proj(x) + self.k_proj(x)))


def test_qlora_merged_without_a_dtype_is_one_dtype_and_runs():
    """QLoRA over a bf16 base (float32 adapters since round 10), `merge_lora(model)` with no dtype: the merged
    targets took the adapters' float32 while the bare dequantised bases stayed bf16, so the merged model mixed
    float32 and bf16 linears and its forward raised a dtype error. Merged, every linear has the dequantised base's
    dtype (what the adapters were before), and the output is the unmerged one up to bf16 rounding."""
    torch.manual_seed(0)
    block = _Block().to(torch.bfloat16)
    apply_lora(block, rank=4, alpha=8, dropout=0.0, targets=["q_proj"], quantized=Int8StandIn)
    layer = block.q_proj
    assert isinstance(layer, QuantizedLoRALinear) and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.no_grad():
        unmerged = block(x)
    assert merge_lora(block) == 1
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        merged = block(x)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, unmerged, atol=0.05, rtol=0.05)
