"""Shared entry-point plumbing: turn the project's input errors into one clear line and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from musicflamingo.errors import RunStopped
from musicflamingo.runtime import tune_cpu

# Errors that describe bad input (files, configs, data) or a deliberate stop of a run; anything else is a bug and
# keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    KeyError,
    RunStopped,
)


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
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "a mandatory config value"
        return f"{key} is not set: pass {key}=... on the command line"
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        return user_error_line(e.__cause__)
    if isinstance(e, USER_ERRORS):
        return error_line(e)
    return None


def run_cli(fn: Callable[[], Any], prefix: str = "error", exit_code: int = 2) -> Any:
    """Call `fn()`; an input error or a deliberate stop prints `<prefix>: <one line>` and exits with `exit_code`.

    Ctrl-C exits with 130 after an empty line, without a traceback. CPU allocations are tuned first
    (:func:`musicflamingo.runtime.tune_cpu`).
    """
    tune_cpu()
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
