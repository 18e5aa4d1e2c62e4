"""LoRA adapters in `peft`'s folder layout: `adapter_config.json` + `adapter_model.safetensors`.

What `PeftModel.from_pretrained(MusicFlamingoForConditionalGeneration..., folder)` reads and `peft_model.save_pretrained`
writes, for the reference model: tensor names are the reference's module names (transformers >= 5.10 layout, e.g.
`model.language_model.layers.0.self_attn.q_proj`) under `base_model.model.`, with `.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r); whole modules trained beside the adapters (`modules_to_save`, e.g. the projector of
`experiment=lora`) are stored under their plain parameter names. The adapter adds `B A x * lora_alpha / r`
(`/ sqrt(r)` with `use_rslora`), the formula of `LoRALinear`, so the same A and B compute the same model.

`load_peft_adapter(model, folder)` puts a peft folder's adapters on our model (a linear of any part, the audio tower
included, as peft's bare target names reach it too) and copies its saved modules; `save_peft_adapter(model, folder)`
writes ours for peft. The names are renamed by `checkpoint.py`'s table, as a model checkpoint's are.

Example::

    model = MusicFlamingo.from_pretrained(base_folder)
    load_peft_adapter(model, adapter_folder)  # then merge_lora(model) for a plain folder, or generate
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from musicflamingo.checkpoint import CheckpointError, hf_to_ours, ours_to_hf, replace_file
from musicflamingo.model.config import read_json_object
from musicflamingo.model.lora import LoRALinear, QuantizedLinear, QuantizedLoRALinear

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's wrapper around the reference model
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>A|B)\.weight")

# the reference's checkpoint layout (our name table's) -> its module layout (transformers >= 5.10), which peft names
_MODULE_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("audio_tower.", "model.audio_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

# LoraConfig fields that make peft compute something other than `W x + B A x * scale` (or add tensors we do not
# hold): refused when set, rather than loaded as plain LoRA
_VARIANTS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
)


# init_lora_weights values whose init changes the base weight (peft repeats it on load): such folders are refused
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def reference_module_name(ours: str) -> str:
    """Our parameter or module name -> the reference's module-layout name (what peft's keys hold)."""
    hf = ours_to_hf(ours if ours.endswith((".weight", ".bias")) else ours + ".weight")
    for old, new in _MODULE_PREFIXES:
        if hf.startswith(old):
            hf = new + hf[len(old) :]
            break
    return hf if ours.endswith((".weight", ".bias")) else hf.rsplit(".", 1)[0]


# ---------------------------------------------------------------------------------------------- reading
def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG_NAME
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CheckpointError(
            f"peft adapter folder {folder} {what}; expected a folder with {ADAPTER_CONFIG_NAME}"
        )
    if not path.is_file():
        # peft's save_pretrained puts an adapter not named "default" in a subfolder of that name
        inner = sorted(p.parent.name for p in folder.glob(f"*/{ADAPTER_CONFIG_NAME}"))
        hint = (
            " (a model folder: give it as model.net.init_from, or load it with MusicFlamingo.from_pretrained)"
            if (folder / "config.json").exists()
            else f" (its subfolder(s) {', '.join(inner)} hold peft adapters: give one of those)"
            if inner
            else ""
        )
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG_NAME}, so not a peft adapter folder{hint}")
    config = read_json_object(path, CheckpointError)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{path}: peft_type={config['peft_type']!r}; only LoRA adapters (peft_type=LORA) load"
        )
    set_variants = [f"{k}={config[k]!r}" for k in _VARIANTS if config.get(k)]
    # a variant selected through the init (B frozen, its own forward)
    if config.get("init_lora_weights") == "mica":
        set_variants.append("init_lora_weights='mica'")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        # peft runs these inits again when it loads the folder: the base becomes W - B0 A0 * scale, not W
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r}: peft loads such a folder over a base it changes first (W minus the "
            "initial adapters), which this loader does not; resave it with peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) (a plain LoRA folder), or merge_and_unload it and load "
            "the merged model"
        )
    if set_variants:
        raise CheckpointError(
            f"{path}: {', '.join(set_variants)}: a LoRA variant this model does not compute (plain LoRA only: "
            "W x + B A x * lora_alpha / r); merge it in peft (merge_and_unload) and load the merged model instead"
        )
    for field, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise CheckpointError(f"{path}: {field}={value!r}; expected a positive number")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise CheckpointError(f"{path}: {field}={config[field]!r}; expected an object")
    return config


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first pattern whose regex ends the module name on a `.` boundary."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise ValueError(f"pattern {key!r} (rank_pattern / alpha_pattern) is not a regex: {e}") from None
    return default


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """alpha / r of one module (its `rank_pattern` / `alpha_pattern` entries applied; rsLoRA: alpha / sqrt(r));
    a ValueError when the file's rank is not the config's."""
    expected = _pattern(config.get("rank_pattern") or {}, module, config["r"])
    if rank != expected:
        raise ValueError(
            f"{module}.lora_A.weight has rank {rank}, the config says {expected} (r / rank_pattern): the two "
            "files do not belong together"
        )
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise CheckpointError(
                f"{folder}: adapter_model.bin (a pickle) and no {ADAPTER_WEIGHTS_NAME}; resave it with peft "
                "(save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _quantized_base(ours: str) -> str:
    """`<linear>.bias` -> `<linear>.base.bias`: where a `QuantizedLoRALinear` (QLoRA) keeps its base's bias."""
    module, _, leaf = ours.rpartition(".")
    return f"{module}.base.{leaf}"


def _adaptable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, (LoRALinear, QuantizedLinear, QuantizedLoRALinear))


def _with_rank(layer: LoRALinear | QuantizedLoRALinear, rank: int) -> LoRALinear | QuantizedLoRALinear:
    """`layer` made again with adapters of `rank` over the same base (shared), its dropout, adapter dtype and
    requires-grad flags kept; A and B are for the caller to fill."""
    trains = layer.lora_A.requires_grad
    if isinstance(layer, LoRALinear):  # its weight and bias shared, as from a plain linear
        new = LoRALinear.from_linear(layer, rank, layer.scale * rank)
    else:
        new = QuantizedLoRALinear(layer.base, rank, layer.scale * rank, 0.0, layer.lora_A.dtype)
    new.lora_A = nn.Parameter(
        torch.empty(rank, layer.in_features, dtype=layer.lora_A.dtype, device=layer.lora_A.device)
    )
    new.lora_B = nn.Parameter(
        torch.empty(layer.out_features, rank, dtype=layer.lora_B.dtype, device=layer.lora_B.device)
    )
    new.lora_A.requires_grad_(trains)
    new.lora_B.requires_grad_(layer.lora_B.requires_grad)
    new.lora_dropout = layer.lora_dropout
    new.keep_float32 = layer.keep_float32
    new.train(layer.training)
    return new


def _untie_replaced(model: nn.Module, plain: dict[str, torch.Tensor]) -> None:
    """A tied head (`tie_word_embeddings`) made a parameter of its own when the peft folder replaces the embedding or
    the head (modules_to_save): the reference never ties, so peft replaces one of them and the other keeps the
    base's values; copied into the shared tensor, both changed (another model, silently)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "language_model", None), "embed_tokens", None)
    if embed is None or getattr(head, "weight", None) is not embed.weight:
        return
    if {"lm_head.weight", "language_model.embed_tokens.weight"} & set(plain):
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)


def load_peft_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Put the LoRA adapters of a peft folder on `model` (a `MusicFlamingo`), in place; returns the adapted names.

    A plain linear the file adapts becomes a `LoRALinear` (a quantized QLoRA base a `QuantizedLoRALinear`), an
    existing adapter takes the file's A, B and scale (its dropout stays); tensors of whole modules (peft's
    `modules_to_save`, biases of `bias="all"`) replace ours, and are named in `model.peft_whole_tensors` for
    `save_peft_adapter` to write back. A `rank_pattern` entry's rank replaces an existing adapter of another rank
    (model.net.lora's, one for all); the plain `r` must be the existing adapters'. Everything is checked before
    anything changes: a name with no place in the model, a shape that differs, a rank the config contradicts or a
    LoRA variant we do not compute (DoRA, ...) is a CheckpointError naming it. Requires-grad flags of existing
    parameters are untouched.
    """
    folder = Path(folder).expanduser()  # as the settings check reads model.net.lora.init_from_peft
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    where = folder / ADAPTER_WEIGHTS_NAME
    dropout = float(config.get("lora_dropout") or 0.0)

    adapters: dict[str, dict[str, torch.Tensor]] = {}  # our module name -> {"A": ..., "B": ...}
    plain: dict[str, torch.Tensor] = {}  # our parameter name -> tensor
    problems: list[str] = []
    reference_names: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}  # (our name, A / B / "") -> the file's key
    # every name of a shared parameter: a tied head is `lm_head.weight` as well as the embedding
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in tensors.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if m := _LORA_KEY.fullmatch(name):
            ours = hf_to_ours(m["module"] + ".weight")
            if ours is None:
                problems.append(f"{key}: {m['module']} is no linear of Music Flamingo")
                continue
            module = ours.rsplit(".", 1)[0]
            pair = adapters.setdefault(module, {})
            if m["which"] in pair:  # named in both layouts (5.5-5.9's language_model.model.*, >= 5.10's)
                problems.append(
                    f"{key}: lora_{m['which']} of {module} is in the file twice, also as {seen[ours, m['which']]}"
                )
                continue
            pair[m["which"]] = tensor
            seen[ours, m["which"]] = key
            reference_names[module] = m["module"]
        elif "lora_" in name:
            problems.append(
                f"{key}: not a plain LoRA tensor (embedding adapters, lora_B biases, DoRA: not supported)"
            )
        else:
            # bias="all" / "lora_only": an adapted linear's bias is stored as peft names it, under its base_layer
            ours = hf_to_ours(name.replace(".base_layer.", "."))
            if ours is not None and ours not in params and _quantized_base(ours) in params:
                ours = _quantized_base(ours)  # a QLoRA adapter's bias lives in its 4-bit base
            if ours is None:
                problems.append(f"{key}: no parameter of Music Flamingo has this name")
            elif ours in plain:
                problems.append(f"{key}: {ours} is in the file twice, also as {seen[ours, '']}")
            else:
                plain[ours] = tensor
                seen[ours, ""] = key
    for ours, tensor in plain.items():
        if ours not in params:
            problems.append(f"{ours}: not a parameter of this model")
        elif params[ours].shape != tensor.shape:
            problems.append(
                f"{ours}: shape {tuple(tensor.shape)} in the file, {tuple(params[ours].shape)} here"
            )
    scales = {}
    for module, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: lora_{'AB'[('A' in pair)]} is missing")
            continue
        try:
            target = model.get_submodule(module)
        except AttributeError:
            problems.append(f"{module}: not in this model")
            continue
        if not _adaptable(target):
            problems.append(
                f"{module}: a {type(target).__name__}, which takes no adapter (an inference-quantized model? load the "
                "adapters into the unquantized model, merge_lora, then quantize)"
            )
            continue
        a, b = pair["A"], pair["B"]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
            problems.append(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} in the file; this layer needs "
                f"(r, {target.in_features}) and ({target.out_features}, r)"
            )
            continue
        try:
            scales[module] = _scale(config, reference_names[module], rank)
        except ValueError as e:
            problems.append(str(e))
            continue
        # an adapter already here (model.net.lora's, one rank for all) takes a rank_pattern entry's own rank: it is
        # made again at that rank; a file whose plain `r` is not ours stays refused (the settings contradict it)
        pattern_rank = _pattern(config.get("rank_pattern") or {}, reference_names[module], None)
        if (
            isinstance(target, (LoRALinear, QuantizedLoRALinear))
            and target.rank != rank
            and pattern_rank is None
        ):
            problems.append(
                f"{module}: rank {rank} in the file, {target.rank} in this model's adapter (the file's r is "
                f"{config['r']}, no rank_pattern entry: set model.net.lora.rank={rank})"
            )
    if problems:
        raise CheckpointError(
            f"{where}: {len(problems)} tensor(s) do not fit this model, nothing was loaded:\n  "
            + "\n  ".join(problems)
        )
    if not adapters:
        raise CheckpointError(f"{where}: no LoRA tensors (*.lora_A.weight / *.lora_B.weight)")

    _untie_replaced(model, plain)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for ours, tensor in plain.items():
            params[ours].copy_(tensor)
    with torch.no_grad():
        for module, pair in adapters.items():
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name)
            target = getattr(parent, child)
            rank, scale = pair["A"].shape[0], scales[module]
            if isinstance(target, (LoRALinear, QuantizedLoRALinear)) and target.rank != rank:
                target = _with_rank(target, rank)
            elif type(target) is nn.Linear:
                target = LoRALinear.from_linear(target, rank, scale * rank, dropout)
            elif isinstance(target, QuantizedLinear):
                target = QuantizedLoRALinear(target, rank, scale * rank, dropout, pair["A"].dtype)
            target.lora_A.copy_(pair["A"])
            target.lora_B.copy_(pair["B"])
            target.scale = scale
            setattr(parent, child, target)
    # what the base no longer holds: save_peft_adapter writes these back, or the adapters alone would compute
    # another model over the base (a peft folder's lm_head in modules_to_save, its biases of bias="all"). Named as
    # they are now: a quantized linear the file adapts keeps its bias in the new adapter's base (`.base.bias`)
    names = {id(p): n for n, p in model.named_parameters()}
    loaded = {names.get(id(params[ours]), ours) for ours in plain}
    model.peft_whole_tensors = sorted(set(getattr(model, "peft_whole_tensors", ())) | loaded)
    return sorted(adapters)


# ---------------------------------------------------------------------------------------------- writing
def _targets_regex(modules: Sequence[str]) -> str:
    """A regex peft full-matches against its module names: exactly `modules`, layers of one template grouped."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in modules:
        m = re.fullmatch(r"(.*\.layers\.)(\d+)(\..*)", name)
        pre, layer, post = (m[1], m[2], m[3]) if m else (name, "", "")
        groups.setdefault((pre, post), []).append(layer)
    # templates adapted on the same layers share one layer group: (?:0|1|2)\.(?:self_attn\.q_proj|mlp\.up_proj)
    shared: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (pre, post), layers in sorted(groups.items()):
        shared.setdefault((pre, tuple(sorted(set(layers), key=lambda x: int(x or 0)))), []).append(post)
    parts = []
    for (pre, layers), posts in shared.items():
        if layers == ("",):
            parts.append(re.escape(pre))
        else:
            parts.append(f"{re.escape(pre)}(?:{'|'.join(layers)})(?:{'|'.join(re.escape(p) for p in posts)})")
    return "(?:" + "|".join(parts) + ")"


def _number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)) else x


def _trained_parts(model: nn.Module) -> list[str]:
    parts = []
    for part, module in model.named_children():
        trained = [
            n
            for n, p in module.named_parameters()
            if p.requires_grad and not n.endswith(("lora_A", "lora_B"))
        ]
        if not trained:
            continue
        if any(isinstance(m, (LoRALinear, QuantizedLoRALinear)) for m in module.modules()):
            raise CheckpointError(
                f"{part}.{trained[0]} (and {len(trained) - 1} more) of {part}, which holds adapters, requires grad: "
                f"peft's layout stores adapters and whole modules beside them (modules_to_save), never both in one "
                f"part. Freeze it ({part}.requires_grad_(False), adapters stay trainable), pass modules_to_save=[...] "
                "naming the parts to store, or merge_lora and save_pretrained a whole model"
            )
        parts.append(part)
    return parts


def _loaded_whole(
    model: nn.Module, parts: Sequence[str], adapted: set[str]
) -> tuple[list[str], dict[str, str], str]:
    """The tensors a peft folder put on `model` whole (`load_peft_adapter`'s `peft_whole_tensors`) outside `parts`:
    (modules to store whole, as peft's modules_to_save; {peft's name: our name} of biases; peft's `bias` field:
    "lora_only" when they all belong to adapted linears, "all" when any other does, else "none")."""
    loaded = [n for n in getattr(model, "peft_whole_tensors", ()) if n.split(".", 1)[0] not in parts]
    modules = sorted({n.rsplit(".", 1)[0] for n in loaded if not n.endswith(".bias")})
    wrapped = [m for m in modules if m in adapted]
    if wrapped:
        raise CheckpointError(
            f"{wrapped[0]} holds an adapter and its base weight came whole from a peft folder: peft's layout cannot "
            "store both; merge_lora and save_pretrained a whole model instead"
        )
    biases = {}
    for n in loaded:
        module = n.rsplit(".", 1)[0]
        if module.endswith(".base") and module.removesuffix(".base") in adapted:
            module = module.removesuffix(".base")  # a QLoRA adapter's base (`_quantized_base`)
        if n.endswith(".bias") and module not in modules:
            # peft names an adapted linear's bias under its base_layer
            biases[
                reference_module_name(module) + ".base_layer.bias"
                if module in adapted
                else reference_module_name(n)
            ] = n
    mode = "none" if not biases else "lora_only" if all(".base_layer." in b for b in biases) else "all"
    return modules, biases, mode


def save_peft_adapter(
    model: nn.Module,
    folder: str | Path,
    *,
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`'s LoRA adapters (a `MusicFlamingo` with `LoRALinear` / `QuantizedLoRALinear` layers) as a peft
    adapter folder that `PeftModel.from_pretrained(reference_model, folder)` loads and computes the same logits with.

    `modules_to_save`: top-level parts stored whole beside the adapters (peft's field of that name); default, every
    part with a trainable non-adapter parameter (`experiment=lora` trains the projector: without it, the adapters
    alone compute another model), and whatever a peft folder put on the model whole (`load_peft_adapter`: its
    modules_to_save, biases of bias="all" / "lora_only", which training left as they came). Each layer's rank and
    alpha / rank are kept (`rank_pattern` / `alpha_pattern` where they differ); `target_modules` is a regex of
    exactly the adapted modules (peft's bare `q_proj` would also adapt the audio tower's). Only the two adapter
    files are written; existing ones need `overwrite=True`.
    """
    folder = Path(folder)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, QuantizedLoRALinear))]
    if not layers:
        raise CheckpointError(
            f"{type(model).__name__} has no LoRA adapters to save as a peft adapter in {folder}"
        )
    parts = _trained_parts(model) if modules_to_save is None else list(modules_to_save)
    children = dict(model.named_children())
    unknown = [p for p in parts if p not in children]
    if unknown:
        raise CheckpointError(
            f"modules_to_save={parts}: {unknown} not among the model's parts {list(children)}"
        )
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; expected a folder for {ADAPTER_CONFIG_NAME}")
    existing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if (folder / n).exists()]
    if existing and not overwrite:
        raise CheckpointError(
            f"{folder} already holds {', '.join(existing)}; pass overwrite=True to replace them"
        )

    tensors: dict[str, torch.Tensor] = {}
    extra_modules, biases, bias_mode = _loaded_whole(model, parts, {n for n, _ in layers})
    for module in extra_modules:
        for n, p in model.get_submodule(module).named_parameters():
            tensors[_PREFIX + reference_module_name(f"{module}.{n}")] = (
                p.detach().to("cpu", copy=True).contiguous()
            )
    for name in biases:
        tensors[_PREFIX + name] = model.get_parameter(biases[name]).detach().to("cpu", copy=True).contiguous()
    names, ranks, alphas, dropouts = [], {}, {}, set()
    for ours, layer in layers:
        name = reference_module_name(ours)
        names.append(name)
        ranks[name], alphas[name] = layer.rank, _number(layer.scale * layer.rank)
        dropouts.add(layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0)
        for which in ("A", "B"):
            t = getattr(layer, f"lora_{which}").detach()
            tensors[f"{_PREFIX}{name}.lora_{which}.weight"] = t.to("cpu", copy=True).contiguous()
    for part in parts:
        for n, p in children[part].named_parameters():
            tensors[_PREFIX + reference_module_name(f"{part}.{n}")] = (
                p.detach().to("cpu", copy=True).contiguous()
            )
    (r, alpha), _ = Counter((ranks[n], alphas[n]) for n in names).most_common(1)[0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "use_rslora": False,
        "target_modules": _targets_regex(names),
        "rank_pattern": {re.escape(n): ranks[n] for n in names if ranks[n] != r},
        "alpha_pattern": {re.escape(n): alphas[n] for n in names if alphas[n] != alpha},
        "modules_to_save": [*parts, *(reference_module_name(m) for m in extra_modules)] or None,
        "bias": bias_mode,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    # the old config goes first and the new one comes last: a kill in between leaves weights without a config,
    # which both loaders refuse, never a config beside weights it does not describe
    (folder / ADAPTER_CONFIG_NAME).unlink(missing_ok=True)
    replace_file(
        folder / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    replace_file(
        folder / ADAPTER_CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n")
    )
    return folder
