"""The engine worker: one thread owns the `Engine` (it is not thread-safe) and runs continuous batching.

Between decode steps it releases the slots of cancelled requests (a client that disconnected), then admits queued requests into free slots, first come first served, while the KV cache the
engine would need, rows x capacity positions, stays within `max_cached_tokens` (`Engine.fits`: every row is as
long as the longest request's prompt + max_tokens, so one long request holds the memory of as many short ones):
the prefill encodes the request's audio and samples its first token. Each step's tokens, with the answer's new text
(`Slot.text`: decoded by the engine, cut before a stop string, never showing a piece of one), go to their requests'
asyncio queues through their event loop (`call_soon_threadsafe`); a finished request (a stop id, a stop string, its
budget) leaves its slot in the step that finished it. The queue of requests not yet admitted is
bounded: `submit` raises `QueueFull` when `max_queue` requests wait beyond the free slots, which the app answers
with 503 and `Retry-After`.
On shutdown, `drain` stops admissions: queued requests are answered with `SHUTTING_DOWN` at once, live ones once
they finish or their grace period ends, so every client has its answer before the server closes its connections.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from musicflamingo.engine import Engine, Request
from musicflamingo.serve.protocol import Prepared
from musicflamingo.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_ids = itertools.count()
SHUTTING_DOWN = "server_shutting_down"  # the `code` of the error events of a server that is stopping


class QueueFull(Exception):
    """The bounded queue of waiting requests is full."""


class ShuttingDown(Exception):
    """The server is stopping (`EngineWorker.drain`): no new requests."""


@dataclass
class Event:
    """What a request hears from the worker: new tokens and the answer's text they added (`text`: safe to show, the
    engine's `Slot.text`), then once `finish` (the engine's `Slot.finish_reason`: "stop" for a stop id or string,
    "length") or `error` (with its `code`: "engine_error", or `SHUTTING_DOWN`)."""

    tokens: list[int]
    finish: str | None = None
    error: str | None = None
    code: str = "engine_error"
    text: str = ""


@dataclass
class Job:
    """One request on its way through the engine. Created on the event loop; `cancel` may be called from it at
    any time (the worker sees the flag before its next step)."""

    prepared: Prepared
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finished: bool = False
    generated: int = 0
    shown: int = 0  # characters of the answer's text sent so far

    @property
    def reserve(self) -> int:
        """Cache positions the request may fill: its prompt plus its token budget."""
        return self.prepared.prompt_tokens + self.prepared.params.max_new_tokens

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        """Hand an event to the request's coroutine (from the worker thread)."""
        if event.finish is not None or event.error is not None:
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class EngineWorker:
    """Continuous batching over one `Engine` in a background thread (see the module docstring).

    Args:
        model: a `MusicFlamingo` in eval mode.
        slots: requests decoded together at most (`max_batch`).
        max_cached_tokens: the KV cache's positions at most, rows x capacity (None: `slots` rows that grow to
            the longest request seen).
        max_queue: requests waiting for a slot at most, beyond those that will take the free slots (`submit`,
            `queue_full`): requests not yet decoding are `max_queue` + `slots` at most, whatever the slots do.
        compile: decode steps through `torch.compile`.
        tokenizer: decodes the answers (`Event.text`) and matches their stop strings (`SamplingParams.stop_strings`,
            refused without it); None: events carry tokens only.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        slots: int,
        max_cached_tokens: int | None = None,
        max_queue: int = 64,
        compile: bool = False,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.engine = Engine(
            model, slots=slots, compile=compile, max_positions=max_cached_tokens, tokenizer=tokenizer
        )
        self.max_cached_tokens = max_cached_tokens
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._live: dict[int, Job] = {}  # slot -> job; touched by the worker thread only
        # slots held or being taken (popped from the queue, in their prefill): under `_cond`, read by `submit`
        self._taken = 0
        self._slots = slots
        self._cond = threading.Condition()
        self._stop = False
        self._drain_at: float | None = None  # once draining: when live requests are cut (time.monotonic)
        self._thread: threading.Thread | None = None
        self.reserved = 0
        self.peak_reserved = 0
        self.peak_live = 0
        self.peak_cache_positions = 0
        self.steps = 0
        self.tokens = 0
        self.admitted = 0
        self.busy_s = 0.0
        self._note_cache()  # the cache allocated at start is held already
        self._snapshot: dict[str, int | float | None] = {}
        self._publish()

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="musicflamingo-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; requests still queued or live get an error event."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, grace_s: float) -> None:
        """Begin shutting down: admit nothing more, answer the queued requests with a `SHUTTING_DOWN` error now,
        and the live ones when they finish or after `grace_s` seconds, whichever comes first."""
        with self._cond:
            if self._drain_at is None:
                self._drain_at = time.monotonic() + grace_s
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._drain_at is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _room(self) -> int:
        """Requests the queue takes now (under `_cond`): `max_queue` waiting for a slot, plus one per free slot
        (those go on at once; counted as waiting, 8 simultaneous requests with `max_batch=2 max_queue=4` were 4
        refusals, not 2). What requests not yet decoding hold (bodies, features) stays bounded by `max_queue` +
        `slots`, as the memory plan counts."""
        return self.max_queue + max(0, self._slots - self._taken)

    def queue_full(self, also_waiting: int = 0) -> bool:
        """Whether `max_queue` requests wait already beyond the free slots (`also_waiting`: those not handed to the
        worker yet, their audio being decoded)."""
        with self._cond:
            return len(self._pending) + also_waiting >= self._room()

    def submit(self, job: Job) -> None:
        """Queue a request for admission (QueueFull when `max_queue` requests already wait, ShuttingDown once
        draining)."""
        with self._cond:
            if self._drain_at is not None:
                raise ShuttingDown
            if len(self._pending) >= self._room():
                raise QueueFull
            self._pending.append(job)
            self._cond.notify_all()

    def stats(self) -> dict[str, int | float | None]:
        """/health's counters. Those of the engine (live requests, reservations, the cache) as the worker thread
        left them after its last step, all from one moment (read from the event loop, they mixed a step's states:
        a live count beside the reservation of a request already gone, a cache's rows before a resize and its
        capacity after); `queued` as it is now."""
        return {**self._snapshot, "queued": len(self._pending)}

    def _publish(self) -> None:
        """Hand /health the counters now (worker thread; before a request hears its last event, so that a client
        holding its answer sees it counted)."""
        try:
            self._snapshot = self._counters()
        except Exception:  # the counters must never keep an answer from its client
            logger.exception("reading the engine's counters failed")

    def _counters(self) -> dict[str, int | float | None]:
        """The engine's counters now (worker thread). `reserved_tokens`: the live requests' prompt + max_tokens,
        summed. `cache_reserved_positions` (with `max_cached_tokens`): the KV cache's positions, rows x capacity,
        that the live requests hold it to from their admission on, which a new request is admitted beside only if
        the two fit the bound (`Engine.fits`); `cache_positions`: the positions allocated, that or more."""
        cache = self.engine.cache
        reserved_positions = self.engine.reserved_positions()
        return {
            "live": len(self._live),
            "queued": len(self._pending),
            "slots": len(self.engine.slots),
            "reserved_tokens": self.reserved,
            "peak_live": self.peak_live,
            "peak_reserved_tokens": self.peak_reserved,
            "admitted": self.admitted,
            "steps": self.steps,
            "tokens": self.tokens,
            "cache_capacity": cache.capacity,
            "cache_rows": cache.rows,
            "cache_positions": cache.rows * cache.capacity,
            "peak_cache_positions": self.peak_cache_positions,
            "max_cached_tokens": self.max_cached_tokens,
            "cache_reserved_positions": reserved_positions,
            "busy_s": round(self.busy_s, 3),
        }

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self._live:
                    self._cond.wait()
                if self._stop:
                    break
                drain_at = self._drain_at
            t0 = time.perf_counter()
            try:
                self._reap()
                if drain_at is None:
                    self._admit()
                else:
                    self._drain(drain_at)
                if self.engine.decoding:
                    self._fan_out(self.engine.step())
                    self.steps += 1
                    self._note_cache()  # an unbounded cache grows in steps as sequences reach its end
                self._publish()  # /health's numbers, between two steps
            except Exception as e:  # a failing step must not leave requests waiting forever
                logger.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
            self.busy_s += time.perf_counter() - t0
        self._fail_all("the server is shutting down", SHUTTING_DOWN)

    def _drain(self, deadline: float) -> None:
        """While shutting down: the queued requests are answered at once, the live ones at `deadline`."""
        message = "the server is shutting down"
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            job.emit(Event([], error=message, code=SHUTTING_DOWN))
        if time.monotonic() >= deadline:
            self._fail_all(f"{message}: the answer was not finished in time", SHUTTING_DOWN)

    def _untake(self) -> None:
        with self._cond:
            self._taken -= 1

    def _release(self, slot: int) -> None:
        job = self._live.pop(slot)
        with self._cond:
            self._taken -= 1
        self.reserved -= job.reserve
        self.engine.release(slot)

    def _reap(self) -> None:
        """Free the slots of cancelled requests and drop cancelled ones from the queue."""
        for slot, job in list(self._live.items()):
            if job.cancelled:
                self._release(slot)
        with self._cond:
            if any(j.cancelled for j in self._pending):
                self._pending = deque(j for j in self._pending if not j.cancelled)

    def _admit(self) -> None:
        while self.engine.free_slots():
            with self._cond:
                if not self._pending:
                    return
                job = self._pending[0]
                p = job.prepared
                request = Request(p.input_ids, p.params, p.input_features, p.input_features_mask)
                if self._live and not self.engine.fits(request):
                    return  # the oldest request waits for room (no overtaking, so it cannot starve)
                self._pending.popleft()
                self._taken += 1  # its slot is taken from here on (the prefill may take a while)
            try:
                slot = self.engine.admit(request)
            except ValueError as e:  # e.g. a prompt past the model's context
                self._untake()
                job.emit(Event([], error=str(e)))
                continue
            except (
                Exception
            ) as e:  # e.g. out of memory in this prompt's prefill: its slot is free again (admit)
                # and the requests already decoding go on; only this one is answered with the error
                logger.exception("prefill failed")
                self._untake()
                job.emit(Event([], error=f"the engine failed: {type(e).__name__}: {e}"))
                continue
            self._live[slot.index] = job
            self.reserved += job.reserve
            self.admitted += 1
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            self.peak_live = max(self.peak_live, len(self._live))
            self._note_cache()
            self._publish()  # admitted: counted before its first token, and before the next step
            self._fan_out([(slot.index, slot.tokens[-1])])

    def _note_cache(self) -> None:
        cache = self.engine.cache
        self.peak_cache_positions = max(self.peak_cache_positions, cache.rows * cache.capacity)

    def _fan_out(self, produced: list[tuple[int, int]]) -> None:
        for index, token in produced:
            job = self._live[index]
            slot = self.engine.slots[index]
            job.generated += 1
            self.tokens += 1
            text = ""
            # what the token added that is safe to show (held back: what may be a stop string's start)
            if slot.text is not None:
                text = slot.text.since(job.shown)
                job.shown += len(text)
            finish = slot.finish_reason if slot.done else None
            if slot.done:
                self._release(index)
                self._publish()
            job.emit(Event([token], finish, text=text))

    def _fail_all(self, message: str, code: str = "engine_error") -> None:
        live = list(self._live.values())
        for slot in list(self._live):
            self._release(slot)
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        self._publish()
        for job in live:
            job.emit(Event([], error=message, code=code))
        for job in pending:
            job.emit(Event([], error=message, code=code))
