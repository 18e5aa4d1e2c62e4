"""Loggers that continue a resumed run's files instead of starting them again.

Lightning's `CSVLogger` deletes `metrics.csv` when its folder already has files, so every `ckpt_path=last` resume
lost the rows of the steps before it. `ContinuedCSVLogger` keeps them: at its first write it drops only the old
rows at or after the first step the resumed run logs (steps a killed run logged after its last checkpoint, which
the resumed run trains and logs again), and writes the file whole through a temporary file, so a kill at any
moment leaves the old file or the new one.

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
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _step(row: dict[str, Any], default: float) -> float:
    try:
        return float(row.get("step") or "")
    except ValueError:
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
