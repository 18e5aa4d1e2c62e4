"""Low-rank adapters (LoRA) for linear layers, with merge for export.

`LoRALinear` *is* an `nn.Linear` (same `weight`/`bias` names, so checkpoints keep their layout) plus two small
matrices: `y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank`. `B` starts at zero, so an adapted model computes
exactly what the base model computes until it is trained. `merge_lora` folds `B A * scale` into `W` and turns every
adapter back into a plain `nn.Linear`.

Adapters are float32 over a bf16/fp16 base, as peft keeps them (`autocast_adapter_dtype`): made so, and kept so by a
module-wide cast (Lightning's bf16-true `.to(torch.bfloat16)`; see `FloatAdapters`), where AdamW's small updates
to bf16 adapters would round away. The LoRA branch runs on the input cast to float32 and the sum is rounded to
the base output's dtype, peft's numerics; under autocast (bf16-mixed) nothing changes.

QLoRA (`apply_lora(..., quantized=cls)`): every frozen base linear becomes a `QuantizedLinear` (bitsandbytes' NF4
`Linear4bit` through `nf4_linear_class()`, or a stand-in a test passes), the targets wrapped by a
`QuantizedLoRALinear`; `merge_lora` then dequantises every base into a plain `nn.Linear` as it merges.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

# The language model's linears (model/qwen2.py): the names `model.net.lora.targets` may list.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_lora_targets(targets: Sequence[str]) -> None:
    """Refuse a `model.net.lora.targets` entry that is not one of :data:`LORA_TARGETS`: next to a valid one it
    would match nothing and leave those layers without adapters, silently."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not unknown:
        return
    named = [
        f"{t} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(t, LORA_TARGETS, n=1)) else t
        for t in unknown
    ]
    raise ValueError(
        f"model.net.lora.targets={list(targets)}: {', '.join(named)}: no such linear in the language model; "
        f"adapters go on {', '.join(LORA_TARGETS)}"
    )


def check_lora_rank(rank: int, widths: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a rank below 1 or above the narrowest targeted layer (`widths`: name -> (in, out) features):
    `B @ A` cannot have a rank above min(in, out), so the extra rank only costs memory and changes the scale."""
    if rank < 1:
        raise ValueError(f"model.net.lora.rank={rank}: expected an integer >= 1")
    if not widths:
        return
    name, (n_in, n_out) = min(widths.items(), key=lambda item: min(item[1]))
    if rank > min(n_in, n_out):
        raise ValueError(
            f"model.net.lora.rank={rank}: more than {name}'s {min(n_in, n_out)} features ({n_in} in, {n_out} "
            f"out), the narrowest layer in model.net.lora.targets; expected 1 to {min(n_in, n_out)}"
        )


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of adapters over a base in `dtype`: float32 for a half-precision base (peft's
    `autocast_adapter_dtype`), else the base's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class FloatAdapters(nn.Module):
    """Keeps `lora_A` / `lora_B` float32 when the module is cast to half precision; they still follow device moves
    and every other cast. `keep_float32 = False` lets them follow. Under FSDP they stay float32 too, left out of its
    one-dtype flat parameters (`distributed.MusicFlamingoFSDP`)."""

    keep_float32 = True

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # Lightning's bf16-true casts the module (precision_plugin.convert_module) after a resume loaded its state
        # and before the optimizer is built: skipping the cast here keeps both the loaded adapters and AdamW's
        # states float32, with nothing to restore afterwards.
        pinned = {
            id(t)
            for p in (self.lora_A, self.lora_B)
            for t in (p, p.grad)
            if t is not None and t.dtype == torch.float32
        }
        if not self.keep_float32 or not pinned:
            return super()._apply(fn, recurse)

        def cast(t: torch.Tensor) -> torch.Tensor:
            if id(t) in pinned:
                target = fn(t.new_empty(0))  # where, and in which dtype, `fn` puts a float32 tensor
                if target.dtype in (torch.float16, torch.bfloat16):
                    return t.to(target.device)
            return fn(t)

        return super()._apply(cast, recurse)


class LoRALinear(FloatAdapters, nn.Linear):
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
        dtype, device = adapter_dtype(base.weight.dtype), base.weight.device
        lora.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        lora.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):  # autocast casts both branches itself (bf16-mixed)
            return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        # peft's LoRA Linear: the branch in the adapters' dtype (float32 over a bf16 base), the sum in the wider
        # dtype, rounded once to the base output's
        lora = F.linear(F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B)
        return (out + lora * self.scale).to(out.dtype)

    def merged_linear(self, device: torch.device | str | None = None) -> nn.Linear:
        """A plain nn.Linear with `W + scale * B @ A` (computed in float32, stored in W's dtype, on `device`,
        default W's)."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            weight = (self.weight.float() + delta).to(self.weight.dtype)
        bias = None if self.bias is None else self.bias.detach()
        return linear_from(weight, bias, device, self.weight.requires_grad)


def linear_from(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    device: torch.device | str | None = None,
    requires_grad: bool = False,
) -> nn.Linear:
    """A plain nn.Linear holding `weight` (out, in) and `bias` (out,), moved to `device` if given. No random
    initialisation pass: for the release's 196 decoder linears that pass alone takes tens of seconds."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(
        weight.to(device) if device is not None else weight, requires_grad=requires_grad
    )
    if bias is not None:
        linear.bias = nn.Parameter(
            bias.to(device) if device is not None else bias, requires_grad=requires_grad
        )
    return linear


class QuantizedLinear(nn.Module):
    """What a quantized base linear provides: `from_linear(linear)` (frozen, quantized copy), `dequantize()`
    (the (out, in) weight in a floating dtype), `in_features`, `out_features`, `bias`. Its forward is its own."""

    in_features: int
    out_features: int

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def to_linear(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> nn.Linear:
        """A plain frozen nn.Linear with the dequantised weight (in `dtype`, default the weight's; on `device`,
        default where it is)."""
        with torch.no_grad():
            weight = self.dequantize()
            weight = weight.to(dtype or weight.dtype)
            bias = None if self.bias is None else self.bias.detach().to(weight.dtype)
        return linear_from(weight, bias, device)


class QuantizedLoRALinear(FloatAdapters):
    """LoRA over a frozen quantized base: `y = base(x) + (dropout(x) A^T B^T) * alpha / rank`. The adapters are
    in the dtype the base was built from, float32 for a half-precision one (`adapter_dtype`); `B` starts at zero."""

    def __init__(
        self, base: QuantizedLinear, rank: int, alpha: float, dropout: float, dtype: torch.dtype
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        # where the base lies: its bias is None for o_proj and the MLP (a base on the GPU got CPU adapters)
        device = next((t.device for t in (*base.parameters(), *base.buffers())), None)
        dtype = adapter_dtype(dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):  # peft's bnb LoRA: the input in the adapters' dtype
            x = x.to(self.lora_A.dtype)
        # scaled in the branch's dtype, then rounded once to the base output's (peft's bnb Linear4bit); rounding
        # before the scale rounded twice (a bf16 ulp off peft's outputs for alpha / rank not a power of two)
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        return out + lora.to(out.dtype)

    def merged_linear(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> nn.Linear:
        """A plain nn.Linear with `dequantize(base) + scale * B @ A` (computed in float32, stored in `dtype`,
        default the dequantised base's, as `QuantizedLinear.to_linear`, so the merged model has one dtype (not the
        adapters' float32); on `device`, default the base's)."""
        with torch.no_grad():
            base = self.base.dequantize()
            dtype = dtype or base.dtype
            weight = base.float()
            # `.float()` of a float32 base is its own storage (NF4 before quantization, a stand-in): add to a copy
            if weight is base:
                weight = weight.clone()
            weight += (self.lora_B.float() @ self.lora_A.float()).to(weight.device) * self.scale
            weight = weight.to(dtype)
            bias = None if self.base.bias is None else self.base.bias.detach().to(weight.dtype)
        return linear_from(weight, bias, device)


def quantize_linears(
    root: nn.Module, quantized: type[QuantizedLinear], skip: Sequence[str] = ()
) -> list[str]:
    """Replace every plain `nn.Linear` under `root` (but those named in `skip`) by `quantized.from_linear(...)`;
    returns the replaced names. The one place base weights get quantized, so a test can pass a stand-in class."""
    # names first, modules fetched one at a time: a list of the modules themselves would keep every original
    # weight alive until the last is converted (a class that copies, like the int8 stand-in, then holds both)
    names = [
        (name, child_name)
        for name, module in root.named_modules()
        for child_name, child in module.named_children()
        if child_name not in skip and type(child) is nn.Linear
    ]
    for name, child_name in names:
        parent = root.get_submodule(name)
        setattr(parent, child_name, quantized.from_linear(getattr(parent, child_name)))
    return [f"{name}.{child_name}" if name else child_name for name, child_name in names]


def apply_lora(
    root: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str],
    quantized: type[QuantizedLinear] | None = None,
) -> list[str]:
    """Replace every `nn.Linear` under `root` whose attribute name is in `targets` (e.g. `q_proj`, `down_proj`);
    returns the replaced names. The settings come from the config (`model.net.lora` in `configs/model/tiny.yaml`).
    A ValueError when a target matches no linear or the rank exceeds a targeted layer's in or out features.

    With `quantized` (QLoRA), every `nn.Linear` under `root` is quantized first (`quantize_linears`) and the
    targets get a `QuantizedLoRALinear` over their quantized base, adapters in the base's former dtype (float32 for a
    half-precision one, `adapter_dtype`)."""
    # every target must match (a typo next to a valid name would leave its layers without adapters), and the rank
    # fit them; checked before anything is quantized or replaced
    linears = {
        f"{name}.{child_name}" if name else child_name: child
        for name, module in root.named_modules()
        for child_name, child in module.named_children()
        if type(child) is nn.Linear or (quantized is not None and isinstance(child, quantized))
    }
    kinds = {full.rsplit(".", 1)[-1] for full in linears}
    unmatched = [t for t in targets if t not in kinds]
    if unmatched:
        raise ValueError(
            f"LoRA targets {unmatched} (model.net.lora.targets) match no nn.Linear under {type(root).__name__}; "
            f"its linears: {', '.join(sorted(kinds))}"
        )
    check_lora_rank(
        rank,
        {n: (m.in_features, m.out_features) for n, m in linears.items() if n.rsplit(".", 1)[-1] in targets},
    )
    dtypes = {}
    if quantized is not None:
        dtypes = {n: m.weight.dtype for n, m in root.named_modules() if type(m) is nn.Linear}
        quantize_linears(root, quantized)
    replaced = []
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in targets:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear.from_linear(child, rank, alpha, dropout))
            elif quantized is not None and isinstance(child, quantized):
                setattr(module, child_name, QuantizedLoRALinear(child, rank, alpha, dropout, dtypes[full]))
            else:
                continue
            replaced.append(full)
    if not replaced:  # `targets` is empty
        raise ValueError(f"LoRA targets {list(targets)} matched no nn.Linear under {type(root).__name__}")
    return replaced


def merge_lora(
    root: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> int:
    """Fold every adapter into its base weight in place, and dequantise every quantized base (to `dtype`, default
    the base weight's own or the dequantised one's); returns how many adapters were merged. `device`: where the merged
    linears go as each is made (QLoRA's export merges to the CPU, so a 24 GB card never holds a bf16 model)."""
    kinds = (LoRALinear, QuantizedLoRALinear, QuantizedLinear)
    # names first (see quantize_linears): each module merged from is released as soon as it is replaced
    names = [
        (name, child_name)
        for name, module in root.named_modules()
        for child_name, child in module.named_children()
        if isinstance(child, kinds)
        and not isinstance(module, QuantizedLoRALinear)  # its base: merged with it
    ]
    n = 0
    for name, child_name in names:
        parent = root.get_submodule(name)
        child = getattr(parent, child_name)
        if isinstance(child, LoRALinear):
            merged = child.merged_linear(device)
        elif isinstance(child, QuantizedLoRALinear):
            merged = child.merged_linear(dtype, device)
        else:
            merged = child.to_linear(dtype, device)
        n += not isinstance(child, QuantizedLinear)  # a bare quantized base is dequantised, not merged
        del child
        setattr(parent, child_name, merged)
    return n


def adapter_layers(root: nn.Module) -> list[LoRALinear | QuantizedLoRALinear]:
    """Every LoRA layer under `root`: a plain `LoRALinear` or a `QuantizedLoRALinear` over a quantized base (QLoRA;
    not a `LoRALinear`, so an isinstance check on that alone misses it)."""
    return [m for m in root.modules() if isinstance(m, (LoRALinear, QuantizedLoRALinear))]


def has_quantized(root: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in root.modules())


def upcast_unquantized(root: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Cast every floating parameter and buffer narrower than `dtype`, but those of a `QuantizedLinear` (which keeps
    its own storage and compute dtype), to `dtype`, one tensor at a time; returns how many were cast. QLoRA loads
    the checkpoint in its own bf16 and quantizes the decoder from it: this gives the rest (adapters, embeddings,
    norms, head, audio tower, projector) the float32 a float32 load would, for bf16-mixed's master weights."""
    inside = {id(m) for q in root.modules() if isinstance(q, QuantizedLinear) for m in q.modules()}
    n = 0
    for module in root.modules():
        if id(module) in inside:
            continue
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.is_floating_point() and t.dtype.itemsize < dtype.itemsize:
                    t.data = t.data.to(dtype)
                    n += 1
    return n


# ---------------------------------------------------------------------------------------------- bitsandbytes
class QuantizationUnavailable(ValueError):
    """`model.net.quantize_base` asks for something this machine cannot run (no CUDA, no bitsandbytes)."""


QUANTIZE_CHOICES = ("nf4",)
# bitsandbytes' oldest release with what `nf4_linear_class` uses (README, requirements-test.txt)
MIN_BITSANDBYTES = (0, 46)


def cuda_bf16_support() -> tuple[bool, str]:
    """(whether the current CUDA device computes in bfloat16 natively, its name and compute capability). The NF4
    linears compute in bfloat16: before compute capability 8.0 (T4, V100) torch emulates it, slowly if at all."""
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    return torch.cuda.is_bf16_supported(including_emulation=False), name


def _release(version: str) -> tuple[int, ...]:
    """'0.45.5' / '0.46.0.dev0' / '0.47.0+cu121' -> (0, 45, 5) / (0, 46, 0) / (0, 47, 0): the leading numbers."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(n) for n in numbers[0].split(".")) if numbers else ()


def check_quantize_base(value: object, cuda_available: bool | None = None, here: bool = True) -> None:
    """Refuse `model.net.quantize_base` unless it is null, or `nf4` on a machine with CUDA, bitsandbytes >= 0.46
    and a GPU that computes in bfloat16 (`here=False`, for `plan=true`: the value alone, the run being planned for
    another machine)."""
    if value is None:
        return
    if value not in QUANTIZE_CHOICES:
        raise QuantizationUnavailable(
            f"model.net.quantize_base={value!r}: expected null or one of {list(QUANTIZE_CHOICES)}"
        )
    if not here:
        return
    fallback = "use LoRA in bf16 instead: model.net.quantize_base=null trainer.precision=bf16-true"
    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        raise QuantizationUnavailable(
            f"model.net.quantize_base={value}: 4-bit base weights need a CUDA GPU and bitsandbytes, and CUDA is not "
            f"available here; {fallback}"
        )
    need = ".".join(map(str, MIN_BITSANDBYTES))
    try:
        bnb = import_bitsandbytes()
    except ImportError:
        raise QuantizationUnavailable(
            f"model.net.quantize_base={value}: 4-bit base weights need bitsandbytes >= {need} (pip install "
            f"'bitsandbytes>={need}'), which is not installed; {fallback}"
        ) from None
    version = str(getattr(bnb, "__version__", "unknown"))
    if _release(version) < MIN_BITSANDBYTES:
        raise QuantizationUnavailable(
            f"model.net.quantize_base={value}: bitsandbytes {version} is installed, 4-bit base weights need "
            f"bitsandbytes >= {need} (pip install -U 'bitsandbytes>={need}'); {fallback}"
        )
    bf16, gpu = cuda_bf16_support()
    if not bf16:
        raise QuantizationUnavailable(
            f"model.net.quantize_base={value}: the 4-bit linears compute in bfloat16, which this GPU, {gpu}, does "
            "not run natively (compute capability 8.0 or newer does: A100, L4, RTX 30xx and later); here, use LoRA "
            "under fp16 autocast instead: model.net.quantize_base=null trainer.precision=16-mixed"
        )


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def import_bitsandbytes() -> ModuleType:
    """`import bitsandbytes`, without the Hugging Face Hub: on a CPU with AVX512-BF16 its import asks the `kernels`
    package (a dependency of transformers) to fetch a CPU kernel from the Hub, a network request for code (and a
    warning when offline). With `kernels` hidden for the import, it keeps the kernels its wheel ships."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    hidden = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    quiet = _DropHubKernelWarning()
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    cpu_log.addFilter(quiet)
    try:
        import bitsandbytes
    finally:
        cpu_log.removeFilter(quiet)
        if hidden is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden
    return bitsandbytes


def weight_digest(weight: torch.Tensor) -> torch.Tensor | None:
    """What a QLoRA checkpoint keeps of a frozen base weight it does not store: the sum, sum of squares and
    row-weighted sum, in float64 on the CPU, of about 64 evenly spaced rows (the release's 196 decoder linears in
    about a second on one core; every row took minutes). Enough to tell the base a resume rebuilds from another one (another
    `model.net.init_from`, seed or preset); None on the meta device."""
    if weight.device.type == "meta":
        return None
    step = max(1, weight.shape[0] // 64)
    with torch.no_grad():
        rows = weight[::step].contiguous().double()
        index = torch.arange(rows.shape[0], dtype=torch.float64, device=rows.device) + 1
        return torch.stack((rows.sum(), rows.square().sum(), rows.sum(1) @ index)).cpu()


OLD_QLORA_CHECKPOINT = "the checkpoint holds this layer's frozen 4-bit base weight"
# a key only QLoRA checkpoints written before they held a digest of each base (13acc76) have
OLD_QLORA_KEY = ".base.weight.quant_state.bitsandbytes__nf4"


def old_qlora_checkpoint_message(layer: str) -> str:
    """Why a QLoRA checkpoint written before 13acc76 (`layer`'s packed 4-bit base in it) cannot resume, and what to do."""
    return (
        f"{layer}: {OLD_QLORA_CHECKPOINT} (bitsandbytes' packed NF4 weight and quant_state), stored by QLoRA "
        "checkpoints before they held the adapters and a digest of each base instead: bitsandbytes cannot load those "
        "back and the base the adapters were trained over cannot be checked, so such a checkpoint cannot resume (it "
        "never could: it was refused as another architecture); start the run afresh in another run folder "
        "(hydra.run.dir=...)"
    )


@functools.cache
def nf4_linear_class(compute_dtype: torch.dtype = torch.bfloat16) -> type[QuantizedLinear]:
    """bitsandbytes' NF4 `Linear4bit` as a `QuantizedLinear` (imported here: it needs CUDA). Its weights are
    quantized when the module moves to the GPU; `dequantize` reads them back in `compute_dtype`. Its state dict holds
    the bias and a digest of the weight (`weight_digest`), not the 4-bit weight: a resume rebuilds the base."""
    bnb = import_bitsandbytes()

    class NF4Linear(bnb.nn.Linear4bit, QuantizedLinear):
        @classmethod
        def from_linear(cls, linear: nn.Linear) -> NF4Linear:
            q = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device=linear.weight.device,
            )
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
            if linear.bias is not None:
                q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            q.base_digest = weight_digest(linear.weight)  # an attribute: a module cast must not round it
            return q

        # The frozen 4-bit weight stays out of the state dict (a training checkpoint): a resume restores the
        # checkpoint before the model moves to its device, where bitsandbytes quantizes, so the packed weight and
        # its quant_state keys met an unquantized (out, in) weight (and bitsandbytes has no loader for them): every
        # QLoRA resume was refused as "another architecture". The resume rebuilds the base from model.net.init_from
        # (or the preset) as the run did; `base_digest` in the checkpoint says whether it is the same base.
        def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            digest = getattr(self, "base_digest", None)
            if digest is not None:
                destination[prefix + "base_digest"] = digest.clone()

        def _load_from_state_dict(  # noqa: ANN202
            self,
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,  # noqa: ANN001
        ):
            if prefix + "weight" in state_dict and prefix + "base_digest" not in state_dict:
                # written before QLoRA checkpoints held a digest instead of the 4-bit base (13acc76): said once,
                # for the first such layer, rather than a missing digest and six unexpected keys per layer
                if not any(OLD_QLORA_CHECKPOINT in m for m in error_msgs):
                    error_msgs.append(old_qlora_checkpoint_message(prefix[:-1]))
                return
            own = {"bias": self.bias, "base_digest": getattr(self, "base_digest", None)}
            for name, mine in own.items():
                saved = state_dict.get(prefix + name)
                if mine is None:
                    continue
                if saved is None:
                    missing_keys.append(prefix + name)
                elif tuple(saved.shape) != tuple(mine.shape):
                    error_msgs.append(
                        f"size mismatch for {prefix}{name}: {tuple(saved.shape)} in the checkpoint, "
                        f"{tuple(mine.shape)} here"
                    )
                elif name == "bias":
                    with torch.no_grad():
                        mine.copy_(saved)
                elif not torch.allclose(saved.double().cpu(), mine, rtol=1e-9, atol=0.0):
                    error_msgs.append(
                        f"{prefix[:-1]}: the frozen 4-bit base weight (not stored in a QLoRA checkpoint, rebuilt "
                        f"from the model settings) is not the one the checkpoint's adapters were trained over "
                        f"(digest {saved.tolist()} there, {mine.tolist()} here): resume with the run's own "
                        "model.net.init_from / preset / seed / overrides"
                    )
            if strict:
                unexpected_keys.extend(
                    k
                    for k in state_dict
                    if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] not in own
                )

        def dequantize(self) -> torch.Tensor:
            state = getattr(self.weight, "quant_state", None)
            if state is None:  # not on the GPU yet: the weight is still the original
                return self.weight.data.to(compute_dtype)
            if getattr(state, "packing_format_for_cpu", False):
                # bitsandbytes' CPU forward in eval mode repacks the weight in place for its AVX512 kernel, a layout
                # dequantize_4bit misreads: undo it first, as its own state-dict save and `.cuda()` do
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                self.weight.data, self.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    self.weight.data, state
                )
                state = self.weight.quant_state
            return bnb.functional.dequantize_4bit(self.weight.data, state).to(compute_dtype)

    return NF4Linear
