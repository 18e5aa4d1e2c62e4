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

* a config value whose interpolation cannot be resolved (`${oc.env:UNSET}`, `${no.such.key}`), named with its key.

The command line itself is checked before Hydra runs (:func:`check_command_line`, from each entry point's
`__main__`): a value Hydra's grammar cannot read, a comma without `-m`, a misspelt key or group (`experment=lora`,
`benchmark=gtzann`), `+key=` for a key that exists, a config group set to null, a key holding `{}` set without `+`,
a run folder that cannot be resolved or is a file: one line naming the override and what was expected, exit 2
(Hydra printed several lines, suggested `+experment=lora`, and exited 1).
`HYDRA_FULL_ERROR=1` skips that check and leaves Hydra's own tracebacks.

Sweeps (`-m`): a job that fails with an input error prints its line prefixed with the job (`job #1
(benchmark=lyrics)`) and the sweep goes on with the next job, as Hydra does for other failures; the process exits
with the first failed job's code after a summary line (:func:`run_entry_point`). A stop by signal ends the sweep.

Exit codes: 0 done, 1 a bug (traceback), 2 bad input, 128 + N stopped by signal N (130 SIGINT / Ctrl-C, 143 SIGTERM;
141 the reader of our pipe left, `| head`). docs/robustness.md has the table.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException, OverrideParseException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from musicflamingo.errors import RunStopped

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
# an error listing its problems on indented lines under its first: how many of them the one-line form shows
LISTED_PROBLEMS = 10
_WORKER_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+', re.MULTILINE)


def error_line(e: BaseException) -> str:
    """The one line to show for `e`. An error re-raised from a DataLoader worker carries the worker's traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."): show its last line."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if getattr(e, "multiline", False):  # the memory planner's refusal: a line per setting that would fit
        return "\n".join(lines)
    if lines[0].endswith(":") and len(lines) > 1 and all(x.startswith("  ") for x in lines[1:]):
        # "<file>: 6 tensor(s) do not fit this model, nothing was loaded:" and an indented line per problem
        shown = lines[1 : 1 + LISTED_PROBLEMS]
        more = len(lines) - 1 - len(shown)
        return "\n".join([lines[0], *shown, *([f"  ... and {more} more"] if more else [])])
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
    if isinstance(e, InterpolationResolutionError):  # `${oc.env:UNSET}`, `${no.such.key}`, `${oc.nope:x}`
        return interpolation_error_line(e)
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        cause = e.__cause__
        line = user_error_line(cause)
        if line is None and isinstance(cause, (ValueError, TypeError)) and not raised_in_project(cause):
            # a configured library object (Trainer, logger, strategy) refused its arguments
            key = _full_key(str(e))
            line = f"{key}: {error_line(cause)}" if key else error_line(cause)
        if line is None and isinstance(cause, ModuleNotFoundError) and cause.name:
            # a configured library object whose package is missing (a logger, a profiler)
            key = _full_key(str(e))
            if cause.name.partition(".")[0] != "musicflamingo":
                line = f"{key + ': ' if key else ''}needs the `{cause.name}` package, which is not installed"
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


def interpolation_error_line(e: BaseException, key: str | None = None) -> str:
    """`<key>: cannot resolve its value: <reason>` for an OmegaConf interpolation error (omegaconf's message
    prefixes the reason with the inner error's type: "KeyError raised while resolving interpolation: ...")."""
    key = key or getattr(e, "full_key", None) or "a config value"
    reason = error_line(e)
    reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason).strip().strip('"')
    return f"{key}: cannot resolve its value: {reason}"


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
    # here, not at import: runtime imports torch (seconds), which a command line refused before Hydra runs does not need
    from musicflamingo.runtime import quiet_known_warnings, tune_cpu

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
        code = stop_exit_code(e, exit_code)
        job = _sweep_job()
        if job is None or code >= 128:  # one run, or stopped by a signal: stop here
            print(f"{prefix}: {line}", file=sys.stderr)
            sys.exit(code)
        # a sweep: this job failed, the next ones still run (as Hydra runs them after a failed job)
        print(f"{prefix}: {job}: {line}", file=sys.stderr)
        _SWEEP_FAILURES.append((job, code, prefix))
        return None


# Jobs of this process's sweep (`-m`) that failed with an input error: (label, exit code, prefix).
_SWEEP_FAILURES: list[tuple[str, int, str]] = []


def sweep_job() -> tuple[int, list[str]] | None:
    """(number, swept `key=value` overrides) of the running Hydra multirun job (all its overrides when none was
    swept); None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    overrides = list(hc.overrides.task)
    swept = _swept_keys(sys.argv[1:])
    return hc.job.num, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides


def _sweep_job() -> str | None:
    """`job #N (key=value ...)` naming the swept values of the running Hydra multirun job; None outside one."""
    job = sweep_job()
    return None if job is None else f"job #{job[0]} ({' '.join(job[1])})"


def _swept_keys(argv: list[str]) -> set[str]:
    """The keys of `argv`'s sweep overrides (`benchmark=a,b`, `seed=range(3)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, keys = OverridesParser.create(), set()
    for arg in _override_args(argv):
        try:
            override = parser.parse_overrides([arg])[0]
        except OverrideParseException:
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def run_entry_point(main: Callable[[], Any], config_name: str, doc: str | None = None) -> None:
    """What an entry point's `__main__` runs: :func:`check_command_line`, then the `@hydra.main` function; after a
    sweep in which jobs failed with input errors, one line naming them and exit with the first one's code. `doc`
    (the script's usage): `--help` / `-h` prints it and the settings with their comments (:func:`settings_help`)."""
    if doc is not None and any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(settings_help(doc, config_name))
        return
    sys.argv += check_command_line(config_name, sys.argv[1:])
    _SWEEP_FAILURES.clear()
    main()
    if _SWEEP_FAILURES:
        jobs = "; ".join(job for job, _, _ in _SWEEP_FAILURES)
        prefix = _SWEEP_FAILURES[0][2]
        print(f"{prefix}: {len(_SWEEP_FAILURES)} job(s) of the sweep failed: {jobs}", file=sys.stderr)
        sys.exit(_SWEEP_FAILURES[0][1])


def settings_help(doc: str, config_name: str) -> str:
    """`--help` of an entry point whose settings are one file: `doc` (its usage), then `configs/<config_name>.yaml`
    as written, comments included, without its `defaults` and `hydra` blocks. Hydra's help listed every config group
    of configs/ (benchmark, experiment, trainer: none of them read by infer.py) and the settings without a word on
    any of them."""
    kept: list[str] = []
    block = ""  # the top-level key the line is under
    for line in (_config_dir() / f"{config_name}.yaml").read_text(encoding="utf-8").splitlines():
        if line[:1] not in ("", " ", "-", "#"):
            block = line.split(":")[0]
            # the comment right above `hydra:` is about it (the comment above `defaults:` is the file's header)
            while block == "hydra" and kept and kept[-1].startswith("#"):
                kept.pop()
        elif line.startswith("#"):
            block = ""
        if block not in ("defaults", "hydra"):
            kept.append(line)
    settings = "\n".join(kept).strip()
    return (
        f"{doc.strip()}\n\n== Settings (key=value; configs/{config_name}.yaml) ==\n{settings}\n\n"
        "Hydra's own flags: --cfg job (the settings a command line gives), --hydra-help"
    )


# Hydra's flags that choose another config than the entry point's own: the command line is then left to Hydra.
_CONFIG_FLAGS = (
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
)

# Hydra's flags that print something and exit without running the job (nor making its folder).
_PRINT_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")


# Hydra's flags whose next word is their value (`--cfg job`, `-cn infer`), not an override; --info's optional value
_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", *_CONFIG_FLAGS)
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
# settings that take free text, where a word without `=` after them is their value split by the shell
_TEXT_KEYS = ("prompt", "system_prompt", "stop")
# what a word without `=` most likely is, per entry point (`python infer.py song.wav`)
_BARE_WORD_KEY = {"infer": "audio"}


def _refuse_bare_words(config_name: str, argv: list[str]) -> None:
    """Exit 2 naming a word that is no `key=value` (`infer.py song.wav`, `infer.py --audio song.wav`): Hydra said
    "Error parsing override 'song.wav' missing EQUAL at '<EOF>'" (exit 1), or argparse's usage."""
    previous = ""
    for i, word in enumerate(argv):
        flag_value = previous in _VALUE_FLAGS or (previous in ("--info", "-i") and word in _INFO_VALUES)
        if flag_value or "=" in word or word.startswith(("-", "~")):
            previous = word
            continue
        key = _BARE_WORD_KEY.get(config_name)
        setting = previous.partition("=")[0].lstrip("+")
        if "=" in previous and setting.rpartition(".")[2] in _TEXT_KEYS:  # `prompt=What is the key?`, split
            rest = list(itertools.takewhile(lambda w: "=" not in w and not w.startswith("-"), argv[i:]))
            setting, _, value = previous.partition("=")
            hint = f"a value with spaces goes in quotes: {_quoted(setting, ' '.join([value, *rest]))}"
        elif previous.startswith("--") and len(previous) > 2:  # `--audio song.wav`, an argparse habit
            key = previous[2:].replace("-", "_")
            hint = f"write {key}={word} (no --)"
        elif key is not None:
            hint = f"write {key}={word}" + (" for the audio" if key == "audio" else "")
        else:
            hint = "each setting is key=value"
        print(f"error: {word}: not a setting; {hint}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _override_args(argv: list[str]) -> list[str]:
    """The `key=value` words of `argv` (Hydra's flags and their values left out)."""
    return [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def check_command_line(config_name: str, argv: list[str]) -> list[str]:
    """Check `argv` as Hydra will read it for `configs/<config_name>.yaml`, before Hydra does: exit 2 with one line
    naming the override and what was expected when Hydra could not read or compose it, or could not resolve the
    run folder (`hydra.run.dir`, under `-m` `hydra.sweep.dir`) or it is a file. Returns overrides to add: a run
    folder starting with `~` (quoted, so the shell left it alone) made `./~/...`; the rest of the project expands
    `~`, so the folder is given back expanded. `HYDRA_FULL_ERROR=1` or a `--config-*` flag skip all but the syntax
    check."""
    _refuse_bare_words(config_name, argv)
    check_overrides(argv)
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a.split("=")[0] in _CONFIG_FLAGS for a in argv):
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = "-m" in argv or "--multirun" in argv
    args = _override_args(argv)
    parser = OverridesParser.create()
    first: list[str | None] = []  # every override, a sweep at its first value (None: left to Hydra)
    others: list[tuple[int, str]] = []  # (position, override) for the other values of a swept config group
    for i, arg in enumerate(args):
        override = parser.parse_overrides([arg])[0]
        if not override.is_sweep_override():
            first.append(arg)
            continue
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # an interval or glob sweep: Hydra expands it
            first.append(None)
            continue
        key = override.get_key_element()
        first.append(f"{key}={values[0]}")
        if (_config_dir() / override.key_or_group.replace(".", "/")).is_dir():
            others += [(i, f"{key}={v}") for v in values[1:]]
    base = [a for a in first if a is not None]
    cfg = _compose_or_exit(config_name, base, args)
    for i, arg in others:
        _compose_or_exit(
            config_name, [a if j != i else arg for j, a in enumerate(first) if a is not None], args
        )
    # --cfg/--info/--help print and exit: Hydra makes no run folder then
    printing = any(a.split("=")[0] in _PRINT_FLAGS for a in argv)
    return _run_dir_overrides(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir", made=not printing)


def _config_dir() -> Path:
    return PACKAGE_DIR.parent / "configs"


def _compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3", job_name=config_name):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _compose_or_exit(config_name: str, overrides: list[str], args: list[str]) -> Any:
    from hydra.errors import HydraException

    try:
        return _compose(config_name, overrides)
    except HydraException as e:
        line = _composition_error_line(e, config_name, overrides)
    except ValueError as e:  # Hydra's own check of a config group's override, outside its HydraException
        line = _group_value_error_line(e, config_name, overrides)
        if line is None:
            raise
    print(f"error: {line}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _group_value_error_line(e: ValueError, config_name: str, overrides: list[str]) -> str | None:
    """One line for a config group given a value that is not a config's name (`callbacks=null`, `logger=[1]`:
    Hydra's ValueError "Config group override must be a string or a list. Got NoneType"); None for another error."""
    if not str(e).startswith("Config group override must be"):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig

    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group
        folder = _config_dir() / group.replace(".", "/")
        if override.is_delete() or not folder.is_dir() or isinstance(override.value(), (str, list)):
            continue
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        # `~callbacks` drops every entry (model_checkpoint too: no checkpoint saved); name the form that drops one
        one = ""
        try:
            node = _compose(config_name, [o for o in overrides if o != override.input_line]).get(group)
            entries = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
        except Exception:  # another override is wrong too: the hint without the entries
            entries = []
        if entries:
            one = f"to drop one of its entries ({', '.join(entries)}) write ~{group}.<name> (~{group}.{entries[-1]}); "
        return (
            f"{override.input_line}: {group} is a config group, which takes the name of one of its configs "
            f"({', '.join(options) or 'none'}); {one}to drop the group write ~{group}"
        )
    return None


def _composition_error_line(e: BaseException, config_name: str, overrides: list[str]) -> str:
    """One line for Hydra's refusal to compose `overrides`, naming the override and what it takes."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException
    from omegaconf import DictConfig

    parsed = OverridesParser.create().parse_overrides(overrides)
    message = str(e).strip()
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        options = sorted(e.options or [])
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        mine = [str(o.input_line) for o in parsed if o.key_or_group == group]
        return (
            f"{mine[-1] if mine else e.missing_cfg_file}: no such {group} config{hint}; {group} takes: "
            + (", ".join(options) or "nothing (the folder is empty)")
        )
    match = re.match(r"Could not (?:override|delete from config\.) '([^']+)'", message)
    if match:
        key = match.group(1)
        arg = next((str(o.input_line) for o in parsed if o.key_or_group == key), key)
        try:  # the config without this override: where the key's path leaves it
            node = root = _compose(config_name, [o for o in overrides if o != arg])
        except Exception:
            return error_line(e)
        parts, depth = key.split("."), 0
        while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        parent, name = ".".join(parts[:depth]), parts[depth]
        missing = ".".join(parts[: depth + 1])
        if message.startswith("Could not override") and isinstance(node, DictConfig) and name in node:
            # the key is there: the dict given sets keys it does not have (`model.net.overrides={audio: ...}`)
            return _new_keys_line(e, arg, key, node._get_node(name))
        if not isinstance(node, DictConfig):
            return f"{arg}: no setting {missing} ({parent} is a value, not a group of settings)"
        valid = sorted(str(k) for k in node if k != "hydra" and not str(k).startswith("_"))
        if not parent:  # groups chosen as null in the defaults list (`experiment`, `debug`) take options too
            valid = sorted(set(valid) | set(_config_groups(config_name)) - {"hydra"})
        close = difflib.get_close_matches(name, valid, n=1)
        fixed = ".".join([*parts[:depth], close[0], *parts[depth + 1 :]]) if close else ""
        hint = f" (did you mean {arg.replace(key, fixed, 1)}?)" if close else ""
        if (
            parent
            and depth == len(parts) - 1
            and name in root
            and not isinstance(root._get_node(name), DictConfig)
        ):
            # a setting of the entry point itself typed under a group (`benchmark.limit=2` for eval.py's limit=2)
            hint = f" (did you mean {arg.replace(key, name, 1)}, a setting of {config_name}.py itself?)"
        return f"{arg}: no setting {missing}{hint}; {parent or 'the top level'} takes: {', '.join(valid)}"
    match = re.match(r"Could not append to config. An item is already at '([^']+)'", message)
    if match:
        key = match.group(1)
        arg = next((str(o.input_line) for o in parsed if o.key_or_group == key), f"+{key}")
        return f"{arg}: {key} is already set, `+` only adds new keys: write {arg.lstrip('+')} to change it"
    line = error_line(e)
    cause = e.__cause__
    return f"{line} ({error_line(cause)})" if cause is not None and error_line(cause) not in line else line


def _new_keys_line(e: BaseException, arg: str, key: str, node: Any) -> str:
    """One line for `key=<dict>` where `key` exists but the dict names keys it does not hold: an empty dict takes
    new keys only with a leading `+`; another dict names the key that is not in it."""
    import difflib

    from omegaconf import DictConfig

    if isinstance(node, DictConfig) and not node._is_none() and len(node) == 0:
        return (
            f"{arg}: {key} is an empty dict ({{}}), to which `=` adds no keys: write +{arg.lstrip('+')} "
            "(a leading + adds them)"
        )
    missing = str(getattr(e.__cause__, "full_key", "") or "")
    if isinstance(node, DictConfig) and missing.startswith(f"{key}."):
        parts = missing[len(key) + 1 :].split(".")
        depth = 0
        while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
            node, depth = node._get_node(parts[depth]), depth + 1
        if isinstance(node, DictConfig):
            valid = sorted(str(k) for k in node if not str(k).startswith("_"))
            close = difflib.get_close_matches(parts[depth], valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            where = ".".join([key, *parts[:depth]])
            return f"{arg}: no setting {where}.{parts[depth]}{hint}; {where} takes: {', '.join(valid)}"
    cause = e.__cause__
    return f"{arg}: {error_line(cause)}" if cause is not None else error_line(e)


def _config_groups(config_name: str) -> list[str]:
    """The config groups of `configs/<config_name>.yaml`'s defaults list (`experiment`, `model`, ...)."""
    import yaml

    path = _config_dir() / f"{config_name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    groups = []
    for entry in (data or {}).get("defaults") or []:
        group = next(iter(entry)) if isinstance(entry, dict) and entry else entry
        if isinstance(group, str) and not group.startswith("override ") and group != "_self_":
            groups.append(group.removeprefix("optional ").split("@")[0])
    return groups


def _run_dir_overrides(cfg: Any, key: str, made: bool = True) -> list[str]:
    """Resolve the run (or sweep) folder as Hydra will: exit 2 naming `key` when it cannot be resolved or (`made`:
    Hydra will make it) it or a folder above it is a file; an override with `~` expanded when it starts with one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()  # the `now` and `hydra` resolvers
    instance = HydraConfig.instance()
    previous = instance.cfg
    try:
        instance.set_config(cfg)
        folder = OmegaConf.select(cfg, key)
    except InterpolationResolutionError as e:
        print(f"error: {interpolation_error_line(e, key)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        instance.cfg = previous
    folder = str(folder)
    parent, _, leaf = key.rpartition(".")
    raw = OmegaConf.select(cfg, parent)._get_node(leaf)._value()  # `${output_dir}` (eval.yaml): name that key
    alias = re.fullmatch(r"\$\{([\w.]+)\}", str(raw))
    if made:
        _refuse_file_as_folder(alias.group(1) if alias else key, folder)
    if folder != "~" and not folder.startswith("~/"):
        return []
    expanded = os.path.expanduser(folder)
    if expanded.startswith("~") or any(c in expanded for c in '"\\$'):
        print(
            f"error: {key}={folder!r}: write the folder without ~ (Hydra makes a folder named ~)",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_INPUT)
    return [f'{key}="{expanded}"']


def _refuse_file_as_folder(key: str, folder: str) -> None:
    """Exit 2 naming `key` when the run folder `folder` cannot be made: it, or a folder above it, is a file; a name
    in it is longer than the file system allows, or the whole path is; it holds a NUL; the folder it goes in is not
    writable. Hydra's makedirs raised (a traceback, exit 1) before any check of ours."""

    def refuse(why: str) -> None:
        print(f"error: {key}={folder!r}: {why}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    if "\0" in folder:
        refuse("a NUL character in the folder's name")
    path = Path(os.path.expanduser(folder)).absolute()
    made = path  # the nearest folder that exists, where the new ones go
    for above in (path, *path.parents):
        try:
            mode = above.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet, or a file above it (found further up)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                continue  # named below
            refuse(f"{above}: {e.strerror}")
        if not stat.S_ISDIR(mode):
            refuse(f"{'' if above == path else f'{above} is '}a file, where a folder is expected")
        made = above
        break
    try:
        name_max, path_max = os.pathconf(made, "PC_NAME_MAX"), os.pathconf(made, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for name in path.relative_to(made).parts:
        if len(os.fsencode(name)) > name_max:
            refuse(
                f"the name {name[:20]}...{name[-10:]} is {len(os.fsencode(name))} bytes, over the {name_max} "
                "a file system name may have"
            )
    if len(os.fsencode(str(path))) >= path_max:
        refuse(f"the path is {len(os.fsencode(str(path)))} bytes, over the {path_max} a path may have")
    if path != made and not os.access(made, os.W_OK | os.X_OK):
        refuse(f"{made} is not writable, so the folder cannot be made in it")


def check_overrides(argv: list[str]) -> None:
    """Exit 2 with a hint when a `key=value` of `argv` is not Hydra override syntax (a file name with an accent,
    an apostrophe, brackets or `=`; a prompt with `?` or `'`), instead of Hydra's lexer error and exit 1."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    multirun = "-m" in argv or "--multirun" in argv
    for arg in _override_args(argv):  # Hydra's own flags (--cfg job, -m) and their values left out
        try:
            sweep = parser.parse_overrides([arg])[0].is_sweep_override()
            problem = (
                "a comma outside quotes makes a sweep: add -m for one run per value"
                if sweep and not multirun
                else None
            )
        except OverrideParseException as e:
            problem = error_line(e)
        if problem:
            key, _, value = arg.partition("=")
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
