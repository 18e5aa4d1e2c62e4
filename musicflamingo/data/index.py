"""Manifest index: every record's audio durations and token count, computed once so that a training launch reads
no audio header and tokenizes nothing (audiocraft precomputes its metadata the same way).

    python -m musicflamingo.data index data/train.jsonl --processor CKPT_DIR    # -> data/train.jsonl.index.parquet

File: ``<manifest>.index.parquet``, one row per record in manifest order: ``line`` int32 (where the record starts),
``hash`` uint64 (BLAKE2b-64 of the record's line), ``tokens`` int32 (:func:`~musicflamingo.data.dataset.
estimate_num_tokens`), ``seconds`` list<float64> (per audio: its header's length, or where no header states one,
as in a raw AAC stream, its decoded length, an hour at most; NaN when it could not be read). The schema metadata
holds the settings the numbers depend on (:func:`index_settings`).

Why Parquet: a launch reads two columns of a million rows straight into numpy in milliseconds; a JSONL sidecar would
cost a ``json.loads`` per record, the very cost the index exists to remove. pyarrow is already a dependency.

When a row counts:

* its ``hash`` equals the hash of a record's line (rows are matched by content, so inserting, deleting or
  reordering lines keeps the other rows valid). Hashing every line at each launch costs about a second per
  million records and catches any edit; the manifest's size and mtime would miss a same-size edit and flag a mere
  copy, so they are not used. A JSON-list manifest hashes each record's parsed audios and messages instead (it has
  no lines; an absent ``id`` defaults to the record's line, so it is left out, as the other fields the numbers do
  not depend on are).
* its settings agree: the format version and ``audio_root`` for the durations; for the counts also the tokenizer
  (a digest of its model), system prompt, audio token, window settings and the ids of a probe conversation (which
  catch a change to the chat template code).

A stale row is never used: under ``index="auto"`` those records are estimated at launch (with a warning naming the
index and what changed), under ``"require"`` the launch stops.

A build writes what it has done to the index file every ``--save-every`` seconds (60), atomically as the final
write, and updates that snapshot when it then stops on an error or Ctrl-C: a build killed after hours keeps its
rows, and the same command run again reuses them and computes only the rest (with ``--force`` too: a forced
build's snapshot holds its start time, and a forced rerun recomputes the rows whose audio files changed since, by
their ctime, which copies keeping mtimes do not set back). A snapshot is an index like any other, marked partial in
its metadata: training under ``index="auto"`` takes its rows and estimates the rest with a warning; its rows may
hold durations without a count (``tokens`` -1: a record whose durations an older index gave and whose count was not
yet recomputed). One build of a manifest runs at a time (``.<manifest>.index.parquet.lock``): a second one is refused,
naming the first's pid, as the two would replace each other's rows.

Audio files count as immutable, as in audiocraft: checking millions of files' mtimes at launch would cost what the
index saves on network storage; after replacing audio in place, rebuild with ``--force``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from musicflamingo.data.dataset import (
    ConversationDataset,
    decoded_seconds,
    estimate_num_tokens,
    record_seconds,
    relative_path_hint,
)
from musicflamingo.data.manifest import (
    CompactRecords,
    JsonListRecords,
    JsonlRecords,
    ManifestError,
    Record,
    is_json_list,
)
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.runfolder import FolderLock

log = logging.getLogger(__name__)

SUFFIX = ".index.parquet"
# Bump when the code that computes durations or counts (estimate_num_tokens, manifest parsing) changes its results,
# or when the index's own format does.
INDEX_VERSION = 1
# Bump when estimate_num_tokens counts a record of known durations differently (bump INDEX_VERSION too): the version
# in counts_digest, which shards store beside their counts. Not INDEX_VERSION, so that a change to the index alone
# leaves every shard set's counts valid.
COUNTS_VERSION = 1
MODES = ("auto", "off", "require")
_META_KEY = b"musicflamingo.index"
# in a snapshot of a build still running or interrupted: {"force": bool, "started": ns}; absent from a finished
# index
_PARTIAL_KEY = b"musicflamingo.index.partial"
SAVE_EVERY = 60.0  # seconds between a build's snapshots
_SECONDS_KEYS = (
    "version",
    "hashes",
    "audio_root",
)  # the settings the durations depend on; counts depend on all


class ManifestIndexError(ValueError):
    """An index is missing or stale under ``index="require"``, or unreadable; the message names the file."""


def index_path(manifest: str | os.PathLike) -> Path:
    """``<manifest>.index.parquet``, beside the manifest."""
    return Path(os.fspath(manifest) + SUFFIX)


def _digest(data: bytes | str) -> str:
    return hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=8).hexdigest()


def index_settings(processor: Any, audio_root: str | os.PathLike | None, hashes: str) -> dict[str, Any]:
    """What an index's numbers depend on. ``hashes``: ``"line"`` (JSONL) or ``"content"`` (JSON list)."""
    probe = [
        {"role": "user", "content": f"{processor.audio_token}Describe the track: tempo, key, metre?"},
        {"role": "assistant", "content": "A slow ballad at 72 BPM in A minor, 3/4.\nÉtude — 音楽 🎵"},
    ]
    ids, _ = processor.chat_encoder().encode(probe, [3])
    fe = processor.feature_extractor
    return {
        "version": INDEX_VERSION,
        "hashes": hashes,
        # None: each manifest's folder, so a manifest moved with its audio stays indexed
        "audio_root": None if audio_root is None else str(Path(audio_root).resolve()),
        "tokenizer": _digest(processor.tokenizer.model_bytes()),  # vocabulary, merges
        "system_prompt": _digest(processor.default_system_prompt),
        "audio_token": processor.audio_token,
        "chunk_length": float(processor.chunk_length),
        "max_audio_len": float(processor.max_audio_len),
        "sampling_rate": int(processor.sampling_rate),
        "probe": _digest(np.asarray(ids, dtype=np.int64).tobytes()),
        # the mel front end sets the audio token counts (a folder's preprocessor_config.json may change it)
        "n_fft": int(fe.n_fft),
        "hop_length": int(fe.hop_length),
    }


def counts_digest(processor: Any) -> str:
    """A digest (16 hex digits) of what a record's token count depends on once its audios' durations are known:
    :func:`index_settings` less the manifest's hash kind and ``audio_root`` (durations only), versioned by
    :data:`COUNTS_VERSION`, not :data:`INDEX_VERSION`. Shards store it beside each record's count
    (:mod:`musicflamingo.data.shards`), so a count is used only under the settings it was made with."""
    settings = index_settings(processor, None, "")
    del settings["hashes"], settings["audio_root"]
    # under the key INDEX_VERSION had: the digests of shards written while both were 1 stay the same
    settings["version"] = COUNTS_VERSION
    return _digest(json.dumps(settings, sort_keys=True))


def _records(path: Path, audio_root: str | os.PathLike | None) -> JsonlRecords:
    """A JSONL manifest's :class:`JsonlRecords`, or a JSON list's :class:`JsonListRecords` (read on access)."""
    return _open(path, audio_root, hashes=False)[0]


def _open(
    path: Path, audio_root: str | os.PathLike | None, hashes: bool = True
) -> tuple[JsonlRecords, np.ndarray | None, str]:
    """The manifest's records, their hashes [N] uint64 (``hashes``) and the hash kind."""
    if not is_json_list(path):
        jsonl = JsonlRecords(path, audio_root)  # hashed while it held the file's bytes
        return jsonl, jsonl.digests if hashes else None, "line"
    digests = bytearray()

    def content(r: Record) -> None:  # the id and the other fields left out ("record" hashes held them)
        digests.extend(hashlib.blake2b(repr((r.audios, r.messages)).encode(), digest_size=8).digest())

    listed = JsonListRecords(path, audio_root, on_record=content if hashes else None)
    return listed, np.frombuffer(digests, dtype="<u8") if hashes else None, "content"


def _lines(records: Sequence[Record]) -> np.ndarray:
    if isinstance(records, (JsonlRecords, CompactRecords)):
        return records.lines
    return np.asarray([int(r.source.rsplit(":", 1)[1]) for r in records], dtype=np.int64)


@dataclass
class StoredIndex:
    """An index file's contents: ``hashes`` [R] uint64, ``tokens`` [R] int64 (-1: durations only, in a snapshot),
    ``settings``, ``unread`` [R] bool (an audio's header could not be read when the row was built: its count holds
    no audio), ``partial`` (a build's snapshot: ``{"force": bool}``, else None); durations on demand."""

    path: Path
    hashes: np.ndarray
    tokens: np.ndarray
    settings: dict[str, Any]
    unread: np.ndarray
    partial: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: Path) -> StoredIndex:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_schema(path).metadata
            meta = json.loads(metadata[_META_KEY])
            partial = json.loads(metadata[_PARTIAL_KEY]) if _PARTIAL_KEY in metadata else None
            table = pq.read_table(path, columns=["hash", "tokens", "seconds"])
            seconds = table.column("seconds").combine_chunks()
            nan = pc.is_nan(pc.list_flatten(seconds)).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(seconds).to_numpy()
        except Exception as e:  # a truncated or foreign file: whatever pyarrow or json raise
            raise ManifestIndexError(f"{path}: unreadable manifest index ({e}); rebuild it") from None
        hashes = table.column("hash").to_numpy()
        unread = np.zeros(len(hashes), dtype=bool)
        unread[parents[nan]] = True
        tokens = table.column("tokens").to_numpy().astype(np.int64)
        del table, seconds, nan, parents
        # pyarrow's allocator keeps what reading the columns took (~70 MB per million rows, on every rank for the
        # run) unless asked to give it back
        pa.default_memory_pool().release_unused()
        return cls(path, hashes, tokens, meta, unread, partial)

    def seconds(self) -> list[list[float]]:
        """Per row, its audios' durations (NaN: unknown)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=["seconds"]).column("seconds").to_pylist()

    def match(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash [N], the row holding it, or -1."""
        if not len(self.hashes):
            return np.full(len(hashes), -1, dtype=np.int64)
        order = np.argsort(self.hashes, kind="stable")
        ordered = self.hashes[order]
        pos = np.minimum(np.searchsorted(ordered, hashes), len(order) - 1)
        return np.where(ordered[pos] == hashes, order[pos], -1)

    def changes(self, settings: dict[str, Any]) -> dict[str, str]:
        """The settings that differ from ``settings``: ``{name: "name old -> new"}`` (digests: "name changed")."""
        out = {}
        for key, now in settings.items():
            was = self.settings.get(key, _RECORDED_LATER.get(key))
            if was != now:
                digest = key in ("tokenizer", "system_prompt", "probe")
                out[key] = f"{key} changed" if digest else f"{key} {was!r} -> {now!r}"
        return out


# Settings added to the metadata after indexes were built without them, and the value every such index had.
_RECORDED_LATER = {"n_fft": 400, "hop_length": 160}


def _usable(changes: dict[str, str]) -> tuple[bool, bool]:
    """(durations usable, counts usable) given the changed settings."""
    seconds_ok = not any(key in _SECONDS_KEYS for key in changes)
    return seconds_ok, seconds_ok and not changes


# ---------------------------------------------------------------------------------------------- training
@dataclass
class IndexedManifest:
    """A manifest's records and what its index knows of them.

    ``tokens`` [N] int64: each record's count, -1 where the index has none (None: no index used); ``seconds``:
    record -> its audios' durations, for records whose count is stale but whose durations are not.
    Pass both to :meth:`~musicflamingo.data.dataset.ConversationDataset.estimate_lengths`.
    """

    records: Sequence[Record]
    tokens: np.ndarray | None = None
    seconds: dict[int, list[float]] | None = None


def _build_command(path: Path) -> str:
    return f"python -m musicflamingo.data index {path} --processor <data.processor folder>"


def load_manifest(
    path: str | os.PathLike,
    processor: Any,
    audio_root: str | os.PathLike | None = None,
    index: str = "auto",
) -> IndexedManifest:
    """Read a manifest for training and take what its index knows.

    A JSONL manifest comes as :class:`~musicflamingo.data.manifest.JsonlRecords` (parsed on access: the index's
    rows stand for records already checked when it was built; the others are parsed, and so checked, when their
    lengths are estimated). ``index``: ``"auto"`` (use a valid index, estimate what it lacks, warn when stale),
    ``"off"`` (ignore index files) or ``"require"`` (:class:`ManifestIndexError` when missing or stale).
    """
    if index not in MODES:
        raise ValueError(f"index must be one of {', '.join(MODES)}, got {index!r}")
    path = Path(path)
    where = index_path(path)
    if index == "off":
        return IndexedManifest(_records(path, audio_root))
    if not where.is_file():
        if index == "require":
            raise ManifestIndexError(
                f"{path}: no index ({where.name}) and data.index=require; build it: {_build_command(path)}"
            )
        records = _records(path, audio_root)
        command = _build_command(path)
        log.info(
            "%s: no index; estimating %d records' lengths (`%s` skips this)", path, len(records), command
        )
        return IndexedManifest(records)
    try:
        stored = StoredIndex.read(where)
    except ManifestIndexError as e:
        if index == "require":
            raise
        log.warning("%s; estimating every record's length instead", e)
        return IndexedManifest(_records(path, audio_root))
    records, hashes, kind = _open(path, audio_root)
    changes = stored.changes(index_settings(processor, audio_root, kind))
    seconds_ok, tokens_ok = _usable(changes)
    rows = stored.match(hashes)
    hit = np.flatnonzero(rows >= 0)
    # rows built while an audio could not be read (a download not finished) count no audio: estimated anew, so
    # a file that is there now is counted (an unreadable one is the data set's bad-sample policy's, not stale)
    unread = hit[stored.unread[rows[hit]]]
    hit = hit[~stored.unread[rows[hit]]]
    tokens = np.full(len(records), -1, dtype=np.int64)
    seconds: dict[int, list[float]] = {}
    if tokens_ok:
        tokens[hit] = stored.tokens[rows[hit]]
    durations = hit if not tokens_ok else hit[tokens[hit] < 0]  # an interrupted build's rows without a count
    if seconds_ok and len(durations):
        table = stored.seconds()
        seconds = {i: table[r] for i, r in zip(durations.tolist(), rows[durations].tolist())}
    problems = [f"built for other settings ({', '.join(changes.values())})"] if changes else []
    if stored.partial is not None:
        problems.append(
            f"written by an interrupted build ({len(stored.hashes)} rows); run the build again to finish it"
        )
    missing = len(records) - len(hit) - len(unread)
    if len(unread):
        log.warning(
            "%s: %d records had audio that could not be read when %s was built (first: line %d); estimating "
            "them now",
            path,
            len(unread),
            where.name,
            int(_lines(records)[unread[0]]),
        )
    if missing:
        first = int(_lines(records)[np.flatnonzero(rows < 0)[0]])
        problems.append(
            f"{missing} of {len(records)} records are not in it (new or edited; first: line {first})"
        )
    if problems:
        message = f"{where} is stale: {'; '.join(problems)}"
        if index == "require":
            raise ManifestIndexError(
                f"{message}; rebuild it: {_build_command(path)} (or set data.index=auto)"
            )
        todo = int((tokens < 0).sum())
        log.warning("%s; estimating those %d records now. Rebuild: %s", message, todo, _build_command(path))
    else:
        log.info("%s: lengths of %d records from %s", path, len(records), where.name)
    return IndexedManifest(records, tokens, seconds)


# ---------------------------------------------------------------------------------------------- building
class _Estimates(Dataset):
    """Chunks of records -> ``([(record, seconds, tokens)], error)``, run in DataLoader workers; a record that does
    not parse ends its chunk with its error message (raised by the main process, after keeping the rows before)."""

    def __init__(self, dataset: ConversationDataset, chunks: list[list[int]], seconds: list) -> None:
        self.dataset, self.chunks, self.seconds = dataset, chunks, seconds

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, c: int) -> tuple[list[tuple[int, list[float], int]], str | None]:
        out = []
        for i in self.chunks[c]:
            try:
                record = self.dataset.records[i]
            except ManifestError as e:
                return out, str(e)
            seconds = self.seconds[i] if self.seconds[i] is not None else _seconds(record, self.dataset)
            out.append((i, seconds, estimate_num_tokens(record, self.dataset, seconds)))
        return out, None


def _seconds(record: Record, dataset: ConversationDataset) -> list[float]:
    """:func:`record_seconds`, with an audio whose length no header states (a raw AAC stream, an MP3 without a
    Xing frame) decoded once here, as :func:`estimate_num_tokens` would decode it at every launch: its row then
    holds the decoded length (in seconds whose count of samples is exactly the decoded one), not NaN; one longer
    than :data:`~musicflamingo.data.dataset.DECODED_SECONDS_CAP` holds that bound (exact for a processor keeping at
    most as much; one keeping more decodes it again). NaN stays where it does not decode."""
    seconds = record_seconds(record)
    rate = dataset.processor.sampling_rate
    for k, (ref, s) in enumerate(zip(record.audios, seconds)):
        if not math.isnan(s):
            continue
        try:  # decoded further than a run keeps (20 min): a stopped decode's length would count short elsewhere
            seconds[k] = decoded_seconds(ref.path, rate, ref.offset, ref.duration)
        except Exception as e:  # the sample names its problem when built; the build's report counts it
            log.debug("%s (%s): %s", ref.path, record.source, e)
    return seconds


# a file's ctime comes from the kernel's coarse clock (milliseconds behind time.time_ns) or a file server's clock
_CTIME_SLACK_NS = 2_000_000_000


def _audio_unchanged(records: Sequence[Record], which: np.ndarray, started: Any) -> np.ndarray:
    """For records ``which`` [K], whether none of their audio files changed since ``started`` (ns; not an int:
    unknown, so all may have), by the files' ctime: ``cp -p`` and ``rsync -a`` set an mtime back, never a ctime."""
    if not isinstance(started, int) or isinstance(started, bool):
        return np.zeros(len(which), dtype=bool)
    limit = started - _CTIME_SLACK_NS

    def unchanged(i: int) -> bool:
        try:
            return all(os.stat(a.path).st_ctime_ns < limit for a in records[i].audios)
        except (OSError, ManifestError):
            return False

    return np.fromiter((unchanged(i) for i in which.tolist()), dtype=bool, count=len(which))


def _unchanged(x: Any) -> Any:
    return x


@dataclass
class BuildReport:
    """What :func:`build_index` did (the command prints it as one JSON line)."""

    manifest: str
    index: str
    records: int
    reused: int
    computed: int
    unreadable_audio: int
    seconds: float


def _remove_dead_temps(where: Path) -> None:
    """Delete `.<index>.<pid>.tmp` files that a build killed mid-write left beside the manifest (a running build's
    own, of a live pid, stay)."""
    for tmp in where.parent.glob(f".{glob.escape(where.name)}.*.tmp"):
        pid = tmp.name[len(where.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("%s: removing %s, left by an interrupted build", where, tmp.name)
            tmp.unlink(missing_ok=True)
        except OSError:  # alive, another user's
            continue


def _write(
    where: Path,
    lines: np.ndarray,
    hashes: np.ndarray,
    tokens: np.ndarray,
    seconds: list[list[float] | None],
    settings: dict[str, Any],
    partial: dict[str, Any] | None = None,
) -> None:
    """Write the rows atomically to ``where``: all of them, or with ``partial`` a snapshot of those that hold a count
    or durations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.arange(len(tokens))
    metadata = {_META_KEY: json.dumps(settings).encode()}
    if partial is not None:
        known = np.fromiter((s is not None for s in seconds), dtype=bool, count=len(seconds))
        rows = np.flatnonzero((tokens >= 0) | known)
        metadata[_PARTIAL_KEY] = json.dumps(partial).encode()
    table = pa.table(
        {
            "line": pa.array(lines[rows], pa.int32()),
            "hash": pa.array(hashes[rows], pa.uint64()),
            "tokens": pa.array(tokens[rows], pa.int32()),
            "seconds": pa.array([seconds[i] for i in rows.tolist()], pa.list_(pa.float64())),
        }
    ).replace_schema_metadata(metadata)
    tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
    _remove_dead_temps(where)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, where)
    except OSError as e:  # pyarrow's own errors (a full disk, a read-only folder) name no file
        raise ManifestIndexError(
            f"{where}: cannot write the index ({e.strerror or e}); the manifest is unchanged and training without "
            "the index estimates the lengths at launch"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def build_index(
    manifest: str | os.PathLike,
    processor: Any,
    audio_root: str | os.PathLike | None = None,
    *,
    force: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    save_every: float = SAVE_EVERY,
) -> BuildReport:
    """Write ``<manifest>.index.parquet``, checking every record as training does (:class:`ManifestError` names
    ``file:line``). Rows of an existing index that are still valid are kept (``force``: recompute all but the rows
    of an interrupted forced build's snapshot whose audio files did not change since it began); the rest read audio
    headers and tokenize, in ``num_workers`` processes. The file is replaced atomically: every ``save_every``
    seconds (at least ten times as long as a write takes) with a snapshot of the rows done, updated when the build
    then stops on an exception; at the end with all rows."""
    start = time.perf_counter()
    path = Path(manifest)
    if audio_root is not None and not os.path.isdir(audio_root):  # else every audio "unreadable", silently
        raise ManifestIndexError(
            f"audio_root {os.fspath(audio_root)}: not a folder (relative audio paths resolve against it)"
        )
    if not save_every >= 0:
        raise ValueError(f"save_every must be >= 0 seconds, got {save_every}")
    where = index_path(path)
    # one build per index: two would replace each other's snapshots (a killed one's could replace the other's
    # finished index with fewer rows)
    lock = FolderLock(
        where.parent,
        f".{where.name}.lock",
        tool=f"index build of {path.name}",
        advice="stop it: two builds of one manifest replace each other's rows",
        error=ManifestIndexError,
    )
    try:
        lock.acquire()
    except OSError as e:
        raise ManifestIndexError(
            f"{where}: cannot write the index ({e.strerror or e}); the manifest is unchanged and training without "
            "the index estimates the lengths at launch"
        ) from e
    try:
        return _build(path, where, processor, audio_root, force, num_workers, progress, save_every, start)
    finally:
        lock.release()


def _build(
    path: Path,
    where: Path,
    processor: Any,
    audio_root: str | os.PathLike | None,
    force: bool,
    num_workers: int,
    progress: bool,
    save_every: float,
    start: float,
) -> BuildReport:
    """:func:`build_index`'s work, under the index's lock."""
    started_ns = time.time_ns()  # before any audio is read: a forced build's rows hold audio unchanged since
    records, hashes, kind = _open(path, audio_root)
    lines = np.asarray(_lines(records), dtype=np.int64)
    settings = index_settings(processor, audio_root, kind)
    tokens = np.full(len(records), -1, dtype=np.int64)
    seconds: list[list[float] | None] = [None] * len(records)
    stored, resumed = None, False
    if where.is_file():
        try:
            stored = StoredIndex.read(where)
        except ManifestIndexError as e:
            log.warning("%s; building it anew", e)
        else:
            # a forced build's own snapshot: its rows were computed after --force began
            resumed = stored.partial is not None and bool(stored.partial.get("force"))
    if stored is not None and (not force or resumed):
        seconds_ok, tokens_ok = _usable(stored.changes(settings))
        rows = stored.match(hashes)
        hit = np.flatnonzero(rows >= 0)
        # an audio unread last time is read again (it may be there now)
        hit = hit[~stored.unread[rows[hit]]]
        if force:  # a forced build's own rows, but not those whose audio was replaced since it began
            kept = _audio_unchanged(records, hit, stored.partial.get("started"))
            if not kept.all():
                log.info(
                    "%s: %d rows of the interrupted forced build are recomputed: their audio files changed since "
                    "it began",
                    where,
                    int((~kept).sum()),
                )
            hit = hit[kept]
        if tokens_ok:
            tokens[hit] = stored.tokens[rows[hit]]
        if seconds_ok:
            table = stored.seconds()
            for i, r in zip(hit.tolist(), rows[hit].tolist()):
                seconds[i] = table[r]
    todo = np.flatnonzero(tokens < 0).tolist()
    reused = len(records) - len(todo)
    if stored is not None and (not force or resumed):
        log.info(
            "%s: %d of %d rows reused from %s, computing %d",
            where,
            reused,
            len(records),
            "an interrupted build's snapshot" if stored.partial is not None else "the index",
            len(todo),
        )
    dataset = ConversationDataset(records, processor)
    size = 256  # records per task: large enough that worker hand-offs cost nothing, small for a smooth bar
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    loader = DataLoader(
        _Estimates(dataset, chunks, seconds),
        batch_size=None,
        num_workers=num_workers if len(chunks) > 1 else 0,
        collate_fn=_unchanged,
    )
    partial = {"force": bool(force), "started": started_ns}

    def snapshot() -> float:
        began = time.perf_counter()
        _write(where, lines, hashes, tokens, seconds, settings, partial)
        return time.perf_counter() - began

    unsaved, done, saved, next_save = 0, 0, False, time.monotonic() + save_every
    bar = tqdm(
        total=len(records),
        initial=reused,
        desc=f"indexing {path.name} ({reused} rows reused)",
        unit="rec",
        disable=not progress,
    )
    try:
        with bar:
            for result, error in loader:
                for i, secs, n in result:
                    seconds[i], tokens[i] = secs, n
                unsaved, done = unsaved + len(result), done + len(result)
                bar.update(len(result))
                if error is not None:
                    raise ManifestError(error)
                if done < len(todo) and time.monotonic() >= next_save:
                    interval = max(save_every, 10 * snapshot())  # writing costs a tenth of the time at most
                    unsaved, saved, next_save = 0, True, time.monotonic() + interval
    except BaseException:
        # a bad record, Ctrl-C, a worker's death after a snapshot: it takes the rows computed since (a build that
        # stops before its first snapshot leaves the index as it was)
        if saved and unsaved:
            try:
                snapshot()
                log.warning(
                    "%s: the %d rows done so far are kept; the same command continues from them",
                    where,
                    int((tokens >= 0).sum()),
                )
            except Exception as e:  # the error that stopped the build is the one to report
                log.warning("%s: could not keep the rows computed so far (%s)", where, e)
        raise
    _write(where, lines, hashes, tokens, seconds, settings)
    unread = [i for i, secs in enumerate(seconds) if secs and any(math.isnan(s) for s in secs)]
    if unread:  # the report's count alone named no file to look at
        first = records[unread[0]]
        bad = next(a.path for a, s in zip(first.audios, seconds[unread[0]]) if math.isnan(s))
        hint = "" if os.path.exists(bad) else relative_path_hint(bad, first.source)
        log.warning(
            "%s: %d records have audio that could not be read (first: %s, %s%s); they are bad samples when "
            "trained on (estimated again at each launch, in case the files get fixed)",
            path,
            len(unread),
            bad,
            first.source,
            f" {hint}" if hint else "",
        )
    return BuildReport(
        manifest=str(path),
        index=str(where),
        records=len(records),
        reused=reused,
        computed=len(todo),
        unreadable_audio=len(unread),
        seconds=round(time.perf_counter() - start, 2),
    )


# ---------------------------------------------------------------------------------------------- command line
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``index MANIFEST...``: the subcommand of ``python -m musicflamingo.data``."""
    p = subparsers.add_parser(
        "index",
        help="precompute each record's audio durations and token count beside the manifest",
        description="Write MANIFEST.index.parquet for each manifest (audio durations, token counts, line hashes), "
        "so that training starts without reading audio headers or tokenizing. Rows still valid are reused.",
    )
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="JSONL (or JSON list) manifests")
    p.add_argument(
        "--processor", required=True, help="folder with the tokenizer/processor files (data.processor)"
    )
    p.add_argument(
        "--audio-root", default=None, help="folder relative audio paths resolve against (data.audio_root)"
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="recompute every row (e.g. after audio files changed; rerun after a kill, it continues from the rows "
        "whose audio did not change since the killed build began)",
    )
    p.add_argument(
        "--save-every",
        type=float,
        default=SAVE_EVERY,
        metavar="SECONDS",
        help="write the rows done so far this often, so that a killed build's rerun continues from them "
        f"(default {SAVE_EVERY:g})",
    )
    p.set_defaults(func=main_index)
    return p


def main_index(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if not args.save_every >= 0:
        raise ValueError(f"--save-every must be >= 0 seconds, got {args.save_every}")
    processor = MusicFlamingoProcessor.from_pretrained(args.processor)
    for manifest in args.manifests:
        r = build_index(
            manifest,
            processor,
            args.audio_root,
            force=args.force,
            num_workers=args.workers,
            progress=True,
            save_every=args.save_every,
        )
        print(
            f"{r.index}: {r.records} records ({r.reused} reused, {r.computed} computed, {r.unreadable_audio} with "
            f"unreadable audio) in {r.seconds:.1f} s",
            flush=True,
        )
