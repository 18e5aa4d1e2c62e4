"""Qwen2 decoder: GQA with q/k/v bias, RMSNorm, half-split RoPE, SwiGLU MLP; keys/values go to a `KVCache`.

Numerics follow the reference `Qwen2Model` (transformers >= 5.5) with SDPA:
* RMSNorm computes in float32 and casts back *before* the weight multiply.
* RoPE cos/sin are computed in float32 from float32 `inv_freq`, then cast to the activation dtype.
* No padding and no cache -> SDPA's `is_causal` fast path with no dense mask; otherwise a boolean
  `(B, 1, T, past+T)` mask = causal & key-not-padding.
* Packed rows (several conversations in one row, `seq_ids`): a token sees only earlier tokens of its own
  conversation; positions restart at 0 in each (`segment_positions`). Attention runs conversation by conversation
  (`segment_attention`: causal SDPA on each span, so no (T, T) mask, and CUDA keeps its flash kernel); compiled
  layers take the equivalent block-diagonal mask instead (`segment_mask`: a fixed graph, not one per layout).
* One-token bf16/fp16 decode steps on CPU use plain matmuls (`decode_attention`), the reference's eager
  formula: there the CPU flash kernel is ~4x (batch 1) to ~10x (batch 8) slower than two small matmuls. oneDNN
  compiles a kernel for every new bf16 matmul shape, so the engine lets those steps see the cache in blocks of
  keys under the key mask (`engine.KEY_BLOCK`), not a width that grows by one per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from musicflamingo.model.config import TextConfig
from musicflamingo.model.fused import project, swiglu_linear
from musicflamingo.model.layers import CacheView, RMSNorm, RotaryEmbedding, rotate_half

MLP_CHUNK_ROWS = 4096  # rows of one MLP pass without autograd: bounds its (rows, intermediate) temporaries


def uses_decode_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one-token cached steps run `decode_attention` (CPU, bf16/fp16) rather than SDPA."""
    return device.type == "cpu" and dtype != torch.float32


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one new query per row over the cache, as the reference's eager attention computes it.

    q (B, H, 1, hd); k, v (B, H_kv, L, hd) (views of the cache); mask None or bool (B, 1, 1, L), True = visible.
    The query heads sharing a key/value head go side by side, so GQA needs no repeated keys. Scores in the
    activation dtype, float32 softmax, cast back before the value matmul. Returns (B, H, 1, hd).
    """
    B, H, _, hd = q.shape
    kv_heads = k.shape[1]
    scores = torch.matmul(q.view(B, kv_heads, H // kv_heads, hd), k.transpose(-1, -2)) * hd**-0.5
    if mask is not None:  # (B, H_kv, H / H_kv, L)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(probs, v).view(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: CacheView | None = None,
        norm: nn.Module | None = None,
        rows: torch.Tensor | None = None,
        spans: Spans | None = None,
    ) -> torch.Tensor:
        """x (B, T, h), normalised by `norm` first if given; cos/sin (B or 1, T, hd); mask None or bool
        (B, 1, Q, keys), True = visible. Returns (B, Q, h) with Q = T, or with `rows` (B, K) sequence indices the
        outputs at those positions only (Q = K): keys and values still come from every position. `spans`: packed
        rows' conversations (`segment_spans`), attended one by one (then `mask` is None)."""
        B, T, _ = x.shape
        if rows is None:
            q, k, v = project(
                x, norm, [self.q_proj, self.k_proj, self.v_proj], own=(2,)
            )  # v goes to SDPA as is
            q_cos, q_sin = cos, sin
        else:
            k, v = project(x, norm, [self.k_proj, self.v_proj], own=(1,))
            q = project(gather_rows(x, rows), norm, [self.q_proj])[0]
            q_cos, q_sin = (gather_rows(t.expand(B, -1, -1), rows) for t in (cos, sin))  # (B, K, hd)
        q = q.view(B, q.shape[1], -1, self.head_dim).transpose(1, 2)  # (B, H, Q, hd)
        k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, H_kv, T, hd)
        q = q * q_cos[:, None] + rotate_half(q) * q_sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, keys, hd)
        Q = q.shape[2]
        dropout = self.attention_dropout if self.training else 0.0
        if spans is not None:
            a = segment_attention(q, k, v, spans, dropout, self.num_heads != self.num_kv_heads)
        elif Q == 1 and cache is not None and uses_decode_attention(q.device, q.dtype):
            a = decode_attention(q, k, v, mask)
        else:
            a = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=dropout,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
        return self.o_proj(a.transpose(1, 2).reshape(B, Q, -1))


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) at the sequence indices rows (B, K) -> (B, K, D)."""
    return x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))


class MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (B, T, h), normalised by `norm` first if given.

        Without autograd (inference), more than `MLP_CHUNK_ROWS` rows go through in chunks of rows: every row is
        computed alone anyway, and the (rows, intermediate) tensors of a 20-minute prompt (30 000 rows: gate, up,
        silu(gate), the product, ~1.1 GB each in bf16) would otherwise be the prefill's peak beyond the weights.
        """
        rows = x.numel() // x.shape[-1]
        if rows > MLP_CHUNK_ROWS and not torch.is_grad_enabled():
            flat = x.reshape(rows, x.shape[-1])
            chunks = [
                self._forward(flat[i : i + MLP_CHUNK_ROWS], norm) for i in range(0, rows, MLP_CHUNK_ROWS)
            ]
            return torch.cat(chunks).view(*x.shape[:-1], -1)
        return self._forward(x, norm)

    def _forward(self, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        gate, up = project(x, norm, [self.gate_proj, self.up_proj])  # one GEMM when training
        if type(self.down_proj) is nn.Linear:  # not a LoRA adapter: keep only gate and up for backward
            return swiglu_linear(gate, up, self.down_proj.weight)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, cos, sin, mask, is_causal, cache=None, rows=None, spans=None):  # noqa: ANN001, ANN201
        """h (B, T, h) -> (B, T, h); with `rows` (B, K), the outputs at those positions only, (B, K, h) (see
        `Qwen2Model.forward`'s `output_rows`). One entry point, so wrappers around the layer (FSDP,
        checkpointing, torch.compile) see every use."""
        # The norms go in with their inputs so training can fuse them into the following GEMM (fused.norm_linear).
        attn = self.self_attn(
            h, cos, sin, mask, is_causal, cache, norm=self.input_layernorm, rows=rows, spans=spans
        )
        if rows is not None:
            h = gather_rows(h, rows)  # the residual stream at the wanted positions
        h = h + attn
        return h + self.mlp(h, norm=self.post_attention_layernorm)


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Return `(mask, is_causal)` for SDPA.

    attention_mask: None, (B, past+q_len) with 1 = real token, or a ready bool (B, 1, q_len, past+q_len) mask
    (True = visible; the decode loop passes slices of one preallocated mask) used as is. Without padding no
    dense mask is built: the prefill uses SDPA's `is_causal`, a single decode step needs no mask at all.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding:
        if past == 0:
            return None, q_len > 1
        if q_len == 1:
            return None, False
    elif past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding only (training batches): a real token never sees a later pad under causality, so the
        # causal fast path computes the same real-token outputs with no dense mask. Pad rows are ignored.
        return None, q_len > 1
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)
    causal = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # (T, kv)
    mask = causal[None, None]
    if not no_padding:
        mask = mask & attention_mask[:, None, None, :kv_len].bool()
    return mask, False


def segment_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """seq_ids (B, T), one id per conversation packed in the row -> bool (B, 1, T, T), True = visible: causal and
    within the same conversation. Every token sees itself, so no query row is empty (a fully masked row gives NaN
    in SDPA); padding needs only an id of its own."""
    T = seq_ids.shape[1]
    i = torch.arange(T, device=seq_ids.device)
    causal = i[None, :] <= i[:, None]  # (T, T)
    return (causal & (seq_ids[:, :, None] == seq_ids[:, None, :]))[:, None]


def segment_positions(seq_ids: torch.Tensor) -> torch.Tensor:
    """seq_ids (B, T) -> position_ids (B, T) restarting at 0 where the id changes (a packed row's conversations
    each start at position 0, as they would alone)."""
    idx = torch.arange(seq_ids.shape[1], device=seq_ids.device).expand_as(seq_ids)
    return idx - torch.where(segment_starts(seq_ids), idx, 0).cummax(1).values


def segment_starts(seq_ids: torch.Tensor) -> torch.Tensor:
    """seq_ids (B, T) -> bool (B, T), True at the first token of each packed conversation."""
    return F.pad(seq_ids[:, 1:] != seq_ids[:, :-1], (1, 0), value=True)


@dataclass(frozen=True)
class Spans:
    """Packed rows' conversations for `segment_attention`: per row, the (start, end) of each run of one `seq_ids`
    value (padding's run included), covering the row in order; with `queries` (the last layer's `rows`), per row the
    wanted positions that query, ascending (the rest of the K query slots are filler)."""

    runs: tuple[tuple[tuple[int, int], ...], ...]
    queries: tuple[tuple[int, ...], ...] | None = None


def segment_spans(seq_ids: torch.Tensor) -> Spans:
    """seq_ids (B, T) -> the runs of each row (one host sync, of the runs' starts only)."""
    T = seq_ids.shape[1]
    starts = positions_by_row(segment_starts(seq_ids))  # each row's starts in order, 0 first
    return Spans(tuple(tuple(zip(row, [*row[1:], T])) for row in starts))


def positions_by_row(flags: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """bool (B, T) -> per row the positions that are true, ascending (one host sync)."""
    rows: list[list[int]] = [[] for _ in range(flags.shape[0])]
    for b, t in flags.nonzero().tolist():  # row-major
        rows[b].append(t)
    return tuple(tuple(row) for row in rows)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans, dropout: float, gqa: bool
) -> torch.Tensor:
    """Causal attention within each run of `spans`: what `segment_mask` gives, without a (T, T) mask and with the
    work of the runs alone. q (B, H, Q, hd); k, v (B, H_kv, T, hd). Q = T, or with `spans.queries` the K gathered
    query rows (the last layer's), which see their run's keys up to their own position. Returns (B, H, Q, hd)."""
    out = []
    for b, runs in enumerate(spans.runs):
        parts = []
        if spans.queries is None:
            for s, e in runs:
                parts.append(
                    F.scaled_dot_product_attention(
                        q[b : b + 1, :, s:e],
                        k[b : b + 1, :, s:e],
                        v[b : b + 1, :, s:e],
                        is_causal=True,
                        dropout_p=dropout,
                        enable_gqa=gqa,
                    )
                )
        else:
            wanted, j = spans.queries[b], 0
            for s, e in runs:
                first = j
                while j < len(wanted) and wanted[j] < e:
                    j += 1
                if j == first:
                    continue
                position = torch.tensor(wanted[first:j], device=q.device)[:, None] - s
                visible = torch.arange(e - s, device=q.device)[None, :] <= position  # (queries, run)
                parts.append(
                    F.scaled_dot_product_attention(
                        q[b : b + 1, :, first:j],
                        k[b : b + 1, :, s:e],
                        v[b : b + 1, :, s:e],
                        attn_mask=visible[None, None],
                        dropout_p=dropout,
                        enable_gqa=gqa,
                    )
                )
            if j < q.shape[2]:  # filler query slots: their output is dropped
                parts.append(q.new_zeros(1, q.shape[1], q.shape[2] - j, v.shape[-1]))
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out, dim=0)


def _padded_rows(wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (B, T) -> (indices (B, K) of the wanted positions in order, padded with 0; valid (B, K)), K = the
    largest count in a row (at least 1)."""
    counts = wanted.sum(1)
    K = max(int(counts.max()), 1)
    valid = torch.arange(K, device=wanted.device)[None, :] < counts[:, None]
    rows = torch.zeros(wanted.shape[0], K, dtype=torch.long, device=wanted.device)
    rows[valid] = wanted.nonzero()[:, 1]  # nonzero is row-major: each row's positions in order
    return rows, valid


class Qwen2Model(nn.Module):
    """Embeddings + decoder stack + final norm (no head): the one decoder forward for training, prefill and
    decode steps."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        # padding_idx as the reference: the pad row gets no gradient (a left-padded batch's last pad position
        # predicts the first real token, and the pad id may occur in text)
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # packed rows: "runs" (`segment_attention`), or "mask" (`segment_mask`; what compiled layers always take)
        self.packed_attention = "runs"

    def _layers_compiled(self) -> bool:
        return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in self.layers)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CacheView | None = None,
        output_rows: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, h) -> normalised hidden states (B, T, h).

        attention_mask: None, (B, keys) with 1 = real token, or a ready bool (B, 1, T, keys) mask (True = visible).
        position_ids (B, T): default `past + arange(T)` after what the cache holds. `rope`: precomputed
        (cos, sin), (B, T, head_dim) each, instead of positions (decode steps index a table built once).
        cache: where this forward writes keys and values (`KVCache.view_prefill` / `view_decode`); the caller
        moves the cache's lengths on afterwards, so a compiled step changes no Python state.
        output_rows: bool (B, T), the only positions whose hidden state is wanted (a training loss needs the
        labelled ones). The last layer then computes queries, attention output and MLP for those positions alone
        (keys and values still cover every position) and the result is (N, h), the wanted positions in
        row-major order. Without a cache only.
        seq_ids: (B, T) long, packed rows (`data.collate.collate_packed`): which conversation each token belongs
        to (replacing `attention_mask`; padding has an id of its own). Attention stays within each, run by run
        (`segment_attention`), and the default positions restart at 0 in each. Without a cache only. Compiled
        layers get the equivalent (B, 1, T, T) bool mask instead (`segment_mask`; T*T bytes per row, and SDPA
        keeps an additive copy per layer for backward).
        """
        B, T, _ = inputs_embeds.shape
        if output_rows is not None and cache is not None:
            raise ValueError("output_rows needs a forward without a KV cache")
        past = 0 if cache is None else cache.width - T
        spans = None
        if seq_ids is not None:
            if cache is not None:
                raise ValueError("seq_ids (packed rows) needs a forward without a KV cache")
            if seq_ids.shape != (B, T):
                raise ValueError(
                    f"seq_ids has shape {list(seq_ids.shape)}, expected [{B}, {T}] like the inputs"
                )
            seq_ids = seq_ids.to(inputs_embeds.device)
            if self.packed_attention == "mask" or self._layers_compiled():
                attention_mask = segment_mask(seq_ids)
            else:
                spans = segment_spans(seq_ids)
                attention_mask = None
            if position_ids is None and rope is None:
                position_ids = segment_positions(seq_ids)
        if rope is None:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
            rope = self.rotary_emb(position_ids, inputs_embeds.dtype)
        cos, sin = rope
        mask, is_causal = build_attention_mask(attention_mask, T, past, inputs_embeds.device)
        if spans is not None:
            mask, is_causal = None, False
        rows = valid = row_mask = last_spans = None
        if output_rows is not None:
            rows, valid = _padded_rows(output_rows)  # (B, K) sequence indices, (B, K) real or filler
            if spans is not None:  # each row's wanted positions, for the last layer's runs
                last_spans = Spans(spans.runs, positions_by_row(output_rows))
            elif mask is None:  # causal over sequence indices; right padding needs nothing more (see above)
                row_mask = torch.arange(T, device=inputs_embeds.device)[None, None, :] <= rows[:, :, None]
            else:  # (B, 1, T, T) causal & key-not-padding: its rows for these queries
                row_mask = mask.expand(B, 1, T, T).gather(2, rows[:, None, :, None].expand(B, 1, -1, T))[:, 0]
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        h = inputs_embeds
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if rows is not None and i == last:
                args = (
                    h,
                    cos,
                    sin,
                    None if spans is not None else row_mask[:, None],
                    False,
                    None,
                    rows,
                    last_spans,
                )
            else:
                args = (h, cos, sin, mask, is_causal, cache, None, spans)
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        if valid is not None:
            if not self.layers:  # no last layer gathered the wanted rows
                h = gather_rows(h, rows)
            h = h[valid]  # (N, h)
        return self.norm(h)
