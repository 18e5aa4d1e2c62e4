"""Build a `MusicFlamingo` ready to train: the weights (seeded from-scratch init of a preset, or a pretrained
folder), then what trains (frozen parts, LoRA adapters) and the runtime switches (RoTE quirk, gradient
checkpointing, compiled layers).

Hydra's `model.net` names `build_model`, so the LightningModule receives a finished model and only makes optimizer
groups of the parameters that still require grad. Freezing and LoRA live here, with the model, because together
they decide the model's modules (checkpoint keys) and its trainable set, in an order that matters: the chosen
parts are frozen first, then adapters (new, trainable parameters) go on the language model, whose base weights
LoRA freezes; the layers are compiled last, with their adapters inside.

Example:
    model = build_model(preset="tiny", overrides={}, init_from=None, seed=0, rote_quirk=True,
                        gradient_checkpointing=False, compile=False,
                        freeze={"audio_tower": True, "multi_modal_projector": False, "language_model": False},
                        lora={"enabled": False, "rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj"]},
                        quantize_base=None)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musicflamingo.checkpoint import load_config
from musicflamingo.model.config import MusicFlamingoConfig
from musicflamingo.model.lora import (
    QuantizedLinear,
    apply_lora,
    check_quantize_base,
    nf4_linear_class,
    upcast_unquantized,
)
from musicflamingo.model.musicflamingo import MusicFlamingo

log = logging.getLogger(__name__)

# The model's three parts (top-level module names); `lm_head` belongs to the language model.
PARTS = ("audio_tower", "multi_modal_projector", "language_model")
LORA_KEYS = ("enabled", "rank", "alpha", "dropout", "targets", "init_from_peft")


def init_weights(model: MusicFlamingo, std: float = 0.02) -> None:
    """From-scratch init: normal(0, std) linears/embeddings, variance-preserving (He) convolutions, zero biases,
    unit LayerNorms, sinusoidal audio positions.

    RMSNorm weights start at one in their constructor and are left alone.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            if isinstance(module, nn.Conv1d):
                # With normal(0, 0.02) the two GELU convs shrink log-mel (std ~0.5) to ~0.03 while the sinusoidal
                # positions added after them have std ~0.6: the clip's content was ~2 % of the encoder output's
                # variation across clips (measured on the synthetic corpus; ~25 % with He init) and the decoder
                # learnt to ignore the audio.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if (
                module.padding_idx is not None
            ):  # as nn.Embedding and the reference's init: the pad row starts at 0
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    pos = model.audio_tower.embed_positions.weight  # Whisper's sinusoids, as the original encoder starts from
    n, d = pos.shape
    inv = torch.exp(-math.log(10000.0) * torch.arange(d // 2, dtype=torch.float32) / max(d // 2 - 1, 1))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    with torch.no_grad():
        pos.copy_(torch.cat([angles.sin(), angles.cos()], dim=1).to(pos.dtype))


def create_model(
    preset: str | None,
    overrides: Mapping[str, Any] | None = None,
    init_from: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float32,
) -> MusicFlamingo:
    """The weights only: a pretrained folder (`init_from`, in `dtype`; None is config.json's `dtype`, else the
    checkpoint's own, as transformers loads it: mapped from the file rather than copied where the two agree) or a
    preset with `overrides` (`audio={...}`, `text={...}`, top-level fields), initialised by `init_weights` under
    `seed` (the global RNG is left as it was)."""
    if init_from:
        check_trainable(load_config(init_from), init_from)
        model = MusicFlamingo.from_pretrained(init_from, dtype=dtype)
        ignored = _differing(model.config, dict(overrides or {}))
        if ignored:  # the checkpoint's shapes win; say so rather than train another architecture than asked
            log.warning(
                "model.net.overrides %s ignored: init_from=%s has its own config (%s)",
                ", ".join(ignored),
                init_from,
                ", ".join(f"{k}={v!r}" for k, v in ignored.items()),
            )
        return model
    if not preset:
        raise ValueError(
            "model.net: set either `init_from` (a checkpoint folder) or `preset` (tiny, small, ...)"
        )
    config = MusicFlamingoConfig.from_name(preset, **dict(overrides or {}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MusicFlamingo(config)
        init_weights(model)
    return model


def check_trainable(config: MusicFlamingoConfig, init_from: str | Path) -> None:
    """Refuse a quantized checkpoint as a training start: its int8/int4 linears have no backward and their float
    weights are gone (ValueError naming the folder and what to use instead)."""
    if config.quantization:
        raise ValueError(
            f"model.net.init_from={init_from} is a {config.quantization}-quantized checkpoint (inference only: its "
            "linears have no backward and its float weights are gone); fine-tune from the unquantized folder it was "
            "made from and quantize the export afterwards"
        )


def _differing(config: Any, overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{dotted name: the config's value}`` of every override whose value ``config`` does not hold."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        have = getattr(config, key, None)
        if isinstance(value, Mapping) and have is not None and not isinstance(have, Mapping):
            out.update(_differing(have, value, f"{prefix}{key}."))
        elif have != value:
            out[f"{prefix}{key}"] = have
    return out


def freeze_parts(model: MusicFlamingo, freeze: Mapping[str, bool]) -> None:
    """`requires_grad_(False)` on every part whose flag is true; `freeze` names each of `PARTS` once."""
    _check_keys("model.net.freeze", freeze, PARTS)
    for part in PARTS:
        if freeze[part]:
            getattr(model, part).requires_grad_(False)
            if part == "language_model":  # the output head belongs to the language model
                model.lm_head.requires_grad_(False)


def add_lora(
    model: MusicFlamingo, lora: Mapping[str, Any], quantized: type[QuantizedLinear] | None = None
) -> list[str]:
    """Adapters on the language model's linears named in `lora["targets"]`, its base weights (and the head)
    frozen; nothing when `lora["enabled"]` is false. Returns the adapted linears' names.

    `quantized` (QLoRA): every decoder linear becomes that class (frozen, e.g. 4-bit NF4), the targets adapted on
    top; embeddings, norms and the head stay as they are, and so do the audio tower and the projector."""
    _check_keys("model.net.lora", lora, LORA_KEYS, optional=("init_from_peft",))
    peft_folder = lora.get("init_from_peft")
    if not lora["enabled"]:
        if quantized is not None:
            raise ValueError(
                "model.net.quantize_base needs model.net.lora.enabled=true (the adapters are what trains)"
            )
        if peft_folder:
            raise ValueError(
                f"model.net.lora.init_from_peft={peft_folder!r} needs model.net.lora.enabled=true (or merge the "
                "adapters into a checkpoint folder and pass it as model.net.init_from)"
            )
        return []
    model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    names = apply_lora(
        model.language_model,
        rank=int(lora["rank"]),
        alpha=float(lora["alpha"]),
        dropout=float(lora["dropout"]),
        targets=tuple(lora["targets"]),
        quantized=quantized,
    )
    if peft_folder:  # a peft adapter folder's A, B and scales over the fresh ones (and any linears it adds)
        from musicflamingo.model.peft_format import load_peft_adapter

        log.info(
            "LoRA adapters of %d linears from %s", len(load_peft_adapter(model, peft_folder)), peft_folder
        )
    log.info("%s on %d linears of the language model", "QLoRA" if quantized else "LoRA", len(names))
    return names


def build_model(
    *,
    preset: str | None,
    overrides: Mapping[str, Any],
    init_from: str | Path | None,
    seed: int,
    rote_quirk: bool,
    gradient_checkpointing: bool,
    compile: bool,
    freeze: Mapping[str, bool],
    lora: Mapping[str, Any],
    quantize_base: str | None = None,
) -> MusicFlamingo:
    """The model `configs/model/*.yaml` describe under `net` (every argument comes from the YAML; only
    `quantize_base`, added later, defaults to null for direct callers).

    Args:
        preset, overrides, init_from, seed: the weights (`create_model`).
        rote_quirk: reproduce the reference's zero-length-last-window time attribution (see rote.py).
        gradient_checkpointing: recompute each encoder/decoder layer in backward.
        compile: `torch.compile` every encoder and decoder layer (traced at the first steps).
        freeze: `{audio_tower, multi_modal_projector, language_model}` -> bool; true freezes that part.
        lora: `{enabled, rank, alpha, dropout, targets[, init_from_peft]}`: adapters on the language model (base
            weights frozen); `init_from_peft`, a peft adapter folder whose adapters they start from (its `r` must
            be `rank`; layers its `rank_pattern` / `alpha_pattern` name keep their own rank and alpha).
        quantize_base: null, or `nf4`: the frozen decoder linears in 4 bits under the adapters (QLoRA; bitsandbytes
            on a CUDA GPU, refused elsewhere before any weight is built).

    Raises:
        ValueError: unknown preset or config field, a missing/unknown `freeze` or `lora` key, every parameter
            frozen, or `quantize_base` where CUDA or bitsandbytes is missing.
    """
    check_quantize_base(quantize_base)
    if quantize_base is not None and not lora.get("enabled"):
        raise ValueError(
            f"model.net.quantize_base={quantize_base} needs model.net.lora.enabled=true (the adapters are what trains)"
        )
    # QLoRA quantizes the decoder linears from the checkpoint's own (bf16) tensors, mapped from the file: a float32
    # copy of the release first would take 33 GB of host RAM for weights that end up in 4 bits. What is not
    # quantized goes to float32 after the adapters are on (`upcast_unquantized`), as a float32 load leaves it.
    model = create_model(preset, overrides, init_from, seed, dtype=None if quantize_base else torch.float32)
    model.rote_quirk = bool(rote_quirk)
    if gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    freeze_parts(model, freeze)
    # after freezing: the new adapters stay trainable
    add_lora(model, lora, nf4_linear_class() if quantize_base == "nf4" else None)
    if quantize_base:
        upcast_unquantized(model)
    if compile:
        model.compile_layers()
    model.audio_tower.embed_positions.requires_grad_(False)  # frozen, as in the reference
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is frozen: check model.net.freeze and model.net.lora in the config")
    # A pretrained folder loads in eval mode (inference's default) and Lightning keeps a module's mode at fit start
    # (warning "Found N module(s) in eval mode"): the model to train starts in train mode, dropout included.
    return model.train()


def _check_keys(
    where: str, values: Mapping[str, Any], expected: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    unknown = sorted(set(values) - set(expected))
    missing = [k for k in expected if k not in values and k not in optional]
    if unknown or missing:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}, missing key(s) {missing}; expected exactly {list(expected)}"
        )
