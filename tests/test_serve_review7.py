"""Review round 7 of the server: what OpenAI's clients send and expect, beyond the requests of tests/test_serve.py.

Fields the current `openai` client exposes (`safety_identifier`, `prompt_cache_key`, `verbosity`,
`stream_options.include_obfuscation`, `reasoning_effort="xhigh"`): accepted as docs/serving.md says, or refused
naming the field.
"""

from __future__ import annotations

import openai
import pytest
from test_serve import MODEL, client, loaded, running_server  # noqa: F401  (loaded: a fixture)
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo.serve import ServeSettings, create_app
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import parse_chat_request


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


SETTINGS = ServeSettings(model_name=MODEL, max_completion_tokens=512, max_prompt_tokens=1000)
HI = [{"role": "user", "content": "hi"}]


def parse(**fields):
    return parse_chat_request({"model": MODEL, "messages": HI, **fields}, SETTINGS)


def test_fields_of_the_current_openai_client_are_accepted_as_documented():
    """The openai client's newer fields were 400 'unknown field', although the docs accept every OpenAI field at
    its neutral value: the identifiers that replace `user` and the cache hints are ignored, `verbosity` is
    accepted at OpenAI's default, `stream_options.include_obfuscation` (no padding is sent anyway) either way,
    and `reasoning_effort` xhigh/max think as high does."""
    parse(safety_identifier="u-1", prompt_cache_key="songs", prompt_cache_retention="24h")
    parse(prompt_cache_options={"mode": "implicit"}, verbosity="medium", moderation=None)
    req = parse(stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    assert req.include_usage
    assert not parse(stream=True, stream_options={"include_obfuscation": True}).include_usage
    assert parse(reasoning_effort="xhigh").think and parse(reasoning_effort="max").think
    assert not parse(reasoning_effort="minimal").think
    # still refused with the field named: values this server cannot honour, and wrong types
    for fields, param in (
        ({"verbosity": "low"}, "verbosity"),
        ({"moderation": {"model": "m"}}, "moderation"),
        ({"safety_identifier": 5}, "safety_identifier"),
        ({"prompt_cache_key": ["k"]}, "prompt_cache_key"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": "no"}},
            "stream_options.include_obfuscation",
        ),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ):
        with pytest.raises(APIError) as e:
            parse(**fields)
        assert e.value.status == 400 and e.value.param == param, (fields, e.value.message)


def test_openai_client_with_its_newer_fields_gets_an_answer(loaded):  # noqa: F811
    model, processor = loaded
    app = create_app(model, processor, ServeSettings(model_name=MODEL, max_batch=2), stop_ids=())
    with running_server(app) as base:
        c = client(base)
        plain = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
        r = c.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=5,
            safety_identifier="u-1",
            prompt_cache_key="k",
            verbosity="medium",
        )
        assert r.choices[0].message.content == plain.choices[0].message.content
        chunks = list(
            c.chat.completions.create(
                model=MODEL,
                messages=HI,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True, "include_obfuscation": False},
            )
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
            plain.choices[0].message.content
        )
        assert chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, verbosity="high")
