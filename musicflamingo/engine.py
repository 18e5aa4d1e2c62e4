"""The generation engine: the one path from prompts to tokens (batch inference, chat, eval, `generate`).

An `Engine` owns a `KVCache` with a fixed number of slots. A request is admitted into a free slot: its prompt is
prefilled alone (audio encoded once, positions 0..T-1 in its own slot) and its first token sampled. Every `step()`
then advances all decoding slots together, one token each, each row at its own position under a key mask. A slot
whose request finished stops decoding and can be released (or, for a chat, extended with the next turn) between
steps while the others go on. Because no request ever shares a padded row with another, a row's greedy tokens are
those of the same request run alone, whatever else shares the batch and whenever it joined.

`generate` / `stream_generate` keep the reference `generate()` contract on a left-padded batch: positions are
`cumsum(attention_mask) - 1` (so each row's real tokens sit at 0..T-1, as in their own slot here), a row that emits
a stop id keeps it and is then filled with `pad_token_id`, and generation ends when every row has stopped or after
`max_new_tokens`. Logits order is the reference's: repetition penalty -> temperature -> top-k -> top-p -> multinomial
(or argmax: the penalty applies to greedy decoding too).

Stop strings (`SamplingParams.stop_strings`) are matched per row on the answer's text, decoded as its tokens come
(`AnswerText`; the engine needs the `tokenizer`), so a stop string may span tokens: the row finishes at the token
that completes one, and its text is cut before it (as OpenAI's API and vLLM answer). `Slot.text` only ever grows by
text that can no longer turn out to be part of a stop string, so streaming it never shows one.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from musicflamingo.model.layers import KVCache
from musicflamingo.model.qwen2 import uses_decode_attention
from musicflamingo.reasoning import TagsKept
from musicflamingo.tokenizer import IncrementalDecoder, Tokenizer

logger = logging.getLogger(__name__)

# Decode-step key widths and compiled cache capacities are multiples of this: on CPU, oneDNN compiles a kernel
# (~1 ms) for every new bf16 matmul shape, so bf16 steps see the cache in blocks of keys under the key mask.
KEY_BLOCK = 256


@dataclass
class SamplingParams:
    """How one request is decoded (greedy by default, as the release)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # texts that end the answer, cut before them (one text: that one)
    # > 1 discourages every token already in the sequence, prompt included (the reference's `repetition_penalty`:
    # a seen token's logit is divided by it when positive, multiplied when negative); 1 = off
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):  # "false" is truthy: it sampled
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        self.do_sample = bool(self.do_sample)
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            # abs(x) < inf is False for inf and NaN
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not abs(value) < float("inf")
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        # Far below this, logits / temperature overflow (float16 first): inf - inf gives NaN probabilities.
        min_temperature = 0.01
        if self.do_sample and not self.temperature >= min_temperature:
            raise ValueError(
                f"temperature must be >= {min_temperature} when sampling, got {self.temperature!r} "
                "(do_sample=false decodes greedily)"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        penalty = self.repetition_penalty
        if (
            isinstance(penalty, bool)
            or not isinstance(penalty, (int, float))
            or not 0 < penalty < float("inf")
        ):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {penalty!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):  # torch.Generator.manual_seed's range: past it, it failed only at the first request, blaming that
            raise ValueError(f"seed must be a 64-bit integer or null (random), got {self.seed!r}")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        self.stop_strings = check_stop_strings(self.stop_strings)

    def for_prompt(self, index: int) -> SamplingParams:
        """These settings for the `index`-th prompt of a run: a seed of its own, derived from (`seed`, `index`), so
        alike prompts (one song asked N times) draw different numbers, and each prompt the same ones whatever the
        batch it decodes in. Prompt 0 keeps `seed` (a one-prompt run samples as before); unseeded: unchanged."""
        if self.seed is None or index == 0:
            return self
        mixed = np.random.SeedSequence([self.seed % 2**64, index]).generate_state(1, np.uint64)[0]
        return replace(self, seed=int(mixed))

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with `seed` (random when None) for sampling; None for greedy decoding."""
        if not self.do_sample:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


def check_stop_strings(stops: str | Sequence[str] | None, field: str = "stop_strings") -> tuple[str, ...]:
    """`stops` (one text, a list of texts or None) as a tuple of texts; anything else, or an empty text (it would
    end every answer before its first token), is a ValueError naming `field`."""
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = (stops,)
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"{field} must be a text or a list of texts, got {stops!r}")
    if any(not s for s in stops):
        raise ValueError(f"{field}={list(stops)!r}: an empty stop string would end every answer at once")
    return tuple(dict.fromkeys(stops))


def parse_stop_strings(value: Any, field: str = "stop", escapes: bool = False) -> tuple[str, ...]:
    """A `stop=` setting (a text, a list of texts, or null: none) as stop strings; a number typed is its text
    (`stop=42`, as Hydra hands it over); an empty text, a mapping or a nested list is a ValueError naming `field`.
    `escapes`: `\\n`, `\\t`, `\\r` and `\\\\` typed on a command line are the characters (Hydra keeps them as typed:
    `stop="\\n\\n"` never matched). The one reader of infer.py's, eval.py's and their settings checks' `stop`."""
    texts = []
    for where, v in (
        [(f"{field}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, Sequence) and not isinstance(value, str)
        else []
        if value is None
        else [(field, value)]
    ):
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif not isinstance(v, (str, int, float, os.PathLike)):
            raise ValueError(
                f"{where}={v!r}: expected text or a list of texts; quote text holding {{}}, [], :, = or , for "
                f"Hydra: '{field}=\"...\"'"
            )
        texts.append(str(v))
    if escapes:
        texts = [_ESCAPE.sub(lambda m: _ESCAPES[m[1]], t) for t in texts]
    try:
        return check_stop_strings(texts, field)
    except ValueError as e:
        raise ValueError(f"{e}{'' if value is None or value else '; stop=[] (or null) for none'}") from None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")


class AnswerText:
    """One answer's text, decoded as its tokens come (`tokenizer.IncrementalDecoder`) and cut before the first of
    `stops` to appear in it, wherever the token boundaries fall.

    `text` is what is safe to show: it never holds a piece that could still grow into a stop string (that end is held
    back until the next tokens decide it), and it only ever grows. `push` returns True at the token that completes
    a stop string (`stop` then names it and `text` is the final answer); `finish` releases what is held back when
    the answer ends otherwise (a stop id, its length). Without stops, the final `text` is `tokenizer.decode` of the
    pushed tokens. A stop string that is a special token (`<|im_start|>`) matches that token: decoded text leaves
    special tokens out, so it could never appear there. One that holds a special token's text with other text
    (`"\\n<|im_start|>"`) matches where that token comes after the rest, as the reference's `stop_strings` (which
    read every token, special ones too, as its text) do; it never matched. The special token stays out of `text`.
    The think layout's tags are text even where the tokenizer makes them special tokens (`reasoning.TagsKept`):
    think mode parses them, and a `</answer>` stop string matches its token.

    The work per token does not grow with the answer: the text is kept in pieces (`text` joins them when read) and
    stop strings are looked for in the held-back end and the new piece only (a stop string cannot begin in text
    already shown). A caller streaming the answer reads what it has not shown with `since(shown)`, which costs the
    new text, not the whole answer.

    Example::

        answer = AnswerText(tokenizer, ["\\n\\n"])
        for token in tokens:
            if answer.push(token):
                break
        answer.finish()  # answer.text: the answer up to the first blank line
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        tokenizer = TagsKept.wrap(tokenizer)  # special think tags decoded as text, not skipped
        self._tag_ids: dict[int, str] = getattr(tokenizer, "kept_tags", {})
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = check_stop_strings(tuple(stops))
        self._shown: list[str] = []  # `text` in pieces; the first is the part already joined
        self._length = 0  # len(text)
        self._rest = ""  # decoded after `text`: the held-back end, or the stop string and what followed it
        self.stop: str | None = None  # the stop string that ended the answer
        self.ends: list[int] = []  # len(decoded) after each token
        self.finished = False
        special = set(getattr(tokenizer, "special_tokens", ()))
        # special tokens inside a longer stop string: matched as a mark (a private-use character) that their token
        # adds to the text looked in, and that `text` leaves out (the texts of the stop strings are matched too)
        inner = sorted(
            {t for t in special if any(t in s and t != s for s in self.stops)}, key=len, reverse=True
        )
        ids = {t: tokenizer.token_to_id(t) for t in inner}
        self._marks = {ids[t]: chr(_MARK + k) for k, t in enumerate(inner) if ids[t] is not None}
        self._unmark = dict.fromkeys(map(ord, self._marks.values()))
        marked = {t: self._marks[ids[t]] for t in inner if ids[t] is not None}
        self._patterns: list[tuple[str, str]] = []  # (text looked for, the stop string it stands for)
        for s in self.stops:
            self._patterns.append((s, s))
            m = s
            for t, mark in marked.items():
                m = m.replace(t, mark)
            if m != s:
                self._patterns.append((m, s))
        self._looked_for = [p for p, _ in self._patterns]
        self.special = {
            i: s for s in self.stops if s in special and (i := tokenizer.token_to_id(s)) not in self._marks
        }

    @property
    def text(self) -> str:
        """The answer's text that is safe to show (the final answer once finished)."""
        if len(self._shown) != 1:
            self._shown = ["".join(self._shown)]
        return self._shown[0]

    @property
    def decoded(self) -> str:
        """Everything decoded so far: `text`, then what is held back (or the stop string and what came with it)."""
        return self.text + self._rest.translate(self._unmark)

    def __len__(self) -> int:
        return self._length

    def since(self, start: int) -> str:
        """`text[start:]`, costing that much text (the pieces after `start`), however long the answer."""
        if start >= self._length:
            return ""
        parts, end = [], self._length
        for piece in reversed(self._shown):
            if end <= start:
                break
            parts.append(piece[max(start - (end - len(piece)), 0) :])
            end -= len(piece)
        return "".join(reversed(parts))

    @classmethod
    def of_tokens(
        cls, tokenizer: Tokenizer, ids: Sequence[int], stops: Sequence[str] = (), stop_ids: Sequence[int] = ()
    ) -> AnswerText:
        """A generated row's finished answer, its tokens fed as the engine feeds them: up to a stop id (left out)
        or the token that completes one of `stops`; the tokens after (a batch's padding) are never read."""
        answer = cls(tokenizer, stops)
        for token in ids:
            if token in stop_ids:
                answer.end_at_stop_id(token)
                break
            if answer.push(token):
                break
        answer.finish()
        return answer

    def push(self, token: int) -> bool:
        """Add the next token; True when it completes a stop string (later tokens are refused)."""
        if self.finished:
            raise RuntimeError("the answer is finished: no more tokens")
        if token in self.special:  # the text before it is the answer (with what it held back)
            self.finish()
            self.stop = self.stop or self.special[token]
            return True
        delta = self.decoder.push(token)
        self._add(delta + self._marks[token] if token in self._marks else delta)
        self.ends.append(self._length + len(self._rest.translate(self._unmark)))
        return self.stop is not None

    def end_at_stop_id(self, token: int) -> None:
        """The answer ends at `token`, a stop id (no text of its own). A stop string it completes still cuts the
        answer, as the reference's `stop_strings` and eos both end generation at that token: with stop string
        `"\\n<|im_end|>"` and eos `<|im_end|>`, an answer "4/4\\n" then `<|im_end|>` is "4/4" (`stop` names the
        string), not "4/4\\n" as when the stop id was looked at first. A stop id that is a think tag's special token
        (`</answer>` as an eos id) ends the answer as that tag as a stop string would: `stop` names it, so think
        mode parses the text, which leaves it out, as complete (`reasoning.parse_think`)."""
        if not self.finished and (token in self._marks or token in self.special):
            self.push(token)
        self.finish()
        if self.stop is None and token in self._tag_ids:
            self.stop = self._tag_ids[token]

    def finish(self) -> None:
        """The answer has ended (no more tokens): release the text held back (a stop string's start that was not)."""
        if self.finished:
            return
        if self.stop is None:
            self._add(self.decoder.flush())
        if self.stop is None:
            self._show(self._rest)
            self._rest = ""
        self.finished = True

    def _show(self, piece: str) -> None:
        piece = piece.translate(self._unmark) if self._unmark else piece
        if piece:
            self._shown.append(piece)
            self._length += len(piece)

    def _add(self, delta: str) -> None:
        if not delta:
            return
        if not self.stops:
            self._show(delta)
            return
        # no stop string begins in `text`: it would have been held back; so look in the held end and `delta` only
        window = self._rest + delta
        found = [(i, n) for n, i in enumerate(window.find(s) for s in self._looked_for) if i >= 0]
        if found:
            at, n = min(found)
            self.stop = self._patterns[n][1]
            self._show(window[:at])
            self._rest = window[at:]
            self.finished = True
            return
        keep = len(window) - _partial_stop(window, self._looked_for)
        self._show(window[:keep])
        self._rest = window[keep:]

    def kept_tokens(self) -> int:
        """How many of the first tokens decode to a start of `text` (all of them without a stop string): a cut
        answer's tokens that a continuation (the next chat turn) can keep."""
        ids = self.decoder.ids
        if self.stop is None:
            return len(ids)
        text = self.text
        n = min(sum(1 for end in self.ends if end <= len(text)), len(ids))
        while n and not text.startswith(self.decoder.tokenizer.decode(ids[:n], self.decoder.skip)):
            n -= 1  # a token holding half a character, or a tokenizer that re-spaces a word when more follows
        return n


# the first of the private-use characters that stand for special tokens inside stop strings (`AnswerText`)
_MARK = 0xF0000


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `stops` (0 when none)."""
    best = 0
    for stop in stops:
        for n in range(min(len(text), len(stop) - 1), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The reference's `RepetitionPenaltyLogitsProcessor`: logits (B, V) float, seen (B, V) bool (the tokens already
    in each row's sequence) -> logits (B, V) where a seen token's logit is divided by `penalty` when positive and
    multiplied by it when negative (so > 1 always makes it less likely). `penalty` is a Python number, as the
    reference's: a tensor of it may round the division differently on some devices."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


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


@dataclass
class Request:
    """One prompt to continue.

    input_ids (T,) long: the prompt, `<sound>` runs included. input_features (W, n_mels, F) and
    input_features_mask (W, F): this prompt's audio windows, encoded at admission. Or `inputs_embeds` (T', D):
    the prompt already embedded with its audio spliced in (`generate` encodes a whole batch's audio at once, as
    the reference does); `input_ids` are then only what the repetition penalty counts as the prompt. `generator`: shared by requests that sample together (else one from `params.seed`).
    """

    input_ids: torch.Tensor
    params: SamplingParams = field(default_factory=SamplingParams)
    input_features: torch.Tensor | None = None
    input_features_mask: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    generator: torch.Generator | None = None


@dataclass
class Slot:
    """A slot's request and progress. `tokens`: generated so far (a stop id included, and the tokens of a stop
    string); `last`: the newest one, not fed to the model yet; `done`: finished (a stop id, a stop string or
    `max_new_tokens`), no longer decoding; `finish_reason`: then "stop" (a stop id or string) or "length" (its
    budget: `max_new_tokens` or the context's end). `text`: the answer's text (`AnswerText`: cut before a stop string,
    stop ids left out; streaming `text.text` never shows a piece of a stop string), when the engine has a tokenizer."""

    index: int
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    last: int | None = None
    done: bool = False
    finish_reason: str | None = None
    text: AnswerText | None = None
    budget: int = 0  # tokens this turn may still generate
    reach: int = 0  # cache positions this sequence may need: its prompt and every token fed back (`reach`)
    # the sequence's ids, every turn's prompt and tokens (what the repetition penalty counts as seen), and while a
    # penalty applies, the same as a (V,) bool mask on the model's device
    history: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None


class Engine:
    """Slots that requests join and leave between decode steps, over one KV cache.

    Args:
        model: a `MusicFlamingo` (anything with `language_model`, `lm_head`, `config.text` and the forward).
        slots: how many requests can be live at once.
        capacity: positions per slot; grows on demand (rounded up to `KEY_BLOCK`), at most the model's context.
        compile: decode steps through `torch.compile` (inductor). Every step then has the same shapes (all slots,
            the whole capacity under the key mask), so it is traced once per slot count and capacity.
        max_positions: a bound on the cache's size, rows x capacity positions (serve.py's `max_cached_tokens`).
            The cache is then fitted: it has rows up to the highest occupied slot only (all slots when compiled)
            and, from each admission on, the capacity the longest occupied sequence may reach (whole key blocks,
            or exactly that reach where blocks would pass the bound; compiled: doubling, then each row's share of
            the bound, so that few capacities are traced), shrinking to that when growing would pass the bound;
            `fits` says whether a request can be admitted without passing the bound. None: every slot has a row
            and the capacity only grows, doubling as sequences reach its end.
        tokenizer: decodes each slot's answer as it is generated (`Slot.text`), which requests with stop strings
            need (`SamplingParams.stop_strings`; refused without one).

    Example::

        engine = Engine(model, slots=4)
        slot = engine.admit(Request(ids, SamplingParams(max_new_tokens=64, stop_ids=(eos,))))
        while engine.decoding:
            for slot_index, token in engine.step():
                ...

    With `Engine(model, slots=4, tokenizer=tokenizer)` and `SamplingParams(..., stop_strings=("\\n\\n",))`, a slot
    stops at the token that completes a blank line; its `text.text` is the answer before it, streamed safely.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        slots: int = 1,
        capacity: int | None = None,
        compile: bool = False,
        max_positions: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.model = model
        self.compile = compile
        self.tokenizer = tokenizer
        self.limit = model.config.text.max_position_embeddings
        self.device = model.device
        self.dtype = model.dtype
        # CPU bf16/fp16 steps attend with plain matmuls: see the cache in whole blocks of keys (see KEY_BLOCK).
        self.blocked = not compile and uses_decode_attention(self.device, self.dtype)
        if max_positions is not None and max_positions < (slots if compile else 1):
            raise ValueError(f"max_positions={max_positions} leaves no position for a slot")
        self.max_positions = max_positions
        capacity, rows = self._round(capacity or KEY_BLOCK), None
        if max_positions is not None:
            rows = slots if compile else 1
            capacity = min(capacity, max_positions // rows)
        self.cache = KVCache.for_config(model.config.text, slots, capacity, self.dtype, self.device, rows)
        self.slots: list[Slot | None] = [None] * slots
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ bookkeeping
    def _round(self, n: int) -> int:
        # whole key blocks, never past the context (a capacity asked from prompt + max_new_tokens can be far larger)
        return min(-(-n // KEY_BLOCK) * KEY_BLOCK, self.limit)

    def _ensure_capacity(self, needed: int) -> None:
        if needed > self.limit:
            raise ValueError(
                f"the sequence would be {needed} tokens, over the model's context of {self.limit}"
            )
        if needed > self.cache.capacity:
            if self.max_positions is not None:  # a fitted cache holds every occupied slot's reach (`_fit`)
                raise RuntimeError(
                    f"a fitted KV cache of {self.cache.capacity} positions was asked for {needed}"
                )
            self.cache.grow(self._round(max(needed, 2 * self.cache.capacity)))
            self._rope_table = None

    def reach(self, prompt_tokens: int, max_new_tokens: int, start: int = 0) -> int:
        """Cache positions a sequence needs for `prompt_tokens` after `start` and up to `max_new_tokens` answer
        tokens (cut by the context): the prompt, every generated token but the last fed back, and the position a
        finished slot's row writes at in later steps (`KVCache`): prompt + max_new_tokens."""
        end = start + prompt_tokens
        return end + max(min(max_new_tokens, self.limit - end), 1)

    def _target(self, extra: tuple[int, int] | None = None) -> tuple[int, int]:
        """(rows, capacity) a fitted cache needs for the occupied slots and `extra` = (slot, reach) of a request
        being admitted."""
        used = [(s.index, s.reach) for s in self.slots if s is not None]
        if extra is not None:
            used.append(extra)
        rows = len(self.slots) if self.compile else max((i for i, _ in used), default=0) + 1
        reach = max((r for _, r in used), default=1)
        capacity = self._round(reach)
        if self.compile:
            # a compiled step is traced once per capacity (and torch stops compiling after
            # torch._dynamo.config.recompile_limit shapes): grow doubling, as the unbounded cache does, and where
            # that passes the bound, to each row's share of it, one capacity for every longer request
            if capacity > self.cache.capacity:
                capacity = max(capacity, self._round(2 * self.cache.capacity))
            if rows * capacity > self.max_positions:
                capacity = max(reach, self.max_positions // rows)
        elif rows * capacity > self.max_positions:
            capacity = reach  # whole key blocks would pass the bound: exactly what the sequences reach
        return rows, capacity

    def reserved_positions(self) -> int | None:
        """Rows x capacity the fitted cache keeps for the occupied slots (what a new request is admitted beside):
        None without a bound (`max_positions`), 0 with no slot occupied."""
        if self.max_positions is None:
            return None
        if all(s is None for s in self.slots):
            return 0
        rows, capacity = self._target()
        return rows * capacity

    def fits(self, request: Request) -> bool:
        """Whether admitting `request` into the first free slot keeps the cache within `max_positions` (rows x
        capacity). Always true without a bound; false without a free slot."""
        free = self.free_slots()
        if not free:
            return False
        if self.max_positions is None:
            return True
        n = int(
            request.inputs_embeds.shape[0] if request.inputs_embeds is not None else request.input_ids.numel()
        )
        if n >= self.limit:
            return True  # refused by `admit`, which names the context
        rows, capacity = self._target((free[0], self.reach(n, request.params.max_new_tokens)))
        return rows * capacity <= self.max_positions

    def _fit(self) -> None:
        """Resize a fitted cache so that it holds every occupied slot's reach: grown where that fits the bound,
        else exactly the target (dropping rows and positions no occupied slot needs)."""
        rows, capacity = self._target()
        cache = self.cache
        if cache.rows >= rows and cache.capacity >= capacity:
            return
        grown = (max(cache.rows, rows), max(cache.capacity, capacity))
        if grown[0] * grown[1] > self.max_positions:
            grown = (rows, capacity)
        if grown[0] * grown[1] > self.max_positions:
            raise RuntimeError(
                f"the KV cache would need {rows} rows of {capacity} positions, over its bound of "
                f"{self.max_positions} (admit only what `fits`)"
            )
        cache.resize(*grown)
        self._rope_table = None

    def _rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every position the cache can hold: (capacity, head_dim) each, the numbers the model would
        compute per step; a decode step only indexes them."""
        if self._rope_table is None:
            positions = torch.arange(self.cache.capacity, device=self.device)[None]
            cos, sin = self.model.language_model.rotary_emb(positions, self.dtype)
            self._rope_table = (cos[0], sin[0])
        return self._rope_table

    @property
    def decoding(self) -> list[Slot]:
        """Slots that take part in the next step."""
        return [s for s in self.slots if s is not None and not s.done]

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def release(self, index: int) -> None:
        """Free a slot (its request is forgotten; the next admission clears its keys)."""
        self.slots[index] = None
        self.cache.lengths[index] = 0  # its row then writes at 0 in steps, and a fitted cache may drop it

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def admit(self, request: Request, index: int | None = None) -> Slot:
        """Prefill `request` into a free slot (the first free one by default) and sample its first token."""
        free = self.free_slots()
        if index is None:
            if not free:
                raise RuntimeError(f"no free slot: all {len(self.slots)} are taken")
            index = free[0]
        elif index not in free:
            raise RuntimeError(f"slot {index} is taken")
        params = request.params
        text = self._answer_text(params)
        slot = Slot(index, params, request.generator or params.generator(self.device), text=text)
        slot.history = request.input_ids.reshape(-1).tolist()
        self.cache.clear(index)
        self.slots[index] = slot
        try:
            self._prefill(
                slot,
                request.input_ids,
                request.input_features,
                request.input_features_mask,
                request.inputs_embeds,
                params.max_new_tokens,
            )
        except BaseException:
            self.release(index)
            raise
        return slot

    def _answer_text(self, params: SamplingParams) -> AnswerText | None:
        if self.tokenizer is None:
            if params.stop_strings:
                raise ValueError(
                    "stop strings are matched on the decoded text: the engine needs the tokenizer "
                    "(Engine(..., tokenizer=processor.tokenizer))"
                )
            return None
        return AnswerText(self.tokenizer, params.stop_strings)

    def rewind(self, index: int, keep: int) -> None:
        """Keep only the first `keep` generated tokens of a finished slot, all fed (a stop string cut its answer
        inside the tokens after them): the cache drops the later ones' keys and `last` is None, so the next
        `extend` continues right after them. `keep` must be below the number of tokens (the last is not fed)."""
        slot = self.slots[index]
        if slot is None or not slot.done:
            raise RuntimeError(f"slot {index} has no finished sequence to rewind")
        if not 0 <= keep < len(slot.tokens):
            raise ValueError(
                f"keep={keep}: the slot has {len(slot.tokens)} tokens, {len(slot.tokens) - 1} fed"
            )
        self.cache.lengths[index] -= len(slot.tokens) - 1 - keep
        del slot.history[len(slot.history) - len(slot.tokens) + keep :]
        slot.tokens, slot.last = slot.tokens[:keep], None

    @torch.inference_mode()
    def extend(
        self,
        index: int,
        input_ids: torch.Tensor,
        params: SamplingParams | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> Slot:
        """Continue a finished slot's sequence (the next chat turn): its last token, not fed yet, and then
        `input_ids` (T,) are prefilled at the positions after the cache's, and a new answer starts."""
        slot = self.slots[index]
        if slot is None or not slot.done:
            raise RuntimeError(f"slot {index} has no finished sequence to extend")
        ids = input_ids.reshape(-1).to(self.device)
        if slot.last is not None:
            ids = torch.cat([torch.tensor([slot.last], device=self.device), ids])
        before = (slot.params, slot.generator, slot.tokens, slot.last, slot.budget, slot.reach)
        before += (slot.finish_reason, slot.text, len(slot.history))
        if params is not None:  # the turn's own sampling, its seed included
            slot.params, slot.generator = params, params.generator(self.device)
        slot.tokens, slot.last, slot.done, slot.finish_reason = [], None, False, None
        try:
            slot.text = self._answer_text(slot.params)
            slot.history += input_ids.reshape(-1).tolist()  # (`last` is in it already)
            self._prefill(slot, ids, input_features, input_features_mask, None, slot.params.max_new_tokens)
        except BaseException:  # e.g. past the context: the conversation stays as it was
            # (its reach too: a fitted cache sizes every admission by the occupied slots' reaches)
            slot.params, slot.generator, slot.tokens, slot.last, slot.budget, slot.reach = before[:6]
            slot.finish_reason, slot.text = before[6:8]
            del slot.history[before[8] :]
            slot.done = True
            raise
        return slot

    def _prefill(self, slot, input_ids, features, features_mask, embeds, max_new) -> None:  # noqa: ANN001
        model, cache = self.model, self.cache
        n = int(embeds.shape[0] if embeds is not None else input_ids.shape[-1])
        if n < 1:
            raise ValueError("a request needs at least one prompt token")
        start = cache.lengths[slot.index]
        if start + n >= self.limit:
            raise ValueError(
                f"the prompt would end at position {start + n}, at or past the model's context of {self.limit}"
            )
        slot.budget = min(max_new, self.limit - start - n)
        slot.reach = self.reach(n, max_new, start)
        slot.seen = None
        if slot.params.repetition_penalty != 1:
            vocab = self.model.config.text.vocab_size
            slot.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            slot.seen[[i for i in slot.history if 0 <= i < vocab]] = True
        if self.max_positions is not None:
            self._fit()  # the whole reach at once: the bound was checked for it (`fits`)
        else:
            # the prompt and the first token's position: later positions are added as the sequence reaches them
            # (sized by the budget, one max_tokens=32000 request grew every slot's cache to 32000 positions for good)
            self._ensure_capacity(start + n + 1)
        view = cache.view_prefill(slot.index, n)
        if embeds is not None:
            out = model(inputs_embeds=embeds[None].to(self.device), cache=view, logits_to_keep=1)
        else:
            out = model(
                input_ids.reshape(1, -1).to(self.device),
                input_features=None if features is None else features.to(self.device),
                input_features_mask=None if features_mask is None else features_mask.to(self.device),
                cache=view,
                logits_to_keep=1,
            )
        cache.advance(slot.index, n)
        self._accept([slot], out.logits[:, -1])

    # ------------------------------------------------------------------ decode
    def _accept(self, slots: Sequence[Slot], logits: torch.Tensor) -> list[tuple[int, int]]:
        """Sample the next token of each slot from its row of logits (len(slots), V); returns (slot, token)."""
        logits = logits.float()
        penalties: dict[float, list[int]] = {}  # rows with the same repetition penalty: one op
        for i, s in enumerate(slots):
            if s.seen is not None:
                penalties.setdefault(s.params.repetition_penalty, []).append(i)
        # before sampling or argmax, as the reference's logits processors
        for penalty, rows in penalties.items():
            seen = torch.stack([slots[i].seen for i in rows])
            index = torch.tensor(rows, device=logits.device)
            logits = logits.index_put((index,), apply_repetition_penalty(logits[index], seen, penalty))
        tokens = (
            logits.argmax(-1).tolist() if any(not s.params.do_sample for s in slots) else [0] * len(slots)
        )
        groups: dict[tuple, list[int]] = {}  # rows that sample with the same settings and generator: one draw
        for i, s in enumerate(slots):
            if s.params.do_sample:
                p = s.params
                groups.setdefault((p.temperature, p.top_k, p.top_p, id(s.generator)), []).append(i)
        for rows in groups.values():
            p, g = slots[rows[0]].params, slots[rows[0]].generator
            drawn = sample_next(logits[rows], True, p.temperature, p.top_k, p.top_p, g).tolist()
            for i, t in zip(rows, drawn):
                tokens[i] = t
        out = []
        for s, t in zip(slots, tokens):
            s.tokens.append(t)
            s.last = t
            s.history.append(t)
            if s.seen is not None:
                s.seen[t] = True
            if t in s.params.stop_ids:  # the stop id ends the answer: no text of its own
                s.finish_reason = "stop"
                if s.text is not None:  # (the stop string it may complete still cuts the answer)
                    s.text.end_at_stop_id(t)
            elif s.text is not None and s.text.push(t):  # it completed a stop string
                s.finish_reason = "stop"
            elif len(s.tokens) >= s.budget:
                s.finish_reason = "length"
            s.done = s.finish_reason is not None
            if s.done and s.text is not None:
                s.text.finish()
            out.append((s.index, t))
        return out

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """Feed every decoding slot its last token and sample the next: returns (slot index, token) per slot."""
        live = self.decoding
        if not live:
            return []
        cache = self.cache
        rows = len(self.slots) if self.compile else max(s.index for s in live) + 1
        tokens = [0] * rows
        positions = cache.lengths[:rows]  # rows not decoding write just past their keys (see KVCache)
        self._ensure_capacity(max(positions) + 1)  # doubling: a sequence's growth reallocates log2 times
        for s in live:
            tokens[s.index] = s.last
        exact = max(positions[s.index] for s in live) + 1
        if self.compile:
            width = cache.capacity
        elif self.blocked:
            width = min(-(-exact // KEY_BLOCK) * KEY_BLOCK, cache.capacity)
        else:
            width = exact
        pos = torch.tensor(positions, device=self.device)
        mask = None
        if width != exact or len(live) != rows or len({positions[s.index] for s in live}) > 1:
            # (rows, 1, 1, width): a row sees its own positions (rows not decoding: theirs, output discarded)
            mask = (torch.arange(width, device=self.device)[None, :] <= pos[:, None])[:, None, None]
        cos, sin = self._rope()
        rope = (cos[pos][:, None], sin[pos][:, None])  # (rows, 1, head_dim)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        view = cache.view_decode(rows, pos, width)
        step_fn = _compiled_decode_step() if self.compile else decode_step
        logits = step_fn(self.model, ids, mask, rope, view)  # (rows, V)
        for s in live:
            cache.advance(s.index, 1)
        if len(live) < rows:  # rows that do not decode are in the batch too: keep the live ones' logits
            logits = logits[[s.index for s in live]]
        return self._accept(live, logits)


def decode_step(model: torch.nn.Module, ids: torch.Tensor, mask, rope, view) -> torch.Tensor:  # noqa: ANN001
    """One cached step: ids (B, 1) -> logits (B, V), through the decoder's one forward. No audio splice (as in
    the reference, a generated `<sound>` id is just a token after the prefill) and no Python state change (the
    engine moves the cache on), so a compiled step traces once."""
    lm = model.language_model
    h = lm(lm.embed_tokens(ids), attention_mask=mask, cache=view, rope=rope)
    return model.lm_head(h[:, -1])


@functools.cache
def _compiled_decode_step():  # noqa: ANN202
    """`torch.compile(decode_step)`, made once per process (its traces are cached per model and shape)."""
    return torch.compile(decode_step, dynamic=False)


# ---------------------------------------------------------------------------------------------- batch API
# generation_config.json fields that the reference's generate() applies and the engine does not implement, each with
# the value (besides null) at which it changes nothing: a file setting one gives other tokens than the reference's
UNSUPPORTED_GENERATION_FIELDS: dict[str, object] = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "min_p": 0.0,
    "top_h": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "bad_words_ids": [],
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
    "sequence_bias": {},
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": 1.0,
    "penalty_alpha": 0.0,
    "dola_layers": None,
    "watermarking_config": None,
}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log `message` as a warning the first time only (a `generate` per batch would repeat it every batch)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def unsupported_generation_fields(settings: Mapping[str, Any]) -> list[str]:
    """`name=value` of each field of `settings` (generation_config.json's) that changes the reference's tokens and
    that the engine does not implement (`UNSUPPORTED_GENERATION_FIELDS`)."""
    return [
        f"{k}={settings[k]!r}"
        for k, neutral in UNSUPPORTED_GENERATION_FIELDS.items()
        if settings.get(k) is not None and settings[k] != neutral
    ]


def _stop_ids(model: torch.nn.Module, stop_token_ids: int | Sequence[int] | None) -> list[int]:
    """The ids `generate` stops on: those given, else generation_config.json's, which replace the config's eos (the
    reference's generate() reads the file's alone; infer.py and eval.py add the config's, `checkpoint.stop_token_ids`)."""
    if stop_token_ids is None:
        gen_eos = getattr(model, "generation_defaults", {}).get("eos_token_id")
        if gen_eos:  # generation_config.json's ids replace the config's, as in the reference
            return list(gen_eos)
        eos = model.config.text.eos_token_id
        return [] if eos is None else [eos]
    if isinstance(stop_token_ids, int):
        return [stop_token_ids]
    return [int(i) for i in stop_token_ids]


class _Unset:
    """The default of `eos_token_id` and `pad_token_id`: not given (the reference reads an explicit None as none)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@torch.inference_mode()
def stream_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    input_features: torch.Tensor | None = None,
    input_features_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = UNSET,
    compile: bool = False,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
    # Hugging Face spellings: accepted where they mean the same, refused where we do something else.
    eos_token_id: int | Sequence[int] | None = UNSET,
    max_length: int | None = None,
    num_beams: int = 1,
    repetition_penalty: float | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row of a left-padded batch, (B,) per step; finished rows yield
    `pad_token_id`.

    input_ids / attention_mask (B, S); input_features (W, n_mels, F) and input_features_mask (W, F) for the
    batch's audio in row-major order. Each row becomes one engine request (the batch's audio is encoded once,
    together, as the reference does). Defaults, as the reference's: those of the checkpoint's
    generation_config.json (`model.generation_defaults`: do_sample, temperature, top_k, top_p, repetition_penalty,
    lengths, eos, pad), else the config's, else the reference's own (greedy; when sampling temperature 1, top_k 50,
    top_p 1; no repetition penalty); a field
    of the file that the engine does not implement (`UNSUPPORTED_GENERATION_FIELDS`) is named in a warning.
    `stop_token_ids` (alias `eos_token_id`; `eos_token_id=None` stops on nothing, as the reference) defaults to the
    eos ids. `pad_token_id` fills finished rows: the file's, else the first stop id when the file names eos ids
    but no pad (as the reference), else the config's; `pad_token_id=None` is the first stop id. Without
    `attention_mask`, positions holding `pad_token_id` are padding unless it is a stop id. `max_length` (prompt +
    new) is the other way to say `max_new_tokens` (default: the file's, else 128). Unseeded sampling draws its seed
    from torch's global RNG (`torch.manual_seed` repeats a run). A row stops early, padded after, where the
    model's context ends (a warning names it; the reference would go on past it). `stop_strings` (default: the
    file's) end a row at the token that completes one, matched on the row's decoded text (a stop string may span
    tokens), which needs `tokenizer`, as the reference's; that token is the row's last, padded after (the ids cannot
    be cut inside a token: `Engine`'s `Slot.text` is the text cut before the stop string).
    """
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams}: beam search is not implemented; use num_beams=1")
    if not use_cache:
        raise ValueError("use_cache=False is not supported: the engine always decodes through its KV cache")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got {shape}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must be the same"
        )
    B, S = input_ids.shape
    # generation_config.json's, as the reference reads it
    defaults = getattr(model, "generation_defaults", {})
    unsupported = unsupported_generation_fields(defaults)
    if unsupported:
        _warn_once(
            f"generation_config.json sets {', '.join(unsupported)}, which the reference's generate() applies and "
            "this engine does not implement: the tokens differ from the reference's"
        )
    if max_new_tokens is None and max_length is None:
        # the file's length: its max_new_tokens wins over its max_length, as in the reference
        max_new_tokens = defaults.get("max_new_tokens")
        max_length = None if max_new_tokens is not None else defaults.get("max_length")
        if max_new_tokens is None and max_length is None:
            max_new_tokens = 128
    if max_length is not None:
        if max_new_tokens is not None:
            raise ValueError("give max_new_tokens or max_length, not both")
        max_new_tokens = max_length - S
        if max_new_tokens < 1:
            return
    if eos_token_id is not UNSET:
        if stop_token_ids is not None:
            raise ValueError("give stop_token_ids or eos_token_id, not both")
        stop_token_ids = [] if eos_token_id is None else eos_token_id
    stops = _stop_ids(model, stop_token_ids)
    if stop_strings is None:
        stop_strings = defaults.get("stop_strings")
        if stop_strings and tokenizer is None:
            # (the reference refuses; eval.py calls generate without a tokenizer: rows run past the stop string)
            _warn_once(
                f"generation_config.json sets stop_strings={stop_strings!r}, which need the tokenizer to be matched: "
                "pass generate(..., tokenizer=processor.tokenizer); without it the answers run past them"
            )
            stop_strings = None
    elif stop_strings and tokenizer is None:
        raise ValueError(
            "stop_strings are matched on the decoded text: pass the tokenizer too (tokenizer=processor.tokenizer)"
        )
    if pad_token_id is UNSET:
        # the reference pads with the file's pad, else its first eos id; without the file, the config's pad
        pad_token_id = defaults.get("pad_token_id")
        if pad_token_id is None and "eos_token_id" not in defaults:
            pad_token_id = model.config.text.pad_token_id
    # the reference's defaults
    sampling = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
    given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    given["repetition_penalty"] = repetition_penalty
    for name in sampling:
        if given[name] is None and defaults.get(name) is not None:
            given[name] = defaults[name]
        if given[name] is None:
            given[name] = sampling[name]
    # (max_new_tokens <= 0 returned the prompt, do_sample="false" sampled: refused here, as the reference does)
    params = SamplingParams(
        max_new_tokens,
        given["do_sample"],
        given["temperature"],
        given["top_k"],
        given["top_p"],
        seed,
        tuple(stops),
        stop_strings,
        given["repetition_penalty"],
    )
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        # As the reference: padding is read from the pad id when the batch holds it and it is not a stop id
        # (every row was taken whole, left padding included, so a padded batch decoded after its pads).
        attention_mask = torch.ones_like(input_ids)
        if pad_token_id is not None and pad_token_id not in stops and bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    if generator is None and params.do_sample:
        # one generator for the batch, as the reference; unseeded, it is seeded from torch's global RNG as the
        # reference samples from it, so torch.manual_seed(s) repeats a run (a fresh random seed ignored it)
        generator = replace(
            params, seed=params.seed if params.seed is not None else int(torch.randint(2**62, ()))
        ).generator(device)
    real = attention_mask.to(device).bool()
    # the ids the repetition penalty counts as each row's prompt: from its first real one on, as the reference's
    # (a left-padded row's pads are not seen; a right-padded row's are)
    first = real.int().argmax(1).tolist()
    embeds = model.embed(input_ids, input_features, input_features_mask)  # (B, S, D): audio encoded once
    lengths = real.sum(1).tolist()
    engine = Engine(
        model, slots=B, capacity=max(lengths) + max_new_tokens, compile=compile, tokenizer=tokenizer
    )
    slots = []
    for b in range(B):
        try:
            request = Request(
                input_ids[b, first[b] :], params, inputs_embeds=embeds[b][real[b]], generator=generator
            )
            slots.append(engine.admit(request))
        except ValueError as e:  # an empty row, or one past the context
            raise ValueError(f"row {b} of the batch: {e}") from None
    del embeds
    short = [f"row {s.index}: {s.budget}" for s in slots if s.budget < max_new_tokens]
    if short:
        logger.warning(
            "the model's context of %d positions ends before max_new_tokens=%d new tokens (%s at most): those rows "
            "stop there, padded after",
            engine.limit,
            max_new_tokens,
            ", ".join(short),
        )
    out = [s.tokens[-1] for s in slots]
    yield torch.tensor(out, device=device)
    for _ in range(max_new_tokens - 1):
        if not engine.decoding:
            return
        out = [pad_token_id] * B
        for index, token in engine.step():
            out[index] = token
        yield torch.tensor(out, device=device)


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Prompt plus generated ids, (B, S + new); `new` <= max_new_tokens (fewer when every row stopped). Takes
    the arguments of `stream_generate`."""
    try:
        new = list(stream_generate(model, input_ids, **kwargs))
    except TypeError as e:  # an unknown argument: name the function the caller called
        if "stream_generate()" not in str(e):
            raise
        raise TypeError(str(e).replace("stream_generate()", "generate()")) from None
    input_ids = input_ids.to(model.device)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
