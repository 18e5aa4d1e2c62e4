"""Training start with and without a manifest index: `python train.py` launch -> first training batch.

    python bench/data_index.py                      # 1 M records (a few minutes without the index)
    python bench/data_index.py --records 20000      # quick look

Writes, in a temporary folder, the tests' tiny processor, eight tone clips and a manifest of N records that point
at them with `duration` fields (so no run reads audio headers: the no-index launch pays for parsing and tokenizing
only, the least it can pay). Then it times, each in a fresh process:

1. `python train.py ... data.index=off`: the launch that estimates every length;
2. `python -m musicflamingo.data index MANIFEST`: building the index once;
3. `python train.py ... data.index=require`: the launch that reads it;

and, in this process, the phases of the indexed launch's data setup (reading lines, hashing, the index, sampler,
first batch). The tiny model keeps model build and the step itself out of the numbers.

    python bench/data_index.py --shard-records 200000   # a shard set's records/: open time and memory per rank
    python bench/data_index.py --shard-lengths 20000    # a launch's token lengths from shards, with/without counts

writes the records/ half of a shard set of N records (litdata's writer, the text ``write_shards`` stores) and opens
it in fresh processes both ways, printing them side by side: record by record through litdata into memory (the
way object-store shard sets are read, and local ones were) and as places in the chunk files (local folders now).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_assets / train_fixtures: the tiny tokenizer, tone clips
sys.path.insert(0, str(ROOT))

MARK = "FIRST_BATCH_S "
QUESTIONS = ["Describe the track.", "What is the tempo?", "Which instrument plays?", "What key is this in?"]


class FirstBatch(L.Callback):
    """Prints the seconds from BENCH_T0 (the parent's clock at launch) to the first training batch."""

    def __init__(self) -> None:
        self.done = False

    def on_train_batch_start(self, *args: object) -> None:
        if not self.done:
            self.done = True
            print(f"{MARK}{time.time() - float(os.environ['BENCH_T0']):.2f}", flush=True)


def write_inputs(root: Path, records: int) -> tuple[Path, Path]:
    from tiny_assets import make_tone, write_audio
    from train_fixtures import write_processor

    proc = write_processor(root / "proc")  # 2 s windows, at most 8 s of audio
    clips = [
        write_audio(root / f"clip{i}.wav", make_tone(110.0 * (i + 1), 1.5 + 0.25 * i)).name for i in range(8)
    ]
    rnd = random.Random(0)
    manifest = root / "train.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for i in range(records):
            k = rnd.randrange(8)
            rec = {
                "id": f"r{i}",
                "audio": {"path": clips[k], "duration": 1.5 + 0.25 * k},
                "conversations": [
                    {"role": "user", "content": "<sound>" + QUESTIONS[i % 4]},
                    {
                        "role": "assistant",
                        "content": f"A tone at {110 * (k + 1)} Hz, steady, about {i % 97} words.",
                    },
                ],
            }
            f.write(json.dumps(rec) + "\n")
    return proc, manifest


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """(wall seconds, seconds to the first batch or None, output tail) of a fresh process."""
    env = {**os.environ, **env, "BENCH_T0": repr(time.time())}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    first = [float(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK)]
    return wall, (first[0] if first else None), out


def train_cmd(root: Path, proc: Path, manifest: Path, index: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"data.train={manifest}",
        f"data.processor={proc}",
        f"data.index={index}",
        "+model.net.overrides={audio:{max_source_positions:100}}",
        "data.batch_max_tokens=4096",
        "debug=fast",
        "trainer.max_steps=1",
        "+callbacks.first_batch._target_=data_index.FirstBatch",
        f"paths.output_dir={root / ('run_' + index)}",
        f"paths.log_dir={root / 'logs'}",
    ]


def phases(proc_dir: Path, manifest: Path) -> dict[str, float]:
    """Seconds of each step of the indexed launch's data setup, in this process."""
    import numpy as np

    from musicflamingo.data.datamodule import MusicFlamingoDataModule
    from musicflamingo.data.index import StoredIndex, _open, index_path, load_manifest
    from musicflamingo.data.manifest import JsonlRecords
    from musicflamingo.processor import MusicFlamingoProcessor

    out: dict[str, float] = {}

    def clock(name: str, fn):
        t = time.perf_counter()
        result = fn()
        out[name] = round(time.perf_counter() - t, 2)
        return result

    processor = clock("load processor", lambda: MusicFlamingoProcessor.from_pretrained(proc_dir))
    clock("read + split lines (JsonlRecords)", lambda: JsonlRecords(manifest))
    clock("read + split + hash lines", lambda: _open(manifest, None))
    clock("read index (hash, tokens)", lambda: StoredIndex.read(index_path(manifest)))
    clock("load_manifest (all of the above)", lambda: load_manifest(manifest, processor, index="require"))
    dm = MusicFlamingoDataModule(
        train=str(manifest), processor=processor, batch_max_tokens=4096, index="require"
    )
    clock("datamodule.setup (+ sampler)", lambda: dm.setup("fit"))
    loader = dm.train_dataloader()
    batches = clock("first epoch's batch list", lambda: len(loader.batch_sampler))
    clock("first batch", lambda: next(iter(loader)))
    out["batches per epoch"] = batches
    out["mean tokens per record"] = round(float(np.mean(dm.train_dataset.lengths)), 1)
    return out


def write_shard_records(folder: Path, records: int) -> None:
    """``folder/records``: N records as ``write_shards`` stores them (its JSON text, one string per sample)."""
    from dataclasses import asdict

    from litdata.streaming.writer import BinaryWriter

    from musicflamingo.data.manifest import AudioRef, Message, Record
    from musicflamingo.data.shards import RECORDS, _record_digest

    writer = BinaryWriter(str(folder / RECORDS), chunk_bytes="64MB")
    for i in range(records):
        k = i % 8
        rec = asdict(
            Record(
                id=f"r{i}",
                audios=[AudioRef(f"/data/clips/clip{k}.flac", duration=1.5 + 0.25 * k)],
                messages=[
                    Message("user", "<sound>" + QUESTIONS[i % 4]),
                    Message("assistant", f"A tone at {110 * (k + 1)} Hz, steady, about {i % 97} words."),
                ],
                source=f"/data/train.jsonl:{i + 1}",
            )
        )
        text = json.dumps(
            {"index": i, "digest": _record_digest(rec).hex(), **rec, "seconds": [1.5 + 0.25 * k]}
        )
        writer.add_item(i, text)
    writer.done()
    writer.merge()
    (folder / "index.json").write_text("{}")  # marks a shard folder (the audio half is not read here)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_shard_records(mode: str, folder: str) -> None:
    """In this (fresh) process: open ``folder``'s records one way; print seconds, memory and a fingerprint."""
    import threading

    from musicflamingo.data import shards
    from musicflamingo.data.datamodule import records_fingerprint

    where = shards._join(folder, shards.RECORDS)
    shards._streaming(where, None)  # litdata's imports and first open, the same both ways, not counted
    before = _rss_mib()
    peak, done = [before], threading.Event()

    def watch() -> None:  # the resident peak while opening
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t = time.perf_counter()
    if mode == "litdata":  # what local folders took before, and object stores still take
        records = shards.ShardRecords(shards._litdata_texts(where, shards._streaming(where, None)), where)
    else:
        records = shards.read_shard_records(folder)
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _rss_mib())
    held = sum(getattr(v, "nbytes", len(v) if isinstance(v, bytes) else 0) for v in vars(records).values())
    sample = [records.parse(i) for i in range(0, len(records), max(1, len(records) // 1000))]
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "held_mib": round(held / 2**20, 1),
                "rss_growth_mib": round(_rss_mib() - before, 1),
                "peak_growth_mib": round(peak[0] - before, 1),
                "fingerprint": records_fingerprint(records),
                "sample": repr(sample)[:10000],
                "held_on_disk": type(records._data).__name__ == "NoneType",
            }
        )
    )


def shard_records_bench(records: int, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_shard_records_") as tmp:
        t = time.perf_counter()
        write_shard_records(Path(tmp), records)
        size = sum(p.stat().st_size for p in (Path(tmp) / "records").glob("*.bin"))
        print(
            f"wrote {records} records ({size / 2**20:.0f} MiB of records/ chunks) in {time.perf_counter() - t:.0f} s"
        )
        out = {}
        for mode in ("litdata", "index"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--open-shard-records", mode, tmp]
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    old, new = out["litdata"], out["index"]
    assert old["fingerprint"] == new["fingerprint"] and old["sample"] == new["sample"], "the two reads differ"
    assert new["held_on_disk"] and not old["held_on_disk"]
    print(
        f"{'per rank, ' + str(records) + ' records':<34}{'litdata, in memory':>20}{'chunk index':>14}{'ratio':>8}"
    )
    for key, name in [
        ("seconds", "open (s)"),
        ("held_mib", "held by ShardRecords (MiB)"),
        ("rss_growth_mib", "resident growth after open (MiB)"),
        ("peak_growth_mib", "peak resident growth (MiB)"),
    ]:
        ratio = old[key] / new[key] if new[key] else float("inf")
        print(f"{name:<34}{old[key]:>20}{new[key]:>14}{ratio:>7.1f}x")
    print("same records, digests (fingerprint) and parsed sample: yes")


def shard_lengths_bench(records: int) -> None:
    """CPU time of a launch's token lengths from a shard set of N records (``ShardDataset.estimate_lengths``, in
    this process): the set written without and with ``shard --processor``. Only the records/ half is written (with
    the text ``write_shards`` stores): setup reads nothing else."""
    from dataclasses import asdict

    from litdata.streaming.writer import BinaryWriter

    from musicflamingo.data.manifest import read_manifest
    from musicflamingo.data.shards import RECORDS, ShardDataset, _Counter, _record_item
    from musicflamingo.processor import MusicFlamingoProcessor

    with tempfile.TemporaryDirectory(prefix="bench_shard_lengths_") as tmp:
        proc, manifest = write_inputs(Path(tmp), records)
        processor = MusicFlamingoProcessor.from_pretrained(proc)
        rows = [(i, asdict(r)) for i, r in enumerate(read_manifest(manifest))]
        out = {}
        for name, counter in [("without --processor", None), ("with --processor", _Counter(processor))]:
            folder = Path(tmp) / name.replace(" ", "_")
            writer = BinaryWriter(str(folder / RECORDS), chunk_bytes="64MB")
            for row in rows:
                writer.add_item(row[0], _record_item(row, counter))
            writer.done()
            writer.merge()
            (folder / "index.json").write_text("{}")  # marks a shard folder (the audio half is not read here)
            ds = ShardDataset(folder, processor)
            t = time.process_time()
            out[name] = (ds.estimate_lengths(), time.process_time() - t)
    (old, old_s), (new, new_s) = out.values()
    assert old == new, "the stored counts differ from the estimate"
    print(f"{records} records, same lengths both ways; CPU time of estimate_lengths:")
    for name, (_, s) in out.items():
        print(f"  {name:<22}{s:7.2f} s  {1000 * s / records:.4f} ms/record")
    print(f"  ratio {old_s / new_s:.1f}x")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--open-shard-records":
        open_shard_records(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument(
        "--shard-records",
        type=int,
        default=0,
        help="only compare opening a shard set's records/ of N records",
    )
    ap.add_argument(
        "--shard-lengths",
        type=int,
        default=0,
        help="only time a launch's token lengths from a shard set of N records, without and with stored counts",
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="index build processes")
    ap.add_argument("--skip-baseline", action="store_true", help="skip the launch without an index")
    args = ap.parse_args()
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    if args.shard_lengths:
        shard_lengths_bench(args.shard_lengths)
        return
    if args.shard_records:
        shard_records_bench(args.shard_records, env)
        return
    results: dict[str, object] = {"records": args.records, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        proc, manifest = write_inputs(root, args.records)
        print(
            f"wrote {args.records} records ({manifest.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s"
        )
        if not args.skip_baseline:
            wall, first, _ = run(train_cmd(root, proc, manifest, "off"), env)
            results["train.py without index: to first batch s"] = first
            results["train.py without index: whole run s"] = round(wall, 1)
            print(f"without index: first batch after {first:.1f} s (run {wall:.1f} s)", flush=True)
        cmd = [sys.executable, "-m", "musicflamingo.data", "index", str(manifest), "--processor", str(proc)]
        wall, _, out = run([*cmd, "--workers", str(args.workers)], env)
        results["index build s"] = round(wall, 1)
        print(
            f"index build ({args.workers} workers): {wall:.1f} s; {[x for x in out.splitlines() if ' records (' in x][-1]}",
            flush=True,
        )
        wall, first, _ = run(train_cmd(root, proc, manifest, "require"), env)
        results["train.py with index: to first batch s"] = first
        results["train.py with index: whole run s"] = round(wall, 1)
        print(f"with index: first batch after {first:.1f} s (run {wall:.1f} s)", flush=True)
        results["phases with index (s)"] = phases(proc, manifest)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
