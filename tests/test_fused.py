"""Memory-lean autograd functions (musicflamingo/model/fused.py): plain-op forwards, autograd's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from musicflamingo import MusicFlamingoConfig
from musicflamingo.model.encoder import EncoderLayer
from musicflamingo.model.fused import (
    gelu_linear,
    linear_cross_entropy,
    norm_linear,
    rms_norm,
    softmax_attention,
    swiglu_linear,
)
from musicflamingo.model.lora import LoRALinear
from musicflamingo.model.musicflamingo import causal_lm_loss
from musicflamingo.model.qwen2 import MLP, DecoderLayer, Qwen2Model, RMSNorm


def plain_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_swiglu_linear(gate, up, w):
    return F.linear(F.silu(gate) * up, w)


def plain_gelu_linear(a, w, b):
    return F.linear(F.gelu(a), w, b)


def plain_linear_cross_entropy(h, w, y, chunk):
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, len(y), chunk):
        total = total + F.cross_entropy(
            F.linear(h[i : i + chunk], w).float(), y[i : i + chunk], reduction="sum"
        )
    return total / len(y)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    y = torch.randint(0, 11, (7,), generator=g)
    return {
        "rms": (r(2, 3, 6), r(6), 1e-6),
        "swiglu": (r(2, 3, 5), r(2, 3, 5), r(4, 5)),
        "gelu": (r(2, 3, 5), r(4, 5), r(4)),
        "ce": (r(7, 4), r(11, 4), y, 3),
    }


CASES = {
    "rms": (rms_norm, plain_rms_norm),
    "swiglu": (swiglu_linear, plain_swiglu_linear),
    "gelu": (gelu_linear, plain_gelu_linear),
    "ce": (linear_cross_entropy, plain_linear_cross_entropy),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(name):
    fused, _ = CASES[name]
    args = _inputs(torch.float64)[name]
    assert torch.autograd.gradcheck(fused, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_forward_bit_equal_and_grads_match_autograd(name):
    fused, plain = CASES[name]
    a = _inputs(torch.float32, seed=1)[name]
    b = tuple(
        t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in a
    )
    out_f, out_p = fused(*a), plain(*b)
    assert torch.equal(out_f, out_p)
    with torch.no_grad():  # the no-grad path skips the autograd Function: same numbers
        assert torch.equal(fused(*a), out_p)
    go = torch.randn_like(out_p)
    out_f.backward(go)
    out_p.backward(go)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_forward_equal_and_grads_close(name):
    """Under autocast the functions cast their matmul operands as autocast would (fp32 weights, bf16 GEMMs)."""
    fused, plain = CASES[name]
    a = _inputs(torch.float32, seed=2)[name]
    if name in ("swiglu", "gelu"):  # these inputs come out of an autocast linear: bf16 activations
        a = (a[0].detach().bfloat16().requires_grad_(), *a[1:])
        if name == "swiglu":
            a = (a[0], a[1].detach().bfloat16().requires_grad_(), a[2])
    b = tuple(
        t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in a
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_p = fused(*a), plain(*b)
    assert out_f.dtype == out_p.dtype
    assert torch.equal(out_f, out_p)
    go = torch.randn_like(out_p)
    out_f.backward(go)
    out_p.backward(go)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            assert x.grad.dtype == x.dtype
            torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=2e-2, atol=2e-2)


def test_frozen_weights_get_no_grad():
    h, w, y, chunk = _inputs(torch.float32)["ce"]
    w = w.detach()
    linear_cross_entropy(h, w, y, chunk).backward()
    assert h.grad is not None and w.grad is None
    gate, up, wd = _inputs(torch.float32)["swiglu"]
    swiglu_linear(gate, up, wd.detach()).sum().backward()
    assert gate.grad is not None and up.grad is not None


def test_modules_use_fused_forward_bit_equal():
    torch.manual_seed(0)
    cfg = MusicFlamingoConfig.from_name("tiny")
    x = torch.randn(2, 5, cfg.text.hidden_size)
    norm = RMSNorm(cfg.text.hidden_size, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    assert torch.equal(norm(x), plain_rms_norm(x, norm.weight, 1e-6))
    mlp = MLP(cfg.text)
    want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.equal(mlp(x), want)
    layer = EncoderLayer(cfg.audio)
    xa = torch.randn(2, 5, cfg.audio.hidden_size)
    hh = xa + layer.self_attn(layer.self_attn_layer_norm(xa), None)
    want = hh + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(hh))))
    assert torch.equal(layer(xa, None), want)


def test_mlp_without_autograd_goes_in_row_chunks_with_the_same_result(monkeypatch):
    """Inference over many rows runs the MLP in chunks of `MLP_CHUNK_ROWS` (what bounds a 20-minute prefill's
    temporaries), giving each row the result of one pass; with autograd on, one pass over all rows."""
    from musicflamingo.model import qwen2

    torch.manual_seed(0)
    cfg = MusicFlamingoConfig.from_name("tiny").text
    mlp, norm = MLP(cfg), RMSNorm(cfg.hidden_size, 1e-6)
    x = torch.randn(2, 11, cfg.hidden_size)
    passes, one_pass = [], mlp._forward
    monkeypatch.setattr(
        mlp, "_forward", lambda h, n: passes.append(h.numel() // h.shape[-1]) or one_pass(h, n)
    )
    with torch.no_grad():
        whole = mlp(x, norm)
        assert passes == [22]  # 22 rows <= MLP_CHUNK_ROWS: one pass
        monkeypatch.setattr(qwen2, "MLP_CHUNK_ROWS", 8)
        passes.clear()
        chunked = mlp(x, norm)
    assert passes == [8, 8, 6] and chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    passes.clear()
    grad_on = mlp(x, norm)  # autograd on (training): one pass, whatever the row count
    assert passes == [22] and grad_on.requires_grad
    torch.testing.assert_close(grad_on.detach(), whole, rtol=1e-6, atol=1e-6)


def test_lora_down_proj_still_applies_its_adapter():
    torch.manual_seed(0)
    mlp = MLP(MusicFlamingoConfig.from_name("tiny").text)
    x = torch.randn(1, 3, mlp.gate_proj.in_features)
    base = mlp(x)
    mlp.down_proj = LoRALinear.from_linear(mlp.down_proj, rank=2, alpha=4.0)
    torch.nn.init.normal_(mlp.down_proj.lora_B)
    out = mlp(x)
    assert not torch.allclose(out, base)
    out.sum().backward()
    assert mlp.down_proj.lora_B.grad is not None


def test_causal_lm_loss_matches_plain_chunks():
    """Value bit-equal to chunked F.cross_entropy, gradients equal to autograd's (chunks of 4 over 12 labels)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 13, bias=False)
    hidden = torch.randn(2, 8, 6, requires_grad=True)
    labels = torch.randint(0, 13, (2, 8))
    labels[0, :3] = -100
    loss, n = causal_lm_loss(hidden, labels, head, chunk_size=4)
    h = hidden[:, :-1].reshape(-1, 6)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    want = plain_linear_cross_entropy(h[keep], head.weight, y[keep], 4)
    assert n == int(keep.sum()) == 12
    assert torch.equal(loss, want)
    g_fused = torch.autograd.grad(loss, (hidden, head.weight))
    g_plain = torch.autograd.grad(want, (hidden, head.weight))
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(causal_lm_loss(hidden, labels, head, chunk_size=4)[0], want)


def test_softmax_attention_gradcheck_and_matches_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    mask = (torch.arange(5) < torch.tensor([5, 3])[:, None])[:, None, None, :]  # (2, 1, 1, 5) key padding
    assert torch.autograd.gradcheck(softmax_attention, (q, k, v, mask), eps=1e-6, atol=1e-6)
    out = softmax_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    ref = torch.autograd.grad(want, (q, k, v), go)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_encoder_bf16_training_attention_close_to_sdpa():
    """The bf16 training path (plain matmuls) stays within bf16 rounding of SDPA, outputs and gradients."""
    torch.manual_seed(0)
    layer = EncoderLayer(MusicFlamingoConfig.from_name("tiny").audio)
    x = torch.randn(3, 20, layer.fc1.in_features)
    mask = (torch.arange(20) < torch.tensor([20, 12, 7])[:, None])[:, None, None, :]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, mask)
        with torch.no_grad():  # the inference path keeps SDPA
            want = layer(x, mask)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0.02, atol=0.05)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_training_path_layers_equal_inference_path():
    """Training forwards (fused q/k/v and gate/up GEMMs, memory-lean functions) give the inference numbers."""
    torch.manual_seed(0)
    cfg = MusicFlamingoConfig.from_name("tiny")
    dec, enc = DecoderLayer(cfg.text, 0), EncoderLayer(cfg.audio)
    for p in (*dec.parameters(), *enc.parameters()):
        p.data.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norm weights
    x = torch.randn(2, 7, cfg.text.hidden_size)
    cos, sin = Qwen2Model(cfg.text).rotary_emb(torch.arange(7)[None].expand(2, 7), torch.float32)
    xa = torch.randn(2, 9, cfg.audio.hidden_size)
    train_dec, train_enc = dec(x, cos, sin, None, True, None), enc(xa, None)
    with torch.no_grad():
        assert torch.equal(train_dec, dec(x, cos, sin, None, True, None))
        assert torch.equal(train_enc, enc(xa, None))
    (train_dec.sum() + train_enc.sum()).backward()
    assert dec.self_attn.k_proj.weight.grad.abs().sum() > 0 and enc.self_attn.k_proj.weight.grad is not None


def _norm_and_linears(kind, dtype, seed):
    torch.manual_seed(seed)
    norm = {"rms": RMSNorm(6, 1e-6), "layer": torch.nn.LayerNorm(6, eps=1e-5), "none": None}[kind]
    linears = [torch.nn.Linear(6, 4, bias=True), torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(6, 2)]
    mods = [m for m in (norm, *linears) if m is not None]
    for m in mods:
        m.to(dtype)
        for p in m.parameters():
            p.data.add_(torch.randn_like(p) * 0.3)
    return norm, linears, mods


@pytest.mark.parametrize("kind", ["rms", "layer", "none"])
def test_norm_linear_gradcheck_float64(kind):
    norm, linears, mods = _norm_and_linears(kind, torch.float64, 0)
    params = [p for m in mods for p in m.parameters()]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    assert norm_linear(x, norm, linears) is not None  # the fused path is what is checked
    assert torch.autograd.gradcheck(lambda x: torch.cat(norm_linear(x, norm, linears), -1), (x,), eps=1e-6)
    # parameter gradients: compare with plain autograd in float64
    out = torch.cat(norm_linear(x, norm, linears), -1)
    xn = norm(x) if norm is not None else x
    want = torch.cat([m(xn) for m in linears], -1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *params], go)
    ref = torch.autograd.grad(want, [x, *params], go)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["rms", "layer", "none"])
@pytest.mark.parametrize("autocast", [False, True])
def test_norm_linear_matches_plain_modules(kind, autocast):
    """Outputs and gradients of norm -> separate linears. Not asserted bit-equal here: at these odd widths the
    GEMM library picks different kernels for 9 and 4/3/2 outputs (model widths: see the layer test above)."""
    norm, linears, mods = _norm_and_linears(kind, torch.float32, 1)
    params = [p for m in mods for p in m.parameters()]
    x = torch.randn(2, 5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = norm_linear(x, norm, linears)
        xn = norm(x) if norm is not None else x
        want = [m(xn) for m in linears]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    go = [torch.randn_like(t) for t in want]
    g_got = torch.autograd.grad(got, [x, *params], go)
    g_want = torch.autograd.grad(want, [x, *params], go)
    tol = 2e-2 if autocast else 1e-6
    for a, b in zip(g_got, g_want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
