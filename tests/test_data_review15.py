"""Review round 15, shard writing: a writing process that fails names the record and leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_shards import _even_manifest, litdata_cache, processor  # noqa: F401 (fixtures)

from musicflamingo.data.shards import ShardDataset, write_shards

# The command with one record's function (or litdata's writer) failing in a writing process.
FAIL_SCRIPT = """
import os, signal, sys
from musicflamingo.data import shards
where, target = os.environ["FAIL_IN"], int(os.environ.get("FAIL_AT", "-1"))
if where in ("audio", "records"):
    name = "_audio_item" if where == "audio" else "_record_item"
    real = getattr(shards, name)
    def failing(item):
        if item[0] == target and os.environ.get("KILLED"):
            os.kill(os.getpid(), signal.SIGKILL)  # the kernel's out-of-memory killer
        if item[0] == target:
            raise MemoryError("boom")  # a huge file; whatever a record's function raises
        return real(item)
    setattr(shards, name, failing)
else:  # litdata's own step at a worker's end (its last chunk: a full disk)
    from litdata.processing.data_processor import BaseWorker
    def full(self):
        raise OSError(28, "No space left on device")
    BaseWorker._handle_data_chunk_recipe_end = full
from musicflamingo.data.__main__ import main
main(sys.argv[1:])
"""


def _running_in_session(sid: int) -> list[int]:
    """Processes of session ``sid`` that are not zombies (a zombie writes nothing and holds no pipe)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(name))
    return out


def _run_failing(tmp_path, args, **env):
    """Run the command in its own session with its output on pipes (as `... | tee log`): the pipes close only when
    every process holding them is gone, so a process left behind shows as a timeout, not as a hang."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", FAIL_SCRIPT, *args],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # 90 s: under `make test`'s two workers a child importing torch and litdata (and its two writers) can
        # take 30 s on a loaded 2-core machine; a process left behind still shows, later
        out, err = proc.communicate(timeout=90)
        left = _running_in_session(proc.pid)
    except subprocess.TimeoutExpired:
        left = _running_in_session(proc.pid)
        out, err = "", "(timed out: the pipes stayed open)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
    return proc.returncode, out, err, left


@pytest.mark.timeout(240)
@pytest.mark.parametrize("half", ["audio", "records"])
def test_a_record_failing_in_a_writer_is_named_and_no_process_is_left(tmp_path, half):
    """litdata terminated the failed worker but not the uploader it had started: that process, a child of init,
    waited on its queue forever with the command's stdout open, so `shard ... | tee log` never ended; the error was
    litdata's traceback of the worker's traceback as text, the record in a dict repr."""
    manifest = _even_manifest(tmp_path / "data", 6)
    out = tmp_path / "shards"
    args = ["shard", str(manifest), str(out), "--workers", "2"]
    rc, stdout, err, left = _run_failing(tmp_path, args, FAIL_IN=half, FAIL_AT="3")
    assert not left, f"processes left running: {left}; {err[-2000:]}"
    assert rc == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {manifest}:4 (id 'c3'): writing the shards to {out} failed"), err[-3000:]
    assert "on this record (MemoryError: boom)" in line
    assert "the shards there are incomplete: write them again with --overwrite" in line
    assert "Traceback" not in err
    assert not (out / "index.json").exists() or not (out / "records" / "index.json").exists()


@pytest.mark.timeout(240)
def test_a_writer_failing_outside_records_keeps_the_old_set_and_leaves_no_process(tmp_path, processor):  # noqa: F811
    """A failure in litdata's own steps (a full disk) under --overwrite: a clear error, the old set still read,
    nothing left running."""
    manifest = _even_manifest(tmp_path / "data", 4)
    out = tmp_path / "shards"
    assert write_shards(manifest, str(out)) == 4
    args = ["shard", str(manifest), str(out), "--workers", "2", "--overwrite"]
    rc, stdout, err, left = _run_failing(tmp_path, args, FAIL_IN="writer")
    assert not left, f"processes left running: {left}; {err[-2000:]}"
    assert rc == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: writing the shards failed (") and "No space left on device" in line
    assert "the shards there are as they were" in line and "Traceback" not in err
    assert len(ShardDataset(out, processor)) == 4


@pytest.mark.timeout(240)
def test_a_writer_killed_from_outside_is_an_error_not_a_short_set(tmp_path):
    """A worker killed by the out-of-memory killer ends without an error: litdata wrote the index of the samples the
    others wrote (4 of 6) and the command printed {"records": 6}; the killed worker's uploader was left running."""
    manifest = _even_manifest(tmp_path / "data", 6)
    out = tmp_path / "shards"
    args = ["shard", str(manifest), str(out), "--workers", "2"]
    rc, stdout, err, left = _run_failing(tmp_path, args, FAIL_IN="audio", FAIL_AT="3", KILLED="1")
    assert not left, f"processes left running: {left}; {err[-2000:]}"
    assert rc == 2 and '"records"' not in stdout, stdout + err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: writing process 2 of 2 was killed by signal 9"), err[-3000:]
    assert "the shards there are incomplete: write them again with --overwrite" in line
    assert not (out / "index.json").exists()
