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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from musicflamingo.chat import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    think_prompt,
)

ThinkStatus = Literal["ok", "missing", "broken", "plain"]
STATUSES: tuple[ThinkStatus, ...] = ("ok", "missing", "broken")

_TAG = re.compile("|".join(re.escape(t) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)))
_WELL_FORMED = re.compile(
    rf"\s*{re.escape(THINK_OPEN)}(.*?){re.escape(THINK_CLOSE)}\s*{re.escape(ANSWER_OPEN)}(.*?)"
    rf"{re.escape(ANSWER_CLOSE)}\s*",
    re.DOTALL,
)
_ANSWER_BLOCK = re.compile(rf"{re.escape(ANSWER_OPEN)}(.*?){re.escape(ANSWER_CLOSE)}", re.DOTALL)


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


def _untagged(text: str) -> str:
    return _TAG.sub(" ", text).strip()  # a space, not nothing: "x<answer>y" reads "x y"


def parse_think(text: str | None) -> ThinkOutput:
    """Split a think-mode answer into thinking and answer (see the module docstring for the statuses)."""
    text = str(text or "")
    m = _WELL_FORMED.fullmatch(text)
    if m and not _TAG.search(m.group(1)) and not _TAG.search(m.group(2)):
        return ThinkOutput(text, m.group(1).strip(), m.group(2).strip(), "ok")
    if not _TAG.search(text):
        return ThinkOutput(text, "", text.strip(), "missing")
    return ThinkOutput(text, _broken_thinking(text), _broken_answer(text), "broken")


def plain_output(text: str | None) -> ThinkOutput:
    """An answer of a run without think mode: the whole text is the answer."""
    text = str(text or "")
    return ThinkOutput(text, "", text.strip(), "plain")


def _broken_answer(text: str) -> str:
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return _untagged(blocks[-1])
    for tag in (ANSWER_OPEN, THINK_CLOSE):
        if tag in text:
            return _untagged(text[text.rindex(tag) + len(tag) :])
    return ""  # only an unclosed <think>: the answer never came


def _broken_thinking(text: str) -> str:
    if THINK_OPEN in text:
        start = text.index(THINK_OPEN) + len(THINK_OPEN)
    elif THINK_CLOSE in text:  # a lone closer: everything before it was thought
        start = 0
    else:
        return ""
    ends = [i for i in (text.find(THINK_CLOSE, start), text.find(ANSWER_OPEN, start)) if i >= 0]
    return _untagged(text[start : min(ends) if ends else len(text)])


def think_text(thinking: str, answer: str) -> str:
    """An assistant turn in the MF-Think layout: ``<think>thinking</think><answer>answer</answer>``."""
    return f"{THINK_OPEN}{thinking}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def think_record(record: Mapping[str, Any], thinking: str) -> dict[str, Any]:
    """A question-answer manifest record (our JSONL layout) in the MF-Think layout: the last user turn gets the
    think suffix, the last assistant turn becomes ``think_text(thinking, answer)``. Other fields are kept."""
    convs = [dict(m) for m in record["conversations"]]
    last_user = max(i for i, m in enumerate(convs) if m["role"] == "user")
    last_answer = max(i for i, m in enumerate(convs) if m["role"] == "assistant")
    if last_answer < last_user:
        raise ValueError(f"record {record.get('id')!r}: the last user turn has no answer to reason about")
    convs[last_user]["content"] = think_prompt(convs[last_user]["content"])
    convs[last_answer]["content"] = think_text(thinking, convs[last_answer]["content"])
    return {**record, "conversations": convs}


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

    Reasoning streams only when the answer opens with ``<think>`` (leading whitespace aside); a piece of text that
    may be the start of ``</think>`` or ``<answer>`` is held back until it is decided. :meth:`finish` parses the
    whole text.
    """

    def __init__(self) -> None:
        self.text = ""
        self.shown = 0  # characters of reasoning already returned

    def push(self, delta: str) -> str:
        self.text += delta
        return self._reasoning(hold=True)

    def flush(self) -> str:
        """The reasoning not returned yet, nothing held back (the text is complete)."""
        return self._reasoning(hold=False)

    def _reasoning(self, hold: bool) -> str:
        head = self.text.lstrip()
        if not head.startswith(THINK_OPEN):
            return ""
        start = len(self.text) - len(head) + len(THINK_OPEN)
        ends = [i for i in (self.text.find(THINK_CLOSE, start), self.text.find(ANSWER_OPEN, start)) if i >= 0]
        if ends:
            end = min(ends)
        else:
            end = len(self.text) - (
                _partial_tag(self.text[start:], (THINK_CLOSE, ANSWER_OPEN)) if hold else 0
            )
        visible = self.text[start:end]
        if THINK_OPEN in visible:  # a nested <think>: stop streaming; the parse at the end decides
            visible = visible[: visible.index(THINK_OPEN)]
        out = visible[self.shown :]
        self.shown = max(self.shown, len(visible))
        return out

    def finish(self) -> ThinkOutput:
        return parse_think(self.text)


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

    def finish(self) -> ThinkOutput:
        """Shows what the stream held back (or the parse's reasoning, when the answer did not open with a think
        tag) and then the answer; returns the parse."""
        rest = self.stream.flush()
        parsed = self.stream.finish()
        self._reasoning(rest if self.stream.shown else parsed.thinking)
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
    predictions: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, Any]]:
    """Raw think-mode predictions ``{id: text}`` -> (``{id: answer}`` to score, per-item ``{id: {think_status,
    thinking, answer_words, thinking_words}}``, a summary: counts per status and mean answer / thinking length in
    words, over all items)."""
    parsed = {k: parse_think(v) for k, v in predictions.items()}
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
