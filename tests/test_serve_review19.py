"""Review round 19 of the server, walked as a researcher calling it from tools: the server's log and wrong routes.

Every answer is one INFO line under the `id` its client got (how it ended, tokens, times, prompt and audio), every
refusal one line with its status, code and message (the server's console was silent: a tool's 400 or 503 showed
nowhere on the server's side); a request to a route this server does not have names the routes it has, and a client
whose base URL lacks /v1 (it posts to /chat/completions) is told so; a port another server holds stops serve.py
before the weights load (it was found after them: minutes for the release).
"""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import openai
import pytest
from test_serve import MODEL, client, loaded, running_server, user_turn  # noqa: F401  (loaded: a fixture)
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.serve.app as serve_app
from musicflamingo.serve import ServeConfigError, ServeSettings, create_app
from musicflamingo.serve.app import serve

LOGGER = "musicflamingo.serve.app"


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("songs") / "tone.wav"
    write_audio(path, make_tone(440, 2.0))
    return path


@pytest.fixture(scope="module")
def server(loaded):  # noqa: F811
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=2)
    with running_server(create_app(model, processor, settings, stop_ids=())) as base:
        yield base


def _lines(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and words in r.getMessage()]


def _wait_for(caplog, words: str, timeout: float = 60.0) -> list[str]:
    """The log lines holding `words`, once there is one (a client's leaving is noticed after it left)."""
    deadline = time.monotonic() + timeout
    while not _lines(caplog, words) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _lines(caplog, words)


def test_a_wrong_route_names_the_routes_and_a_base_url_without_v1(server):
    """Was `POST /chat/completions: Not Found`, which told a client configured with base_url=http://HOST:PORT
    (the most common slip) nothing about what to change, and a tool speaking another API nothing either."""
    with pytest.raises(openai.NotFoundError) as e:  # the official client, base URL without /v1
        openai.OpenAI(base_url=server, api_key="x", max_retries=0).chat.completions.create(
            model=MODEL, messages=[user_turn("hi")], max_tokens=1
        )
    message = e.value.body["message"]
    assert "POST /v1/chat/completions" in message and "base URL is http://HOST:PORT/v1" in message, message
    for method, path, hint in (
        ("GET", "/models", True),
        ("POST", "/v1/v1/chat/completions", True),  # a tool that appends /v1 to a base URL that has it
        ("POST", "/v1/responses", False),  # another OpenAI API: the routes, no base-URL hint
        ("POST", "/api/chat", False),
    ):
        r = httpx.request(method, f"{server}{path}", json={}, timeout=10)
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "unknown_url", (path, err)
        assert err["message"].startswith(
            f"{method} {path}: Not Found; this server has POST /v1/chat/completions"
        )
        assert ("base URL is http://HOST:PORT/v1" in err["message"]) == hint, (path, err)
    # a static file the page does not have is no API route: no list of routes
    err = httpx.get(f"{server}/static/nothing.js", timeout=10).json()["error"]
    assert err["code"] == "unknown_url" and "this server has" not in err["message"], err


def test_every_answer_and_refusal_is_one_log_line(server, song, caplog):
    """An answer's line carries the `id` its client got, how it ended and its tokens; a refusal's line its status,
    code and message. Before, the server logged nothing for either at the default log_level=INFO."""
    c = client(server)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        plain = c.chat.completions.create(model=MODEL, messages=[user_turn("Key?", song)], max_tokens=3)
        chunks = list(
            c.chat.completions.create(
                model=MODEL,
                messages=[user_turn("Tempo?")],
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=[user_turn("x")], temperature=3)
        httpx.post(f"{server}/chat/completions", json={}, timeout=10)
        # a stream whose client leaves after its first chunk
        body = {"model": MODEL, "messages": [user_turn("Mood?")], "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
            first = json.loads(next(r.iter_lines()).removeprefix("data: "))
        left = _wait_for(caplog, first["id"])

    (line,) = _lines(caplog, plain.id)
    u = plain.usage
    assert f"{plain.id}: finish_reason length: 3 tokens in " in line, line
    assert (
        f"prompt {u.prompt_tokens} tokens, {u.prompt_tokens_details.audio_tokens} of them audio (2.0 s)"
        in line
    )
    assert "streamed" not in line
    usage = chunks[-1].usage
    (line,) = _lines(caplog, chunks[0].id)
    assert f"finish_reason length: {usage.completion_tokens} tokens" in line and line.endswith(
        ", streamed"
    ), line
    assert f"prompt {usage.prompt_tokens} tokens, streamed" in line, line  # no audio: none named
    (line,) = _lines(caplog, "temperature")
    assert line.startswith("POST /v1/chat/completions: 400 invalid_value: temperature: must be"), line
    (line,) = _lines(caplog, "/chat/completions: Not Found")
    assert line.startswith("404 unknown_url: POST /chat/completions"), line
    assert len(left) == 1 and f"{first['id']}: the client left: " in left[0] and "streamed" in left[0], left


def test_an_engine_failure_is_logged_once_under_its_answer(loaded, caplog):  # noqa: F811
    """A request the engine fails is the answer's own line (its id, status, code and message), not that line and
    the error handler's copy of it."""
    model, processor = loaded

    def failing(*args, **kwargs):
        raise RuntimeError("simulated")

    app = create_app(model, processor, ServeSettings(model_name=MODEL, max_batch=1), stop_ids=())
    model.forward = failing
    try:
        with running_server(app) as base, caplog.at_level(logging.INFO, logger=LOGGER):
            with pytest.raises(openai.InternalServerError):
                client(base).chat.completions.create(model=MODEL, messages=[user_turn("hi")], max_tokens=2)
    finally:
        del model.forward  # the instance attribute: the class's forward again
    lines = _lines(caplog, "engine_error")
    assert len(lines) == 1 and lines[0].startswith("chatcmpl-"), lines
    assert (
        ": 500 engine_error: generation failed: the engine failed: RuntimeError: simulated: 0 tokens"
        in lines[0]
    )


def test_a_port_in_use_stops_serve_before_the_weights_load(ckpt, monkeypatch):
    """uvicorn found the port taken only once the weights were loaded, then logged it and exited."""

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(serve_app, "load_model", no_weights)
    with socket.socket() as taken:  # another server on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "localhost"):
            with pytest.raises(ServeConfigError) as e:
                serve({"ckpt": str(ckpt), "device": "cpu", "host": host, "port": port})
            message = str(e.value)
            assert message.startswith(f"host={host} port={port}: cannot listen on 127.0.0.1:{port}: "), (
                message
            )
            assert "another server listens there" in message and "port=" in message, message
    with pytest.raises(
        AssertionError, match="the weights were read"
    ):  # the port free again: on to the weights
        serve({"ckpt": str(ckpt), "device": "cpu", "port": port})


def test_cors_origins_let_pages_of_those_origins_call_the_api(loaded, server):  # noqa: F811
    """A browser tool on another origin (a notebook front end, a labelling page on localhost:3000) could not call
    the API: its preflight was a 405 and no answer allowed its origin. `cors_origins` lets the named pages in, and
    only them; the default (unset) stays as it was."""
    model, processor = loaded
    page = "http://localhost:3000"
    preflight = {
        "Access-Control-Request-Method": "POST",
        # the openai JS client's own headers ride along with the key
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    body = {"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 1}
    settings = ServeSettings(model_name=MODEL, max_batch=1, api_key="k", cors_origins=[page])
    with running_server(create_app(model, processor, settings, stop_ids=())) as base:
        url = f"{base}/v1/chat/completions"
        r = httpx.options(url, headers={"Origin": page, **preflight}, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page, r.headers
        assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower(), r.headers
        key = {"Origin": page, "Authorization": "Bearer k"}
        ok = httpx.post(url, json=body, headers=key, timeout=60)
        bad = httpx.post(url, json={**body, "temperature": 3}, headers=key, timeout=60)
        assert ok.status_code == 200 and bad.status_code == 400, (ok.text, bad.text)
        assert ok.headers["access-control-allow-origin"] == bad.headers["access-control-allow-origin"] == page
        other = httpx.options(url, headers={"Origin": "http://elsewhere.test", **preflight}, timeout=10)
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers, other.headers
    r = httpx.options(f"{server}/v1/chat/completions", headers={"Origin": page, **preflight}, timeout=10)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Origin": page}, timeout=60)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(
    "value, words",
    [
        (
            ["http://localhost:3000/"],
            "no path, no trailing slash",
        ),  # never equal to a browser's Origin header
        (["localhost:3000"], "is not an origin"),
        ([], "must be a list of origins"),
        (5, "must be a list of origins"),
    ],
)
def test_a_cors_origin_no_browser_sends_is_refused_by_name(value, words):
    with pytest.raises(ServeConfigError, match=words) as e:
        ServeSettings(cors_origins=value)
    assert str(e.value).startswith("cors_origins")
    assert ServeSettings(cors_origins="*").cors_origins == ["*"]


def test_any_origin_without_a_key_is_warned(ckpt, caplog):
    from musicflamingo.serve import build_server

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_server({"ckpt": str(ckpt), "device": "cpu", "cors_origins": ["*"], "api_key": "k"})
        assert not _lines(caplog, "cors_origins")
        build_server({"ckpt": str(ckpt), "device": "cpu", "cors_origins": ["*"]})
    (line,) = _lines(caplog, "cors_origins='*' without an API key")
    assert "any web page" in line, line
