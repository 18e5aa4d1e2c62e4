"""Shared entry-point plumbing: turn the project's input errors into one clear line and an exit code.

Which errors are input errors is decided by where they come from, not by catching everything:

* errors the project raises on purpose: a `ValueError` (or `KeyError`, `FileNotFoundError`, `NotADirectoryError`)
  whose type the project defines, or that project code raises itself (the innermost traceback frame is under
  `musicflamingo/`, or in a DataLoader worker's traceback, under it there); the same error raised inside torch,
  numpy or another library is a bug of ours (a value we passed on unchecked) and keeps its traceback;
* an `OSError` that names a file (`filename`): a missing, unreadable or unwritable file or folder, wherever raised;
* what Hydra could not build from the config: a `ValueError`/`TypeError` from the constructor of a configured
  third-party object (Trainer, logger, strategy), named with its config key; Lightning's
  `MisconfigurationException`;
* deliberate stops (`errors.RunStopped`: too many bad samples, NaN loss, a signal), with their own exit code.

Exit codes: 0 done, 1 a bug (traceback) or a command line Hydra could not compose, 2 bad input, 128 + N stopped by
signal N (130 SIGINT / Ctrl-C, 143 SIGTERM; 141 the reader of our pipe left, `| head`). docs/robustness.md has the
table.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException, OverrideParseException
from omegaconf.errors import MissingMandatoryValue

from musicflamingo.errors import RunStopped
from musicflamingo.runtime import quiet_known_warnings, tune_cpu

PACKAGE_DIR = Path(__file__).resolve().parent
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a program its pipe's reader left

# Error types that describe bad input when project code raises them (a ValueError subclass defined by the project
# always does); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    KeyError,
    RunStopped,
)
# Lightning's own "your Trainer settings are wrong" error, looked up only once Lightning is loaded (cli.py does
# not import Lightning: infer.py never needs it).
_LIGHTNING_CONFIG_ERROR = ("lightning.fabric.utilities.exceptions", "MisconfigurationException")
_WORKER_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+', re.MULTILINE)


def error_line(e: BaseException) -> str:
    """The one line to show for `e`. An error re-raised from a DataLoader worker carries the worker's traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."): show its last line."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if getattr(e, "multiline", False):  # the memory planner's refusal: a line per setting that would fit
        return "\n".join(lines)
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and head.split(".")[-1] == type(e).__name__ else last
    return lines[0]


def raised_in_project(e: BaseException) -> bool | None:
    """Whether project code raised `e`: its innermost traceback frame (for an error re-raised from a DataLoader
    worker, the worker's innermost frame) is under `musicflamingo/`. None when `e` was never raised."""
    worker = _WORKER_FRAME.findall(str(e)) if "Original Traceback" in str(e) else []
    if worker:
        filename = worker[-1]
    else:
        tb = e.__traceback__
        if tb is None:
            return None
        while tb.tb_next is not None:
            tb = tb.tb_next
        filename = tb.tb_frame.f_code.co_filename
    return Path(filename).resolve().is_relative_to(PACKAGE_DIR)


def _is_lightning_config_error(e: BaseException) -> bool:
    module = sys.modules.get(_LIGHTNING_CONFIG_ERROR[0])
    cls = getattr(module, _LIGHTNING_CONFIG_ERROR[1], None)
    return cls is not None and isinstance(e, cls)


def _stop(e: BaseException) -> RunStopped | None:
    """The deliberate stop `e` is, or that Hydra wrapped while building an object (a signal during model build)."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e if isinstance(e, RunStopped) else None


def user_error_line(e: BaseException) -> str | None:
    """The one line to print for an input error or a deliberate stop; None for anything else (a bug: keep the
    traceback). Unwraps Hydra's "Error in call to target" and names an unset mandatory (`???`) config value."""
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "a mandatory config value"
        return f"{key} is not set: pass {key}=... on the command line"
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        cause = e.__cause__
        line = user_error_line(cause)
        if line is None and isinstance(cause, (ValueError, TypeError)) and not raised_in_project(cause):
            # a configured library object (Trainer, logger, strategy) refused its arguments
            key = _full_key(str(e))
            line = f"{key}: {error_line(cause)}" if key else error_line(cause)
        return line
    if isinstance(e, RunStopped) or _is_lightning_config_error(e):
        return error_line(e)
    if isinstance(e, OSError) and getattr(e, "filename", None) is not None:
        where = f"{e.filename} -> {e.filename2}" if getattr(e, "filename2", None) else str(e.filename)
        return f"{where}: {e.strerror or error_line(e)}"
    if isinstance(e, USER_ERRORS) and (
        type(e).__module__.startswith("musicflamingo.") or raised_in_project(e) is not False
    ):
        return error_line(e)
    return None


def _full_key(message: str) -> str | None:
    """The config key Hydra names in an InstantiationException's message (`full_key: model.optimizer`)."""
    match = re.search(r"^full_key: (\S+)", message, re.MULTILINE)
    return match.group(1) if match else None


def stop_exit_code(e: BaseException, default: int = EXIT_BAD_INPUT) -> int:
    """The exit code for an input error or a deliberate stop: a stop by signal carries its own (128 + signal)."""
    stop = _stop(e)
    return int(getattr(stop, "exit_code", default) or default)


def run_cli(fn: Callable[[], Any], prefix: str = "error", exit_code: int = EXIT_BAD_INPUT) -> Any:
    """Call `fn()`; an input error or a deliberate stop prints `<prefix>: <one line>` and exits with `exit_code`
    (a stop by signal with 128 + its number).

    Ctrl-C outside training exits with 130 after an empty line, without a traceback. CPU allocations are tuned first
    (:func:`musicflamingo.runtime.tune_cpu`) and known-harmless library warnings silenced
    (:func:`musicflamingo.runtime.quiet_known_warnings`).
    """
    tune_cpu()
    quiet_known_warnings()
    try:
        return fn()
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    except BrokenPipeError:
        # The reader of our output left (`infer.py ... | head`): stop quietly, as `cat` does. stdout goes to
        # /dev/null first, or the interpreter's final flush would report the broken pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"{prefix}: {line}", file=sys.stderr)
        sys.exit(stop_exit_code(e, exit_code))


def check_overrides(argv: list[str]) -> None:
    """Exit 2 with a hint when a `key=value` of `argv` is not Hydra override syntax (a file name with an accent,
    an apostrophe, brackets or `=`; a prompt with `?` or `'`), instead of Hydra's lexer error and exit 1."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    multirun = "-m" in argv or "--multirun" in argv
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:  # Hydra's own flags (--cfg job, -m) and their values
            continue
        try:
            sweep = parser.parse_overrides([arg])[0].is_sweep_override()
            problem = "a comma outside quotes makes a sweep" if sweep and not multirun else None
        except OverrideParseException as e:
            problem = error_line(e)
        if problem:
            key, value = arg.split("=", 1)
            print(f"error: {key}: Hydra cannot read {arg!r} ({problem})", file=sys.stderr)
            print(f"quote the value for Hydra, inside shell quotes: {_quoted(key, value)}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)


def _quoted(key: str, value: str) -> str:
    """Shell words that give Hydra `key` = the text `value`: Hydra's double quotes inside the shell's single
    quotes, or (the value holds an apostrophe) escaped inside the shell's double quotes."""
    if value.startswith("[") and value.endswith("]"):
        return f"""'{key}=["first song.flac","café.flac"]' (each item in Hydra's double quotes)"""
    if "'" not in value and '"' not in value:
        return f"""'{key}="{value}"'"""
    if '"' not in value and not any(c in value for c in "$`\\!"):
        return f'"{key}=\\"{value}\\""'
    return f"""'{key}="..."' (with \\" for each " inside the value)"""
