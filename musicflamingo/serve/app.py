"""The ASGI app (Starlette): OpenAI chat completions on the engine worker, the models list, health, the page.

    POST /v1/chat/completions    stream=false: one `chat.completion`; stream=true: `chat.completion.chunk`
                                 Server-Sent Events, then `data: [DONE]`
    GET  /v1/models              the one served model;  GET /v1/models/{id}
    GET  /health                 status and the worker's counters (no key needed)
    GET  /                       the web page (static files under /static, no build step, no CDN)

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
Starlette rather than FastAPI: every request is checked by hand anyway (the errors name the field the way
OpenAI's do, and unknown fields are refused), so FastAPI's pydantic layer would only add a second, differently
worded validation; Starlette is the part of FastAPI this server uses (routing, streaming, static files).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import hmac
import json
import logging
import math
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from musicflamingo.checkpoint import (
    CheckpointError,
    check_checkpoint_dir,
    generation_config,
    load_config,
    stop_token_ids,
)
from musicflamingo.checkpoint import stop_ids as model_stop_ids
from musicflamingo.engine import check_stop_strings
from musicflamingo.inference import load_model
from musicflamingo.model import MusicFlamingo
from musicflamingo.planner import MemoryPlan, check_serving, max_audio_seconds
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.runtime import set_threads
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import ChatRequest, Prepared, parse_chat_request, parse_json, prepare
from musicflamingo.serve.settings import ServeConfigError, ServeSettings
from musicflamingo.serve.text import AnswerStream, ThinkFormat
from musicflamingo.serve.worker import SHUTTING_DOWN, EngineWorker, Event, Job, QueueFull, ShuttingDown
from musicflamingo.settings import check_serve_plan_settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere; recordings play from blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob: data:; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
}


# A body past this is parsed in a thread: json.loads of a 50-MiB body (a 20-minute wav's base64) holds the event
# loop ~0.6 s on this project's CPU machine, every stream's tokens waiting; the thread does its bytes' decoding and
# its scan in two calls, between which the loop runs (each call holds the GIL). Small bodies stay on the loop, where
# a thread's hand-off would cost more than the parse.
PARSE_ON_LOOP_BYTES = 1 << 20


@dataclass
class ServerState:
    """What the routes share: the model's processor, the settings and the engine worker."""

    processor: MusicFlamingoProcessor
    settings: ServeSettings
    worker: EngineWorker
    stop_ids: tuple[int, ...]
    context: int
    started: int
    prepare_limiter: anyio.CapacityLimiter
    think_format: ThinkFormat = ThinkFormat()
    # a request's stop strings when it gives none (`stop` unset or null): generation_config.json's, as infer.py's
    stop_strings: tuple[str, ...] = ()
    # requests between their body and the queue (decoding audio, or waiting to): counted as waiting for a slot
    # (EngineWorker.queue_full), so max_queue + max_batch bounds the bodies and features held
    preparing: int = 0


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ---------------------------------------------------------------------------------------------- helpers
def _check_auth(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), settings.api_key.encode()
    ):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            None,
            "invalid_api_key",
        )


def _shutting_down(settings: ServeSettings, message: str = "the server is shutting down") -> APIError:
    # 503: a balancer (or the client) may retry it on another replica; Retry-After as the busy 503's, which
    # OpenAI's clients wait (without it they back off 0.5-8 s on their own)
    return APIError(
        503,
        f"{message}; retry shortly",
        None,
        SHUTTING_DOWN,
        headers={"Retry-After": str(settings.retry_after_s)},
    )


def _busy(settings: ServeSettings) -> APIError:
    return APIError(
        503,
        f"the server is busy: {settings.max_queue} requests are already waiting (max_queue); retry shortly",
        None,
        "queue_full",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


async def _read_body(request: Request, settings: ServeSettings) -> bytes:
    limit = settings.max_body_bytes
    too_big = APIError(
        413,
        f"the request body is over this server's limit of {settings.max_body_mb:g} MiB (max_body_mb)",
        None,
        "too_large",
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_events(job: Job, watcher: asyncio.Future | None = None) -> list[Event] | None:
    """The next event and any already queued behind it; None when `watcher` (the client's disconnect) fires
    first."""
    if watcher is None:
        first = await job.queue.get()
    else:
        getter = asyncio.ensure_future(job.queue.get())
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            return None
        first = getter.result()
    events = [first]
    while not job.queue.empty() and events[-1].finish is None and events[-1].error is None:
        events.append(job.queue.get_nowait())
    return events


def _usage(p: Prepared, stream: AnswerStream) -> dict[str, Any]:
    return {
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": p.prompt_tokens + stream.completion_tokens,
        "prompt_tokens_details": {"audio_tokens": p.audio_tokens, "cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": stream.reasoning_tokens, "audio_tokens": 0},
    }


class _Answer:
    """One request's answer as events arrive: text deltas out, the finish reason once known. The text is the
    engine's (`Event.text`: stop ids left out, cut before a stop string, which ended the slot in the step that
    completed it); only think mode's split happens here. `log` writes the request's one line in the server log."""

    def __init__(self, state: ServerState, req: ChatRequest, job: Job, cid: str, arrived: float) -> None:
        think = state.think_format if req.think else None
        self.job, self.settings = job, state.settings
        self.text = AnswerStream(state.stop_ids, think)
        self.finish: str | None = None
        self.cid, self.arrived, self.stream = cid, arrived, req.stream
        self.first_at: float | None = None  # when its first token came (time.monotonic, as `arrived`)
        self.logged = False

    def log(self, outcome: str) -> None:
        """The request's line, once, under the `id` its client got (so a client's failure or slow answer can be
        found in the log): how it ended, its tokens and its times from the body's arrival (the first token's
        includes its audio's decoding, its wait for a slot and its prefill)."""
        if self.logged:
            return
        self.logged = True
        p, now = self.job.prepared, time.monotonic()
        first = "" if self.first_at is None else f" (first after {self.first_at - self.arrived:.2f} s)"
        audio = f", {p.audio_tokens} of them audio ({p.audio_seconds:.1f} s)" if p.audio_tokens else ""
        logger.info(
            "%s: %s: %d tokens in %.2f s%s, prompt %d tokens%s%s",
            self.cid,
            outcome,
            self.text.completion_tokens,
            now - self.arrived,
            first,
            p.prompt_tokens,
            audio,
            ", streamed" if self.stream else "",
        )

    def take(self, events: list[Event]) -> tuple[str, str]:
        """The deltas of `events` (in order; an error or the finish only at the end)."""
        last = events[-1]
        if last.error is not None:
            if last.code == SHUTTING_DOWN:
                err = _shutting_down(self.settings, last.error)
            else:
                err = APIError(500, f"generation failed: {last.error}", None, "engine_error")
            self.log(f"{err.status} {err.code}: {err.message}")
            err.logged = True
            raise err
        reasoning = content = ""
        for event in events:  # one token each: the reasoning tokens are counted to the one closing the block
            r, c = self.text.push(event.tokens, event.text)
            reasoning, content = reasoning + r, content + c
        if self.first_at is None:
            self.first_at = time.monotonic()
        if last.finish is not None:
            self.finish = last.finish
            r, c = self.text.finish()
            reasoning, content = reasoning + r, content + c
            self.log(f"finish_reason {last.finish}")
        return reasoning, content


# ---------------------------------------------------------------------------------------------- routes
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    settings = state.settings
    _check_auth(request, settings)
    arrived = time.monotonic()
    if state.worker.draining:
        raise _shutting_down(settings)
    if not state.worker.alive:
        raise APIError(503, "the engine is not running", None, "engine_stopped")
    body = await _read_body(request, settings)
    content_type = request.headers.get("content-type")
    if (
        len(body) > PARSE_ON_LOOP_BYTES
    ):  # a song's base64: parsed beside the other clients' streams, not before them
        data = await anyio.to_thread.run_sync(parse_json, body, content_type)
    else:
        data = parse_json(body, content_type)
    del body  # (the parsed strings hold the audio's base64 from here on, not the bytes as well)
    req = parse_chat_request(data, settings)
    if state.worker.queue_full(also_waiting=state.preparing):
        raise _busy(settings)  # before decoding any audio: bodies and features being prepared are bounded too
    # Watched from here on: a client that leaves while its audio is decoded is not admitted (its prefill, the audio
    # encoder, ran for nobody); reading the connection is what notices it (uvicorn pauses reading big bodies).
    watcher = asyncio.ensure_future(_until_disconnect(request))
    job: Job | None = None
    streaming = False  # once the stream is handed over, it cancels the job however it ends
    try:
        state.preparing += 1  # the event loop's thread only: no lock needed
        try:
            args = (req, state.processor, settings, state.context, state.stop_ids, state.stop_strings)
            prepared = await anyio.to_thread.run_sync(prepare, *args, limiter=state.prepare_limiter)
        finally:
            state.preparing -= 1
        if watcher.done():
            return Response(status_code=499)  # nobody is listening
        job = Job(prepared, asyncio.get_running_loop())
        try:
            state.worker.submit(job)
        except QueueFull:
            raise _busy(settings) from None
        except ShuttingDown:
            raise _shutting_down(settings) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        answer = _Answer(state, req, job, cid, arrived)
        events = await _next_events(job, watcher)  # waits in the queue, then for the prefill
        if events is None:
            job.cancel()
            answer.log("the client left")
            return Response(status_code=499)  # nobody is listening
        first = events
        if first[-1].error is not None:
            answer.take(first)  # raises the error as a response
        if req.stream:
            watcher.cancel()  # StreamingResponse watches the connection from here on
            streaming = True
            return _JobStream(
                answer,
                _sse(state, req, prepared, answer, first, cid, created),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        reasoning, content = answer.take(first)
        parts_r, parts_c = [reasoning], [content]
        while answer.finish is None:
            events = await _next_events(job, watcher)
            if events is None:
                job.cancel()
                answer.log("the client left")
                return Response(status_code=499)
            r, c = answer.take(events)
            parts_r.append(r)
            parts_c.append(c)
    finally:
        watcher.cancel()
        if job is not None and not streaming:
            job.cancel()
    message: dict[str, Any] = {"role": "assistant", "content": "".join(parts_c), "refusal": None}
    if req.think:
        message["reasoning_content"] = "".join(parts_r)
    body = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": settings.model_name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}],
        "usage": _usage(prepared, answer.text),
    }
    return JSONResponse(body)


class _JobStream(StreamingResponse):
    """A stream that cancels its job however the response ends. `_sse`'s own `finally` runs only once its first
    event is asked for: a client gone before the response started (the headers' send fails, or the server is cut)
    left the job decoding its whole budget in a slot nobody read."""

    def __init__(self, answer: _Answer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer = answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # the client left: nobody to answer, and nothing went wrong here
            pass
        finally:
            self.answer.job.cancel()
            self.answer.log("the client left")  # unless its answer ended


async def _sse(
    state: ServerState,
    req: ChatRequest,
    prepared: Prepared,
    answer: _Answer,
    first: list[Event],
    cid: str,
    created: int,
) -> AsyncIterator[str]:
    """The `chat.completion.chunk` events of one answer; the job is cancelled however the stream ends (a client
    that goes away closes this generator)."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.settings.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if req.include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        events: list[Event] | None = first
        while True:
            if events is None:
                events = await _next_events(answer.job)
            try:
                reasoning, content = answer.take(events)
            except APIError as e:
                yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
                break
            delta = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if delta:
                yield chunk(delta)
            if answer.finish is not None:
                yield chunk({}, answer.finish)
                if req.include_usage:
                    usage = {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": state.settings.model_name,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": _usage(prepared, answer.text),
                    }
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            events = None
        yield "data: [DONE]\n\n"
    finally:
        answer.job.cancel()
        answer.log("the client left")  # unless its answer ended


async def list_models(request: Request) -> Response:
    state = _state(request)
    _check_auth(request, state.settings)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    _check_auth(request, state.settings)
    name = request.path_params["model"]
    if name != state.settings.model_name:
        raise APIError(404, f"model {name!r} is not served here", "model", "model_not_found")
    return JSONResponse(_model_card(state))


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.settings.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "musicflamingo",
        "max_model_len": state.context,
    }


async def health(request: Request) -> Response:
    state = _state(request)
    alive = state.worker.alive and not state.worker.draining
    body = {
        "status": "ok" if alive else ("stopping" if state.worker.draining else "stopped"),
        "model": state.settings.model_name,
        "auth": state.settings.api_key is not None,
        "max_audio_seconds": state.settings.max_audio_seconds,
        **state.worker.stats(),
    }
    return JSONResponse(body, status_code=200 if alive else 503)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def _client_left(request: Request, exc: Exception) -> Response:
    # a client that closed its connection while sending its body (a cancelled upload): nobody to answer, nothing
    # went wrong here (it was logged twice as an unexpected error, with a traceback each)
    logger.info("%s %s: the client left before its body was read", request.method, request.url.path)
    return Response(status_code=499)


_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed"}
API_ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /health"


def _not_found(method: str, path: str, detail: str) -> str:
    """A 404's message: the routes this server has, and the base URL a client most likely meant (a client whose
    base_url lacks /v1 posts to /chat/completions; one that speaks another API, /v1/responses or /api/chat)."""
    message = f"{method} {path}: {detail}; this server has {API_ROUTES}"
    for route in ("/chat/completions", "/models"):
        if path.rstrip("/").endswith(route):  # /chat/completions, /v1/v1/chat/completions, /api/models
            return f"{message} (an OpenAI client's base URL is http://HOST:PORT/v1, /v1 once)"
    return message


async def _api_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, APIError):
        # the server's side of a refusal (a client's tool may show it nowhere): one line, as its client got it
        if not exc.logged:
            logger.info(
                "%s %s: %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message
            )
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    if isinstance(exc, HTTPException):  # routing's: no such path (404), a method the path does not take (405)
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        path = request.url.path
        message = f"{request.method} {path}: {exc.detail}"
        if exc.status_code == 404 and not path.startswith("/static/"):
            message = _not_found(request.method, path, exc.detail)
        err = APIError(exc.status_code, message, None, code)
        logger.info("%d %s: %s", err.status, err.code, err.message)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))
    logger.exception("unexpected error in %s %s", request.method, request.url.path)
    err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")
    return JSONResponse(err.body(), status_code=500)


class _InternalErrors:
    """An unexpected exception answered as a 500 in the API's error shape, inside the CORS middleware: Starlette runs
    an `Exception` handler outside every middleware, so a page of a `cors_origins` origin got a 500 without
    Access-Control-Allow-Origin and its browser showed a CORS failure instead of the message. Logged once (Starlette
    re-raised it to uvicorn, which logged the traceback again); one raised after the answer began is re-raised."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            response = await _api_error(Request(scope), exc)
            await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------- assembly
def create_app(
    model: MusicFlamingo,
    processor: MusicFlamingoProcessor,
    settings: ServeSettings,
    stop_ids: tuple[int, ...] | list[int] | None = None,
    stop_strings: Sequence[str] | None = None,
) -> Starlette:
    """The app for a loaded model. The engine worker starts and stops with the app's lifespan; `app.state.server`
    holds it (`ServerState`). `stop_ids`: the ids that end an answer (default: generation_config.json's eos ids
    and the config's, as infer.py and eval.py stop). `stop_strings`: those that end the answer of a request that
    gives no `stop` (default: generation_config.json's `stop_strings`, as infer.py's `stop: null`)."""
    context = model.config.text.max_position_embeddings
    # whole windows: past them the processor cuts the audio (max_audio_len 100 with 30-s windows keeps 90 s)
    settings.resolve(context, processor.kept_seconds)
    if stop_ids is None:  # generation_config.json's eos + the config's, as infer and eval stop
        stop_ids = model_stop_ids(getattr(model, "generation_defaults", {}), model.config)
    if stop_strings is None:
        stop_strings = _default_stop_strings(
            getattr(model, "generation_defaults", {}), "generation_config.json"
        )
    stop_strings = check_stop_strings(stop_strings)
    worker = EngineWorker(
        model,
        settings.max_batch,
        settings.max_cached_tokens,
        settings.max_queue,
        settings.compile,
        tokenizer=processor.tokenizer,  # the engine decodes the answers and matches their stop strings
    )
    # Audio decoding and log-mel run in a few threads of their own: they bound the CPU and memory that requests
    # being prepared take, and the number of glibc malloc arenas (one per thread that allocates).
    limiter = anyio.CapacityLimiter(settings.prepare_threads)
    state = ServerState(processor, settings, worker, tuple(stop_ids), context, int(time.time()), limiter)
    state.stop_strings = stop_strings

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(worker.stop)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {
        APIError: _api_error,
        HTTPException: _api_error,
        ClientDisconnect: _client_left,
    }
    middleware = [Middleware(_InternalErrors)]  # the last: inside the CORS middleware
    if settings.cors_origins:
        # pages of these origins may call the API from a browser: the preflight (OPTIONS) answered, and the answers
        # (errors included) carry Access-Control-Allow-Origin; any request header, since the openai JS client sends
        # its own (x-stainless-*); no cookies: the key goes in the Authorization header; a 503's Retry-After is
        # exposed (no CORS-safelisted header: a page's client could not read it, and retried at its own pace)
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["Retry-After"],
                max_age=600,
            ),
        )
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.state.server = state
    return app


def _default_stop_strings(generation: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """generation_config.json's `stop_strings` (`where` names the file), checked: a bad value is a CheckpointError."""
    try:
        return check_stop_strings(generation.get("stop_strings"), "stop_strings")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def build_server(cfg: Mapping[str, Any]) -> tuple[Starlette, ServeSettings]:
    """`configs/serve.yaml`-shaped settings -> (app, settings): settings checked before the checkpoint is read,
    then the model loaded. `model_name` null names the model after the checkpoint folder."""
    set_threads(cfg.get("threads"))
    settings = ServeSettings.from_cfg(cfg)
    ckpt = check_checkpoint_dir(cfg.get("ckpt"))
    if not cfg.get("model_name"):
        settings.model_name = ckpt.name
    # the limits checked against the model's (max_audio_seconds, max_prompt_tokens) before the weights are read: the
    # release's took minutes to load before a setting over its limits stopped the server
    # (on a copy: create_app fills the unset limits from the loaded processor)
    config = load_config(ckpt)
    copy.copy(settings).resolve(config.text.max_position_embeddings, max_audio_seconds(ckpt, config))
    stop_strings = _default_stop_strings(generation_config(ckpt), str(ckpt / "generation_config.json"))
    model, processor = load_model(
        ckpt, cfg.get("device", "auto"), cfg.get("dtype", "auto"), cfg.get("quantize")
    )
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config), stop_strings)
    if not settings.loopback and settings.api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use the model "
            "(set api_key= or MUSICFLAMINGO_API_KEY)",
            settings.host,
        )
    if settings.cors_origins and "*" in settings.cors_origins and settings.api_key is None:
        logger.warning(
            "cors_origins='*' without an API key: any web page this machine's browsers open can use the model "
            "(set api_key= or name the pages' origins)"
        )
    return app, settings


class Server(uvicorn.Server):
    """uvicorn's server whose shutdown (SIGINT, SIGTERM) first drains the engine (`EngineWorker.drain`): queued
    requests are answered 503 at once and answers being generated get `grace_s` seconds to finish, then 503 too (a
    stream: an error event, then `[DONE]`). So every client gets an OpenAI-shaped answer before the server closes;
    without it uvicorn waited for the connections, then cancelled them: a bare 'Internal Server Error', streams cut
    without `[DONE]`, and a traceback each in the log."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace_s: float = 5.0) -> None:
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        self.worker.drain(self.grace_s)
        await super().shutdown(sockets)


def plan_server(cfg: Mapping[str, Any]) -> MemoryPlan:
    """The memory plan of the server `cfg` describes, from the checkpoint's config (no weight read): every slot
    grown to the longest sequence a request may reach (`planner.check_serving`); with `memory_check=true`, one
    that would not fit is refused (MemoryPlanError, naming the settings that would)."""
    ServeSettings.from_cfg(cfg)  # the settings' own errors first
    check_serve_plan_settings(cfg)
    return check_serving(cfg, check_checkpoint_dir(cfg.get("ckpt")))


_LISTEN_HINTS = {
    errno.EADDRINUSE: " (another server listens there: stop it or choose another port=)",
    errno.EADDRNOTAVAIL: " (no address of this machine: 127.0.0.1 for this machine only, 0.0.0.0 for every interface)",
    errno.EACCES: " (ports below 1024 need root: choose another port=)",
}


def check_listen(host: str, port: int) -> list[socket.socket]:
    """Whether the server could listen on `host`:`port`, tried as uvicorn (asyncio's `create_server`) binds it: every
    address the host name has, with SO_REUSEADDR; a ServeConfigError naming host and port if not. Run before the
    weights load: a port in use (another serve.py) or a host not on this machine was found only after them.

    `port` 0 is an ephemeral port, as uvicorn's: the first address binds one and the host's other addresses the same
    one; those sockets are returned, bound, for uvicorn to serve on (so the "serving on" line can name the port, and
    it is held from now on). Any other port: [] (the sockets tried are closed; uvicorn binds its own)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeConfigError(f"host={host}: not an address or a known host name ({e.strerror})") from None
    unavailable = None  # the first address that is not this machine's
    held: list[socket.socket] = []
    bound = 0
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 off): skipped, as asyncio skips it
                continue
            with contextlib.ExitStack() as closing:
                closing.callback(sock.close)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if held:  # port 0: the port the first address got
                    address = (address[0], held[0].getsockname()[1], *address[2:])
                try:
                    sock.bind(address)
                    bound += 1
                except OSError as e:
                    where = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                    problem = f"host={host} port={port}: cannot listen on {where}:{address[1]}: {e.strerror}"
                    if e.errno == errno.EADDRNOTAVAIL or (held and e.errno == errno.EADDRINUSE):
                        # skipped while another address binds, as asyncio skips it from Python 3.12 ('localhost' is
                        # also ::1 where IPv6 is off): uvicorn listens on the others (and port 0: the port the
                        # first address got may be taken on another)
                        unavailable = unavailable or problem + _LISTEN_HINTS[e.errno]
                        continue
                    raise ServeConfigError(problem + _LISTEN_HINTS.get(e.errno, "")) from None
                if port == 0:
                    held.append(sock)
                    closing.pop_all()
    except BaseException:
        for sock in held:
            sock.close()
        raise
    if not bound and unavailable:
        raise ServeConfigError(unavailable)
    return held


def serve(cfg: Mapping[str, Any]) -> None:
    """Load the model and serve it until interrupted (`serve.py`); `plan=true` prints the memory plan instead."""
    check_serve_plan_settings(cfg)
    if cfg.get("plan") or cfg.get("memory_check"):
        plan = plan_server(cfg)
        if cfg.get("plan"):
            print(plan.table())
            return
    settings = ServeSettings.from_cfg(cfg)
    sockets = check_listen(settings.host, settings.port)  # port=0: the ephemeral port's, held from here on
    try:
        app, settings = build_server(cfg)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    port = sockets[0].getsockname()[1] if sockets else settings.port
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address
    logger.info("serving %s on http://%s:%d (page at /, API at /v1)", settings.model_name, host, port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=str(cfg.get("log_level", "INFO")).lower(),
        access_log=bool(cfg.get("access_log", False)),
        # the answers' last bytes after the grace period (uvicorn then cancels what is left)
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 2,
    )
    server = Server(config, app.state.server.worker, settings.shutdown_grace_s)
    # uvicorn raises a SIGINT again once shut down: suppressed, as uvicorn.run does
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets or None)
    if not server.started:  # e.g. the port is taken (uvicorn logged why), as uvicorn.run exits
        sys.exit(3)
