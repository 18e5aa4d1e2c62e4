"""Low-rank adapters (LoRA) for linear layers, with merge for export.

`LoRALinear` *is* an `nn.Linear` (same `weight`/`bias` names, so checkpoints keep their layout) plus two small
matrices: `y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank`. `B` starts at zero, so an adapted model computes
exactly what the base model computes until it is trained. `merge_lora` folds `B A * scale` into `W` and turns every
adapter back into a plain `nn.Linear`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        with torch.device("meta"):
            lora = cls(base.in_features, base.out_features, base.bias is not None, rank, alpha, dropout)
        lora.weight = base.weight  # share, do not copy: base weights stay bit-identical
        lora.bias = base.bias
        dtype, device = base.weight.dtype, base.weight.device
        lora.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        lora.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with `W + scale * B @ A` (computed in float32, stored in W's dtype)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        merged = merged.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            merged.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        merged.weight.requires_grad_(self.weight.requires_grad)
        return merged


def apply_lora(
    root: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Sequence[str]
) -> list[str]:
    """Replace every `nn.Linear` under `root` whose attribute name is in `targets` (e.g. `q_proj`, `down_proj`);
    returns the replaced names. The settings come from the config (`model.net.lora` in `configs/model/tiny.yaml`)."""
    replaced = []
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear.from_linear(child, rank, alpha, dropout))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    if not replaced:
        raise ValueError(f"LoRA targets {list(targets)} matched no nn.Linear under {type(root).__name__}")
    return replaced


def merge_lora(root: nn.Module) -> int:
    """Fold every adapter into its base weight in place; returns how many were merged."""
    n = 0
    for module in list(root.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged_linear())
                n += 1
    return n
