"""Review round 11, "data snapshots": second opinion on round 10's index snapshots and compact JSON-list records.

Two builds of one manifest at once replaced each other's index (a killed one's snapshot could replace the other's
finished index with fewer rows); GRPO's table of every record and target, built at fit start and inherited by the
DataLoader workers, held Python objects per record."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import test_data_review10
from test_data_review10 import ROOT, TESTS, WORDS
from train_fixtures import grpo_module

from musicflamingo.data import index as index_module
from musicflamingo.data.index import ManifestIndexError, build_index, index_path, load_manifest
from musicflamingo.data.manifest import read_manifest
from musicflamingo.grpo import _target
from musicflamingo.model.build import build_model

# the processor fixtures of test_data_review10 (a tiny tokenizer, 1 s windows)
proc_dir, processor = test_data_review10.proc_dir, test_data_review10.processor


def _record(i: int) -> dict:
    rng = np.random.default_rng(i)
    answer = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 3 + i % 40))
    return {
        "id": f"r{i}",
        "task": "caption" if i % 3 == 0 else "qa",
        "conversations": [
            {"role": "user", "content": "Describe it."},
            {"role": "assistant", "content": answer},
        ],
    }


def _manifest(path: Path, n: int, json_list: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [_record(i) for i in range(n)]
    if json_list:
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return env


# ---------------------------------------------------------------------------------------------- concurrent builds
def test_a_second_build_of_the_same_manifest_is_refused_while_the_first_runs(tmp_path, proc_dir, processor):
    """Two builds at once replaced each other's file: the later one's snapshots (or a killed one's last snapshot)
    replaced the finished index of the other with its own rows only."""
    n = 3000
    path = _manifest(tmp_path / "m" / "m.jsonl", n)
    args = ["index", str(path), "--processor", str(proc_dir), "--workers", "0", "--save-every", "0"]
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "musicflamingo.data", *args], env=_env(), stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while True:  # the first build is running: its first snapshot is there
            try:
                if index_module._PARTIAL_KEY in pq.read_schema(index_path(path)).metadata:
                    break
            except (OSError, KeyError, TypeError):
                pass
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.001)
        with pytest.raises(
            ManifestIndexError, match=rf"in use by another index build of m\.jsonl \(pid {first.pid}"
        ):
            build_index(path, processor, save_every=0)
        assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    assert pq.read_table(index_path(path)).num_rows == n  # the first build's rows, all of them
    assert build_index(path, processor).reused == n  # once it ended, a build runs
    assert sorted(os.listdir(path.parent)) == ["m.jsonl", "m.jsonl.index.parquet"]  # no lock file left


# ---------------------------------------------------------------------------------------------- GRPO's record table
def _grpo(*record_lists):  # noqa: ANN202
    net = build_model(
        preset="tiny",
        overrides={"audio": {"max_source_positions": 100}},
        init_from=None,
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze={"audio_tower": True, "multi_modal_projector": True, "language_model": True},
        lora={"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
    )
    lit = grpo_module(net)
    datasets = [SimpleNamespace(records=r) for r in record_lists]
    lit._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(train_dataset=SimpleNamespace(datasets=datasets), val_dataset=None)
    )
    return lit


def test_grpo_record_table_holds_no_objects_per_record(tmp_path):
    """The table of every record by source with its target (a dict of tuples of Record and Target) was built at
    fit start in the main process, and every DataLoader worker inherited it: at a million records, gigabytes of
    Python objects copied page by page into each worker as reference counts touched them."""
    freed = {}
    for n in (200, 2000):
        records = read_manifest(
            _manifest(tmp_path / f"m{n}.jsonl", n)
        )  # the datasets' records, not the table's
        lit = _grpo(records)
        table = lit._record_table("train")
        assert len(table) == n
        del table
        gc.collect()
        before = sys.getallocatedblocks()  # every object, numbers and strings too (gc tracks containers only)
        lit._records.clear()
        gc.collect()
        freed[n] = before - sys.getallocatedblocks()
    assert freed[2000] < freed[200] + 300, freed  # was about 4 blocks per record


def test_grpo_record_table_finds_each_source_in_every_kind_of_records(tmp_path, processor):
    """Lookups by source give the record and its target for JSONL (parsed on access), JSON-list (compact) and
    plain lists of records; a manifest listed twice is the same records, an unknown source is not there."""
    jsonl = _manifest(tmp_path / "a" / "m.jsonl", 40)
    listed = _manifest(tmp_path / "b" / "m.json", 30, json_list=True)
    kinds = [
        load_manifest(jsonl, processor, index="off").records,
        load_manifest(listed, processor, index="off").records,
        read_manifest(jsonl),  # the same file again
    ]
    lit = _grpo(*kinds)
    table = lit._record_table("train")
    expected = read_manifest(jsonl) + read_manifest(listed)
    assert len(table) == len(expected) == 70
    for rec in expected:
        assert rec.source in table
        got, target = table[rec.source]
        assert got == rec and target == _target(rec)
    assert list(table) == [r.source for r in expected]
    assert "nowhere.jsonl:1" not in table and 3 not in table
    with pytest.raises(KeyError):
        table["nowhere.jsonl:1"]
    # the task filter and the reward fields are still checked across the whole table
    lit = _grpo(kinds[0])
    lit.tasks = {"mcq"}
    with pytest.raises(ValueError, match=r"keeps no record .*their tasks: caption, qa"):
        lit._record_table("train")


# ---------------------------------------------------------------------------------------------- shard records
def test_shard_records_take_negative_indices_as_the_other_record_kinds_do(tmp_path):
    """`records[-1]` of a shard set read the whole buffer as one record and stopped with "entry -1 is not a record
    this code wrote; write the shards again" (JSONL and JSON-list records give the last record)."""
    from dataclasses import asdict

    from musicflamingo.data.shards import ShardRecords

    records = [{**asdict(r), "seconds": []} for r in read_manifest(_manifest(tmp_path / "m.jsonl", 3))]
    shard = ShardRecords([json.dumps(r).encode() for r in records], where="shards")
    assert [shard[i].id for i in (-1, -2, -3, 0, 2)] == ["r2", "r1", "r0", "r0", "r2"]
    assert [r.id for r in shard] == ["r0", "r1", "r2"]
    for i in (3, -4):
        with pytest.raises(IndexError, match="out of range"):
            shard[i]
