"""Distribution helpers kept out of the model code: the FSDP strategy for Music Flamingo blocks.

`fsdp_strategy` (configs/trainer/fsdp.yaml) is Lightning's `FSDPStrategy` with one unit per transformer block and
two things Lightning's own lacks: `trainer.gradient_clip_val` clips by the norm of the whole sharded model (FSDP's
`clip_grad_norm_`; Lightning's FSDP refuses norm clipping at the first step), and `trainer.accelerator=cpu` runs
with gloo (torch's FSDP takes the CPU when told so; Lightning refuses it), so FSDP runs can be tested on a laptop.
`use_orig_params` stays on (Lightning's default): frozen parts and LoRA adapters share units with trained weights.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

from musicflamingo.model.encoder import EncoderLayer
from musicflamingo.model.qwen2 import DecoderLayer

BLOCKS = {EncoderLayer, DecoderLayer}


class _FSDPNormClipPrecision(FSDPPrecision):
    """`FSDPPrecision` whose norm clipping is the root FSDP module's `clip_grad_norm_` (the norm over every rank's
    shard; torch's `clip_grad_norm_` on one rank's shards would clip by a partial norm)."""

    def __init__(self, *args: Any, strategy: FSDPStrategy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._strategy = strategy

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float | int) -> None:
        root = self._strategy.model
        if root is None or not callable(getattr(root, "clip_grad_norm_", None)):
            super().clip_grad_by_norm(optimizer, clip_val)  # Lightning's refusal: no FSDP root to clip with
            return
        root.clip_grad_norm_(clip_val)


class MusicFlamingoFSDP(FSDPStrategy):
    """Lightning's `FSDPStrategy` with norm clipping and CPU (gloo) support; see the module docstring."""

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)  # type: ignore[attr-defined]

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:
            plugin = _FSDPNormClipPrecision(plugin.precision, scaler=plugin.scaler, strategy=self)
        FSDPStrategy.precision_plugin.fset(self, plugin)  # type: ignore[attr-defined]

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning passes `device_id=root_device.index`, None on the CPU, and torch's FSDP then looks for an
        # accelerator ("FSDP needs a non-CPU accelerator device"); the CPU itself is what it needs to be told
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def fsdp_strategy(activation_checkpointing: bool = True, **kwargs: Any) -> MusicFlamingoFSDP:
    """`MusicFlamingoFSDP` with one unit per transformer block (encoder and decoder) and optional block
    checkpointing; `kwargs` go to Lightning's `FSDPStrategy` (`sharding_strategy`, `state_dict_type`, ...)."""
    if activation_checkpointing:
        kwargs.setdefault("activation_checkpointing_policy", BLOCKS)
    return MusicFlamingoFSDP(auto_wrap_policy=BLOCKS, **kwargs)
