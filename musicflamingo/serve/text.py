"""The engine's answer text -> what a client sees, streamed: think mode splits off the reasoning.

The engine decodes each answer and cuts it before a stop string (`engine.AnswerText`, the worker's `Event.text`);
`AnswerStream.push(tokens, text)` turns its pieces into `(reasoning, content)` deltas and counts the tokens. Without
think mode the content over a request is the engine's text (what `infer.py` prints). In think mode the answer reads
``<think>reasoning</think><answer>answer</answer>`` (`musicflamingo.chat`); the two sections come out apart, as
`reasoning.parse_think` gives them for the whole text: the reasoning streams, the answer comes at the end. Text that
might be the start of a tag, and whitespace that might end a section, is held back until decided.
"""

from __future__ import annotations

from collections.abc import Sequence

from musicflamingo.reasoning import ThinkStream, ThinkTags

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
    """One request's answer -> (reasoning, content) text deltas; counts completion and reasoning tokens.

    `push(tokens, text)` takes what the engine produced in one step: its tokens and the text they added (the
    engine's: stop ids left out, cut before a stop string, never a piece of one). Every generated token counts as a
    completion token, a stop id and the token that completed a stop string included (as OpenAI and vLLM count);
    the reasoning tokens are those up to the one that closed the think block (stop ids excepted). With `think` the
    answer is split by `ThinkSplitter`.
    """

    def __init__(self, stop_ids: Sequence[int] = (), think: ThinkFormat | None = None) -> None:
        self.stop_ids = set(stop_ids)
        self.splitter = ThinkSplitter(think) if think is not None else None
        self.completion_tokens = 0
        self.reasoning_tokens = 0

    def push(self, tokens: Sequence[int], text: str) -> tuple[str, str]:
        self.completion_tokens += len(tokens)
        if self.splitter is None:
            return "", text
        thought = self.splitter.stream.ended
        reasoning, content = self.splitter.push(text)
        if not thought and self.splitter.stream.opened:  # the tokens up to the closing tag
            self.reasoning_tokens = self.completion_tokens - sum(t in self.stop_ids for t in tokens)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Whatever is still held back, at the end of the answer."""
        if self.splitter is None:
            return "", ""
        return self.splitter.flush()
