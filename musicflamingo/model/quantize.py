"""int8 weight quantization for inference (`quantize=int8`): every `nn.Linear` of the model becomes an `Int8Linear`.

A weight (N, K) is stored as int8 with one scale per output row (symmetric, absmax / 127): `W ~ q * scale`, half the
bytes of bf16. Embeddings, convolutions and norms stay in the model dtype. What a call computes depends on how many
rows it multiplies, because on a CPU the two regimes are limited by different things:

- up to `DECODE_ROWS` rows (decode steps): `aten._weight_int8pack_mm`, bf16 activations times int8 weights read once
  (memory-bound: half the bytes of a bf16 GEMV, ~2x the tokens/s);
- more rows (prefill, the audio tower): activations are quantized too, per row (dynamic, symmetric), and
  `torch._int_mm` multiplies int8 by int8 into int32 (compute-bound: VNNI int8 runs at ~1.7x the bf16 rate here,
  where dequantizing the weight for a bf16 GEMM would be slower than bf16 itself).

On other devices the weight is dequantized for a plain `F.linear`. Quality is measured, not assumed: the tests
compare greedy tokens and logits against bf16 (docs/performance.md gives the numbers). A quantized model saves and
loads as such (`save_pretrained`: int8 `*.weight` plus a `*.weight_scale` per linear, `quantization_config` in
config.json); the reference (`transformers`) cannot read that folder. Inference only: there is no backward.

Example::

    model = MusicFlamingo.from_pretrained(path, dtype="bfloat16", quantize="int8")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8",)
DECODE_ROWS = (
    8  # up to this many rows: weight-only kernel (measured crossover with the int8 x int8 GEMM: ~8-16)
)
_ALIGN = 64  # bytes; see `Int8Linear.align`
_CHUNK = 4096  # rows of a weight quantized at a time: bounds the float32 temporary (the head is 151k rows)


class QuantizationError(ValueError):
    """An unknown method, or a model that cannot be quantized as asked."""


def check_method(method: str | None) -> str | None:
    if method in (None, "none", "null", ""):
        return None
    if method not in METHODS:
        raise QuantizationError(f"quantize={method!r}: expected one of {list(METHODS)} or null")
    return method


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight (N, K) and a per-row scale (N,): y = x (q * scale)^T + bias.

    Buffers, not parameters: nothing here trains. `weight_scale` and `bias` are in the model dtype (the
    weight-only kernel takes its scales in the activations' dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        out = cls(w.shape[1], w.shape[0], linear.bias is not None, w.dtype, w.device)
        if w.device.type == "meta":  # structure only: the values come from a checkpoint
            return out
        for i in range(0, w.shape[0], _CHUNK):
            rows = w[i : i + _CHUNK].float()
            # The scale is rounded to its storage dtype first, so q is the best int8 for the scale actually used.
            scale = (rows.abs().amax(1) / 127.0).clamp(min=1e-12).to(w.dtype)
            out.weight[i : i + _CHUNK] = (
                torch.round(rows / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
            )
            out.weight_scale[i : i + _CHUNK] = scale
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as floats (N, K) in `dtype` (default: the scale's)."""
        dtype = dtype or self.weight_scale.dtype
        return (self.weight.to(torch.float32) * self.weight_scale.float()[:, None]).to(dtype)

    def align(self) -> None:
        """Copy the weight into 64-byte aligned memory if it is not (a view of a memory-mapped checkpoint can sit at
        any offset): the weight-only CPU kernel reads it with aligned vector loads and crashes otherwise."""
        if self.weight.data_ptr() % _ALIGN:
            self.weight = self.weight.clone()  # torch's CPU allocator aligns to 64 bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        self.align()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type != "cpu" or x2.shape[0] == 0:
            y = F.linear(x2, self.dequantize(x2.dtype))
        elif x2.shape[0] <= DECODE_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(
                x2.contiguous(), self.weight, self.weight_scale.to(x2.dtype)
            )
        else:
            y = dynamic_int8_mm(x2, self.weight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def dynamic_int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) floats times int8 q (N, K) with row scales (N,): x quantized per row, int8 x int8 -> int32, rescaled.

    Returns (M, N) in x's dtype. An all-zero row of x gets scale 1 (and stays zero).
    """
    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    sw = scale.float()
    for i in range(0, x.shape[0], _CHUNK):  # bounds the float32/int32 temporaries of a 20-minute prefill
        xf = x[i : i + _CHUNK].float()
        sx = xf.abs().amax(1, keepdim=True) / 127.0  # (m, 1)
        sx = torch.where(sx > 0, sx, torch.ones_like(sx))
        xq = torch.round(xf.div_(sx)).to(torch.int8)
        acc = torch._int_mm(xq, q.t())  # (m, N) int32; |acc| <= K * 127^2 < 2^31 for K < 133 000
        out[i : i + _CHUNK] = acc.float().mul_(sw).mul_(sx)
    return out


def _linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every plain `nn.Linear` of `model` (names only: no reference keeps a weight alive)."""
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every plain `nn.Linear` of `model` (in place) by its `method` version; returns `model`.

    A model on the meta device gets the structure only (then a quantized checkpoint fills it). A tied head is
    the embedding, which stays as it is; adapters (LoRA) must be merged first.
    """
    if check_method(method) is None:
        return model
    adapters = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if adapters:
        raise QuantizationError(
            f"the model has LoRA adapters ({adapters[0]}, ...): merge them first (train.py exports merged weights)"
        )
    tied = getattr(getattr(model, "config", None), "text", None)
    tied = bool(tied and tied.tie_word_embeddings)
    for parent, name in _linears(model):
        if tied and name == "lm_head":
            continue
        # one linear at a time: its float weight is dropped as soon as the int8 copy exists
        setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    model.quantization = method
    return model


def stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors a save writes: parameters (a tied one once) and persistent buffers (int8 weights, scales)."""
    out = list(model.parameters())
    for module in model.modules():
        out += [
            b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
    return out


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer of `model` as stored (int8 weights one byte each)."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(model))
