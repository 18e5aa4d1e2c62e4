"""Distribution helpers kept out of the model code: the FSDP strategy for Music Flamingo blocks.

`fsdp_strategy` (configs/trainer/fsdp.yaml) is Lightning's `FSDPStrategy` with one unit per transformer block and
two things Lightning's own lacks: `trainer.gradient_clip_val` clips by the norm of the whole sharded model (FSDP's
`clip_grad_norm_`; Lightning's FSDP refuses norm clipping at the first step), and `trainer.accelerator=cpu` runs
with gloo (torch's FSDP takes the CPU when told so; Lightning refuses it), so FSDP runs can be tested on a laptop.
`use_orig_params` stays on (Lightning's default): frozen parts and trained weights share units.

LoRA adapters stay float32 over a bf16-true/16-true base, as on one device (`lora.FloatAdapters`, peft's
`autocast_adapter_dtype`), where AdamW's small updates to bf16 adapters would round away. FSDP1 flattens a unit's
parameters into one tensor of one dtype, so these adapters are left out of the flat parameters (`ignored_states`):
replicated on every rank (rank 0's, broadcast when wrapped), their gradients averaged over the ranks before the step
hooks, clipping and the optimizer see them. Each device holds them, their gradients and AdamW moments whole
(16 bytes per adapter weight); every other weight stays sharded per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

from musicflamingo.model.encoder import EncoderLayer
from musicflamingo.model.lora import adapter_layers
from musicflamingo.model.qwen2 import DecoderLayer

BLOCKS = {EncoderLayer, DecoderLayer}
HALF_TRUE = ("bf16-true", "16-true")  # precisions whose base is half and whose adapters stay float32
_BUCKET = 1 << 24  # elements in one all-reduce of adapter gradients (64 MiB of float32)


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

    def _after_closure(self, model: Any, optimizer: Any) -> None:
        # the replicated float32 adapters' gradients are each rank's own until averaged here, before
        # on_before_optimizer_step (the step's gradient scaling and norm), clipping and the optimizer
        self._strategy.average_replicated_grads()
        super()._after_closure(model, optimizer)


class MusicFlamingoFSDP(FSDPStrategy):
    """Lightning's `FSDPStrategy` with norm clipping, CPU (gloo) support and float32 LoRA adapters over a half-precision
    base; see the module docstring."""

    # the float32 adapters left out of FSDP's flat parameters in the model wrapped last, replicated on every rank
    replicated: tuple[torch.nn.Parameter, ...] = ()

    def setup(self, trainer: Any) -> None:
        # before the precision plugin's cast: under a half-precision "true" run the adapters stay float32 here as on
        # one device (MusicFlamingoLit.setup lets them follow the cast under FSDP, from before they were kept out of
        # the flat parameters)
        if str(self.precision_plugin.precision) in HALF_TRUE and self.model is not None:
            for layer in adapter_layers(self.model):
                layer.keep_float32 = True
        super().setup(trainer)

    @contextmanager
    def _float_adapters_ignored(self, model: torch.nn.Module) -> Iterator[None]:
        """While `model` is wrapped, `ignored_states` holds its float32 adapters over a half-precision base (FSDP
        refuses a unit of mixed dtypes), moved to this rank's device and made rank 0's (their inits may differ)."""
        half = str(self.precision_plugin.precision) in HALF_TRUE
        adapters = tuple(
            p
            for layer in adapter_layers(model)
            for p in (layer.lora_A, layer.lora_B)
            if half and p.dtype == torch.float32
        )
        self.replicated = adapters
        if not adapters:
            yield
            return
        for key in ("ignored_states", "ignored_modules"):
            if key in self.kwargs:
                raise ValueError(
                    f"trainer.strategy.{key} with LoRA under trainer.precision={self.precision_plugin.precision}: "
                    "the float32 adapters are FSDP's ignored states there; leave it unset"
                )
        with torch.no_grad():
            for p in adapters:  # FSDP moves only the states it manages to its device
                p.data = p.data.to(self.root_device)
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(p.data, src=0)
        saved = self.kwargs
        self.kwargs = {**saved, "ignored_states": list(adapters)}
        try:
            yield
        finally:
            self.kwargs = saved

    def average_replicated_grads(self) -> None:
        """Average the replicated adapters' gradients over the ranks (as FSDP averages its own), in buckets. A
        gradient no rank has stays None; one some rank lacks counts as zeros there."""
        params = self.replicated
        if not params or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        present = torch.tensor(
            [float(p.grad is not None) for p in params], device=params[0].device, dtype=torch.float32
        )
        dist.all_reduce(present)
        live = [p for p, n in zip(params, present.tolist(), strict=True) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        world, start = dist.get_world_size(), 0
        while start < len(live):
            bucket, size = [], 0
            while start < len(live) and (not bucket or size + live[start].numel() <= _BUCKET):
                bucket.append(live[start])
                size += live[start].numel()
                start += 1
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)  # type: ignore[attr-defined]

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:
            plugin = _FSDPNormClipPrecision(plugin.precision, scaler=plugin.scaler, strategy=self)
        FSDPStrategy.precision_plugin.fset(self, plugin)  # type: ignore[attr-defined]

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        self._whole_replicated_states()
        return checkpoint

    def _whole_replicated_states(self) -> None:
        """A sharded checkpoint's optimizer states come back as ShardedTensors for the replicated adapters (torch's
        `load_sharded_optimizer_state_dict` shards every state, `optim_state_dict_to_load` passes those of ignored
        parameters through, and AdamW cannot step on them): gathered whole on every rank."""
        if not self.replicated:
            return
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        for optimizer in self.optimizers:
            for p in self.replicated:
                state = optimizer.state.get(p, {})
                for key, value in list(state.items()):
                    if not isinstance(value, ShardedTensor):
                        continue
                    dtype = value.metadata().tensor_properties.dtype
                    whole = torch.empty(value.size(), dtype=dtype, device=p.device)
                    value.gather(dst=0, out=whole if dist.get_rank() == 0 else None)
                    dist.broadcast(whole, src=0)
                    state[key] = whole

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        with self._float_adapters_ignored(model):
            return self._wrap(model)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
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
