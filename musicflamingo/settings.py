"""The settings each entry point accepts, checked before any weights or data are read: one function per entry point,
:func:`check_train_settings` (`train.py`), :func:`check_eval_settings` (`eval.py`) and :func:`check_infer_settings`
(`infer.py`).

Each takes the entry point's settings as nested mappings (Hydra's composed config, resolved) and raises
:class:`SettingsError` naming the setting and its value, e.g. ``model.optimizer.lr=-0.01: expected a finite number
> 0``. Types, ranges and the rules that tie two settings together live here; ``0`` never stands for "the default"
(batch sizes, ``max_new_tokens``). Missing keys are left to the defaults of the code that reads them (tests pass
partial mappings).

Unknown keys: Hydra's ``+key=value`` adds a key even where nothing reads it (``+model.scheduler.warmup_step=100``
next to ``warmup_steps``). :func:`check_known_keys` compares every node Hydra builds (one with a ``_target_``) with
the parameters of what it builds, the fixed dicts (``model.net.freeze``, ``model.net.lora``, ``model.part_lr``) with
their keys, and the top level with the keys the entry point's YAML defines (:func:`config_keys`), and names the
valid keys. Sampling settings of `infer.py` are checked by :class:`musicflamingo.engine.SamplingParams`.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from musicflamingo.checkpoint import CheckpointError, load_config
from musicflamingo.engine import parse_stop_strings
from musicflamingo.model.build import LORA_KEYS, PARTS
from musicflamingo.model.lora import check_lora_targets, check_quantize_base
from musicflamingo.model.quantize import METHODS as QUANTIZE_METHODS
from musicflamingo.planner import QLORA_FSDP
from musicflamingo.runtime import RuntimeConfigError, parse_dtype, resolve_device

# GRPO's rollouts, backwards and optimizer steps all run inside one training step, which FSDP wraps in its forward
# (it crashed with "expected to be in states [IDLE]" or hung at the first batch)
GRPO_FSDP = (
    "trainer=fsdp: GRPO does not run under FSDP (its rollouts, backwards and optimizer steps all happen inside one "
    "training step); use trainer=ddp (with LoRA each rank holds the base once, the KL reference included) or one "
    "device"
)


class SettingsError(ValueError):
    """A setting has the wrong type, is out of range, contradicts another or is unknown (named with its value)."""


# The configs folder beside the package (entry points compose from it).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_keys(name: str) -> tuple[str, ...] | None:
    """The top-level keys `configs/<name>.yaml` defines: its own keys and the groups of its defaults list
    (`paths`, `model`, ...). None when the folder is not there (a package installed without the configs)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    keys = {str(k) for k in data if k not in ("defaults", "hydra")}
    for entry in data.get("defaults") or []:
        group = next(iter(entry)) if isinstance(entry, dict) and entry else entry
        if not isinstance(group, str) or group.startswith("override ") or group == "_self_":
            continue
        group = group.removeprefix("optional ").split("@")[0].split("/")[0]
        if group != "hydra":
            keys.add(group)
    return tuple(sorted(keys))


# Dicts that are arguments rather than objects: their keys are fixed by the code that reads them.
FIXED_KEYS: dict[str, tuple[str, ...]] = {
    "model.net.freeze": PARTS,
    "model.net.lora": LORA_KEYS,
    "model.part_lr": PARTS,
}
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Top-level keys every entry point takes even where its YAML lacks them (`+plan_memory_gb=80`): the memory per device
# `plan=true` compares with (planner._plan_budget).
PLAN_KEYS = ("plan_memory_gb",)

_MISSING = object()


# ---------------------------------------------------------------------------------------------- entry points
def check_train_settings(settings: Mapping[str, Any]) -> None:
    """`configs/train.yaml`, composed and resolved: keys, types, ranges, and the rules between settings."""
    check_known_keys(settings, _top_keys("train"))
    _number(settings, "seed", integer=True)
    _threads(settings)
    _boolean(settings, "export")
    _boolean(settings, "export_adapters")
    if _get(settings, "export_adapters") is True and not _get(settings, "model.net.lora.enabled"):
        _fail("export_adapters", True, "needs model.net.lora.enabled=true (a full fine-tune has no adapters)")
    _planner_flags(settings)
    ckpt = _get(settings, "ckpt_path")
    # a file, or the folder of a sharded FSDP checkpoint (training.resolve_ckpt_path checks its meta.pt)
    if ckpt not in (_MISSING, None, "", "null", "last") and not (
        Path(str(ckpt)).is_file() or Path(str(ckpt)).is_dir()
    ):
        _fail(
            "ckpt_path",
            ckpt,
            "no such checkpoint file (`last`: the run folder's last.ckpt; null: start afresh)",
        )

    # the run's length first: model.scheduler.max_steps follows trainer.max_steps, and a bad value is the trainer's
    _number(settings, "trainer.max_steps", integer=True, lo=1, special=(-1,), note="-1: by epochs")
    _number(
        settings, "trainer.max_epochs", integer=True, lo=1, special=(-1,), optional=True, note="-1: no limit"
    )

    # model: what trains and how fast
    _number(settings, "model.net.seed", integer=True)
    for flag in ("rote_quirk", "gradient_checkpointing", "compile"):
        _boolean(settings, f"model.net.{flag}")
    for part in PARTS:
        _boolean(settings, f"model.net.freeze.{part}")
        _number(settings, f"model.part_lr.{part}", lo=0, lo_open=True, optional=True)
    _boolean(settings, "model.net.lora.enabled")
    _number(settings, "model.net.lora.rank", integer=True, lo=1)
    _number(settings, "model.net.lora.alpha", lo=0, lo_open=True)
    _number(settings, "model.net.lora.dropout", lo=0, hi=1, hi_open=True)
    targets = _get(settings, "model.net.lora.targets")
    if targets is not _MISSING and (
        isinstance(targets, str)
        or not isinstance(targets, Sequence)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        _fail("model.net.lora.targets", targets, "expected a non-empty list of linear layer names")
    if targets is not _MISSING:  # every name a linear of the language model (planner.py checks the rank)
        try:
            check_lora_targets(targets)
        except ValueError as e:
            raise SettingsError(str(e)) from None
    peft_folder = _get(settings, "model.net.lora.init_from_peft")
    if peft_folder not in (_MISSING, None):
        if not _get(settings, "model.net.lora.enabled"):
            _fail("model.net.lora.init_from_peft", peft_folder, "needs model.net.lora.enabled=true")
        if not (Path(str(peft_folder)).expanduser() / "adapter_config.json").is_file():
            _fail(
                "model.net.lora.init_from_peft",
                peft_folder,
                "expected a peft adapter folder (adapter_config.json + adapter_model.safetensors)",
            )
    quantize = _get(settings, "model.net.quantize_base")
    strategy = _get(settings, "trainer.strategy")
    target = strategy.get("_target_") if isinstance(strategy, Mapping) else strategy
    if quantize not in (_MISSING, None) and "fsdp" in str(target).lower():
        raise SettingsError(QLORA_FSDP.format(value=quantize))
    if quantize is not _MISSING:
        # null, or nf4 on a CUDA machine with bitsandbytes (names the setting); plan=true: the value only
        check_quantize_base(quantize, here=not _planning(settings))
        if quantize is not None and _get(settings, "model.net.lora.enabled") is False:
            _fail(
                "model.net.quantize_base",
                quantize,
                "needs model.net.lora.enabled=true (the adapters are what trains)",
            )
    _number(settings, "model.optimizer.lr", lo=0, lo_open=True)
    _number(settings, "model.optimizer.weight_decay", lo=0)
    _number(settings, "model.optimizer.eps", lo=0, lo_open=True)
    betas = _get(settings, "model.optimizer.betas")
    if betas is not _MISSING and not (
        isinstance(betas, Sequence)
        and not isinstance(betas, str)
        and len(betas) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        _fail("model.optimizer.betas", _plain(betas), "expected two numbers in [0, 1)")
    _number(settings, "model.scheduler.warmup_steps", integer=True, lo=0)
    _number(settings, "model.scheduler.max_steps", integer=True, lo=1, special=(-1,), note="-1: by epochs")
    _number(settings, "model.scheduler.min_lr_ratio", lo=0, hi=1)
    warmup = _get(settings, "model.scheduler.warmup_steps")
    length = _get(settings, "model.scheduler.max_steps")
    if isinstance(warmup, int) and isinstance(length, int) and length >= 1 and warmup > length:
        raise SettingsError(
            f"model.scheduler.warmup_steps={warmup} is more than model.scheduler.max_steps={length}: the learning "
            "rate would never reach model.optimizer.lr; lower the warmup or lengthen the run"
        )
    _choice(settings, "model.nonfinite_loss", ("stop", "skip"))

    # data
    train = _get(settings, "data.train")
    empty = train is None or (isinstance(train, Sequence) and not isinstance(train, str) and not train)
    if empty and not _planning(settings):  # plan=true reads no data
        _fail("data.train", _plain(train), "expected a manifest: a path, a list of paths or [{path, weight}]")
    for key in ("data.processor", "data.audio_root"):
        if key != "data.processor" or _get(settings, key) != _get(settings, "model.net.init_from"):
            _folder(settings, key)  # init_from's own check names init_from
    _number(settings, "data.batch_max_tokens", integer=True, lo=1)
    _number(settings, "data.val_batch_max_tokens", integer=True, lo=1, optional=True)
    _number(settings, "data.num_workers", integer=True, lo=0)
    _choice(settings, "data.bad_sample_policy", ("error", "skip"))
    _number(settings, "data.max_bad_fraction", lo=0, hi=1, optional=True)
    _number(settings, "data.max_text_tokens", integer=True, lo=1, optional=True)
    _number(settings, "data.min_audio_seconds", lo=0)
    _number(settings, "data.seed", integer=True)
    _boolean(settings, "data.train_on_prompt")
    _choice(settings, "data.index", ("auto", "off", "require"))
    _boolean(settings, "data.pack")
    grpo = _get(settings, "model._target_") == "musicflamingo.grpo.GRPOLit"
    if grpo and "fsdp" in str(target).lower():
        # refused here too, before the processes launch (GRPOLit.on_fit_start says the same after loading)
        raise SettingsError(GRPO_FSDP)
    if grpo and _get(settings, "data.pack") is True:
        raise SettingsError(
            "data.pack=true: GRPO makes its prompts from padded batches (one conversation per row); "
            "set data.pack=false"
        )

    # trainer
    _number(settings, "trainer.accumulate_grad_batches", integer=True, lo=1)
    _number(settings, "trainer.num_nodes", integer=True, lo=1)
    _number(settings, "trainer.gradient_clip_val", lo=0, optional=True)
    _number(
        settings, "trainer.check_val_every_n_epoch", integer=True, lo=1, optional=True, note="null: by steps"
    )
    interval = _get(settings, "trainer.val_check_interval")
    if interval not in (_MISSING, None) and not (
        _is_number(interval) and (interval >= 1 if isinstance(interval, int) else 0 < interval <= 1)
    ):  # 0 divided by zero in Lightning
        _fail(
            "trainer.val_check_interval",
            interval,
            "expected an integer >= 1 (every N training batches), a fraction in (0, 1] of an epoch, or null",
        )
    steps, epochs = _get(settings, "trainer.max_steps"), _get(settings, "trainer.max_epochs")
    if steps == -1 and epochs == -1 and _get(settings, "trainer.max_time") in (_MISSING, None):
        raise SettingsError(
            "trainer.max_steps=-1 and trainer.max_epochs=-1: the run would never end; set trainer.max_steps, "
            "trainer.max_epochs or trainer.max_time"
        )
    if steps == -1 and epochs == -1 and _get(settings, "model.scheduler.max_steps") == -1:
        raise SettingsError(
            "model.scheduler.max_steps=-1 takes the schedule's length from the trainer's steps, but "
            "trainer.max_steps=-1 and trainer.max_epochs=-1 set none (the run ends by trainer.max_time); set "
            "model.scheduler.max_steps to the steps the learning-rate schedule should span"
        )
    _choice(settings, "trainer.accelerator", ("cpu", "gpu", "cuda", "mps", "auto"))
    _number(
        settings, "trainer.log_every_n_steps", integer=True, lo=0, optional=True, note="0: no metrics logged"
    )
    _number(
        settings,
        "trainer.num_sanity_val_steps",
        integer=True,
        lo=0,
        special=(-1,),
        optional=True,
        note="-1: all",
    )
    for flag in (
        "enable_progress_bar",
        "use_distributed_sampler",
        "enable_model_summary",
        "enable_checkpointing",
    ):
        _boolean(settings, f"trainer.{flag}")
    deterministic = _get(settings, "trainer.deterministic")
    if deterministic not in (_MISSING, None, True, False, "warn"):
        _fail("trainer.deterministic", deterministic, "expected true, false, warn or null")
    _max_time(settings)
    _folder(settings, "paths.output_dir")
    _callbacks(settings)
    _loggers(settings)
    if str(_get(settings, "trainer.precision")) == "16-true":
        # fp16 weights and optimizer states: AdamW's eps (1e-8) and the squares of small gradients are 0 in fp16,
        # so its first steps divide 0 by 0 (a NaN loss at step 1)
        _fail(
            "trainer.precision",
            "16-true",
            "fp16 weights and optimizer states underflow (AdamW's eps is 0 in fp16: NaN at the first steps); "
            "use bf16-true, bf16-mixed, 16-mixed (GPU) or 32-true",
        )
    if not _planning(settings):  # plan=true plans for devices this machine may not have
        if "fsdp" in str(target).lower():  # trainer=fsdp on a laptop: trainer=cpu would drop FSDP altogether
            value = _get(settings, "trainer.accelerator")
            if value in ("gpu", "cuda") and not torch.cuda.is_available():
                _fail(
                    "trainer.accelerator",
                    value,
                    "CUDA is not available here; FSDP runs on CPU processes (gloo) with trainer.accelerator=cpu "
                    "trainer.precision=32, or train on one process with trainer=cpu",
                )
        _accelerator(settings, "trainer.accelerator")


def check_eval_settings(settings: Mapping[str, Any]) -> None:
    """`configs/eval.yaml`, composed and resolved (the benchmark's own keys are read by its reader)."""
    check_known_keys(settings, _top_keys("eval"))
    _number(settings, "batch_size", integer=True, lo=1, optional=True, note="null: 8")
    # the benchmark's first: `max_new_tokens` copies it, so `benchmark.max_new_tokens=0` is named as typed
    _number(settings, "benchmark.max_new_tokens", integer=True, lo=1, optional=True)
    _number(settings, "max_new_tokens", integer=True, lo=1, optional=True, note="null: the benchmark's")
    _number(settings, "limit", integer=True, lo=1, optional=True, note="null: every item")
    for flag in ("sort_by_length", "compile", "progress", "think"):
        _boolean(settings, flag)
    # read with bool() by the readers: `benchmark.skip_missing_audio=maybe` would be true
    for flag in ("skip_missing_audio", "include_captions"):
        _boolean(settings, f"benchmark.{flag}")
    _folder(settings, "output_dir")
    _stop(settings)
    _planner_flags(settings)
    _device_dtype(settings)


def check_infer_settings(settings: Mapping[str, Any]) -> None:
    """`configs/infer.yaml` (decoding settings: :class:`musicflamingo.engine.SamplingParams`)."""
    check_known_keys(settings, _top_keys("infer"))
    _number(settings, "batch_size", integer=True, lo=1, optional=True, note="null: every file at once")
    for flag in ("interactive", "stream", "compile", "do_sample"):
        _boolean(settings, flag)
    _planner_flags(settings)
    _log_level(settings)
    _threads(settings)
    _device_dtype(settings)


def _log_level(settings: Mapping[str, Any]) -> None:
    level = _get(settings, "log_level")
    if level is not _MISSING and str(level).upper() not in LOG_LEVELS:
        _fail("log_level", level, f"expected one of {', '.join(LOG_LEVELS)}")


def _stop(settings: Mapping[str, Any]) -> None:
    """`stop=` as infer.py and eval.py read it (`engine.parse_stop_strings`: text, list of texts or null)."""
    value = _get(settings, "stop")
    if value is _MISSING:
        return
    try:
        parse_stop_strings(_plain(value), "stop", escapes=True)
    except ValueError as e:
        raise SettingsError(str(e)) from None


# ---------------------------------------------------------------------------------------------- unknown keys
def check_known_keys(settings: Mapping[str, Any], top: Sequence[str] | None = None) -> None:
    """Refuse a key nothing reads: a top-level key not in `top`, a key of a `_target_` node that is not a parameter
    of its target (targets taking `**kwargs` accept anything), a key of a :data:`FIXED_KEYS` dict."""
    if top is not None:
        _known(settings, "", set(top))
    _walk(settings, "")


def _walk(node: Any, where: str) -> None:
    if isinstance(node, Mapping):
        if where in FIXED_KEYS:
            _known(node, where, set(FIXED_KEYS[where]))
            missing = [k for k in FIXED_KEYS[where] if k not in node]
            if missing:
                raise SettingsError(
                    f"{where}: missing key(s) {missing}; expected exactly {list(FIXED_KEYS[where])}"
                )
        if "_target_" in node and not _declared_accepts(str(node["_target_"]), set(node) - HYDRA_KEYS):
            valid = _parameters(node["_target_"], where)
            if valid is not None:
                _known(node, where, valid | HYDRA_KEYS)
        for key, value in node.items():
            _walk(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, Sequence) and not isinstance(node, str):
        for i, value in enumerate(node):
            _walk(value, f"{where}[{i}]")


def _known(node: Mapping[str, Any], where: str, valid: set[str]) -> None:
    for key in node:
        if key in valid:
            continue
        name = f"{where}.{key}" if where else str(key)
        close = difflib.get_close_matches(str(key), sorted(valid - HYDRA_KEYS), n=1)
        if close:
            hint = f" (did you mean {f'{where}.' if where else ''}{close[0]}?)"
        else:  # a key given one level too high: `+model.lora.rank=4` for model.net.lora.rank
            homes = [k for k, v in node.items() if isinstance(v, Mapping) and key in v]
            hint = f" (did you mean {where + '.' if where else ''}{homes[0]}.{key}?)" if homes else ""
        shown = ", ".join(sorted(valid - HYDRA_KEYS))
        raise SettingsError(
            f"{name}={_plain(node[key])!r}: unknown setting{hint}; {where or 'the top level'} takes: {shown}"
        )


def _parameters(target: Any, where: str) -> set[str] | None:
    """The keyword parameters of the callable named `target`; None when it takes `**kwargs`."""
    obj = _locate(str(target), where)
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare with
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in named}


def _declared_accepts(target: str, keys: set[str]) -> bool:
    """True when the source of `target` shows that it takes every one of `keys`, read without importing it: the
    trainer's, callbacks' and modules' targets import Lightning (seconds), which a refused setting or `plan=true`
    need not pay. False when the source cannot tell (an inherited or generated `__init__`, a name bound otherwise):
    `_parameters` then imports the target and names what it refuses."""
    params = _source_parameters(target)
    return params is None or (params is not _UNKNOWN and keys <= params)


_UNKNOWN: Any = object()


def _source_parameters(target: str, depth: int = 0) -> Any:
    """The keyword parameters of dotted `target` as its module's source declares them (None: `**kwargs`), following
    `from x import name` re-exports; `_UNKNOWN` for anything else. No module is imported."""
    parts = target.split(".")
    if len(parts) < 2 or depth > 8:
        return _UNKNOWN
    found = _module_source(parts[:-1])  # `Class.method` and other nested names: not read from source
    if found is None:
        return _UNKNOWN
    path, package = found
    name = parts[-1]
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return _UNKNOWN
    bound: ast.stmt | None = None
    for stmt in tree.body:  # the last top-level binding of `name` is what the module exports
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
            bound = stmt
        elif isinstance(stmt, ast.ImportFrom) and any((a.asname or a.name) == name for a in stmt.names):
            bound = stmt
        elif _binds(stmt, name):  # an assignment, a conditional import, a plain import: only running it tells
            return _UNKNOWN
    if isinstance(bound, ast.ImportFrom):
        alias = next(a for a in bound.names if (a.asname or a.name) == name)
        if bound.level:  # `from .x import name`: relative to this module's package
            if bound.level - 1 > len(package):
                return _UNKNOWN
            base = package[: len(package) - bound.level + 1]
            module = [*base, *bound.module.split(".")] if bound.module else base
        else:
            module = bound.module.split(".") if bound.module else []
        return _source_parameters(".".join([*module, alias.name]), depth + 1) if module else _UNKNOWN
    if isinstance(bound, (ast.FunctionDef, ast.AsyncFunctionDef)) and not bound.decorator_list:
        return _keyword_arguments(bound.args, method=False)
    if isinstance(bound, ast.ClassDef) and not bound.decorator_list and not bound.keywords:
        defs = {s.name: s for s in bound.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assigned = [s for s in bound.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if (
            "__init__" in defs
            and "__new__" not in defs
            and not any(_binds(s, n) for s in assigned for n in ("__init__", "__signature__"))
        ):
            return _keyword_arguments(defs["__init__"].args, method=True)
    return _UNKNOWN  # inherited `__init__`, a dataclass, a metaclass: only inspect.signature tells


def _binds(stmt: ast.stmt, name: str) -> bool:
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.alias) and (node.asname or node.name.split(".")[0]) == name:
            return True
    return False


def _keyword_arguments(args: ast.arguments, method: bool) -> set[str] | None:
    """The names a call may pass by keyword; None with `**kwargs`. `method`: the first parameter is `self`."""
    if args.kwarg is not None:
        return None
    named = list(args.args)
    if method and not args.posonlyargs:
        named = named[1:]
    return {a.arg for a in named} | {a.arg for a in args.kwonlyargs}


def _module_source(parts: list[str]) -> tuple[Path, list[str]] | None:
    """(file, package) of the module `parts` (`["lightning", "pytorch", "callbacks"]`), found on disk without
    importing it or its packages (`find_spec` of a top-level name runs nothing); None when it is no plain source
    module in one folder."""
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    if len(parts) == 1:
        path, package = Path(spec.origin), parts if spec.submodule_search_locations is not None else []
    else:
        roots = list(spec.submodule_search_locations or [])
        if len(roots) != 1 or not spec.origin.endswith("__init__.py"):
            return None
        folder = Path(roots[0])
        for part in parts[1:-1]:  # every package on the way a plain folder with its __init__.py
            folder = folder / part
            if not (folder / "__init__.py").is_file():
                return None
        if (folder / parts[-1] / "__init__.py").is_file():
            path, package = folder / parts[-1] / "__init__.py", parts
        elif (folder / f"{parts[-1]}.py").is_file():
            path, package = folder / f"{parts[-1]}.py", parts[:-1]
        else:
            return None
    return (path, package) if path.suffix == ".py" else None


def _locate(path: str, where: str) -> Any:
    """The object at dotted `path` (`torch.optim.AdamW`), as Hydra finds a `_target_`."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            # `module` exists but one of its own imports is missing: not a typo in the config
            if e.name is None or not module.startswith(e.name):
                raise SettingsError(
                    f"{where}._target_={path!r}: cannot be imported ({e}{_raised_at(e)})"
                ) from None
            continue
        except Exception as e:  # the module is there but fails as it runs (a name it imports, a syntax error)
            raise SettingsError(
                f"{where}._target_={path!r}: cannot be imported ({type(e).__name__}: {e}{_raised_at(e)})"
            ) from None
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                break
            obj = getattr(obj, attr)
        else:
            return obj
        break
    raise SettingsError(f"{where}._target_={path!r}: no such class or function")


def _raised_at(e: BaseException) -> str:
    """`, at <file>:<line>` of the innermost frame of `e` outside importlib's own (the user's module line); a
    SyntaxError names its file and line itself."""
    where, tb = "", e.__traceback__
    while tb is not None and not isinstance(e, SyntaxError):
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith("<frozen") and "importlib" not in Path(name).parts:
            where = f", at {name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def check_targets(settings: Mapping[str, Any]) -> None:
    """Import every `_target_` the run builds, naming the first that cannot be imported (`callbacks.x._target_=
    'mycb.X': cannot be imported (No module named 'dep', at mycb.py:2)`). :func:`check_known_keys` reads a target's
    parameters from its source where that settles them, without importing it, so such a module passed the settings
    and failed only when Hydra built it, after the model and the data. Call it once the run goes ahead: the run
    imports these modules anyway (a refused setting and `plan=true` still import none of them)."""
    _import_targets(settings, "")


def _import_targets(node: Any, where: str) -> None:
    if isinstance(node, Mapping):
        if isinstance(node.get("_target_"), str):
            _locate(node["_target_"], where)
        for key, value in node.items():
            _import_targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, Sequence) and not isinstance(node, str):
        for i, value in enumerate(node):
            _import_targets(value, f"{where}[{i}]")


# ---------------------------------------------------------------------------------------------- values
def _get(settings: Mapping[str, Any], key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    """Lists and dicts of a config as plain Python, for messages."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _fail(key: str, value: Any, expected: str) -> NoReturn:
    raise SettingsError(f"{key}={_plain(value)!r}: {expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(
    settings: Mapping[str, Any],
    key: str,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
    special: tuple[int, ...] = (),
    note: str = "",
) -> None:
    """`key` is a finite number (an int with `integer`) in the range, or one of `special`, or null if `optional`."""
    value = _get(settings, key)
    if value is _MISSING or (value is None and optional):
        return
    ok = _is_number(value) and (isinstance(value, int) or not integer)
    if ok and isinstance(value, int) and value in special:
        return
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    kind = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        kind += f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        kind += f" {'>' if lo_open else '>='} {_num(lo)}"
    elif hi is not None:
        kind += f" {'<' if hi_open else '<='} {_num(hi)}"
    alternatives = [str(s) for s in special] + (["null"] if optional else [])
    if alternatives:
        kind += f", or {' or '.join(alternatives)}"
    _fail(key, value, f"expected {kind}" + (f" ({note})" if note else ""))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _boolean(settings: Mapping[str, Any], key: str) -> None:
    value = _get(settings, key)
    if value is not _MISSING and not isinstance(value, bool):
        _fail(key, value, "expected true or false")


def _choice(settings: Mapping[str, Any], key: str, options: Sequence[str]) -> None:
    value = _get(settings, key)
    if value is not _MISSING and value not in options:
        _fail(key, value, "expected " + " or ".join(repr(o) for o in options))


def _top_keys(name: str) -> tuple[str, ...] | None:
    keys = config_keys(name)
    return None if keys is None else (*keys, *PLAN_KEYS)


def _planning(settings: Mapping[str, Any]) -> bool:
    return _get(settings, "plan") is True


def check_serve_plan_settings(settings: Mapping[str, Any]) -> None:
    """`configs/serve.yaml`'s keys (a `+max_batchs=16` was ignored), planner flags, logging, threads, device and
    dtype (the server's own settings are `ServeSettings`')."""
    check_known_keys(settings, _top_keys("serve"))
    _planner_flags(settings)
    for flag in ("compile", "access_log"):
        _boolean(settings, flag)
    _log_level(settings)
    _threads(settings)
    _device_dtype(settings)


def _planner_flags(settings: Mapping[str, Any]) -> None:
    """`plan` (print the memory plan and exit), `plan_memory_gb` (the device memory it compares with) and
    `memory_check` (refuse a run predicted not to fit)."""
    _boolean(settings, "plan")
    _boolean(settings, "memory_check")
    _number(settings, "plan_memory_gb", lo=0, lo_open=True, optional=True, note="null: the device's own")
    if _get(settings, "plan_memory_gb") not in (_MISSING, None) and not _planning(settings):
        _fail(
            "plan_memory_gb",
            _get(settings, "plan_memory_gb"),
            "read only with plan=true (a run checks the device's free memory)",
        )


def check_train_paths(settings: Mapping[str, Any]) -> None:
    """The files a run reads first exist: `model.net.init_from`'s config.json (also under `plan=true`, which plans
    from it), `data.processor` and every local manifest of `data.train` and `data.val` (`train.py`, after
    :func:`check_train_settings`; not under `plan=true`, which reads no data). They were found
    missing only after the model was built (minutes for the release) and its window checked, as a bare
    `trainx.jsonl: No such file or directory` or `procx: processor directory not found`."""
    _init_from(settings)  # plan=true reads its config.json too
    if _planning(settings):
        return
    _processor_folder(settings)
    for key in ("data.train", "data.val"):
        _manifests_exist(settings, key)


def _init_from(settings: Mapping[str, Any]) -> None:
    """`model.net.init_from`, when set, is a checkpoint folder with a readable config.json: load_config's message
    (a missing folder, a file given for it, a run or adapter folder, an interrupted save) with the setting named;
    it came from the planner without the setting, as `/x: checkpoint folder does not exist`."""
    value = _get(settings, "model.net.init_from")
    if value in (_MISSING, None, ""):
        return
    try:
        load_config(str(value))
    except CheckpointError as e:
        raise SettingsError(f"model.net.init_from: {e}") from None


def _processor_folder(settings: Mapping[str, Any]) -> None:
    """`data.processor` is set (its default, `model.net.init_from`, may be null) and, when not init_from (whose own
    check names it), an existing folder."""
    value = _get(settings, "data.processor")
    if value is _MISSING:
        return
    if value in (None, ""):
        _fail(
            "data.processor",
            value,
            "expected the folder of the tokenizer and processor files (a checkpoint folder works; it defaults "
            "to model.net.init_from, which is null)",
        )
    if value != _get(settings, "model.net.init_from") and not Path(str(value)).expanduser().is_dir():
        _fail("data.processor", value, "no such folder (expected the tokenizer and processor files)")


def _manifests_exist(settings: Mapping[str, Any], key: str) -> None:
    """Every local manifest of `key` (a path, a list of paths or of `{path, weight}`) exists; URLs (shards in an
    object store) are left to their reader. Relative paths are read from the folder the run starts in."""
    value = _get(settings, key)
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, Sequence):
        return
    for i, item in enumerate(items):
        path = item.get("path") if isinstance(item, Mapping) else item
        if not isinstance(path, str) or not path or "://" in path or path.startswith("local:"):
            continue  # the wrong kinds are named by the datamodule's parse_manifest_spec
        if not Path(path).exists():
            where = key if isinstance(value, (str, Mapping)) else f"{key}[{i}]"
            relative = (
                ""
                if Path(path).is_absolute()
                else f" (read from {Path.cwd()}, the folder the run started in)"
            )
            _fail(where, path, f"no such manifest file or shard folder{relative}")


def _folder(settings: Mapping[str, Any], key: str) -> None:
    """`key`, when set, names a folder or a path not made yet, not a file (the error came later, as
    "File exists" or "not found", without the setting)."""
    value = _get(settings, key)
    if isinstance(value, str) and value and Path(value).expanduser().is_file():
        _fail(key, value, "a file, where a folder is expected")


# `trainer.max_time`: Lightning's Timer reads DD:HH:MM:SS or a dict of timedelta's keywords
_MAX_TIME = re.compile(r"\d+:\d\d:\d\d:\d\d")
_TIMEDELTA_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")


def _max_time(settings: Mapping[str, Any]) -> None:
    value = _get(settings, "trainer.max_time")
    if value in (_MISSING, None):
        return
    if isinstance(value, str) and _MAX_TIME.fullmatch(value.strip()):
        return
    if (
        isinstance(value, Mapping)
        and value
        and all(k in _TIMEDELTA_KEYS and _is_number(v) for k, v in value.items())
    ):
        return
    expected = "expected DD:HH:MM:SS (00:12:00:00 is 12 hours), {hours: 12} or null"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        # YAML 1.1 reads an unquoted 1:00:00:00 (not 00:...) as a base-60 number: 216000; written back in base 60
        typed = f"{value // 60**3}:{value // 3600 % 60:02d}:{value // 60 % 60:02d}:{value % 60:02d}"
        expected += f"; in a YAML file quote it ('{typed}'): unquoted, YAML reads {typed} as a base-60 number"
    _fail("trainer.max_time", value, expected)


def _callbacks(settings: Mapping[str, Any]) -> None:
    """The values of the callbacks `configs/callbacks/` builds (Lightning refused them only after the model was
    built, or took any text as true)."""
    callbacks = _get(settings, "callbacks")
    if not isinstance(callbacks, Mapping):
        return
    for name, cb in callbacks.items():
        if not isinstance(cb, Mapping):
            continue
        target, key = str(cb.get("_target_", "")), f"callbacks.{name}"
        if target.endswith(".ModelCheckpoint"):
            _number(
                settings,
                f"{key}.every_n_train_steps",
                integer=True,
                lo=0,
                optional=True,
                note="0: not by steps",
            )
            _number(settings, f"{key}.every_n_epochs", integer=True, lo=0, optional=True)
            _number(settings, f"{key}.save_top_k", integer=True, lo=0, special=(-1,), note="-1: every file")
            save_last = _get(settings, f"{key}.save_last")
            if save_last not in (_MISSING, None, True, False, "link"):
                _fail(f"{key}.save_last", save_last, "expected true, false, link or null")
            for flag in ("save_on_train_epoch_end", "auto_insert_metric_name", "save_weights_only"):
                _boolean(settings, f"{key}.{flag}")
            _choice(settings, f"{key}.mode", ("min", "max"))
        elif target.endswith(".EarlyStopping"):
            _choice(settings, f"{key}.mode", ("min", "max"))
            for flag in ("verbose", "strict", "check_finite", "log_rank_zero_only"):
                _boolean(settings, f"{key}.{flag}")
        elif target == "musicflamingo.callbacks.ProgressLog":
            _number(settings, f"{key}.every_n_steps", integer=True, lo=1)
            _boolean(settings, f"{key}.on_terminal")
        elif target == "musicflamingo.callbacks.BadSampleReport":
            _folder_not(settings, f"{key}.path")


def _loggers(settings: Mapping[str, Any]) -> None:
    loggers = _get(settings, "logger")
    if not isinstance(loggers, Mapping):
        return
    for name, cfg in loggers.items():
        if isinstance(cfg, Mapping) and str(cfg.get("_target_", "")).endswith("WandbLogger"):
            for flag in ("offline", "rewind"):
                _boolean(settings, f"logger.{name}.{flag}")
            log_model = _get(settings, f"logger.{name}.log_model")
            if log_model not in (_MISSING, True, False, "all"):
                _fail(f"logger.{name}.log_model", log_model, "expected true, false or all")


def _folder_not(settings: Mapping[str, Any], key: str) -> None:
    """`key`, when set, names a file to write, not an existing folder."""
    value = _get(settings, key)
    if isinstance(value, str) and value and Path(value).expanduser().is_dir():
        _fail(key, value, "a folder, where a file to write is expected")


def _threads(settings: Mapping[str, Any]) -> None:
    value = _get(settings, "threads")
    if value is not _MISSING and value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail("threads", value, "expected an integer >= 1, or null (torch's default)")


def _device_dtype(settings: Mapping[str, Any]) -> None:
    device, dtype = _get(settings, "device"), _get(settings, "dtype")
    if device is not _MISSING:
        try:
            resolve_device(device)  # RuntimeConfigError naming `device=...`
        except RuntimeConfigError:
            # plan=true plans for a GPU this machine may not have (a name torch does not know still fails)
            if not (_planning(settings) and _gpu_name(device)):
                raise
    if dtype is not _MISSING:
        parse_dtype(dtype)  # RuntimeConfigError naming `dtype=...`
    quantize = _get(settings, "quantize")
    if quantize is not _MISSING and quantize not in (None, *QUANTIZE_METHODS):
        _fail("quantize", quantize, f"expected null or one of {list(QUANTIZE_METHODS)}")


def _gpu_name(device: Any) -> bool:
    try:
        return torch.device(str(device)).type in ("cuda", "mps")
    except RuntimeError:
        return False


def _accelerator(settings: Mapping[str, Any], key: str) -> None:
    value = _get(settings, key)
    if value in ("gpu", "cuda") and not torch.cuda.is_available():
        _fail(key, value, "CUDA is not available here; use trainer=cpu")
    if value == "mps" and not torch.backends.mps.is_available():
        _fail(key, value, "MPS is not available here; use trainer=cpu")
