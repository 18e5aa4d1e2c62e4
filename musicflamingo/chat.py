"""The Music Flamingo chat format in one place: roles, special tokens, system prompt, rendering, ``<sound>``
expansion and which tokens the loss learns.

A leaf module (pure Python, imports nothing from ``musicflamingo``), so the model, processor, data and inference
layers all read the format from here without an import cycle.

Rendering follows the reference ``chat_template.jinja`` (:func:`build_chat_template`); :func:`render_chat`
implements it in Python::

    <|im_start|>system\\n{prompt}<|im_end|>\\n     the default prompt, unless messages[0] is a system message
    <|im_start|>user\\n<sound>{text}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    <|im_start|>assistant\\n                       only with add_generation_prompt

A message is ``{"role", "content"}``; string content is emitted as is, list content (``{"type": "audio", ...}``
and ``{"type": "text", "text": ...}`` items) emits one ``<sound>`` when it has an audio item, then all its texts
concatenated. Before the model sees it, the i-th ``<sound>`` becomes ``<|sound_bos|>`` + ``<sound>`` * N_i +
``<|sound_eos|>`` (:func:`expand_audio_tokens`), N_i the audio tokens of audio i.

Learned tokens (:class:`ChatEncoder`): labels are :data:`IGNORE_INDEX` everywhere except each assistant turn's
content and its closing ``<|im_end|>``. The ``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>``,
system and user turns and every audio token are not learned. ``train_on_prompt=True`` gives the reference
processor's convention instead: every token except ``<sound>``, ``<|sound_bos|>``, ``<|sound_eos|>`` and pad.

Multiple-choice prompts, of the synthetic corpus and of the eval benchmarks alike, write their options with
:func:`format_options` ("(A) piano"), the layout the eval answer parsers read.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

Conversation = list[dict[str, Any]]  # messages {"role": ..., "content": str | list of items}

# Label of positions the loss skips (the ignore_index of torch's cross_entropy).
IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant")

START_OF_TURN = "<|im_start|>"
END_OF_TURN = "<|im_end|>"  # closes every turn; generation stops on it (the tokenizer's eos)
END_OF_TEXT = "<|endoftext|>"  # Qwen2's pad token
AUDIO_PLACEHOLDER = "<sound>"
AUDIO_BOS = "<|sound_bos|>"
AUDIO_EOS = "<|sound_eos|>"
# In Qwen2 id order; tokenizers trained from scratch put them right after <unk> in this order.
SPECIAL_TOKENS = (END_OF_TEXT, START_OF_TURN, END_OF_TURN, AUDIO_PLACEHOLDER, AUDIO_BOS, AUDIO_EOS)
# Tokens message text may not contain: they would fake turn (or audio) boundaries and break the label mask.
FORBIDDEN_TOKENS = (START_OF_TURN, END_OF_TURN, AUDIO_BOS, AUDIO_EOS, END_OF_TEXT)
# Typed text (a prompt, a chat line, a text item next to an audio item) may not hold <sound> either: the audio
# item makes the placeholder, so a typed one would claim an audio that is not there.
TYPED_TEXT_FORBIDDEN = (*FORBIDDEN_TOKENS, AUDIO_PLACEHOLDER)
ASSISTANT_HEADER = START_OF_TURN + "assistant\n"

# Verbatim from the reference checkpoint, typo ("regardlenss") and missing space before "--" included.
DEFAULT_SYSTEM_PROMPT = (
    "You are Music Flamingo, a multimodal assistant for language and music. "
    "On each turn you receive an audio clip which contains music and optional text, "
    "you will receive at least one or both; use your world knowledge and reasoning "
    "to help the user with any task. Interpret the entirety of the content any input music"
    "--regardlenss of whether the user calls it audio, music, or sound."
)

OPTION_LETTERS = string.ascii_uppercase

_SURROGATE = re.compile("[\ud800-\udfff]")


class Encoder(Protocol):
    """Anything that turns text into token ids, special tokens as single ids, no BOS/EOS added."""

    def encode(self, text: str) -> list[int]: ...


# ---------------------------------------------------------------------------------------------- template
def build_chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The reference processor's Jinja chat template (convert script ``write_processor``) for ``system_prompt``.

    Only written to disk for ``transformers``; :func:`render_chat` implements it in Python.
    """
    return (
        "{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n" + system_prompt + "<|im_end|>\n"
        "{% endif %}"
        "{% for m in messages if m['content'] is not none %}"
        "<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}"
        "{{ m['content'] }}"
        "{% else %}"
        "{% set audio = namespace(found=False) %}"
        "{% set text_buf = namespace(v='') %}"
        "{% for c in m['content'] %}"
        "{% if c.get('type') == 'audio' or 'audio' in c %}"
        "{% set audio.found = True %}"
        "{% elif c.get('type') == 'text' or 'text' in c %}"
        "{% set text_buf.v = text_buf.v + c['text'] %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


def template_system_prompt(template: str) -> str | None:
    """The system prompt inside a template shaped like :func:`build_chat_template`'s, else ``None``.

    Compared as ``transformers`` renders templates (:func:`jinja_layout`): a ``chat_template.jinja`` an editor saved
    with a final newline, or laid out one tag a line, is the same template and its prompt is found."""
    template = jinja_layout(template)
    head = "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
    tail = "<|im_end|>\n{% endif %}{% for m in messages"
    if not template.startswith(head) or tail not in template:
        return None
    prompt = template[len(head) : template.index(tail)]
    return prompt if jinja_layout(build_chat_template(prompt)) == template else None


_LSTRIP_BLOCK = re.compile(r"^[ \t]+(?=\{[%#](?![+-]))", re.MULTILINE)
_TRIM_BLOCK = re.compile(r"(?<![+-])([%#]\})\n")


def jinja_layout(template: str) -> str:
    """``template`` without the whitespace Jinja drops when ``transformers`` renders it (``keep_trailing_newline``
    off, ``trim_blocks`` and ``lstrip_blocks`` on): line ends as ``\\n``, the file's final newline, the spaces and
    tabs before a block or comment tag that opens its line, and the newline right after a block or comment tag."""
    template = template.replace("\r\n", "\n").replace("\r", "\n")
    if template.endswith("\n"):
        template = template[:-1]
    return _TRIM_BLOCK.sub(r"\1", _LSTRIP_BLOCK.sub("", template))


# ---------------------------------------------------------------------------------------------- messages
def user_message(text: str, audio: str | None = None) -> dict[str, Any]:
    """A user message: the audio file's item (when given), then the text item."""
    content: list[dict[str, Any]] = [{"type": "audio", "path": audio}] if audio is not None else []
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def conversation(text: str, audio: str | None = None, system_prompt: str | None = None) -> Conversation:
    """A one-question conversation; ``system_prompt`` adds a system message (None: the template's default; ``""``:
    an empty system turn, as the reference renders an empty system message)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [user_message(text, audio)]


def check_typed_text(text: str, what: str = "text", forbidden: Sequence[str] = TYPED_TEXT_FORBIDDEN) -> str:
    """``text`` as is, or ValueError naming ``what`` when it holds a chat special token or a lone surrogate.

    Special tokens in typed text are refused, not escaped, as training data refuses them
    (``data/manifest.py``): the tokenizer would read ``<|im_end|>`` as the real turn end and ``<sound>`` as an
    audio placeholder, and an escaped spelling would be token ids the model never saw. A lone surrogate (text
    decoded with ``errors="surrogateescape"``, e.g. invalid UTF-8 on a command line) is not text a tokenizer
    takes.
    """
    found = [(text.find(tok), tok) for tok in forbidden if tok in text]
    if found:
        at, tok = min(found)
        raise ValueError(
            f"{what} contains the chat special token {tok!r} at position {at}, which would fake a turn boundary "
            "or an audio placeholder; remove it"
        )
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValueError(
            f"{what} has an invalid character {bad.group()!r} at position {bad.start()} (a lone surrogate, "
            "e.g. from input that is not UTF-8)"
        )
    return text


def is_audio_item(item: Mapping[str, Any]) -> bool:
    """Whether a content item stands for an audio (the reference's test: type ``audio`` or an ``audio`` key)."""
    return item.get("type") == "audio" or "audio" in item


def message_place(
    conversation: str | None, message: int, item: int | None = None, field: str | None = None
) -> str:
    """Where in a conversation an error is, the one spelling every conversation error starts with:
    ``message_place("conversation 2", 0, 1, "text") == "conversation 2 message 0 content item 1 (text)"``;
    ``conversation`` None (a lone conversation) leaves it out, ``item`` None stops at the message."""
    place = f"message {message}" if conversation is None else f"{conversation} message {message}"
    if item is not None:
        place += f" content item {item}"
    return place if field is None else f"{place} ({field})"


# ---------------------------------------------------------------------------------------------- rendering
def render_chat(
    messages: Sequence[dict[str, Any]],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
    audio_token: str = AUDIO_PLACEHOLDER,
    continue_final_message: bool = False,
    name: str | None = None,
) -> str:
    """Render a conversation as the reference template does (see the module docstring).

    ``system_prompt`` is the default system turn, emitted unless the first message is a system message.
    ``continue_final_message`` leaves the last message open (no closing ``<|im_end|>\\n``) so the model continues
    it, e.g. an assistant answer started with ``"The key is "``; as ``transformers``, it needs text in that
    message and excludes ``add_generation_prompt``.

    A message whose content is ``None`` (an OpenAI tool-call turn) is skipped: the template's own rule
    (``for m in messages if m['content'] is not none``), as ``transformers``' renderer (``render_jinja_template``)
    applies it. The processor of ``transformers`` 5.25 first drops ``None``-valued keys, so the rule no longer sees
    ``None`` and an empty turn ``<|im_start|>{role}\n<|im_end|>\n`` is written instead; we keep the checkpoint
    template's rule (training renders with it too). ``content=""`` is an empty turn in both.

    ``name`` (e.g. ``"conversation 2"`` of a batch) starts every error, which names the place as
    :func:`message_place` does: ``conversation 2 message 0 content item 1 (text) must be a string, got int``.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"{name or 'a conversation'} must be a non-empty list of messages, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(
                f"{message_place(name, i)} must be a dict with 'role' and 'content', got {m!r:.80}"
            )
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt exclude each other: the first continues the last "
                "message, the second opens a new assistant turn"
            )
        last = messages[-1]["content"]
        has_text = isinstance(last, str) or (
            isinstance(last, (list, tuple)) and any(isinstance(c, dict) and "text" in c for c in last)
        )
        if not has_text:
            raise ValueError(
                f"{message_place(name, len(messages) - 1)} content has no text to continue "
                f"(continue_final_message needs a string or a text item in the final message), got {last!r:.80}"
            )
    out = []
    if messages[0]["role"] != "system":
        out.append(f"{START_OF_TURN}system\n{system_prompt}{END_OF_TURN}\n")
    for i, m in enumerate(messages):
        content = m["content"]
        if content is None:
            continue
        if not isinstance(content, (str, list, tuple)):  # was a bare TypeError ('int' object is not iterable)
            raise ValueError(
                f"{message_place(name, i)} content must be a string, a list of content items or None, got "
                f"{type(content).__name__} {content!r:.80}"
            )
        out.append(f"{START_OF_TURN}{m['role']}\n")
        if isinstance(content, str):
            out.append(content)
        else:
            has_audio, text = False, []
            for j, c in enumerate(content):
                if not isinstance(c, dict):
                    raise ValueError(
                        f"{message_place(name, i, j)} must be a dict such as {{'type': 'text', 'text': ...}}, "
                        f"got {type(c).__name__} {c!r:.80}"
                    )
                if is_audio_item(c):
                    has_audio = True
                elif c.get("type") == "text" or "text" in c:
                    where = message_place(name, i, j, "text")
                    if not isinstance(c.get("text"), str):
                        raise ValueError(f"{where} must be a string, got {type(c.get('text')).__name__}")
                    text.append(check_typed_text(c["text"], where))
            out.append((audio_token if has_audio else "") + "".join(text))
        out.append(f"{END_OF_TURN}\n")
    if continue_final_message:
        out.pop()  # the final message's closing "<|im_end|>\n"
    if add_generation_prompt:
        out.append(ASSISTANT_HEADER)
    return "".join(out)


def continuation_text(
    messages: Sequence[dict[str, Any]],
    new_message: dict[str, Any],
    previous_answer_closed: bool,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    audio_token: str = AUDIO_PLACEHOLDER,
) -> str:
    """Text to feed after a cached conversation to ask ``new_message`` (generation prompt included).

    The cache holds the render of ``messages`` up to the last answer's own tokens: the template's closing
    ``<|im_end|>\\n`` of that answer is not in it, except the ``<|im_end|>`` when the answer ended on it
    (``previous_answer_closed``), so the text starts with ``"\\n"`` or ``"<|im_end|>\\n"``. Cached text + this
    text == ``render_chat(messages + [new_message])``.
    """
    full = render_chat([*messages, new_message], system_prompt, True, audio_token)
    before = render_chat(messages, system_prompt, False, audio_token)
    if not full.startswith(before):  # a cached conversation can only grow if renders are prefix-stable
        raise RuntimeError("chat template is not prefix-stable; cannot continue the cached conversation")
    closing = "\n" if previous_answer_closed else END_OF_TURN + "\n"
    return closing + full[len(before) :]


# ---------------------------------------------------------------------------------------------- <sound> expansion
def expand_audio_tokens(
    text: str,
    counts: Sequence[int],
    audio_token: str = AUDIO_PLACEHOLDER,
    audio_bos: str = AUDIO_BOS,
    audio_eos: str = AUDIO_EOS,
) -> str:
    """Replace the i-th ``<sound>`` of ``text`` by ``<|sound_bos|>`` + ``<sound>`` * counts[i] + ``<|sound_eos|>``."""
    parts = text.split(audio_token)
    if len(parts) - 1 != len(counts):
        raise ValueError(
            f"text has {len(parts) - 1} {audio_token!r} placeholder(s) but {len(counts)} audio token "
            "count(s) were given"
        )
    out = [parts[0]]
    for n, part in zip(counts, parts[1:]):
        out += [audio_bos, audio_token * int(n), audio_eos, part]
    return "".join(out)


def encode_expanded(
    tokenizer: Encoder,
    text: str,
    counts: Sequence[int],
    audio_token_ids: Sequence[int],
    audio_token: str = AUDIO_PLACEHOLDER,
) -> list[int]:
    """Ids of ``expand_audio_tokens(text, counts)``, spliced without tokenizing thousands of ``<sound>``.

    ``audio_token_ids`` is ``(<sound>, <|sound_bos|>, <|sound_eos|>)``. Exact because special tokens are split off
    before pre-tokenization, so text pieces never merge across them.
    """
    sound, bos, eos = audio_token_ids
    parts = text.split(audio_token)
    ids = tokenizer.encode(parts[0])
    for n, part in zip(counts, parts[1:]):
        ids += [bos] + [sound] * int(n) + [eos]
        ids += tokenizer.encode(part)
    return ids


# ---------------------------------------------------------------------------------------------- labels
class ChatEncoder:
    """Conversation -> token ids and labels, with only the assistant turns learned (see the module docstring).

    Args:
        tokenizer: anything with ``encode(text) -> ids`` that keeps special tokens as single ids.
        audio_token_ids: ids of ``(<sound>, <|sound_bos|>, <|sound_eos|>)``.
        pad_token_id: never learned (pad doubles as ``<|endoftext|>`` in Qwen2).
        system_prompt, audio_token: as in :func:`render_chat`.
        train_on_prompt: learn every token except audio and pad tokens (the reference processor's labels).

    Example::

        ids, labels = ChatEncoder(tok, (300, 301, 302)).encode(
            [{"role": "user", "content": "<sound>Key?"}, {"role": "assistant", "content": "C major."}], [5])
        # labels: -100 up to and including "<|im_start|>assistant\\n", then "C major.<|im_end|>", then -100 ("\\n")
    """

    def __init__(
        self,
        tokenizer: Encoder,
        audio_token_ids: Sequence[int],
        *,
        pad_token_id: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        audio_token: str = AUDIO_PLACEHOLDER,
        train_on_prompt: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.audio_token_id, self.audio_bos_id, self.audio_eos_id = (int(i) for i in audio_token_ids)
        self.system_prompt = system_prompt
        self.audio_token = audio_token
        self.train_on_prompt = train_on_prompt
        self._header_ids = tokenizer.encode(ASSISTANT_HEADER)
        self._tail_ids = tokenizer.encode(END_OF_TURN + "\n")  # [<|im_end|>, "\n"]: the "\n" is not learned
        # The default system turn opens nearly every conversation: its ids once, not per record (half the cost of
        # counting a manifest's tokens). Used only where the tokenizer splits at <|im_start|> as the pieces assume.
        self._system_turn = f"{START_OF_TURN}system\n{system_prompt}{END_OF_TURN}\n"
        self._system_ids = tokenizer.encode(self._system_turn)
        probe = f"{START_OF_TURN}user\n?"
        if tokenizer.encode(self._system_turn + probe) != self._system_ids + tokenizer.encode(probe):
            self._system_turn = None
        audio = {self.audio_token_id, self.audio_bos_id, self.audio_eos_id}
        self._unlabelled = audio | ({pad_token_id} if pad_token_id is not None else set())

    def encode(
        self, messages: Sequence[dict[str, Any]], audio_token_counts: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """Token ids [S] and labels [S] of a conversation (no generation prompt) whose i-th ``<sound>`` expands to
        ``<|sound_bos|>`` + ``<sound>`` * counts[i] + ``<|sound_eos|>``."""
        ids: list[int] = []
        labels: list[int] = []
        counts = iter(audio_token_counts)
        for piece, learn_from, learn_to in self._pieces(messages):
            for j, t in enumerate(piece):
                if t == self.audio_token_id:
                    n = next(counts, None)
                    if n is None:
                        raise ValueError("more <sound> tokens in the conversation than audio token counts")
                    ids += [self.audio_bos_id] + [t] * int(n) + [self.audio_eos_id]
                    labels += [IGNORE_INDEX] * (int(n) + 2)
                    continue
                ids.append(t)
                learn = self.train_on_prompt or learn_from <= j < learn_to
                labels.append(t if learn and t not in self._unlabelled else IGNORE_INDEX)
        if next(counts, None) is not None:
            raise ValueError("fewer <sound> tokens in the conversation than audio token counts")
        return ids, labels

    def num_tokens(self, messages: Sequence[dict[str, Any]], audio_token_counts: Sequence[int]) -> int:
        """``len(encode(messages, audio_token_counts)[0])`` without building the lists (counts are not checked)."""
        text = sum(len(piece) for piece, _, _ in self._pieces(messages))
        return text + sum(int(n) + 1 for n in audio_token_counts)  # each <sound> -> bos + n + eos

    def _pieces(self, messages: Sequence[dict[str, Any]]) -> list[tuple[list[int], int, int]]:
        """Rendered conversation cut at turn starts: ``(ids, learn_from, learn_to)`` per piece, where
        ``ids[learn_from:learn_to]`` is assistant content + ``<|im_end|>`` (an empty range elsewhere).

        Each render of ``messages[:k+1]`` extends that of ``messages[:k]``, so every piece starts at
        ``<|im_start|>``; special tokens are split off before BPE pre-tokenization, so the pieces' ids are those
        of the whole string.
        """
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None  # render_chat reports malformed ones
            for j, text in _texts(content):
                if any(t in text for t in FORBIDDEN_TOKENS):  # the scan alone on the hot path (token counts)
                    where = f"message {i} content" if j is None else message_place(None, i, j, "text")
                    check_typed_text(text, where, FORBIDDEN_TOKENS)  # raises naming the place and the token
        pieces = []
        prev = ""
        for k, m in enumerate(messages):
            cur = render_chat(messages[: k + 1], self.system_prompt, False, self.audio_token)
            if cur == prev and m["content"] is None:  # a turn the template skips (a tool call): no tokens
                continue
            if not cur.startswith(prev) or not cur[len(prev) :].startswith(START_OF_TURN):
                raise RuntimeError(
                    "the chat template is not a per-message concatenation starting each turn with <|im_start|>; "
                    "assistant spans cannot be located"
                )
            seg, prev = cur[len(prev) :], cur
            if m["role"] != "assistant":
                pieces.append((self._encode(seg), 0, 0))
                continue
            cut = seg.rfind(ASSISTANT_HEADER)  # the segment may start with the default system turn
            if cut < 0:
                raise RuntimeError(f"rendered assistant turn lacks {ASSISTANT_HEADER!r}: {seg[:60]!r}")
            if cut > 0:
                pieces.append((self._encode(seg[:cut]), 0, 0))
            pieces.append(self._assistant_piece(seg[cut:]))
        return pieces

    def _encode(self, text: str) -> list[int]:
        if self._system_turn and text.startswith(self._system_turn):
            rest = text[len(self._system_turn) :]
            return self._system_ids + (self.tokenizer.encode(rest) if rest else [])
        return self.tokenizer.encode(text)

    def _assistant_piece(self, seg: str) -> tuple[list[int], int, int]:
        ids = self.tokenizer.encode(seg)
        tail = self._tail_ids
        if ids[-len(tail) :] != tail:
            raise RuntimeError(f"assistant turn does not end with {END_OF_TURN!r} + newline: {seg[-40:]!r}")
        head = self._header_ids
        if ids[: len(head)] == head:
            start = len(head)
        else:
            # The content starts with a newline that BPE merged with the header's "\n" into one token: that token
            # straddles header and content; leave it unlearned and learn from the next token on.
            common = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
            start = common + 1
        return ids, start, len(ids) - len(tail) + 1


def _texts(content: Any) -> list[tuple[int | None, str]]:
    """``(item index, text)`` of each text a message's content carries: ``(None, content)`` for a string, else the
    ``text`` of its items."""
    if isinstance(content, str):
        return [(None, content)]
    if not isinstance(content, (list, tuple)):
        return []
    return [
        (j, c["text"])
        for j, c in enumerate(content)
        if isinstance(c, dict) and isinstance(c.get("text"), str)
    ]


# ---------------------------------------------------------------------------------------------- options
def option_letter(index: int) -> str:
    """``0 -> "A"``; raises for more than 26 options (the "(A)".."(Z)" format has no more letters)."""
    if not 0 <= index < len(OPTION_LETTERS):
        raise ValueError(f"option index {index} has no letter (at most {len(OPTION_LETTERS)} options)")
    return OPTION_LETTERS[index]


def format_options(choices: Sequence[str], sep: str = "\n") -> str:
    """Multiple-choice options as the model reads them: ``"(A) piano\\n(B) guitar"``; ``sep=" "`` gives the
    one-line layout of the synthetic corpus, ``"(A) piano (B) guitar"``."""
    return sep.join(f"({option_letter(i)}) {c}" for i, c in enumerate(choices))


# ---------------------------------------------------------------------------------------------- think mode
# The paper's chain-of-thought format (arXiv 2511.10289, section 3.3): the MF-Think warm-up and GRPO prompts end
# with THINK_SUFFIX and the answer reads "<think>reasoning</think><answer>final answer</answer>". No public file
# gives the released think checkpoint another chat template or prompt (its users call the base template), so the
# suffix is the only change to the prompt. Parsing the answer back: musicflamingo.reasoning.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_SUFFIX = "Output the thinking process in <think> </think> and final answer in <answer> </answer>"


def think_prompt(text: str) -> str:
    """``text`` with the think-mode instruction on the next line (only the instruction when ``text`` is empty)."""
    return f"{text}\n{THINK_SUFFIX}" if text else THINK_SUFFIX


def ensure_think_prompt(text: str) -> str:
    """:func:`think_prompt`, unless ``text`` already ends with the instruction (a record in the MF-Think layout)."""
    return text if text.rstrip().endswith(THINK_SUFFIX) else think_prompt(text)
