"""Review round 17, serve: every error carries a machine-readable `code` and the field as `param`; a stop id that
completes a stop string cuts the answer as that stop string does.

Clients (the OpenAI SDK's callers, LangChain-style retry layers, eval harnesses) branch on `error.code`: a message's
`tool_calls`, `audio` or `function_call`, a content part of OpenAI's that this server does not take (`image_url`), a
`tool` message and most value errors answered `code: null`, where `n: 2` or `logprobs: true` say
`unsupported_parameter`. `Engine._accept` (and `AnswerText.of_tokens`, used by infer.py and grpo) looked at stop ids
before stop strings, so with stop string `"\\n<|im_end|>"` and eos `<|im_end|>` an answer ended as a plain stop id and
kept the "\\n" the stop string should have cut.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from test_serve import (  # noqa: F401
    MODEL,
    QUESTION,
    _bad_requests,
    ckpt,
    loaded,
    server,
    songs,
    user_turn,
)
from tiny_assets import write_tiny_tokenizer

from musicflamingo.engine import AnswerText, Engine, SamplingParams, Slot
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import parse_chat_request
from musicflamingo.serve.settings import ServeSettings
from musicflamingo.tokenizer import load_tokenizer

SETTINGS = ServeSettings(model_name="m", max_completion_tokens=64, max_prompt_tokens=1000)
USER = {"role": "user", "content": "hi"}


def _error(body: dict) -> dict:
    with pytest.raises(APIError) as e:
        parse_chat_request(body, SETTINGS)
    assert e.value.status == 400
    return e.value.body()["error"]


# ---------------------------------------------------------------------------------------------- error codes
@pytest.mark.parametrize(
    "message, param, code",
    [
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
            "messages[0].tool_calls",
            "unsupported_parameter",
        ),
        (
            {"role": "assistant", "content": "x", "audio": {"id": "a1"}},
            "messages[0].audio",
            "unsupported_parameter",
        ),
        (
            {"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}},
            "messages[0].function_call",
            "unsupported_parameter",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
            },
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        ({"role": "user", "content": [{"type": "pictures"}]}, "messages[0].content[0].type", "invalid_value"),
        ({"role": "tool", "content": "42", "tool_call_id": "c"}, "messages[0].role", "unsupported_value"),
        (
            {"role": "user", "content": "hi", "tool_call_id": "c"},
            "messages[0].tool_call_id",
            "unknown_parameter",
        ),
    ],
)
def test_a_message_this_server_cannot_take_names_its_field_and_a_code(message, param, code):
    err = _error({"model": "m", "messages": [message, USER]})
    assert (err["param"], err["code"]) == (param, code), err


def test_missing_and_wrong_values_carry_codes():
    assert _error({"messages": [USER]})["code"] == "missing_required_parameter"
    assert _error({"model": "m"})["code"] == "missing_required_parameter"
    for field, value in (("temperature", 5), ("top_p", 0), ("stop", 3), ("stream", "yes"), ("model", 3)):
        err = _error({"model": "m", "messages": [USER], field: value})
        assert (err["param"], err["code"]) == (field, "invalid_value"), err


def test_every_bad_request_over_http_has_a_code_and_routing_errors_too(server, songs):  # noqa: F811
    for name, body, status, param, _ in _bad_requests(songs):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(
            f"{server}/v1/chat/completions", timeout=60, headers={"content-type": "application/json"}, **kw
        )
        err = r.json()["error"]
        assert r.status_code == status and err["param"] == param, (name, err)
        assert err["code"], f"case {name!r}: code is {err['code']!r}"
    malformed = httpx.post(f"{server}/v1/chat/completions", content=b"{", timeout=10).json()["error"]
    assert malformed["code"] == "invalid_json"
    # a form-encoded body (curl -d without -H) is named as such
    r = httpx.post(f"{server}/v1/chat/completions", data={"model": MODEL}, timeout=10)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_json", err
    assert "application/x-www-form-urlencoded" in err["message"] and "application/json" in err["message"]
    for method, path, status, code in (
        ("GET", "/v1/nothing", 404, "unknown_url"),
        ("POST", "/v1/completions", 404, "unknown_url"),
        ("GET", "/static/nothing.js", 404, "unknown_url"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ):
        r = httpx.request(method, f"{server}{path}", timeout=10)
        assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text
        assert r.json()["error"]["code"] == code, (method, path, r.json())
    assert "POST" in httpx.get(f"{server}/v1/chat/completions", timeout=10).headers["allow"]


# ---------------------------------------------------------------------------------------------- stop id + string
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _engine_answer(tok, ids: list[int], stop_ids: tuple[int, ...], stops: tuple[str, ...]) -> Slot:
    """The slot after the engine's own `_accept` took `ids` one by one (greedy: a one-hot row of logits each)."""
    params = SamplingParams(max_new_tokens=len(ids) + 5, stop_ids=stop_ids, stop_strings=stops)
    slot = Slot(0, params, None, text=AnswerText(tok, stops), budget=len(ids) + 5)
    engine = object.__new__(Engine)  # `_accept` reads nothing of the engine's: no model needed
    vocab = max(ids) + 1
    for t in ids:
        logits = torch.zeros(1, vocab)
        logits[0, t] = 1.0
        engine._accept([slot], logits)
        if slot.done:
            break
    return slot


@pytest.mark.parametrize(
    "text, stops, cut, stop",
    [
        (
            "4/4\n<|im_end|>",
            ("\n<|im_end|>",),
            "4/4",
            "\n<|im_end|>",
        ),  # the stop id completes the stop string
        ("4/4 <|im_end|>", ("\n<|im_end|>",), "4/4 ", None),  # it does not: a plain stop id, text kept
        (
            "4/4\n<|im_end|>",
            ("<|im_end|>",),
            "4/4\n",
            "<|im_end|>",
        ),  # the stop id's own text is a stop string
        ("4/4\n<|im_end|>", (), "4/4\n", None),
    ],
)
def test_a_stop_id_completing_a_stop_string_cuts_the_answer(tok, text, stops, cut, stop):
    eos = tok.token_to_id("<|im_end|>")
    ids = tok.encode(text)
    assert ids[-1] == eos
    slot = _engine_answer(tok, ids, (eos,), stops)
    assert slot.finish_reason == "stop" and slot.tokens == ids  # ends at that token, as the reference does
    assert (slot.text.text, slot.text.stop) == (cut, stop)
    answer = AnswerText.of_tokens(tok, ids + ids, stops, (eos,))  # infer.py's and grpo's rows
    assert (answer.text, answer.stop) == (cut, stop)
