"""Second look, review 19, at c0ba7bb (int4 repacked into blocks of 32 for an AVX2-only CPU's kernel at first use).

The repack ran under the engine's inference_mode, so every int4 weight became an inference tensor after a generate
and a later `load_state_dict` into the model failed ('Inplace update to inference tensor'); it unpacked a whole
layer at once (the head's temporaries were ~6x its packed weight); a partial load without the weight marked the
repacked weight as blocks of 64 (wrong answers); two threads could both repack. The kernel here is a stand-in that
reads blocks of 32, so these run on any CPU.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from musicflamingo.model import quantize as Q

_UNPACK = Q.unpack_int4  # (the stand-in kernel's own, not what a test records)


def _kernel_reading_blocks_of_32(x, weight, group_size, scale_zero):
    """aten._weight_int4pack_mm_for_cpu as an AVX2-only CPU runs it: x (M, K) -> (M, N') from blocks of 32."""
    w = _UNPACK(weight, torch.float32, block=32).view(weight.shape[0], -1, group_size)
    sz = scale_zero.float()
    w = w * sz[..., 0].t().unsqueeze(-1) + (sz[..., 1] - 8 * sz[..., 0]).t().unsqueeze(-1)
    return (x.float() @ w.view(weight.shape[0], -1).t()).to(x.dtype)


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setattr(Q, "int4_kernel_block", lambda: 32)
    monkeypatch.setattr(
        Q.torch.ops.aten, "_weight_int4pack_mm_for_cpu", _kernel_reading_blocks_of_32, raising=False
    )


def _layer(rows: int = 130) -> tuple[Q.Int4Linear, dict[str, torch.Tensor], torch.Tensor]:
    """(an int4 layer, a copy of its state dict, its dequantized weight (rows, 96) float32)."""
    torch.manual_seed(0)
    q = Q.Int4Linear.from_linear(nn.Linear(96, rows).to(torch.bfloat16))
    return q, {k: v.clone() for k, v in q.state_dict().items()}, q.dequantize(torch.float32)


def test_a_layer_repacked_under_inference_mode_still_loads_a_state_dict(avx2):
    """The engine decodes under inference_mode: the repacked weight is a normal tensor, so the model can load a
    checkpoint's state dict afterwards, and answers from it."""
    q, saved, deq = _layer()
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = q(x)
    assert q.packed_block == 32 and not q.weight.is_inference()
    q.load_state_dict(saved)  # raised 'Inplace update to inference tensor outside InferenceMode'
    assert q.packed_block == 64 and torch.equal(q.weight, saved["weight"])
    torch.testing.assert_close(got.float(), F.linear(x.float(), deq, q.bias.float()), rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        torch.testing.assert_close(q(x), got)


def test_a_misaligned_weight_realigned_under_inference_mode_is_a_normal_tensor():
    """The same for `align` (a memory-mapped checkpoint's weight at an odd offset, copied at the kernel's use)."""
    q = Q.Int8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    view = torch.empty(64 * 32 + 1, dtype=torch.int8)[1:].view(32, 64)
    q.weight = view.copy_(q.weight)
    with torch.inference_mode():
        q(torch.randn(1, 64, dtype=torch.bfloat16))
    assert q.weight.data_ptr() % 64 == 0 and not q.weight.is_inference()
    q.load_state_dict(saved)


def test_the_repack_unpacks_a_chunk_of_rows_at_a_time(avx2, monkeypatch):
    """Repacking (and saving a repacked layer) unpacks _CHUNK rows at a time, not the whole layer: the unpacked
    values are twice the packed bytes and pack_int4 makes three more copies, ~1.6 GB for a 7B model's head."""
    q, saved, deq = _layer(rows=320)
    monkeypatch.setattr(Q, "_CHUNK", 64)
    unpacked_rows = []
    unpack = Q.unpack_int4

    def recording_unpack(packed, *args, **kwargs):
        unpacked_rows.append(packed.shape[0])
        return unpack(packed, *args, **kwargs)

    monkeypatch.setattr(Q, "unpack_int4", recording_unpack)
    q(torch.randn(2, 96, dtype=torch.bfloat16))
    state = q.state_dict()
    assert q.packed_block == 32 and unpacked_rows and max(unpacked_rows) <= 64
    assert torch.equal(state["weight"], saved["weight"])
    monkeypatch.setattr(Q, "unpack_int4", unpack)
    assert torch.equal(q.dequantize(torch.float32), deq)


def test_a_partial_load_without_the_weight_keeps_its_layout(avx2):
    """load_state_dict(strict=False) of a state dict without `weight` leaves the repacked weight as it is: it is
    still read as blocks of 32 (was marked 64 and read wrongly)."""
    q, saved, deq = _layer()
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    got = q(x)
    q.load_state_dict({"bias": saved["bias"]}, strict=False)
    assert q.packed_block == 32
    assert torch.equal(q.dequantize(torch.float32), deq)
    torch.testing.assert_close(q(x), got)


def test_two_threads_at_the_first_use_repack_once(avx2, monkeypatch):
    """serve decodes in a worker thread; anything else calling the model at once must not repack the same weight
    again (one could read the new weight with the old block, or the reverse, and store garbage). The first repack
    waits (up to 3 s) for a second thread to start one too: with the lock, the second waits for the first instead."""
    q, _, deq = _layer()
    pack = Q.pack_int4
    first_in, second_in, calls = threading.Event(), threading.Event(), []

    def slow_pack(v, block=64):
        calls.append(threading.current_thread().name)
        if not first_in.is_set():
            first_in.set()
            second_in.wait(3)
        else:
            second_in.set()
        return pack(v, block)

    monkeypatch.setattr(Q, "pack_int4", slow_pack)
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    out: dict[str, torch.Tensor] = {}

    def run(name: str) -> None:
        if name == "second":
            first_in.wait(3)
        out[name] = q(x)

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["first"] and q.packed_block == 32
    monkeypatch.setattr(Q, "pack_int4", pack)
    assert torch.equal(q.dequantize(torch.float32), deq)
    torch.testing.assert_close(out["first"], out["second"], rtol=0, atol=0)
