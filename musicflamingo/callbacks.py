"""Lightning plugins and callbacks: crash-safe checkpoint files and the bad-sample report."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A kill at any moment leaves either the previous file or the new one, never a half-written checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO: atomic writes, and reads with `weights_only=True` (no arbitrary pickle code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends: say which file and why
            raise ValueError(f"{path}: cannot load checkpoint safely (weights_only=True): {e}") from None

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


class BadSampleReport(Callback):
    """Write the skipped training samples (id, file:line, reason) to `path` and log their count."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _write(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        tracker = getattr(dm, "train_bad_samples", None)
        if tracker is None or not trainer.is_global_zero:
            return
        tracker.write_jsonl(self.path)
        summary = {"bad": tracker.num_bad, "seen": tracker.num_seen, "fraction": tracker.bad_fraction}
        self.path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if tracker.num_bad:
            log.warning(
                "skipped %d of %d training samples; see %s", tracker.num_bad, tracker.num_seen, self.path
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        tracker = getattr(trainer.datamodule, "train_bad_samples", None)
        if tracker is not None:
            pl_module.log("train/bad_samples", float(tracker.num_bad), batch_size=1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._write(trainer)
