"""Review round 10, "data at scale": index builds killed midway keep their rows (the rerun of the same command
computes only the rest and writes what an uninterrupted build writes), and the data path's costs that grow with
the manifest (sampler state in every checkpoint, batch building, per-worker memory) stay linear or constant."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

from musicflamingo.data import dataset as dataset_module
from musicflamingo.data import index as index_module
from musicflamingo.data.__main__ import main
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.index import ManifestIndexError, build_index, index_path, load_manifest
from musicflamingo.data.manifest import ManifestError
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORDS = "the piano plays a bright melody over a steady kick drum while the bass holds A minor".split()


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc")
    write_tiny_tokenizer(d)
    MusicFlamingoProcessor(load_tokenizer(d), chunk_length=1.0, max_audio_len=4.0).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def processor(proc_dir):
    return MusicFlamingoProcessor.from_pretrained(proc_dir)


def _record(i: int, audio: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    answer = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 3 + i % 40))
    rec = {
        "id": f"r{i}",
        "conversations": [
            {"role": "user", "content": ("<sound>" if audio else "") + "Describe it."},
            {"role": "assistant", "content": answer},
        ],
    }
    if audio:
        rec["audio"] = audio
    return rec


def _manifest(folder: Path, n: int, audio: list[str] | None = None, bad: int | None = None) -> Path:
    """n records (text-only, or cycling over `audio`); record `bad` lacks its assistant turn."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rec = _record(i, audio[i % len(audio)] if audio else None)
        if i == bad:
            rec["conversations"] = rec["conversations"][:1]
        lines.append(json.dumps(rec) + "\n")
    path = folder / "m.jsonl"
    path.write_text("".join(lines))
    return path


def _table(path: Path) -> tuple[dict, dict]:
    t = pq.read_table(index_path(path))
    return t.to_pydict(), t.schema.metadata


def _is_partial(path: Path) -> bool:
    return index_module._PARTIAL_KEY in pq.read_schema(index_path(path)).metadata


class _Stop(BaseException):
    """Stands for Ctrl-C (KeyboardInterrupt) in the middle of a build."""


def _counting(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count index building's calls of estimate_num_tokens (workers=0: in this process); raise _Stop after
    `stop_after` of them."""
    calls = [0]
    real = dataset_module.estimate_num_tokens

    def counted(*args, **kwargs):
        if stop_after is not None and calls[0] >= stop_after:
            raise _Stop
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "estimate_num_tokens", counted)
    return calls


# ---------------------------------------------------------------------------------------------- killed builds
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return env


def test_index_build_killed_midway_keeps_its_rows_and_the_rerun_computes_only_the_rest(
    tmp_path, proc_dir, capsys
):
    n = 3000
    killed = _manifest(tmp_path / "killed", n)
    straight = _manifest(tmp_path / "straight", n)
    args = ["index", str(killed), "--processor", str(proc_dir), "--workers", "0", "--save-every", "0"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "musicflamingo.data", *args], env=_env(), stdout=out, stderr=out
        )
    deadline = time.monotonic() + 120
    while True:  # SIGKILL as soon as the first snapshot is there
        try:
            if _is_partial(killed):
                break
        except (OSError, KeyError, TypeError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    kept = pq.read_table(index_path(killed)).num_rows
    assert 0 < kept < n  # the rows done before the kill, not lost

    # training meanwhile: the snapshot's rows are used, the rest estimated, with a warning that says so
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    found = load_manifest(killed, processor, index="auto")
    assert (found.tokens >= 0).sum() == kept
    with pytest.raises(ManifestIndexError, match="interrupted build"):
        load_manifest(killed, processor, index="require")

    main(args)  # the same command again
    line = capsys.readouterr().out.strip().splitlines()[-1]
    reused = int(line.split("(")[1].split(" reused")[0])
    assert reused >= kept and f"{n - reused} computed" in line, line
    build_index(straight, processor)
    assert _table(killed) == _table(straight)  # rows and metadata: no trace of the interruption
    assert sorted(os.listdir(killed.parent)) == ["m.jsonl", "m.jsonl.index.parquet"]


def test_index_build_stopped_by_a_bad_record_keeps_the_rows_done(tmp_path, processor, monkeypatch, caplog):
    n, bad = 1200, 1000
    path = _manifest(tmp_path / "m", n, bad=bad)
    calls = _counting(monkeypatch)
    with pytest.raises(ManifestError, match=f"m.jsonl:{bad + 1}"):
        build_index(path, processor, save_every=0)
    assert _is_partial(path)
    done = pq.read_table(index_path(path)).num_rows
    assert done == calls[0] == bad  # every record before the bad one
    _manifest(tmp_path / "m", n)  # the line fixed
    calls[0] = 0
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.index"):
        report = build_index(path, processor)
    assert calls[0] == report.computed == n - done and report.reused == done
    assert f"{done} of {n} rows reused from an interrupted build's snapshot" in caplog.text
    straight = _manifest(tmp_path / "straight", n)
    build_index(straight, processor)
    assert _table(path) == _table(straight) and not _is_partial(path)


def test_a_forced_build_interrupted_is_continued_by_the_forced_rerun(tmp_path, processor, monkeypatch):
    n = 900
    path = _manifest(tmp_path / "m", n)
    build_index(path, processor)  # an old complete index
    _counting(monkeypatch, stop_after=300)
    with pytest.raises(_Stop):
        build_index(path, processor, force=True, save_every=0)
    snapshot = pq.read_table(index_path(path)).num_rows
    assert _is_partial(path) and snapshot == 256  # whole chunks only: the interrupted one is not in it
    calls = _counting(monkeypatch)
    report = build_index(path, processor, force=True)  # its own snapshot's rows: computed after --force began
    assert report.reused == snapshot and calls[0] == n - snapshot
    # a snapshot of a build without --force is not reused by a forced one
    index_path(path).unlink()
    _counting(monkeypatch, stop_after=300)
    with pytest.raises(_Stop):
        build_index(path, processor, save_every=0)
    assert _is_partial(path)
    calls = _counting(monkeypatch)
    build_index(path, processor, force=True)
    assert calls[0] == n


def test_interrupted_rebuild_keeps_the_durations_an_older_index_gave(tmp_path, proc_dir, monkeypatch, caplog):
    """A tokenizer-side change makes every count stale but not the durations: a killed rebuild must not lose the
    durations (reading millions of audio headers again), and training meanwhile uses them."""
    clips = tmp_path / "clips"
    names = []
    for i, s in enumerate([1.5, 2.5, 0.7]):
        write_audio(clips / f"c{i}.wav", make_tone(220.0 * (i + 1), s))
        names.append(str(clips / f"c{i}.wav"))
    n = 700
    path = _manifest(tmp_path / "m", n, audio=names)
    old = MusicFlamingoProcessor.from_pretrained(proc_dir)
    build_index(path, old)
    new = MusicFlamingoProcessor.from_pretrained(proc_dir)
    new.default_system_prompt = "You are a terse music tagger."
    headers = [0]
    real = index_module.record_seconds

    def counted(record):
        headers[0] += 1
        return real(record)

    monkeypatch.setattr(index_module, "record_seconds", counted)
    _counting(monkeypatch, stop_after=300)
    with pytest.raises(_Stop):
        build_index(path, new, save_every=0)
    table = pq.read_table(index_path(path)).to_pydict()
    assert _is_partial(path) and len(table["tokens"]) == n  # every row: 256 with counts, all with durations
    assert sum(t >= 0 for t in table["tokens"]) == 256
    # training meanwhile: the counts it has, the others estimated from the kept durations, no header read
    found = load_manifest(path, new)
    ds = ConversationDataset(found.records, new)
    lengths = ds.estimate_lengths(found.tokens, found.seconds)
    assert headers[0] == 0
    truth = ConversationDataset(found.records, new).estimate_lengths()
    assert lengths == truth
    calls = _counting(monkeypatch)
    build_index(path, new)
    assert calls[0] == n - 256 and headers[0] == 0
    straight = _manifest(tmp_path / "straight", n, audio=names)
    build_index(straight, new)
    assert _table(path) == _table(straight)


def test_index_build_progress_says_how_many_rows_were_reused(tmp_path, proc_dir, capsys):
    path = _manifest(tmp_path / "m", 300)
    main(["index", str(path), "--processor", str(proc_dir), "--workers", "0"])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + json.dumps(_record(10_000)) + "\n")  # one record edited
    capsys.readouterr()
    main(["index", str(path), "--processor", str(proc_dir), "--workers", "0"])
    out = capsys.readouterr()
    assert "(299 rows reused)" in out.err  # the bar
    assert "299 reused, 1 computed" in out.out
    with pytest.raises(SystemExit):
        main(["index", str(path), "--processor", str(proc_dir), "--save-every", "-1"])
    shutil.rmtree(tmp_path / "m")


# ---------------------------------------------------------------------------------------------- scale
class _CountingText(str):
    """A manifest's text that sums the characters its `count` calls scan."""

    scanned = 0

    def count(self, sub, start=0, end=None):  # type: ignore[override]
        end = len(self) if end is None else end
        _CountingText.scanned += max(0, end - start)
        return super().count(sub, start, end)


@pytest.mark.parametrize("indent", [None, 1])
def test_json_list_manifest_is_read_in_linear_time(tmp_path, indent):
    """AF3's data sets are JSON lists of millions of records: each record's line was found by counting the newlines
    from the start of the file (quadratic: a 200k-record list took over ten minutes, a million hours)."""
    from musicflamingo.data import manifest as manifest_module

    n = 3000
    text = json.dumps([_record(i) for i in range(n)], indent=indent)
    _CountingText.scanned = 0
    items = manifest_module._parse_json_list(tmp_path / "m.json", _CountingText(text))
    assert len(items) == n
    assert _CountingText.scanned <= 2 * len(text)  # was about n / 2 times the text
    # the lines are still those where the records start
    path = tmp_path / "m.json"
    path.write_text(text)
    lines = [line for line, _ in items]
    starts = [k + 1 for k, line in enumerate(text.splitlines()) if line.startswith(" {" if indent else "[{")]
    assert lines == (starts if indent else [1] * n)
    assert [r.source for r in manifest_module.read_manifest(path)][-1] == f"{path}:{lines[-1]}"


def test_json_list_records_are_not_per_record_python_objects_in_the_dataset(tmp_path, processor):
    """A list of Record objects is copied into every DataLoader worker page by page as reference counts touch it
    (a million records: gigabytes per worker by an epoch's end); a JSON list's records are held as one bytes
    object, so the objects a load leaves behind do not grow with the manifest."""
    import gc

    from musicflamingo.data.manifest import read_manifest

    left = {}
    for n in (200, 2000):
        path = tmp_path / f"m{n}.json"
        path.write_text(json.dumps([_record(i) for i in range(n)], indent=1))
        ds = ConversationDataset(load_manifest(path, processor, index="off").records, processor)
        assert list(ds.records) == read_manifest(path)  # the same records, sources (file:line) included
        assert ds.records[-1] == read_manifest(path)[-1] and len(ds) == n
        with pytest.raises(IndexError):
            ds.records[n]
        # the objects the dataset holds: those its deletion frees (whatever the rest of the process does)
        gc.collect()
        alive = len(gc.get_objects())
        del ds
        gc.collect()
        left[n] = alive - len(gc.get_objects())
    assert left[2000] < left[200] + 100, left  # was about 5 objects per record
    build_index(path, processor)  # index rows still name the records' lines
    lines = pq.read_table(index_path(path)).column("line").to_pylist()
    assert lines == [int(r.source.rsplit(":", 1)[1]) for r in read_manifest(path)]


def test_reading_a_jsonl_manifest_takes_about_its_size_in_memory(tmp_path):
    """The line split made a mask as large as the file (a 5 GB manifest peaked at 10 GB on every rank)."""
    import tracemalloc

    from musicflamingo.data.manifest import JsonlRecords

    path = _manifest(tmp_path, 40_000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        records = JsonlRecords(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == 40_000 and records[-1].id == "r39999"
    assert peak < 1.5 * size, (peak, size)  # the bytes, the line offsets, blocks of a mask; was 2.2 x
