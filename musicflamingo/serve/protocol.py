"""The OpenAI chat-completions request: JSON -> a checked `ChatRequest` -> model inputs (`Prepared`).

`parse_chat_request` checks the structure (cheap, on the event loop): every field known, every value in range,
each error a 400 naming the field as `messages[0].content[1].input_audio.data`. `prepare` does the work (in a
worker thread): decodes the audio, renders the chat with `MusicFlamingoProcessor.apply_chat_template` (the same
call `infer.py` makes) and checks the token limits.

Content parts: `{"type": "text", "text"}`, `{"type": "input_audio", "input_audio": {"data": base64, "format"}}`
and `{"type": "audio_url", "audio_url": {"url": "data:..." | "file:///..."}}` (or the URL as a plain string).
Roles: `system` (or `developer`) first, then `user` and `assistant` turns, the last one a user turn; at most one
audio per message (the chat format has one `<sound>` per turn).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from musicflamingo.chat import check_typed_text, encode_expanded, think_prompt
from musicflamingo.engine import SamplingParams
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.serve.audio import (
    FORMATS,
    Audio,
    Source,
    decode_base64,
    decode_source,
    open_bytes,
    open_url,
)
from musicflamingo.serve.errors import APIError, bad_request
from musicflamingo.serve.settings import ServeSettings

MAX_STOP_STRINGS = 4

FIELDS = (
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "n",
    "user",
    "think",
    "reasoning_effort",
)
# Accepted and without effect here: bookkeeping and caching hints that do not change the answer (the openai client
# sends `safety_identifier` and `prompt_cache_key` where it used to send `user`), each of the type OpenAI's API
# requires (null too): a client's wrong type is a 400 here as there, not a silent success.
IGNORED_FIELDS: dict[str, type] = {
    "metadata": dict,
    "store": bool,
    "service_tier": str,
    "parallel_tool_calls": bool,
    "safety_identifier": str,
    "prompt_cache_key": str,
    "prompt_cache_retention": str,
    "prompt_cache_options": dict,
}
_TYPE_NAMES = {dict: "an object", bool: "true or false", str: "a string"}
# OpenAI fields this server implements only at their neutral value (None is neutral for all of them).
NEUTRAL: dict[str, Any] = {
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: _as_int(v) == 0,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "web_search_options": lambda v: False,
    "verbosity": lambda v: v == "medium",  # OpenAI's default
    "moderation": lambda v: False,
}
# OpenAI's penalties, in [-2, 2]: only 0 (what LangChain and others send unasked) is taken; they subtract from the
# logits of the tokens generated so far, which the engine does not do: its `repetition_penalty` (vLLM's and the
# reference's extension) divides those of every token already in the sequence, the prompt's included.
OPENAI_PENALTIES = ("frequency_penalty", "presence_penalty")
MESSAGE_FIELDS = {
    "system": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": (
        "role",
        "content",
        "name",
        "reasoning_content",
        "refusal",
        "tool_calls",
        "audio",
        "function_call",
        "annotations",  # the SDK's `message.model_dump()` sends it back (null or []): citations, no text of their own
    ),
}
ROLE_ALIASES = {"developer": "system"}
# content part types of OpenAI's chat API that this server does not take (a 400 `unsupported_value`)
OPENAI_PART_TYPES = ("image_url", "file", "input_image", "input_file", "refusal")
REASONING_EFFORT = {
    "none": False,
    "minimal": False,
    "low": True,
    "medium": True,
    "high": True,
    "xhigh": True,
    "max": True,
}


@dataclass
class AudioRef:
    """An audio part not decoded yet: base64 `data` with its `format`, or a `url`."""

    param: str
    data: str | None = None
    format: str | None = None
    url: str | None = None


@dataclass
class Message:
    role: str
    text: str
    audio: AudioRef | None = None


@dataclass
class ChatRequest:
    """A checked request. `max_tokens` None: the server's default (cut to what the context leaves)."""

    messages: list[Message]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # None (unset or null): the server's default, generation_config.json's stop_strings
    stop: list[str] | None = None
    think: bool = False


@dataclass
class Prepared:
    """Model inputs of one request: input_ids (T,), features (W, n_mels, F) and mask (W, F) when it has audio."""

    input_ids: torch.Tensor
    input_features: torch.Tensor | None
    input_features_mask: torch.Tensor | None
    params: SamplingParams
    prompt_tokens: int
    audio_tokens: int
    audio_seconds: float


# ---------------------------------------------------------------------------------------------- parsing
def parse_json(body: bytes, content_type: str | None = None) -> dict[str, Any]:
    """Request body -> a JSON object (400 `invalid_json` naming line and column when it is not one; a body sent
    as another `content_type`, a form's, is named so)."""
    sent = (content_type or "").split(";")[0].strip().lower()
    hint = (
        ""
        if not sent or sent == "application/json" or sent.endswith("+json")
        else f" (it was sent as {sent}; send application/json)"
    )
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise bad_request(None, f"the request body is not UTF-8 JSON{hint}", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise bad_request(
            None,
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}",
            code="invalid_json",
        ) from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int-from-string limit): was a 500
        raise bad_request(None, f"the request body is not usable JSON: {e}", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep: was a 500
        raise bad_request(
            None, "the request body is not usable JSON: it is nested too deeply", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise bad_request(
            None, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v: Any) -> int | None:
    """An integer field's value: an int, or a float with no fraction (2.0: JSON has one number type, JSON Schema's
    "integer" and pydantic take it, and Python clients send it after arithmetic); None for anything else."""
    if _is_int(v):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for k in obj:
        if k not in allowed:
            raise bad_request(
                f"{where}.{k}" if where else k,
                f"unknown field (known: {', '.join(allowed)})",
                code="unknown_parameter",
            )


def _text(value: Any, param: str) -> str:
    """Typed text, refused when it holds a chat special token or a lone surrogate (`chat.check_typed_text`)."""
    if not isinstance(value, str):
        raise bad_request(param, f"must be a string, got {type(value).__name__}")
    try:
        return check_typed_text(value, "the text")
    except ValueError as e:
        raise bad_request(param, str(e)) from None


def _parse_part(part: Any, param: str) -> tuple[str, AudioRef | None]:
    if not isinstance(part, dict):
        raise bad_request(param, f"a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        _check_keys(part, ("type", "text"), param)
        return _text(part.get("text"), f"{param}.text"), None
    if kind == "input_audio":
        _check_keys(part, ("type", "input_audio"), param)
        inner = part.get("input_audio")
        where = f"{param}.input_audio"
        if not isinstance(inner, dict):
            raise bad_request(where, 'must be an object {"data": base64, "format": "wav"}')
        _check_keys(inner, ("data", "format"), where)
        fmt = inner.get("format")
        if fmt not in FORMATS:
            raise bad_request(f"{where}.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if not isinstance(inner.get("data"), str) or not inner["data"]:
            raise bad_request(f"{where}.data", "must be a non-empty base64 string")
        if inner["data"][:5].lower() == "data:":  # was 'not valid base64 (Only base64 data is allowed)'
            raise bad_request(
                f"{where}.data",
                "is a data: URL; input_audio.data takes the file's base64 alone (or send the URL as "
                '{"type": "audio_url", "audio_url": {"url": "data:audio/...;base64,..."}})',
            )
        return "", AudioRef(f"{where}.data", data=inner["data"], format=fmt)
    if kind == "audio_url":
        _check_keys(part, ("type", "audio_url"), param)
        inner = part.get("audio_url")
        where = f"{param}.audio_url"
        if isinstance(inner, dict):
            _check_keys(inner, ("url",), where)
            inner, where = inner.get("url"), f"{where}.url"
        if not isinstance(inner, str) or not inner:
            raise bad_request(where, "must be a data: URL or a file:// URL")
        return "", AudioRef(where, url=inner)
    # OpenAI's own part types (an image, a file) are values this server does not implement; others are no value
    code = "unsupported_value" if kind in OPENAI_PART_TYPES else "invalid_value"
    raise bad_request(
        f"{param}.type", f"{kind!r:.60} is not supported (text, input_audio, audio_url)", code=code
    )


def _parse_message(m: Any, i: int) -> Message:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(param, f"a message must be an object, got {type(m).__name__}")
    role = m.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None  # a list or object: was a 500
    if role not in MESSAGE_FIELDS:
        raise bad_request(
            f"{param}.role",
            f"must be system, developer, user or assistant, got {m.get('role')!r:.60}",
            code="unsupported_value" if role in ("tool", "function") else "invalid_value",
        )
    _check_keys(m, MESSAGE_FIELDS[role], param)
    for k in ("tool_calls", "audio", "function_call"):
        if m.get(k):  # OpenAI's fields, of an answer this server never gives
            raise bad_request(f"{param}.{k}", "is not supported by this server", code="unsupported_parameter")
    if not isinstance(m.get("annotations", []), (list, type(None))):
        raise bad_request(f"{param}.annotations", "must be a list or null")
    for k in ("name", "reasoning_content", "refusal"):  # accepted, not rendered: still a string (or null)
        if not isinstance(m.get(k, ""), (str, type(None))):
            raise bad_request(f"{param}.{k}", f"must be a string or null, got {type(m[k]).__name__}")
    content = m.get("content")
    if content is None and role == "assistant" and isinstance(m.get("refusal"), str):
        # OpenAI's answer to a refused request (content null, the refusal's words apart) sent back as history: what
        # the assistant said is its refusal
        return Message(role, _text(m["refusal"], f"{param}.refusal"))
    if isinstance(content, str):
        return Message(role, _text(content, f"{param}.content"))
    if not isinstance(content, list) or not content:
        more = " (an assistant message: or null beside a refusal string)" if role == "assistant" else ""
        raise bad_request(f"{param}.content", f"must be a string or a non-empty list of content parts{more}")
    texts, audio = [], None
    for j, part in enumerate(content):
        if role == "assistant" and isinstance(part, dict) and part.get("type") == "refusal":
            # an assistant's content parts are text or refusal parts (OpenAI's chat schema): both are its words
            _check_keys(part, ("type", "refusal"), f"{param}.content[{j}]")
            texts.append(_text(part.get("refusal"), f"{param}.content[{j}].refusal"))
            continue
        text, ref = _parse_part(part, f"{param}.content[{j}]")
        if ref is not None:
            if role != "user":
                raise bad_request(
                    f"{param}.content[{j}]", f"audio is only accepted in user messages, not {role}"
                )
            if audio is not None:
                raise bad_request(
                    f"{param}.content[{j}]", "one audio per message (send each song in its own user message)"
                )
            audio = ref
        texts.append(text)
    return Message(role, "".join(texts), audio)


def parse_chat_request(data: dict[str, Any], settings: ServeSettings) -> ChatRequest:
    """Check a chat-completions body against what this server implements (400/404 naming the field)."""
    for k, v in data.items():
        if k in FIELDS:
            continue
        if k in IGNORED_FIELDS:
            if v is not None and not isinstance(v, IGNORED_FIELDS[k]):
                raise bad_request(k, f"must be {_TYPE_NAMES[IGNORED_FIELDS[k]]}, got {type(v).__name__}")
            continue
        if k in OPENAI_PENALTIES:
            if v is not None and not (_is_number(v) and v == 0):  # (False == 0: a bool is not a number here)
                raise bad_request(
                    k,
                    f"{v!r:.60} is not supported by this server, only 0 (no penalty); repetition_penalty is (> 1: "
                    "fewer repeats, as vLLM's)",
                    # a value OpenAI takes ([-2, 2]) that this server does not implement, or no value at all
                    code="unsupported_parameter" if _is_number(v) and -2 <= v <= 2 else "invalid_value",
                )
            continue
        if k in NEUTRAL:
            if v is not None and not NEUTRAL[k](v):
                raise bad_request(
                    k, f"{v!r:.60} is not supported by this server", code="unsupported_parameter"
                )
            continue
        raise bad_request(k, "unknown field", code="unknown_parameter")

    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(
            "model",
            f"must be the served model's name ({settings.model_name!r})",
            code="missing_required_parameter" if model is None else "invalid_value",
        )
    if model != settings.model_name:
        raise APIError(
            404,
            f"model: {model!r} is not served here; use {settings.model_name!r}",
            "model",
            "model_not_found",
        )
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "messages",
            "must be a non-empty list of messages",
            code="missing_required_parameter" if messages is None else "invalid_value",
        )
    parsed = [_parse_message(m, i) for i, m in enumerate(messages)]
    for i, m in enumerate(parsed):
        if m.role == "system" and i > 0:
            raise bad_request(f"messages[{i}].role", "a system message must be the first message")
    if parsed[-1].role != "user":
        raise bad_request(f"messages[{len(parsed) - 1}].role", "the last message must be a user message")

    req = ChatRequest(parsed)
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream", f"must be true or false, got {stream!r}")
    req.stream = bool(stream)
    options = data.get("stream_options")
    if options is not None:
        if not req.stream:
            raise bad_request("stream_options", "is only allowed with stream=true")
        if not isinstance(options, dict):
            raise bad_request("stream_options", 'must be an object {"include_usage": true}')
        _check_keys(options, ("include_usage", "include_obfuscation"), "stream_options")
        # include_obfuscation: OpenAI pads its chunks against side channels; this server sends no padding either way
        for name in ("include_usage", "include_obfuscation"):
            v = options.get(name)
            if v is not None and not isinstance(v, bool):
                raise bad_request(f"stream_options.{name}", f"must be true or false, got {v!r}")
        req.include_usage = bool(options.get("include_usage"))

    for name in ("max_tokens", "max_completion_tokens"):
        v = data.get(name)
        if v is None:
            continue
        if _as_int(v) is None or v < 1:
            raise bad_request(name, f"must be an integer >= 1, got {v!r}")
        v = _as_int(v)
        if v > settings.max_completion_tokens:
            raise bad_request(name, f"{v} is over this server's limit of {settings.max_completion_tokens}")
        if req.max_tokens is not None and v != req.max_tokens:
            raise bad_request(name, "give max_tokens or max_completion_tokens, not both")
        req.max_tokens, req.max_tokens_param = v, name

    n = data.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):  # (true == 1)
        raise bad_request("n", f"only n=1 is supported, got {n!r}", code="unsupported_parameter")
    t = data.get("temperature")
    if t is not None and (not _is_number(t) or not (t == 0 or 0.01 <= t <= 2)):
        # 0 means greedy; below 0.01 the sampler's logits / temperature overflow (engine.SamplingParams)
        raise bad_request("temperature", f"must be 0 (greedy) or a number in [0.01, 2], got {t!r}")
    req.temperature = None if t is None else float(t)
    p = data.get("top_p")
    if p is not None and (not _is_number(p) or not 0 < p <= 1):
        raise bad_request("top_p", f"must be a number in (0, 1], got {p!r}")
    req.top_p = 1.0 if p is None else float(p)
    k = data.get("top_k")
    if k is not None and (_as_int(k) is None or k < -1):
        raise bad_request("top_k", f"must be an integer >= 0 (0 or -1: off), got {k!r}")
    req.top_k = 0 if k is None or k < 0 else _as_int(k)
    penalty = data.get("repetition_penalty")
    if penalty is not None and (not _is_number(penalty) or penalty <= 0):
        # engine.SamplingParams' range: a seen token's logit is divided by it (multiplied when negative)
        raise bad_request("repetition_penalty", f"must be a number > 0 (1: off), got {penalty!r}")
    req.repetition_penalty = 1.0 if penalty is None else float(penalty)
    seed = data.get("seed")
    if seed is not None and (_as_int(seed) is None or not -(2**63) <= seed < 2**64):
        raise bad_request("seed", f"must be a 64-bit integer, got {seed!r}")
    req.seed = None if seed is None else _as_int(seed)
    stop = data.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_request("stop", "must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        req.stop = list(stops)
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user", f"must be a string, got {type(user).__name__}")

    think, effort = data.get("think"), data.get("reasoning_effort")
    if think is not None and not isinstance(think, bool):
        raise bad_request("think", f"must be true or false, got {think!r}")
    # (a list or an object is not looked up: `in` raised TypeError, a 500)
    if effort is not None and (not isinstance(effort, str) or effort not in REASONING_EFFORT):
        raise bad_request("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORT)}, got {effort!r}")
    if think is not None and effort is not None and think != REASONING_EFFORT[effort]:
        raise bad_request("think", f"think={think} contradicts reasoning_effort={effort!r}")
    req.think = bool(think) if think is not None else REASONING_EFFORT.get(effort, False)
    return req


# ---------------------------------------------------------------------------------------------- preparing
def open_audio_ref(ref: AudioRef, settings: ServeSettings) -> Source:
    """Open one audio part: its bytes to a temporary file (or its file:// path), its header's length checked."""
    max_seconds = float(settings.max_audio_seconds or 0)
    if ref.url is not None:
        return open_url(ref.url, settings.audio_root, max_seconds, ref.param)
    return open_bytes(decode_base64(ref.data, ref.param), ref.format or "wav", max_seconds, ref.param)


def load_audio_ref(ref: AudioRef, settings: ServeSettings) -> Audio:
    """Decode one audio part (in a worker thread: it reads and resamples the whole song)."""
    source = open_audio_ref(ref, settings)
    try:
        return decode_source(source, float(settings.max_audio_seconds or 0))
    finally:
        source.close()


def prepare(
    req: ChatRequest,
    processor: MusicFlamingoProcessor,
    settings: ServeSettings,
    context: int,
    stop_ids: tuple[int, ...],
    stop_strings: Sequence[str] = (),
) -> Prepared:
    """Decode the audio, render and tokenize the chat as `infer.py` does (think mode: the last user message gets
    `chat.think_prompt`'s suffix, as `infer.py think=true`), check the token limits, and choose the sampling
    settings (greedy unless temperature > 0; the request's `stop`, else the server's `stop_strings`, which the
    engine matches on the answer's text). The limits are checked first with the audio's lengths by their
    headers, so a request that cannot fit is refused before its audio is decoded and featurised (seconds for a
    20-minute song)."""
    sources: dict[int, Source] = {}
    try:
        for i, m in enumerate(req.messages):
            if m.audio is not None:
                sources[i] = open_audio_ref(m.audio, settings)
        conv = _conversation(req, {i: s.path for i, s in sources.items()})
        headers = [sources[i] for i in sorted(sources)]
        counts = [processor.audio_token_count(processor.usable_samples(s.least_samples())) for s in headers]
        text = processor.render_chat(conv)
        ids = encode_expanded(
            processor.tokenizer, text, counts, processor.audio_token_ids, processor.audio_token
        )
        exact = all(s.exact for s in headers)
        _check_limits(len(ids), req, settings, context, "" if exact else "at least ")

        seconds, waves = 0.0, {}
        for i, source in sources.items():
            audio = decode_source(source, float(settings.max_audio_seconds or 0))
            source.close()
            seconds += audio.seconds
            waves[i] = audio.wave
    finally:
        for source in sources.values():
            source.close()
    try:
        inputs = processor.apply_chat_template([_conversation(req, waves)])
    except ValueError as e:  # e.g. an audio too short for one audio token
        raise bad_request("messages", str(e)) from None
    ids = inputs["input_ids"][0]
    n = int(ids.shape[0])
    max_new = _check_limits(n, req, settings, context)
    sample = req.temperature is not None and req.temperature > 0
    params = SamplingParams(
        max_new_tokens=max_new,
        do_sample=sample,
        temperature=req.temperature if sample else 1.0,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop_ids=stop_ids,
        stop_strings=tuple(stop_strings if req.stop is None else req.stop),
    )
    audio_tokens = int((ids == processor.audio_token_id).sum())
    return Prepared(
        ids,
        inputs.get("input_features"),
        inputs.get("input_features_mask"),
        params,
        n,
        audio_tokens,
        seconds,
    )


def _conversation(req: ChatRequest, audios: dict[int, Any]) -> list[dict[str, Any]]:
    """The request as the processor's conversation (`audios`: message index -> waveform, or anything standing for
    it when only rendered)."""
    conv: list[dict[str, Any]] = []
    last_user = max(i for i, m in enumerate(req.messages) if m.role == "user")
    for i, m in enumerate(req.messages):
        text = think_prompt(m.text) if req.think and i == last_user else m.text
        if m.role != "user":
            conv.append({"role": m.role, "content": text})
            continue
        content: list[dict[str, Any]] = []
        if i in audios:
            content.append({"type": "audio", "audio": audios[i]})
        conv.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
    return conv


def _check_limits(n: int, req: ChatRequest, settings: ServeSettings, context: int, at_least: str = "") -> int:
    """The new tokens a prompt of `n` tokens may take under the server's limits, or the 400 naming the limit it
    breaks (`at_least`: "at least " when `n` is a lower bound, by the audio's headers: every check only refuses
    more as `n` grows, so a lower bound refuses only what the exact count would)."""
    if n > settings.max_prompt_tokens:
        raise bad_request(
            "messages",
            f"the prompt is {at_least}{n} tokens (audio included), over this server's limit of "
            f"{settings.max_prompt_tokens}",
            code="context_length_exceeded",
        )
    room = context - n
    # positions one request may hold in the KV cache alone: a compiled engine keeps every slot's row
    cached, cached_name = settings.max_cached_tokens, f"max_cached_tokens of {settings.max_cached_tokens}"
    if cached is not None and settings.compile:
        cached //= settings.max_batch
        cached_name += f" over max_batch={settings.max_batch} compiled slots ({cached})"
    if cached is not None and n >= cached:  # the prompt's fault, whatever max_tokens says (was blamed on it)
        raise bad_request(
            "messages",
            f"the prompt is {at_least}{n} tokens (audio included), at or over this server's {cached_name}: no room "
            "for an answer",
            code="context_length_exceeded",
        )
    if req.max_tokens is None:
        # a default never goes past a limit a client could not pass either, nor makes a request unservable
        max_new = min(settings.default_max_tokens, settings.max_completion_tokens or room, room)
        if cached is not None:
            max_new = min(max_new, cached - n)
    elif req.max_tokens > room:
        raise bad_request(
            req.max_tokens_param,
            f"the prompt is {at_least}{n} tokens and the model's context is {context}, so at most {room} new "
            f"tokens fit, not {req.max_tokens}",
            code="context_length_exceeded",
        )
    else:
        max_new = req.max_tokens
    if max_new < 1:
        raise bad_request(
            "messages",
            f"the prompt fills the model's context of {context} tokens",
            code="context_length_exceeded",
        )
    if cached is not None and n + max_new > cached:
        raise bad_request(
            req.max_tokens_param if req.max_tokens is not None else "messages",
            f"the prompt ({at_least}{n} tokens) and max_tokens ({max_new}) need {at_least}{n + max_new} cached "
            f"tokens, over this server's {cached_name}",
            code="context_length_exceeded",
        )
    return max_new
