"""The LightningModule: training/validation steps, optimizer groups, the warmup + cosine schedule, export.

Hydra builds what it gets (`configs/model/*.yaml`): the model (`musicflamingo.model.build.build_model`, parts
frozen and LoRA applied there), a partial optimizer and a partial LR schedule; every default lives in the YAML.
Metric keys: `train/loss`, `val/loss`, `train/tokens_per_s`, `train/grad_norm`, `lr/<group>`.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch import nn

from musicflamingo.chat import IGNORE_INDEX
from musicflamingo.distributed import MusicFlamingoFSDP
from musicflamingo.errors import RunStopped
from musicflamingo.model import MusicFlamingo
from musicflamingo.model.build import PARTS
from musicflamingo.model.encoder import conv_output_lengths
from musicflamingo.model.lora import (
    OLD_QLORA_KEY,
    LoRALinear,
    QuantizedLoRALinear,
    adapter_layers,
    has_quantized,
    merge_lora,
    old_qlora_checkpoint_message,
)

_ADAPTERS = (LoRALinear, QuantizedLoRALinear)  # the layers whose scale a checkpoint records
_WRAPPER_PREFIXES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")

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


def _plain(value: Any) -> Any:
    """A setting's value as the config writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _parts(groups: list[tuple[str, int]]) -> str:
    """The parts that optimizer groups named `<part>` / `<part>_no_decay` train, in order, or "nothing"."""
    parts = dict.fromkeys(name.removesuffix("_no_decay") for name, _ in groups)
    return ", ".join(parts) or "nothing"


def _same_setting(a: Any, b: Any) -> bool:
    """Saved and configured optimizer settings agree (numbers within 1e-6, sequences element by element)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _batch_ids(batch: Mapping[str, Any]) -> str:
    return f"batch ids {list(batch.get('ids', []))[:8]}"


def cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are CPU copies; the original stays where it is, and no second
    copy of its weights is made on its device (`copy.deepcopy` copies every tensor where it lies)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


def export_model(
    model: nn.Module,
    path: str | Path,
    processor: Any = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face layout folder of `model` (LoRA merged into a copy in the weights' own dtype: float32
    for fp32 and bf16-mixed, bfloat16 for bf16-true; QLoRA's 4-bit base dequantised and merged into a bfloat16
    copy; `model` is left untouched). Only the model's and the processor's files are replaced; see
    `MusicFlamingo.save_pretrained` for `overwrite`."""
    if has_quantized(model):
        model = copy.deepcopy(model)
        # each merged linear goes to the CPU as it is made: the device holds the 4-bit copy, never a bf16 model
        merge_lora(model, torch.bfloat16, device="cpu")
        model = model.to("cpu", torch.bfloat16)
    elif any(isinstance(m, LoRALinear) for m in model.modules()):
        # the copy is made on the CPU: a deepcopy on the GPU held a second model there at the end of a run
        # (33 GB for the release's fp32 master weights), beyond what the planner counts. Each merge is computed
        # in float32 and stored in its base weight's dtype (`LoRALinear.merged_linear`).
        model = cpu_copy(model)
        merge_lora(model)
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size, overwrite=overwrite)
    if processor is not None:
        processor.save_pretrained(path, overwrite=overwrite)
    return path


def untie_trained_head(net: nn.Module) -> bool:
    """Give a tied head (`tie_word_embeddings=true`, e.g. a Qwen2.5-0.5B/1.5B base) a trained copy of its own: the
    reference never ties (`_tied_weights_keys` is None; it reads `lm_head.weight` whatever the flag says), so a full
    fine-tune there trains the head and the embedding apart, not one tensor taking both updates. The config then
    says untied (the export writes both, as the reference reads them). A frozen tied pair (LoRA, a frozen language
    model) stays shared. Returns whether it untied."""
    head = getattr(getattr(net, "lm_head", None), "weight", None)
    embedding = getattr(getattr(getattr(net, "language_model", None), "embed_tokens", None), "weight", None)
    if head is None or head is not embedding or not head.requires_grad:
        return False
    net.lm_head.weight = nn.Parameter(head.detach().clone(), requires_grad=True)
    text = getattr(getattr(net, "config", None), "text", None)
    if text is not None and getattr(text, "tie_word_embeddings", False):
        text.tie_word_embeddings = False
    log.info(
        "tie_word_embeddings=true: lm_head gets its own copy of embed_tokens to train, as the reference trains them "
        "(never tied); the export stores both and says tie_word_embeddings=false"
    )
    return True


def total_steps(trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> int | None:
    """The optimizer step the run ends at: trainer.max_steps, or sooner when trainer.max_epochs ends it first (the
    progress line of a one-epoch run read `step 35/1000` with the default max_steps, its ETA 30x too long). None
    when nothing bounds the steps (trainer.max_time alone, or an iterable data set without max_steps).

    Lightning's `estimated_stepping_batches` counts batches over the epochs (per rank, after gradient
    accumulation); GRPO makes `optimizer_steps_per_batch` optimizer steps a batch, and max_steps counts those, as
    `MusicFlamingoLit.configure_optimizers` sizes a schedule by epochs with it."""
    total = trainer.estimated_stepping_batches  # min(max_steps, ceil(batches / accumulation) * max_epochs)
    if not math.isfinite(total) or total <= 0:
        return None
    per = getattr(pl_module, "optimizer_steps_per_batch", 1)
    if per > 1 and (trainer.max_steps == -1 or total < trainer.max_steps):  # bounded by the epochs' batches
        total = total * per if trainer.max_steps == -1 else min(total * per, trainer.max_steps)
    return int(total)


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
        self._untied_head = untie_trained_head(net)
        # each parameter's dimensions as built: FSDP (use_orig_params) shows a rank's shard of a weight as a 1-d
        # view by the time the optimizer is made, which `p.ndim < 2` would put in a no-decay group
        self._built_ndim = {name: p.ndim for name, p in net.named_parameters()}
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.part_lr = dict(part_lr)
        self.nonfinite_loss = nonfinite_loss
        self.nonfinite_steps = 0
        # float16 AMP: steps whose gradients held inf/nan, which the GradScaler skipped (lowering its scale)
        self.amp_skipped_steps = 0
        self._t0: float | None = None
        # the optimizer step whose batches' tokens and seconds are summed (`train/tokens_per_s` is the step's)
        self._throughput_step: int | None = None
        self._step_tokens = 0.0
        self._step_seconds = 0.0
        self._learned_since_step = False  # DDP: some rank learned from a batch since the last optimizer step
        # sum of the batch losses, batches and label tokens since the last optimizer step: `train/loss` is the
        # step's mean over its accumulated batches and every rank's, as the gradient is (not rank 0's last batch)
        self._step_loss: torch.Tensor | None = None
        self._step_batches = 0
        self._step_label_tokens = 0.0
        # validation: this rank's [sum of label-token losses, label tokens]; stand-in forwards still to run (FSDP)
        self._val_loss_sums: torch.Tensor | None = None
        self._val_stand_ins = 0
        self.optimizer_steps_per_batch = 1  # GRPO: updates_per_batch (the schedule's length by epochs)
        # the LR schedule's numeric settings as made (max_steps=-1 resolved), saved in checkpoints; those of the
        # checkpoint a resume loaded, compared at the training start (where both are known)
        self._schedule: dict[str, float] = {}
        self._resumed_schedule: dict[str, float] | None = None

    def setup(self, stage: str) -> None:
        """Before the precision plugin casts the module: the LoRA adapters stay float32 (`lora.FloatAdapters`), under
        configs/trainer/fsdp.yaml too (`distributed.MusicFlamingoFSDP` keeps them out of FSDP's flat parameters);
        under another FSDP strategy they follow the cast (FSDP flattens each block's weights into one dtype)."""
        strategy = None if self._trainer is None else self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy) or isinstance(strategy, MusicFlamingoFSDP):
            return
        layers = adapter_layers(self.model)
        for layer in layers:
            layer.keep_float32 = False
        if layers and str(self.trainer.precision) in ("bf16-true", "16-true"):
            log.warning(
                "trainer.precision=%s under FSDP: the LoRA adapters train in %s with the base (FSDP flattens a "
                "block's weights into one dtype), where AdamW's smallest updates round away; "
                "trainer=fsdp (musicflamingo.distributed.fsdp_strategy) or trainer.precision=bf16-mixed keeps them "
                "float32",
                self.trainer.precision,
                "bfloat16" if str(self.trainer.precision).startswith("bf16") else "float16",
            )

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
        self._forget_last_step_metrics()
        step = self.trainer.global_step
        if step != self._throughput_step:  # a new optimizer step: its tokens and seconds from 0
            self._throughput_step, self._step_tokens, self._step_seconds = step, 0.0, 0.0

    # cumulative counts: their last value stays true until they are logged again
    _KEPT_STEP_METRICS = frozenset({"train/nonfinite_steps", "train/amp_skipped_steps"})

    def _forget_last_step_metrics(self) -> None:
        """Drop the previous step's per-step values as this step begins: Lightning writes every value still held
        into the step's row, so a skipped step (a non-finite loss under `nonfinite_loss=skip`, every rank's batch
        empty), which logs no `train/loss`, `train/label_tokens` or `train/grad_norm`, repeated the previous step's
        in metrics.csv as if it had trained. A new step: the global step moved (automatic optimization: the first
        batch of an accumulation window), or every batch (manual optimization: a row per batch)."""
        results = getattr(self._trainer, "_results", None) if self._trainer is not None else None
        if results is None:
            return
        step = self.trainer.global_step
        if self.automatic_optimization and step == getattr(self, "_metrics_step", None):
            return
        self._metrics_step = step
        for metric in results.values():
            meta = getattr(metric, "meta", None)
            if meta is None or not meta.on_step or meta.on_epoch or meta.name in self._KEPT_STEP_METRICS:
                continue
            # a torchmetrics object logged whole accumulates as its owner says: not ours to reset
            if not getattr(metric, "is_tensor", False):
                continue
            metric.reset()

    def _sharded(self) -> bool:
        """FSDP over several processes: every forward all-gathers each unit's weights."""
        return self._distributed() and isinstance(self.trainer.strategy, FSDPStrategy)

    def _stand_in_inputs(self) -> dict[str, Any]:
        """A one-row batch of a silent audio window (8 valid mel frames, its `<sound>` tokens) and two text tokens,
        the last one labelled: what a rank runs in place of a batch it does not have, so that every FSDP unit (each
        encoder and decoder block, the head) all-gathers, and reduces its gradient, on every rank."""
        config = self.model.config
        frames = config.audio.mel_frames
        valid = min(8, frames)
        _, sound = conv_output_lengths(valid)
        features = torch.zeros(1, config.audio.num_mel_bins, frames, device=self.device)
        mask = torch.zeros(1, frames, dtype=torch.int32, device=self.device)
        mask[:, :valid] = 1
        ids = torch.zeros(1, sound + 2, dtype=torch.long, device=self.device)
        ids[:, :sound] = config.audio_token_id
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -1] = 0
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "input_features": features,
            "input_features_mask": mask,
            "labels": labels,
        }

    def _forward(self, batch: Mapping[str, Any]) -> Any:
        """The model's output on `batch`; for an empty one (every sample skipped as bad) None, or under FSDP the
        stand-in batch's, whose loss is only to be used times zero. Under FSDP every rank runs every unit in the
        same order whatever its batch holds (a unit one rank skips leaves the others waiting in its all-gather, or
        pairs their collectives wrongly): an empty batch runs the stand-in batch; a batch without audio runs the
        audio path on the stand-in window first, added to its loss times zero. Under DDP (gradients reduced in
        backward, no collective in forward) an empty batch runs nothing and a text-only one adds the audio path
        only when it trains (every trained weight must get a gradient: find_unused_parameters=false)."""
        empty = batch["input_ids"].shape[0] == 0
        sharded = self._sharded()
        if empty and not sharded:
            return None
        inputs = self._stand_in_inputs() if empty else self._model_inputs(batch)
        touch = None
        if inputs.get("input_features") is None and self._distributed():
            if sharded or (torch.is_grad_enabled() and self._audio_trains()):
                touch = self._stand_in_audio_loss()
        out = self.model(**inputs, return_logits=False)
        if touch is not None:
            out.loss = out.loss + touch
        return out

    def _stand_in_audio_loss(self) -> torch.Tensor:
        """Zero times the audio path's output on the stand-in window: added to a loss without audio, its backward
        reaches every audio weight (a zero gradient) and leaves the loss's value unchanged."""
        stand_in = self._stand_in_inputs()
        audio = self.model.encode_audio(
            stand_in["input_features"], stand_in["input_features_mask"], stand_in["input_ids"]
        )
        return audio.float().sum() * 0.0

    def _audio_trains(self) -> bool:
        return any(
            p.requires_grad
            for m in (self.model.audio_tower, self.model.multi_modal_projector)
            for p in m.parameters()
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        # empty: every sample of the batch was skipped as bad, nothing to learn (under FSDP the stand-in batch ran)
        empty = batch["input_ids"].shape[0] == 0
        out = self._forward(batch)
        stand_in, out = (out, None) if empty else (None, out)
        nonfinite = out is not None and not bool(torch.isfinite(out.loss))
        if self._distributed():
            # Under DDP every rank must run backward (the gradients are reduced inside it) and take the same
            # decision: a non-finite loss on any rank skips (or stops) the step on all of them.
            flags = torch.tensor(
                [float(nonfinite), float(out is not None and not nonfinite)],
                device=self.device,
                dtype=torch.float32,
            )
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
            nonfinite_anywhere, learned_anywhere = bool(flags[0] > 0), bool(flags[1] > 0)
            self._learned_since_step |= learned_anywhere and not nonfinite_anywhere
            if nonfinite_anywhere:
                self._nonfinite(out.loss if nonfinite else None, _batch_ids(batch))
                return self._no_op_loss()
            if empty:
                # FSDP: the stand-in's zero-weight loss, whose backward reduces every unit's (zero) gradient as the
                # other ranks' backward does; DDP: a zero loss reaching every trained weight
                return stand_in.loss * 0.0 if stand_in is not None else self._no_op_loss()
        elif empty:
            return self._keep_step_loss()
        elif nonfinite:
            self._nonfinite(out.loss, _batch_ids(batch))
            return self._keep_step_loss()
        n = out.num_label_tokens
        # The step's loss and gradient are the mean over all its label tokens (every accumulated batch, every
        # rank), as one batch holding them all gives (a mean of the batches' means weighed a token of a short batch
        # more). One batch on one process: its own mean, as is. Else each batch returns its summed loss, and
        # on_before_optimizer_step divides the gradient by the step's label tokens (and logs sum / tokens).
        step_loss = out.loss.detach().float() * n
        self._step_loss = step_loss if self._step_loss is None else self._step_loss + step_loss
        self._step_batches += 1
        self._step_label_tokens += float(n)
        return out.loss * n if self._several_batches_a_step() else out.loss

    def _keep_step_loss(self) -> torch.Tensor | None:
        """What a skipped batch (empty, or a non-finite loss) returns on one process: None, or, when earlier batches
        of the step (gradient accumulation) left gradients, a zero loss over those parameters. Lightning's float16
        AMP (`trainer.precision=16-mixed`) skips the whole optimizer step when its last batch returns None, so the
        earlier batches were never learned; other precisions step with their gradients either way."""
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if self._step_batches == 0 or not params:
            return None
        return torch.stack([(p.reshape(-1)[:1] * 0).sum() for p in params]).sum()

    def _several_batches_a_step(self) -> bool:
        """Whether a step's gradient sums batches (accumulated, or one per rank): then weighed by label tokens."""
        if self._trainer is None:
            return False
        return self.trainer.accumulate_grad_batches > 1 or self.trainer.world_size > 1

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _nonfinite(self, loss: torch.Tensor | None, where: str, what: str = "loss") -> None:
        """Count a step whose ``what`` is NaN/inf (``loss`` None: on another rank) at ``where`` and return to
        skip it, or stop."""
        self.nonfinite_steps += 1
        value = "on another rank" if loss is None else loss.item()
        where = f"global step {self.global_step}, {where}"
        if self.nonfinite_loss == "skip":
            # under gradient accumulation only this batch is left out: the step learns from its other batches
            accumulating = (
                self.automatic_optimization
                and self._trainer is not None
                and self.trainer.accumulate_grad_batches > 1
            )
            skipped = (
                "batch skipped, the step learns from its other accumulated batches (if any)"
                if accumulating
                else "step skipped"
            )
            log.warning(
                "non-finite %s %s at %s: %s (%d so far)", what, value, where, skipped, self.nonfinite_steps
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
        # the step's tokens over its seconds, all its accumulated batches (its row is written after the last one:
        # that batch's alone was logged, 0 when every sample of it was bad)
        self._step_tokens += tokens
        self._step_seconds += dt
        self.log(
            "train/tokens_per_s",
            self._step_tokens / max(self._step_seconds, 1e-9),
            prog_bar=True,
            batch_size=1,
        )
        if self.nonfinite_steps:  # every row from the first skip on, a resumed run's too (a running count)
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
        if self.amp_skipped_steps:
            self.log("train/amp_skipped_steps", float(self.amp_skipped_steps), batch_size=1)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """The optimizer step; under float16 AMP (`trainer.precision=16-mixed`, a GradScaler) a step whose gradients
        held inf/nan is skipped by the scaler, which halves its scale: counted in `train/amp_skipped_steps` (kept
        across resumes) and logged, as the weights did not move. A finite loss with overflowing float16 gradients
        is what loss scaling expects now and then (the first steps find the scale), so it never stops the run."""
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        scaler = getattr(plugin, "scaler", None)
        before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if before is None:
            return
        after = scaler.get_scale()
        if after < before:  # update() lowers the scale only after a step it skipped (backoff_factor < 1)
            self.amp_skipped_steps += 1
            log.warning(
                "float16 AMP: inf/nan gradients at global step %d, the GradScaler skipped the step (the weights did "
                "not move) and lowered its scale %g -> %g (%d skipped so far, train/amp_skipped_steps)",
                self.trainer.global_step,
                before,
                after,
                self.amp_skipped_steps,
            )

    def _log_step_metrics(self, optimizer: torch.optim.Optimizer) -> float:
        """`train/loss` (mean over the step's label tokens, all batches and ranks), `train/label_tokens` (their
        number) and the learning rate each group steps with (`lr/<group>`: read here, before the schedule moves it
        on to the next step's). Returns the step's label tokens over all ranks."""
        loss_sum, batches, label_tokens = self._step_loss, self._step_batches, self._step_label_tokens
        self._step_loss, self._step_batches, self._step_label_tokens = None, 0, 0.0
        distributed = self._distributed()
        if distributed:  # every rank joins, also one without a batch to learn from in this step
            totals = torch.tensor([0.0, batches, label_tokens], device=self.device, dtype=torch.float64)
            if loss_sum is not None:
                totals[0] = loss_sum
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            loss_sum, batches, label_tokens = (
                totals[0].float(),
                int(totals[1].item()),
                float(totals[2].item()),
            )
        if batches > 0:
            self.log("train/loss", loss_sum / max(label_tokens, 1.0), prog_bar=True, batch_size=1)
            self.log("train/label_tokens", label_tokens, batch_size=1)
        for i, group in enumerate(optimizer.param_groups if optimizer is not None else []):
            self.log(f"lr/{group.get('name', i)}", group["lr"], batch_size=1)
        return label_tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        label_tokens = self._log_step_metrics(optimizer)
        if label_tokens > 0 and self._several_batches_a_step():
            # Lightning divided each batch's summed loss by accumulate_grad_batches and DDP/FSDP average the
            # gradients over the ranks: undo both and divide by the step's label tokens
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / label_tokens
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        if self._distributed():
            if not self._learned_since_step:
                # no rank learned from any batch of this step: skip it as a single process does (no gradient, so
                # the optimizer leaves the weights and its moments alone), not an update from zero gradients
                for p in self.parameters():
                    p.grad = None
            self._learned_since_step = False
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        # FSDP's float32 LoRA adapters over a half-precision base are replicated, their gradients averaged already
        # (`distributed.MusicFlamingoFSDP`): every rank holds the same whole ones, counted once
        replicated = {id(p) for p in getattr(self.trainer.strategy, "replicated", ())} if sharded else set()
        squares, once = [], []
        for p in self.parameters():
            if p.grad is not None:
                (once if id(p) in replicated else squares).append(p.grad.detach().float().square().sum())
        if sharded:
            # each rank holds a shard of every other gradient: the model's norm sums all ranks' squares
            zero = torch.zeros((), device=self.device)
            total = self.trainer.strategy.reduce(
                torch.stack(squares).sum() if squares else zero, reduce_op="sum"
            )
            total = total + (torch.stack(once).sum().to(total.device) if once else 0.0)
            self.log("train/grad_norm", total.sqrt(), batch_size=1)
        elif squares:
            self.log("train/grad_norm", torch.stack(squares).sum().sqrt(), batch_size=1)

    def _val_batches(self) -> float:
        """This rank's validation batches in the running loop (the sanity check's or the epoch's)."""
        counts = (
            self.trainer.num_sanity_val_batches
            if self.trainer.sanity_checking
            else self.trainer.num_val_batches
        )
        return float(counts[0]) if counts else 0.0

    def on_validation_epoch_start(self) -> None:
        # this rank's sum of label-token losses and its label tokens (float64), summed over the ranks at the end
        self._val_loss_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._val_stand_ins = 0
        if self._sharded():
            # ranks may validate different numbers of batches (none is repeated to even them out): under FSDP each
            # forward all-gathers, so the ranks with fewer run stand-in forwards after their last batch
            own = self._val_batches()
            # float32 whatever the default dtype (bf16-true sets bfloat16: counts over 256 would round)
            most = self.trainer.strategy.reduce(
                torch.tensor(own, device=self.device, dtype=torch.float32), reduce_op="max"
            )
            if math.isfinite(own) and math.isfinite(float(most)):
                self._val_stand_ins = int(float(most) - own)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        out = self._forward(batch)
        loss = None
        # an empty batch (every sample skipped as bad) adds nothing; under FSDP the stand-in batch ran
        if batch["input_ids"].shape[0] > 0:
            if self._val_loss_sums is None:  # called outside Lightning's loop
                self._val_loss_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
            n = out.num_label_tokens
            loss = out.loss
            if n > 0:
                self._val_loss_sums[0] += loss.detach().double() * n
                self._val_loss_sums[1] += n
        if self._val_stand_ins and batch_idx == self._val_batches() - 1:
            for _ in range(self._val_stand_ins):
                self.model(**self._stand_in_inputs(), return_logits=False)
            self._val_stand_ins = 0
        return loss

    def on_validation_epoch_end(self) -> None:
        """`val/loss`: the mean over every rank's label tokens (a rank whose batches were all skipped as bad adds
        none), the same on every rank. Every rank joins the sum, and logs the key when any rank had a label token
        (a rank not logging it left the others waiting, or paired their epoch-end reduction with another one)."""
        for _ in range(
            self._val_stand_ins
        ):  # a rank with no validation batch at all (FSDP): its forwards now
            self.model(**self._stand_in_inputs(), return_logits=False)
        self._val_stand_ins = 0
        sums, self._val_loss_sums = self._val_loss_sums, None
        if sums is None:
            return
        if self._distributed():
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[1]) > 0:
            # one value on every rank already: "max" keeps it exact (a mean over the ranks could round it)
            self.log("val/loss", (sums[0] / sums[1]).float(), prog_bar=True, sync_dist=True, reduce_fx="max")

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
            name = _WRAPPER_PREFIXES.sub("", name)  # FSDP / activation checkpointing wrappers' names
            part = name.split(".")[0]
            part = "language_model" if part == "lm_head" else part
            no_decay = self._built_ndim.get(name, p.ndim) < 2 or "norm" in name or name.endswith(".bias")
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
        """Before Lightning's strict load (a many-line RuntimeError) and the optimizer's (a torch ValueError, or new
        settings silently replaced by the saved ones): a resume whose settings do not fit the checkpoint is one
        `CheckpointMismatchError` naming the file, the setting and both values. Checked: the architecture (the first
        mismatched key), the trained parameter groups (model.net.freeze, LoRA), the optimizer's settings (learning
        rates, weight decay, betas, eps), LoRA's scale, and the data order (devices, batch budget, seed, the data).
        Sharded strategies (FSDP) keep Lightning's checks of weights and optimizer."""
        path = self.trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        self._resumed_schedule = checkpoint.get("lr_schedule")
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        self.amp_skipped_steps = int(checkpoint.get("amp_skipped_steps", 0))
        self._check_resumed_data(checkpoint, path)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is not None and not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            return
        saved = checkpoint.get("state_dict", {})
        old_qlora = next((k for k in saved if k.endswith(OLD_QLORA_KEY)), None)
        if (
            old_qlora is not None
        ):  # else refused below as "another architecture", with advice that cannot work
            layer = old_qlora[: -len(OLD_QLORA_KEY) + len(".base")].removeprefix("model.")
            raise CheckpointMismatchError(f"ckpt_path={path}: {old_qlora_checkpoint_message(layer)}")
        diffs = state_dict_mismatches(saved, self.state_dict())
        if diffs:
            more = f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else ""
            raise CheckpointMismatchError(
                f"ckpt_path={path} was written by a model of another architecture: {diffs[0]}{more}; resume with "
                "the model settings that wrote it, or start afresh in another run folder (hydra.run.dir=...)"
            )
        self._check_resumed_adapter_dtype(checkpoint, path)
        self._check_resumed_groups(checkpoint, path)
        self._check_resumed_lr(checkpoint, path)
        self._check_resumed_optimizer_settings(checkpoint, path)
        self._check_resumed_lora_scale(checkpoint, path)

    def _check_resumed_adapter_dtype(self, checkpoint: dict[str, Any], path: Any) -> None:
        """A bf16-true LoRA checkpoint written while the adapters were cast to bfloat16 resumes: its adapters and
        AdamW moments load exactly into the float32 ones and train on in float32, from then on not the steps the
        run would have taken in bfloat16 (said so; an old run continued bit for bit needs the old code)."""
        own = dict(self.state_dict(keep_vars=True))
        half = [
            k
            for k, v in checkpoint.get("state_dict", {}).items()
            if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
            and isinstance(v, torch.Tensor)
            and v.dtype in (torch.float16, torch.bfloat16)
            and k in own
            and own[k].dtype == torch.float32
        ]
        if half:
            log.warning(
                "ckpt_path=%s holds %d LoRA adapter tensors in %s (%s, ...), written before adapters stayed float32 "
                "under trainer.precision=%s: they and their AdamW moments continue in float32 from the saved values",
                path,
                len(half),
                str(checkpoint["state_dict"][half[0]].dtype).removeprefix("torch."),
                half[0],
                self.trainer.precision if self._trainer is not None else "bf16-true",
            )

    def _check_resumed_groups(self, checkpoint: dict[str, Any], path: Any) -> None:
        """The saved optimizer state holds one group per trained part (`param_groups`): another set of trained parts
        (model.net.freeze.*, LoRA on or off, another experiment) cannot take it (torch: "loaded state dict has a
        different number of parameter groups")."""
        now = [(g["name"], len(g["params"])) for g in self.param_groups()]
        for state in checkpoint.get("optimizer_states", [])[:1]:
            saved = [
                (g.get("name", str(i)), len(g.get("params", [])))
                for i, g in enumerate(state.get("param_groups", []))
            ]
            if saved == now:
                continue
            if [n for n, _ in saved] == [n for n, _ in now]:
                name, was, count = next((n, a, b) for (n, a), (_, b) in zip(saved, now) if a != b)
                change = f"{name} held {was} tensors there, {count} now"
                if self._untied_head and name == "language_model" and count == was + 1:
                    change += (
                        "; the base ties lm_head to embed_tokens, which this version trains apart as the reference "
                        "does (a checkpoint that trained them as one tensor cannot continue)"
                    )
            else:
                change = f"it trained {_parts(saved)}, the settings now train {_parts(now)}"
            raise CheckpointMismatchError(
                f"ckpt_path={path} holds the optimizer state of other trained parameters: {change} (model.net.freeze"
                ", model.net.lora, the experiment): resume with the settings that wrote it, or start a new run from "
                "the weights (model.net.init_from=<run>/export, another run folder)"
            )

    # optimizer group keys that change how it runs, not what it computes: a resume may change them
    _RUNTIME_OPTIMIZER_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})

    def _check_resumed_optimizer_settings(self, checkpoint: dict[str, Any], path: Any) -> None:
        """The optimizer's other settings (model.optimizer.weight_decay, betas, eps, ...) are restored from the
        checkpoint as its learning rates are: a changed value would be ignored silently, so it is refused."""
        keywords = dict(getattr(self.optimizer, "keywords", {}))
        skip = {"params", "name", "lr", "initial_lr", *self._RUNTIME_OPTIMIZER_KEYS}
        wanted = {g["name"]: {**keywords, **g} for g in self.param_groups()}
        for state in checkpoint.get("optimizer_states", [])[:1]:
            for group in state.get("param_groups", []):
                now = wanted.get(group.get("name"))
                if now is None:
                    continue
                for key, was in group.items():
                    if key in skip or key not in now or _same_setting(was, now[key]):
                        continue
                    setting = "model.optimizer." + key
                    if key == "weight_decay" and group["name"].endswith("_no_decay"):
                        setting += " (0 on biases and norms)"
                    raise CheckpointMismatchError(
                        f"ckpt_path={path} trained {group['name']} with {key}={_plain(was)}, the settings now give "
                        f"{_plain(now[key])} ({setting}): a resume continues the saved optimizer, so the new value "
                        "would be ignored; resume with the old value, or start a new run from the weights "
                        "(model.net.init_from=<run>/export, another run folder)"
                    )

    # the batch sampler's saved settings (data.sampler.TokenBudgetBatchSampler.state_dict) and what sets them
    _DATA_ORDER = {
        "num_replicas": "{} data-parallel processes (trainer.devices x trainer.num_nodes)",
        "max_tokens": "data.batch_max_tokens={}",
        "seed": "data.seed={} (default: seed)",
        "num_samples": "{} training samples per epoch (data.train: its records and weights)",
        "num_batches": "{} batches per epoch (data.train, data.batch_max_tokens, data.pack)",
    }

    def _check_resumed_data(self, checkpoint: dict[str, Any], path: Any) -> None:
        """The data module resumes its batch order only under the settings that made it (the sampler refuses
        others, naming its own fields): refused here first, naming the setting and both values."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        sampler = getattr(dm, "train_sampler", None)
        saved = (checkpoint.get(type(dm).__qualname__) or {}).get("sampler") if dm is not None else None
        if not isinstance(saved, Mapping) or not callable(getattr(sampler, "state_dict", None)):
            return
        now = sampler.state_dict()
        for key, what in self._DATA_ORDER.items():
            if key in saved and key in now and saved[key] != now[key]:
                raise CheckpointMismatchError(
                    f"ckpt_path={path} was written with {what.format(saved[key])}, the settings now give "
                    f"{now[key]}: the run's batch order continues only under the settings that made it; resume with "
                    "those, or start a new run from the weights (model.net.init_from=<run>/export, another run folder)"
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
        if self._schedule:
            checkpoint["lr_schedule"] = dict(self._schedule)
        # a count over the whole run: a resumed run's first skip is not its first
        checkpoint["nonfinite_steps"] = int(self.nonfinite_steps)
        checkpoint["amp_skipped_steps"] = int(self.amp_skipped_steps)

    def on_train_start(self) -> None:
        """A resume under another LR schedule (model.scheduler.*; its max_steps follows trainer.max_steps unless
        set, so a run continued to more steps stretches its cosine) continues on the new one, a jump in the rate
        at the resumed step: said so, naming both values (a longer run is what the setting is for, not refused)."""
        saved, self._resumed_schedule = self._resumed_schedule, None
        if not saved or not self._schedule:
            return
        changed = {
            k: (saved[k], v)
            for k, v in self._schedule.items()
            if k in saved and not _same_setting(saved[k], v)
        }
        if not changed:
            return
        shown = ", ".join(f"model.scheduler.{k} {a:g} -> {b:g}" for k, (a, b) in changed.items())
        keep = " ".join(f"model.scheduler.{k}={a:g}" for k, (a, _) in changed.items())
        log.warning(
            "the learning-rate schedule differs from the checkpoint's (%s): from step %d the run follows the new "
            "one, so the rate changes there (model.scheduler.max_steps follows trainer.max_steps unless set); "
            "%s keeps the checkpoint's",
            shown,
            self.trainer.global_step,
            keep,
        )

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
        length = getattr(self.scheduler, "keywords", {}).get("max_steps", 0)
        ends = total_steps(self.trainer, self)  # optimizer steps, GRPO's several a batch counted
        if length < 0:  # training by epochs
            if ends is None:  # no max_steps, no max_epochs: the run ends by time
                raise ValueError(
                    "model.scheduler.max_steps=-1 takes the schedule's length from the trainer, which has no end "
                    "in steps (trainer.max_steps=-1, trainer.max_epochs=-1); set model.scheduler.max_steps"
                )
            extra["max_steps"] = ends
        elif (
            ends is not None
            and 0 < ends < length
            and (self.trainer.max_steps == -1 or ends < self.trainer.max_steps)  # the epochs end it first
            and self.trainer.is_global_zero
        ):
            log.warning(
                "the learning-rate schedule is %d steps long (model.scheduler.max_steps) but trainer.max_epochs=%s "
                "ends the run at step %d: the rate never decays as planned; model.scheduler.max_steps=-1 sizes the "
                "schedule by the epochs",
                length,
                self.trainer.max_epochs,
                ends,
            )
        scheduler = self.scheduler(optimizer, **extra)
        settings = {**getattr(self.scheduler, "keywords", {}), **extra}
        self._schedule = {
            k: v for k, v in settings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export(
        self, path: str | Path, processor: Any = None, max_shard_size: str = "5GB", overwrite: bool = False
    ) -> Path:
        """This module's model as a Hugging Face layout folder (`export_model`); the module is left untouched."""
        return export_model(self.model, path, processor, max_shard_size, overwrite)
