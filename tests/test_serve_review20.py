"""Review round 20 of the server, walked as a researcher calling it from tools.

`repetition_penalty` (infer.py's and the engine's) is a request field, checked like the other sampling fields;
OpenAI's `frequency_penalty` / `presence_penalty` are taken at 0 (what LangChain sends unasked) and otherwise a 400
naming the field and pointing at `repetition_penalty`. A song's base64 is decoded in pieces (one call over 50 MB
held the GIL, so every other client's stream, for seconds), and a big body is parsed off the event loop. The 503 of
a server that is stopping has a type of its own (it is no overload). `port=0` serves on an ephemeral port that the
"serving on" line names (it said `:0`).
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import (  # noqa: F401  (loaded: a fixture)
    MODEL,
    ROOT,
    client,
    expect_error,
    loaded,
    running_server,
    user_turn,
)
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.serve.app as serve_app
import musicflamingo.serve.audio as serve_audio
from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import generate_answers
from musicflamingo.serve import ServeSettings, create_app
from musicflamingo.serve.app import check_listen
from musicflamingo.serve.errors import APIError


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("songs") / "tone.wav"
    write_audio(path, make_tone(440, 2.0))
    return path


@pytest.fixture(scope="module")
def server(loaded, ckpt):  # noqa: F811
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=2)
    with running_server(create_app(model, processor, settings, stop_token_ids(ckpt, model.config))) as base:
        yield base


# ---------------------------------------------------------------------------------------------- penalties
def test_repetition_penalty_is_a_request_field_decoded_as_the_engine_does(server, loaded, song):  # noqa: F811
    """It was a 400 'unknown field': the engine, generate and infer.py had it, the server did not."""
    model, processor = loaded
    question = "Describe the song."
    conv = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": str(song)}, {"type": "text", "text": question}],
        }
    ]
    c = client(server)
    answers = {}
    for penalty in (1.0, 1.5):
        params = SamplingParams(
            max_new_tokens=16, stop_ids=(model.config.text.eos_token_id,), repetition_penalty=penalty
        )
        (want,) = generate_answers(model, processor, [conv], ["x"], params, slots=1)
        got = c.chat.completions.create(
            model=MODEL,
            messages=[user_turn(question, song)],
            max_tokens=16,
            extra_body={"repetition_penalty": penalty},
        )
        assert got.choices[0].message.content == want, penalty
        answers[penalty] = want
    assert answers[1.0] != answers[1.5]  # the penalty changed this answer: it was applied, not ignored

    good = {"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 2}
    for bad in (0, -1.2, "1.2", True, [1.2], float("nan")):
        r = httpx.post(
            f"{server}/v1/chat/completions",
            content=json.dumps(
                {**good, "repetition_penalty": bad}
            ),  # (json.dumps writes NaN, json.loads reads it)
            headers={"content-type": "application/json"},
            timeout=60,
        )
        err = expect_error(r, 400, "repetition_penalty", "must be a number > 0 (1: off)")
        assert err["code"] == "invalid_value", err


def test_openai_penalties_at_0_are_taken_and_otherwise_name_repetition_penalty(server):
    """LangChain and others send frequency_penalty / presence_penalty 0 unasked: taken. Another value is a 400
    naming the field that said only 'not supported'; now it names the field this server has instead."""
    c = client(server)
    r = c.chat.completions.create(
        model=MODEL, messages=[user_turn("hi")], max_tokens=2, frequency_penalty=0, presence_penalty=0.0
    )
    assert r.usage.completion_tokens >= 1
    for field, value, code in (
        ("frequency_penalty", 0.5, "unsupported_parameter"),  # OpenAI's range: a feature this server lacks
        ("presence_penalty", -2, "unsupported_parameter"),
        ("frequency_penalty", 3, "invalid_value"),  # outside OpenAI's [-2, 2]: no value of the field
        ("presence_penalty", "0", "invalid_value"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=[user_turn("hi")], max_tokens=2, **{field: value})
        err = e.value.body
        assert err["param"] == field and err["code"] == code, err
        assert err["message"].startswith(f"{field}: ") and "repetition_penalty" in err["message"], err


# ---------------------------------------------------------------------------------------------- big bodies
def test_base64_is_decoded_in_pieces_as_strictly_as_before(monkeypatch):
    """One binascii call (after a regex over the whole text) held the GIL for seconds on a 50-MB song: every
    other stream stopped. In pieces, the event loop runs between them; the bytes, and what is refused, are the
    same, whitespace across the pieces' edges included."""
    rng = random.Random(0)
    raw = rng.randbytes(3 * serve_audio.B64_PIECE)
    text = base64.b64encode(raw).decode()
    sizes = []
    real = binascii.a2b_base64

    def recorded(data, *args, **kwargs):
        sizes.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(binascii, "a2b_base64", recorded)
    assert serve_audio.decode_base64(text, "data") == raw
    assert len(sizes) >= 4 and max(sizes) <= serve_audio.B64_PIECE, sizes

    monkeypatch.setattr(serve_audio, "B64_PIECE", 8)  # many edges in a short text
    for _ in range(300):
        data = rng.randbytes(rng.randint(1, 40))
        chars = list(base64.b64encode(data).decode())
        for _ in range(
            rng.randint(0, 6)
        ):  # line breaks and spaces anywhere, as encoders and editors put them
            chars.insert(rng.randint(0, len(chars)), rng.choice(" \n\r\t"))
        assert serve_audio.decode_base64("".join(chars), "data") == data
    for bad, words in (
        ("QUJD*A==", "Only base64 data"),
        ("QUJDRA", "padding"),
        ("QUJDRA==QUJD", "after padding"),  # the padding ends one piece, more follows in the next
        ("QUJDRA==    QUJD", "after padding"),
        ("QUJDRAé=", "Only base64 data"),
        (" \n ", "decodes to 0 bytes"),
    ):
        with pytest.raises(APIError) as e:
            serve_audio.decode_base64(bad, "messages[0].content[0].input_audio.data")
        assert e.value.status == 400 and e.value.param == "messages[0].content[0].input_audio.data"
        assert words in e.value.message, (bad, e.value.message)


def test_a_big_body_is_parsed_off_the_event_loop(loaded, monkeypatch):  # noqa: F811
    """json.loads of a song's base64 ran on the event loop: every stream waited for it. A body over
    PARSE_ON_LOOP_BYTES is parsed in a thread; a small one stays on the loop."""
    model, processor = loaded
    threads = []
    parse = serve_app.parse_json

    def recorded(*args, **kwargs):
        threads.append(threading.get_ident())
        return parse(*args, **kwargs)

    monkeypatch.setattr(serve_app, "parse_json", recorded)
    settings = ServeSettings(model_name=MODEL, max_batch=1)
    with running_server(create_app(model, processor, settings, stop_ids=())) as base:
        url = f"{base}/v1/chat/completions"
        small = {"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 1}
        big = {**small, "user": "x" * (serve_app.PARSE_ON_LOOP_BYTES + 1)}
        loop_thread = httpx.post(url, json=small, timeout=60)
        assert loop_thread.status_code == 200, loop_thread.text
        r = httpx.post(url, json=big, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(url, content=b'{"model": "' + b"x" * serve_app.PARSE_ON_LOOP_BYTES + b"", timeout=60)
        err = expect_error(r, 400, None, "not valid JSON")  # its error as the loop's parse gives it
        assert err["code"] == "invalid_json"
    assert len(threads) == 3 and threads[1] != threads[0] and threads[2] != threads[0], threads


# ---------------------------------------------------------------------------------------------- 503s
def test_a_stopping_server_503_has_its_own_type_and_keeps_retry_after(loaded):  # noqa: F811
    """Both 503s said `server_overloaded`: a client or balancer branching on the type (an overloaded server is
    worth waiting for, a stopping one is not) could not tell them apart."""
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=1, retry_after_s=2)
    app = create_app(model, processor, settings, stop_ids=())
    with running_server(app) as base:
        app.state.server.worker.drain(0)
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 1},
            timeout=60,
        )
        err = expect_error(r, 503, None, "shutting down")
        assert err["type"] == "service_unavailable_error" and err["code"] == "server_shutting_down", err
        assert r.headers["retry-after"] == "2"  # another replica (or this one restarted) may answer it
    busy = serve_app._busy(settings).body()["error"]
    assert busy["type"] == "server_overloaded" and busy["code"] == "queue_full", busy


# ---------------------------------------------------------------------------------------------- port=0
def test_port_0_binds_an_ephemeral_port_on_every_address_of_the_host(monkeypatch):
    """check_listen did nothing for port=0; it binds one port (the same on the host's every address) and hands the
    sockets over, so the "serving on" line can name the port."""
    held = check_listen("127.0.0.1", 0)
    try:
        assert len(held) == 1 and held[0].getsockname()[0] == "127.0.0.1" and held[0].getsockname()[1] > 0
        with socket.socket() as other, pytest.raises(OSError):  # held: nothing else gets it
            other.bind(held[0].getsockname())
    finally:
        for sock in held:
            sock.close()

    def addresses(
        host, port, *args, **kwargs
    ):  # two loopback addresses, as 'localhost' has ::1 and 127.0.0.1
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
            for address in ("127.0.0.1", "127.0.0.2")
        ]

    monkeypatch.setattr(serve_app.socket, "getaddrinfo", addresses)
    held = check_listen("both", 0)
    try:
        names = [s.getsockname() for s in held]
        assert [n[0] for n in names] == ["127.0.0.1", "127.0.0.2"] and names[0][1] == names[1][1], names
    finally:
        for sock in held:
            sock.close()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert check_listen("both", port) == []  # a port of its own: only tried, uvicorn binds it


def test_serve_py_port_0_names_the_port_it_listens_on(ckpt):
    """`serve.py port=0` listened on an ephemeral port but its line said http://127.0.0.1:0."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), f"ckpt={ckpt}", "port=0", "device=cpu", "model_name=tiny"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        seen = []
        while True:
            line = lines.get(timeout=300)
            seen.append(line)
            found = re.search(r"serving tiny on http://127\.0\.0\.1:(\d+) ", line)
            if found:
                break
            assert proc.poll() is None, "".join(seen)
        port = int(found.group(1))
        assert port > 0, line
        deadline = time.monotonic() + 120  # the line comes as uvicorn starts on the port
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["model"] == "tiny"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
