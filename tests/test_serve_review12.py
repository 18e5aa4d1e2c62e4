"""Review round 12 of the server (serve-api journey): /health's cache numbers under `max_cached_tokens`, settings
checked before the weights are read, wrong-typed fields that were accepted silently."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_serve import MODEL, loaded  # noqa: F401  (loaded: a fixture)
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.serve.app as serve_app
from musicflamingo.engine import KEY_BLOCK, SamplingParams
from musicflamingo.serve import ServeConfigError, ServeSettings, build_server
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import Prepared, parse_chat_request
from musicflamingo.serve.worker import EngineWorker, Job


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _prepared(n: int, max_new: int) -> Prepared:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(10, 290, (n,), generator=g)
    return Prepared(ids, None, None, SamplingParams(max_new_tokens=max_new), n, 0, 0.0)


def test_health_reports_the_cache_positions_live_requests_reserve_under_max_cached_tokens(loaded):  # noqa: F811
    """Under `max_cached_tokens` a request's whole reach is reserved at admission (every row as long as the
    longest reach), but /health showed only `reserved_tokens`, the sum of prompt + max_tokens: a request queued
    beside 1000 reserved tokens of 1400 with no number saying why. Now `cache_reserved_positions` is what the live
    requests hold the cache to (1 row x 1024 positions here: the short request's second row would pass the bound)
    with `max_cached_tokens` beside it; every number comes from one moment between two steps (read while the
    cache was being reallocated, they mixed the states before and after)."""
    model, _ = loaded
    bound = 1400
    worker = EngineWorker(model, slots=4, max_cached_tokens=bound)
    seen_in_step, seen_in_resize = [], []
    step, resize = worker.engine.step, worker.engine.cache.resize

    def recorded_step():
        if worker.steps == 5:
            seen_in_step.append(worker.stats())  # /health asked between two steps
        return step()

    def recorded_resize(rows, capacity):
        resize(rows, capacity)
        seen_in_resize.append(worker.stats())  # /health asked while the cache is reallocated

    worker.engine.step, worker.engine.cache.resize = recorded_step, recorded_resize
    long, short = _prepared(900, 100), _prepared(20, 10)

    async def run() -> dict:
        loop = asyncio.get_running_loop()
        jobs = [Job(long, loop), Job(short, loop)]
        for job in jobs:
            worker.submit(job)  # both queued before the worker starts: the long one is admitted first
        worker.start()
        try:
            for job in jobs:
                while True:
                    event = await asyncio.wait_for(job.queue.get(), 120)
                    assert event.error is None, event.error
                    if event.finish:
                        break
                if job is jobs[0]:
                    at_finish = worker.stats()  # a client holding its answer sees it counted
            return at_finish
        finally:
            worker.stop()

    at_finish = asyncio.run(run())
    assert len(seen_in_step) == 1, seen_in_step
    during = seen_in_step[0]
    assert during["live"] == 1 and during["queued"] == 1, during  # the short one waits for room
    assert during["reserved_tokens"] == 1000
    assert during["max_cached_tokens"] == bound
    assert during["cache_reserved_positions"] == -(-1000 // KEY_BLOCK) * KEY_BLOCK, during
    assert during["cache_positions"] >= during["cache_reserved_positions"]
    # the short request's own row beside it (20 + 10 positions reach, but every row as long as the longest):
    assert 2 * 1000 > bound
    assert at_finish["tokens"] >= 100 and at_finish["live"] == 0 and at_finish["admitted"] >= 1, at_finish
    assert seen_in_resize
    for stats in seen_in_resize:
        reserved = stats["cache_reserved_positions"]
        assert stats["cache_positions"] >= reserved >= stats["reserved_tokens"], stats
        assert (stats["live"] == 0) == (reserved == 0), stats
    end = worker.stats()
    assert end["live"] == 0 and end["cache_reserved_positions"] == 0 and end["admitted"] == 2


def test_health_without_a_bound_counts_the_cache_held_from_the_start(loaded):  # noqa: F811
    """The cache allocated at start (max_batch rows of 256 positions) is held before any request; /health said
    `peak_cache_positions: 0` beside `cache_positions: 512` until the first admission. No bound: no reservation
    number."""
    model, _ = loaded
    stats = EngineWorker(model, slots=2).stats()
    assert stats["cache_positions"] == 2 * KEY_BLOCK
    assert stats["peak_cache_positions"] >= stats["cache_positions"], stats
    assert stats["max_cached_tokens"] is None and stats["cache_reserved_positions"] is None


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("max_audio_seconds=5000", "max_audio_seconds=5000 is over the model's limit of 1200"),
        ("max_prompt_tokens=40000", "max_prompt_tokens=40000 must be below the model's context of 32768"),
    ],
)
def test_settings_over_the_models_limits_stop_before_the_weights_are_read(ckpt, monkeypatch, setting, words):
    """docs/serving.md: bad settings stop the server 'before anything is loaded'; these two were checked against
    the model only after `load_model` had read the weights (minutes for the release)."""

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the settings were checked")

    monkeypatch.setattr(serve_app, "load_model", no_weights)
    name, value = setting.split("=")
    with pytest.raises(ServeConfigError, match=words):
        build_server({"ckpt": str(ckpt), "device": "cpu", name: int(value)})
    with pytest.raises(
        AssertionError, match="the weights were read"
    ):  # settings within the limits go on to load
        build_server({"ckpt": str(ckpt), "device": "cpu", name: 1200 if "seconds" in name else 32767})


def _settings() -> ServeSettings:
    return ServeSettings(model_name=MODEL).resolve(32768, 1200)


def _body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"metadata": "run-1"}, "metadata"),
        ({"store": "false"}, "store"),
        ({"service_tier": 1}, "service_tier"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"prompt_cache_retention": 24}, "prompt_cache_retention"),
        ({"prompt_cache_options": []}, "prompt_cache_options"),
        ({"safety_identifier": 5}, "safety_identifier"),
        ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok", "reasoning_content": ["thought"]},
                    {"role": "user", "content": "and?"},
                ]
            },
            "messages[1].reasoning_content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok", "refusal": {"no": 1}},
                    {"role": "user", "content": "and?"},
                ]
            },
            "messages[1].refusal",
        ),
    ],
)
def test_wrong_typed_accepted_fields_are_400s_naming_the_field(fields, param):
    """Fields accepted without effect (bookkeeping, caching hints, a message's name, an assistant turn's
    reasoning) took any type and answered 200, where OpenAI's API answers 400: a client's typo passed unseen."""
    with pytest.raises(APIError) as e:
        parse_chat_request(_body(**fields), _settings())
    assert e.value.status == 400 and e.value.param == param, e.value.body()
    assert e.value.message.startswith(f"{param}: must be")


def test_the_openai_clients_values_of_accepted_fields_still_pass():
    """What the openai client sends for those fields (and null) is accepted, as before."""
    fields = {
        "metadata": {"run": "1"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"mode": "implicit"},
        "safety_identifier": "user-1",
        "user": "u",
    }
    parse_chat_request(_body(**fields), _settings())
    parse_chat_request(_body(**dict.fromkeys(fields)), _settings())
    turns = [
        {"role": "user", "content": "hi", "name": "ana"},
        {"role": "assistant", "content": "ok", "refusal": None, "reasoning_content": "why", "name": None},
        {"role": "user", "content": "and?"},
    ]
    assert len(parse_chat_request(_body(messages=turns), _settings()).messages) == 3


def test_max_audio_seconds_is_whole_windows_of_the_models_limit(loaded):  # noqa: F811
    """The processor keeps `max_audio_len // 30` whole windows of an audio: a model saved with max_audio_len=100
    keeps 90 s, but the server took max_audio_seconds=100 (or 95, given) and cut the last seconds of a 95-s song
    without a word. Now the default is 90 s, and 95 is refused at start."""
    model, processor = loaded
    assert processor.chunk_length == 30
    saved = processor.max_audio_len
    processor.max_audio_len = 100.0
    try:
        assert processor.kept_seconds == 90
        settings = ServeSettings(model_name=MODEL)
        serve_app.create_app(model, processor, settings, stop_ids=())
        assert settings.max_audio_seconds == 90
        with pytest.raises(ServeConfigError, match="max_audio_seconds=95 is over the model's limit of 90"):
            serve_app.create_app(
                model, processor, ServeSettings(model_name=MODEL, max_audio_seconds=95), stop_ids=()
            )
    finally:
        processor.max_audio_len = saved


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(loaded, caplog):  # noqa: F811
    """A cancelled upload (the page's user stops a 50 MB song half sent, a client times out) raised
    ClientDisconnect while the body was read: logged as 'unexpected error' with a traceback, then again by uvicorn
    ('Exception in ASGI application'), for a client that was simply gone. Now it is a quiet 499, and the server
    answers the next request."""
    model, processor = loaded
    app = serve_app.create_app(model, processor, ServeSettings(model_name=MODEL, max_batch=1), stop_ids=())
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def main() -> list[dict]:
        parts = [{"type": "http.request", "body": b'{"model": "tiny", ', "more_body": True}]
        parts.append({"type": "http.disconnect"})
        sent = []

        async def receive():
            return parts.pop(0) if parts else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        async with app.router.lifespan_context(app):
            await app(scope, receive, send)  # raised ClientDisconnect out of the app
        return sent

    with caplog.at_level("INFO"):
        sent = asyncio.run(main())
    assert sent[0]["status"] == 499, sent
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_data_url_in_input_audio_data_is_named_as_such():
    """Clients that put the whole `data:audio/wav;base64,...` URL in `input_audio.data` were told 'not valid
    base64 (Only base64 data is allowed)', nothing about the prefix; now the message says what to send."""
    part = {"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64,UklGRg==", "format": "wav"}}
    with pytest.raises(APIError) as e:
        parse_chat_request(_body(messages=[{"role": "user", "content": [part]}]), _settings())
    assert e.value.status == 400 and e.value.param == "messages[0].content[0].input_audio.data"
    assert "is a data: URL" in e.value.message and "audio_url" in e.value.message


def test_a_prompt_over_max_cached_tokens_is_blamed_on_the_messages_whatever_max_tokens_says(loaded):  # noqa: F811
    """A 20-minute song is a 30,000-token prompt: under max_cached_tokens=1400 with max_tokens=2 the 400 named
    `max_tokens` ('the prompt (30297 tokens) and max_tokens (2) need ...'), though no max_tokens could make it fit;
    without max_tokens the same prompt named `messages`. Now both name the messages."""
    from musicflamingo.serve.protocol import prepare

    _, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_cached_tokens=800).resolve(32768, processor.kept_seconds)
    for extra in ({}, {"max_tokens": 2}, {"max_completion_tokens": 2}):
        req = parse_chat_request(
            _body(messages=[{"role": "user", "content": "tempo " * 160}], **extra), settings
        )
        with pytest.raises(APIError) as e:
            prepare(req, processor, settings, 32768, (299,))
        assert e.value.param == "messages", (extra, e.value.body())
        assert e.value.code == "context_length_exceeded"
        assert "at or over this server's max_cached_tokens of 800: no room for an answer" in e.value.message
    # a prompt that fits with a max_tokens that does not still names max_tokens
    req = parse_chat_request(_body(max_tokens=700), settings)
    with pytest.raises(APIError) as e:
        prepare(req, processor, settings, 32768, (299,))
    assert e.value.param == "max_tokens" and "over this server's max_cached_tokens of 800" in e.value.message
