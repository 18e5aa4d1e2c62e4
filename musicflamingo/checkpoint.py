"""Hugging Face layout checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Pure checkpoint I/O and a name-table rename of state dicts; the model class is never imported here (it builds
itself: `MusicFlamingo.from_pretrained` / `save_pretrained`). One literal `{checkpoint_name: our_name}` table
(`NAME_TABLE`, `{}` = layer index) maps the on-disk names that the reference writes (transformers >= 5.5:
`language_model.model.*`, `language_model.lm_head.weight`, `audio_tower.*`, `multi_modal_projector.*`) to our
module names. Unknown keys raise, ignored keys are listed in `IGNORED_KEYS`, reading is strict (every bad name or
shape is reported before a byte of tensor data is read), and `write_state_dict` writes the same layout back.

`read_state_dict` reads each tensor with plain reads (no mmap, so page cache is not charged to the process) and
converts it to the target dtype/device one tensor at a time, so a caller that assigns them into a model built on
the meta device never holds two copies. Only safetensors are read; pickle formats are refused. Reading never
changes the filesystem: an interrupted save is repaired by the next write or by `recover_interrupted_save`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from musicflamingo.model.config import ConfigError, MusicFlamingoConfig
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


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or does not match the model."""


def _template(name: str) -> tuple[str, list[str]]:
    return _LAYER.sub(".{}.", name), _LAYER.findall(name)


def hf_to_ours(name: str) -> str | None:
    """Map a checkpoint name to ours; None if it is not in the table."""
    for alt, canonical in _ALT_PREFIXES:
        if name.startswith(alt):
            name = canonical + name[len(alt) :]
            break
    tmpl, idx = _template(name)
    ours = _TO_OURS.get(tmpl)
    return ours.format(*idx) if ours is not None else None


def ours_to_hf(name: str) -> str:
    tmpl, idx = _template(name)
    if tmpl not in _TO_HF:
        raise KeyError(f"parameter {name!r} has no entry in the checkpoint name table")
    return _TO_HF[tmpl].format(*idx)


# ---------------------------------------------------------------------------------------------- reading
def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return `(header, data_offset)`; validates that every tensor lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (length {n}, file {size} B)"
                )
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dt = _DTYPES[info["dtype"]]
            numel = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
        if end - begin != numel * torch.empty((), dtype=dt).element_size():
            raise CheckpointError(
                f"{path}: tensor {key!r} byte range does not match its shape {info['shape']}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {key!r} needs bytes up to {data_start + end}, "
                f"file has {size}"
            )
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


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map each checkpoint tensor name to its file (single file or sharded index)."""
    index = path / SAFE_WEIGHTS_INDEX_NAME
    single = path / SAFE_WEIGHTS_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        files = {k: path / v for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} listed in the index is missing")
        return files
    if single.is_file():
        header, _ = read_safetensors_header(single)
        return {k: single for k in header}
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {pickles}: pickle formats are refused, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _interrupted_save_backups(final: Path, dead_only: bool = True) -> list[Path]:
    """`.{name}.old-{pid}` folders that :func:`atomic_replace_dir` left next to `final`, oldest first. With
    `dead_only`, only those of writers no longer running (or of this process)."""
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


def load_config(path: str | Path) -> MusicFlamingoConfig:
    """The config.json of the checkpoint folder `path` (CheckpointError naming the file and the problem)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist{_missing_folder_hint(path)}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json, so this is not a Music Flamingo checkpoint folder")
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
        )
    load_config(path)  # a config.json of another model, or with bad values
    if need_tokenizer and not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise CheckpointError(
            f"ckpt={path} has no tokenizer.json or tokenizer.model, so it cannot be used to chat"
        )
    return path


def stop_token_ids(path: str | Path | None, config: MusicFlamingoConfig) -> list[int]:
    """The ids that end an answer: `eos_token_id` of the folder's `generation_config.json` (int or list) plus the
    config's eos. Every generating entry point (infer, eval) stops on these."""
    ids: list[int] = []
    gen_file = Path(path) / "generation_config.json" if path is not None else None
    if gen_file is not None and gen_file.is_file():
        try:
            eos = json.loads(gen_file.read_text(encoding="utf-8")).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen_file}: invalid JSON ({e})") from None
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if config.text.eos_token_id is not None:
        ids.append(config.text.eos_token_id)
    return sorted(set(int(i) for i in ids))


def read_state_dict(
    path: str | Path,
    expected: Mapping[str, Sequence[int]],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint folder `path`, renamed to our names, on `device` in `dtype`.

    `expected` is `{our_name: shape}` (a model's `state_dict()` on the meta device gives it). Every name and shape
    is checked before any tensor data is read; missing, unexpected and wrong-shaped keys are all reported in one
    CheckpointError. dtype None/"auto" keeps the checkpoint's dtypes; only floating tensors are converted.
    """
    path = Path(path)
    target = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    files = checkpoint_files(path)
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    for f in set(files.values()):
        headers[f] = read_safetensors_header(f)
    mapping: dict[str, str] = {}
    unexpected, wrong_shape = [], []
    for name, f in files.items():
        if name in IGNORED_KEYS:
            continue
        ours = hf_to_ours(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        info = headers[f][0].get(name)
        if info is None:
            raise CheckpointError(f"{f}: tensor {name!r} listed in the index is not in the file")
        if list(info["shape"]) != list(expected[ours]):
            wrong_shape.append(f"{name}: checkpoint {list(info['shape'])} vs model {list(expected[ours])}")
        mapping[ours] = name
    missing = sorted(ours_to_hf(k) for k in expected if k not in mapping)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:20]}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {wrong_shape[:20]}")
        raise CheckpointError(f"{path}: checkpoint does not match the config: " + "; ".join(parts))

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for ours, name in mapping.items():
        by_file.setdefault(files[name], []).append(ours)
    for f, names in by_file.items():
        header, start = headers[f]
        with open(f, "rb") as fh:
            for ours in names:
                t = _read_tensor(fh, header[mapping[ours]], start)
                want = target if (target is not None and t.is_floating_point()) else t.dtype
                state[ours] = t.to(device=device, dtype=want)  # no copy when dtype/device already match
                del t
    return state


# ---------------------------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(
            f"max_shard_size={size!r}: expected an int (bytes) or a string like '5GB' or '200MB'"
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
    }
    return int(float(m.group(1)) * units[m.group(2)])


def recover_interrupted_save(final: str | Path) -> None:
    """Finish what a killed :func:`atomic_replace_dir` left behind (called by every write, never by a read).

    Directories cannot be swapped atomically: a kill between its two renames leaves no `final`, only the complete
    old folder as `.{name}.old-{pid}` (and the complete new one as a temp folder). If `final` is missing, the newest
    backup of a dead writer is renamed back; backups of dead writers are deleted once `final` exists.
    """
    final = Path(final)
    backups = _interrupted_save_backups(final)
    if not backups:
        return
    if not final.exists():
        log.warning("%s: restoring %s left by an interrupted save", final, backups[-1].name)
        os.replace(backups.pop(), final)
    for b in backups:
        shutil.rmtree(b, ignore_errors=True)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written `tmp` folder into place. A kill at any point leaves a complete old or new folder:
    at `final`, or (killed between the two renames) as a backup that :func:`recover_interrupted_save` restores."""
    recover_interrupted_save(final)
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    os.replace(tmp, final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: MusicFlamingoConfig,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json, generation_config.json and `state_dict` (our names, renamed to the checkpoint's) as
    safetensors, sharded past `max_shard_size`, atomically. `dtype` is the dtype recorded in config.json
    (default: that of the first floating tensor). Tied weights are the caller's to leave out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(path)  # so that the tokenizer files of an interrupted save are carried over
    limit = _parse_size(max_shard_size)
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

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config.to_json(tmp / "config.json", dtype=str(dtype).replace("torch.", ""))
        gen = {
            "eos_token_id": config.text.eos_token_id,
            "pad_token_id": config.text.pad_token_id,
            "do_sample": False,
        }
        if config.text.bos_token_id is not None:
            gen["bos_token_id"] = config.text.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_WEIGHTS_NAME), metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        # Keep files that belong to the folder but not to the weights (tokenizer, processor) when overwriting.
        if path.is_dir():
            for p in path.iterdir():
                weights = p.name.endswith(".safetensors") or p.name in (
                    SAFE_WEIGHTS_INDEX_NAME,
                    "config.json",
                    "generation_config.json",
                )
                if p.is_file() and not weights and not (tmp / p.name).exists():
                    shutil.copy2(p, tmp / p.name)
        for p in tmp.iterdir():  # flush before the rename makes it visible
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
