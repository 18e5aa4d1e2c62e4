"""The LightningModule: training/validation steps, optimizer groups, warmup + cosine, freezing and LoRA switches.

Everything model-specific lives in plain torch (`musicflamingo.model`); this file only wires it to Lightning.
Metric keys: `train/loss`, `val/loss`, `train/tokens_per_s`, `train/grad_norm`, `lr/<group>`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.model.lora import apply_lora, merge_lora

log = logging.getLogger(__name__)

GROUPS = ("audio_tower", "multi_modal_projector", "language_model")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


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
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    pos = model.audio_tower.embed_positions.weight  # Whisper's sinusoids, as the original encoder starts from
    n, d = pos.shape
    inv = torch.exp(-math.log(10000.0) * torch.arange(d // 2, dtype=torch.float32) / max(d // 2 - 1, 1))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    with torch.no_grad():
        pos.copy_(torch.cat([angles.sin(), angles.cos()], dim=1).to(pos.dtype))


def build_model(
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    init_from: str | Path | None = None,
    seed: int = 0,
) -> MusicFlamingo:
    """A pretrained folder (`init_from`) or a from-scratch preset with overrides (`audio={...}`, `text={...}`)."""
    if init_from:
        return MusicFlamingo.from_pretrained(init_from, dtype=torch.float32)
    if not preset:
        raise ValueError("model: set either `init_from` (a checkpoint folder) or `preset` (tiny, small, ...)")
    config = MusicFlamingoConfig.from_name(preset, **_plain(overrides or {}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MusicFlamingo(config)
        init_weights(model)
    return model


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (no DictConfig below the entry points)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1, then cosine to `min_lr_ratio` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MusicFlamingoLit(L.LightningModule):
    """Args (all plain values, as Hydra passes them):
    net: {preset, overrides, init_from, seed, gradient_checkpointing, rote_quirk}
    optim: {lr, audio_tower_lr, projector_lr, language_model_lr, weight_decay, betas, eps, warmup_steps,
            max_steps, min_lr_ratio}
    freeze: {audio_tower, multi_modal_projector, language_model}: True freezes that part
    lora: {enabled, rank, alpha, dropout, targets}: adapters on the language model (base weights frozen)
    nonfinite_loss: "stop" (raise, keep the last checkpoint) or "skip" (skip the step, count it)
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        freeze: Mapping[str, bool] | None = None,
        lora: Mapping[str, Any] | None = None,
        nonfinite_loss: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model_cfg = dict(_plain(net or {}))
        self.optim_cfg = dict(_plain(optim or {}))
        self.freeze_cfg = dict(_plain(freeze or {}))
        self.lora_cfg = dict(_plain(lora or {}))
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        self.nonfinite_loss = nonfinite_loss
        unknown = set(self.freeze_cfg) - set(GROUPS)
        if unknown:
            raise ValueError(f"freeze: unknown module(s) {sorted(unknown)}; expected some of {list(GROUPS)}")

        self.model = build_model(
            model_cfg.get("preset"),
            model_cfg.get("overrides"),
            model_cfg.get("init_from"),
            model_cfg.get("seed", 0),
        )
        self.model.rote_quirk = bool(model_cfg.get("rote_quirk", True))
        if model_cfg.get("gradient_checkpointing"):
            self.model.set_gradient_checkpointing(True)
        for group in GROUPS:
            if self.freeze_cfg.get(group, False):
                getattr(self.model, group).requires_grad_(False)
                if group == "language_model":  # the output head belongs to the language model
                    self.model.lm_head.requires_grad_(False)
        if self.lora_cfg.get("enabled", False):
            self.model.language_model.requires_grad_(False)
            self.model.lm_head.requires_grad_(False)
            names = apply_lora(
                self.model.language_model,
                rank=int(self.lora_cfg.get("rank", 8)),
                alpha=float(self.lora_cfg.get("alpha", 16.0)),
                dropout=float(self.lora_cfg.get("dropout", 0.0)),
                targets=tuple(self.lora_cfg.get("targets") or ("q_proj", "k_proj", "v_proj", "o_proj")),
            )
            log.info("LoRA on %d linears of the language model", len(names))
        if model_cfg.get("compile"):
            self.model.compile_layers()
        self.model.audio_tower.embed_positions.requires_grad_(False)  # frozen, as in the reference
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if n_train == 0:
            raise ValueError("every parameter is frozen: check `freeze` and `lora` in the config")
        self.nonfinite_steps = 0
        self._t0: float | None = None

    # ------------------------------------------------------------------ steps
    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("input_ids", "attention_mask", "input_features", "input_features_mask", "labels")
        return {k: batch[k] for k in keys if batch.get(k) is not None}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["input_ids"].shape[0] == 0:  # every sample of the batch was skipped as bad: nothing to learn
            return None
        out = self.model(**self._model_inputs(batch), return_logits=False)
        loss = out.loss
        if not torch.isfinite(loss):
            self.nonfinite_steps += 1
            where = f"global step {self.global_step}, batch ids {list(batch.get('ids', []))[:8]}"
            if self.nonfinite_loss == "skip":
                log.warning(
                    "non-finite loss %s at %s: step skipped (%d so far)",
                    loss.item(),
                    where,
                    self.nonfinite_steps,
                )
                self.log("train/nonfinite_steps", float(self.nonfinite_steps))
                return None
            raise NonFiniteLossError(
                f"loss is {loss.item()} at {where}; stopping. The last good checkpoint is kept; set "
                "`model.nonfinite_loss=skip` to skip such steps instead"
            )
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/label_tokens", float(out.num_label_tokens), batch_size=bs, reduce_fx="sum")
        return loss

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
        norms = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["input_ids"].shape[0] == 0:  # all samples skipped as bad
            return None
        out = self.model(**self._model_inputs(batch), return_logits=False)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    # ------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups per part (own LR each), split into decay / no-decay (biases, norms, embeddings of pos)."""
        o = self.optim_cfg
        base_lr = float(o.get("lr", 1e-4))
        lrs = {
            "audio_tower": float(o.get("audio_tower_lr") or base_lr),
            "multi_modal_projector": float(o.get("projector_lr") or base_lr),
            "language_model": float(o.get("language_model_lr") or base_lr),
        }
        wd = float(o.get("weight_decay", 0.0))
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
            out.append(
                {
                    "name": f"{part}{'_no_decay' if no_decay else ''}",
                    "params": params,
                    "lr": lrs[part],
                    "weight_decay": 0.0 if no_decay else wd,
                }
            )
        return out

    def configure_optimizers(self) -> Any:
        o = self.optim_cfg
        opt = torch.optim.AdamW(
            self.param_groups(),
            betas=tuple(o.get("betas", (0.9, 0.95))),
            eps=float(o.get("eps", 1e-8)),
            foreach=True,
        )
        max_steps = int(o.get("max_steps") or (self.trainer.max_steps if self.trainer else 0) or 1000)
        if max_steps < 0 and self.trainer is not None:
            max_steps = int(self.trainer.estimated_stepping_batches)
        warmup = int(o.get("warmup_steps", 0))
        min_ratio = float(o.get("min_lr_ratio", 0.1))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup, max_steps, min_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path, processor: Any = None, max_shard_size: str = "5GB") -> Path:
        """Write a Hugging Face layout folder (LoRA merged into a copy; this module is left untouched)."""
        import copy

        model = copy.deepcopy(self.model).float() if self.lora_cfg.get("enabled") else self.model
        if self.lora_cfg.get("enabled"):
            merge_lora(model)
        path = Path(path)
        model.save_pretrained(path, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(path)
        return path
