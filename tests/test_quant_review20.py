"""int4 on an AVX2-only CPU, review round 20: a `dequantize` or a save racing the one-time repack into blocks of
32 reads the weight and its block as one pair.

The kernel here is a stand-in that reads blocks of 32 (`avx2`), so these run on any CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from test_second_look2_review19 import _layer, avx2  # noqa: F401  (avx2: a fixture)

from musicflamingo.model import quantize as Q


class _WatchedLock:
    """`_REPACK_LOCK` that says (`contended`) when a thread finds it held and waits for it."""

    def __init__(self) -> None:
        self.lock, self.contended = threading.Lock(), threading.Event()

    def __enter__(self) -> _WatchedLock:
        if not self.lock.acquire(blocking=False):
            self.contended.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class _RefusedLock:
    def __enter__(self) -> None:
        raise AssertionError("took the repack lock")

    def __exit__(self, *exc: object) -> None: ...


class _PausingBuffers(dict):
    """A module's `_buffers` where the thread named `thread` pauses right after its first read (`on="get"`) or
    write (`on="set"`) of `weight`, until `resume` is set."""

    def __init__(self, buffers: dict, thread: str, on: str) -> None:
        super().__init__(buffers)
        self.thread, self.on = thread, on
        self.paused, self.resume = threading.Event(), threading.Event()

    def _pause(self, name: str, on: str) -> None:
        if (name, on) == ("weight", self.on) and threading.current_thread().name == self.thread:
            if not self.paused.is_set():
                self.paused.set()
                # 60 s only against a hang if the code deadlocks: every path sets `resume` at once
                assert self.resume.wait(60), "the other thread neither ended nor waited for the lock"

    def __getitem__(self, name: str):  # noqa: ANN204
        value = super().__getitem__(name)
        self._pause(name, "get")
        return value

    def __setitem__(self, name: str, value: object) -> None:
        super().__setitem__(name, value)
        self._pause(name, "set")


def _interleave(
    q: Q.Int4Linear,
    monkeypatch: pytest.MonkeyPatch,
    first: Callable[[], None],
    second: Callable[[], None],
    on: str,
) -> None:
    """Run `first` in a thread until it reads (`on="get"`) or writes (`"set"`) `q.weight`, then `second` in another
    until it ends or waits for the repack lock, then let both finish. No timing: events order the threads."""
    lock = _WatchedLock()
    monkeypatch.setattr(Q, "_REPACK_LOCK", lock)
    buffers = q._buffers = _PausingBuffers(q._buffers, "first", on)
    errors: list[BaseException] = []

    def run(fn: Callable[[], None], after: threading.Event | None) -> None:
        try:
            if after is not None:
                after.wait()
            fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(e)
        finally:
            if after is not None:
                buffers.resume.set()

    def resume_when_contended() -> None:
        lock.contended.wait()
        buffers.resume.set()

    threads = [
        threading.Thread(target=run, args=(first, None), name="first"),
        threading.Thread(target=run, args=(second, buffers.paused), name="second"),
        threading.Thread(target=resume_when_contended),
    ]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join()
    lock.contended.set()  # (if nothing waited for the lock: let the third thread end)
    threads[2].join()
    q._buffers = dict(buffers)
    if errors:
        raise errors[0]
    assert buffers.paused.is_set()


@pytest.mark.parametrize(
    "who_pauses", ["dequantize after reading the weight", "repack after writing the weight"]
)
def test_dequantize_during_the_repack_reads_weight_and_block_as_a_pair(avx2, monkeypatch, who_pauses):  # noqa: F811
    """A thread dequantizing (a long prefill) while another runs the kernel for the first time (the repack): one
    is paused between its reads (or writes) of `weight` and `packed_block` while the other runs. `dequantize` read
    the old weight with the new block (or the new weight with the old block) and unpacked garbage; now it reads the
    pair under the repack's lock, and without it once the layout is final (the decode path's case)."""
    q, _, deq = _layer()
    got: dict[str, torch.Tensor] = {}

    def dequantize() -> None:
        got["w"] = q.dequantize(torch.float32)

    if who_pauses.startswith("dequantize"):
        _interleave(q, monkeypatch, dequantize, q._kernel_layout, "get")
    else:
        _interleave(q, monkeypatch, q._kernel_layout, dequantize, "set")
    assert q.packed_block == 32
    assert torch.equal(got["w"], deq)  # was wrong in most entries: one layout unpacked as the other
    monkeypatch.setattr(Q, "_REPACK_LOCK", _RefusedLock())
    assert torch.equal(q.dequantize(torch.float32), deq)


def test_a_save_during_the_repack_writes_the_checkpoint_layout(avx2, monkeypatch):  # noqa: F811
    """`state_dict()` while the repack has set the new weight but not yet its block: the save wrote the new weight
    (blocks of 32) as a checkpoint's (blocks of 64); now it reads the pair under the lock and repacks it back."""
    q, saved, _ = _layer()
    got: dict[str, dict[str, torch.Tensor]] = {}
    _interleave(q, monkeypatch, q._kernel_layout, lambda: got.update(state=q.state_dict()), "set")
    assert q.packed_block == 32
    assert torch.equal(got["state"]["weight"], saved["weight"])
