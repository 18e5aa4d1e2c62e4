"""Generated tokens -> the text a client sees, streamed: stop strings cut it, think mode splits off reasoning.

`AnswerStream.push(tokens)` returns `(reasoning, content)` deltas. Without think mode their concatenation over a
request is `tokenizer.decode(tokens)` (what `infer.py` prints) up to a stop string. In think mode the answer reads
``<think>reasoning</think><answer>answer</answer>`` (`musicflamingo.chat`); the two sections come out apart, as
`reasoning.parse_think` gives them for the whole text: the reasoning streams, the answer comes at the end. Text that
might be the start of a stop string or a tag, and whitespace that might end a section, is held back until decided.
"""

from __future__ import annotations

from collections.abc import Sequence

from musicflamingo.reasoning import ThinkStream, ThinkTags
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


# The tags of a think-mode answer (the chat format's; a test swaps in others)
ThinkFormat = ThinkTags


class ThinkSplitter:
    """``<think>reasoning</think><answer>answer</answer>`` arriving in pieces -> (reasoning, content) deltas, by
    `reasoning.parse_think`'s rule, so the server answers what `infer.py` and `eval.py` read from the same text.

    The reasoning streams while the answer opens with ``<think>`` and that block is open (`reasoning.ThinkStream`:
    never more than the final parse's thinking); the content, the parse's answer, comes whole at the end: only the
    complete text decides it (a second ``<answer>`` block replaces the first, text before ``<think>`` is no answer).
    """

    def __init__(self, fmt: ThinkFormat | None = None) -> None:
        self.stream = ThinkStream(fmt or ThinkFormat())

    def push(self, text: str) -> tuple[str, str]:
        return self.stream.push(text), ""

    def flush(self) -> tuple[str, str]:
        """The rest of the reasoning and the whole answer, once the text is complete."""
        return self.stream.flush(), self.stream.finish().answer


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
            thought = self.splitter is None or self.splitter.stream.ended
            r, c = self._route(self.stops.push(self.decoder.push(t)))
            reasoning, content = reasoning + r, content + c
            if not thought and self.splitter.stream.opened:
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
