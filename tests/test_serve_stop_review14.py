"""serve.py, review 14: stop strings are the engine's (`SamplingParams.stop_strings`, `Slot.text`,
`Slot.finish_reason`), not a copy in the server.

A stop string ends the request's slot in the step whose token completes it (no token decoded past it: /health's
`tokens` grows by exactly the answer's `completion_tokens`, which count that token, as vLLM's); the worker reported
such a finish as "length" (`_fan_out` only knew stop ids); nothing of a stop string is streamed; concurrent requests
stop at their own steps; a request without `stop` gets generation_config.json's `stop_strings`, as infer.py's
`stop: null` (`stop: []`: none); think mode splits the cut text.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch
from test_infer_review14 import _two_token_stop
from test_serve import MODEL, QUESTION, ckpt, loaded, running_server, songs, user_turn  # noqa: F401

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.checkpoint import CheckpointError, stop_token_ids
from musicflamingo.engine import AnswerText, Engine, Request
from musicflamingo.reasoning import parse_think
from musicflamingo.serve import ServeSettings, build_server, create_app
from musicflamingo.serve.protocol import parse_chat_request, prepare
from musicflamingo.serve.text import AnswerStream, ThinkFormat
from musicflamingo.serve.worker import EngineWorker, Job


def _settings() -> ServeSettings:
    return ServeSettings(model_name=MODEL, max_batch=4, max_completion_tokens=64, max_prompt_tokens=1000)


@pytest.fixture(scope="module")
def app(loaded, ckpt):  # noqa: F811
    model, processor = loaded
    return create_app(model, processor, _settings(), stop_token_ids(ckpt, model.config))


@pytest.fixture(scope="module")
def server(app):
    with running_server(app) as base:
        yield base


def _body(msgs: list, max_tokens: int, **fields) -> dict:
    return {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, **fields}


def _alone(app, body: dict) -> tuple[list[int], str]:
    """The request's tokens and text, run alone in an engine of its own from the server's own prepared inputs."""
    state = app.state.server
    req = parse_chat_request(body, state.settings)
    p = prepare(req, state.processor, state.settings, state.context, state.stop_ids)  # `stop` given: its own
    engine = Engine(state.worker.engine.model, slots=1, tokenizer=state.processor.tokenizer)
    slot = engine.admit(Request(p.input_ids, p.params, p.input_features, p.input_features_mask))
    while engine.decoding:
        engine.step()
    return slot.tokens, slot.text.text


def _cut(tok, tokens: list[int], stop: str) -> tuple[str, int]:
    """The answer cut before `stop` and the number of tokens up to the one that completes it."""
    full = tok.decode(tokens)
    end = next(k for k in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:k]))
    return full[: full.find(stop)], end


def _stream(base: str, body: dict) -> tuple[list[str], str | None, dict | None]:
    """(content deltas, finish_reason, usage) of a streamed request, read as raw Server-Sent Events."""
    deltas, finish, usage = [], None, None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj["choices"]:
                if choice["delta"].get("content"):
                    deltas.append(choice["delta"]["content"])
                finish = choice["finish_reason"] or finish
    return deltas, finish, usage


def _post(base: str, body: dict) -> dict:
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _tokens_counted(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=30).json()["tokens"]


# ---------------------------------------------------------------------------------------------- HTTP
def test_a_two_token_stop_string_ends_the_slot_at_its_token_streamed_or_not(app, server, songs, loaded):  # noqa: F811
    tok = loaded[1].tokenizer
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    free, _ = _alone(app, _body(msgs, 24, stop=[]))
    assert len(free) == 24
    stop = _two_token_stop(tok, free, 5)
    want, end = _cut(tok, free, stop)
    assert 5 <= end < 24 and want

    before = _tokens_counted(server)
    r = _post(server, _body(msgs, 24, stop=[stop, "never there"]))
    choice = r["choices"][0]
    assert choice["message"]["content"] == want and choice["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == end  # the token that completed the stop string counts (vLLM)
    assert _tokens_counted(server) - before == end, "the slot decoded past the stop string"

    before = _tokens_counted(server)
    deltas, finish, usage = _stream(server, _body(msgs, 24, stop=stop))
    assert "".join(deltas) == want and finish == "stop"  # deltas only append: no piece of the stop was shown
    assert usage["completion_tokens"] == end and _tokens_counted(server) - before == end

    # its budget ends one token before the stop string would: "length", and the held-back start of it is released
    r = _post(server, _body(msgs, end - 1, stop=stop))
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == end - 1
    assert r["choices"][0]["message"]["content"] == tok.decode(free[: end - 1])
    assert r["choices"][0]["message"]["content"].endswith(stop[0])
    deltas, finish, usage = _stream(server, _body(msgs, end - 1, stop=stop))
    assert "".join(deltas) == tok.decode(free[: end - 1]) and finish == "length"


def test_concurrent_requests_stop_at_their_own_steps(app, server, songs, loaded):  # noqa: F811
    """Four requests at once, streamed and not, each with its own stop string at another step (one with none):
    each answer, finish reason and token count is the one it gets alone."""
    tok = loaded[1].tokenizer
    specs = [  # (messages, stop string, streamed)
        ([user_turn(QUESTION, songs / "songs" / "tone_a.wav")], True, False),
        ([user_turn("Describe it.", songs / "songs" / "tone_b.flac")], True, True),
        ([user_turn("Which instruments?", songs / "songs" / "tone_a.wav")], True, True),
        ([user_turn("Lyrics?", songs / "songs" / "tone_b.flac")], False, False),
    ]
    bodies, wants, at = [], [], 2
    for msgs, stopped, _ in specs:
        free, text = _alone(app, _body(msgs, 16, stop=[]))
        if not stopped:
            bodies.append(_body(msgs, 16, stop=[]))
            wants.append((text, "length", 16))
            continue
        while True:  # the next stop string that ends later than the last one
            stop = _two_token_stop(tok, free, at)
            want, end = _cut(tok, free, stop)
            at += 1
            if end > max((w[2] for w in wants), default=0):
                break
        bodies.append(_body(msgs, 16, stop=[stop]))
        wants.append((want, "stop", end))
    assert len({w[2] for w in wants}) == 4 and max(w[2] for w in wants[:3]) < 16

    results: list = [None] * 4
    gate = threading.Barrier(4)

    def ask(i: int) -> None:
        gate.wait()
        if specs[i][2]:
            deltas, finish, usage = _stream(server, bodies[i])
            results[i] = ("".join(deltas), finish, usage["completion_tokens"])
        else:
            r = _post(server, bodies[i])
            c = r["choices"][0]
            results[i] = (c["message"]["content"], c["finish_reason"], r["usage"]["completion_tokens"])

    before = _tokens_counted(server)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == wants
    assert _tokens_counted(server) - before == sum(w[2] for w in wants)


def test_think_mode_with_a_stop_string(app, server, songs, loaded):  # noqa: F811
    """think=true: the think-prompted answer is cut before the stop string, then split as parse_think splits it
    (the tiny model writes no tags: all answer, stripped)."""
    tok = loaded[1].tokenizer
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    free, _ = _alone(app, _body(msgs, 20, stop=[], think=True))
    stop = _two_token_stop(tok, free, 6)
    want, end = _cut(tok, free, stop)
    r = _post(server, _body(msgs, 20, stop=stop, think=True))
    message = r["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (
        parse_think(want).thinking,
        parse_think(want).answer,
    )
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == end
    deltas, finish, _ = _stream(server, _body(msgs, 20, stop=stop, think=True))
    assert "".join(deltas) == parse_think(want).answer and finish == "stop"


TAGGED = "<think>The bass walks END in fifths.</think>\n\n<answer>A minor, 96 BPM. END more</answer>"


@pytest.mark.parametrize(
    "stops, cut",
    [
        (["END more"], "<think>The bass walks END in fifths.</think>\n\n<answer>A minor, 96 BPM. "),
        (["walks END"], "<think>The bass "),  # inside the thinking: no answer
        (["</answer>"], "<think>The bass walks END in fifths.</think>\n\n<answer>A minor, 96 BPM. END more"),
    ],
)
def test_think_split_of_the_engines_cut_text(loaded, stops, cut):  # noqa: F811
    """The worker's events (each token with the text the engine's `AnswerText` released) through `AnswerStream`:
    reasoning and content are parse_think's of the cut text; every token up to the stop's counts, the reasoning
    ones up to the closing tag."""
    tok = loaded[1].tokenizer
    engine_text, stream = AnswerText(tok, stops), AnswerStream(think=ThinkFormat())
    parts, shown, n = [], 0, 0
    for t in tok.encode(TAGGED):
        n += 1
        hit = engine_text.push(t)
        if hit:
            engine_text.finish()
        parts.append(stream.push([t], engine_text.text[shown:]))
        shown = len(engine_text.text)
        if hit:
            break
    parts.append(stream.finish())
    want = parse_think(cut)
    assert engine_text.text == cut
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (want.thinking, want.answer)
    ids = tok.encode(TAGGED)
    assert (
        stream.completion_tokens
        == n
        == next(k for k in range(1, len(ids) + 1) if stops[0] in tok.decode(ids[:k]))
    )
    closing = next(k for k in range(1, len(ids) + 1) if "</think>" in tok.decode(ids[:k]))
    assert stream.reasoning_tokens == (closing if "</think>" in cut else n)


# ---------------------------------------------------------------------------------------------- defaults
def _with_stop_strings(src: Path, dst: Path, value) -> Path:
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    fields = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**fields, "stop_strings": value}))
    return dst


def test_generation_config_stop_strings_are_a_requests_default(ckpt, loaded, songs, tmp_path):  # noqa: F811
    """As infer.py's `stop: null`: a request without `stop` (or `stop: null`) is cut before generation_config.json's
    stop_strings; `stop: []` asks for none; a request's own `stop` replaces them. They were ignored."""
    tok = loaded[1].tokenizer
    probe = create_app(*loaded, _settings(), stop_token_ids(ckpt, loaded[0].config))
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    free, _ = _alone(probe, _body(msgs, 16, stop=[]))
    stop = _two_token_stop(tok, free, 4)
    want, end = _cut(tok, free, stop)
    d = _with_stop_strings(ckpt, tmp_path / "tiny", [stop])
    model = MusicFlamingo.from_pretrained(d, dtype=torch.float32, device="cpu").eval()
    app = create_app(model, MusicFlamingoProcessor.from_pretrained(d), _settings())
    assert app.state.server.stop_strings == (stop,)
    with running_server(app) as base:
        for fields in ({}, {"stop": None}):
            r = _post(base, _body(msgs, 16, **fields))
            assert (
                r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "stop"
            )
            assert r["usage"]["completion_tokens"] == end
        r = _post(base, _body(msgs, 16, stop=[]))
        assert r["choices"][0]["message"]["content"] == tok.decode(free)
        assert r["choices"][0]["finish_reason"] == "length"
        r = _post(base, _body(msgs, 16, stop="never there"))
        assert r["choices"][0]["message"]["content"] == tok.decode(free)
        deltas, finish, _ = _stream(base, _body(msgs, 16))
        assert "".join(deltas) == want and finish == "stop"


@pytest.mark.parametrize("value", [[""], 5, ["a", 3]])
def test_bad_generation_config_stop_strings_stop_the_server_before_loading(
    ckpt,  # noqa: F811
    tmp_path,
    monkeypatch,
    value,
):
    d = _with_stop_strings(ckpt, tmp_path / "tiny", value)

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("musicflamingo.serve.app.load_model", no_load)
    with pytest.raises(CheckpointError, match=r"generation_config\.json: stop_strings"):
        build_server({"ckpt": str(d), "device": "cpu", "model_name": MODEL})


# ---------------------------------------------------------------------------------------------- worker
def worker_events(worker: EngineWorker, prepared, settle: bool = False) -> list:  # noqa: ANN001
    """Run one prepared request through `worker` (started and stopped here): its events up to the finishing one;
    `settle`: then check that no event follows it."""

    async def run() -> list:
        job = Job(prepared, asyncio.get_running_loop())
        worker.start()
        try:
            worker.submit(job)
            events = []
            while not events or (events[-1].finish is None and events[-1].error is None):
                events.append(await asyncio.wait_for(job.queue.get(), 60))
            if settle:
                await asyncio.sleep(0.05)
                assert job.queue.empty()
            return events
        finally:
            worker.stop()

    return asyncio.run(run())


def test_the_worker_finishes_a_stop_string_request_as_stop_in_its_step(app, songs, loaded):  # noqa: F811
    """The engine ends the slot at the stop string's token; the worker's last event says "stop" (`_fan_out` said
    "length" for anything but a stop id) and its events' texts are the cut answer; no token after it."""
    tok = loaded[1].tokenizer
    state = app.state.server
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    free, _ = _alone(app, _body(msgs, 24, stop=[]))
    stop = _two_token_stop(tok, free, 5)
    want, end = _cut(tok, free, stop)
    req = parse_chat_request(_body(msgs, 24, stop=stop), state.settings)
    prepared = prepare(req, state.processor, state.settings, state.context, state.stop_ids)
    assert prepared.params.stop_strings == (stop,)
    worker = EngineWorker(loaded[0], slots=2, tokenizer=tok)
    events = worker_events(worker, prepared, settle=True)
    assert events[-1].error is None and events[-1].finish == "stop"
    assert [t for e in events for t in e.tokens] == free[:end]
    assert "".join(e.text for e in events) == want
    assert all(want.startswith("".join(e.text for e in events[: i + 1])) for i in range(len(events)))
    assert worker.tokens == end and worker.stats()["live"] == 0
