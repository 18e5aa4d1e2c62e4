"""Loggers that continue a resumed run's files (and W&B run) instead of starting them again.

Lightning's `CSVLogger` deletes `metrics.csv` when its folder already has files, so every `ckpt_path=last` resume
lost the rows of the steps before it. `ContinuedCSVLogger` keeps them: at its first write it drops only the old
rows at or after the first step the resumed run logs (steps a killed run logged after its last checkpoint, which
the resumed run trains and logs again), and writes the file whole through a temporary file, so a kill at any
moment leaves the old file or the new one.

`ContinuedWandbLogger` keeps the W&B run's id in the run folder (`wandb/run_id`), so a resumed run logs to the same
W&B run instead of opening a new one at every resume; a run that starts afresh forgets it (`start_afresh`, called by
`training.train` when there is no checkpoint to resume). Offline (train.py's default without an API key), a resumed
run whose steps the W&B run already holds (a killed run logged past its last checkpoint; a resume from an earlier
checkpoint) is named in a warning: W&B shows those steps twice. With `rewind=true` the W&B run is rewound to the
last row before them instead (`resume_from=<id>?_step=<n>`, found in `wandb/<id>.steps`), so W&B shows each step
once, as TensorBoard and metrics.csv do; off by default, because syncing a rewound part needs W&B's run rewinding
(a preview feature) and would fail on an account without it. It closes a W&B run an earlier logger of the process opened
before opening its own (the jobs of a Hydra multirun run in one process: Lightning's `WandbLogger` logged every job
into the first job's run), and in a multirun names its run after the job's swept overrides (`train #1
trainer.max_steps=2`).

`CheckedTensorBoardLogger` is Lightning's `TensorBoardLogger` that checks its folder when built (a folder it cannot
write was reported at the first write as "you tried to log -1 which is currently not supported", deep in Lightning),
and marks a continued run's first step as a restart, so TensorBoard drops the steps the earlier part logged after its
last checkpoint instead of drawing them twice.

A logger that cannot work (its package missing, its folder not writable) raises `LoggerError`, one line naming the
logger's config.

Example (configs/logger/csv.yaml):
    csv:
      _target_: musicflamingo.loggers.ContinuedCSVLogger
      save_dir: ${paths.output_dir}
      name: csv
      version: ""
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


class LoggerError(ValueError):
    """A configured logger cannot work here (its package is missing, its folder cannot be written)."""


def _check_folder(folder: str | os.PathLike, what: str, key: str) -> None:
    """Create `folder` and write a file in it (rank 0), or raise `LoggerError` naming the logger's config `key`."""
    if rank_zero_only.rank != 0:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise LoggerError(
            f"{key}: the {what} logger cannot write its folder {os.path.normpath(folder)}: {e.strerror or e}; "
            f"give it a writable {key}.save_dir, or leave it out (logger=csv)"
        ) from None


def _missing_package(package: str, what: str, key: str) -> LoggerError:
    return LoggerError(
        f"{key}: the {what} logger needs the `{package}` package, which is not installed: pip install {package}, "
        "or leave it out (logger=csv)"
    )


def _step(row: dict[str, Any], default: float) -> float:
    value = row.get("step")  # "3" read back from the file, 0 as Lightning logs it (falsy, yet a step)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class ContinuedExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing `metrics.csv` (see the module docstring)."""

    def _check_log_dir_exists(self) -> None:
        # instead of deleting metrics.csv: keep its rows until the first write decides which stay
        self._previous: list[dict[str, str]] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._previous is not None and self.metrics:
            first = min(_step(m, float("inf")) for m in self.metrics)  # a row without a step drops nothing
            kept = [r for r in self._previous if _step(r, -1.0) < first]  # nor is one dropped
            self._record_new_keys()
            tmp = f"{self.metrics_file_path}.tmp"
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
                writer.writerows(self.metrics)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.metrics_file_path)
            self._previous, self.metrics = None, []
            return
        super().save()


class ContinuedCSVLogger(CSVLogger):
    """`CSVLogger` whose `metrics.csv` survives a resume into the same folder; a folder it cannot write is refused
    when it is built (`LoggerError`)."""

    def __init__(self, save_dir: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, **kwargs)
        _check_folder(self.log_dir, "CSV", "logger.csv")

    @property
    @rank_zero_experiment  # other ranks get a dummy, as Lightning's
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class CheckedTensorBoardLogger(TensorBoardLogger):
    """Lightning's `TensorBoardLogger`, refusing when built (`LoggerError`) to run without the tensorboard package
    or with a folder it cannot write, instead of failing at its first write with a message about the value -1.

    A run continuing in a folder that holds an earlier part's event files (a resume; a fresh start after a run killed
    before its first checkpoint) marks its first logged step as a restart (the `SessionLog.START` event of
    `SummaryWriter(purge_step=...)`): TensorBoard drops the earlier part's events from that step on, the steps it
    logged after its last checkpoint, which this run logs again (they were drawn twice, the curve going back).
    """

    def __init__(self, save_dir: str | os.PathLike, **kwargs: Any) -> None:
        from lightning.fabric.loggers import tensorboard as tb

        if not (tb._TENSORBOARD_AVAILABLE or tb._TENSORBOARDX_AVAILABLE):
            raise _missing_package("tensorboard", "TensorBoard", "logger.tensorboard")
        super().__init__(save_dir=save_dir, **kwargs)
        _check_folder(self.log_dir, "TensorBoard", "logger.tensorboard")
        self._purge_at_first_step = rank_zero_only.rank == 0 and any(
            Path(self.log_dir).glob("events.out.tfevents.*")
        )
        self._in_hparams = False

    @rank_zero_only
    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        self._in_hparams = True  # its `hp_metric` at step 0 is not the run's first step
        try:
            super().log_hyperparams(*args, **kwargs)
        finally:
            self._in_hparams = False

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if self._purge_at_first_step and not self._in_hparams and step is not None:
            self._purge_at_first_step = False
            writer = self.experiment
            if type(writer).__module__.startswith("tensorboardX"):
                from tensorboardX.proto.event_pb2 import Event, SessionLog
            else:
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            start = Event(step=int(step), session_log=SessionLog(status=SessionLog.START))
            writer._get_file_writer().add_event(start)
        super().log_metrics(metrics, step)


def multirun_job_name(name: str | None) -> str | None:
    """`name` with the job's number and swept overrides in a Hydra multirun (`train #1 trainer.max_steps=2`): its
    jobs would all be named `train`. Unchanged outside a multirun."""
    from musicflamingo.cli import sweep_job

    job = sweep_job()
    if job is None:
        return name
    return " ".join(x for x in (name, f"#{job[0]}", *job[1]) if x)


def first_logged_step(ckpt_path: str | os.PathLike) -> int | None:
    """The `trainer/global_step` of the first row a run resumed from `ckpt_path` logs: Lightning's count of batches
    that made an optimizer step, as its training loop restores it (one more for a checkpoint saved at a training
    batch's end, which that count does not hold yet). A file a validation saved holds the step itself
    (`callbacks.FIRST_LOGGED_STEP`, written by `LogFinalStep`): whether the resume counts the saved batch again
    depends on whether it validates there again, which the file's counts do not tell (a file saved at step 6 by the
    validation every 3 steps resumes at 6, not 5); a file without it (older, or saved at a batch's end) is read by
    the rule. None for a file that cannot be read (the resume reports it)."""
    import torch

    from musicflamingo.callbacks import FIRST_LOGGED_STEP

    try:  # mmap: the tensors are not read
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        marked = state.get(FIRST_LOGGED_STEP)
        if isinstance(marked, int) and not isinstance(marked, bool) and marked >= 0:
            return marked
        loop = state["loops"]["fit_loop"]
        step = int(loop["epoch_loop.state_dict"]["_batches_that_stepped"])
        done = loop["epoch_loop.batch_progress"]["total"]
    except Exception:
        return None
    whole = done["started"] == done["ready"] and done["processed"] == done["started"]
    on_batch_end = whole and done["completed"] == done["processed"] - 1
    on_last = whole and done["completed"] == done["processed"]
    return step + 1 if on_batch_end or not on_last else step  # training_epoch_loop.reset's rule


class ContinuedWandbLogger(WandbLogger):
    """`WandbLogger` whose W&B run a resumed run continues (see the module docstring): the id of the run it opens
    is written to `<save_dir>/wandb/run_id` (rank 0), and read back by the next logger of the same folder unless
    `id` (or `version`) is given."""

    ID_FILE = "run_id"
    # the W&B run the last ContinuedWandbLogger of this process opened; finished when another opens its own
    _opened: ClassVar[Any] = None

    def __init__(
        self,
        save_dir: str | os.PathLike = ".",
        id: str | None = None,
        version: str | None = None,
        name: str | None = None,
        rewind: bool = False,
        **kwargs: Any,
    ) -> None:
        from lightning.pytorch.loggers import wandb as lw

        if not lw._WANDB_AVAILABLE:
            raise _missing_package("wandb", "W&B", "logger.wandb")
        _check_folder(Path(save_dir) / "wandb", "W&B", "logger.wandb")
        self._id_file = Path(save_dir) / "wandb" / self.ID_FILE
        self._id_from_file = False
        if id is None and version is None and self._id_file.is_file():
            id = self._id_file.read_text(encoding="utf-8").strip() or None
            self._id_from_file = id is not None
        super().__init__(save_dir=save_dir, id=id, version=version, name=multirun_job_name(name), **kwargs)
        self._id_saved = False
        self._rewind = bool(rewind)
        self._rows = 0  # rows this logger logged
        # W&B's `_step` once synced minus the offline run's own (a plain offline resume counts from 0 again)
        self._step_offset = 0
        # the first step a rewound run logs (checked at its first row)
        self._rewound_before: int | None = None

    def start_afresh(self) -> None:
        """A run with no checkpoint to resume opens a new W&B run, not the one an earlier run in the folder left
        (killed before its first checkpoint): its steps would be drawn over that run's."""
        if self._id_from_file and self._experiment is None:
            self._wandb_init["id"] = self._id = None
            self._id_from_file = False

    def continue_from(self, ckpt_path: str | os.PathLike) -> None:
        """This run resumes `ckpt_path` (called by `training.train` before the W&B run opens). Offline, when the
        folder's W&B run already holds rows of steps this run logs again (logged after the checkpoint by a killed
        run, or by the run an earlier checkpoint was resumed from), it is rewound to the last row before them
        (`wandb/<id>.steps` maps `trainer/global_step` to W&B's `_step`); otherwise, and online, W&B's resume
        continues it."""
        if not self._id_from_file or self._experiment is not None or rank_zero_only.rank != 0:
            return
        if not (self._offline or os.environ.get("WANDB_MODE") in ("offline", "dryrun")):
            return
        rows = self._read_steps()
        # a plain offline resume counts `_step` from 0 again; `wandb sync` appends it after the rows before
        self._step_offset = max((s for _, s in rows), default=-1) + 1
        step = first_logged_step(ckpt_path)
        again = sorted({g for g, _ in rows if step is not None and g >= step})
        kept = [s for g, s in rows if step is not None and g < step]
        if not again or not kept:  # nothing logged twice (or nothing before it to rewind to)
            return
        what = f"steps {again[0]}..{again[-1]}" if len(again) > 1 else f"step {again[0]}"
        if not self._rewind:
            log.warning(
                "logger.wandb: the W&B run %s holds rows of %s, which this run logs again from %s: W&B will show "
                "both (logger.wandb.rewind=true rewinds the run instead)",
                self._id,
                what,
                Path(ckpt_path).name,
            )
            return
        last = max(kept)
        self._wandb_init.pop("resume", None)  # exclusive with resume_from
        self._wandb_init["resume_from"] = f"{self._id}?_step={last}"
        self._write_steps([(g, s) for g, s in rows if s <= last])
        self._step_offset, self._rewound_before = 0, step
        log.warning(
            "logger.wandb: this run logs %s again from %s: the offline W&B run %s is rewound to before them "
            "(resume_from=%s?_step=%d), so W&B shows them once; `wandb sync` needs W&B's run rewinding for that "
            "(a preview feature): without it, sync this part as a run of its own (wandb sync --id <new id> "
            "<its offline-run folder>), or pass logger.wandb.rewind=false to keep both",
            what,
            Path(ckpt_path).name,
            self._id,
            self._id,
            last,
        )

    def _steps_file(self) -> Path | None:
        run_id = self._id if self._experiment is None else getattr(self._experiment, "id", None)
        return self._id_file.with_name(f"{run_id}.steps") if isinstance(run_id, str) and run_id else None

    def _read_steps(self) -> list[tuple[int, int]]:
        path = self._steps_file()
        rows = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines() if path else []
        except FileNotFoundError:
            lines = []
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):  # a kill mid-line cut the last one
                rows.append((int(parts[0]), int(parts[1])))
        return rows

    def _write_steps(self, rows: list[tuple[int, int]]) -> None:
        path = self._steps_file()
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{g} {s}\n" for g, s in rows), encoding="utf-8")
        os.replace(tmp, path)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if step is not None and self._rewound_before is not None:
            if int(step) != self._rewound_before:  # Lightning resumed its loops otherwise than foreseen
                log.warning(
                    "logger.wandb: the W&B run was rewound to before step %d, but this run logs from step %d: "
                    "the synced W&B history may miss or repeat the steps between",
                    self._rewound_before,
                    int(step),
                )
            self._rewound_before = None
        run = self.experiment
        # the `_step` this row gets: the client's count (`run.step` asks W&B's service, which may not have the
        # previous rows yet); without it, the run's first step and the rows logged here
        row = getattr(run, "_local_step", None)
        if not isinstance(row, int):
            row = int(getattr(run, "starting_step", 0) or 0) + self._rows
        row += self._step_offset
        super().log_metrics(metrics, step)
        self._rows += 1
        path = self._steps_file()
        if step is not None and path is not None:
            with open(path, "a", encoding="utf-8") as f:  # `trainer/global_step _step`, for a later rewind
                f.write(f"{int(step)} {row}\n")

    @property
    def experiment(self) -> Any:
        opening = self._experiment is None and rank_zero_only.rank == 0
        if opening:
            import wandb

            # Lightning would log into the run in progress: an earlier job's of this process (a multirun), whose
            # folder's run_id this run would also take; a run the user opened (wandb.init) is kept
            if wandb.run is not None and wandb.run is ContinuedWandbLogger._opened:
                wandb.run.finish()
            before = wandb.run
        experiment = WandbLogger.experiment.fget(self)  # a dummy on ranks > 0
        if opening and experiment is not before:
            ContinuedWandbLogger._opened = experiment
        run_id = getattr(experiment, "id", None)
        if not self._id_saved and rank_zero_only.rank == 0 and isinstance(run_id, str) and run_id:
            self._id_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._id_file.with_name(self.ID_FILE + ".tmp")
            tmp.write_text(run_id + "\n", encoding="utf-8")
            os.replace(tmp, self._id_file)
            self._id_saved = True
        return experiment
