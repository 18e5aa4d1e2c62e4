"""Think mode's answers, ``<think>reasoning</think><answer>final answer</answer>``: parsed, streamed, summarised.

The one parser of think-mode output: `infer.py think=true` shows the reasoning apart from the answer, `eval.py
think=true` scores the answer and counts broken tags, and GRPO's rewards read the same :class:`ThinkOutput`. The
format and its prompt suffix are defined with the chat format (`musicflamingo.chat`: ``THINK_SUFFIX``,
``think_prompt``). A :func:`parse_think` status is one of

* ``ok``: one think block then one answer block, only whitespace around and between them, no tag inside either
  (what the paper's format reward accepts);
* ``missing``: no tag at all; the answer is the whole text;
* ``broken``: tags, but not that shape (unclosed, nested, repeated, out of order, text outside them). The answer
  is the best guess: the last complete ``<answer>`` block, else the text after an unclosed ``<answer>``, else the
  text after the last ``</think>``, else nothing (generation stopped while thinking). The thinking is the first
  think block's text, up to ``</think>``, ``<answer>`` or the end.

``plain`` (:func:`plain_output`) is an answer of a run without think mode: all answer, no thinking.

The streamed views (:class:`ThinkStream`: `infer.py`'s display, `serve.py`'s split) only ever show a prefix of what
:func:`parse_think` gives for the complete text, so every caller ends with the same thinking and answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass
from functools import cached_property
from typing import Any, Literal, TextIO

from musicflamingo.chat import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    ensure_think_prompt,
)

ThinkStatus = Literal["ok", "missing", "broken", "plain"]
STATUSES: tuple[ThinkStatus, ...] = ("ok", "missing", "broken")


@dataclass(frozen=True)
class ThinkTags:
    """The four tags of a think-mode answer: the chat format's (`musicflamingo.chat`) unless a test swaps them."""

    think_open: str = THINK_OPEN
    think_close: str = THINK_CLOSE
    answer_open: str = ANSWER_OPEN
    answer_close: str = ANSWER_CLOSE

    @cached_property
    def any_tag(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(t) for t in astuple(self)))

    @cached_property
    def well_formed(self) -> re.Pattern[str]:
        to, tc, ao, ac = (re.escape(t) for t in astuple(self))
        return re.compile(rf"\s*{to}(.*?){tc}\s*{ao}(.*?){ac}\s*", re.DOTALL)

    @cached_property
    def answer_block(self) -> re.Pattern[str]:
        return re.compile(rf"{re.escape(self.answer_open)}(.*?){re.escape(self.answer_close)}", re.DOTALL)


TAGS = ThinkTags()


@dataclass(frozen=True)
class ThinkOutput:
    """One generated answer: the raw ``text``, its ``thinking`` and ``answer`` (stripped, tags removed)."""

    text: str
    thinking: str
    answer: str
    status: ThinkStatus

    @property
    def well_formed(self) -> bool:
        """Exactly ``<think>...</think><answer>...</answer>`` (the format reward's test)."""
        return self.status == "ok"


def _untagged(text: str, tags: ThinkTags = TAGS) -> str:
    return tags.any_tag.sub(" ", text).strip()  # a space, not nothing: "x<answer>y" reads "x y"


def parse_think(text: str | None, tags: ThinkTags = TAGS, stop: str | None = None) -> ThinkOutput:
    """Split a think-mode answer into thinking and answer (see the module docstring for the statuses).

    ``stop``: the stop string that ended the generation (finish reason "stop"), which the text, as inference
    gives it, leaves out: a text that is well formed with it (``</answer>`` as a stop string cuts the closing tag)
    is ``ok``. Pass it only when a stop string ended the text (not a stop id, not the token limit)."""
    text = str(text or "")
    out = _parse(text, tags)
    if stop and out.status != "ok":
        whole = _parse(text + stop, tags)
        if whole.status == "ok":
            return ThinkOutput(text, whole.thinking, whole.answer, "ok")
    return out


def _parse(text: str, tags: ThinkTags) -> ThinkOutput:
    m = tags.well_formed.fullmatch(text)
    if m and not tags.any_tag.search(m.group(1)) and not tags.any_tag.search(m.group(2)):
        return ThinkOutput(text, m.group(1).strip(), m.group(2).strip(), "ok")
    if not tags.any_tag.search(text):
        return ThinkOutput(text, "", text.strip(), "missing")
    return ThinkOutput(text, _broken_thinking(text, tags), _broken_answer(text, tags), "broken")


def plain_output(text: str | None) -> ThinkOutput:
    """An answer of a run without think mode: the whole text is the answer."""
    text = str(text or "")
    return ThinkOutput(text, "", text.strip(), "plain")


def _broken_answer(text: str, tags: ThinkTags) -> str:
    blocks = tags.answer_block.findall(text)
    if blocks:
        return _untagged(blocks[-1], tags)
    for tag in (tags.answer_open, tags.think_close):
        if tag in text:
            return _untagged(text[text.rindex(tag) + len(tag) :], tags)
    return ""  # only an unclosed <think>: the answer never came


def _first_block_end(text: str, start: int, tags: ThinkTags) -> int | None:
    """Where the first think block's text, from ``start``, ends: at ``</think>`` or ``<answer>`` (None: open)."""
    ends = [i for i in (text.find(tags.think_close, start), text.find(tags.answer_open, start)) if i >= 0]
    return min(ends) if ends else None


def _broken_thinking(text: str, tags: ThinkTags) -> str:
    if tags.think_open in text:
        start = text.index(tags.think_open) + len(tags.think_open)
    elif tags.think_close in text:  # a lone closer: everything before it was thought
        start = 0
    else:
        return ""
    end = _first_block_end(text, start, tags)
    return _untagged(text[start : len(text) if end is None else end], tags)


def think_text(thinking: str, answer: str) -> str:
    """An assistant turn in the MF-Think layout: ``<think>thinking</think><answer>answer</answer>``."""
    return f"{THINK_OPEN}{thinking}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def think_record(record: Mapping[str, Any], thinking: str) -> dict[str, Any]:
    """A question-answer manifest record (our JSONL layout: ``conversations`` of ``role``/``content``) in the
    MF-Think layout: the last user turn gets the think suffix, the last assistant turn becomes
    ``think_text(thinking, answer)``. Other fields are kept. Idempotent: a turn already in the layout (the suffix
    there, the answer already ``<think>..</think><answer>..</answer>``) is left as it is. A ValueError naming the
    record's id where the result would not be in the layout: an empty answer, an answer with misplaced tags, a
    thinking that holds a tag."""
    name = f"record {record.get('id')!r}"
    convs = record.get("conversations")
    if not isinstance(convs, list) or not all(isinstance(m, Mapping) for m in convs):
        raise ValueError(f"{name}: 'conversations' must be a list of messages, got {convs!r:.80}")
    if any("role" not in m or "content" not in m for m in convs):
        # The AF3 layout ({"from": "human"/"gpt", "value": ...}) is read by the manifest loader, not rewritten here
        raise ValueError(
            f"{name}: messages need 'role' and 'content' (our JSONL layout; convert AF3 'from'/'value')"
        )
    convs = [dict(m) for m in convs]
    users = [i for i, m in enumerate(convs) if m["role"] == "user"]
    answers = [i for i, m in enumerate(convs) if m["role"] == "assistant"]
    if not users or not answers or answers[-1] < users[-1]:
        raise ValueError(f"{name}: the last user turn has no assistant answer to reason about")
    question, answer = convs[users[-1]], convs[answers[-1]]
    # str() of anything else wrote its repr into the record ("<answer>None</answer>", "['<sound>Key?']"), a layout
    # the manifest loader (which refuses such content) then read as text
    for what, value in (("last question", question["content"]), ("last answer", answer["content"])):
        if not isinstance(value, str):
            raise ValueError(f"{name}: the {what}'s 'content' must be a string, got {value!r:.80}")
    question["content"] = ensure_think_prompt(question["content"])
    parsed = parse_think(answer["content"])
    if parsed.status == "broken":  # wrapped, its tags would nest inside <answer>: SFT would teach broken tags
        raise ValueError(
            f"{name}: the last answer has think/answer tags but is not <think>...</think><answer>...</answer> "
            f"(a tag unclosed, repeated or out of place): {answer['content']!r:.120}"
        )
    if not parsed.well_formed:
        if not parsed.answer:
            raise ValueError(f"{name}: the last answer is empty: nothing to put in <answer>")
        if not isinstance(thinking, str):  # None wrote "<think>None</think>"
            raise ValueError(f"{name}: the thinking must be a string, got {thinking!r:.80}")
        if TAGS.any_tag.search(thinking):
            raise ValueError(
                f"{name}: the thinking holds a think/answer tag, which would break the layout: {thinking!r:.120}"
            )
        answer["content"] = think_text(thinking, answer["content"])
    return {**record, "conversations": convs}


# ---------------------------------------------------------------------------------------------- decoding
class TagsKept:
    """`tokenizer` decoding the think layout's tags (``<think>``, ``</think>``, ``<answer>``, ``</answer>``) as their
    text where it makes them special tokens (a think-SFT recipe that adds them to the vocabulary as special ones),
    which decoding otherwise leaves out (``skip_special_tokens``): the parse then saw no tag, infer.py showed the
    reasoning run into the answer, eval.py scored both as the answer and serve.py gave no reasoning. Its other
    special tokens are still skipped; each run of tokens between two tags is decoded as the tokenizer decodes it.
    Everything else is the tokenizer's own. Every answer is decoded through it: `engine.AnswerText` wraps its
    tokenizer (infer.py, the chat, eval.py, serve.py, GRPO's stop strings), whose `tokenizer.IncrementalDecoder`
    streams each tag whole (one token). ``kept_tags``: id -> tag.

    Example::

        tok = TagsKept.wrap(processor.tokenizer)  # the tokenizer itself where no tag is a special token
        tok.decode(ids)  # "<think>..</think><answer>..</answer>", <|im_end|> left out
    """

    def __init__(self, tokenizer: Any, tags: Mapping[int, str]) -> None:
        self._tokenizer = tokenizer
        self.kept_tags = dict(tags)  # id -> tag: the special tokens decoded as their text
        self.special_tokens = tuple(t for t in tokenizer.special_tokens if t not in self.kept_tags.values())

    @classmethod
    def wrap(cls, tokenizer: Any) -> Any:
        """`tokenizer` itself where no tag is one of its special tokens (or it is already wrapped), else a
        `TagsKept` of it."""
        special = set(getattr(tokenizer, "special_tokens", ()))
        tags = {
            i: t
            for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
            if t in special and (i := tokenizer.token_to_id(t)) is not None
        }
        return cls(tokenizer, tags) if tags else tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    @property
    def special_token_ids(self) -> set[int]:
        """The ids decoding skips: the tokenizer's special tokens but the tags."""
        return set(self._tokenizer.special_token_ids) - set(self.kept_tags)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, *args: Any, **kwargs: Any) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            tag = self.kept_tags.get(int(i))
            if tag is None:
                run.append(int(i))
                continue
            if run:
                pieces.append(self._tokenizer.decode(run, skip_special_tokens, *args, **kwargs))
                run = []
            pieces.append(tag)
        if run or not pieces:
            pieces.append(self._tokenizer.decode(run, skip_special_tokens, *args, **kwargs))
        return "".join(pieces)


# ---------------------------------------------------------------------------------------------- streaming
def _partial_tag(text: str, tags: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that is the start of one of ``tags`` (held back while streaming)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ThinkStream:
    """Text deltas of a think-mode answer in, the reasoning text to show so far out.

    What it shows is always a prefix of the thinking :func:`parse_think` gives for the complete text, so nothing
    shown is taken back: reasoning streams while the answer opens with ``<think>`` (leading whitespace aside) and
    that block is open, tags inside it read as a space (as the parser reads them); a piece of text that may be the
    start of a tag, and trailing whitespace, wait until decided. :meth:`flush` gives the rest of the parse's
    thinking (all of it when none streamed) and :meth:`finish` the parse.
    """

    def __init__(self, tags: ThinkTags = TAGS) -> None:
        self.tags = tags
        self.text = ""
        self.shown = ""  # the reasoning already returned

    def _block(self) -> tuple[int, int | None] | None:
        """(start, end) of the opening think block's text, end None while open; None when the text does not
        (yet) open with the think tag."""
        head = self.text.lstrip()
        if not head.startswith(self.tags.think_open):
            return None
        start = len(self.text) - len(head) + len(self.tags.think_open)
        return start, _first_block_end(self.text, start, self.tags)

    @property
    def opened(self) -> bool:
        """The answer opens with the think tag."""
        return self._block() is not None

    @property
    def ended(self) -> bool:
        """The opening think block has ended (``</think>`` or ``<answer>`` seen)."""
        block = self._block()
        return block is not None and block[1] is not None

    def push(self, delta: str) -> str:
        self.text += delta
        block = self._block()
        if block is None:
            return ""
        start, end = block
        if end is None:
            end = len(self.text) - _partial_tag(self.text[start:], astuple(self.tags))
        return self._show(_untagged(self.text[start:end], self.tags))

    def _show(self, reasoning: str) -> str:
        if not reasoning.startswith(self.shown):
            return ""  # cannot happen with the chat format's tags (each starts with its only "<")
        out, self.shown = reasoning[len(self.shown) :], reasoning
        return out

    def flush(self) -> str:
        """The parse's thinking not returned yet (the text is complete)."""
        return self._show(self.finish().thinking)

    def finish(self, stop: str | None = None) -> ThinkOutput:
        """The parse of the whole text; ``stop``: the stop string that ended it (see :func:`parse_think`)."""
        return parse_think(self.text, self.tags, stop)


DIM, UNDIM = "\x1b[2m", "\x1b[22m"


class ThinkDisplay:
    """Prints one think-mode answer as it streams: the reasoning apart (dim on a terminal, else after a
    ``thinking:`` label), then the answer last, on its own ``answer:`` line.

    Example::

        view = ThinkDisplay(sys.stdout)
        for delta in deltas:
            view.write(delta)
        output = view.finish()  # ThinkOutput
    """

    def __init__(self, out: TextIO, dim: bool | None = None) -> None:
        self.out = out
        self.dim = _is_terminal(out) if dim is None else dim
        self.stream = ThinkStream()
        self.started = False

    def _reasoning(self, text: str) -> None:
        if not text:
            return
        if not self.started:
            self.out.write(DIM if self.dim else "thinking: ")
            self.started = True
        self.out.write(text)

    def write(self, delta: str) -> None:
        self._reasoning(self.stream.push(delta))
        self.out.flush()

    def finish(self, stop: str | None = None) -> ThinkOutput:
        """Shows what the stream held back (or the parse's reasoning, when the answer did not open with a think
        tag) and then the answer; returns the parse (``stop``: the stop string that ended it, see
        :func:`parse_think`)."""
        self._reasoning(self.stream.flush())
        parsed = self.stream.finish(stop)
        if self.started:
            self.out.write((UNDIM if self.dim else "") + "\n")
        note = "" if parsed.status in ("ok", "plain") else f" ({parsed.status} think/answer tags)"
        self.out.write(f"answer{note}: {parsed.answer}\n")
        self.out.flush()
        return parsed


def _is_terminal(out: TextIO) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- evaluation
def _words(text: str) -> int:
    return len(text.split())


def think_report(
    predictions: Mapping[str, str], stops: Mapping[str, str | None] | None = None
) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, Any]]:
    """Raw think-mode predictions ``{id: text}`` -> (``{id: answer}`` to score, per-item ``{id: {think_status,
    thinking, answer_words, thinking_words}}``, a summary: counts per status and mean answer / thinking length in
    words, over all items). ``stops``: ``{id: the stop string that ended its text}`` for those a stop string ended
    (see :func:`parse_think`)."""
    stops = stops or {}
    parsed = {k: parse_think(v, stop=stops.get(k)) for k, v in predictions.items()}
    answers = {k: p.answer for k, p in parsed.items()}
    rows = {
        k: {
            "think_status": p.status,
            "thinking": p.thinking,
            "answer_words": _words(p.answer),
            "thinking_words": _words(p.thinking),
        }
        for k, p in parsed.items()
    }
    n = len(parsed)
    summary: dict[str, Any] = {"n": n, **{s: sum(p.status == s for p in parsed.values()) for s in STATUSES}}
    summary["answer_words_mean"] = sum(r["answer_words"] for r in rows.values()) / n if n else None
    summary["thinking_words_mean"] = sum(r["thinking_words"] for r in rows.values()) / n if n else None
    return answers, rows, summary
