"""The LightningModule: training/validation steps, optimizer groups, the warmup + cosine schedule, export.

Hydra builds what it gets (`configs/model/*.yaml`): the model (`musicflamingo.model.build.build_model`, parts
frozen and LoRA applied there), a partial optimizer and a partial LR schedule; every default lives in the YAML.
Metric keys: `train/loss`, `val/loss`, `train/tokens_per_s`, `train/grad_norm`, `lr/<group>`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from musicflamingo.errors import RunStopped
from musicflamingo.model import MusicFlamingo
from musicflamingo.model.build import PARTS
from musicflamingo.model.lora import LoRALinear, QuantizedLoRALinear, has_quantized, merge_lora

_ADAPTERS = (LoRALinear, QuantizedLoRALinear)  # the layers whose scale a checkpoint records

log = logging.getLogger(__name__)


class NonFiniteLossError(RunStopped, FloatingPointError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class CheckpointMismatchError(ValueError):
    """A training checkpoint (`ckpt_path`) was written by a model of another architecture (keys or shapes differ)."""


def state_dict_mismatches(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """What differs between a checkpoint's state dict and a model's, one phrase per key, the model's order first."""
    out = []
    for key, value in expected.items():
        if key not in saved:
            out.append(f"{key} is missing from it")
        elif tuple(saved[key].shape) != tuple(value.shape):
            out.append(f"{key} has shape {list(saved[key].shape)} there, {list(value.shape)} in this model")
    out += [f"{key} is in it but not in this model" for key in saved if key not in expected]
    return out


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's LR times a multiplier: linear warmup from 1/warmup_steps to 1, then a cosine to `min_lr_ratio`
    at `max_steps` (constant after). Used as a Hydra partial: `scheduler(optimizer)`."""
    if max_steps < 1:
        raise ValueError(
            f"model.scheduler.max_steps={max_steps}: the schedule needs a length of at least one step (the "
            "LightningModule puts the trainer's estimate in place of -1, training by epochs)"
        )

    def multiplier(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if max_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _batch_ids(batch: Mapping[str, Any]) -> str:
    return f"batch ids {list(batch.get('ids', []))[:8]}"


class MusicFlamingoLit(L.LightningModule):
    """Steps, optimizer groups and export around a ready model.

    Args:
        net: the model, ready to train (`musicflamingo.model.build.build_model`).
        optimizer: called with the parameter groups, e.g. `functools.partial(torch.optim.AdamW, lr=..., ...)`;
            its `lr` and `weight_decay` apply to every group that does not set its own.
        scheduler: called with the optimizer, e.g. `functools.partial(warmup_cosine, ...)`; stepped every
            optimizer step. A partial with `max_steps=-1` gets the trainer's estimated number of steps.
        part_lr: `{audio_tower, multi_modal_projector, language_model}` -> that part's LR, or None for the
            optimizer's.
        nonfinite_loss: "stop" (raise, keep the last checkpoint) or "skip" (skip the step, count it).
    """

    def __init__(
        self,
        net: MusicFlamingo,
        optimizer: Callable[[Iterable[dict[str, Any]]], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
        part_lr: Mapping[str, float | None],
        nonfinite_loss: str,
    ) -> None:
        super().__init__()
        # No save_hyperparameters: the model and the partials would be pickled into every checkpoint, which
        # AtomicCheckpointIO reads with weights_only=True. The resolved config is in the run folder's .hydra/.
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        if set(part_lr) != set(PARTS):
            raise ValueError(f"part_lr: got keys {sorted(part_lr)}; expected exactly {list(PARTS)}")
        self.model = net
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.part_lr = dict(part_lr)
        self.nonfinite_loss = nonfinite_loss
        self.nonfinite_steps = 0
        self._t0: float | None = None
        self._learned_since_step = False  # DDP: some rank learned from a batch since the last optimizer step
        self.optimizer_steps_per_batch = 1  # GRPO: updates_per_batch (the schedule's length by epochs)

    # ------------------------------------------------------------------ steps
    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        # position_ids and seq_ids come with packed batches (`data.collate.collate_packed`): the model keeps
        # attention, positions and the labelled rows of its last layer within each conversation.
        keys = ("input_ids", "attention_mask", "input_features", "input_features_mask", "labels")
        keys += ("position_ids", "seq_ids")
        return {k: batch[k] for k in keys if batch.get(k) is not None}

    @staticmethod
    def _batch_size(batch: Mapping[str, Any]) -> int:
        """Conversations in the batch (a packed row holds several), the weight of its mean loss."""
        return len(batch["ids"]) if "ids" in batch else batch["input_ids"].shape[0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        # empty: every sample of the batch was skipped as bad, nothing to learn
        empty = batch["input_ids"].shape[0] == 0
        out = None if empty else self.model(**self._model_inputs(batch), return_logits=False)
        nonfinite = out is not None and not bool(torch.isfinite(out.loss))
        if self._distributed():
            # Under DDP every rank must run backward (the gradients are reduced inside it) and take the same
            # decision: a non-finite loss on any rank skips (or stops) the step on all of them.
            flags = torch.tensor(
                [float(nonfinite), float(out is not None and not nonfinite)], device=self.device
            )
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
            nonfinite_anywhere, learned_anywhere = bool(flags[0] > 0), bool(flags[1] > 0)
            self._learned_since_step |= learned_anywhere and not nonfinite_anywhere
            if nonfinite_anywhere:
                self._nonfinite(out.loss if nonfinite else None, _batch_ids(batch))
                return self._no_op_loss()
            if empty:
                return self._no_op_loss()
        elif empty:
            return None
        elif nonfinite:
            self._nonfinite(out.loss, _batch_ids(batch))
            return None
        loss = out.loss
        bs = self._batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/label_tokens", float(out.num_label_tokens), batch_size=bs, reduce_fx="sum")
        return loss

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _nonfinite(self, loss: torch.Tensor | None, where: str, what: str = "loss") -> None:
        """Count a step whose ``what`` is NaN/inf (``loss`` None: on another rank) at ``where`` and return to
        skip it, or stop."""
        self.nonfinite_steps += 1
        value = "on another rank" if loss is None else loss.item()
        where = f"global step {self.global_step}, {where}"
        if self.nonfinite_loss == "skip":
            log.warning(
                "non-finite %s %s at %s: step skipped (%d so far)", what, value, where, self.nonfinite_steps
            )
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
            return
        raise NonFiniteLossError(
            f"{what} is {value} at {where}; stopping. The last good checkpoint is kept; set "
            "`model.nonfinite_loss=skip` to skip such steps instead"
        )

    def _no_op_loss(self) -> torch.Tensor:
        """A zero loss whose backward gives every trainable parameter a zero gradient: under DDP a rank with nothing
        to learn still joins the gradient reduction. (Zero times a NaN weight still has a zero gradient.)"""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.stack([(p.reshape(-1)[:1] * 0).sum() for p in params]).sum()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        tokens = (
            float(batch["attention_mask"].sum())
            if "attention_mask" in batch
            else float(batch["input_ids"].numel())
        )
        self.log("train/tokens_per_s", tokens / max(dt, 1e-9), prog_bar=True, batch_size=1)
        for i, group in enumerate(self.optimizers().optimizer.param_groups if self.trainer else []):
            self.log(f"lr/{group.get('name', i)}", group["lr"], batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._distributed():
            if not self._learned_since_step:
                # no rank learned from any batch of this step: skip it as a single process does (no gradient, so
                # the optimizer leaves the weights and its moments alone), not an update from zero gradients
                for p in self.parameters():
                    p.grad = None
            self._learned_since_step = False
        norms = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["input_ids"].shape[0] == 0:  # all samples skipped as bad
            return None
        out = self.model(**self._model_inputs(batch), return_logits=False)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=self._batch_size(batch))
        return out.loss

    # ------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """One group per part and decay kind (`audio_tower`, `audio_tower_no_decay`, ...), trainable parameters only.

        A group sets `lr` only where `part_lr` gives its part one, and `weight_decay` only to switch it off (biases,
        norms, other 1-d parameters); the optimizer's own values apply otherwise.
        """
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            part = name.split(".")[0]
            part = "language_model" if part == "lm_head" else part
            no_decay = p.ndim < 2 or "norm" in name or name.endswith(".bias")
            groups.setdefault((part, no_decay), []).append(p)
        out = []
        for (part, no_decay), params in sorted(groups.items()):
            group: dict[str, Any] = {"name": f"{part}{'_no_decay' if no_decay else ''}", "params": params}
            if self.part_lr[part] is not None:
                group["lr"] = float(self.part_lr[part])
            if no_decay:
                group["weight_decay"] = 0.0
            out.append(group)
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning's strict load (a many-line RuntimeError): a checkpoint of another architecture is one
        error naming the file and the first mismatched key. Sharded strategies (FSDP) keep Lightning's check."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is not None and not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        diffs = state_dict_mismatches(checkpoint.get("state_dict", {}), self.state_dict())
        path = self.trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        self._check_resumed_lr(checkpoint, path)
        self._check_resumed_lora_scale(checkpoint, path)
        if diffs:
            more = f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else ""
            raise CheckpointMismatchError(
                f"ckpt_path={path} was written by a model of another architecture: {diffs[0]}{more}; resume with "
                "the model settings that wrote it, or start afresh in another run folder (hydra.run.dir=...)"
            )

    def _check_resumed_lr(self, checkpoint: dict[str, Any], path: Any) -> None:
        """A resume restores the optimizer and schedule as saved: a learning rate changed since (model.optimizer.lr,
        model.part_lr.*) would be ignored silently, so it is refused, naming the group and both values."""
        base = getattr(self.optimizer, "keywords", {}).get("lr")
        wanted = {g["name"]: g.get("lr", base) for g in self.param_groups()}
        for state in checkpoint.get("optimizer_states", [])[:1]:
            for group in state.get("param_groups", []):
                was, now = group.get("initial_lr", group.get("lr")), wanted.get(group.get("name"))
                if was is None or now is None or math.isclose(float(was), float(now), rel_tol=1e-6):
                    continue
                raise CheckpointMismatchError(
                    f"ckpt_path={path} trained {group['name']} at learning rate {float(was):g}, the settings now "
                    f"give {float(now):g} (model.optimizer.lr / model.part_lr): a resume continues the saved "
                    "optimizer and schedule, so the new value would be ignored; resume with the old value, or "
                    "start a new run from the weights (model.net.init_from=<run>/export, another run folder)"
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A and B alone do not say what an adapter adds: alpha / rank scales them (see _check_resumed_lora_scale)
        scales = self._lora_scales()
        if scales:
            checkpoint["lora_scales"] = scales

    def _lora_scales(self) -> dict[str, float]:
        return {name: float(m.scale) for name, m in self.model.named_modules() if isinstance(m, _ADAPTERS)}

    def _check_resumed_lora_scale(self, checkpoint: dict[str, Any], path: Any) -> None:
        """The same A and B under another model.net.lora.alpha compute another model: refused, as a changed learning
        rate is (a changed rank already fails on the shapes)."""
        saved, now = checkpoint.get("lora_scales"), self._lora_scales()
        if not saved or not now:
            return  # no adapters then or now (the shapes decide), or a checkpoint from before scales were saved
        for name, was in saved.items():
            scale = now.get(name)
            if scale is not None and not math.isclose(was, scale, rel_tol=1e-6):
                rank = next(m.rank for n, m in self.model.named_modules() if n == name)
                raise CheckpointMismatchError(
                    f"ckpt_path={path} trained its LoRA adapters at scale alpha/rank = {was:g} (alpha "
                    f"{was * rank:g} at rank {rank}), the settings now give {scale:g} (model.net.lora.alpha "
                    f"{scale * rank:g}): the saved adapters would compute another model; resume with the old "
                    "alpha, or start a new run from the weights (model.net.init_from=<run>/export, another run folder)"
                )

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.param_groups())
        extra = {}
        if getattr(self.scheduler, "keywords", {}).get("max_steps", 0) < 0:  # training by epochs
            estimate = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimate):  # no max_steps, no max_epochs: the run ends by time
                raise ValueError(
                    "model.scheduler.max_steps=-1 takes the schedule's length from the trainer, which has no end "
                    "in steps (trainer.max_steps=-1, trainer.max_epochs=-1); set model.scheduler.max_steps"
                )
            per = self.optimizer_steps_per_batch
            if per > 1 and (self.trainer.max_steps == -1 or estimate < self.trainer.max_steps):
                # the estimate counts batches (from the epochs); GRPO steps its optimizer and schedule `per` times
                # a batch, and trainer.max_steps counts those optimizer steps
                estimate *= per
                if self.trainer.max_steps != -1:
                    estimate = min(estimate, self.trainer.max_steps)
            extra["max_steps"] = int(estimate)
        scheduler = self.scheduler(optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export(
        self, path: str | Path, processor: Any = None, max_shard_size: str = "5GB", overwrite: bool = False
    ) -> Path:
        """Write a Hugging Face layout folder (LoRA merged into a copy in the weights' own dtype: float32 for
        fp32 and bf16-mixed, bfloat16 for bf16-true; QLoRA's 4-bit base dequantised and merged into a bfloat16
        copy; this module is left untouched). Only the model's and the processor's files are
        replaced; see `MusicFlamingo.save_pretrained` for `overwrite`."""
        model = self.model
        if has_quantized(model):
            model = copy.deepcopy(model)
            # each merged linear goes to the CPU as it is made: the device holds the 4-bit copy, never a bf16 model
            merge_lora(model, torch.bfloat16, device="cpu")
            model = model.to("cpu", torch.bfloat16)
        elif any(isinstance(m, LoRALinear) for m in model.modules()):
            # each merge is computed in float32 and stored in its base weight's dtype (`LoRALinear.merged_linear`)
            model = copy.deepcopy(model)
            merge_lora(model)
        path = Path(path)
        model.save_pretrained(path, max_shard_size=max_shard_size, overwrite=overwrite)
        if processor is not None:
            processor.save_pretrained(path, overwrite=overwrite)
        return path
