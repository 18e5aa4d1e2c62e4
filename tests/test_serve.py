"""serve.py / musicflamingo.serve: the OpenAI client against a live loopback server on a tiny checkpoint.

Answers equal `infer.py`'s; every bad request is a 4xx with an OpenAI-style body naming the field, and the server
keeps serving; the queue bound (503 + Retry-After), a disconnecting client, stop strings, think mode, the API
key, the config and the command line. The helpers here (`running_server`, `audio_part`) serve the other
tests/test_serve_*.py files too.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from hydra import compose, initialize_config_dir
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.chat import conversation, think_prompt
from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import generate_answers, infer
from musicflamingo.reasoning import parse_think
from musicflamingo.serve import ServeConfigError, ServeSettings, build_server, create_app
from musicflamingo.serve.audio import sniff
from musicflamingo.serve.text import AnswerStream, ThinkFormat, ThinkSplitter
from musicflamingo.tokenizer import IncrementalDecoder

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
QUESTION = "What is the tempo, and the key?"


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def running_server(app, timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def audio_part(path: Path) -> dict:
    """An `input_audio` content part carrying the file's bytes."""
    fmt = path.suffix.lstrip(".")
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": fmt},
    }


def user_turn(text: str, audio: Path | None = None, part: dict | None = None) -> dict:
    parts = [part] if part is not None else ([audio_part(audio)] if audio is not None else [])
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def stream_text(c: openai.OpenAI, **kw) -> tuple[str, str | None, list]:
    """(content, finish_reason, chunks) of a streamed completion."""
    chunks = list(c.chat.completions.create(model=MODEL, stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    return text, (finish[-1] if finish else None), chunks


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("serve", overrides=["device=cpu", *overrides])


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    """audio_root: two songs inside, and `outside/` next to it."""
    d = tmp_path_factory.mktemp("audio")
    write_audio(d / "songs" / "tone_a.wav", make_tone(440, 1.0))
    write_audio(d / "songs" / "tone_b.flac", make_tone(220, 1.7))
    write_audio(d / "outside" / "secret.wav", make_tone(330, 1.0))
    write_audio(d / "long.wav", make_tone(330, 4.0))
    return d


@pytest.fixture(scope="module")
def loaded(ckpt):
    model = MusicFlamingo.from_pretrained(ckpt, dtype=torch.float32, device="cpu").eval()
    return model, MusicFlamingoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(loaded, ckpt, songs) -> Iterator[str]:
    model, processor = loaded
    settings = ServeSettings(
        model_name=MODEL,
        max_batch=4,
        audio_root=str(songs / "songs"),
        max_audio_seconds=3.0,
        max_completion_tokens=512,
        max_prompt_tokens=1000,
        max_cached_tokens=800,
    )
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config))
    with running_server(app) as base:
        yield base


def expect_error(r: httpx.Response, status: int, param: str | None, words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert words in err["message"], err
    assert "\n" not in err["message"]
    return err


# ---------------------------------------------------------------------------------------------- answers
def test_openai_client_gets_the_text_infer_prints(server, ckpt, songs, capsys):
    """Non-streaming and streaming answers through the official client equal `infer.py`'s, for a wav and a
    flac; usage counts the prompt (audio included), the audio tokens and the generated tokens."""
    files = [songs / "songs" / "tone_a.wav", songs / "songs" / "tone_b.flac"]
    overrides = [
        f"ckpt={ckpt}",
        f"audio=[{files[0]},{files[1]}]",
        f"prompt='{QUESTION}'",
        "max_new_tokens=12",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        expected = infer(compose("infer", overrides=["device=cpu", "stream=false", *overrides]))
    capsys.readouterr()
    assert all(expected)
    c = client(server)
    for f, want in zip(files, expected):
        r = c.chat.completions.create(model=MODEL, messages=[user_turn(QUESTION, f)], max_tokens=12)
        assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.content == want
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        u = r.usage
        assert (
            u.prompt_tokens_details.audio_tokens > 10
            and u.prompt_tokens > u.prompt_tokens_details.audio_tokens
        )
        assert 1 <= u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens

        text, finish, chunks = stream_text(
            c,
            messages=[user_turn(QUESTION, f)],
            max_completion_tokens=12,
            stream_options={"include_usage": True},
        )
        assert text == want and finish == r.choices[0].finish_reason
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
        assert chunks[-1].usage.prompt_tokens == u.prompt_tokens


def test_sse_wire_format_ends_with_done(server, songs):
    body = {
        "model": MODEL,
        "messages": [user_turn(QUESTION, songs / "songs" / "tone_a.wav")],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    assert '"finish_reason": "length"' in events[-2] or '"finish_reason": "stop"' in events[-2]


def test_audio_urls_data_and_file_inside_audio_root(server, songs):
    """A data: URL and a file:// path under audio_root give the input_audio answer; a path outside it (also
    through a symlink or ..) is refused with 403."""
    wav = songs / "songs" / "tone_a.wav"
    c = client(server)
    want = c.chat.completions.create(model=MODEL, messages=[user_turn(QUESTION, wav)], max_tokens=8)
    data_url = "data:audio/wav;base64," + base64.b64encode(wav.read_bytes()).decode()
    for part in (
        {"type": "audio_url", "audio_url": {"url": data_url}},
        {"type": "audio_url", "audio_url": wav.as_uri()},
    ):
        got = c.chat.completions.create(model=MODEL, messages=[user_turn(QUESTION, part=part)], max_tokens=8)
        assert got.choices[0].message.content == want.choices[0].message.content
    link = songs / "songs" / "link.wav"
    if not link.exists():
        link.symlink_to(songs / "outside" / "secret.wav")
    for url in (
        (songs / "outside" / "secret.wav").as_uri(),
        link.as_uri(),
        f"file://{songs}/songs/../outside/secret.wav",
    ):
        body = {
            "model": MODEL,
            "messages": [user_turn("x", part={"type": "audio_url", "audio_url": {"url": url}})],
        }
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        err = expect_error(r, 403, "messages[0].content[0].audio_url.url", "outside the server's audio_root")
        assert err["type"] == "permission_error"


def _bad_requests(songs: Path) -> list[tuple[str, object, int, str | None, str]]:
    wav = songs / "songs" / "tone_a.wav"
    good = {"model": MODEL, "messages": [user_turn(QUESTION, wav)], "max_tokens": 4}
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    short_wav = write_audio(songs / "short.wav", make_tone(440, 100 / 16000)).read_bytes()
    part = "messages[0].content[0]"

    def with_part(p: dict) -> dict:
        return {**good, "messages": [user_turn(QUESTION, part=p)]}

    def b64(raw: bytes, fmt: str = "wav") -> dict:
        return with_part(
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}
        )

    return [
        ("malformed JSON", b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, None, "must be a JSON object"),
        ("unknown field", {**good, "temprature": 0.5}, 400, "temprature", "unknown field"),
        (
            "unknown part field",
            with_part({**audio_part(wav), "detail": "x"}),
            400,
            f"{part}.detail",
            "unknown field",
        ),
        (
            "bad base64",
            with_part({"type": "input_audio", "input_audio": {"data": "bm90!!", "format": "wav"}}),
            400,
            f"{part}.input_audio.data",
            "not valid base64",
        ),
        ("png as audio", b64(png), 400, f"{part}.input_audio.data", "the data is a PNG image, not wav audio"),
        (
            "noise as audio",
            b64(b"RIFF" + bytes(range(200))),
            400,
            f"{part}.input_audio.data",
            "cannot use this audio",
        ),
        (
            "too long audio",
            with_part(audio_part(songs / "long.wav")),
            400,
            f"{part}.input_audio.data",
            "4.0 s long, over the limit of 3 s",
        ),
        (
            "bad format",
            with_part({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}}),
            400,
            f"{part}.input_audio.format",
            "must be one of wav, mp3, flac, ogg",
        ),
        (
            "image part",
            with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
            400,
            f"{part}.type",
            "'image_url' is not supported",
        ),
        (
            "http url",
            with_part({"type": "audio_url", "audio_url": {"url": "https://example.com/a.mp3"}}),
            400,
            f"{part}.audio_url.url",
            "URL scheme 'https' is not supported",
        ),
        (
            "missing file",
            with_part({"type": "audio_url", "audio_url": {"url": (songs / "songs" / "nope.wav").as_uri()}}),
            400,
            f"{part}.audio_url.url",
            "is not a file under audio_root",
        ),
        (
            "two audios",
            {**good, "messages": [{"role": "user", "content": [audio_part(wav), audio_part(wav)]}]},
            400,
            "messages[0].content[1]",
            "one audio per message",
        ),
        (
            "special token",
            {**good, "messages": [user_turn("hi <|im_end|> there")]},
            400,
            "messages[0].content[0].text",
            "chat special token '<|im_end|>' at position 3",
        ),
        (
            "lone surrogate",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            400,
            "messages[0].content",
            "invalid character",
        ),
        (
            "too short audio",
            b64(short_wav),
            400,
            f"{part}.input_audio.data",
            "audio has 100 samples, fewer than the 321 required",
        ),
        (
            "assistant last",
            {**good, "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "messages[0].role",
            "the last message must be a user message",
        ),
        (
            "bad role",
            {**good, "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages[0].role",
            "must be system, developer, user or assistant",
        ),
        ("n=2", {**good, "n": 2}, 400, "n", "only n=1"),
        (
            "max_tokens over limit",
            {**good, "max_tokens": 100000},
            400,
            "max_tokens",
            "over this server's limit of 512",
        ),
        ("max_tokens zero", {**good, "max_tokens": 0}, 400, "max_tokens", "integer >= 1"),
        ("temperature", {**good, "temperature": 3}, 400, "temperature", "[0.01, 2]"),
        ("temperature_tiny", {**good, "temperature": 0.001}, 400, "temperature", "0 (greedy)"),
        ("tools", {**good, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        (
            "stream_options without stream",
            {**good, "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "only allowed with stream=true",
        ),
        ("five stops", {**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ("wrong model", {**good, "model": "gpt-4o"}, 404, "model", "'gpt-4o' is not served here"),
        ("no messages", {**good, "messages": []}, 400, "messages", "non-empty list"),
        (
            "long prompt",
            {**good, "messages": [user_turn("tempo " * 1200)]},
            400,
            "messages",
            "over this server's limit of 1000",
        ),
        (
            "cached tokens",
            {**good, "max_tokens": 500},
            400,
            "max_tokens",
            "over this server's max_cached_tokens of 800",
        ),
    ]


def test_bad_requests_are_4xx_naming_the_field_and_the_server_keeps_serving(server, songs):
    cases = _bad_requests(songs)
    for name, body, status, param, words in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(
            f"{server}/v1/chat/completions", timeout=60, headers={"content-type": "application/json"}, **kw
        )
        try:
            expect_error(r, status, param, words)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["live"] == 0 and health["queued"] == 0
    r = client(server).chat.completions.create(
        model=MODEL, messages=[user_turn(QUESTION, songs / "songs" / "tone_a.wav")], max_tokens=3
    )
    assert r.usage.completion_tokens >= 1
    # Unknown routes and methods answer in the same error shape.
    expect_error(httpx.get(f"{server}/v1/nothing", timeout=10), 404, None, "Not Found")
    expect_error(httpx.get(f"{server}/v1/chat/completions", timeout=10), 405, None, "Method Not Allowed")


def test_models_health_and_page(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other")
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["slots"] == 4 and health["auth"] is False
    page = httpx.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for src in ("/static/app.js", "/static/style.css"):
        assert src in page.text and httpx.get(server + src, timeout=10).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_multi_turn_equals_the_engine_on_the_same_conversation(server, loaded, songs):
    """A follow-up re-sends the conversation (the server keeps none); the answer is the one-slot engine's on
    the same three messages."""
    wav = songs / "songs" / "tone_b.flac"
    c = client(server)
    first = c.chat.completions.create(model=MODEL, messages=[user_turn(QUESTION, wav)], max_tokens=6)
    history = [
        user_turn(QUESTION, wav),
        {"role": "assistant", "content": first.choices[0].message.content},
        user_turn("And the instruments?"),
    ]
    second = c.chat.completions.create(model=MODEL, messages=history, max_tokens=6)
    model, processor = loaded
    conv = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": str(wav)}, {"type": "text", "text": QUESTION}],
        },
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": [{"type": "text", "text": "And the instruments?"}]},
    ]
    params = SamplingParams(max_new_tokens=6, stop_ids=(model.config.text.eos_token_id,))
    (want,) = generate_answers(model, processor, [conv], ["x"], params, slots=1)
    assert second.choices[0].message.content == want
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # the SDK's own message sent back as it dumps it (annotations, refusal, audio, ... all null): the same answer
    dumped = first.choices[0].message.model_dump()
    assert "annotations" in dumped
    again = c.chat.completions.create(model=MODEL, messages=[history[0], dumped, history[2]], max_tokens=6)
    assert again.choices[0].message.content == want


def test_sampling_is_seeded_and_system_prompt_counts(server, songs):
    c = client(server)
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    a, b = (
        c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=8, temperature=0.9, top_p=0.9, seed=7
        )
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    greedy = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)
    system = c.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief."}, *msgs], max_tokens=8
    )
    assert system.usage.prompt_tokens != greedy.usage.prompt_tokens  # the default system prompt was replaced


def test_stop_strings_cut_the_answer(server, songs):
    c = client(server)
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = full[: full.find(stop)]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, stop=[stop, "never-there"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    text, finish, _ = stream_text(c, messages=msgs, max_tokens=24, stop=stop)
    assert text == cut and finish == "stop"


THINK_TEXTS = (
    "<think>The bass walks\nin fifths.</think>\n\n<answer>A minor, 96 BPM.</answer>",
    "\n<think>\nslow\n</think>\n\n<answer> 60 BPM </answer>\n",
    "  120 BPM \n",  # no tags: all answer
    "<answer>x</answer>",  # no thinking
    "<think>a</think>C major",  # no answer tags: what follows </think>
    "<think>a</think><answer>C maj",  # cut by max_tokens
    "<think>still thinking",  # never answered
    "<think>a<answer>x</answer>",  # no </think>
    "<think>a</think><answer>x</answer> and more",  # text after the answer is dropped
    "<thin king",  # a piece of a tag that is not one
)


@pytest.mark.parametrize("text", THINK_TEXTS)
def test_think_split_streams_what_parse_think_gives(text):
    """Split into pieces of any size (so tags and whitespace fall across boundaries), the streamed reasoning and
    answer are `reasoning.parse_think`'s thinking and answer, and no piece of a tag is shown."""
    want = parse_think(text)
    for size in (1, 2, 3, 5, len(text)):
        sp = ThinkSplitter()
        parts = [sp.push(text[i : i + size]) for i in range(0, len(text), size)] + [sp.flush()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (want.thinking, want.answer), (
            size
        )
        assert not any("<" in r + c and not text.startswith("<thin ") for r, c in parts)


def test_answer_stream_splits_tokens_and_counts_reasoning(loaded):
    tok = loaded[1].tokenizer
    text = THINK_TEXTS[0]
    ids = tok.encode(text) + [299]  # <|im_end|> ends it
    # each token's text, as the engine's `Slot.text` grows (the worker's events)
    decoder = IncrementalDecoder(tok)
    pieces = [(i, "" if i == 299 else decoder.push(i)) for i in ids]
    stream = AnswerStream(stop_ids=(299,), think=ThinkFormat())
    pushed = [stream.push([i], t) for i, t in pieces] + [stream.finish()]
    assert "".join(r for r, _ in pushed) == "The bass walks\nin fifths."
    assert "".join(c for _, c in pushed) == "A minor, 96 BPM."
    assert stream.completion_tokens == len(ids)
    assert len(tok.encode("<think>The bass walks\nin fifths.")) < stream.reasoning_tokens
    assert stream.reasoning_tokens <= len(tok.encode("<think>The bass walks\nin fifths.</think>"))
    plain = AnswerStream(stop_ids=(299,))
    assert (
        "".join(plain.push([i], t)[1] for i, t in pieces) + plain.finish()[1] == text
        and plain.reasoning_tokens == 0
    )


def test_think_mode_prompts_as_infer_and_returns_reasoning_apart(server, songs, loaded):
    """think=true (or reasoning_effort) renders the prompt `infer.py think=true` renders (chat.think_prompt)
    and answers with a reasoning_content field; the tiny model writes no tags, so its text is all answer."""
    c = client(server)
    wav = songs / "songs" / "tone_a.wav"
    msgs = [user_turn(QUESTION, wav)]
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    think = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, extra_body={"think": True})
    effort = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, reasoning_effort="high")
    want = loaded[1].apply_chat_template([conversation(think_prompt(QUESTION), str(wav))])["input_ids"]
    assert think.usage.prompt_tokens == want.shape[1] > plain.usage.prompt_tokens
    assert think.choices[0].message.reasoning_content == ""
    assert think.choices[0].message.content == effort.choices[0].message.content
    assert (
        think.choices[0].message.content and "reasoning_content" not in plain.choices[0].message.model_dump()
    )
    text, _, chunks = stream_text(c, messages=msgs, max_tokens=6, extra_body={"think": True})
    assert text == think.choices[0].message.content


# ---------------------------------------------------------------------------------------------- limits
def test_api_key_and_body_limit(loaded, ckpt, songs, monkeypatch):
    """With a key (here from the environment), /v1 answers 401 without it or with a wrong one; the page and
    /health need none. A body over max_body_mb is 413."""
    model, processor = loaded
    monkeypatch.setenv("MUSICFLAMINGO_API_KEY", "s3cret")
    settings = ServeSettings.from_cfg({"model_name": MODEL, "max_batch": 1, "max_body_mb": 0.01})
    assert settings.api_key == "s3cret"
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config))
    wav = songs / "songs" / "tone_a.wav"
    with running_server(app) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL}, headers=headers, timeout=30)
            err = expect_error(r, 401, None, "missing or wrong API key")
            assert err["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, "nope").models.list()
        assert httpx.get(f"{base}/health", timeout=10).json()["auth"] is True
        assert httpx.get(f"{base}/", timeout=10).status_code == 200
        r = client(base, "s3cret").chat.completions.create(
            model=MODEL, messages=[user_turn("hi")], max_tokens=2
        )
        assert r.usage.completion_tokens >= 1
        body = {"model": MODEL, "messages": [user_turn(QUESTION, wav)]}  # 32 kB of wav > 10 kB
        r = httpx.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30
        )
        expect_error(r, 413, None, "over this server's limit of 0.01 MiB (max_body_mb)")
        # file:// is refused outright on a server without audio_root
        part = {"type": "audio_url", "audio_url": {"url": wav.as_uri()}}
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": MODEL, "messages": [user_turn("x", part=part)]},
            headers={"Authorization": "Bearer s3cret"},
            timeout=30,
        )
        expect_error(r, 403, "messages[0].content[0].audio_url.url", "file:// URLs are turned off")


def _gate(worker) -> threading.Event:
    """Hold the worker before each decode step until the returned event is set."""
    gate = threading.Event()
    step = worker.engine.step

    def held_step():
        gate.wait(60)
        return step()

    worker.engine.step = held_step
    return gate


def test_full_queue_is_503_with_retry_after(loaded, ckpt, songs):
    """One slot, a queue of one: a third concurrent request is refused with 503 and Retry-After, the first two
    complete once the engine moves on."""
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=1, max_queue=1, retry_after_s=3)
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config))
    worker = app.state.server.worker
    gate = _gate(worker)
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    results = {}
    with running_server(app) as base:
        c = client(base)

        def ask(i: int) -> None:
            results[i] = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        threads[0].start()
        _wait(lambda: worker.stats()["live"] == 1)
        threads[1].start()
        _wait(lambda: worker.stats()["queued"] == 1)
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": msgs}, timeout=30)
        expect_error(r, 503, None, "the server is busy")
        assert r.headers["retry-after"] == "3"
        gate.set()
        for t in threads:
            t.join(60)
    assert results[0].choices[0].message.content == results[1].choices[0].message.content


def test_requests_still_being_prepared_count_against_max_queue(loaded, ckpt, songs, monkeypatch):
    """A request whose audio is being decoded (or waits for a prepare thread) holds its body and features too:
    with one free slot, max_queue=1 and two such requests, the next is 503 at once (it used to pass and wait,
    unbounded)."""
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=1, max_queue=1, prepare_threads=1, retry_after_s=2)
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config))
    entered, release = threading.Event(), threading.Event()
    template = processor.apply_chat_template

    def slow_template(*args, **kwargs):
        entered.set()
        release.wait(30)
        return template(*args, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", slow_template)
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    results = {}
    with running_server(app) as base:
        c = client(base)
        first = threading.Thread(
            target=lambda: results.update(
                a=c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
            )
        )
        second = threading.Thread(
            target=lambda: results.update(
                b=c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
            )
        )
        first.start()
        assert entered.wait(30) and app.state.server.worker.stats()["queued"] == 0  # in prepare, not queued
        second.start()  # takes the free slot's place: it waits for the prepare thread
        _wait(lambda: app.state.server.preparing == 2)
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": msgs}, timeout=30)
        expect_error(r, 503, None, "the server is busy")
        release.set()
        first.join(60)
        second.join(60)
    assert results["a"].choices[0].finish_reason == "length" and app.state.server.preparing == 0
    assert results["b"].choices[0].finish_reason == "length"


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_disconnected_client_frees_its_slot(loaded, ckpt, songs):
    """A streaming client that goes away after its first chunk: its slot is released within a few steps, far
    before its max_tokens; the server then answers the next request."""
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=2)
    app = create_app(model, processor, settings, ())  # no stop ids: only max_tokens or a disconnect end it
    worker = app.state.server.worker
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    with running_server(app) as base:
        body = {"model": MODEL, "messages": msgs, "max_tokens": 4000, "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        _wait(lambda: worker.stats()["live"] == 0)
        assert worker.stats()["tokens"] < 200  # of 4000 (~4 s of decoding)
        # A non-streaming client that gives up while its request waits (the engine held between steps).
        gate = _gate(worker)
        before = worker.stats()["tokens"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
        gate.set()
        _wait(lambda: worker.stats()["live"] == 0 and worker.stats()["queued"] == 0)
        assert worker.stats()["tokens"] - before < 100
        r = client(base).chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
        assert r.usage.completion_tokens == 3


# ---------------------------------------------------------------------------------------------- settings and CLI
def test_sniff_names_common_non_audio():
    assert sniff(b"\x89PNG\r\n\x1a\n") == "a PNG image"
    assert sniff(b"%PDF-1.7") == "a PDF document"
    assert sniff(b"\x00\x00\x00\x20ftypM4A ").startswith("MP4/M4A")
    for audio in (b"RIFF\x00\x00\x00\x00WAVE", b"fLaC", b"OggS", b"ID3\x04", b"\xff\xfb\x90\x00"):
        assert sniff(audio) is None


def test_serve_config_composes_and_builds_the_app(ckpt, songs):
    cfg = make_cfg(f"ckpt={ckpt}", "max_batch=3", f"audio_root={songs / 'songs'}", "max_cached_tokens=4096")
    app, settings = build_server(cfg)
    state = app.state.server
    assert settings.model_name == "tiny"  # the folder's name
    assert settings.host == "127.0.0.1" and settings.loopback and settings.api_key is None
    assert len(state.worker.engine.slots) == 3 and state.worker.max_cached_tokens == 4096
    assert settings.max_audio_seconds == 1200 and settings.max_prompt_tokens == state.context - 1
    bad = {
        "max_batch=0": "max_batch must be an integer >= 1",
        "port=70000": "port must be an integer in 0..65535",
        f"audio_root={songs / 'nope'}": "is not a folder",
        "max_body_mb=-1": "max_body_mb must be a number > 0",
        "max_body_mb=nan": "max_body_mb must be a number > 0",  # nan passed `<= 0`: every request then failed
        "max_audio_seconds=nan": "max_audio_seconds must be a number > 0",  # ... or turned the check off
    }
    for override, message in bad.items():
        with pytest.raises(ServeConfigError, match=message):
            build_server(make_cfg(f"ckpt={ckpt}", override))
    with pytest.raises(ServeConfigError, match="max_audio_seconds=5000 is over the model's limit of 1200"):
        build_server(make_cfg(f"ckpt={ckpt}", "max_audio_seconds=5000"))
    assert not ServeSettings(host="0.0.0.0").loopback and ServeSettings(host="::1").loopback


def test_default_max_tokens_keeps_to_the_servers_limits(loaded):
    """Without max_tokens the default is cut to max_completion_tokens (a client could not ask for more), and a
    prompt that leaves no room under max_cached_tokens is refused naming that limit, not the model's context."""
    from musicflamingo.serve.errors import APIError
    from musicflamingo.serve.protocol import parse_chat_request, prepare

    _, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_completion_tokens=512, max_cached_tokens=800)
    settings.resolve(32768, processor.max_audio_len)
    assert settings.default_max_tokens == 1024

    def prepared(text: str):
        req = parse_chat_request({"model": MODEL, "messages": [{"role": "user", "content": text}]}, settings)
        return prepare(req, processor, settings, 32768, (299,))

    p = prepared(QUESTION)
    assert p.params.max_new_tokens == min(512, 800 - p.prompt_tokens)
    settings.max_cached_tokens = None
    assert prepared(QUESTION).params.max_new_tokens == 512
    settings.max_cached_tokens = 800
    with pytest.raises(APIError) as e:
        prepared("tempo " * 160)
    assert e.value.status == 400 and e.value.body()["error"]["code"] == "context_length_exceeded"
    assert "at or over this server's max_cached_tokens of 800" in e.value.body()["error"]["message"]


def test_a_failed_prefill_answers_that_request_and_spares_the_others(loaded):
    """A prefill that raises anything (here a simulated out-of-memory on one prompt) sends that request its error;
    the request already decoding goes on (the request used to get no event at all, and every live one an error)."""
    import asyncio

    from musicflamingo.serve.protocol import Prepared
    from musicflamingo.serve.worker import EngineWorker, Job

    model, _ = loaded
    bad_length, forward = 77, model.forward

    def failing(input_ids=None, *args, **kwargs):
        if input_ids is not None and input_ids.shape[-1] == bad_length:
            raise torch.OutOfMemoryError("simulated: out of memory while encoding a long song")
        return forward(input_ids, *args, **kwargs)

    def prep(n: int, max_new: int) -> Prepared:
        return Prepared(
            torch.randint(0, 290, (n,)), None, None, SamplingParams(max_new_tokens=max_new), n, 0, 0.0
        )

    async def run() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        worker = EngineWorker(model, slots=2)
        worker.start()
        try:
            healthy = Job(prep(10, 40), loop)
            worker.submit(healthy)
            first = [await asyncio.wait_for(healthy.queue.get(), 30)]
            failing_job = Job(prep(bad_length, 5), loop)
            worker.submit(failing_job)
            failed = [await asyncio.wait_for(failing_job.queue.get(), 30)]
            while first[-1].finish is None and first[-1].error is None:
                first.append(await asyncio.wait_for(healthy.queue.get(), 30))
            return first, failed
        finally:
            worker.stop()

    model.forward = failing
    try:
        healthy, failed = asyncio.run(run())
    finally:
        del model.forward  # the instance attribute: the class's forward again
    assert failed[0].error.startswith("the engine failed: OutOfMemoryError: simulated")
    assert all(e.error is None for e in healthy) and healthy[-1].finish == "length"
    assert sum(len(e.tokens) for e in healthy) == 40


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "serve.py"), f"ckpt={tmp_path / 'no_such_ckpt'}", "port=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ckpt=") and "no_such_ckpt is not a folder" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>A</answer><answer>B</answer>",  # two answers: the last, as parse_think
        "Sure. <think>a</think><answer>B</answer>",  # text before <think>: was returned raw
        "<think>a <think> b</think><answer>B</answer>",  # nested
        "<think>a</think><answer>B</answer>tail",
    ],
)
def test_think_split_of_broken_answers_is_parse_thinks(text):
    """The server answers what infer.py and eval.py read from the same text (`reasoning.parse_think`), broken
    tags included; pieces of any size."""
    want = parse_think(text)
    for size in (1, 2, 3, len(text)):
        sp = ThinkSplitter()
        parts = [sp.push(text[i : i + size]) for i in range(0, len(text), size)] + [sp.flush()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (want.thinking, want.answer)
