"""Qwen2 decoder: GQA with q/k/v bias, RMSNorm, half-split RoPE, SwiGLU MLP, and an explicit KV cache.

Numerics follow the reference `Qwen2Model` (transformers >= 5.5) with SDPA:
* RMSNorm computes in float32 and casts back *before* the weight multiply.
* RoPE cos/sin are computed in float32 from float32 `inv_freq`, then cast to the activation dtype.
* No padding and no cache -> SDPA's `is_causal` fast path with no dense mask; otherwise a boolean
  `(B, 1, T, past+T)` mask = causal & key-not-padding.
* One-token bf16/fp16 decode steps on CPU use plain matmuls (`decode_attention`), the reference's eager
  formula: there the CPU flash kernel is ~4x (batch 1) to ~10x (batch 8) slower than two small matmuls. oneDNN
  compiles a kernel for every new bf16 matmul shape (~1 ms each, measured), so those steps see the cache up to
  a multiple of `KVCache.width_multiple` keys under the key mask (see `generation.stream_generate`), not a
  width that grows by one per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from musicflamingo.model.config import TextConfig
from musicflamingo.model.fused import project, rms_norm, swiglu_linear


class KVCache:
    """Preallocated keys/values for every layer, filled in place.

    Lifecycle: `KVCache(...)` allocates `(layers, B, H_kv, max_length, head_dim)` once; each forward writes its
    `T` new positions at `[length, length+T)` through `update()` and the model calls `advance(T)` after the last
    layer; `reset()` empties it for reuse with the same shapes (no reallocation).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0
        # One-position writes return the cache up to the next multiple of this (`set_width_multiple`).
        self.width_multiple = 1
        # Static mode (`make_static`): the write position as a tensor, and one tensor per layer.
        self.write_pos: torch.Tensor | None = None
        self._static: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @classmethod
    def for_config(
        cls,
        config: TextConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        return cls(
            config.num_hidden_layers,
            batch_size,
            max_length,
            config.num_key_value_heads,
            config.head_dim,
            dtype,
            device,
        )

    def make_static(self, static: bool = True) -> None:
        """Switch to (or, with False, back from) static mode, for compiled decode steps.

        In static mode every forward writes ONE position, at `write_pos` (a (1,) tensor that `advance` moves in
        place), and `update` returns the whole buffer (B, H_kv, max_length, hd): the caller's key mask must hide
        the slots not written yet. Nothing a step sees changes shape or Python value, so `torch.compile` traces
        it once (see `generation.stream_generate(compile=True)`).
        """
        if static:
            self._clear_unwritten()  # the key mask hides them, but not a stale NaN (see set_width_multiple)
            self.write_pos = torch.full((1,), self.length, dtype=torch.long, device=self.keys.device)
            self._static = (list(self.keys.unbind(0)), list(self.values.unbind(0)))
        else:
            self.write_pos, self._static = None, None

    def set_width_multiple(self, multiple: int = 1) -> None:
        """Make each one-position `update` return the cache up to `width(length + 1)` positions instead of
        exactly the written ones (1: exactly; `reset` restores it). The caller's key mask, `width` wide, must hide
        the slots not written yet; they are zeroed here (`_clear_unwritten`). For CPU bf16 decode steps: their
        attention matmuls then keep one shape for `multiple` steps instead of compiling a new oneDNN kernel every
        step."""
        if multiple < 1:
            raise ValueError(f"width multiple must be >= 1, got {multiple}")
        if multiple > 1:
            self._clear_unwritten()
        self.width_multiple = multiple

    def _clear_unwritten(self) -> None:
        """Zero the slots past `length`, which masked attention will read: an earlier run may have left NaN or inf
        there, and a mask does not hide those (SDPA adds -inf to a NaN score; probability 0 times a NaN value is
        NaN)."""
        self.keys[:, :, :, self.length :].zero_()
        self.values[:, :, :, self.length :].zero_()

    def width(self, end: int) -> int:
        """How many positions a one-position step that fills the cache to `end` sees (see `set_width_multiple`)."""
        m = self.width_multiple
        return min(-(-end // m) * m, self.max_length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, hd) at the current position; return all keys/values so far (static mode:
        the whole buffer; a one-position write with a width multiple: `width(length + 1)` positions)."""
        if self._static is not None:
            keys, values = self._static[0][layer], self._static[1][layer]
            keys[:, :, self.write_pos] = k  # in place, at a tensor index: one graph for every position
            values[:, :, self.write_pos] = v
            return keys, values
        T = k.shape[2]
        end = self.length + T
        if end > self.max_length:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, {self.max_length} allocated")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        if T == 1:
            end = self.width(end)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
        if self.write_pos is not None:
            if n != 1:
                raise RuntimeError(f"a static KV cache advances one position per step, not {n}")
            self.write_pos += 1

    def reset(self) -> None:
        self.length = 0
        self.make_static(False)
        self.width_multiple = 1

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only batch rows `index` (e.g. to drop finished rows)."""
        self.keys = self.keys[:, index]
        self.values = self.values[:, index]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, cast BEFORE the weight multiply, like the reference (see fused.rms_norm)
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Half-split RoPE. `inv_freq` is a float32 buffer recomputed from config, never loaded or cast."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        d = self.head_dim
        return 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def reset_buffers(self, device: torch.device) -> None:
        self.inv_freq = self.compute_inv_freq(device)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # `model.to(torch.bfloat16)` would cast these buffers and change the numbers: keep them float32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_buffers(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, head_dim) in `dtype`."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        cache: KVCache | None,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """x (B, T, h), normalised by `norm` first if given; cos/sin (B, T, hd); mask None or bool (B, 1, T, past+T)."""
        B, T, _ = x.shape
        qkv = project(x, norm, [self.q_proj, self.k_proj, self.v_proj], own=(2,))  # v goes to SDPA as is
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in qkv)  # (B, H or H_kv, T, hd)
        c, s = cos[:, None], sin[:, None]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if T == 1 and cache is not None and uses_decode_attention(q.device, q.dtype):
            a = decode_attention(q, k, v, mask)
        else:
            gqa = self.num_heads != self.num_kv_heads
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(a.transpose(1, 2).reshape(B, T, -1))

    def forward_rows(
        self,
        x: torch.Tensor,
        x_rows: torch.Tensor,
        rows: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """Outputs for some query positions only: keys and values from all of x (B, T, h), queries from x_rows
        (B, K, h) = x at the sequence indices `rows` (B, K). cos/sin (B or 1, T, hd); mask bool (B, 1, K, T).
        Returns (B, K, h)."""
        B, T, _ = x.shape
        K = rows.shape[1]
        kv = project(x, norm, [self.k_proj, self.v_proj], own=(1,))
        k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in kv)
        q = project(x_rows, norm, [self.q_proj])[0].view(B, K, -1, self.head_dim).transpose(1, 2)
        idx = rows[..., None].expand(B, K, cos.shape[-1])
        cq, sq = (t.expand(B, -1, -1).gather(1, idx)[:, None] for t in (cos, sin))  # (B, 1, K, hd)
        c, s = cos[:, None], sin[:, None]
        q = q * cq + rotate_half(q) * sq
        k = k * c + rotate_half(k) * s
        gqa = self.num_heads != self.num_kv_heads
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(a.transpose(1, 2).reshape(B, K, -1))


class MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (B, T, h), normalised by `norm` first if given."""
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

    def forward(self, h, cos, sin, mask, is_causal, cache, rows=None):  # noqa: ANN001, ANN201 (hot path)
        """h (B, T, h) -> (B, T, h); with `rows` (B, K) sequence indices, the outputs at those positions only,
        (B, K, h), and `mask` (B, 1, K, T) (see `Qwen2Model.forward`'s `output_rows`). One entry point, so
        wrappers around the layer (FSDP, checkpointing, torch.compile) see both uses."""
        if rows is not None:
            return self._forward_rows(h, rows, cos, sin, mask)
        # The norms go in with their inputs so training can fuse them into the following GEMM (fused.norm_linear).
        h = h + self.self_attn(h, cos, sin, mask, is_causal, cache, norm=self.input_layernorm)
        return h + self.mlp(h, norm=self.post_attention_layernorm)

    def _forward_rows(self, h, rows, cos, sin, mask):  # noqa: ANN001, ANN202
        h_rows = h.gather(1, rows[..., None].expand(*rows.shape, h.shape[-1]))
        attn = self.self_attn.forward_rows(h, h_rows, rows, cos, sin, mask, norm=self.input_layernorm)
        h_rows = h_rows + attn
        return h_rows + self.mlp(h_rows, norm=self.post_attention_layernorm)


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
    """Embeddings + decoder stack + final norm (no head). Positions default to `past + arange(T)`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, h) -> hidden (B, T, h). attention_mask covers past+current keys.

        `output_rows`: bool (B, T), the only positions whose hidden state is wanted (a training loss needs the
        labelled ones). The last layer then computes queries, attention output and MLP for those positions
        alone (keys and values still cover every position) and the result is (N, h), the wanted positions in
        row-major order. Without a KV cache only.
        """
        B, T, _ = inputs_embeds.shape
        if output_rows is not None and cache is not None:
            raise ValueError("output_rows needs a forward without a KV cache")
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        mask, is_causal = build_attention_mask(attention_mask, T, past, inputs_embeds.device)
        h = inputs_embeds
        layers = self.layers if output_rows is None else self.layers[:-1]
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        for layer in layers:
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(
                    layer, h, cos, sin, mask, is_causal, None, use_reentrant=False
                )
            else:
                h = layer(h, cos, sin, mask, is_causal, cache)
        if output_rows is not None:
            rows, valid = _padded_rows(output_rows)  # (B, K) sequence indices, (B, K) real or filler
            if mask is None:  # causal over sequence indices; right padding needs nothing more (see above)
                row_mask = torch.arange(T, device=h.device)[None, None, :] <= rows[:, :, None]
            else:  # (B, 1, T, T) causal & key-not-padding: its rows for these queries
                row_mask = mask.expand(B, 1, T, T).gather(2, rows[:, None, :, None].expand(B, 1, -1, T))[:, 0]
            args = (h, cos, sin, row_mask[:, None], False, None, rows)
            last = self.layers[-1]
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(last, *args, use_reentrant=False)
            else:
                h = last(*args)
            h = h[valid]  # (N, h)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)
