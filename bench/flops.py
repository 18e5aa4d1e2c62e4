"""Model FLOPs of a Music Flamingo training step, and the measured matmul ceiling of the machine.

FLOPs are counted as 2 per multiply-add. For one batch:

* encoder (per window, P = `max_source_positions` frames after conv2, d = width, f = MLP width, m = mel bins):
  conv1 `2 * (3 m d) * 2P`, conv2 `2 * (3 d d) * P`, per layer linear `2 * (4 d^2 + 2 d f) * P` and attention
  `4 * P^2 * d` (QK^T and AV, bidirectional);
* projector: `2 * (d D + D^2) * P/2` per window (every pooled frame is projected, padded or not);
* decoder (T = B * S tokens, h = width, q = heads * head_dim, kv = kv_heads * head_dim, i = MLP width):
  per layer linear `2 * (2 h q + 2 h kv + 3 h i) * T` and causal attention `2 * S^2 * q` per row
  (half of the `4 S^2 q` a dense score matrix costs); except the last layer, which a training step runs for the
  N labelled positions only (`Qwen2Model.forward(output_rows=...)`): `2 * 2 h kv * T` for keys and values,
  `2 * (2 h q + 3 h i) * N`, and attention `4 * S * q` per labelled query (an upper bound: the causal prefix of a
  query is at most S; the benchmarks label the tail of each row, where it is nearly S);
* LM head: `2 * h * V` per *labelled* token (the only positions a loss needs).

A training step is forward + backward = 3x the forward: `6 * sum(params_in_matmuls * tokens_they_see) +
3 * attention_forward_flops`. Embedding lookups, norms, activations and the optimizer are not counted.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from musicflamingo.model.config import MusicFlamingoConfig


def forward_flops(config: MusicFlamingoConfig, windows: int, batch: int, seq_len: int, labelled: int) -> dict:
    """Forward FLOPs of one batch, split into `matmul` (weights x activations) and `attention` (scores, AV).

    Args:
        windows: encoder windows W in the batch (all assumed full length).
        batch, seq_len: decoder batch B and padded length S (audio placeholders included).
        labelled: tokens with a label (positions that reach the LM head).
    """
    a, t = config.audio, config.text
    d, f, m, P = a.hidden_size, a.intermediate_size, a.num_mel_bins, a.max_source_positions
    D = t.hidden_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    enc_mm = 2 * (3 * m * d) * 2 * P + 2 * (3 * d * d) * P
    enc_mm += a.num_hidden_layers * 2 * (4 * d * d + 2 * d * f) * P
    enc_attn = a.num_hidden_layers * 4 * P * P * d
    proj_mm = 2 * (d * D + D * D) * (P // 2)
    T = batch * seq_len
    full_layers = t.num_hidden_layers - 1  # the last one runs only the labelled positions' queries
    dec_mm = full_layers * 2 * (2 * D * q + 2 * D * kv + 3 * D * t.intermediate_size) * T
    dec_mm += 2 * (2 * D * kv) * T + 2 * (2 * D * q + 3 * D * t.intermediate_size) * labelled
    dec_attn = full_layers * 2 * seq_len * seq_len * q * batch + 4 * seq_len * q * labelled
    head_mm = 2 * D * t.vocab_size * labelled
    matmul = windows * (enc_mm + proj_mm) + dec_mm + head_mm
    attention = windows * enc_attn + dec_attn
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


def training_flops(
    config: MusicFlamingoConfig, windows: int, batch: int, seq_len: int, labelled: int
) -> float:
    """FLOPs of forward + backward (3x forward; see the module docstring)."""
    return 3.0 * forward_flops(config, windows, batch, seq_len, labelled)["total"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(
    device: str | torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    """Best median FLOP/s of square `n x n @ n x n` matmuls over `sizes` (2 n^3 FLOPs each)."""
    device = torch.device(device)
    best, per_size = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):  # warm-up: thread pool, oneDNN/cuBLAS kernel selection
            a @ b
        _sync(device)
        rates = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                a @ b
                seconds = time.perf_counter() - t0
            rates.append(2.0 * n**3 / seconds)
        rates.sort()
        per_size[n] = rates[len(rates) // 2]
        best = max(best, per_size[n])
    return {"flops": best, "per_size": per_size}
