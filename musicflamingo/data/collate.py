"""Batch per-sample dicts from :class:`~musicflamingo.data.dataset.ConversationDataset` into padded tensors.

Shift convention (the one place it is written down)
---------------------------------------------------
``labels`` are aligned with ``input_ids``: ``labels[b, t]`` is the target *for the token at position t*, i.e.
``input_ids[b, t]`` itself or -100 where the loss ignores it. The model predicts token ``t + 1`` from position
``t``, so the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``::

    loss = cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

(the reference ``ForCausalLMLoss``). Nothing here shifts; the model does. Example: ``input_ids = [a, b, c]`` with
``labels = [-100, b, c]`` trains ``a -> b`` and ``b -> c``; position 0 is never a target.

Padding
-------
Training pads on the right (the default): real tokens then sit at positions ``0..len-1`` and the model's default
``arange`` positions are right. Left padding (``padding_side="left"``) is for batched generation, where the
prompt must end at the last column; positions there are ``cumsum(attention_mask) - 1``.

Packing
-------
:func:`collate_packed` puts several conversations one after another in a row instead (long-context SFT): each
restarts its ``position_ids`` at 0 and ``seq_ids`` tells the decoder which tokens may attend to which (a
block-diagonal causal mask). Each conversation's first label is -100, so no token learns to predict the next
conversation's first token: the loss per conversation is the one it has alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from musicflamingo.chat import IGNORE_INDEX

log = logging.getLogger(__name__)
_over_budget_rows = 0  # rows of this process built past their budget (the first is warned about)


def collate(
    samples: Sequence[dict[str, Any] | None],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pad and stack samples; skipped samples (``None`` or :class:`~musicflamingo.data.dataset.BadSample`) drop out.

    Args:
        samples: dicts with ``input_ids`` [S_i] long, ``labels`` [S_i] long, ``input_features`` [w_i, 128, F]
            float32, ``input_features_mask`` [w_i, F] int32 (``w_i`` may be 0), ``num_audio_tokens`` int, ``id``.
        pad_token_id: id written into padded ``input_ids`` positions.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        pad_to_multiple_of: round the padded length ``S`` up to a multiple of this.
    Returns:
        ``input_ids`` [B, S] long, ``attention_mask`` [B, S] long (1 = real token), ``labels`` [B, S] long (-100 on
        padding), ``input_features`` [W, 128, F] float32 with all samples' windows concatenated in sample order
        (``None`` when the batch has no audio), ``input_features_mask`` [W, F] int32 (or ``None``), ``lengths`` [B]
        long (real lengths), ``num_tokens`` int (sum of real lengths), ``num_audio_tokens`` [B] long, ``ids``
        list[str], ``num_samples`` int (samples requested, skipped ones included) and ``bad_samples`` (the
        :class:`~musicflamingo.data.dataset.BadSample` markers of skipped samples, for the main process to count).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    good = [s for s in samples if isinstance(s, dict)]
    bad = [s for s in samples if s is not None and not isinstance(s, dict)]
    lengths = [int(s["input_ids"].shape[0]) for s in good]
    seq_len = max(lengths, default=0)
    if pad_to_multiple_of and seq_len % pad_to_multiple_of:
        seq_len += pad_to_multiple_of - seq_len % pad_to_multiple_of

    batch_size = len(good)
    input_ids = torch.full((batch_size, seq_len), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
    for b, (s, n) in enumerate(zip(good, lengths)):
        cols = slice(0, n) if padding_side == "right" else slice(seq_len - n, seq_len)
        input_ids[b, cols] = s["input_ids"]
        labels[b, cols] = s["labels"]
        attention_mask[b, cols] = 1

    tokens = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return _batch(tokens, good, lengths, len(samples), bad)


def _batch(
    tokens: dict[str, torch.Tensor],
    good: Sequence[dict[str, Any]],
    lengths: Sequence[int],
    num_samples: int,
    bad: Any,
) -> dict[str, Any]:
    """The batch dict both layouts share: their token tensors, the audio windows of `good` in order, and the
    bookkeeping (lengths, ids and `file:line` sources, counts, bad samples)."""
    input_features, input_features_mask = _stack_features(good)
    return {
        **tokens,
        "input_features": input_features,
        "input_features_mask": input_features_mask,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "num_tokens": int(sum(lengths)),
        "num_audio_tokens": torch.tensor([int(s.get("num_audio_tokens", 0)) for s in good], dtype=torch.long),
        "ids": [s.get("id") for s in good],
        "sources": [s.get("source") for s in good],
        "num_samples": num_samples,
        "bad_samples": bad,
    }


def _stack_features(good: Sequence[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """All samples' windows in sample order: ([W, 128, F] float32, [W, F] int32), or (None, None) without audio."""
    with_audio = [s for s in good if s.get("input_features") is not None and len(s["input_features"])]
    if not with_audio:
        return None, None
    frames = {tuple(s["input_features"].shape[1:]) for s in with_audio}
    if len(frames) != 1:
        raise ValueError(f"samples have windows of different shapes {sorted(frames)}; expected one [128, F]")
    input_features = torch.cat([s["input_features"] for s in with_audio], dim=0)  # (W, 128, F)
    input_features_mask = torch.cat([s["input_features_mask"] for s in with_audio], dim=0)  # (W, F)
    return input_features, input_features_mask


def collate_packed(
    samples: Sequence[dict[str, Any] | None],
    pad_token_id: int,
    max_tokens: int,
    pad_to_multiple_of: int | None = None,
    one_row: bool = False,
) -> dict[str, Any]:
    """Pack samples, in order, into rows of at most ``max_tokens`` tokens: a sample that does not fit in the
    current row starts the next one; one longer than ``max_tokens`` gets a row of its own. Skipped samples drop
    out as in :func:`collate`.

    ``one_row``: the samples are one row that a sampler planned from estimated lengths (the data module's packed
    batches), kept one row when the built ones add up to more than ``max_tokens`` (an m4a's container length may
    be a token short), with a warning naming the overflow: split, the row would become two rows padded to the
    longest, about twice the tokens and memory the budget was set for.

    Returns the keys of :func:`collate` for R rows of length S: ``input_ids``, ``attention_mask``, ``labels``
    [R, S]; ``input_features`` [W, 128, F] in conversation order, which is the row-major order of the ``<sound>``
    runs the model splices them into; per conversation (N of them) ``lengths`` [N], ``num_audio_tokens`` [N],
    ``ids``; plus ``position_ids`` [R, S] long (0, 1, ... within each conversation, 0 on padding) and ``seq_ids``
    [R, S] long (the conversation's index in ``ids``; -1 on padding, which then attends only to padding).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    good = [s for s in samples if isinstance(s, dict)]
    bad = [s for s in samples if s is not None and not isinstance(s, dict)]
    lengths = [int(s["input_ids"].shape[0]) for s in good]
    rows: list[list[int]] = []  # conversation indices per row, in order
    used = max_tokens  # tokens in the current row; "full" at first, so the first sample opens a row
    for k, n in enumerate(lengths):
        if used + n > max_tokens and not (one_row and rows):
            rows.append([])
            used = 0
        rows[-1].append(k)
        used += n
    if one_row and used > max_tokens:
        _warn_over_budget(used, max_tokens, [good[k].get("id") for k in rows[0]])
    seq_len = max((sum(lengths[k] for k in row) for row in rows), default=0)
    if pad_to_multiple_of and seq_len % pad_to_multiple_of:
        seq_len += pad_to_multiple_of - seq_len % pad_to_multiple_of

    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            n = lengths[k]
            cols = slice(start, start + n)
            input_ids[r, cols] = good[k]["input_ids"]
            labels[r, cols] = good[k]["labels"]
            labels[r, start] = IGNORE_INDEX  # the previous conversation's last token would predict it
            attention_mask[r, cols] = 1
            position_ids[r, cols] = torch.arange(n)
            seq_ids[r, cols] = k
            start += n

    tokens = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        "seq_ids": seq_ids,
    }
    return _batch(tokens, good, lengths, len(samples), bad)


def _warn_over_budget(built: int, max_tokens: int, ids: Sequence[Any]) -> None:
    """Warn, once per process (a DataLoader worker's own), that a packed row came out longer than its budget."""
    global _over_budget_rows
    _over_budget_rows += 1
    if _over_budget_rows == 1:
        log.warning(
            "a packed row of %d samples (ids %s) holds %d tokens, %d more than its token budget of %d: their "
            "built lengths exceed the estimates the batch was planned from (audio whose length its container or "
            "header states inexactly, e.g. m4a); kept as one row (later such rows of this process are not logged)",
            len(ids),
            ", ".join(repr(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else ""),
            built,
            built - max_tokens,
            max_tokens,
        )
