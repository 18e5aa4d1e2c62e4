"""The "a server my tools can call" journey: what a tool sends that the main tests do not, and how the server stops.

Bodies of the wrong types anywhere (a role or reasoning_effort that is a list, integers of 5000 digits, arrays
nested 100000 deep, a NUL in a file:// path) are 400s naming the field, never 500s; seeded sampling among
concurrent requests with different settings gives each request its answer alone, which is infer.py's; SIGTERM
while requests run answers every client (queued: 503 at once; generating: its grace period, then an error event)
and exits without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_serve import MODEL, ROOT, client, expect_error, running_server, user_turn
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import infer
from musicflamingo.serve import ServeSettings, create_app
from musicflamingo.serve.protocol import Prepared


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("songs")
    write_audio(d / "a.wav", make_tone(440, 1.0))
    write_audio(d / "b.flac", make_tone(220, 2.5))
    write_audio(d / "c.wav", make_tone(330, 3.0))  # 128 KB in base64: over uvicorn's 64 KB, it pauses reading
    return d


@pytest.fixture(scope="module")
def loaded(ckpt):
    model = MusicFlamingo.from_pretrained(ckpt, dtype=torch.float32, device="cpu").eval()
    return model, MusicFlamingoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(loaded, ckpt, songs):
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=3, audio_root=str(songs), max_audio_seconds=6.0)
    with running_server(create_app(model, processor, settings, stop_token_ids(ckpt, model.config))) as base:
        yield base


def test_bodies_of_wrong_types_are_400s_naming_the_field(server, songs):
    """Each of these was a 500 'internal error' (TypeError unhashable, ValueError, RecursionError) or accepted."""
    good = {"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 2}
    url = (songs / "a.wav").as_uri()
    cases = [
        (
            "role a list",
            {**good, "messages": [{"role": ["user"], "content": "hi"}]},
            "messages[0].role",
            "must be",
        ),
        (
            "role an object",
            {**good, "messages": [{"role": {}, "content": "hi"}]},
            "messages[0].role",
            "must be",
        ),
        (
            "reasoning_effort a list",
            {**good, "reasoning_effort": ["low"]},
            "reasoning_effort",
            "must be one of",
        ),
        (
            "reasoning_effort an object",
            {**good, "reasoning_effort": {}},
            "reasoning_effort",
            "must be one of",
        ),
        (
            "NUL in a file:// path",
            {
                **good,
                "messages": [user_turn("x", part={"type": "audio_url", "audio_url": {"url": url + "%00"}})],
            },
            "messages[0].content[0].audio_url.url",
            "NUL byte",
        ),
        ("n true", {**good, "n": True}, "n", "only n=1"),
        (
            "frequency_penalty false",
            {**good, "frequency_penalty": False},
            "frequency_penalty",
            "not supported",
        ),
        ("top_logprobs false", {**good, "top_logprobs": False}, "top_logprobs", "not supported"),
        (
            "5000-digit integer",
            b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b"}",
            None,
            "not usable JSON",
        ),
        (
            "nested 100000 deep",
            b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            None,
            "nested too deeply",
        ),
    ]
    for name, body, param, words in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(
            f"{server}/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        try:
            expect_error(r, 400, param, words)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["live"] == 0 and health["queued"] == 0
    r = client(server).chat.completions.create(model=MODEL, messages=[user_turn("hi")], max_tokens=2, n=1)
    assert r.usage.completion_tokens == 2


def test_seeded_sampling_among_concurrent_requests_is_each_ones_alone_and_infers(server, ckpt, songs, capsys):
    """Requests with different songs, max_tokens, temperatures, seeds and stop strings, all at once (streamed and
    not): each gets the answer, finish_reason and usage it gets alone; the first one is infer.py's."""
    c = client(server)
    specs = [
        dict(song="a.wav", max_tokens=12, temperature=0.8, seed=1),
        dict(song="b.flac", max_tokens=9, temperature=1.3, seed=11, stream=True),
        dict(song="a.wav", max_tokens=7, temperature=0.7, seed=5),  # its stop string: below
        dict(song="b.flac", max_tokens=10),
        dict(song="a.wav", max_tokens=6, temperature=0.8, seed=1, stream=True),
    ]

    def ask(spec: dict) -> tuple:
        spec = dict(spec)
        msgs = [user_turn("Describe the song.", songs / spec.pop("song"))]
        if spec.pop("stream", False):
            chunks = list(
                c.chat.completions.create(
                    model=MODEL, messages=msgs, stream=True, stream_options={"include_usage": True}, **spec
                )
            )
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finish = [
                ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason
            ]
            return text, finish[-1], chunks[-1].usage.completion_tokens
        r = c.chat.completions.create(model=MODEL, messages=msgs, **spec)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    unstopped = ask(specs[2])[0]
    specs[2]["stop"] = ["zzz", unstopped[3:5]]  # text from the middle of its answer
    alone = [ask(s) for s in specs]
    together: list = [None] * len(specs)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(specs[i]))) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert [a[1] for a in alone] == ["length", "length", "stop", "length", "length"]
    assert alone[2][0] == unstopped[: unstopped.index(unstopped[3:5])] and alone[2][2] < 7  # cut before it
    assert alone[4][0] == alone[0][0][: len(alone[4][0])]  # the same seed: the same first tokens
    overrides = [
        f"ckpt={ckpt}",
        f"audio={songs / 'a.wav'}",
        "prompt='Describe the song.'",
        "max_new_tokens=12",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("infer", overrides=["device=cpu", "stream=false", "do_sample=true", "temperature=0.8",
                                          "seed=1", *overrides])  # fmt: skip
        assert infer(cfg) == [alone[0][0]]
    capsys.readouterr()


def _prepared(n: int, max_new: int) -> Prepared:
    return Prepared(
        torch.randint(0, 290, (n,)), None, None, SamplingParams(max_new_tokens=max_new), n, 0, 0.0
    )


def test_draining_worker_answers_queued_at_once_and_lets_live_finish(loaded):
    """`drain`: the queued request hears SHUTTING_DOWN at once, the live one finishes within the grace period, a
    live one past it is cut with SHUTTING_DOWN, and nothing more is admitted."""
    from musicflamingo.serve.worker import SHUTTING_DOWN, EngineWorker, Job, ShuttingDown

    model, _ = loaded

    async def events(job: Job) -> list:
        out = [await asyncio.wait_for(job.queue.get(), 60)]
        while out[-1].finish is None and out[-1].error is None:
            out.append(await asyncio.wait_for(job.queue.get(), 60))
        return out

    async def run(grace: float, live_tokens: int) -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        worker = EngineWorker(model, slots=1)
        worker.start()
        try:
            live, queued = Job(_prepared(10, live_tokens), loop), Job(_prepared(10, 5), loop)
            worker.submit(live)
            first = await asyncio.wait_for(live.queue.get(), 60)
            worker.submit(queued)
            worker.drain(grace)
            with pytest.raises(ShuttingDown):
                worker.submit(Job(_prepared(10, 5), loop))
            got_queued = await events(queued)
            return [first, *await events(live)], got_queued
        finally:
            worker.stop()

    live, queued = asyncio.run(run(grace=60.0, live_tokens=20))
    assert queued[0].error and queued[0].code == SHUTTING_DOWN and not queued[0].tokens
    assert live[-1].finish == "length" and sum(len(e.tokens) for e in live) == 20
    live, _ = asyncio.run(run(grace=0.0, live_tokens=30000))
    assert live[-1].code == SHUTTING_DOWN and "not finished in time" in live[-1].error
    assert sum(len(e.tokens) for e in live) < 30000


def _no_eos_checkpoint(path: Path) -> Path:
    """The tiny checkpoint without end ids: answers run to max_tokens."""
    write_tiny_checkpoint(path, seed=0)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["eos_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    gen = json.loads((path / "generation_config.json").read_text())
    gen.pop("eos_token_id", None)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def test_sigterm_while_requests_run_answers_every_client(tmp_path):
    """serve.py on SIGTERM with one answer streaming and one request queued: the queued one gets a 503 at once, the
    stream its grace period then an error event and [DONE]; the process exits without a traceback. It used to
    wait for the connections, then cancel them: 'Internal Server Error' in plain text, the stream cut without
    [DONE], a traceback each in the log."""
    ckpt = _no_eos_checkpoint(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    args = [sys.executable, str(ROOT / "serve.py"), f"ckpt={ckpt}", f"port={port}", "max_batch=1", "device=cpu",
            f"model_name={MODEL}", "shutdown_grace_s=1"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"{base}/health", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        body = {"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 30000}
        results: dict = {}

        def stream() -> None:
            with httpx.stream(
                "POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                results["stream"] = (r.status_code, [line for line in r.iter_lines() if line])

        def plain() -> None:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            results["plain"] = (r.status_code, r.json())

        threads = [threading.Thread(target=stream)]
        threads[0].start()
        _wait(lambda: httpx.get(f"{base}/health", timeout=5).json()["live"] == 1)
        threads.append(threading.Thread(target=plain))
        threads[1].start()
        _wait(lambda: httpx.get(f"{base}/health", timeout=5).json()["queued"] == 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and "Cancel" not in text, text
    assert took < 10, took
    status, err = results["plain"]
    assert status == 503 and err["error"]["code"] == "server_shutting_down", err
    status, lines = results["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2].removeprefix("data: "))
    assert (
        last["error"]["code"] == "server_shutting_down" and "not finished in time" in last["error"]["message"]
    )
    assert len(lines) > 3  # it streamed during the grace period


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_client_gone_while_its_audio_is_decoded_costs_no_prefill(loaded, ckpt, songs, monkeypatch):
    """A client that times out while its song is decoded (prepare) is not admitted afterwards. The disconnect used
    to be watched for only once the job was queued, so when the engine thread took the job first its prefill (the
    audio encoder, the dearest part of a request) ran for nobody."""
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=1, prepare_threads=1)
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config))
    worker = app.state.server.worker
    entered, release = threading.Event(), threading.Event()
    template = processor.apply_chat_template

    def slow_template(*args, **kwargs):
        entered.set()
        release.wait(30)
        return template(*args, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", slow_template)
    submit = worker.submit

    def submit_then_yield(job):  # the engine thread wins the race to the new job (as under load)
        submit(job)
        _wait(lambda: worker.stats()["queued"] == 0, timeout=5)

    monkeypatch.setattr(worker, "submit", submit_then_yield)
    body = {"model": MODEL, "messages": [user_turn("Describe it.", songs / "c.wav")], "max_tokens": 50}
    with running_server(app) as base:
        gave_up = threading.Thread(
            target=lambda: pytest.raises(
                httpx.ReadTimeout, httpx.post, f"{base}/v1/chat/completions", json=body, timeout=1.0
            )
        )
        gave_up.start()
        assert entered.wait(30)
        gave_up.join(30)  # the client has timed out and closed its connection
        release.set()
        _wait(lambda: app.state.server.preparing == 0)
        time.sleep(0.3)
        assert worker.stats()["admitted"] == 0 and worker.stats()["tokens"] == 0
        monkeypatch.setattr(processor, "apply_chat_template", template)
        monkeypatch.setattr(worker, "submit", submit)
        r = client(base).chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=3)
        assert r.usage.completion_tokens == 3 and worker.stats()["admitted"] == 1


def test_audio_of_a_length_no_header_tells_is_decoded_only_past_the_limit(tmp_path, monkeypatch):
    """m4a/AAC carry no length soundfile reads: the whole upload was decoded (a 2-hour file ~460 MB of samples)
    before the duration limit refused it. Now one second past the limit is decoded, and the request refused."""
    import shutil

    from musicflamingo.serve import audio as serve_audio
    from musicflamingo.serve.errors import APIError

    if shutil.which("ffmpeg") is None:
        pytest.skip("needs Debian's ffmpeg (make setup)")
    # a container length (ffprobe) now refuses before decoding: this is the path for audio with no length at all
    monkeypatch.setattr(serve_audio, "container_duration", lambda path: None)
    wav = write_audio(tmp_path / "tone.wav", make_tone(440, 6.0))
    m4a = tmp_path / "tone.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    decoded = []
    real = serve_audio.load_audio

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        wave = real(*args, **kwargs)
        decoded.append(len(wave) / 16000)
        return wave

    monkeypatch.setattr(serve_audio, "load_audio", spy)
    with pytest.raises(APIError) as e:
        serve_audio._decode_file(str(m4a), 2.0, "messages[0].content[0]", "x")
    assert e.value.code == "audio_too_long" and "longer than the limit of 2 s" in str(e.value)
    assert decoded and decoded[0] <= 3.0 + 0.1, decoded  # not the whole 6 s
    assert serve_audio._decode_file(str(m4a), 10.0, "p", "x").seconds == pytest.approx(6.0, abs=0.1)
