"""Hugging Face layout checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Pure checkpoint I/O and a name-table rename of state dicts; the model class is never imported here (it builds
itself: `MusicFlamingo.from_pretrained` / `save_pretrained`). One literal `{checkpoint_name: our_name}` table
(`NAME_TABLE`, `{}` = layer index) maps the on-disk names that the reference writes (transformers >= 5.5:
`language_model.model.*`, `language_model.lm_head.weight`, `audio_tower.*`, `multi_modal_projector.*`) to our
module names. Unknown keys raise, ignored keys are listed in `IGNORED_KEYS`, reading is strict (every bad name or
shape is reported before a byte of tensor data is read), and `write_state_dict` writes the same layout back.

`read_state_dict` maps each shard (a private, copy-on-write `mmap`): a tensor whose dtype already matches and
that stays on the CPU is used straight from the mapping (no copy: pages come in from the page cache on first use,
and a load takes about the time of reading the headers); any other tensor is converted to the target dtype/device
one at a time, so a caller that assigns them into a model built on the meta device never holds two copies.
`mmap=False` reads every tensor into memory of its own with plain reads instead. Only safetensors are read; pickle formats are refused; shard names stay
inside the folder, and messages never quote bytes of a file. Reading never changes the filesystem: an
interrupted save is repaired by the next write or by `recover_interrupted_save`.

Writing (`save_files`) replaces only the files a save owns (`MODEL_FILES` and shards, `PROCESSOR_FILES`) and
keeps everything else in the folder; it refuses a target that is a file or another model's folder unless told
to overwrite, and so does a quantized save into a folder whose weights are unquantized or quantized otherwise.
`replace_file` and `atomic_torch_save` (a training checkpoint) write one file through a renamed temporary one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from musicflamingo.model.config import ConfigError, MusicFlamingoConfig, read_json_object
from musicflamingo.runtime import parse_dtype

log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# checkpoint name -> our name. `{}` stands for a layer index.
NAME_TABLE: dict[str, str] = {
    # audio encoder (names are identical)
    "audio_tower.conv1.weight": "audio_tower.conv1.weight",
    "audio_tower.conv1.bias": "audio_tower.conv1.bias",
    "audio_tower.conv2.weight": "audio_tower.conv2.weight",
    "audio_tower.conv2.bias": "audio_tower.conv2.bias",
    "audio_tower.embed_positions.weight": "audio_tower.embed_positions.weight",
    "audio_tower.layers.{}.self_attn_layer_norm.weight": "audio_tower.layers.{}.self_attn_layer_norm.weight",
    "audio_tower.layers.{}.self_attn_layer_norm.bias": "audio_tower.layers.{}.self_attn_layer_norm.bias",
    "audio_tower.layers.{}.self_attn.q_proj.weight": "audio_tower.layers.{}.self_attn.q_proj.weight",
    "audio_tower.layers.{}.self_attn.q_proj.bias": "audio_tower.layers.{}.self_attn.q_proj.bias",
    "audio_tower.layers.{}.self_attn.k_proj.weight": "audio_tower.layers.{}.self_attn.k_proj.weight",
    "audio_tower.layers.{}.self_attn.v_proj.weight": "audio_tower.layers.{}.self_attn.v_proj.weight",
    "audio_tower.layers.{}.self_attn.v_proj.bias": "audio_tower.layers.{}.self_attn.v_proj.bias",
    "audio_tower.layers.{}.self_attn.out_proj.weight": "audio_tower.layers.{}.self_attn.out_proj.weight",
    "audio_tower.layers.{}.self_attn.out_proj.bias": "audio_tower.layers.{}.self_attn.out_proj.bias",
    "audio_tower.layers.{}.final_layer_norm.weight": "audio_tower.layers.{}.final_layer_norm.weight",
    "audio_tower.layers.{}.final_layer_norm.bias": "audio_tower.layers.{}.final_layer_norm.bias",
    "audio_tower.layers.{}.fc1.weight": "audio_tower.layers.{}.fc1.weight",
    "audio_tower.layers.{}.fc1.bias": "audio_tower.layers.{}.fc1.bias",
    "audio_tower.layers.{}.fc2.weight": "audio_tower.layers.{}.fc2.weight",
    "audio_tower.layers.{}.fc2.bias": "audio_tower.layers.{}.fc2.bias",
    "audio_tower.layer_norm.weight": "audio_tower.layer_norm.weight",
    "audio_tower.layer_norm.bias": "audio_tower.layer_norm.bias",
    # projector
    "multi_modal_projector.linear_1.weight": "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_1.bias": "multi_modal_projector.linear_1.bias",
    "multi_modal_projector.linear_2.weight": "multi_modal_projector.linear_2.weight",
    "multi_modal_projector.linear_2.bias": "multi_modal_projector.linear_2.bias",
    # Qwen2 decoder: the reference nests it as a Qwen2ForCausalLM under `language_model`
    "language_model.model.embed_tokens.weight": "language_model.embed_tokens.weight",
    "language_model.model.layers.{}.input_layernorm.weight": "language_model.layers.{}.input_layernorm.weight",
    "language_model.model.layers.{}.self_attn.q_proj.weight": "language_model.layers.{}.self_attn.q_proj.weight",
    "language_model.model.layers.{}.self_attn.q_proj.bias": "language_model.layers.{}.self_attn.q_proj.bias",
    "language_model.model.layers.{}.self_attn.k_proj.weight": "language_model.layers.{}.self_attn.k_proj.weight",
    "language_model.model.layers.{}.self_attn.k_proj.bias": "language_model.layers.{}.self_attn.k_proj.bias",
    "language_model.model.layers.{}.self_attn.v_proj.weight": "language_model.layers.{}.self_attn.v_proj.weight",
    "language_model.model.layers.{}.self_attn.v_proj.bias": "language_model.layers.{}.self_attn.v_proj.bias",
    "language_model.model.layers.{}.self_attn.o_proj.weight": "language_model.layers.{}.self_attn.o_proj.weight",
    "language_model.model.layers.{}.post_attention_layernorm.weight": (
        "language_model.layers.{}.post_attention_layernorm.weight"
    ),
    "language_model.model.layers.{}.mlp.gate_proj.weight": "language_model.layers.{}.mlp.gate_proj.weight",
    "language_model.model.layers.{}.mlp.up_proj.weight": "language_model.layers.{}.mlp.up_proj.weight",
    "language_model.model.layers.{}.mlp.down_proj.weight": "language_model.layers.{}.mlp.down_proj.weight",
    "language_model.model.norm.weight": "language_model.norm.weight",
    "language_model.lm_head.weight": "lm_head.weight",
}

# Present in some checkpoints, recomputed from config here (rotary buffers; NVIDIA's original RoTE table).
IGNORED_KEYS = (
    "pos_emb.inv_freq",
    "pos_emb.original_inv_freq",
    "pos_emb.position_angles",
    "language_model.model.rotary_emb.inv_freq",
    "audio_tower.pos_emb.freqs",
)

# The >= 5.10 in-memory layout (`model.language_model.layers...`, top-level `lm_head`), accepted on load.
_ALT_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.pos_emb.", "pos_emb."),
    ("lm_head.", "language_model.lm_head."),
)

_LAYER = re.compile(r"\.(\d+)\.")
_TO_OURS = NAME_TABLE
_TO_HF = {v: k for k, v in NAME_TABLE.items()}

# safetensors' on-disk dtype names
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or does not match the model."""


def _template(name: str) -> tuple[str, list[str]]:
    return _LAYER.sub(".{}.", name), _LAYER.findall(name)


# A quantized linear (`model/quantize.py`) stores its scales next to its weight, under the weight's name plus one
# of these suffixes (int8: `_scale`, int4: `_scale_zero`), on disk as in the model. Longest first.
_QUANT_SUFFIXES = ("_scale_zero", "_scale")


def _quant_suffix(name: str) -> str:
    return next((s for s in _QUANT_SUFFIXES if name.endswith(".weight" + s)), "")


def _stored_method(names: Iterable[str]) -> str | None:
    """The quantization a set of tensor names holds, from the scales' suffixes (int4: `_scale_zero`, int8: `_scale`
    only), or None for float weights."""
    suffixes = {_quant_suffix(n) for n in names}
    return "int4" if "_scale_zero" in suffixes else "int8" if "_scale" in suffixes else None


def canonical_name(name: str) -> str:
    """A checkpoint name in the reference layout: the >= 5.10 layout's prefixes (`_ALT_PREFIXES`) rewritten."""
    for alt, canonical in _ALT_PREFIXES:
        if name.startswith(alt):
            return canonical + name[len(alt) :]
    return name


def hf_to_ours(name: str) -> str | None:
    """Map a checkpoint name to ours; None if it is not in the table."""
    if suffix := _quant_suffix(name):
        ours = hf_to_ours(name[: -len(suffix)])
        return None if ours is None else ours + suffix
    tmpl, idx = _template(canonical_name(name))
    ours = _TO_OURS.get(tmpl)
    return ours.format(*idx) if ours is not None else None


def _has_hf_name(name: str) -> bool:
    try:
        ours_to_hf(name)
    except KeyError:
        return False
    return True


def ours_to_hf(name: str) -> str:
    if suffix := _quant_suffix(name):
        return ours_to_hf(name[: -len(suffix)]) + suffix
    tmpl, idx = _template(name)
    if tmpl not in _TO_HF:
        raise KeyError(f"parameter {name!r} has no entry in the checkpoint name table")
    return _TO_HF[tmpl].format(*idx)


# ---------------------------------------------------------------------------------------------- reading
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what the model's weights may be stored as
_MAX_HEADER = 100_000_000


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters (names from a file can be arbitrarily long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice would silently keep only its last value."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return `(header, data_offset)`; validates every entry (dtype, shape, offsets) and that the tensors lie
    inside the file without overlapping. Messages name the file and tensor, never bytes of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size or n > _MAX_HEADER:
                raise CheckpointError(
                    f"{path}: not a safetensors file, or a truncated one (the header length it starts with does "
                    f"not fit its {size} B)"
                )
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(
            f"{path}: corrupt safetensors header (key {_short(e.args[0])} given twice)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    spans = []
    for key, info in header.items():
        where = f"{path}: tensor {_short(key)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{where}: unsupported dtype {_short(dtype, 20)} (supported: {', '.join(_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: malformed shape (expected a list of integers >= 0)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise CheckpointError(f"{where}: malformed data_offsets (expected [begin, end])")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise CheckpointError(f"{where}: data_offsets are negative or end before they begin")
        if end - begin != math.prod(shape) * torch.empty((), dtype=_DTYPES[dtype]).element_size():
            raise CheckpointError(f"{where}: byte range does not match its shape {shape}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {_short(key)} needs bytes up to {data_start + end}, "
                f"file has {size}"
            )
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    for (_, prev_end, prev), (begin, _, key) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{path}: tensors {_short(prev)} and {_short(key)} overlap in the file")
    return header, data_start


def _read_tensor(f: Any, info: dict[str, Any], data_start: int) -> torch.Tensor:
    t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    f.seek(data_start + begin)
    if end > begin:
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())
        got = f.readinto(buf)
        if got != end - begin:
            raise CheckpointError(f"{f.name}: truncated tensor data")
    return t


def _map_file(path: Path) -> mmap.mmap | None:
    """A private (copy-on-write) mapping of `path`: writes to the tensors never reach the file, and a later save,
    which renames new files into place, leaves the mapped old file intact. None for an empty file."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) if size else None


def _mapped_tensor(mapped: mmap.mmap, info: dict[str, Any], data_start: int) -> torch.Tensor | None:
    """The tensor as a view of the mapping, or None when its offset is not aligned to its element size."""
    dt = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    size = torch.empty((), dtype=dt).element_size()
    if end == begin or (data_start + begin) % size:
        return None
    flat = torch.frombuffer(mapped, dtype=dt, count=(end - begin) // size, offset=data_start + begin)
    return flat.view(info["shape"])


def _shard_name(index: Path, key: Any, value: Any) -> str:
    """A `weight_map` value: a plain file name of the checkpoint folder. `/`, `..` and absolute paths would read
    files outside it; a folder entry that is a symlink (a Hugging Face cache's `snapshots/<rev>/` links into
    `../../blobs/`) is fine, since the folder's owner made it."""
    ok = isinstance(value, str) and value not in ("", ".", "..") and "\x00" not in value
    if not ok or "/" in value or "\\" in value or os.path.isabs(value):
        raise CheckpointError(
            f"{index}: weight_map[{_short(key)}] = {_short(value)} is not a file name in the checkpoint folder "
            "(shards are plain names: no '/', '..' or absolute paths)"
        )
    return value


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map each checkpoint tensor name to its file (single file or sharded index); shard names are checked to
    stay in `path` (see :func:`_shard_name`)."""
    path = Path(path).expanduser()
    refuse_interrupted_save(path)
    index = path / SAFE_WEIGHTS_INDEX_NAME
    single = path / SAFE_WEIGHTS_NAME
    if index.is_file() and single.is_file():
        # one is left from an earlier save (transformers' save_pretrained leaves the other kind in place); which one
        # cannot be told, and transformers reads model.safetensors: the two loaders would compute different models
        raise CheckpointError(
            f"{path}: holds both {SAFE_WEIGHTS_NAME} and {SAFE_WEIGHTS_INDEX_NAME} (a sharded set), one of them "
            f"left from an earlier save; transformers reads {SAFE_WEIGHTS_NAME}, so remove whichever is stale (the "
            "index and its model-*-of-*.safetensors shards, or the single file)"
        )
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            why = "not UTF-8 JSON" if isinstance(e, (UnicodeDecodeError, RecursionError)) else e
            raise CheckpointError(f"{index}: malformed shard index ({why})") from None
        if not isinstance(raw, dict) or "weight_map" not in raw:
            what = "no weight_map" if isinstance(raw, dict) else f"a JSON {type(raw).__name__}, not an object"
            raise CheckpointError(
                f'{index}: malformed shard index ({what}; expected {{"weight_map": {{tensor name: shard file}}}})'
            )
        weight_map = raw["weight_map"]
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: malformed shard index (weight_map is not an object)")
        files = {k: path / _shard_name(index, k, v) for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} listed in the index is missing")
        return files
    if single.is_file():
        header, _ = read_safetensors_header(single)
        return {k: single for k in header}
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {pickles}: pickle formats are refused, convert them to safetensors)" if pickles else ""
    shards = sorted(p.name for p in path.glob("*.safetensors") if _SHARD_FILE.fullmatch(p.name))
    if shards and not hint:  # a download that left the index out
        hint = (
            f" (found {len(shards)} shard file(s), {shards[0]}, ..., but not the index that lists their tensors, "
            f"{SAFE_WEIGHTS_INDEX_NAME}: download it too)"
        )
    hint = hint or _not_a_model_hint(path)
    raise CheckpointError(f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}")


def _check_shards(path: Path, files: Mapping[str, Path], headers: Mapping[Path, tuple[dict, int]]) -> None:
    """Every tensor is in exactly the file the index names: none missing from its shard, none in a shard but
    not in the index, none in two shards."""
    index = path / SAFE_WEIGHTS_INDEX_NAME
    for name, f in files.items():
        if name not in headers[f][0]:
            raise CheckpointError(f"{f}: tensor {_short(name)} listed in the index is not in the file")
    seen: dict[str, Path] = {}
    for f in sorted(headers):
        for name in headers[f][0]:
            if name in seen:
                raise CheckpointError(
                    f"{index}: tensor {_short(name)} is in two shards, {seen[name].name} and {f.name}"
                )
            seen[name] = f
            if name not in files:
                raise CheckpointError(f"{index}: tensor {_short(name)} of shard {f.name} is not in the index")


# ---------------------------------------------------------------------------------------------- interrupted saves
# A save writes its files into a staging folder inside the target, `.save-XXXX`, and moves them in once a COMMIT
# file there lists them (see `save_files`).
_STAGING = ".save-"
_COMMIT = "COMMIT"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _interrupted_save_backups(final: Path, dead_only: bool = True) -> list[Path]:
    """`.{name}.old-{pid}` folders next to `final`, oldest first: saves of earlier versions swapped whole folders
    and a kill between their two renames left the complete old folder there. With `dead_only`, only those of
    writers no longer running (or of this process)."""
    found = []
    for b in final.parent.glob(f".{final.name}.old-*"):
        pid = b.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        if not dead_only or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            try:
                found.append((b.stat().st_mtime, b))
            except OSError:  # a running writer removed its backup meanwhile
                continue
    return [b for _, b in sorted(found)]


def _missing_folder_hint(path: Path) -> str:
    """Names the backup a save killed between its two renames left instead of `path` (empty if none)."""
    backups = _interrupted_save_backups(path, dead_only=False)
    if not backups:
        return ""
    b = backups[-1]
    return (
        f"; {b} holds it, left by an interrupted save: run the save again, or rename {b.name} to {path.name} "
        "(musicflamingo.checkpoint.recover_interrupted_save does it)"
    )


def _not_a_model_hint(path: Path) -> str:
    """What to do with a peft LoRA adapter folder (`adapter_config.json`, e.g. a run's `export_adapter/`) or a
    training run's folder given where a model folder goes; empty for any other folder."""
    config = path / "adapter_config.json"
    if not config.is_file():
        if (path / "export" / "config.json").is_file():  # a training run's folder
            return f": it looks like a training run's folder; its model is {path / 'export'}"
        return ""
    base = ""
    with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
        named = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if isinstance(named, str) and named:
            base = f" (its adapter_config.json names the base model {_short(named, 200)})"
    return (
        f": it holds adapter_config.json, so it is a peft LoRA adapter folder, adapters without a model. Give the "
        f"base model's folder{base} instead, with this folder as model.net.lora.init_from_peft "
        "(model.net.lora.enabled=true) to train on; to chat or evaluate, put the adapters on the base model "
        "(musicflamingo.model.peft_format.load_peft_adapter), merge_lora and save_pretrained it; a training run's "
        "merged model is <run>/export, beside <run>/export_adapter"
    )


def _refuse_embedded_adapter(path: Path) -> None:
    """CheckpointError for a model folder that also holds a peft adapter (adapter_config.json beside config.json):
    transformers' from_pretrained (with peft installed) puts those adapters on top of the folder's weights, so
    loading the weights alone would compute another model than the reference, silently."""
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        raise CheckpointError(
            f"{path}: holds {adapter.name} (a peft LoRA adapter) beside config.json; transformers' from_pretrained "
            "puts those adapters on top of this folder's weights, this loader would not, so the two would compute "
            "different models. If the weights already hold them (a training run's merged export/), remove "
            "adapter_config.json and adapter_model.safetensors; to use them, move the two files into a folder of "
            "their own and load it with musicflamingo.model.peft_format.load_peft_adapter (or train from it with "
            "model.net.lora.init_from_peft)"
        )


def refuse_interrupted_save(path: Path) -> None:
    """CheckpointError if a save into the folder `path` was committed but not all its files are moved in yet
    (cut off, or running now): the folder then mixes old and new files. Reading changes nothing."""
    for staging in sorted(path.glob(_STAGING + "*")):
        if (staging / _COMMIT).is_file():
            raise CheckpointError(
                f"{path}: a save into this folder is being finished or was interrupted ({staging.name} holds the "
                "rest of its files): run the save again, or call "
                "musicflamingo.checkpoint.recover_interrupted_save on the folder to finish it"
            )


def load_config(path: str | Path) -> MusicFlamingoConfig:
    """The config.json of the checkpoint folder `path` (CheckpointError naming the file and the problem); a leading
    `~` is the home folder, as in `ckpt=` (a shell leaves `model.net.init_from=~/...` as typed)."""
    path = Path(path).expanduser()
    if path.is_file():  # a weights file or a Lightning .ckpt given where the folder goes
        raise CheckpointError(
            f"{path} is a file, not a checkpoint folder: give the folder that holds config.json and the safetensors "
            f"(here {path.parent}, if this is one of its files; a training run's is <run>/export; a Lightning "
            "checkpoint such as <run>/checkpoints/last.ckpt resumes its run with ckpt_path= instead)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist{_missing_folder_hint(path)}")
    refuse_interrupted_save(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(
            f"{path}: no config.json, so this is not a Music Flamingo checkpoint folder{_not_a_model_hint(path)}"
        )
    _refuse_embedded_adapter(path)
    try:
        return MusicFlamingoConfig.from_json(cfg)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def check_checkpoint_dir(path: Any, need_tokenizer: bool = True) -> Path:
    """The folder `path` (a `ckpt=` setting) after the checks that need no weights: it is set, is a folder, has a
    valid config.json and, with `need_tokenizer`, a tokenizer. CheckpointError naming the path and what is
    missing otherwise, so entry points fail before loading anything."""
    if path is None or str(path).strip() in ("", "???"):
        raise CheckpointError("ckpt is not set: pass ckpt=/path/to/checkpoint_folder")
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "not a folder"
        raise CheckpointError(
            f"ckpt={path} is {what} (expected a checkpoint folder with config.json){_missing_folder_hint(path)}"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"ckpt={path} has no config.json (expected a checkpoint folder saved by save_pretrained)"
            + _not_a_model_hint(path)
        )
    load_config(path)  # a config.json of another model, or with bad values
    if need_tokenizer and not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise CheckpointError(
            f"ckpt={path} has no tokenizer.json or tokenizer.model, so it cannot be used to chat (a folder written "
            "by model.save_pretrained alone, e.g. a quantized copy, needs the processor files too: "
            "MusicFlamingoProcessor.from_pretrained(SOURCE_DIR).save_pretrained(this folder))"
        )
    return path


# generation_config.json keys transformers writes about itself, not about decoding
_GENERATION_BOOKKEEPING = ("transformers_version", "_from_model_config")


def generation_config(path: str | Path | None) -> dict[str, Any]:
    """The decoding defaults of the folder's `generation_config.json` ({} without the file): `eos_token_id` (as a
    list), `pad_token_id`, `max_new_tokens`, and every other setting the file gives (`do_sample`, `temperature`,
    `top_k`, `top_p`, `max_length`, ...; those five type-checked), as the reference's `generate()` reads them, so a
    save (a training run's export) writes them back; transformers' bookkeeping (`transformers_version`,
    `_from_model_config`) and null values are left out. The release writes `max_new_tokens=2048`, which the
    reference's `generate()` uses when the caller gives no length."""
    gen_file = Path(path).expanduser() / "generation_config.json" if path is not None else None
    if gen_file is None or not gen_file.is_file():
        return {}
    raw = read_json_object(gen_file, CheckpointError)
    out: dict[str, Any] = {}
    eos = raw.get("eos_token_id")
    eos = [eos] if eos is not None and not isinstance(eos, list) else (eos or [])
    bad = [e for e in eos if isinstance(e, bool) or not isinstance(e, int) or e < 0]
    if bad:
        raise CheckpointError(
            f"{gen_file}: eos_token_id must be an integer id or a list of them, got {bad[0]!r}"
        )
    if eos:
        out["eos_token_id"] = eos
    for key, low in (("pad_token_id", 0), ("max_new_tokens", 1), ("max_length", 1), ("top_k", 0)):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CheckpointError(f"{gen_file}: {key} must be an integer >= {low}, got {value!r}")
        out[key] = value
    if raw.get("do_sample") is not None and not isinstance(raw["do_sample"], bool):
        raise CheckpointError(f"{gen_file}: do_sample must be true or false, got {_short(raw['do_sample'])}")
    for key in ("temperature", "top_p"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(f"{gen_file}: {key} must be a number, got {_short(value)}")
    # the rest as written: a save writes back what the reference's generate() would have read from this file
    for key, value in raw.items():
        if key not in out and key not in ("eos_token_id", *_GENERATION_BOOKKEEPING) and value is not None:
            out[key] = value
    return out


def stop_token_ids(path: str | Path | None, config: MusicFlamingoConfig) -> list[int]:
    """The ids that end an answer: `eos_token_id` of the folder's `generation_config.json` (int or list) plus the
    config's eos. Every generating entry point (infer, eval, serve, the chat) stops on these."""
    return stop_ids(generation_config(path), config)


def stop_ids(generation: Mapping[str, Any], config: MusicFlamingoConfig) -> list[int]:
    """`stop_token_ids` from generation settings already read (`generation_config(path)`, which a loaded model
    keeps as `generation_defaults`)."""
    ids: list[int] = list(generation.get("eos_token_id", []))
    if config.text.eos_token_id is not None:
        ids.append(config.text.eos_token_id)
    return sorted(set(int(i) for i in ids))


def _auto_dtype(path: Path, stored: Sequence[str]) -> torch.dtype | None:
    """The dtype floating tensors load as under dtype None/"auto" (safetensors dtype names `stored`), as
    transformers' from_pretrained (whose None is "auto") chooses it: config.json's top-level `dtype` (else its
    older `torch_dtype`) when set; else None when they share one dtype, which they then keep; else the dtype most of
    them are stored in (a model in several dtypes fails in its first matmul). A sub-config's `dtype` is not read,
    as transformers does not read it."""
    config = path / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None  # load_config has read it before: only a folder changed meanwhile gets here
    field = next(
        (k for k in ("dtype", "torch_dtype") if isinstance(raw, dict) and raw.get(k) is not None), None
    )
    if field is not None:
        try:
            named = parse_dtype(raw[field]) if isinstance(raw[field], str) else False
        except ValueError:
            named = False
        if named is False:
            raise CheckpointError(
                f"{config}: {field}={raw[field]!r}: expected a floating dtype name (float32, bfloat16, float16, "
                "float64) or 'auto', which dtype=None/'auto' loads the weights in; pass dtype= explicitly to load "
                "them another way"
            )
        if named is not None:
            if any(d in _FLOAT_DTYPES and _DTYPES[d] != named for d in stored):
                log.info("%s: weights loaded as %s (config.json's %s)", path, named, field)
            return named
    floats = [d for d in stored if d in _FLOAT_DTYPES]
    if len(set(floats)) < 2:
        return None
    chosen = _DTYPES[max(set(floats), key=floats.count)]
    counts = ", ".join(f"{floats.count(d)} {d}" for d in sorted(set(floats)))
    log.info("%s: weights stored in several dtypes (%s): loaded as %s", path, counts, chosen)
    return chosen


def read_state_dict(
    path: str | Path,
    expected: Mapping[str, Sequence[int]],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    mmap: bool = True,
    integer: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint folder `path`, renamed to our names, on `device` in `dtype`; with `mmap`,
    CPU tensors whose dtype already matches are views of a private mapping of their file (see the module doc).

    `expected` is `{our_name: shape}` (a model's `state_dict()` on the meta device gives it). Every name and shape
    is checked before any tensor data is read; missing, unexpected and wrong-shaped keys are all reported in one
    CheckpointError. dtype None/"auto" is config.json's `dtype` (`torch_dtype`), else the checkpoint's own (one
    dtype for a checkpoint stored in several), as transformers loads it (`_auto_dtype`); only floating tensors are
    converted.
    `integer`: our names stored as integers, with their dtype (a quantized model's linear weights: int8, or uint8
    holding two int4 values); every other tensor must be floating.
    """
    path = Path(path).expanduser()
    target = parse_dtype(dtype)  # RuntimeConfigError for a name or torch dtype that is not a float type
    device = torch.device(device or "cpu")
    files = checkpoint_files(path)
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    for f in set(files.values()):
        headers[f] = read_safetensors_header(f)
    _check_shards(path, files, headers)
    mapping: dict[str, str] = {}
    unexpected, wrong_shape, wrong_dtype, twice = [], [], [], []
    for name, f in files.items():
        # ignored in either layout: `model.pos_emb.inv_freq` is `pos_emb.inv_freq`
        if canonical_name(name) in IGNORED_KEYS:
            continue
        ours = hf_to_ours(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        # both layouts' names of one weight (`lm_head.weight` beside `language_model.lm_head.weight`)
        if ours in mapping:
            twice.append(f"{mapping[ours][:80]} and {name[:80]} are both {ours_to_hf(ours)}")
            continue
        info = headers[f][0][name]
        if list(info["shape"]) != list(expected[ours]):
            wrong_shape.append(
                f"{f.name}: {name}: checkpoint {list(info['shape'])} vs model {list(expected[ours])}"
            )
        if integer and ours in integer:
            want = _DTYPE_NAMES[integer[ours]]
            if info["dtype"] != want:
                wrong_dtype.append(
                    f"{f.name}: {name} is {info['dtype']}, expected {want} (a quantized weight)"
                )
        elif info["dtype"] not in _FLOAT_DTYPES:  # int8 of a quantized export would fail in a matmul
            wrong_dtype.append(f"{f.name}: {name} is {info['dtype']}")
        mapping[ours] = name
    missing = sorted(ours_to_hf(k) for k in expected if k not in mapping)
    if missing or unexpected or wrong_shape or wrong_dtype or twice:
        parts = []
        stored, wanted = _stored_method(files), _stored_method(expected)
        if stored != wanted:  # the one fact that explains every line below
            parts.append(
                f"its weights are {stored or 'not quantized'} but config.json says "
                f"{wanted or 'not quantized'} (quantization_config): put back the config.json the weights were "
                "saved with"
            )
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {[k[:80] for k in sorted(unexpected)[:20]]}")
        if twice:  # which of the two was meant cannot be told: neither is taken
            parts.append(
                f"weights stored twice under names of the two layouts ({len(twice)}; keep one of each): "
                f"{[t[:300] for t in sorted(twice)[:20]]}"
            )
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {wrong_shape[:20]}")
        if wrong_dtype:
            parts.append(
                f"unsupported dtypes ({len(wrong_dtype)}, the weights must be {'/'.join(_FLOAT_DTYPES)}; "
                f"quantized checkpoints only as written by our save_pretrained of a quantize=int8/int4 model): "
                f"{wrong_dtype[:20]}"
            )
        raise CheckpointError(f"{path}: checkpoint does not match the config: " + "; ".join(parts))

    if target is None:
        target = _auto_dtype(path, [headers[files[name]][0][name]["dtype"] for name in mapping.values()])
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for ours, name in mapping.items():
        by_file.setdefault(files[name], []).append(ours)
    for f, names in by_file.items():
        header, start = headers[f]
        mapped = _map_file(f) if mmap else None
        with open(f, "rb") as fh:
            for ours in names:
                info = header[mapping[ours]]
                t = _mapped_tensor(mapped, info, start) if mapped is not None else None
                if t is None:
                    t = _read_tensor(fh, info, start)
                want = target if (target is not None and t.is_floating_point()) else t.dtype
                state[ours] = t.to(device=device, dtype=want)  # no copy when dtype/device already match
                del t
        del mapped  # tensors that are views keep the mapping alive; the others do not need it
    return state


# ---------------------------------------------------------------------------------------------- writing
# What a model save writes, so what it replaces (or removes, e.g. the shards of an earlier sharded save).
MODEL_FILES = ("config.json", "generation_config.json", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# What `MusicFlamingoProcessor.save_pretrained` writes (either tokenizer kind), so what it replaces or removes.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
)


def is_model_file(name: str) -> bool:
    """Whether a model save owns the file `name` of a checkpoint folder."""
    return name in MODEL_FILES or bool(_SHARD_FILE.fullmatch(name))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    # every unit the pattern admits is in the table (a bare "IB" or "TIB" was a KeyError)
    pattern = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*((?:[KMGT]I?)?B)\s*"
    m = re.fullmatch(pattern, size.upper()) if isinstance(size, str) else None
    if not m:
        raise ValueError(
            f"max_shard_size={size!r}: expected an int (bytes) or a string like '5GB', '200MB' or '1GiB'"
        )
    units = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(m.group(1)) * units[m.group(2)])


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on the folder for a whole save: concurrent saves into it take turns, and a staging folder
    seen under the lock belongs to a writer that died (the kernel drops a dead process's lock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: saves are not serialised
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _move_in(path: Path, staging: Path) -> None:
    """Carry out a committed staging folder: move its files in, remove the stale owned files it lists, drop it.
    Idempotent, so a kill midway is finished by running it again."""
    plan = json.loads((staging / _COMMIT).read_text(encoding="utf-8"))
    for name in plan["move"]:
        if _plain(name) and (staging / name).exists():  # else moved before a kill
            os.replace(staging / name, path / name)
    for name in plan["remove"]:
        if _plain(name):
            (path / name).unlink(missing_ok=True)
    _fsync(path)
    shutil.rmtree(staging, ignore_errors=True)


def _finish_staged(path: Path) -> None:
    """Under the folder lock: move in committed staging folders, delete uncommitted ones (dead writers' debris)."""
    for staging in sorted(path.glob(_STAGING + "*")):
        if not staging.is_dir():
            continue
        if (staging / _COMMIT).is_file():
            log.warning("%s: finishing the interrupted save in %s", path, staging.name)
            _move_in(path, staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _restore_swapped(final: Path) -> None:
    """Saves of earlier versions swapped whole folders: a kill between the two renames left no `final`, only the
    complete old folder as `.{name}.old-{pid}`. Rename the newest backup of a dead writer back if `final` is
    missing; delete backups of dead writers once `final` exists."""
    backups = _interrupted_save_backups(final)
    if not backups:
        return
    if not final.exists():
        log.warning("%s: restoring %s left by an interrupted save", final, backups[-1].name)
        os.replace(backups.pop(), final)
    for b in backups:
        shutil.rmtree(b, ignore_errors=True)


def recover_interrupted_save(final: str | Path) -> None:
    """Finish what a killed save left in or next to the folder `final` (every save calls it first; reads never
    do): a committed save is moved in, an uncommitted one discarded (the old files stayed in place), and a
    backup that a folder-swapping save of an earlier version left is renamed back."""
    final = Path(final)
    _restore_swapped(final)
    if final.is_dir():
        with _folder_lock(final):
            _finish_staged(final)


def _is_our_config(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "musicflamingo"


def check_save_target(path: Path, what: str = "checkpoint", again: str | None = None) -> None:
    """What a save into `path` without `overwrite` would refuse, raised before anything is written (`train.py`
    checks its export folder before training); `again` replaces the hint that names `overwrite=True`."""
    _check_target(Path(path), False, what, again)


def _check_target(path: Path, overwrite: bool, what: str, again: str | None = None) -> None:
    """Refuse to save into an existing file, into another model's folder (a config.json that is not ours) or into
    a non-empty folder holding none of our files, unless `overwrite`; an existing file is then removed."""
    again = again or f"pass overwrite=True to write the {what} files there anyway"
    if path.exists() and not path.is_dir():
        if not overwrite:
            raise CheckpointError(f"{path} is a file, not a folder: refusing to replace it ({again})")
        path.unlink()
        return
    if overwrite or not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith(_STAGING))
    config = path / "config.json"
    if config.exists() and not _is_our_config(config):
        raise CheckpointError(
            f"{path}: its config.json is not a Music Flamingo config, so this is another model's folder ({again}; "
            "only those files are replaced)"
        )
    if names and not any(is_model_file(n) or n in PROCESSOR_FILES for n in names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise CheckpointError(
            f"{path} is a folder that does not look like a checkpoint (no config.json, weights or processor "
            f"files; it holds {shown}): refusing to save into it ({again}; nothing else in it is touched)"
        )


def _refuse_lossy_replace(path: Path, method: str | None) -> None:
    """A quantized save (`method`) into a folder that holds another checkpoint's weights, unquantized or quantized
    otherwise, would replace them for good (the quantized weights cannot give them back): CheckpointError."""
    if not method or not (path / "config.json").is_file():
        return
    if not ((path / SAFE_WEIGHTS_NAME).is_file() or (path / SAFE_WEIGHTS_INDEX_NAME).is_file()):
        return
    try:
        old = load_config(path).quantization
    except CheckpointError:  # not ours or unreadable: `_check_target` decides
        return
    if old != method:
        raise CheckpointError(
            f"{path} holds {'unquantized' if old is None else old} weights: saving the {method} model there would "
            f"replace them for good (a quantized model cannot give the original weights back); save it into a "
            f"folder of its own (e.g. {path.name}-{method}), or pass overwrite=True to replace them"
        )


def save_files(
    path: str | Path,
    write: Callable[[Path], None],
    owns: Callable[[str], bool],
    overwrite: bool = False,
    what: str = "checkpoint",
) -> Path:
    """Put the files that `write(folder)` creates into the folder `path`, all or nothing, replacing only files
    that `owns(name)` accepts: those of the new set, and owned files the new set lacks are removed. Nothing
    else in the folder (subfolders, `.git`, a user's files) is touched. Returns `path`.

    The folder itself is never renamed: the files are written and fsync'd in a staging folder inside it
    (`.save-XXXX`, so on the same filesystem), then a `COMMIT` file listing the moves and removals is written
    atomically, then the files are renamed into place. A kill before `COMMIT` leaves the old files untouched
    (the staging folder is discarded by the next save); a kill after it leaves a committed staging folder that
    readers refuse (`refuse_interrupted_save`, naming it) and that the next save, or `recover_interrupted_save`,
    finishes: complete old files or complete new ones, as with a folder swap, without a swap's faults (it would
    rename away everything else the folder holds, and fails on the current folder or a mount point). The folder
    is locked for the whole save (`_folder_lock`).

    Refused unless `overwrite` (`what` names the kind in messages): `path` is an existing file (then replaced
    by the folder), holds another model's config.json, or is a non-empty folder with none of our files.
    """
    path = Path(path)
    _restore_swapped(path)
    _check_target(path, overwrite, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with _folder_lock(path):
            _finish_staged(path)
            staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=path))
            try:
                write(staging)
                new = sorted(p.name for p in staging.iterdir())
                for name in new:  # on disk before the commit can name them
                    _fsync(staging / name)
                stale = sorted(
                    p.name for p in path.iterdir() if owns(p.name) and p.name not in new and not p.is_dir()
                )
                tmp = staging / (_COMMIT + ".tmp")
                tmp.write_text(json.dumps({"move": new, "remove": stale}), encoding="utf-8")
                _fsync(tmp)
                os.replace(tmp, staging / _COMMIT)
                _fsync(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _move_in(path, staging)
    except OSError as e:  # a full or read-only disk
        raise CheckpointError(f"{path}: cannot save the {what} ({e.strerror or e})") from e
    return path


def new_file_mode() -> int:
    """The permissions `open()` gives a new file here (0666 less this process's umask, read by setting it and
    putting it back): for files written by tools that make them owner-only (mkstemp, safetensors)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def replace_file(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into ``.<name>.<random>.tmp`` beside ``path``, then rename it over ``path``: a kill mid-write
    leaves the old file whole, never half of the new one. A failed write (a full disk) removes the temporary file
    and raises an OSError naming ``path`` (the entry points print it as one line)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would hide the results from the rest of the team
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None or e.filename == str(tmp):  # write errors name no file (or the temporary one)
            raise OSError(e.errno, f"cannot write it: {e.strerror or e}", str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A kill at any moment leaves either the previous file or the new one, never a half-written checkpoint. The file
    gets the permissions `torch.save` would give it (read access as the umask allows), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    out = _WriteErrors(os.fdopen(fd, "wb"))
    try:
        with out.file as f:
            os.fchmod(f.fileno(), new_file_mode())
            try:
                torch.save(obj, out)
            except RuntimeError as e:
                # torch's zip writer turns the OSError of a failed write (a full disk) into "unexpected pos ..."
                if out.error is None:
                    raise
                raise out.error from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write (full disk) names no file: name the checkpoint
            raise OSError(e.errno, f"cannot write the checkpoint: {e.strerror or e}", str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _WriteErrors:
    """A binary file for `torch.save` that keeps the OSError of a failed write, which torch swallows."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _save_readable(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`safetensors.save_file`, whose file is owner-only (0600), given the umask's permissions as every other file
    of the folder: a shared export or checkpoint folder should be readable by the team that reads its config."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except (
        SafetensorError
    ) as e:  # a failed write (full disk) is no OSError here: make it one, for `save_files`
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from e
    os.chmod(path, new_file_mode())


def write_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: MusicFlamingoConfig,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    generation: Mapping[str, Any] | None = None,
) -> None:
    """Write config.json, generation_config.json and `state_dict` (our names, renamed to the checkpoint's) as
    safetensors, sharded past `max_shard_size`, into the folder `path` with :func:`save_files` (all or nothing;
    other files in the folder are kept; `overwrite` as there, and it also lets a quantized `config` replace weights
    quantized otherwise or not at all, which is refused without it). `dtype` is the dtype recorded in config.json
    (default: that of the first floating tensor). `generation`: decoding defaults kept in generation_config.json
    (the loaded model's, see :func:`generation_config`; they override the config's eos and pad). Tied weights are the
    caller's to leave out."""
    limit = _parse_size(max_shard_size)
    if not overwrite:
        _refuse_lossy_replace(Path(path), config.quantization)
    unnamed = [name for name in state_dict if not _has_hf_name(name)]
    if unnamed:  # before anything is written
        adapters = [n for n in unnamed if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or ".base." in n]
        why = (
            "the model has LoRA adapters, which the Hugging Face layout has no names for: merge them into the base "
            "weights first (musicflamingo.model.lora.merge_lora(model), on a copy to keep training; a training "
            "run's export/ folder is already merged)"
            if adapters
            else "the checkpoint name table (checkpoint.NAME_TABLE) has no entry for them"
        )
        shown = ", ".join(unnamed[:3]) + (", ..." if len(unnamed) > 3 else "")
        raise CheckpointError(
            f"{path}: cannot save {len(unnamed)} tensor(s) ({shown}): {why}; nothing was written"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        tensors[ours_to_hf(name)] = t.detach().to("cpu").contiguous()
    if dtype is None:
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    def write(tmp: Path) -> None:
        config.to_json(tmp / "config.json", dtype=str(dtype).replace("torch.", ""))
        gen = {"eos_token_id": config.text.eos_token_id, "pad_token_id": config.text.pad_token_id}
        # a loaded model's file settings as they were (a file without do_sample is greedy in the reference too)
        gen.update(generation or {"do_sample": False})
        if config.text.bos_token_id is not None:
            gen["bos_token_id"] = config.text.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            _save_readable(shards[0], tmp / SAFE_WEIGHTS_NAME, meta)
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_readable(shard, tmp / fname, meta)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    save_files(path, write, is_model_file, overwrite, "checkpoint")
