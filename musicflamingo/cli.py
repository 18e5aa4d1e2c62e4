"""Shared entry-point plumbing: turn the project's input errors into one clear line and exit code 2."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("musicflamingo")

# Errors that describe bad input (files, configs, data); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


def _stop_errors() -> tuple[type[BaseException], ...]:
    """Deliberate stops of a run (too many bad samples, NaN/inf loss): their message says it all."""
    from musicflamingo.data.dataset import TooManyBadSamplesError
    from musicflamingo.lit import NonFiniteLossError

    return (TooManyBadSamplesError, NonFiniteLossError)


def error_line(e: BaseException) -> str:
    """The one line to show for `e`. An error re-raised from a DataLoader worker carries the worker's traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."): show its last line."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and head.split(".")[-1] == type(e).__name__ else last
    return lines[0]


def user_error_line(e: BaseException) -> str | None:
    """The one line to print for an input error or a deliberate stop; None for anything else (a bug: keep the
    traceback). Unwraps Hydra's "Error in call to target" and names an unset mandatory (`???`) config value."""
    try:
        from hydra.errors import InstantiationException
        from omegaconf.errors import MissingMandatoryValue
    except ImportError:  # pragma: no cover - both are runtime requirements
        InstantiationException = MissingMandatoryValue = ()  # type: ignore[assignment,misc]
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "a mandatory config value"
        return f"{key} is not set: pass {key}=... on the command line"
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        return user_error_line(e.__cause__)
    if isinstance(e, USER_ERRORS + _stop_errors()):
        return error_line(e)
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def tune_cpu_allocator() -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the kernel (glibc only).

    By default glibc serves blocks over its mmap threshold with fresh `mmap`s and trims the heap top after frees,
    so a training step that allocates and frees the same activation-sized blocks (MBs each) page-faults on every
    one of them again, zeroing pages each time. Measured on the main job (2 cores, bf16): a float32 softmax over
    (32, 413, 413) scores took 18 ms instead of 4 ms, and a whole training step took ~10% longer. Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold to 1 GiB makes the heap reuse those pages; the cost
    is up to 1 GiB of freed memory kept in the process. Set `MUSICFLAMINGO_TUNE_MALLOC=0` to leave glibc alone.
    Returns whether the settings were applied.
    """
    if os.environ.get("MUSICFLAMINGO_TUNE_MALLOC", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc without the usual soname
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    return bool(ok_mmap and ok_trim)


ONEDNN_CACHE_CAPACITY = 256
# oneDNN's own primitive cache, and ideep's (the layer between torch and oneDNN), which keeps primitives alive too.
_ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> str:
    """Cap the two caches of compiled oneDNN primitives (1024 entries each by default) at `capacity`, each unless
    its variable (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`) is already set.

    On CPU, bf16 matmuls and convolutions run through oneDNN, which compiles a primitive for every new shape
    (~1 ms) and keeps it, with its buffers, in both caches (~0.4-0.7 MB per shape, measured). Training batches
    and prompts change shape all the time, so with the defaults memory grows for the first ~1000 shapes; a cap on
    only one cache does not stop it (900 new matmul shapes: +381 MB with oneDNN's alone at 32, +36 MB with both at
    32). The cap must hold one training step's shapes, or every step compiles them again: the bench's bf16 step
    uses 96 distinct primitives, and with 32 entries it recreated 97 of them per step (32 ms of a ~1 s step).
    Main job, 150 steps, 1 thread: 256 in both caches, 1.88 GB peak RSS and 2770 tokens/s, against 1.97 GB and
    2689 with oneDNN's alone at 32. Both libraries read their variable when they first build a primitive, so
    this works as long as none has been built yet. Returns oneDNN's capacity in effect.
    """
    for name in _ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return os.environ[_ONEDNN_CACHE_VARIABLES[0]]


def run_cli(fn: Callable[[], Any], prefix: str = "error", exit_code: int = 2) -> Any:
    """Call `fn()`; an input error or a deliberate stop prints `<prefix>: <one line>` and exits with `exit_code`.

    Ctrl-C exits with 130 after an empty line, without a traceback. CPU allocations are tuned first
    (:func:`tune_cpu_allocator`, :func:`limit_onednn_cache`).
    """
    tune_cpu_allocator()
    limit_onednn_cache()
    try:
        return fn()
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"{prefix}: {line}", file=sys.stderr)
        sys.exit(exit_code)
