"""Review round 17: GRPO's task filter (model.tasks) judges a manifest's records by their raw `task` field, without
building each record at setup (~12x the raw read: seconds per 100k records), and keeps exactly what the record
path keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_grpo import _rewrite
from train_fixtures import ANSWERS, write_dataset

from musicflamingo import grpo
from musicflamingo.data import manifest as manifest_mod
from musicflamingo.data.datamodule import MusicFlamingoDataModule
from musicflamingo.data.manifest import JsonlRecords, ManifestError


def _tasks(tmp_path, n: int = 12):  # noqa: ANN001, ANN202
    def change(i, r):  # noqa: ANN001, ANN202
        if i % 3 == 0:
            r.update(task="mcq", choices=ANSWERS)
        elif i % 3 == 1:
            r.update(task="caption")
        # i % 3 == 2: no task field (a question: kind qa)

    return _rewrite(write_dataset(tmp_path / "data", n=n), change)


@pytest.mark.parametrize("tasks", [{"mcq"}, {"qa"}, {"caption", "mcq"}, {"lyrics"}])
def test_the_task_filter_keeps_what_built_records_keep_without_building_them(tmp_path, monkeypatch, tasks):
    path = _tasks(tmp_path)
    records = JsonlRecords(path)
    keep = grpo.TaskFilter(frozenset(tasks))
    slow = [i for i in range(len(records)) if keep(records[i])]
    built = []
    real = manifest_mod._to_record
    monkeypatch.setattr(manifest_mod, "_to_record", lambda *a, **k: built.append(1) or real(*a, **k))
    kept = MusicFlamingoDataModule._kept(records, keep)
    assert kept.tolist() == slow and kept.dtype == np.int64
    assert built == []  # no record was built to read its task
    assert grpo.TaskFilter(frozenset({"mcq"})).select(list(records)) == [i for i in range(12) if i % 3 == 0]


def test_a_broken_line_is_still_named_by_the_task_filter(tmp_path):
    """A line that is no JSON object is built, so its own error (file:line) is raised, not a bare JSONDecodeError."""
    path = _tasks(tmp_path, n=3)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = JsonlRecords(path)
    json.loads(lines[1])  # the fixture's lines are JSON
    records_text = records.text

    def broken(i):  # noqa: ANN001, ANN202
        return b"{not json" if i == 1 else records_text(i)

    records.text = broken  # type: ignore[method-assign]
    with pytest.raises(ManifestError):
        grpo.TaskFilter(frozenset({"mcq"})).select(records)
