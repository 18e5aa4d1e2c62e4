"""Generated tokens -> the text a client sees, streamed: stop strings cut it, think mode splits off reasoning.

`AnswerStream.push(tokens)` returns `(reasoning, content)` deltas. Without think mode their concatenation over a
request is `tokenizer.decode(tokens)` (what `infer.py` prints) up to a stop string. In think mode the answer reads
``<think>reasoning</think><answer>answer</answer>`` (`musicflamingo.chat`); the two sections come out apart and
stripped, as `reasoning.parse_think` gives them for a well-formed answer. Text that might be the start of a stop
string or a tag, and whitespace that might end a section, is held back until it is decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from musicflamingo.chat import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from musicflamingo.tokenizer import IncrementalDecoder, Tokenizer


def _partial_suffix(text: str, *targets: str) -> int:
    """Length of the longest end of `text` that is a proper start of one of `targets` (0 when none)."""
    best = 0
    for target in targets:
        for n in range(min(len(text), len(target) - 1), best, -1):
            if target.startswith(text[-n:]):
                best = n
                break
    return best


class StopStrings:
    """Cuts text at the first of `stops`; `push` returns what is safe to show, `hit` says a stop was found."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        found = [(buf.find(s), s) for s in self.stops if s in buf]
        if found:
            self.hit, self.held = True, ""
            return buf[: min(found)[0]]
        keep = _partial_suffix(buf, *self.stops)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


@dataclass(frozen=True)
class ThinkFormat:
    """The tags of a think-mode answer (the chat format's, `musicflamingo.chat`)."""

    think_open: str = THINK_OPEN
    think_close: str = THINK_CLOSE
    answer_open: str = ANSWER_OPEN
    answer_close: str = ANSWER_CLOSE


class ThinkSplitter:
    """``<think>reasoning</think><answer>answer</answer>`` arriving in pieces -> (reasoning, content) deltas.

    Sections are stripped (leading whitespace dropped, trailing whitespace held until more text follows). An
    answer without tags is all content; text after ``</think>`` without ``<answer>`` is content; a ``<think>``
    never closed is all reasoning; text after ``</answer>`` is dropped. These agree with `reasoning.parse_think`
    for well-formed answers and for those cut short; for other broken ones the stream gives its best guess as it
    goes (it cannot take back what it sent).
    """

    def __init__(self, fmt: ThinkFormat | None = None) -> None:
        self.f = fmt or ThinkFormat()
        self.state = "start"  # start -> reasoning -> between -> answer -> done; start/between -> plain
        self.opened = False  # the answer opened with the think tag
        self.buf = ""
        self.started = False  # the current section has shown text (its leading whitespace is gone)

    def _show(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    def _enter(self, state: str, rest: str) -> None:
        self.state, self.buf, self.started = state, rest, False

    def _section(self, ends: tuple[str, ...], final: bool) -> tuple[str, str | None]:
        """Text of the current section that can be shown, and the end tag found (None: not yet)."""
        found = [(self.buf.find(t), t) for t in ends if t in self.buf]
        if found:
            at, tag = min(found)
            shown = self._show(self.buf[:at].rstrip())
            self.buf = self.buf[at + len(tag) :]
            return shown, tag
        cut = len(self.buf) if final else len(self.buf) - _partial_suffix(self.buf, *ends)
        end = len(self.buf[:cut].rstrip())  # trailing whitespace waits: it may end the section
        shown, self.buf = self._show(self.buf[:end]), self.buf[end:]
        return shown, None

    def _advance(self, final: bool) -> tuple[str, str, bool]:
        """One move of the state machine: (reasoning, content, whether it can move again)."""
        f = self.f
        if self.state in ("start", "between"):
            head = self.buf.lstrip()
            opens = (f.think_open, f.answer_open) if self.state == "start" else (f.answer_open,)
            for tag in opens:
                if head.startswith(tag):
                    self.opened = self.opened or tag == f.think_open
                    self._enter("reasoning" if tag == f.think_open else "answer", head[len(tag) :])
                    return "", "", True
            if not head or (not final and any(t.startswith(head) for t in opens)):
                return "", "", False  # undecided: nothing yet, or a piece of a tag
            self._enter("plain", head)
            return "", "", True
        if self.state == "reasoning":
            shown, tag = self._section((f.think_close, f.answer_open), final)
            if tag is not None:
                self._enter("between" if tag == f.think_close else "answer", self.buf)
            return shown, "", tag is not None
        if self.state == "answer":
            shown, tag = self._section((f.answer_close,), final)
            if tag is not None:
                self._enter("done", "")
            return "", shown, False
        if self.state == "plain":
            shown, _ = self._section((), final)
            return "", shown, False
        self.buf = ""  # done: whatever follows the answer is not shown
        return "", "", False

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        more = True
        while more:
            r, c, more = self._advance(final)
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def push(self, text: str) -> tuple[str, str]:
        self.buf += text
        return self._run(final=False)

    def flush(self) -> tuple[str, str]:
        """What is left once the answer is complete (held whitespace at a section's end is dropped)."""
        reasoning, content = self._run(final=True)
        self.buf = ""
        return reasoning, content


class AnswerStream:
    """One request's tokens -> (reasoning, content) text deltas; counts completion and reasoning tokens.

    Stop ids end the answer and are not shown; stop strings cut it (`stopped` turns true). With `think` the
    answer is split by `ThinkSplitter`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        think: ThinkFormat | None = None,
    ) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_ids = set(stop_ids)
        self.stops = StopStrings(stop_strings)
        self.splitter = ThinkSplitter(think) if think is not None else None
        self.completion_tokens = 0
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.stops.hit

    def _route(self, text: str) -> tuple[str, str]:
        if self.splitter is None:
            return "", text
        return self.splitter.push(text)

    def push(self, tokens: Sequence[int]) -> tuple[str, str]:
        reasoning = content = ""
        for t in tokens:
            if self.stopped:
                break
            self.completion_tokens += 1
            if t in self.stop_ids:
                continue
            was = self.splitter.state if self.splitter is not None else None
            r, c = self._route(self.stops.push(self.decoder.push(t)))
            reasoning, content = reasoning + r, content + c
            if was in ("start", "reasoning") and self.splitter.opened:
                self.reasoning_tokens = self.completion_tokens  # the tokens up to the closing tag
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Whatever is still held back, at the end of the answer."""
        text = "" if self.stopped else self.stops.push(self.decoder.flush())
        r1, c1 = self._route(text + self.stops.flush())
        if self.splitter is None:
            return r1, c1
        r2, c2 = self.splitter.flush()
        return r1 + r2, c1 + c2
