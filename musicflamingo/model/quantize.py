"""Weight quantization for inference (`quantize=int8` or `quantize=int4`): the model's `nn.Linear`s become
`Int8Linear`s or `Int4Linear`s.

int8: a weight (N, K) is stored as int8 with one scale per output row (symmetric, absmax / 127): `W ~ q * scale`,
half the bytes of bf16. Embeddings, convolutions and norms stay in the model dtype. What a call computes depends on
how many rows it multiplies, because on a CPU the two regimes are limited by different things:

- up to `DECODE_ROWS` rows (decode steps): `aten._weight_int8pack_mm`, bf16 activations times int8 weights read once
  (memory-bound: half the bytes of a bf16 GEMV, ~2x the tokens/s);
- more rows (prefill, the audio tower): activations are quantized too, per row (dynamic, symmetric), and
  `torch._int_mm` multiplies int8 by int8 into int32 (compute-bound: VNNI int8 runs at ~1.7x the bf16 rate here,
  where dequantizing the weight for a bf16 GEMM would be slower than bf16 itself).

int4 (what decode reads, a quarter of the bf16 bytes): the language model's linears and the head become
`Int4Linear` (4-bit, asymmetric, a scale and a zero per group of `group_size` = 128 input columns, the scheme of
gpt-fast/torchao's int4 weight-only); the audio tower and projector, which run only in prefill, become `Int8Linear`
(int8 x int8 is the fastest prefill here), and so does any linear whose K is not a multiple of 32. Up to
`INT4_KERNEL_ROWS` rows use `aten._weight_int4pack_mm_for_cpu`; longer prefills dequantize the weight in row blocks
for a plain bf16 GEMM (~1.3x a bf16 linear, measured).

On other devices, and for an int8 linear whose K is not a multiple of 16 (the CPU kernels' step), the weight is
dequantized for a plain `F.linear`. Quality is measured, not assumed: the tests
compare greedy tokens and logits against bf16 (docs/performance.md gives the numbers). A quantized model saves and
loads as such (`save_pretrained`: int8 `*.weight` plus a `*.weight_scale` per int8 linear; packed uint8 `*.weight`
plus `*.weight_scale_zero` per int4 linear; `quantization_config` in config.json); the reference (`transformers`)
cannot use that folder (5.x fails on an int4 folder's shapes, and reads an int8 folder's tensors as floats without
their scales, with only a warning). Inference only: there is no backward.

Example::

    model = MusicFlamingo.from_pretrained(path, dtype="bfloat16", quantize="int8")
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8", "int4")
DECODE_ROWS = (
    8  # up to this many rows: weight-only kernel (measured crossover with the int8 x int8 GEMM: ~8-16)
)
_ALIGN = 64  # bytes; see `Int8Linear.align`
_CHUNK = 4096  # rows of a weight quantized at a time: bounds the float32 temporary (the head is 151k rows)
INT4_KERNEL_ROWS = (
    64  # up to this many rows: the int4 kernel (it scales with rows; dequantize + GEMM wins past ~100)
)
_WORKSPACE_ELEMENTS = 1 << 24  # elements per `dynamic_int8_mm` temporary (64 MB in float32), see `_Workspace`
_BLOCK = 64  # int4 rows are packed in blocks of 64 (the CPU kernel's layout, see `pack_int4`)
# The int8 CPU kernels need K (in_features) to be a multiple of this: `_weight_int8pack_mm` in bf16 returns garbage or
# segfaults for any other K (measured with torch 2.14 on AVX-512: K = 40, 72, 1-15, ...), and `torch._int_mm` is
# wrong for K = 1. Other widths (tiny or custom models; every release width qualifies) dequantize for `F.linear`.
_INT8_KERNEL_K = 16


class QuantizationError(ValueError):
    """An unknown method, or a model that cannot be quantized as asked."""


def check_method(method: str | None) -> str | None:
    """None for no quantization, else the method name; anything else is a QuantizationError."""
    if method in (None, "none", "null", ""):
        return None
    if method not in METHODS:
        raise QuantizationError(f"quantize={method!r}: expected one of {list(METHODS)} or null")
    return method


def load_method(quantize: str | None, stored: str | None, source: str) -> str | None:
    """The quantization a load of the checkpoint `source` runs: its own (`stored`, from config.json) or `quantize`
    (checked by `check_method`). A checkpoint quantized one way cannot be re-quantized another: running its own while
    the settings (and so the logs and the memory plan) name another is refused."""
    method = check_method(quantize)
    if method and stored and method != stored:
        raise QuantizationError(
            f"quantize={method!r}: {source} is already quantized with {stored} (config.json quantization_config); "
            f"pass quantize={stored} or null, or load the unquantized checkpoint to quantize it with {method}"
        )
    return stored or method


class QuantLinear(nn.Module):
    """What Int8Linear and Int4Linear share: buffers, not parameters (nothing here trains), a bias in the model
    dtype, `forward` = `_matmul` of the flattened rows + bias, and `align`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def align(self) -> None:
        """Copy the weight into 64-byte aligned memory if it is not (a view of a memory-mapped checkpoint can sit at
        any offset): the CPU kernels read it with aligned vector loads and crash otherwise."""
        if self.weight.data_ptr() % _ALIGN:
            # a normal tensor even under inference_mode (the engine's): an inference tensor as the buffer made a
            # later `load_state_dict` into the module fail ('Inplace update to inference tensor')
            with torch.inference_mode(False):
                self.weight = self.weight.clone()  # torch's CPU allocator aligns to 64 bytes

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) in x's dtype, without the bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype. Refused in training mode for an `x` that carries gradients: nothing
        here has a backward, so a training step would silently cut every gradient at the quantized linears."""
        if self.training and torch.is_grad_enabled() and x.requires_grad:
            raise QuantizationError(
                f"{type(self).__name__} is inference only (no backward): a quantized model cannot be trained; "
                "fine-tune from the unquantized checkpoint (model.net.init_from=<the folder it was quantized from>) "
                "and quantize the export afterwards, or call the model under torch.no_grad() / in eval mode"
            )
        y = self._matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int8Linear(QuantLinear):
    """`nn.Linear` with an int8 weight (N, K) and a per-row scale (N,): y = x (q * scale)^T + bias.

    `weight_scale` is in the model dtype (the weight-only kernel takes its scales in the activations' dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))

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

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.shape[0] == 0 or self.in_features % _INT8_KERNEL_K:
            return F.linear(x, self.dequantize(x.dtype))
        self.align()
        if x.shape[0] <= DECODE_ROWS:
            return torch.ops.aten._weight_int8pack_mm(
                x.contiguous(), self.weight, self.weight_scale.to(x.dtype)
            )
        return dynamic_int8_mm(x, self.weight, self.weight_scale)


class _Workspace(threading.local):
    """Reused scratch tensors for the quantized prefill paths (`dynamic_int8_mm`, `Int4Linear`'s dequantized
    blocks), one set per thread.

    Why: a fresh 80 MB temporary costs more in page faults than the arithmetic on it (on a 2-core Xeon, `acc.float()`
    of a (1061, 18944) int32 took 31 ms against 8 ms for `copy_` into memory already touched), and a prefill makes
    seven such temporaries per linear. A buffer grows to the largest chunk asked for and is kept: for int8, at most
    `_WORKSPACE_ELEMENTS` float32 + int32 elements and as many int8, ~144 MB per thread; int4's prefill adds one
    dequantized block of `_CHUNK` rows and its nibbles (~194 MB for the release's 18 944-wide down projection).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        n = shape[0] * shape[1]
        buf = self.buffers.get((name, dtype, device))
        if buf is None or buf.numel() < n:
            # A normal tensor even when first asked for under inference_mode: an inference tensor could not be
            # written in place by a later call outside it (a `no_grad` evaluation after an `infer`, say).
            with torch.inference_mode(False):
                buf = self.buffers[(name, dtype, device)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


_workspace = _Workspace()


def _int8_chunk_rows(K: int, N: int) -> int:
    """Rows per `dynamic_int8_mm` chunk: a multiple of 64 whose (rows, max(K, N)) temporaries fit the workspace."""
    return max(64, _WORKSPACE_ELEMENTS // max(K, N) // 64 * 64)


def workspace_bytes(model: nn.Module, rows: Callable[[str], int], dtype_bytes: int) -> int:
    """Bytes this thread's `_workspace` grows to on CPU when each quantized linear of `model` (a meta-device model
    will do) is called with at most `rows(qualified name)` rows: the buffers `dynamic_int8_mm` and `Int4Linear`'s
    block dequantization ask for, each as large as its largest request. `dtype_bytes`: the activations' float."""
    need: dict[str, int] = {}
    for name, module in model.named_modules():
        m = rows(name)
        asks = []
        if isinstance(module, Int8Linear) and m > DECODE_ROWS:
            N, K = module.weight.shape
            c = min(m, _int8_chunk_rows(K, N))
            asks = [("float", 4 * c * max(K, N)), ("int8", c * K), ("int32", 4 * c * N)]
        elif isinstance(module, Int4Linear) and m > INT4_KERNEL_ROWS:
            block, K = min(module.weight.shape[0], _CHUNK), module.in_features
            asks = [("int4 weight", dtype_bytes * block * K), ("int4 nibble", block * K // 2)]
        for key, nbytes in asks:
            need[key] = max(need.get(key, 0), nbytes)
    return sum(need.values())


@torch.no_grad()  # inference only; the workspace is written in place
def dynamic_int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) floats times int8 q (N, K) with row scales (N,): x quantized per row, int8 x int8 -> int32, rescaled.

    Returns (M, N) in x's dtype. An all-zero row of x gets scale 1 (and stays zero). Rows go in chunks whose
    temporaries fit the workspace (multiples of 64 rows, so the int8 GEMM keeps whole tiles); every step writes into
    it in place.
    """
    (M, K), N = x.shape, q.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    sw = scale.float()
    rows = _int8_chunk_rows(K, N)
    for i in range(0, M, rows):
        xi = x[i : i + rows]
        m = xi.shape[0]
        # max |x| per row without an |x| temporary; exact in x's dtype, so equal to xf.abs().amax(1).
        sx = torch.maximum(xi.amax(1, keepdim=True), xi.amin(1, keepdim=True).neg_()).float().div_(127.0)
        sx = torch.where(sx > 0, sx, 1.0)  # (m, 1)
        xf = _workspace.get("float", (m, K), torch.float32, x.device).copy_(xi)
        xq = _workspace.get("int8", (m, K), torch.int8, x.device).copy_(xf.div_(sx).round_())
        acc = _workspace.get("int32", (m, N), torch.int32, x.device)
        torch._int_mm(xq, q.t(), out=acc)  # |acc| <= K * 127^2 < 2^31 for K < 133 000
        # The float workspace is free again (xq holds the activations): reuse it for the rescale.
        out[i : i + m] = _workspace.get("float", (m, N), torch.float32, x.device).copy_(acc).mul_(sw).mul_(sx)
    return out


# ---------------------------------------------------------------------------------------------- int4
def pack_int4(q: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """q (N, K) integers in [0, 15], N a multiple of `block` -> (N, K // 2) uint8 in the CPU kernel's layout.

    Rows go in blocks of `block` (B); block b, column k is B/2 bytes, byte d holding row b*B + d in its low nibble and
    row b*B + B/2 + d in its high one. Checkpoints hold B = 64 (the kernel's layout on AVX-512 builds), written down
    so they do not depend on a torch version or CPU; on a CPU whose kernel reads B = 32 (AVX2 only) `Int4Linear`
    repacks its weight once at first use (`int4_kernel_block`).
    """
    n, k = q.shape
    b = q.to(torch.uint8).view(n // block, 2, block // 2, k)
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def unpack_int4(
    packed: torch.Tensor, dtype: torch.dtype = torch.uint8, workspace: bool = False, block: int = _BLOCK
) -> torch.Tensor:
    """The inverse of `pack_int4`: (N, K // 2) uint8 -> (N, K) values in [0, 15] as `dtype`. `workspace`: the
    result and the nibble temporary are views of this thread's `_workspace`, valid until its next use."""
    n, half = packed.shape
    b = packed.view(n // block, 2 * half, block // 2)
    if workspace:
        out = _workspace.get("int4 weight", (n, 2 * half), dtype, packed.device)
        nibble = _workspace.get("int4 nibble", (n, half), torch.uint8, packed.device).view(b.shape)
    else:
        out, nibble = torch.empty(n, 2 * half, dtype=dtype, device=packed.device), torch.empty_like(b)
    out4 = out.view(n // block, 2, block // 2, 2 * half)
    out4[:, 0].copy_(torch.bitwise_and(b, 15, out=nibble).transpose(1, 2))
    out4[:, 1].copy_(torch.bitwise_right_shift(b, 4, out=nibble).transpose(1, 2))
    return out


_REPACK_LOCK = threading.Lock()


def _repacked(packed: torch.Tensor, block: int, to: int) -> torch.Tensor:
    """packed (N, K // 2) uint8 in blocks of `block` -> a new (N, K // 2) in blocks of `to`, _CHUNK rows at a time
    (a multiple of both blocks): the temporaries (the unpacked values are 2x the packed bytes, and `pack_int4`'s
    3 more) are a chunk's, not the layer's (the head's was ~1.6 GB of a 7B model's 0.27 GB weight). A normal
    tensor even under inference_mode: the buffer stays loadable (`load_state_dict`) after a generate."""
    with torch.inference_mode(False):
        out = torch.empty_like(packed)
        for i in range(0, packed.shape[0], _CHUNK):
            out[i : i + _CHUNK] = pack_int4(unpack_int4(packed[i : i + _CHUNK], block=block), to)
    return out


@functools.cache
def int4_kernel_block() -> int | None:
    """The `pack_int4` block this torch's CPU int4 kernel reads: 64 (AVX-512 builds), 32 (a CPU with AVX2 only), None
    when its layout is neither (checked once, on a 128 x 64 pattern)."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    except (AttributeError, RuntimeError):
        return None
    if theirs.shape != (128, 32):
        return None
    return next(
        (b for b in (_BLOCK, _BLOCK // 2) if torch.equal(theirs.view(torch.uint8), pack_int4(q, b))), None
    )


def int4_layout_ok() -> bool:
    """Whether this torch's CPU int4 kernel reads a `pack_int4` layout (see `int4_kernel_block`)."""
    return int4_kernel_block() is not None


def int4_group_size(in_features: int) -> int | None:
    """Input columns per (scale, zero) pair: 128, else the largest of 64 / 32 that divides K; None if none does."""
    return next((g for g in (128, 64, 32) if in_features % g == 0), None)


class Int4Linear(QuantLinear):
    """`nn.Linear` with a 4-bit weight: y = x W^T + bias, W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n] for
    the group g = k // group_size, q in [0, 15].

    Buffers: `weight` (N', K // 2) uint8, two values a byte (`pack_int4`), N' = N rounded up to 64 (padding rows
    are zero and cut from the output); `weight_scale_zero` (K // group_size, N', 2) in the model dtype, the
    kernel's own layout. Inference only. `packed_block`: the block `weight` is packed in now; 64 in every state
    dict, 32 in memory once the CPU kernel of an AVX2-only CPU has run (`_kernel_layout`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        group = int4_group_size(in_features)
        if group is None:
            raise QuantizationError(f"int4 needs in_features divisible by 32, got {in_features}")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group
        self.packed_block = _BLOCK
        rows = -(-out_features // _BLOCK) * _BLOCK
        self.register_buffer("weight", torch.zeros(rows, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale_zero", torch.zeros(in_features // group, rows, 2, dtype=dtype, device=device)
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        w = linear.weight
        n, k = w.shape
        out = cls(k, n, linear.bias is not None, w.dtype, w.device)
        if w.device.type == "meta":
            return out
        g = out.group_size
        for i in range(0, n, _CHUNK):  # _CHUNK is a multiple of 64: a chunk packs on its own
            rows = w[i : i + _CHUNK].float()
            m = rows.shape[0]
            padded = torch.zeros(-(-m // _BLOCK) * _BLOCK, k, device=w.device)
            padded[:m] = rows
            grouped = padded.view(-1, k // g, g)
            lo, hi = grouped.amin(-1), grouped.amax(-1)  # (m', G)
            # scale and zero are rounded to their storage dtype first: q is then the best value for what is stored
            scale = ((hi - lo) / 15).clamp(min=1e-12).to(w.dtype).float()
            zero = (lo + 8 * scale).to(w.dtype).float()
            q = torch.round((grouped - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp_(0, 15)
            end = i + padded.shape[0]
            out.weight[i:end] = pack_int4(q.view(-1, k))
            out.weight_scale_zero[:, i:end] = torch.stack((scale, zero), -1).transpose(0, 1).to(w.dtype)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out

    def dequantize(
        self, dtype: torch.dtype | None = None, rows: slice = slice(None), workspace: bool = False
    ) -> torch.Tensor:
        """The weight as floats (N, K) in `dtype` (default: the scales'); `rows` a slice of whole 64-row blocks
        (default all, padding cut). `workspace`: written into this thread's reused buffer (see `unpack_int4`)."""
        dtype = dtype or self.weight_scale_zero.dtype
        weight, block = self._packed()
        packed = weight[rows]
        sz = self.weight_scale_zero[:, rows].to(dtype)
        n, g = packed.shape[0], self.group_size
        scale = sz[..., 0].t().unsqueeze(-1)  # (n, G, 1)
        shift = (sz[..., 1] - 8 * sz[..., 0]).t().unsqueeze(-1)  # (q - 8) s + z = q s + (z - 8 s)
        w = (
            unpack_int4(packed, dtype, workspace, block)
            .view(n, -1, g)
            .mul_(scale)
            .add_(shift)
            .view(n, self.in_features)
        )
        return w if rows != slice(None) else w[: self.out_features]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and 0 < x.shape[0] <= INT4_KERNEL_ROWS:
            if not int4_layout_ok():
                raise QuantizationError(
                    f"torch {torch.__version__}: the CPU int4 kernel does not read musicflamingo's int4 layout "
                    "(model/quantize.py, pack_int4); use quantize=int8"
                )
            self._kernel_layout()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), self.weight, self.group_size, self.weight_scale_zero.to(x.dtype)
            )
        else:  # many rows (or not a CPU): dequantize a block of rows at a time for a plain GEMM
            y = torch.empty(x.shape[0], self.weight.shape[0], dtype=x.dtype, device=x.device)
            with torch.no_grad():  # inference only; the dequantized block is a reused buffer
                for i in range(0, self.weight.shape[0], _CHUNK):
                    w = self.dequantize(x.dtype, slice(i, i + _CHUNK), workspace=True)
                    torch.mm(x, w.t(), out=y[:, i : i + w.shape[0]])
        return y[:, : self.out_features]

    def _packed(self) -> tuple[torch.Tensor, int]:
        """(`weight`, `packed_block`) read as one pair: a repack in another thread (`_kernel_layout`) replaces both
        under `_REPACK_LOCK`, and two plain reads could pair the old weight with the new block. Once the weight is in
        the kernel's block no repack follows (it was set before the block), so that case reads without the lock."""
        block = self.packed_block
        if block == int4_kernel_block():
            return self.weight, block
        with _REPACK_LOCK:
            return self.weight, self.packed_block

    @torch.no_grad()
    def _kernel_layout(self) -> None:
        """Repack `weight` once into the block this CPU's kernel reads (a fresh, aligned tensor), else align it."""
        block = int4_kernel_block()
        if block != self.packed_block:
            # two threads at the first use repack once (the other could read a half-set layout)
            with _REPACK_LOCK:
                if block != self.packed_block:
                    self.weight = _repacked(self.weight, self.packed_block, block)
                    # after the weight: a thread that sees the new block has its weight
                    self.packed_block = block
        self.align()

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight, block = self._packed()  # (a repack may have replaced the weight super() wrote)
        if block != _BLOCK:  # checkpoints hold one layout, whatever CPU ran the model
            destination[prefix + "weight"] = _repacked(weight, block, _BLOCK)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:  # (a partial load without it keeps the weight, and its layout)
            self.packed_block = _BLOCK  # what was read is a checkpoint's layout

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent, attribute) of every plain `nn.Linear` of `model` (names only: no reference keeps a
    weight alive)."""
    return [
        (f"{prefix}.{name}" if prefix else name, parent, name)
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


PREFILL_ONLY = ("audio_tower", "multi_modal_projector")  # run once per clip, never in a decode step


def linear_class(qualified_name: str, linear: nn.Linear, method: str) -> type[QuantLinear]:
    """What `quantize_model(..., method)` makes of this linear (see the module doc)."""
    if (
        method == "int4"
        and not qualified_name.startswith(PREFILL_ONLY)
        and int4_group_size(linear.in_features)
    ):
        return Int4Linear
    return Int8Linear


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every plain `nn.Linear` of `model` (in place) by its `method` version; returns `model`.

    A model on the meta device gets the structure only (then a quantized checkpoint fills it). A tied head is
    the embedding, which stays as it is; adapters (LoRA) must be merged first.
    """
    if check_method(method) is None:
        return model
    have = getattr(model, "quantization", None) or next(
        (
            m
            for m, cls in (("int4", Int4Linear), ("int8", Int8Linear))
            if any(isinstance(x, cls) for x in model.modules())
        ),
        None,
    )
    if have == method:  # already done (a quantized checkpoint loaded as it is)
        return model
    if have:
        raise QuantizationError(
            f"quantize={method!r}: the model is already quantized with {have} (a quantized model cannot be "
            f"re-quantized: its float weights are gone); load the unquantized checkpoint to quantize it with {method}"
        )
    adapters = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if adapters:
        raise QuantizationError(
            f"the model has LoRA adapters ({adapters[0]}, ...): merge them first (train.py exports merged weights)"
        )
    tied = getattr(getattr(model, "config", None), "text", None)
    tied = bool(tied and tied.tie_word_embeddings)
    for qualified, parent, name in _linears(model):
        if tied and name == "lm_head":
            continue
        # one linear at a time: its float weight is dropped as soon as the quantized copy exists
        linear = getattr(parent, name)
        quantized = linear_class(qualified, linear, method).from_linear(linear)
        setattr(parent, name, quantized.train(linear.training))  # a new module; keep the model's mode
    model.quantization = method
    return model


def stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors a save writes: parameters (a tied one once) and persistent buffers (quantized weights, scales)."""
    out = list(model.parameters())
    for module in model.modules():
        out += [
            b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
    return out


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer of `model` as stored (int8 weights one byte each, int4 two
    weights a byte)."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(model))
