"""`train(cfg)`: compose the objects a Hydra config describes and fit. `train.py` is a thin wrapper around it.

The run folder (`paths.output_dir`) holds everything of one run, for every rank: `.hydra/` (resolved config),
`checkpoints/` (`last.ckpt` + periodic), `csv/` or other logger output, `bad_samples.jsonl`, and `export/`
(Hugging Face layout, LoRA merged) when training ends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from musicflamingo.callbacks import AtomicCheckpointIO
from musicflamingo.runtime import set_threads

log = logging.getLogger(__name__)


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`"last"`: the run folder's last.ckpt if it exists (fresh start otherwise); a path must exist."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(ckpt_path)


def check_window_length(processor: Any, model: Any) -> None:
    window = model.config.window_seconds
    chunk = getattr(processor, "chunk_length", window)
    if abs(float(chunk) - window) > 1e-6:
        raise ValueError(
            f"processor chunk_length={chunk} s does not match the model's window of {window} s "
            f"(audio.max_source_positions={model.config.audio.max_source_positions}); set them consistently"
        )


def build_datamodule(cfg: DictConfig, model: Any) -> tuple[L.LightningDataModule, Any]:
    """(datamodule, processor) of `cfg.data`, the processor checked against the model's window and vocabulary."""
    processor_dir = cfg.data.get("processor")
    if not processor_dir:
        raise ValueError(
            "data.processor: set a folder with the tokenizer/processor files (or model.net.init_from)"
        )
    from musicflamingo.processor import MusicFlamingoProcessor

    processor = MusicFlamingoProcessor.from_pretrained(processor_dir)
    check_window_length(processor, model)
    vocab = model.config.text.vocab_size
    if processor.tokenizer.vocab_size > vocab:
        raise ValueError(
            f"tokenizer in {processor_dir} has {processor.tokenizer.vocab_size} ids, model vocab is {vocab}"
        )
    return hydra.utils.instantiate(cfg.data, processor=processor), processor


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The `cfg.trainer` Trainer with the `cfg.callbacks` and `cfg.logger` objects and atomic checkpoint files."""
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = _instantiate_dict(cfg.get("logger"))
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model described by `cfg`; returns (metrics, objects) so tests can inspect both."""
    set_threads(cfg.get("threads"))
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    log.info("instantiating model <%s> with net <%s>", cfg.model._target_, cfg.model.net._target_)
    lit: L.LightningModule = hydra.utils.instantiate(cfg.model)
    datamodule, processor = build_datamodule(cfg, lit.model)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt)

    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    objects: dict[str, Any] = {
        "trainer": trainer,
        "model": lit,
        "datamodule": datamodule,
        "processor": processor,
    }
    if cfg.get("export") and trainer.is_global_zero:
        export_dir = lit.export(output_dir / "export", processor=processor)
        log.info("exported to %s", export_dir)
        objects["export_dir"] = export_dir
    return metrics, objects
