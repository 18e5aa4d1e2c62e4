"""Shared entry-point plumbing: turn the project's input errors into one clear line and exit code 2."""

from __future__ import annotations

import logging
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


def run_cli(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        if not isinstance(e, USER_ERRORS + _stop_errors()):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
