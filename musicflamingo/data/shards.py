"""Sharded training data: a manifest and its audio -> litdata chunks (a local folder or an object store URL), read
back as a map-style dataset that the token-budget sampler drives like a manifest.

    python -m musicflamingo.data shard data/train.jsonl s3://bucket/train-shards --workers 8
    python train.py ... data.train=s3://bucket/train-shards      # or a local folder, or in a weighted list

A shard set is two litdata datasets (``litdata.optimize`` writes them, ``litdata.StreamingDataset`` reads them):

    <out>/index.json, chunk-*.bin          per sample: i, the record's digest and its audio files as encoded,
                                           packed bytes, and a digest of them all
    <out>/records/index.json, chunk-*.bin  per sample: JSON of i, the record's digest, the Record, the seconds
                                           of each audio and (``shard --processor DIR``) its token count with
                                           the digest of the settings it holds for

A sample is read only if its bytes are those written and its record's digest is the one ``records/`` holds: a chunk
changed after writing (damaged, another write's, grown or cut short) or halves of different writes are named, not
trained on (shards written before these digests are read without them).

Setup reads ``records/`` only (text: ids, conversations, durations), so token lengths, bucketing, mixtures and the
over-budget check need no audio; token lengths are the stored counts where they were made under the training
processor's settings (:func:`~musicflamingo.data.index.counts_digest`), else tokenized at every launch (~0.3 ms a
record against ~0.015 ms: ``python bench/data_index.py --shard-lengths 20000``); a local folder's records are then held as their places in its chunk files (16
bytes a record, each read again and checked when used), an object store's as their places in a local copy of
them that the process writes as it reads them (:class:`ShardRecords`).
``dataset[i]`` fetches sample ``i``'s bytes (a local read, or one ranged GET from
an object store: litdata's ``on_demand_bytes``, no whole-chunk download) and decodes them exactly as
:func:`~musicflamingo.audio.io.load_audio` decodes the file, so a sample is identical to the manifest's.

Why random access through our sampler rather than a streaming order (litdata's iteration or WebDataset tars):
the sampler already gives token-budget buckets, weighted mixtures, disjoint DDP shares and exact mid-epoch resume
from a two-number state; a sequential stream has none of these for free (WebDataset splits by tar file, so ranks
get unequal counts unless the files divide evenly, and resumes by re-reading). The loader is bound by decoding and
log-mel features, not by reading, so random reads cost no throughput (``bench/data_loader.py``; numbers in
docs/performance.md, "Data: shards and loader throughput").

Audio is stored as the files' bytes (flac stays flac), the whole file per record: a record that cuts a segment
from a long file stores that file, so cut long files into clips before sharding. A file missing at sharding
time is stored as no bytes and becomes a bad sample (``bad_sample_policy``) when its turn comes, like a missing
file under a manifest (a manifest none of whose files exists is refused: a wrong ``--audio-root``). A local output
folder may hold other files, but none that litdata's writer would delete (``*.bin``, ``*index.json``, anything in
``records/``). Ctrl-C stops every writing process and exits 130: a first write leaves the folder incomplete
(unreadable) until written again with ``--overwrite``; ``--overwrite`` writes the new set beside the old one and
swaps it in at the end, so a write that stops leaves the old set as it was. A write that fails stops every
writing process too and leaves the folder the same way: an error while a record is read names the record
(``train.jsonl:12 (id 'x')``), a writing process killed from outside (out of memory) is an error, not a set short
of its samples. litdata is imported only inside these functions.
"""

from __future__ import annotations

import argparse
import array
import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from musicflamingo.audio.io import SAMPLING_RATE, AudioError
from musicflamingo.data.dataset import (
    ConversationDataset,
    audio_seconds,
    decoded_seconds,
    estimate_num_tokens,
)
from musicflamingo.data.index import counts_digest
from musicflamingo.data.manifest import AudioRef, Message, Record, _digests, _position, read_manifest
from musicflamingo.processor import MusicFlamingoProcessor

log = logging.getLogger(__name__)

RECORDS = "records"  # sub-folder of the text half
INDEX = "index.json"  # litdata's index file: its presence marks a local shard folder
_STAGING = ".overwrite-staging"  # where --overwrite writes the new set before swapping it in
# What litdata's writer leaves in a folder: chunks, the index, per-worker partial indexes (a stopped run)
_SHARD_FILE = re.compile(r"chunk-\d+-\d+\.bin|(\d+\.)?index\.json")


class ShardError(ValueError):
    """A shard folder is missing, incomplete or does not match its records; the message names the folder."""


def is_url(path: str) -> bool:
    """An object store URL (``s3://``, ``gs://``...) or litdata's ``local:`` prefix (a folder read as if remote)."""
    return "://" in path or path.startswith("local:")


# The object stores litdata 0.2.76 reads shards from (its resolver) and writes them to (``optimize``); it takes any
# other "scheme://..." for a relative local path: "https://host/set" was written to the folder ./https:/host/set
_READ_SCHEMES = ("s3", "gs", "r2", "azure", "hf")
_WRITE_SCHEMES = ("s3", "gs", "r2")
_CLIENTS = (
    "object stores are reached with litdata's clients: s3:// and r2:// with boto3's credentials (AWS_* variables "
    "or ~/.aws), gs:// with google-cloud-storage, azure:// with azure-storage-blob, hf:// with huggingface_hub"
)


def _check_url(url: str, write: bool) -> None:
    """Refuse an object store URL whose scheme litdata does not read (``write``: write), naming those it does."""
    if not is_url(url) or url.startswith("local:"):
        return
    scheme = url.split("://", 1)[0]
    allowed = _WRITE_SCHEMES if write else _READ_SCHEMES
    if scheme not in allowed:
        raise ShardError(
            f"{url}: shards are {'written to' if write else 'read from'} "
            f"{', '.join(a + '://' for a in allowed)} URLs or a local folder, not {scheme}://"
        )


def is_shards(path: str | os.PathLike) -> bool:
    """A shard location: a URL, or a folder holding litdata's ``index.json`` (a manifest is a file)."""
    s = os.fspath(path)
    return is_url(s) or os.path.isfile(os.path.join(s, INDEX))


def _quiet_litdata() -> None:
    # litdata logs notes (cache size, mmap mode) at INFO for every dataset opened: per shard set and worker
    logging.getLogger("litdata").setLevel(logging.WARNING)


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _record_digest(rec: dict[str, Any]) -> bytes:
    """BLAKE2b-64 of a record as written (``asdict(Record)``): stored in both halves of a shard set, so an audio
    sample read beside the records of another write is told apart."""
    return _digest(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8"))


def _pack(index: int, blobs: Sequence[bytes], record: bytes) -> bytes:
    """A sample's files in one value: index (u64), count (u32), sizes (u64 each), the record's digest (8 bytes,
    :func:`_record_digest`), the files' bytes, then the digest of all bytes before it.

    One bytes value per sample, not a dict: litdata stores dicts of plain leaves as Arrow tables, which its ranged
    single-sample reads from object stores (``on_demand_bytes``) cannot read (litdata 0.2.76)."""
    body = struct.pack(f"<QI{len(blobs)}Q", index, len(blobs), *map(len, blobs)) + record + b"".join(blobs)
    return body + _digest(body)


def _unpack(data: bytes) -> tuple[int, bytes | None, list[bytes]]:
    """Inverse of :func:`_pack`: (index, record digest, files). A sample written before the digests were (no
    record digest, no digest of its bytes: 16 bytes fewer than its sizes add up to) gives None for the record's.
    ValueError when ``data`` is not such a value or not the bytes written (a damaged or changed chunk)."""
    head = struct.calcsize("<QI")
    if len(data) < head:
        raise ValueError(f"{len(data)} bytes, fewer than its {head}-byte header")
    index, n = struct.unpack_from("<QI", data)
    pos = head + 8 * n
    if pos > len(data):
        raise ValueError(f"header counts {n} files, more than its {len(data)} bytes can hold")
    sizes = struct.unpack_from(f"<{n}Q", data, head)
    end, record = len(data), None
    if pos + sum(sizes) + 16 == end:  # the record's digest after the sizes, the bytes' digest at the end
        end -= 8
        if _digest(memoryview(data)[:end]) != data[end:]:
            raise ValueError(
                "its bytes are not those written: their digest differs, the chunk changed after writing"
            )
        record, pos = data[pos : pos + 8], pos + 8
    elif pos + sum(sizes) != end:
        raise ValueError(
            f"its files' sizes add up to {sum(sizes)} bytes, which its {end - pos} after the header are not"
        )
    out = []
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    return index, record, out


# ---------------------------------------------------------------------------------------------- writing
def _read_bytes(ref: dict[str, Any]) -> bytes:
    try:
        with open(ref["path"], "rb") as f:
            return f.read()
    except OSError:  # stored as no bytes: a bad sample at training time, named there
        return b""


def _audio_item(item: tuple[int, dict[str, Any]]) -> bytes:
    i, rec = item
    return _pack(i, [_read_bytes(a) for a in rec["audios"]], _record_digest(rec))


def _decoded_seconds(path: str, offset: float, source: str = "") -> float | None:
    """Seconds of an audio no header or container states the length of (a raw AAC stream, an MP3 without a Xing
    frame), decoded at 16 kHz as training decodes it: a count of samples that ``ceil(seconds * 16000)`` gives back
    exactly; :data:`~musicflamingo.data.dataset.DECODED_SECONDS_CAP` at most. None when it does not decode (a bad
    sample when built: warned about, naming ``source``, the record's ``file:line``)."""
    try:
        return decoded_seconds(path, SAMPLING_RATE, offset)
    except AudioError as e:  # its bytes are written all the same: named now, not first when trained on
        log.warning("%s: %s; written as it is, a bad sample when trained on", source or path, e)
        return None


class _Counter(ConversationDataset):
    """Counts a record's tokens as :meth:`ShardDataset.estimate_lengths` does, from the seconds stored beside it: no
    audio bytes to decode (an audio of no known length counts as none, one stored as
    :data:`~musicflamingo.data.dataset.DECODED_SECONDS_CAP` as that long), so a stored count equals that estimate."""

    def __init__(self, processor: Any) -> None:
        super().__init__([], processor)
        self.settings = counts_digest(processor)

    def _audio_bytes(self, ref: AudioRef) -> bytes | None:
        # overridden, as ShardDataset's is, so that estimate_num_tokens decodes nothing (never called)
        raise AssertionError("counted from the stored seconds: no audio is read")


def _record_item(item: tuple[int, dict[str, Any]], counter: _Counter | None = None) -> str:
    """Record ``i``'s entry of ``records/``: JSON of its index, digest, the record, its audios' seconds and, with
    ``counter``, its token count and the :func:`~musicflamingo.data.index.counts_digest` of the settings it holds
    for."""
    i, rec = item
    # Seconds as the manifest path estimates them (the segment's duration, the file header, or an m4a's container);
    # where nothing states it (a raw AAC stream), the decoded audio's: shards estimate without fetching audio, and
    # a record counted as no audio passed the batch budget and overflowed packed rows. None: it does not decode.
    seconds = [audio_seconds(a["path"], a["offset"], a["duration"]) for a in rec["audios"]]
    seconds = [
        _decoded_seconds(a["path"], a["offset"], rec.get("source", ""))
        if s is None and os.path.isfile(a["path"])
        else s
        for a, s in zip(rec["audios"], seconds)
    ]
    digest = _record_digest(rec).hex()  # the audio sample holds it too (_pack)
    entry = {"index": i, "digest": digest, **rec, "seconds": seconds}
    if counter is not None:
        entry["tokens"] = estimate_num_tokens(_record_from(rec), counter, _seconds_of(entry))
        entry["counted_with"] = counter.settings
    return json.dumps(entry, ensure_ascii=False)


def _record_from(obj: dict[str, Any]) -> Record:
    """The :class:`Record` of a ``records/`` entry (or of ``asdict(record)``); KeyError/TypeError when not one."""
    return Record(
        id=obj["id"],
        audios=[AudioRef(**a) for a in obj["audios"]],
        messages=[Message(**m) for m in obj["messages"]],
        extra=obj["extra"],
        source=obj["source"],
    )


def _seconds_of(obj: dict[str, Any]) -> list[float]:
    """A ``records/`` entry's audio seconds, NaN where unknown (stored as null)."""
    return [math.nan if x is None else float(x) for x in obj["seconds"]]


class _RecordFailed(Exception):
    """Raised in a writing process for the record it failed on; its one-line message names the record (source,
    id) and the error, and reaches the parent in litdata's traceback text (:func:`_failed_record`)."""


def _named(fn: Any, item: tuple[int, dict[str, Any]]) -> Any:
    try:
        return fn(item)
    except Exception as e:
        i, rec = item
        where = f"{rec.get('source') or f'record {i}'} (id {rec.get('id')!r})"
        # one line of JSON (found again by _failed_record): where, and the error
        raise _RecordFailed(json.dumps([where, f"{type(e).__name__}: {e}"], ensure_ascii=False)) from e


def _audio_sample(item: tuple[int, dict[str, Any]]) -> bytes:
    return _named(_audio_item, item)  # looked up when called: a test may replace _audio_item


def _record_sample(item: tuple[int, dict[str, Any]], counter: _Counter | None = None) -> str:
    if counter is None:
        return _named(_record_item, item)
    return _named(lambda it: _record_item(it, counter), item)


class _WorkerDied(ShardError):
    """A writing process ended without an error of its own (killed from outside: out of memory)."""


def _failed_record(error: BaseException) -> tuple[str, str] | None:
    """(the record, the error) of the :class:`_RecordFailed` that litdata's error (a RuntimeError holding the
    writing process's traceback as text) carries; None when the failure was not in a record's function."""
    for found in reversed(re.findall(r"_RecordFailed: (\[.*\])$", str(error), re.MULTILINE)):
        with contextlib.suppress(ValueError):
            where, reason = json.loads(found)
            return str(where), " ".join(str(reason).split())
    return None


def write_shards(
    manifest: str | os.PathLike,
    out: str,
    *,
    audio_root: str | os.PathLike | None = None,
    chunk_bytes: str | int = "64MB",
    workers: int = 1,
    overwrite: bool = False,
    processor: Any = None,
) -> int:
    """Write the shards of ``manifest`` (validated as for training) to ``out`` (a folder or URL); returns the
    number of records. ``workers`` processes read files in parallel, each a contiguous slice in manifest order,
    so shard index ``i`` is manifest record ``i``. With ``processor`` (training's ``data.processor``), each record's
    token count is stored too, so that a launch under the same settings tokenizes nothing
    (:meth:`ShardDataset.estimate_lengths`)."""
    from litdata import optimize

    _quiet_litdata()
    out = os.fspath(out)
    chunk_bytes = _check_chunk_bytes(chunk_bytes)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ShardError(f"workers={workers!r}: expected a number of processes >= 0 (0 or 1: one)")
    if audio_root is not None and not os.path.isdir(audio_root):
        raise ShardError(
            f"audio_root {os.fspath(audio_root)}: not a folder (relative audio paths resolve against it)"
        )
    if not is_url(out):
        _check_out(out, overwrite)
    _check_url(out, write=True)
    records = read_manifest(manifest, audio_root=audio_root)
    missing = [(r, a.path) for r in records for a in r.audios if not os.path.isfile(a.path)]
    if missing:
        record, path = missing[0]
        if len(missing) == sum(len(r.audios) for r in records):
            raise ShardError(
                f"{manifest}: none of its {len(missing)} audio files exists (first: {path}, {record.source}); "
                "check the paths or --audio-root (relative paths resolve against it, else the manifest's folder)"
            )
        log.warning(
            "%s: %d audio file(s) not found (first: %s, %s); they become bad samples when trained on",
            manifest,
            len(missing),
            path,
            record.source,
        )
    target, staging = out, None
    if overwrite and not is_url(out) and _holds_shards(out):
        # Written beside the old set and swapped in at the end: a write that stops (an error, Ctrl-C) leaves the
        # old set as it was. (_check_out made sure the folder's shard-like files are all shards.)
        staging = target = os.path.join(out, _STAGING)
        shutil.rmtree(staging, ignore_errors=True)  # left by a write that was killed
    inputs = [(i, asdict(r)) for i, r in enumerate(records)]
    # litdata takes a partial; the counter reaches spawned writing processes pickled, as a DataLoader's dataset does
    record_fn = (
        _record_sample
        if processor is None
        else functools.partial(_record_sample, counter=_Counter(processor))
    )
    common = dict(
        chunk_bytes=chunk_bytes,
        num_workers=max(1, workers),
        keep_data_ordered=True,  # each worker a static slice in order: the shard order is the manifest's
        reorder_files=False,
        # None: litdata refuses a folder that already holds shards. A URL is overwritten in place (its old records/
        # then pairs with the new audio until the records half is written: counts that differ are named on read).
        mode="overwrite" if overwrite and staging is None else None,
        verbose=False,
        # fork: workers start at once (spawn re-imports torch in each, ~5 s); they only read files
        start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn",
    )
    before = multiprocessing.get_start_method(allow_none=True)
    try:
        with _interruptible():
            optimize(fn=_audio_sample, inputs=inputs, output_dir=target, **common)
        _check_written(target, len(records), "audio")
        with _interruptible():
            optimize(fn=record_fn, inputs=inputs, output_dir=_join(target, RECORDS), **common)
        _check_written(_join(target, RECORDS), len(records), "records")
        if staging is not None:
            _swap_in(staging, out)
    except BaseException as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        state = (
            "the shards there are as they were"
            if staging is not None
            else "the shards there are incomplete: write them again with --overwrite"
        )
        if isinstance(e, _WorkerDied):
            raise ShardError(f"{out}: {e}; {state}") from None
        # litdata's error is its worker's traceback as text: name the record instead
        failed = _failed_record(e) if isinstance(e, RuntimeError) else None
        if failed is not None:
            raise ShardError(
                f"{failed[0]}: writing the shards to {out} failed on this record ({failed[1]}); {state}"
            ) from e
        if is_url(out) and isinstance(e, Exception) and not isinstance(e, ShardError):
            # an object store's client error (no credentials, no such bucket) names no URL
            reason = " ".join(str(e).split("\n", 1)[0].split())
            raise ShardError(
                f"{out}: cannot write the shards there ({type(e).__name__}: {reason}); {_CLIENTS}"
            ) from e
        if isinstance(e, KeyboardInterrupt):
            log.error("%s: interrupted; %s", out, state)
        elif isinstance(e, RuntimeError) and str(e).startswith("We found the following error"):
            # litdata's words for a writing process that failed outside a record's function
            lines = [line.strip() for line in str(e).splitlines() if line.strip() and line.strip() != "."]
            raise ShardError(
                f"{out}: writing the shards failed ({lines[-1] if lines else type(e).__name__}); {state}"
            ) from e
        raise
    finally:  # optimize sets the process-wide start method; DataLoaders started later keep theirs
        multiprocessing.set_start_method(before, force=True)
    return len(records)


def _check_written(folder: str, n: int, half: str) -> None:
    """A local half that litdata wrote holds ``n`` samples (its index.json's count): a writing process that ended
    without an error (killed from outside) left a set short of its samples, with nothing else to tell it where
    litdata's internals that :func:`_interruptible` hooks are not there (another litdata version)."""
    if is_url(folder):
        return
    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
            written = sum(int(c["chunk_size"]) for c in json.load(f)["chunks"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _WorkerDied(
            f"the {half} half has no readable {INDEX} after writing ({type(e).__name__}: {e})"
        ) from None
    if written != n:
        raise _WorkerDied(
            f"the {half} half holds {written} samples for {n} records: a writing process ended without writing its "
            "share (killed from outside: out of memory?)"
        )


def _holds_shards(out: str) -> bool:
    """Whether a local folder holds any part of a shard set (complete or not)."""
    if not os.path.isdir(out):
        return False
    return os.path.isdir(os.path.join(out, RECORDS)) or any(_SHARD_FILE.fullmatch(n) for n in os.listdir(out))


def _swap_in(staging: str, out: str) -> None:
    """Replace the shard set in ``out`` by the complete one in ``staging`` (renames within one filesystem; the old
    set's files go first, so a crash in between leaves an incomplete set, never two runs' halves mixed)."""
    for name in os.listdir(out):
        if _SHARD_FILE.fullmatch(name):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, RECORDS), ignore_errors=True)
    for name in os.listdir(staging):
        dest = os.path.join(out, name)
        if os.path.isdir(dest):  # litdata's own bookkeeping folders (.checkpoints)
            shutil.rmtree(dest)
        os.replace(os.path.join(staging, name), dest)
    os.rmdir(staging)


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse a local ``out`` that would lose files or mix runs: litdata's writer deletes every ``*.bin`` and
    ``*index.json`` file in the folders it writes (whoever wrote them), ``overwrite`` removes ``records/``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ShardError(f"{out}: not a folder; choose a new or empty folder for the shards")
    records = os.path.join(out, RECORDS)
    if os.path.exists(records) and not os.path.isdir(records):
        raise ShardError(f"{records}: a file where the shards' {RECORDS}/ folder goes; choose another folder")
    foreign = [
        os.path.join(out, n)
        for n in (sorted(os.listdir(out)) if os.path.isdir(out) else [])
        if n.endswith((".bin", "index.json")) and not _SHARD_FILE.fullmatch(n)
    ]
    foreign += [
        os.path.join(records, n)
        for n in (sorted(os.listdir(records)) if os.path.isdir(records) else [])
        if not _SHARD_FILE.fullmatch(n) and n != ".checkpoints"
    ]
    if foreign:
        raise ShardError(
            f"{out}: holds files that are not shards ({foreign[0]}{', ...' if len(foreign) > 1 else ''}), which "
            "writing shards there would delete; choose a new or empty folder"
        )
    if overwrite:
        return
    audio, text = os.path.isfile(os.path.join(out, INDEX)), os.path.isfile(os.path.join(records, INDEX))
    if audio and text:
        raise ShardError(
            f"{out}: already holds shards; choose another folder or overwrite them (--overwrite)"
        )
    if audio or text:
        raise ShardError(
            f"{out}: holds an incomplete shard set (no {INDEX if text else RECORDS + '/' + INDEX}: a write stopped "
            "before its end?); write it again with --overwrite"
        )


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C during ``litdata.optimize`` stops its processes and raises KeyboardInterrupt (the command exits 130);
    the SIGINT handler before it is restored afterwards.

    litdata 0.2.76's own handler asks its workers to stop and ends the process with ``os._exit(0)``: an interrupted
    write reported as a success, the workers and their feeder processes left running (still writing chunks into
    the folder), and the handler left installed once optimize returns, so a later Ctrl-C in the same process exits
    0 too. Here each process of the run that gets SIGINT (a terminal sends it to all; the parent passes it on to
    its workers) ends its own helper processes, then itself; the parent waits for its workers, then raises.

    A writing process that fails (an error in a record's function, a full disk) ends the run with litdata's
    RuntimeError as before, and every process of the run ends with it (litdata left its workers' helpers running)."""
    from litdata.processing.data_processor import BaseWorker, DataProcessor

    parent = os.getpid()
    theirs = DataProcessor.__dict__.get("_signal_handler")

    def stop(self: Any, signum: int, frame: Any) -> None:
        if os.getpid() != parent:  # a worker (forked with this handler) or one of its feeder processes
            for child in multiprocessing.active_children():
                child.terminate()
            os._exit(128 + signum)
        workers = list(getattr(self, "workers", None) or [])
        for w in workers:
            with contextlib.suppress(OSError, TypeError):  # gone already; not started (pid None)
                os.kill(w.pid, signal.SIGINT)
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
        raise KeyboardInterrupt

    their_exit = DataProcessor.__dict__.get("_exit_on_error")

    def exit_on_error(self: Any, error: str) -> None:
        # litdata terminates its workers (SIGTERM), not the processes each worker started (uploaders, a remover,
        # downloaders): those were left waiting on their queues forever, children of init, holding the command's
        # stdout (`... | tee log` never ended). They go first; then litdata's own steps, which raise its error.
        procs = [*(getattr(self, "workers", None) or []), *(getattr(self, "chunk_writers", None) or [])]
        for pid in _descendants([p.pid for p in procs if p.pid]):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for w in (
            getattr(self, "workers", None) or []
        ):  # where /proc is not there (macOS): each worker's group
            if w.pid and w.pid != os.getpid():
                with contextlib.suppress(OSError):
                    if os.getpgid(w.pid) == w.pid:  # its own group (setup below), not this process's
                        os.killpg(w.pid, signal.SIGKILL)
        try:
            their_exit(self, error)
        finally:
            for p in procs:  # reaped (a terminated worker stays a zombie of this process otherwise)
                with contextlib.suppress(Exception):
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                        p.join(5)

    their_setup = BaseWorker.__dict__.get("_setup")

    def setup(self: Any) -> None:
        # a worker and the helpers it starts in a process group of their own: ended together (below) when the
        # worker is killed from outside (out of memory), which litdata takes for a worker that finished
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        their_setup(self)

    their_stop = DataProcessor.__dict__.get("_stop_chunk_writers")

    def stop_writers(self: Any) -> None:
        # called once every worker has ended, before the index is written: litdata wrote the index of a run whose
        # worker was killed (its samples missing) and reported a success
        their_stop(self)
        workers = list(getattr(self, "workers", None) or [])
        for w in workers:
            if w.exitcode not in (0, None):
                with contextlib.suppress(OSError):
                    os.killpg(w.pid, signal.SIGKILL)  # the helpers it left, waiting on their queues
        died = [(k, w.exitcode) for k, w in enumerate(workers) if w.exitcode not in (0, None)]
        if died:
            k, code = died[0]
            how = (
                f"was killed by signal {-code} ({signal.Signals(-code).name}; out of memory?)"
                if code < 0 and -code in signal.valid_signals()
                else f"exited with status {code}"
            )
            raise _WorkerDied(
                f"writing process {k + 1} of {len(workers)} {how} before writing its share of the records"
            )

    patches = [
        (DataProcessor, "_signal_handler", theirs, stop),
        (DataProcessor, "_exit_on_error", their_exit, exit_on_error),
        (DataProcessor, "_stop_chunk_writers", their_stop, stop_writers),
        (BaseWorker, "_setup", their_setup, setup),
    ]
    missing = [f"{cls.__name__}.{name}" for cls, name, old, _ in patches if old is None]
    if missing:  # another litdata than 0.2.76, its internals renamed: say what is no longer guarded
        from litdata import __version__

        log.warning(
            "litdata %s has no %s (this code hooks litdata 0.2.76's): Ctrl-C may end a write with status 0, and a "
            "writing process that fails or is killed may leave processes running; a write short of its samples is "
            "still refused (local folders)",
            __version__,
            ", ".join(missing),
        )
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    for cls, name, old, new in patches:
        if old is not None:
            setattr(cls, name, new)
    try:
        yield
    finally:
        for cls, name, old, _ in patches:
            if old is not None:
                setattr(cls, name, old)
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _descendants(pids: Sequence[int]) -> list[int]:
    """The processes below ``pids`` (their children, the children's children...), read from /proc (Linux, where
    writing forks); [] where /proc cannot be read."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:  # "pid (comm) state ppid ...": comm may hold ") "
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], list(pids)
    while todo:
        below = children.get(todo.pop(), [])
        out += below
        todo += below
    return out


_BYTE_UNITS = ("tb", "gb", "mb", "kb", "t", "g", "m", "k", "b")  # litdata's chunk_bytes suffixes


def _check_chunk_bytes(value: str | int) -> str | int:
    """``chunk_bytes`` as litdata takes it (bytes > 0, or "64MB", "1.5g"...), checked before any file is read."""
    if isinstance(value, str) and value.strip().isdigit():  # a number of bytes from the command line
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        raw = value.strip().lower()
        unit = next((u for u in _BYTE_UNITS if raw.endswith(u)), None)
        try:
            if unit is not None and float(raw[: -len(unit)]) > 0:
                return value
        except ValueError:
            pass
    raise ShardError(
        f"chunk_bytes={value!r}: expected a size such as 64MB, 512KB, 1GB or a number of bytes > 0"
    )


# ---------------------------------------------------------------------------------------------- reading
def _check_chunks(folder: str) -> None:
    """A local shard folder's chunk files are all there and whole, as its index.json lists them: litdata would wait
    for a missing or short one as for a download and fail with a timeout that says it is none."""
    if is_url(folder):
        return  # an object store: litdata downloads, and names, what it cannot get
    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
            index = json.load(f)
        chunks = index["chunks"]
        compressed = (index.get("config") or {}).get("compression") is not None
        sizes = [(c["filename"], int(c["chunk_bytes"])) for c in chunks]
    except (OSError, ValueError, KeyError, TypeError):
        return  # litdata names what is wrong with the index itself (_streaming)
    for name, size in sizes:
        path = os.path.join(folder, name)
        try:
            have = os.path.getsize(path)
        except OSError:
            raise ShardError(
                f"{path}: missing (listed in {os.path.join(folder, INDEX)}); the shard set is incomplete: write the "
                "shards again (--overwrite)"
            ) from None
        if not compressed and have != size:
            why = (
                "truncated: an interrupted copy or download?"
                if have < size
                else "it changed after the shards were written: another write's chunk, or appended to?"
            )
            raise ShardError(
                f"{path}: {have} bytes, {size} when written ({why}); write or copy the shards again"
            )


def _chunk_of(url: str, index: int) -> str:
    """``" (in chunk-0-3.bin)"``: the chunk file of a local shard folder that holds sample ``index`` ("" when that
    cannot be told: a remote set, an unreadable index)."""
    folder = url[len("local:") :] if url.startswith("local:") else url
    if is_url(folder):
        return ""
    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
            chunks = json.load(f)["chunks"]
        ends = np.cumsum([int(c["chunk_size"]) for c in chunks])
        return f" (in {chunks[int(np.searchsorted(ends, index, side='right'))]['filename']})"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""


def _streaming(url: str, cache_dir: str | None) -> Any:
    from litdata import StreamingDataset

    _quiet_litdata()
    _check_url(url, write=False)
    _check_chunks(url)
    try:
        return StreamingDataset(url, cache_dir=cache_dir)
    except Exception as e:
        reason = " ".join(str(e).split("\n", 1)[0].split())  # litdata's first line (then its HINTs)
        if (
            is_url(url)
            and not url.startswith("local:")
            and not isinstance(e, (ValueError, FileNotFoundError))
        ):
            # the object store's client: no credentials, no such bucket, a missing package
            raise ShardError(
                f"{url}: cannot read the shards there ({type(e).__name__}: {reason}); {_CLIENTS}"
            ) from e
        raise ShardError(
            f"{url}: not a readable shard folder ({reason}); write one with `python -m musicflamingo.data shard`"
        ) from e


_BLOCK = 4096  # records read at once by ShardRecords.texts (~1.5 MiB)


class ShardRecords(Sequence):
    """The records of a shard set, parsed on access (``records[i]`` -> :class:`Record`), held in one of two ways:

    * a local shard folder's (:func:`read_shard_records`): where each record's JSON text lies in the ``records/``
      chunk files (16 bytes a record: its offsets in its chunk, 4 bytes each, and its digest), read with
      ``os.pread`` on access and checked against its digest, as :class:`~musicflamingo.data.manifest.JsonlRecords`
      reads a manifest. The text held in memory took about 370 bytes a record on every rank and worker, read
      record by record through litdata at every launch (200k records: 74 MiB held and 3.8 s; now 3.1 MiB and
      1.5 s, the chunks read whole: ``python bench/data_index.py --shard-records 200000``);
    * an object store's records, downloaded by litdata: copied as they are read to one file of this process's
      own (removed at exit), then held and read as a local folder's (24 bytes a record);
    * ``ShardRecords(texts)``: the texts in one buffer, 24 bytes per record beside them, where Record objects take
      kilobytes each and get copied page by page in DataLoader workers as reference counts touch them.

    Attributes:
        digests: [N] uint64, BLAKE2b-64 of each record's stored text (computed when the text is read: every byte of
            every record, so DDP ranks that read shard sets differing in any record tell them apart).
    """

    def __init__(self, texts: Sequence[bytes], where: str = "shard records") -> None:
        self.where = where
        texts = texts if isinstance(texts, (list, tuple)) else list(texts)  # read twice below
        self._data: bytes | None = b"".join(texts)
        sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - sizes
        self.digests = _digests(self._data, self._starts, self._ends)
        # on disk: the chunk files, and the first record of each (then len(self))
        self._chunks: list[str] = []
        self._firsts = np.zeros(1, dtype=np.int64)

    @classmethod
    def _on_disk(
        cls,
        where: str,
        chunks: list[str],
        firsts: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        digests: np.ndarray,
    ) -> ShardRecords:
        self = cls.__new__(cls)
        self.where, self._data, self._chunks, self._firsts = where, None, chunks, firsts
        self._starts, self._ends, self.digests = starts, ends, digests
        return self

    def __len__(self) -> int:
        return len(self._ends)

    def text(self, i: int) -> bytes:
        """Record ``i``'s stored JSON text (UTF-8 bytes), as it was when the records were read."""
        i = _position(i, len(self), f"the {self.where}")
        start, end = int(self._starts[i]), int(self._ends[i])
        if self._data is not None:
            return self._data[start:end]
        path = self._chunks[int(np.searchsorted(self._firsts, i, side="right")) - 1]
        return self._checked(path, i, self._read(path, i, start, end))

    def texts(self) -> Iterator[bytes]:
        """Every record's text in order, as :meth:`text` gives it, read :data:`_BLOCK` records at a time: a launch
        reading every record's stored count spent most of its time opening a file per record."""
        if self._data is not None:
            yield from (self.text(i) for i in range(len(self)))
            return
        for k, path in enumerate(self._chunks):
            first, last = int(self._firsts[k]), int(self._firsts[k + 1])
            for lo in range(first, last, _BLOCK):  # a chunk's records lie in order, one after another
                hi = min(lo + _BLOCK, last)
                starts, ends = self._starts[lo:hi].tolist(), self._ends[lo:hi].tolist()
                block = self._read(path, lo, starts[0], ends[-1])
                for i, a, b in zip(range(lo, hi), starts, ends):
                    yield self._checked(path, i, block[a - starts[0] : b - starts[0]])

    def _read(self, path: str, i: int, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of ``path``, which holds record ``i`` (the first of them)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                return os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        except OSError as e:
            raise ShardError(
                f"{path}: cannot read record {i} ({e.strerror or e}); the shard set changed after it was read: "
                "restart"
            ) from None

    def _checked(self, path: str, i: int, data: bytes) -> bytes:
        """``data``, record ``i``'s text read from ``path``, if its digest is the one read at the start."""
        if _digest(data) != self.digests[i].tobytes():
            raise ShardError(
                f"{path}: record {i} is no longer the one read at the start (the shard set was written again or "
                "changed after it was read); restart to read it again"
            )
        return data

    def parse(self, i: int) -> tuple[Record, list[float]]:
        """Record ``i`` and its audios' seconds (NaN where the audio could not be read at sharding time)."""
        obj = self.entry(i)
        try:
            return _record_from(obj), _seconds_of(obj)
        except (ValueError, KeyError, TypeError) as e:  # a damaged chunk's bytes that still decode
            raise self._not_a_record(i, e) from None

    def entry(self, i: int) -> dict[str, Any]:
        """Record ``i``'s stored JSON object (see :func:`_record_item`)."""
        i = _position(i, len(self), f"the {self.where}")
        return self._loads(i, self.text(i))

    def _loads(self, i: int, text: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise TypeError(f"a JSON {type(obj).__name__}, not an object")
            return obj
        except (ValueError, TypeError) as e:
            raise self._not_a_record(i, e) from None

    def _not_a_record(self, i: int, e: Exception) -> ShardError:
        return ShardError(
            f"{self.where}: entry {i} is not a record this code wrote ({type(e).__name__}: {e}); write the shards "
            "again"
        )

    def record_digest(self, i: int) -> bytes | None:
        """The digest of record ``i`` that its audio sample holds too (None: written before such digests)."""
        text = self.text(i)
        try:
            return bytes.fromhex(json.loads(text)["digest"])
        except (ValueError, KeyError, TypeError):
            return None

    def __getitem__(self, i: int | slice) -> Record | list[Record]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self.parse(j)[0] for j in range(*i.indices(len(self)))]
        return self.parse(i)[0]


def _chunk_digests(data: bytes, starts: np.ndarray, ends: np.ndarray, first: int) -> np.ndarray | None:
    """[N] uint64 digests of the records at ``data[starts[k]:ends[k]]`` (a ``records/`` chunk's bytes, each record
    after its 4-byte size), or None unless every one is UTF-8 text led by its index (``{"index": <first + k>,``):
    what :func:`_litdata_texts` checks, for which it names the record that fails."""
    raw = np.frombuffer(data, dtype=np.uint8)
    # records 4 MiB at a time (a copy of the chunk would double what opening takes), their sizes as zeros: a
    # character cut at a record's edge is no UTF-8 either
    groups = np.unique(np.searchsorted(starts, np.arange(0, len(data), 4 << 20)))
    for lo, hi in zip(groups.tolist(), [*groups[1:].tolist(), len(starts)]):
        if lo == hi:
            continue
        text = raw[int(starts[lo]) - 4 : int(ends[hi - 1])].copy()
        for j in range(1, 5):
            text[starts[lo:hi] - int(starts[lo]) + 4 - j] = 0
        try:
            str(text.data, "utf-8")
        except UnicodeError:
            return None
    out, view, blake2b = bytearray(8 * len(starts)), memoryview(data), hashlib.blake2b
    for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        if not data.startswith(b'{"index": %d,' % (first + k), a):
            return None
        out[8 * k : 8 * k + 8] = blake2b(view[a:b], digest_size=8).digest()  # _digest, inlined
    view.release()
    return np.frombuffer(out, dtype="<u8")


def _local_records(where: str) -> ShardRecords | None:
    """The records of a local ``records/`` folder as :class:`ShardRecords` on disk, its chunk files read whole, one
    at a time; None when the folder is not laid out as this code writes it with litdata 0.2.76 (one UTF-8 string
    per sample, uncompressed, unencrypted: the offsets table of each chunk, then each sample's 4-byte size and its
    bytes) or any record is not as :func:`_litdata_texts` expects: the caller reads it through litdata, which
    names what is wrong as it did."""
    try:
        with open(os.path.join(where, INDEX), encoding="utf-8") as f:
            index = json.load(f)
        config, listed = index["config"], index["chunks"]
        if (
            config.get("data_format") != ["str"]
            or config.get("item_loader") != "PyTreeLoader"
            or any(config.get(k) is not None for k in ("compression", "encryption", "ipc_compression"))
        ):
            return None
        names = [str(c["filename"]) for c in listed]
        counts = [int(c["chunk_size"]) for c in listed]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    chunks = [os.path.abspath(os.path.join(where, name)) for name in names]
    firsts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    starts, ends, digests = [], [], []
    for k, (path, n) in enumerate(zip(chunks, counts)):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        table = 4 + 4 * (n + 1)
        if n < 0 or len(data) < table or struct.unpack_from("<I", data)[0] != n:
            return None
        offsets = np.frombuffer(data, dtype="<u4", count=n + 1, offset=4).astype(np.int64)
        if n and (offsets[0] != table or offsets[-1] != len(data) or np.any(np.diff(offsets) < 4)):
            return None
        raw = np.frombuffer(data, dtype=np.uint8)
        at = offsets[:-1]
        sizes = np.ascontiguousarray(raw[at[:, None] + np.arange(4)]).view("<u4")[:, 0]
        if np.any(sizes != offsets[1:] - at - 4):  # one leaf per sample: its size, then its bytes
            return None
        a, b = at + 4, offsets[1:]
        found = _chunk_digests(data, a, b, int(firsts[k]))
        if found is None:
            return None
        starts.append(a.astype(np.uint32))
        ends.append(b.astype(np.uint32))
        digests.append(found)
        del data, raw
    if not chunks:
        return None

    def joined(parts: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return ShardRecords._on_disk(
        where, chunks, firsts, joined(starts, "<u4"), joined(ends, "<u4"), joined(digests, "<u8")
    )


def _litdata_texts(where: str, ds: Any) -> Iterator[bytes]:
    """Every record's text of ``where`` read sample by sample through litdata's ``StreamingDataset`` ``ds``."""

    def entry(i: int) -> str:
        try:
            return ds[i]
        except UnicodeError as e:  # a damaged chunk: bytes that are no UTF-8 text
            raise ShardError(
                f"{where}: entry {i} is not a record's text ({e}); write the shards again"
            ) from None

    entry(0)  # opens the index: len(ds.cache) counts every record (len(ds) only this rank's share under DDP)
    ds.on_demand_bytes = False  # remote: one download per chunk, not one request per record
    for i in range(len(ds.cache)):
        text = entry(i).encode("utf-8")
        # the index leads each JSON object: a cheap check that records/ is whole and in order
        if not text.startswith(b'{"index": %d,' % i):
            raise ShardError(f"{where}: entry {i} is {text[:40]!r}...; write the shards again")
        yield text


_SPOOL_PREFIX, _SPOOL_SUFFIX = ".musicflamingo-records-", ".bin"
# this process's spool files' descriptors: each holds its file's flock until exit
_spool_locks: list[int] = []


def _spool_host() -> str:
    """This machine's name as spool file names carry it (``<prefix><host>-<random>.bin``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _remove_spool(path: str, pid: int) -> None:
    if os.getpid() == pid:  # the process that wrote it (a forked worker's exit leaves it to its parent)
        with contextlib.suppress(OSError):
            os.unlink(path)


# Spool files of the version that took no lock and named no host (``<prefix><8 of mkstemp's letters>.bin``): nothing
# tells a live job's from a dead one's but use, so they go once nothing read or wrote them for a week (a live job
# reads its records at every sample; the kernel's relatime still marks a read once a day)
_UNLOCKED_SPOOL = re.compile(re.escape(_SPOOL_PREFIX) + r"[a-z0-9_]{8}" + re.escape(_SPOOL_SUFFIX))
_UNLOCKED_SPOOL_IDLE_S = 7 * 86400


def _remove_unlocked_spool(path: str) -> None:
    """Remove ``path`` (an :data:`_UNLOCKED_SPOOL` file) when neither read nor written for
    :data:`_UNLOCKED_SPOOL_IDLE_S`."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return
        if time.time() - max(st.st_atime, st.st_mtime) > _UNLOCKED_SPOOL_IDLE_S:
            os.unlink(path)
            log.info("removed %s, the shard records of a job of an earlier version, unused for a week", path)
    except OSError:
        pass


def _remove_stale_spools(folder: str) -> None:
    """Remove this machine's spool files in ``folder`` that no live process holds: a process killed with SIGKILL
    (or out of memory) runs no exit handler, and its copy of the records stayed in the temporary folder for good.
    Each spool file is flocked from before it has its name until its process and its forked workers have all ended
    (the kernel drops the lock however they end): a lock that can be taken is a dead job's file, whatever became of
    its pid. Another live job's is left alone, and so are other machines' files (a shared folder whose locks may be
    local to each machine) and files whose lock this file system cannot take. Files of the version before, unlocked
    and named without the host, go once unused for a week (:func:`_remove_unlocked_spool`)."""
    mine = re.compile(re.escape(_SPOOL_PREFIX + _spool_host()) + r"-[a-z0-9_]+" + re.escape(_SPOOL_SUFFIX))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if _UNLOCKED_SPOOL.fullmatch(name):
            _remove_unlocked_spool(path)
            continue
        if not mine.fullmatch(name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # still the file this lock is on
                os.unlink(path)
                log.info("removed %s, the shard records of a job that ended without its exit handlers", path)
        except OSError:  # held by a live process (or gone meanwhile, or not lockable here): left alone
            pass
        finally:
            os.close(fd)


def _spooled_records(where: str, texts: Iterator[bytes], cache_dir: str | None) -> ShardRecords:
    """``texts`` written one after another to a file of this process's own (in ``cache_dir``, else the temporary
    folder; removed at exit) and held as :class:`ShardRecords` on disk, as a local folder's records are: an object
    store's records took their whole text in memory on every rank (about 370 bytes a record: 3.7 GiB per rank
    for 10 million), twice while they were read. Files that killed jobs left there are removed first
    (:func:`_remove_stale_spools`)."""
    folder = cache_dir if cache_dir is not None else tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    _remove_stale_spools(folder)
    # locked under a name no cleaner takes, then renamed: another process's cleanup never sees it unlocked (where
    # the file system takes no lock, it keeps that name: removed at exit only)
    fd, path = tempfile.mkstemp(prefix=f"{_SPOOL_PREFIX}{_spool_host()}-", suffix=".new", dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    else:
        os.rename(path, path.removesuffix(".new") + _SPOOL_SUFFIX)
        path = path.removesuffix(".new") + _SPOOL_SUFFIX
    finally:
        _spool_locks.append(fd)  # never closed: the lock lasts as long as the process
        atexit.register(_remove_spool, path, os.getpid())
    starts, ends, digests, pos = array.array("q"), array.array("q"), bytearray(), 0
    try:
        with os.fdopen(os.dup(fd), "wb") as f:  # a duplicate: closing it keeps the lock
            for text in texts:
                f.write(text)
                starts.append(pos)
                pos += len(text)
                ends.append(pos)
                digests += _digest(text)
    except BaseException:
        _remove_spool(path, os.getpid())
        raise
    return ShardRecords._on_disk(
        where,
        [path],
        np.asarray([0, len(starts)], dtype=np.int64),
        np.asarray(starts, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
        np.frombuffer(bytes(digests), dtype="<u8"),
    )


def read_shard_records(url: str, cache_dir: str | None = None) -> ShardRecords:
    """The records of ``<url>/records`` (text only), in shard order, held as their places in its chunk files (a
    local folder's) or in a file they are copied to as they are read (an object store's: ``cache_dir``, else the
    temporary folder; see :class:`ShardRecords`)."""
    where = _join(url, RECORDS)
    ds = _streaming(where, cache_dir)  # a missing, short or unreadable index or chunk named as before
    if not is_url(url):
        found = _local_records(where)
        if found is not None:
            return found
    return _spooled_records(where, _litdata_texts(where, ds), cache_dir)


class ShardDataset(ConversationDataset):
    """:class:`~musicflamingo.data.dataset.ConversationDataset` over a shard folder or URL (see the module doc).

    Args:
        url: what :func:`write_shards` wrote to.
        processor: as for :class:`ConversationDataset`; ``**kwargs`` are its options (bad-sample policy, ...).
        cache_dir: where litdata keeps downloaded index files and chunks of remote shards (default: litdata's).

    ``dataset[i]`` equals the manifest dataset's ``[i]`` (same dict, same bad samples).
    """

    def __init__(
        self, url: str | os.PathLike, processor: Any, *, cache_dir: str | None = None, **kwargs: Any
    ):
        super().__init__([], processor, **kwargs)
        self.url, self.cache_dir = os.fspath(url), cache_dir
        self.records = read_shard_records(self.url, cache_dir)
        # the StreamingDataset and the process that opened it: each reading process (a DataLoader worker) opens
        # its own, also when it was forked from one that had opened one
        self._audio: Any = None
        self._pid = 0
        self._blobs: dict[AudioRef, bytes] = {}  # the sample being built: its audios' bytes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_audio": None, "_blobs": {}}

    def __getitem__(self, index: int) -> Any:
        if self._audio is None or self._pid != os.getpid():
            self._audio, self._pid = _streaming(self.url, self.cache_dir), os.getpid()
        try:
            data = self._audio[int(index)]
        except (ValueError, IndexError) as e:  # litdata's words for an index past its samples
            raise ShardError(
                f"{self.url}: no audio sample {index} for its {len(self.records)} records ({e}); the audio and "
                "records halves were written by different runs: write the shards again"
            ) from None
        try:
            stored, written, blobs = _unpack(data)
        except (ValueError, TypeError, struct.error) as e:
            raise ShardError(
                f"{self.url}: audio sample {index}{_chunk_of(self.url, index)} ({self.records[index].source}) is "
                f"damaged ({e}); write the shards again"
            ) from None
        if stored != index:
            raise ShardError(f"{self.url}: sample {index} holds record {stored}; write the shards again")
        expected = self.records.record_digest(index)
        if (
            written != expected
        ):  # one of them None: one half written before the digests were, so by another run
            raise ShardError(
                f"{self.url}: audio sample {index}{_chunk_of(self.url, index)} was written for another record than "
                f"{RECORDS}/ entry {index} ({self.records[index].source}): the audio and records halves come from "
                "different writes (a chunk or records/ replaced after writing, or a write stopped between the "
                "halves); write the shards again"
            )
        self._blobs = dict(zip(self.records[index].audios, blobs))
        try:
            return super().__getitem__(index)
        finally:
            self._blobs = {}

    def _audio_bytes(self, ref: AudioRef) -> bytes | None:
        return self._blobs[ref]

    def estimate_lengths(self, known: Sequence[int] | None = None, seconds: Any = None) -> list[int]:
        """Token counts [N]: those stored at sharding time where they were made under this processor's settings
        (``shard --processor``: nothing tokenized), else estimated from the seconds stored then (no audio is
        fetched): the manifest's numbers either way. (``known``/``seconds`` come from a manifest index; shards
        carry their own seconds and ignore them.)"""
        return self.token_lengths()[0].tolist()

    def token_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`estimate_lengths` as int64 [N], and bool [N]: True where the count was the stored one (False:
        estimated now), so that the data module's log line says which."""
        settings = counts_digest(self.processor)
        out, unknown, first, estimated, other, stored = [], 0, None, 0, 0, []
        for i, text in enumerate(self.records.texts()):
            obj = self.records._loads(i, text)
            # only the reading of the entry is the shards' fault: an error tokenizing it (estimate_num_tokens,
            # below) is the processor's, which writing the shards again would not fix
            try:
                secs = _seconds_of(obj)
                count = obj.get("tokens")
                taken = (
                    isinstance(count, int)
                    and not isinstance(count, bool)
                    and obj.get("counted_with") == settings
                )
                record = None if taken else _record_from(obj)
                if any(math.isnan(s) for s in secs):
                    unknown += 1
                    if first is None:
                        record = record or _record_from(obj)
                        first = (
                            next(a.path for a, s in zip(record.audios, secs) if math.isnan(s)),
                            record.source,
                        )
            except (ValueError, KeyError, TypeError) as e:  # a damaged chunk's bytes that still decode
                raise self.records._not_a_record(i, e) from None
            stored.append(taken)
            if taken:
                out.append(count)
            else:  # ~0.4 ms a record: tokenized
                out.append(estimate_num_tokens(record, self, secs))
                estimated += 1
                other += "counted_with" in obj
        # counts made for another tokenizer, chat template or window settings, or under another COUNTS_VERSION
        if other:
            log.warning(
                "%s: %d records' stored token counts were made with other processor settings (tokenizer, system "
                "prompt, audio token or window settings) than data.processor's, or by an older way of counting; "
                "estimating them now (~0.4 ms a record, at every launch). To skip this, write the shards again "
                "with that processor: "
                "python -m musicflamingo.data shard MANIFEST OUT --processor <data.processor folder> --overwrite",
                self.url,
                other,
            )
        elif estimated:  # shards written without --processor (or by an older version)
            log.info(
                "%s: no stored token counts; estimating %d records' lengths (`python -m musicflamingo.data shard ... "
                "--processor <data.processor folder>` stores them and skips this)",
                self.url,
                estimated,
            )
        if (
            first is not None
        ):  # counted as no audio: a long one passes the batch budget (and overflows packed rows)
            log.warning(
                "%s: %d records hold audio of no known length (first: %s, %s), counted as no audio when batching: "
                "audio missing or undecodable when written (a bad sample when trained on), or, in shards an older "
                "version wrote, raw AAC or an MP3 without a Xing frame (write the shards again)",
                self.url,
                unknown,
                *first,
            )
        return np.asarray(out, dtype=np.int64), np.asarray(stored, dtype=bool)


# ---------------------------------------------------------------------------------------------- command line
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``shard MANIFEST OUT``: the subcommand of ``python -m musicflamingo.data``."""
    p = subparsers.add_parser(
        "shard",
        help="write a manifest and its audio as litdata shards (a local folder or s3://, gs://... URL)",
        description="Write MANIFEST (validated as for training) and its audio files as litdata shards to OUT; "
        "train from them with data.train=OUT.",
    )
    p.add_argument("manifest", help="JSONL (or JSON list) manifest")
    p.add_argument("out", help="output folder or object store URL (must not hold shards yet)")
    p.add_argument("--audio-root", default=None, help="folder relative audio paths resolve against")
    p.add_argument("--chunk-bytes", default="64MB", help="target chunk size (default 64MB)")
    p.add_argument("--workers", type=int, default=1, help="processes reading files (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument(
        "--processor",
        default=None,
        help="folder with the tokenizer/processor files (data.processor): stores each record's token count, so that "
        "a training launch with that processor tokenizes nothing (without it, every launch tokenizes every record "
        "on every rank, ~0.4 ms each)",
    )
    p.set_defaults(func=main_shard)
    return p


def main_shard(args: argparse.Namespace) -> None:
    n = write_shards(
        args.manifest,
        args.out,
        audio_root=args.audio_root,
        chunk_bytes=args.chunk_bytes,
        workers=args.workers,
        overwrite=args.overwrite,
        processor=None if args.processor is None else MusicFlamingoProcessor.from_pretrained(args.processor),
    )
    print(json.dumps({"records": n, "shards": args.out}))
