"""Autoregressive generation: one prefill with audio, then one token at a time through a preallocated KV cache.

Matches the reference `generate()`:
* positions are `cumsum(attention_mask) - 1` so left-padded rows start at 0 (a plain forward uses arange);
* the audio is encoded only during the prefill;
* a row that emits a stop id keeps it, then is filled with `pad_token_id`; generation ends when every row
  has stopped or after `max_new_tokens`.
Sampling order is the reference's: temperature -> top-k -> top-p -> multinomial (seeded generator).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

from musicflamingo.model.qwen2 import KVCache, uses_decode_attention

# Decode-step key widths and compiled cache lengths are multiples of this.
KEY_BLOCK = 256


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) float -> next token ids (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scores = logits / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_ids(model: torch.nn.Module, stop_token_ids: int | Sequence[int] | None) -> list[int]:
    if stop_token_ids is None:
        eos = model.config.text.eos_token_id
        return [] if eos is None else [eos]
    if isinstance(stop_token_ids, int):
        return [stop_token_ids]
    return list(stop_token_ids)


@torch.inference_mode()
def stream_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    input_features: torch.Tensor | None = None,
    input_features_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cache: KVCache | None = None,
    compile: bool = False,
    **unused: object,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step. Finished rows yield `pad_token_id`.

    `compile=True` runs the decode steps through `torch.compile` (inductor) with the KV cache in static mode
    (`KVCache.make_static`): every step has the same shapes (attention over the whole preallocated cache under a
    key mask), so it is traced once per batch size and cache length (seconds to tens of seconds, paid once per
    process). The prefill stays eager. Same tokens as eager decoding up to kernel rounding.
    """
    if max_new_tokens < 1:
        return
    device = model.device
    input_ids = input_ids.to(device)
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    stops = torch.tensor(_stop_ids(model, stop_token_ids), device=device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = model.config.text.pad_token_id
        if pad_token_id is None:
            pad_token_id = int(stops[0]) if stops.numel() else 0
    if generator is None and do_sample:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()

    total = S + max_new_tokens
    # CPU bf16/fp16 steps attend with plain matmuls, and oneDNN compiles a kernel (~1 ms) for every new matmul
    # shape: they see the cache in blocks of 256 keys (`KVCache.set_width_multiple`), so the shape changes once
    # per 256 steps and recurs across runs. Compiled steps see all of it. Either way the mask hides the rest.
    blocked = not compile and uses_decode_attention(device, model.dtype)
    wide = compile or blocked
    if cache is None or cache.max_length < total or cache.keys.shape[1] != B:
        # Round the length up so prompts of similar length share a compiled trace (or a kernel's shape).
        length = -(-total // KEY_BLOCK) * KEY_BLOCK if wide else total
        cache = KVCache.for_config(model.config.text, B, length, model.dtype, device)
    cache.reset()
    # One boolean key mask for the whole run (True = real token): a decode step slices it, nothing is rebuilt.
    keys = torch.zeros(B, cache.max_length if wide else total, dtype=torch.bool, device=device)
    keys[:, :S] = attention_mask.bool()
    padded = wide or not bool(attention_mask.all())  # without padding an exact-width step needs no mask

    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    if input_features is not None:
        input_features = input_features.to(device)
        if input_features_mask is not None:
            input_features_mask = input_features_mask.to(device)
    out = model(
        input_ids,
        attention_mask=attention_mask,
        input_features=input_features,
        input_features_mask=input_features_mask,
        position_ids=positions,
        cache=cache,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1]
    next_pos = positions[:, -1:] + 1  # (B, 1)
    # cos/sin for every position this run can reach, built once (the same numbers the model would compute per
    # step); a decode step only indexes them. (1, P, head_dim) each.
    rope_table = model.language_model.rotary_emb(
        torch.arange(int(next_pos.max()) + max_new_tokens, device=device)[None], model.dtype
    )
    can_stop = stops.numel() > 0  # with no stop ids no row ever finishes: skip the per-step bookkeeping
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step_fn = _decode_step
    if compile:
        step_fn = _compiled_decode_step()
        cache.make_static()
    elif blocked:
        cache.set_width_multiple(KEY_BLOCK)
    try:
        for step in range(max_new_tokens):
            tok = sample_next(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if can_stop:
                tok = tok.masked_fill(finished, pad_token_id)
            yield tok
            if step == max_new_tokens - 1:
                break
            if can_stop:
                finished |= torch.isin(tok, stops)
                if bool(finished.all()):
                    break
            keys[:, S + step] = True
            # (B, 1, 1, width): past+1, a multiple of KEY_BLOCK, or the whole cache when compiled
            step_mask = None
            if padded:
                step_mask = keys[:, None, None, : keys.shape[1] if compile else cache.width(S + step + 1)]
            rope = (rope_table[0][0, next_pos], rope_table[1][0, next_pos])  # (B, 1, head_dim) each
            logits = step_fn(model, tok[:, None], step_mask, rope, cache)
            cache.advance(1)
            next_pos = next_pos + 1
    finally:
        cache.make_static(False)  # a reused cache (chat) goes on in dynamic mode, exact widths
        cache.set_width_multiple(1)


def _decode_step(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor],
    cache: KVCache,
) -> torch.Tensor:
    """One cached step: ids (B, 1) -> logits (B, V). The decoder stack without the audio splice and its
    placeholder check (like the reference, a generated `<sound>` id is just a token after the prefill) and
    without the cache bookkeeping (the loop advances the cache), so a compiled step sees no Python state change.
    mask: None or bool (B, 1, 1, keys); rope: (cos, sin) (B, 1, head_dim)."""
    lm = model.language_model
    h = lm.embed_tokens(ids)
    cos, sin = rope
    for layer in lm.layers:
        h = layer(h, cos, sin, mask, False, cache)
    return model.lm_head(lm.norm(h)[:, -1])


@functools.cache
def _compiled_decode_step():  # noqa: ANN202
    """`torch.compile(_decode_step)`, made once per process (its traces are cached per model and shape)."""
    return torch.compile(_decode_step, dynamic=False)


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Prompt plus generated ids, (B, S + new); `new` <= max_new_tokens (fewer when every row stopped)."""
    new = list(stream_generate(model, input_ids, **kwargs))
    input_ids = input_ids.to(model.device)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
