"""Loggers that continue a resumed run's files (and W&B run) instead of starting them again.

Lightning's `CSVLogger` deletes `metrics.csv` when its folder already has files, so every `ckpt_path=last` resume
lost the rows of the steps before it. `ContinuedCSVLogger` keeps them: at its first write it drops only the old
rows at or after the first step the resumed run logs (steps a killed run logged after its last checkpoint, which
the resumed run trains and logs again), and writes the file whole through a temporary file, so a kill at any
moment leaves the old file or the new one.

`ContinuedWandbLogger` keeps the W&B run's id in the run folder (`wandb/run_id`), so a resumed run logs to the same
W&B run instead of opening a new one at every resume; a run that starts afresh forgets it (`start_afresh`, called by
`training.train` when there is no checkpoint to resume).

Example (configs/logger/csv.yaml):
    csv:
      _target_: musicflamingo.loggers.ContinuedCSVLogger
      save_dir: ${paths.output_dir}
      name: csv
      version: ""
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
    """`CSVLogger` whose `metrics.csv` survives a resume into the same folder."""

    @property
    @rank_zero_experiment  # other ranks get a dummy, as Lightning's
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class ContinuedWandbLogger(WandbLogger):
    """`WandbLogger` whose W&B run a resumed run continues (see the module docstring): the id of the run it opens
    is written to `<save_dir>/wandb/run_id` (rank 0), and read back by the next logger of the same folder unless
    `id` (or `version`) is given."""

    ID_FILE = "run_id"

    def __init__(
        self,
        save_dir: str | os.PathLike = ".",
        id: str | None = None,
        version: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._id_file = Path(save_dir) / "wandb" / self.ID_FILE
        self._id_from_file = False
        if id is None and version is None and self._id_file.is_file():
            id = self._id_file.read_text(encoding="utf-8").strip() or None
            self._id_from_file = id is not None
        super().__init__(save_dir=save_dir, id=id, version=version, **kwargs)
        self._id_saved = False

    def start_afresh(self) -> None:
        """A run with no checkpoint to resume opens a new W&B run, not the one an earlier run in the folder left
        (killed before its first checkpoint): its steps would be drawn over that run's."""
        if self._id_from_file and self._experiment is None:
            self._wandb_init["id"] = self._id = None
            self._id_from_file = False

    @property
    def experiment(self) -> Any:
        experiment = WandbLogger.experiment.fget(self)  # a dummy on ranks > 0
        run_id = getattr(experiment, "id", None)
        if not self._id_saved and rank_zero_only.rank == 0 and isinstance(run_id, str) and run_id:
            self._id_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._id_file.with_name(self.ID_FILE + ".tmp")
            tmp.write_text(run_id + "\n", encoding="utf-8")
            os.replace(tmp, self._id_file)
            self._id_saved = True
        return experiment
