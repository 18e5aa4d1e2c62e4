"""Small building blocks of the decoder: RMSNorm, half-split RoPE, and the KV cache.

The KV cache holds keys and values for a fixed number of independent sequences ("slots"), each with its own
length, so the generation engine (`musicflamingo.engine`) can prefill one request into a free slot while other
slots keep decoding. A forward that uses the cache gets a `CacheView`: which slots its batch rows are, where it
writes, and how many keys it sees afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from musicflamingo.model.config import TextConfig
from musicflamingo.model.fused import rms_norm


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: float32 statistics, cast back BEFORE the weight multiply (see `fused.rms_norm`)."""

    fused_kind = "rms"  # how `fused.norm_linear` recognises it

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        """position_ids (B, T) -> cos, sin (B, T, head_dim) in `dtype` (computed in float32, then cast)."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # FSDP's mixed precision (Lightning's for bf16-mixed/true) casts buffers in place (`buffer.data = ...`),
            # past `_apply`: bf16 frequencies put far positions off by radians. Use float32 ones all the same.
            inv_freq = self.compute_inv_freq(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Preallocated keys/values of every decoder layer for `slots` independent sequences.

    layers[l]: (keys, values) of layer l, each (rows, H_kv, capacity, head_dim), one tensor per layer and kind, so
    that a resize holds one old tensor beside its replacement at a time (a 5-d tensor for all layers held the
    whole old cache beside the whole new one: twice the cache while it grew). `rows` <= `slots`: slots from `rows`
    on hold nothing (the engine's fitted cache allocates only the rows its requests use). Position p of slot s
    holds the key of that sequence's token p (its RoPE position is p too). `lengths[s]` counts the positions of
    slot s that hold real keys. Decode steps run over a range of slots; a row whose slot is not decoding writes at
    its `lengths[s]`, just past its keys, where nothing reads it (a sequence's last sampled token is never fed, so
    `lengths[s] < capacity` always holds). `dirty[s]` is how far writes reached, so that reusing a slot can clear
    what a shorter sequence would otherwise see under its key mask (a mask does not hide a stale NaN: SDPA adds
    -inf to a NaN score, and probability 0 times a NaN value is NaN).

    Lifecycle: allocate once (`for_config`), `view_prefill` / `view_decode` describe each forward's writes, the
    caller moves `lengths` on after the forward (`advance`), `clear(slot)` empties a slot for a new sequence,
    `resize(rows, capacity)` (or `grow(capacity)`) reallocates and keeps the contents that still fit.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        rows: int | None = None,
    ) -> None:
        rows = slots if rows is None else rows
        if slots < 1 or capacity < 1 or not 1 <= rows <= slots:
            raise ValueError(
                f"a KV cache needs slots >= 1, capacity >= 1 and 1 <= rows <= slots, got {slots}, {capacity} "
                f"and {rows}"
            )
        shape = (rows, num_kv_heads, capacity, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.capacity = capacity
        self._rows = rows  # kept apart from the tensors: a model of 0 decoder layers has none
        self.lengths = [0] * slots
        self.dirty = [0] * slots

    @classmethod
    def for_config(
        cls,
        config: TextConfig,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        rows: int | None = None,
    ) -> KVCache:
        return cls(
            config.num_hidden_layers,
            slots,
            capacity,
            config.num_key_value_heads,
            config.head_dim,
            dtype,
            device,
            rows,
        )

    @property
    def slots(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> int:
        """Slots that have buffers (0..rows-1)."""
        return self._rows

    @property
    def nbytes(self) -> int:
        """Bytes of all keys and values."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    @property
    def keys(self) -> torch.Tensor:
        """Every layer's keys, (layers, rows, H_kv, capacity, head_dim): a copy, to read (write through `layers`)."""
        return torch.stack([k for k, _ in self.layers])

    @property
    def values(self) -> torch.Tensor:
        """Every layer's values, as `keys` (a copy)."""
        return torch.stack([v for _, v in self.layers])

    def clear(self, slot: int) -> None:
        """Forget slot `slot`'s sequence; zero what earlier writes left there."""
        end = min(self.dirty[slot], self.capacity) if slot < self.rows else 0
        if end:
            for keys, values in self.layers:
                keys[slot, :, :end].zero_()
                values[slot, :, :end].zero_()
        self.lengths[slot] = self.dirty[slot] = 0

    def grow(self, capacity: int) -> None:
        """Reallocate for `capacity` positions per slot, keeping every slot's contents."""
        if capacity > self.capacity:
            self.resize(self.rows, capacity)

    def resize(self, rows: int, capacity: int) -> None:
        """Reallocate for slots 0..rows-1 of `capacity` positions each, keeping what fits. The slots dropped must
        be empty (`lengths` 0) and the others' keys must fit. One tensor at a time: the peak is the new cache plus
        one layer's old keys (or values)."""
        if not 1 <= rows <= self.slots or capacity < 1:
            raise ValueError(f"cannot resize a KV cache of {self.slots} slots to {rows} rows of {capacity}")
        for s, n in enumerate(self.lengths):
            if n and (s >= rows or n >= capacity):
                raise RuntimeError(f"resizing the KV cache would drop slot {s}'s {n} positions")
        if rows == self.rows and capacity == self.capacity:
            return
        keep_rows, keep = min(rows, self.rows), min(capacity, self.capacity)
        # indices, not enumerate(): enumerate keeps the item it yielded last (CPython reuses its result tuple), which
        # held the old tensor past its `del`, so two were alive (a layer's keys and values)
        for layer in range(len(self.layers)):
            pair = list(self.layers[layer])
            for i in range(len(pair)):
                old = pair[i]
                new = old.new_zeros((rows, old.shape[1], capacity, old.shape[3]))
                new[:keep_rows, :, :keep] = old[:keep_rows, :, :keep]
                pair[i] = new
                self.layers[layer] = tuple(pair)
                del old  # its last reference: freed before the next tensor is allocated
        self.capacity, self._rows = capacity, rows
        # the new buffers are zero past what was copied: nothing there to clear
        self.dirty = [min(d, keep) if s < keep_rows else 0 for s, d in enumerate(self.dirty)]

    def advance(self, slot: int, n: int) -> None:
        self.lengths[slot] += n
        self.dirty[slot] = max(self.dirty[slot], self.lengths[slot])

    def view_prefill(self, slot: int, n: int) -> CacheView:
        """A forward of one row that writes `n` positions of `slot` after its current length."""
        start = self.lengths[slot]
        if start + n > self.capacity or slot >= self.rows:
            raise RuntimeError(
                f"KV cache overflow: slot {slot} needs {start + n} positions, capacity {self.capacity} "
                f"({self.rows} rows)"
            )
        return CacheView(self, slice(slot, slot + 1), start, None, None, start + n)

    def view_decode(self, rows: int, positions: torch.Tensor, width: int) -> CacheView:
        """A one-token forward of slots `0..rows-1`, row b writing at `positions[b]` and seeing `width` positions
        (the caller's key mask hides what a row does not own). Rows that are not decoding pass their length."""
        if width > self.capacity or rows > self.rows:
            raise RuntimeError(
                f"KV cache overflow: {rows} rows of {width} positions needed, {self.rows} of {self.capacity}"
            )
        for s in range(rows):  # what they write past their keys must be cleared when the slot is reused
            self.dirty[s] = max(self.dirty[s], self.lengths[s] + 1)
        rows_index = torch.arange(rows, device=positions.device)
        return CacheView(self, slice(0, rows), None, positions, rows_index, width)


@dataclass
class CacheView:
    """Where one forward writes into a `KVCache` and which keys it sees afterwards.

    Prefill (`start` set): the T new positions of the one row go to `[start, start + T)`, and attention sees
    `[0, start + T)`. Decode (`positions` set, (B,) long): row b writes its one position at `positions[b]` through
    a tensor index, so a compiled step sees no Python value change; attention sees `[0, width)`. A view as wide as
    the capacity is contiguous: the bf16 decode matmuls then read the cache in place, not a copy of it.
    """

    cache: KVCache
    rows: slice
    start: int | None
    positions: torch.Tensor | None
    rows_index: torch.Tensor | None  # decode: arange(B), paired with `positions` for the writes
    width: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H_kv, T, hd) -> all keys and values this forward sees, (B, H_kv, width, hd) views."""
        keys, values = self.cache.layers[layer]  # (slots, H_kv, capacity, hd) each
        k, v = (
            k.to(keys.dtype),
            v.to(values.dtype),
        )  # under autocast the projections may come out in another dtype
        if self.positions is None:
            end = self.start + k.shape[2]
            keys[self.rows, :, self.start : end] = k
            values[self.rows, :, self.start : end] = v
        else:
            # row b writes its one position at positions[b] (scatter_ along the sequence axis copied the cache)
            keys[self.rows_index, :, self.positions] = k[:, :, 0]
            values[self.rows_index, :, self.positions] = v[:, :, 0]
        return keys[self.rows, :, : self.width], values[self.rows, :, : self.width]
