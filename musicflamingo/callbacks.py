"""Lightning plugins and callbacks: crash-safe checkpoint files, the bad-sample report, and stopping on SIGINT /
SIGTERM with a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer

# atomic_torch_save lives in checkpoint.py (a writer needs no Lightning); imported here by its old name too
from musicflamingo.checkpoint import atomic_torch_save, replace_file
from musicflamingo.errors import RunStopped
from musicflamingo.runtime import stderr_is_terminal

log = logging.getLogger(__name__)


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
        except (
            pickle.UnpicklingError
        ) as e:  # pickled code or objects weights_only refuses: say which file and why
            raise ValueError(f"{path}: cannot load checkpoint safely (weights_only=True): {e}") from None
        except Exception as e:  # EOFError (empty), RuntimeError (not a zip), OSError (cut short): damaged
            reason = str(e).split(". ")[0].strip() or type(e).__name__
            raise ValueError(
                f"{path}: cannot load checkpoint: not a complete checkpoint file ({path.stat().st_size} bytes; "
                f"{reason}): cut short or damaged (a partial copy?); our own saves never leave one (they rename a "
                "finished file into place); resume from another checkpoint (ckpt_path=...) or move it away"
            ) from None

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


class BadSampleReport(Callback):
    """Write the skipped training samples (id, file:line, reason) to `path` and log their count."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._warned: tuple[int, int] | None = None  # the counts last warned about

    def _write(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        tracker = getattr(dm, "train_bad_samples", None)
        if tracker is None or not trainer.is_global_zero:
            return
        # rewritten at every checkpoint: a kill mid-write must leave the last report whole, not a torn one
        replace_file(self.path, tracker.write_jsonl)
        summary = {"bad": tracker.num_bad, "seen": tracker.num_seen, "fraction": tracker.bad_fraction}
        text = json.dumps(summary, indent=2) + "\n"
        replace_file(self.path.with_suffix(".summary.json"), lambda p: p.write_text(text, encoding="utf-8"))
        # once per count: the run's end follows the final step's checkpoint, which had said the same
        if tracker.num_bad and self._warned != (tracker.num_bad, tracker.num_seen):
            self._warned = (tracker.num_bad, tracker.num_seen)
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


class KeepCutEpochOpen(Callback):
    """A checkpoint written after training stopped inside an epoch (``trainer.max_steps``, ``max_time``, an early
    stop), e.g. ``last.ckpt`` at ``on_train_end`` (:class:`SaveLastAtTrainEnd`), records that epoch as still open.

    Lightning closes the epoch when the run stops, so continuing from such a file (a larger ``trainer.max_steps``)
    would start the next epoch while the data module, which counts its batches itself, resumes inside the old one:
    the rest of that epoch was skipped. With the epoch open, Lightning resumes it after its last trained batch, the
    batches an uninterrupted run trains next.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit = checkpoint.get("loops", {}).get("fit_loop")
        if not fit or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
            return
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        closed = epochs["total"]["processed"] == epochs["total"]["started"] >= 1
        trained = batches["current"]["completed"]
        cut = not batches.get("is_last_batch") and 0 < trained < trainer.num_training_batches
        if not (closed and cut):
            return
        for which in ("total", "current"):  # processed and completed back to before this epoch's end
            epochs[which]["processed"] = epochs[which]["started"] - 1
            epochs[which]["completed"] = epochs[which]["processed"]
        checkpoint["epoch"] = epochs["current"]["completed"]


class SaveLastAtTrainEnd(Callback):
    """``last.ckpt`` at the final step when training ends between periodic saves (``trainer.max_steps``,
    ``max_time``, an early stop): Lightning's :class:`ModelCheckpoint` saves it at the end only when it saved
    nothing during the run, so a run ending at step 6 with saves every 4 steps would leave ``last.ckpt`` at step 4.

    Acts only where Lightning does not (something was saved during the run) and the last save is of an earlier
    step; the file is written through the trainer (atomic with :class:`AtomicCheckpointIO`), on every rank.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint) or not cb.save_last or not cb._last_checkpoint_saved:
                continue
            # the final step already saved (a periodic save), fast_dev_run, not fitting
            if cb._should_skip_saving_checkpoint(trainer):
                continue
            mode, cb.save_last = cb.save_last, True  # "link" would point at the older periodic file
            try:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            finally:
                cb.save_last = mode


class OwnLastCheckpoint(Callback):
    """A resumed run's ``ModelCheckpoint`` takes the folder's ``last.ckpt`` as its own, so it overwrites it.

    Lightning knows its ``last.ckpt`` from the checkpoint's callback state, which a periodic file saved before the
    first ``last.ckpt`` write lacks (``step_000002.ckpt`` of a run saving every 2 steps): a run resumed from it wrote
    ``last-v1.ckpt`` beside the abandoned run's ``last.ckpt``, and the next ``ckpt_path=last`` (the default)
    resumed the abandoned run. The run folder is this run's (its lock is held, and a fresh start in a folder with
    checkpoints is refused), so its ``last.ckpt`` is always this run's latest.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                last = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                # a sharded FSDP checkpoint is a folder, complete once Lightning's meta.pt (written last) is there
                if last.is_file() or last.is_symlink() or (last / "meta.pt").is_file():
                    cb.last_model_path = str(last)


# the checkpoint key of the first `trainer/global_step` a run resumed from the file logs (see LogFinalStep)
FIRST_LOGGED_STEP = "first_logged_step"


class LogFinalStep(Callback):
    """The run's last training step goes to the loggers (metrics.csv, TensorBoard, W&B) whatever
    ``trainer.log_every_n_steps`` is: Lightning writes a step's row only when the step's number is a multiple of it,
    so a 4-step run at the default 10 wrote no metrics.csv at all, and a 25-step run's last row was step 20's (the
    loss the exported model ended with was in no log).

    At the last batch (``trainer.max_steps`` reached, or the last epoch's last batch) the logging interval is 1 until
    that row is written (Lightning reads it after ``on_train_batch_end``); it is put back before anything else logs.
    ``log_every_n_steps=0`` (no logging) is left alone.

    The last step is also validated (when the run validates at all: ``data.val``, and the epoch is one
    ``trainer.check_val_every_n_epoch`` validates in): Lightning validates only at multiples of
    ``trainer.val_check_interval`` (or at an epoch's end), so ``max_steps=5`` with validation every 3 steps ended
    with step 3's ``val/loss``, a run shorter than the interval never validated, and a checkpoint kept by
    ``monitor=val/loss`` never ranked the model the run ended with. ``trainer.should_stop`` is set at that batch,
    as ``trainer.max_time`` does: Lightning then validates it, and saves after that validation.

    A run an early stop ends (``EarlyStopping``, after a validation) gets its last step's row too: Lightning decides
    on the row before the validation that stops the run, so the step was in no log when it was not a multiple of
    ``log_every_n_steps``. The step's values are kept when its validation starts (their row unwritten), and written
    at the training's end when the run stopped there.
    """

    def __init__(self) -> None:
        self._every: int | None = None
        # (step, epoch, values) of the step being validated, when Lightning did not write its row
        self._unwritten: tuple[int, int, dict[str, Any]] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._unwritten = None  # training went on: the step before was not the last

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _trains_no_further(trainer, batch_idx):
            return
        trainer.should_stop = True
        every = trainer.log_every_n_steps
        if self._every is None and every and every > 1:
            self._every, trainer.log_every_n_steps = every, 1

    def _restore(self, trainer: L.Trainer) -> None:
        if self._every is not None:
            trainer.log_every_n_steps, self._every = self._every, None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A checkpoint saved by the validation of a stopped run's last step (this callback's, or
        ``trainer.max_time``'s), at a batch that is no validation step of ``trainer.val_check_interval``, counts that
        step among the logged ones: Lightning adds it only after the validation, and a resumed run re-counts it only
        where it validates that batch again, so a run cut at step 5 (validation every 3) and continued logged every
        later row one step too early (step 6's loss in the row of step 5, whose own rows were dropped); at an epoch's
        last batch too (4 batches an epoch, validation every 3, cut at step 8: step 9's loss in the row of step 8).

        Every checkpoint a validation of the fit saves records the first step a run resumed from it logs
        (``checkpoint[FIRST_LOGGED_STEP]``, read by ``loggers.first_logged_step`` to rewind W&B): the file's count,
        one more where the resume passes back through the end of the saved batch (it validates there again, by the
        interval or at the epoch's end, and counts the batch instead). The count alone does not tell: the file
        ``step_000006.ckpt`` of a run validating every 3 steps holds the count 5 and resumes logging at step 6, where
        one saved by a stopped run's last validation at step 5 holds 5 (raised above) and resumes at 5."""
        loop = trainer.fit_loop.epoch_loop
        state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
        if not (trainer.validating and trainer.state.fn == "fit") or state is None:
            return
        if getattr(trainer, "_val_check_time_interval", None) is not None:
            return  # validation by time: whether a resume validates again is not known here
        stopped = trainer.should_stop
        trainer.should_stop = False  # would the resume validate this batch again (Lightning's interval)?
        try:
            again = loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        finally:
            trainer.should_stop = stopped
        accumulating = loop._should_accumulate()
        if stopped and not again and not accumulating:
            state["_batches_that_stepped"] = loop._batches_that_stepped + 1
        # the resume's pass through the saved batch counts it where it validates there (and the step is whole)
        checkpoint[FIRST_LOGGED_STEP] = int(state["_batches_that_stepped"]) + int(again and not accumulating)

    # the hooks that can come first after the row is written
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        written = self._every is not None or trainer.should_stop
        self._restore(trainer)
        self._unwritten = None
        if trainer.sanity_checking or not trainer.loggers or not trainer.log_every_n_steps:
            return
        loop = trainer.fit_loop.epoch_loop
        step = loop._batches_that_stepped  # the row's step: counted after this validation
        if written or (step + 1) % trainer.log_every_n_steps == 0 or loop._should_accumulate():
            return
        results = loop._results
        values = {k: v.detach().clone() for k, v in results.metrics(True)["log"].items()}
        self._unwritten = (step, trainer.current_epoch, values)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)
        unwritten, self._unwritten = self._unwritten, None
        if unwritten is None or not trainer.should_stop:
            return
        step, epoch, values = unwritten
        trainer._logger_connector.log_metrics({**values, "epoch": epoch}, step=step)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer)


def _trains_no_further(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch just trained is the run's last: its optimizer step reached ``trainer.max_steps``, or it ends
    the last epoch (``trainer.max_epochs``)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.current_epoch + 1 < trainer.max_epochs:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches


def _rng_states() -> dict[str, Any]:
    """This process's torch (CPU, CUDA), numpy and python RNG states, as types `torch.load(weights_only=True)`
    reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(py_state), py_gauss],
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, py_state, py_gauss = states["python"]
    random.setstate((int(version), tuple(py_state), py_gauss))


class RngStateCheckpoint(Callback):
    """The RNG states of every rank (torch CPU / CUDA, numpy, python) in the checkpoint, restored on resume, so a
    resumed run draws the dropout masks an uninterrupted one draws.

    They are restored at ``on_train_start``. Between the save and the next training step an uninterrupted run makes
    DataLoader iterators (the next epoch's, a validation's) where a resumed run makes others; the data module's
    loaders take their seeds from their own generators (:class:`~musicflamingo.data.datamodule.SeededDataLoader`),
    so none of these draws from the global stream.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self._gather(_rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaded, self._loaded = self._loaded, None
        if not loaded:
            return
        ranks = loaded.get("ranks") or []
        if len(ranks) != trainer.world_size:
            log.warning(
                "the checkpoint holds the RNG states of %d ranks, this run has %d: random draws (dropout) continue "
                "from the seed, not from the checkpoint",
                len(ranks),
                trainer.world_size,
            )
            return
        _set_rng_states(ranks[trainer.global_rank])

    @staticmethod
    def _gather(states: dict[str, Any]) -> list[dict[str, Any]]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [states]
        out: list[Any] = [None] * torch.distributed.get_world_size()
        # every rank dumps the checkpoint's contents together; rank 0 writes them
        torch.distributed.all_gather_object(out, states)
        return out


class TrainingInterrupted(RunStopped):
    """SIGINT (Ctrl-C) or SIGTERM stopped training; `exit_code` is 128 + the signal's number (130, 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


class StopOnSignal(Callback):
    """SIGINT and SIGTERM stop training at the next optimizer-step boundary: a checkpoint goes to `path` (the run
    folder's `checkpoints/last.ckpt`, which `ckpt_path=last` resumes exactly), then :class:`TrainingInterrupted`
    ends the run (exit 130 / 143, so `train.py && eval.py` stops there).

    :meth:`install` takes both signals for the whole run and :meth:`restore` gives them back. Outside the training
    steps (model build, data setup, export) a signal stops at once: nothing needs saving. During the steps it only
    sets a flag, checked after every batch; a second signal stops at once (without a checkpoint if none was saved
    yet). Lightning's own SIGTERM handler (a flag that ends `fit` quietly with status 0 and no checkpoint, even from
    inside validation) is replaced at `on_train_start`, after Lightning installed it. Under DDP the ranks agree on
    the step to stop at (any rank's signal counts), so every rank saves the same step.

    The checkpoint is saved in `on_train_batch_end`, where Lightning's own step checkpoints are (a resume continues
    after that batch), but the run ends at the next hook: Lightning logs the step's metrics after
    `on_train_batch_end`, so the loggers (metrics.csv) get the row of the step the checkpoint holds. Validation due
    at that step does not run (a resumed run skips it too, as after Lightning's step checkpoints).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.signum: int | None = None
        self.phase = "setup"  # setup -> steps -> (stopping: saved, ending at the next hook) -> done
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1
        self._stop: TrainingInterrupted | None = None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM from now on (signals can only be handled in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give both signals back to the handlers they had before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.phase == "steps" and self.signum is None:
            self.signum = signum
            log.warning(
                "%s: stopping after this training step, with a checkpoint; send it again to stop now", name
            )
            return
        if self.phase == "stopping" and self._stop is not None:
            raise self._stop  # saved already: the same stop, a hook earlier
        if self.phase == "steps":
            where = "during training (sent twice): no checkpoint at the stop"
        elif self.phase == "setup":
            where = "before the first training step: nothing to save"
        else:
            where = "after training (the export, if any, is incomplete)"
        raise TrainingInterrupted(f"stopped by {name} {where}; {self._rerun()}", signum)

    def _rerun(self) -> str:
        # the default run folder is a new time-stamped one per command: "the same command" would start afresh
        return f"to resume, rerun with hydra.run.dir={self.path.parent.parent} (ckpt_path=last, the default)"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # Lightning registered its SIGTERM handler just before this hook: ours replaces it
        self.phase = "steps"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_saved()
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        requested = self.signum is not None
        if trainer.world_size > 1:  # the same decision on every rank, at the same batch
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        # Mid-accumulation (no optimizer step in this batch) the summed gradients would be lost: wait for the step.
        if requested and trainer.global_step != self._step_at_batch_start:
            self._save(trainer)

    # the hooks that can come first after the stop step's metrics are logged
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal after the last step's end: the run is complete, but it was asked to stop; say so (exit 130 / 143).
        if self.signum is not None and self._stop is None:
            self._save(trainer)
        self._stop_if_saved()
        self.phase = "done"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.phase = "done"

    def _save(self, trainer: L.Trainer) -> None:
        signum = self.signum or signal.SIGTERM  # another rank's signal
        for cb in trainer.checkpoint_callbacks:
            # A ModelCheckpoint keeping `last.ckpt` in the same place must own this file (its state is saved in
            # it): a resumed run then overwrites it, instead of writing `last-v1.ckpt` beside a stale `last.ckpt`.
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                last = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                if last.resolve() == self.path.resolve():
                    cb.last_model_path = str(last)
        # a full checkpoint (weights_only=False, as Lightning's own; unset, Lightning logs a line saying so); a second
        # signal while saving stops at once (the old file stays)
        trainer.save_checkpoint(self.path, weights_only=False)
        self._stop = TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}: saved {self.path}; "
            f"{self._rerun()}",
            signum,
        )
        self.phase = "stopping"

    def _stop_if_saved(self) -> None:
        if self._stop is not None:
            self.phase = "done"
            raise self._stop


class ProgressLog(Callback):
    """One log line every `every_n_steps` optimizer steps, and one at the last step: step / total, loss (and GRPO's
    mean reward), tokens/s, elapsed and ETA; and one after each validation with its `val/` metrics.

    A progress bar redrawn with carriage returns reads as noise in a file or a pipe (and Lightning prints nothing
    else between the model summary and the end of training), so when stderr is not a terminal the bar is off
    (`training.build_trainer`) and these lines say how the run goes. On a terminal they are logged only when
    `on_terminal` is true (the bar already shows the same numbers).
    """

    def __init__(self, every_n_steps: int = 50, on_terminal: bool = False) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"ProgressLog.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.on_terminal = bool(on_terminal)
        self._t0: float | None = None
        self._tokens = 0.0
        self._start_step = 0
        self._last_step = -1
        self._total: int | None = None
        self._early_stops: list[str | None] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and (self.on_terminal or not stderr_is_terminal())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._tokens, self._start_step = time.perf_counter(), 0.0, trainer.global_step
        from musicflamingo.lit import total_steps  # lit lies below callbacks (docs/architecture.md)

        self._total = total_steps(trainer, pl_module)
        # an early stop a resumed checkpoint recorded is not this run's
        self._early_stops = [
            getattr(cb, "stopping_reason_message", None)
            for cb in getattr(trainer, "early_stopping_callbacks", [])
        ]
        if self._active(trainer):
            log.info("training from step %d to %s", trainer.global_step, self._total or "the end")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict) and "attention_mask" in batch:
            self._tokens += float(batch["attention_mask"].sum())
        # a line when the step passes a multiple of every_n_steps (GRPO's batches make updates_per_batch steps
        # each); none while no optimizer step was made (batches accumulating gradients, the resumed step)
        n, last = self.every_n_steps, max(self._last_step, self._start_step)
        if trainer.global_step // n > last // n:
            self._line(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A line with the validation's metrics (`val/loss`; GRPO's `val/reward`, `val/reward/<name>`): with the
        bar off nothing showed them, so a piped run's log never said how validation went (metrics.csv alone)."""
        if trainer.sanity_checking or not self._active(trainer):
            return
        values = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and torch.is_tensor(v) and v.numel() == 1
        }
        if values:
            shown = " | ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
            log.info("validation at step %d: %s", trainer.global_step, shown)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the final step, when it was not a multiple of every_n_steps (a 30-step run logged no line at all)
        if trainer.global_step not in (self._last_step, self._start_step):
            self._line(trainer)
        if trainer.is_global_zero:
            _say_why_stopped_early(trainer, self._early_stops, self._total)

    def _line(self, trainer: L.Trainer) -> None:
        if not self._active(trainer):
            return
        step = self._last_step = trainer.global_step
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        done = max(step - self._start_step, 1)
        total = self._total
        eta = (total - step) * elapsed / done if total else None
        timers = [c for c in trainer.callbacks if isinstance(c, Timer)]  # `trainer.max_time` lives in a Timer
        limit = timers[0].time_remaining() if timers else None
        if limit is not None and (eta is None or limit < eta):
            eta = max(limit, 0.0)  # the time budget ends the run first
        loss = trainer.callback_metrics.get("train/loss")
        # GRPO: the on-policy loss is ~0 whatever the policy does; the mean reward is what says how the run goes
        reward = trainer.callback_metrics.get("train/reward")
        log.info(
            "step %d%s | loss %s%s | %.0f tokens/s | elapsed %s | ETA %s",
            step,
            f"/{total}" if total else "",
            f"{float(loss):.4f}" if loss is not None else "n/a",
            f" | reward {float(reward):.3f}" if reward is not None else "",
            self._tokens / max(elapsed, 1e-9),
            _clock(elapsed),
            _clock(eta) if eta is not None else "n/a",
        )


def _say_why_stopped_early(trainer: L.Trainer, at_start: list[str | None], total: int | None) -> None:
    """Log why an `EarlyStopping` callback ended the run before its last step (`total`, see
    :func:`musicflamingo.lit.total_steps`): Lightning says nothing unless its `verbose=true`, so a 30-step run ended at step 4 with no line telling why (or
    that it was not a crash). `at_start`: each callback's message when training started (a resumed checkpoint's;
    each stop makes a new one)."""
    if not getattr(trainer, "should_stop", False) or (total is not None and trainer.global_step >= total):
        return
    for i, cb in enumerate(getattr(trainer, "early_stopping_callbacks", [])):
        reason = getattr(cb, "stopping_reason_message", None)
        if reason and (i >= len(at_start) or reason is not at_start[i]):
            log.info(
                "training stopped early at step %d%s by %s: %s",
                trainer.global_step,
                f" of {total}" if total else "",
                type(cb).__name__,
                reason,
            )


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
