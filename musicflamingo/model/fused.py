"""Memory-lean autograd functions: keep the inputs of cheap elementwise steps, recompute the rest in backward.

Plain autograd keeps every intermediate a backward formula mentions: for `down(silu(gate) * up)` that is
`gate`, `silu(gate)`, `up` and the product; for RMSNorm a float32 copy of the input and the normalised
activations, and every linear after it keeps the normalised activations again (one bf16 copy per linear under
autocast). These functions keep only what cannot be recomputed cheaply (`gate` and `up`; a norm's input and
per-row statistics) and redo the elementwise work in backward. They run only while autograd records; otherwise
the plain ops run (no Python Function overhead in a decode step).

* `rms_norm`, `swiglu_linear`, `gelu_linear`: the same ops in the same order as the plain modules, so fp32
  outputs are bit-identical (the parity tests against the reference hold).
* `norm_linear`: norm -> one GEMM over several linears' concatenated weights (q/k/v, gate/up, fc1).
* `linear_cross_entropy`: the chunked LM-head loss, gradients formed in the forward.
* `softmax_attention`: plain-matmul attention for short bf16 sequences on CPU.

Backward formulas are autograd's own (`aten.silu_backward`, `aten.gelu_backward`,
`aten.native_layer_norm_backward`, the linear and cast rules), so gradients agree to rounding. Under autocast the
functions cast matmul operands like autocast would (`_autocast_dtype`), since a custom Function sees raw inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype autocast would use for a matmul right now, or None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """What autocast does to a matmul operand: floating tensors other than float64 go to `dtype`."""
    if dtype is None or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record this call. Otherwise the plain ops run directly: a custom Function's
    Python overhead would be pure loss in a decode step."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def norm_linear(
    x: torch.Tensor, norm: torch.nn.Module | None, layers: list[torch.nn.Linear]
) -> list[torch.Tensor] | None:
    """`[layer(norm(x)) for layer in layers]` from ONE GEMM over the concatenated weights; x (..., D).

    Training only (autograd recording, all plain `nn.Linear`, e.g. not LoRA adapters; `norm` None, a Qwen2
    RMSNorm or an `nn.LayerNorm`; else None and the caller runs the plain modules). A wider GEMM runs closer to
    the matmul ceiling, and backward keeps only x and the norm's per-row statistics: the normalised input
    (which each linear would keep, once per linear under autocast) and the concatenated weight are rebuilt in
    backward. A missing bias is a zero block, which leaves those outputs exact. The outputs are views of one
    (..., sum(out)) tensor. In fp32 they equal the separate modules' bit for bit at the model's widths (tested);
    at other widths the GEMM library may pick kernels that sum in another order (differences ~1e-7).
    """
    if norm is None:
        kind, norm_args = "none", (None, None, 0.0)
    elif type(norm) is torch.nn.LayerNorm and len(norm.normalized_shape) == 1:
        kind, norm_args = "layer", (norm.weight, norm.bias, norm.eps)
    elif getattr(type(norm), "fused_kind", None) == "rms":  # layers.RMSNorm (this module sits below it)
        kind, norm_args = "rms", (norm.weight, None, norm.eps)
    else:
        return None
    if not all(type(m) is torch.nn.Linear for m in layers):  # adapters, quantized bases: no plain `weight`
        return None
    weights = [m.weight for m in layers]
    if not records_grad(x, *weights):
        return None
    biases = [m.bias for m in layers]
    out = _NormLinear.apply(x, kind, *norm_args, len(layers), *weights, *biases)
    return list(out.split([m.out_features for m in layers], -1))


def project(
    x: torch.Tensor, norm: torch.nn.Module | None, layers: list[torch.nn.Module], own: tuple[int, ...] = ()
) -> list[torch.Tensor]:
    """`[layer(norm(x)) for layer in layers]`: one GEMM over the concatenated weights while training
    (`norm_linear`), the plain modules otherwise (inference, LoRA adapters). The outputs listed in `own` are
    made contiguous when fused: they are views of one wide tensor, and one the caller keeps for backward as is
    (a value for attention, say) would otherwise keep the whole fused output alive."""
    out = norm_linear(x, norm, layers)
    if out is None:
        x = norm(x) if norm is not None else x
        return [layer(x) for layer in layers]
    for i in own:
        out[i] = out[i].contiguous()
    return out


def _normalize(kind: str, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float, cast):  # noqa: ANN001, ANN202
    """(normalised x exactly as the plain module computes it, stats for backward)."""
    if kind == "rms":
        x32 = _stat_dtype(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return w * (x32 * rstd).to(x.dtype), (rstd,)
    if kind == "layer":
        xin = x.float() if cast is not None and x.dtype != torch.float64 else x  # autocast runs it in fp32
        out, mean, rstd = torch.native_layer_norm(xin, (x.shape[-1],), w, b, eps)
        return out, (mean, rstd)
    return x, ()


def _cat_params(weights, biases):  # noqa: ANN001, ANN202
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    if all(b is None for b in biases):
        return weight, None
    bias = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return weight, torch.cat(bias) if len(bias) > 1 else bias[0]


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind, norm_w, norm_b, eps, n, *params):  # noqa: ANN001, ANN205
        weights, biases = params[:n], params[n:]
        cast = _autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            xn, stats = _normalize(kind, x, norm_w, norm_b, eps, cast)
            weight, bias = _cat_params(weights, biases)
            out = F.linear(_cast(xn, cast), _cast(weight, cast), None if bias is None else _cast(bias, cast))
        ctx.kind, ctx.eps, ctx.n, ctx.cast = kind, eps, n, cast
        ctx.save_for_backward(x, norm_w, norm_b, *stats, *params)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        kind, n, cast = ctx.kind, ctx.n, ctx.cast
        saved = ctx.saved_tensors
        x, norm_w, norm_b = saved[:3]
        n_stats = {"rms": 1, "layer": 2, "none": 0}[kind]
        stats, params = saved[3 : 3 + n_stats], saved[3 + n_stats :]
        weights, biases = params[:n], params[n:]
        needs = ctx.needs_input_grad
        need_x, need_nw, need_nb = needs[0], needs[2], needs[3]
        need_params = needs[6:]
        xn, _ = _normalize(kind, x, norm_w, norm_b, ctx.eps, cast)  # recomputed, same numbers as forward
        weight, _ = _cat_params(weights, biases)
        sizes = [w.shape[0] for w in weights]
        grad_ws: list[torch.Tensor | None] = [None] * n
        grad_bs: list[torch.Tensor | None] = [None] * n
        if any(need_params[:n]):
            gw = _linear_weight_grad(grad, _cast(xn, cast))
            grad_ws = [
                g.to(w.dtype) if need else None
                for g, w, need in zip(gw.split(sizes), weights, need_params[:n])
            ]
        if any(need_params[n:]):
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
            grad_bs = [
                g.to(b.dtype) if need and b is not None else None
                for g, b, need in zip(gb.split(sizes), biases, need_params[n:])
            ]
        grad_x = grad_nw = grad_nb = None
        if need_x or need_nw or need_nb:
            grad_xn = grad.matmul(_cast(weight, cast)).to(xn.dtype)  # (..., D)
            if kind == "none":
                grad_x = grad_xn.to(x.dtype)
            elif kind == "layer":
                xin = x.float() if cast is not None and x.dtype != torch.float64 else x
                gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                    grad_xn, xin, [x.shape[-1]], *stats, norm_w, norm_b, [need_x, need_nw, need_nb]
                )
                grad_x = None if gx is None else gx.to(x.dtype)
                grad_nw, grad_nb = gw, gb
            else:
                (rstd,) = stats
                xhat = _stat_dtype(x) * rstd
                if need_nw:
                    grad_nw = (grad_xn * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(norm_w.dtype)
                if need_x:
                    g = _stat_dtype((grad_xn * norm_w).to(x.dtype))
                    grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return (grad_x, None, grad_nw, grad_nb, None, None, *grad_ws, *grad_bs)


def _linear_weight_grad(grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """dL/dW for `F.linear(inp, W)`: (out, in) from grad (..., out) and inp (..., in)."""
    return grad.reshape(-1, grad.shape[-1]).t().mm(inp.reshape(-1, inp.shape[-1]))


# ---------------------------------------------------------------------------------------------- RMSNorm
def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    # `x.float()` for every training dtype; float64 stays float64 so gradcheck can run.
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        x32 = _stat_dtype(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) float32
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight, rstd = ctx.saved_tensors
        xhat = _stat_dtype(x) * rstd  # (..., D) float32
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = _stat_dtype((grad * weight).to(x.dtype))  # the casts autograd would apply on the way back
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm: `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`; x (..., D), weight (D,).

    Keeps x and the per-row rstd (..., 1) for backward instead of a float32 copy and the normalised activations.
    """
    if not records_grad(x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return _RMSNorm.apply(x, weight, eps)


# ---------------------------------------------------------------------------------------------- activation -> linear
class _ActLinear(torch.autograd.Function):
    """`F.linear(act(a, b), weight, bias)` keeping only a, b (and the weight): act is recomputed in backward."""

    @staticmethod
    def forward(ctx, kind: str, a: torch.Tensor, b: torch.Tensor | None, weight, bias):  # noqa: ANN001, ANN205
        cast = _autocast_dtype(a.device.type)
        with torch.autocast(a.device.type, enabled=False):
            act = _activation(kind, a, b)
            out = F.linear(_cast(act, cast), _cast(weight, cast), None if bias is None else _cast(bias, cast))
        ctx.kind, ctx.cast = kind, cast
        ctx.save_for_backward(a, b, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        a, b, weight, bias = ctx.saved_tensors
        cast = ctx.cast
        need_a, need_b, need_w, need_bias = ctx.needs_input_grad[1:5]
        grad_a = grad_b = grad_w = grad_bias = None
        silu_a = F.silu(a) if ctx.kind == "swiglu" and (need_w or need_b) else None
        if need_w:
            act = silu_a * b if ctx.kind == "swiglu" else F.gelu(a)
            grad_w = _linear_weight_grad(grad, _cast(act, cast)).to(weight.dtype)
        if need_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
        if need_a or need_b:
            grad_act = grad.matmul(_cast(weight, cast)).to(a.dtype)  # (..., in)
            if ctx.kind == "swiglu":  # act = silu(a) * b
                if need_b:
                    grad_b = grad_act * silu_a
                if need_a:
                    grad_a = torch.ops.aten.silu_backward(grad_act * b, a)
            else:  # gelu
                grad_a = torch.ops.aten.gelu_backward(grad_act, a)
        return None, grad_a, grad_b, grad_w, grad_bias


def _activation(kind: str, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if kind == "swiglu":
        return F.silu(a) * b
    return F.gelu(a)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Qwen2 MLP tail `F.linear(silu(gate) * up, weight)`: gate, up (..., I); weight (D, I) -> (..., D).

    Keeps gate and up for backward; plain autograd also keeps `silu(gate)` and the product.
    """
    if not records_grad(gate, up, weight):
        return F.linear(F.silu(gate) * up, weight)
    return _ActLinear.apply("swiglu", gate, up, weight, None)


def gelu_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Whisper MLP tail `F.linear(gelu(a), weight, bias)`: a (..., F); weight (D, F) -> (..., D).

    Keeps `a` for backward; plain autograd also keeps `gelu(a)`.
    """
    if not records_grad(a, weight, bias):
        return F.linear(F.gelu(a), weight, bias)
    return _ActLinear.apply("gelu", a, None, weight, bias)


# ---------------------------------------------------------------------------------------------- LM head + loss
class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `F.linear(h, weight)` against `targets`, chunk by chunk, gradients made in forward.

    Each chunk's float32 logits exist only inside the loop: the forward turns them into the loss and straight
    into `softmax - one_hot` (the gradient of the mean loss wrt the logits, up to the incoming scalar), then into
    dL/dh (N, D) and dL/dW (V, D). Backward only scales those by the incoming gradient. Against a checkpointed
    chunk loss this saves the recomputed head matmul (3 GEMMs per chunk instead of 4).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int):  # noqa: ANN001, ANN205
        loss, grad_h, grad_w = _chunked_cross_entropy(
            h, weight, targets, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = (grad_h * grad).to(h_dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad).to(w_dtype)
        return grad_h, grad_w, None, None


def _chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, need_h: bool, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, dL/dh or None, dL/dW or None), the gradients for an incoming gradient of 1."""
    cast = _autocast_dtype(h.device.type)
    n = targets.numel()
    acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for gradcheck
    total = h.new_zeros((), dtype=acc)
    grad_h = grad_w = None
    with torch.autocast(h.device.type, enabled=False):
        w = _cast(weight, cast)
        if need_h:
            grad_h = torch.empty(h.shape, dtype=w.dtype if cast else h.dtype, device=h.device)
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for i in range(0, n, chunk_size):
            hc, yc = _cast(h[i : i + chunk_size], cast), targets[i : i + chunk_size]
            logits = F.linear(hc, w)  # (c, V) in the compute dtype, exactly as `head(hc)`
            total = total + F.cross_entropy(logits.to(acc), yc, reduction="sum")
            if not (need_h or need_w):
                continue
            g = logits.to(acc).softmax(-1)
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            g = (g * (1.0 / n)).to(logits.dtype)  # d mean / d logits, rounded like autograd's cast back
            if need_h:
                grad_h[i : i + chunk_size] = g.mm(w)
            if need_w:
                grad_w += g.t().mm(hc).to(acc)
    return total / n, grad_h, grad_w


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight).float(), targets)` (mean) without full float32 logits.

    h (N, D), weight (V, D), targets (N,) with no ignored entries, N > 0. The value equals the chunked sum of
    `F.cross_entropy(..., reduction="sum")` divided by N, bit for bit.
    """
    if not records_grad(h, weight):
        return _chunked_cross_entropy(h, weight, targets, chunk_size, False, False)[0]
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_size)


# ---------------------------------------------------------------------------------------------- attention
class _SoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask):  # noqa: ANN001, ANN205
        s = q.matmul(k.transpose(-1, -2))  # (..., Tq, Tk) in q's dtype
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1, dtype=torch.promote_types(s.dtype, torch.float32)).to(q.dtype)
        ctx.save_for_backward(q, k, v, p)
        return p.matmul(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        q, k, v, p = ctx.saved_tensors
        grad = grad.to(v.dtype)
        grad_v = p.transpose(-1, -2).matmul(grad)
        ds = torch.ops.aten._softmax_backward_data(grad.matmul(v.transpose(-1, -2)), p, -1, p.dtype)
        return ds.matmul(k), ds.transpose(-1, -2).matmul(q), grad_v, None


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`softmax(q k^T) v` with no scale (fold it into q): q (..., Tq, hd), k/v (..., Tk, hd) -> (..., Tq, hd).

    Plain matmuls with a float32 softmax, keeping q, k, v and the probabilities (in q's dtype) for backward. For
    short bf16 sequences on CPU (the encoder's 150-frame windows) this is ~3x faster forward + backward than the
    CPU flash-attention kernel, whose bf16 backward is slower than its fp32 one. `mask`: None or bool,
    broadcastable to (..., Tq, Tk), True = visible; every query must see at least one key.
    """
    return _SoftmaxAttention.apply(q, k, v, mask)
