"""Training manifests: JSONL (or JSON list) files of conversations with audio, read into :class:`Record`.

Format
------
One JSON object per line (``.jsonl``); a file holding one JSON list of the same objects is accepted too::

    {"id": "x1", "audio": "clips/a.mp3",
     "conversations": [{"role": "user", "content": "<sound>Describe the track."},
                       {"role": "assistant", "content": "A slow piano ballad in A minor..."}]}

* ``id``: string (or integer); defaults to ``"<file name>:<line>"`` when absent.
* ``audio``: a path, a list of paths, or objects ``{"path": ..., "offset": s, "duration": s}`` (seconds; offset
  defaults to 0, duration to "until the end"), or a list mixing both. Relative paths are resolved against
  ``audio_root`` when given, else against the manifest's folder. Text-only records omit ``audio``.
* ``conversations``: ``{"role", "content"}`` messages; roles ``system`` (optional, first message only; when it
  is absent the chat template adds the default Music Flamingo system prompt), ``user`` and ``assistant``.
  Each ``<sound>`` in the text stands for the next audio, in order: the number of ``<sound>`` markers must equal
  the number of audios. The chat template renders ``<sound>`` directly before the text, so write
  ``"<sound>Describe the track."``. Contents may not contain chat special tokens (``<|im_start|>``,
  ``<|im_end|>``, ``<|sound_bos|>``, ``<|sound_eos|>``, ``<|endoftext|>``): they would break the turn structure
  that the label mask relies on.
* For training the last message must be the assistant's (the loss learns assistant turns).
* Any other field (``meta``, ``task``, ...) is kept in :attr:`Record.extra`.
* Limits: a record (one JSONL line, or one element of a JSON list) holds at most ``MAX_RECORD_CHARS``
  (1 000 000) characters, far more than any model context takes, so a runaway line is refused before it is
  parsed or tokenized; ``offset`` and ``duration`` are finite and at most ``MAX_SECONDS`` (10^6 s, 11.6 days).
  The file is UTF-8 (a BOM is allowed).

Audio Flamingo 3 / LLaVA layout (detected per record, JSONL or one JSON list)::

    {"id": "x1", "sound": "clips/a.wav",
     "conversations": [{"from": "human", "value": "<sound>\\nDescribe the track."},
                       {"from": "gpt", "value": "A slow piano ballad..."}]}

Roles map ``human -> user``, ``gpt -> assistant``, ``system -> system``; ``sound`` is read like ``audio``. AF3
puts ``"<sound>\\n"`` before the text while the Music Flamingo chat template puts ``<sound>`` directly before
it, so in this layout one newline right after each ``<sound>`` is dropped: the AF3 record above and our record
with content ``"<sound>Describe the track."`` give identical token ids.

Every problem raises :class:`ManifestError` naming ``file:line``, the field and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import pickle
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from musicflamingo.chat import AUDIO_PLACEHOLDER, FORBIDDEN_TOKENS, ROLES, check_typed_text
from musicflamingo.jsonl import LINE_BREAK, OTHER_BREAKS

# The AF3/LLaVA file layout's roles -> chat roles (a manifest layout: the model never sees "human" or "gpt").
AF3_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_AF3_SOUND_NEWLINE = re.compile(re.escape(AUDIO_PLACEHOLDER) + r"\r?\n")


MAX_RECORD_CHARS = 1_000_000
MAX_SECONDS = 1e6


class ManifestError(ValueError):
    """A manifest line is malformed; the message names ``file:line``, the field and what was expected."""


@dataclass(frozen=True)
class AudioRef:
    """One audio clip: a resolved path and an optional segment ``[offset, offset + duration)`` in seconds."""

    path: str
    offset: float = 0.0
    duration: float | None = None


@dataclass(frozen=True)
class Message:
    """One chat turn; ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass
class Record:
    """One training conversation.

    ``audios[i]`` belongs to the i-th ``<sound>`` across ``messages`` (in order); ``source`` is ``"file:line"``
    for error messages; ``extra`` keeps every other field of the manifest line.
    """

    id: str
    audios: list[AudioRef]
    messages: list[Message]
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_audio_placeholders(self) -> int:
        return sum(m.content.count(AUDIO_PLACEHOLDER) for m in self.messages)


def read_manifest(
    path: str | os.PathLike, audio_root: str | os.PathLike | None = None, require_assistant_last: bool = True
) -> list[Record]:
    """Read a manifest (JSONL or one JSON list; our layout or AF3/LLaVA, detected per record).

    Args:
        path: the manifest file.
        audio_root: folder that relative audio paths are resolved against (default: the manifest's folder).
        require_assistant_last: training needs an assistant turn at the end; evaluation/inference manifests
            may end with the user turn (pass ``False``).
    Raises:
        ManifestError: with ``file:line``, the field and what was expected.
    """
    path = Path(path)
    text = _read_text(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    items = _parse_json_list(path, text) if text.lstrip().startswith("[") else _parse_jsonl(path, text)
    records = [
        _to_record(obj, f"{path}:{line}", path.name, line, root, require_assistant_last)
        for line, obj in items
    ]
    if not records:
        raise ManifestError(f"{path}: manifest holds no records")
    return records


_BOM = b"\xef\xbb\xbf"
_SPACE = re.compile(rb"\s*")


def _first_byte(data: bytes) -> bytes:
    """The first non-blank byte after a BOM (b"" for a blank file): ``[`` marks a JSON list."""
    pos = _SPACE.match(data, 3 if data.startswith(_BOM) else 0).end()
    return data[pos : pos + 1]


def _refuse_folder(path: Path) -> None:
    """A folder given where a manifest goes: say what it lacks (``data.train=DIR`` reads shards only from a folder
    that holds litdata's index.json)."""
    if path.is_dir():
        raise ManifestError(
            f"{path}: a folder, not a manifest file (JSONL or a JSON list) nor a shard folder (it has no index.json; "
            f"write one with `python -m musicflamingo.data shard MANIFEST {path}`)"
        )


def is_json_list(path: str | os.PathLike) -> bool:
    """Whether a manifest is one JSON list (else JSONL), from its first non-blank character."""
    _refuse_folder(Path(path))
    with open(path, "rb") as f:
        return _first_byte(f.read(1 << 16)) == b"["


class JsonlRecords(Sequence):
    """The records of a JSONL manifest, each read from the file and parsed when it is accessed (``records[i]`` ->
    :class:`Record`; a slice gives a list).

    Holds each record's line number, byte span and digest (32 bytes per record), not the file's text: every rank
    and DataLoader worker holds the records, and a million records' text is half a gigabyte each (a list of
    :class:`Record` takes kilobytes per record and copies itself page by page in workers as reference counts touch
    it). A record is read with ``os.pread`` from the file kept open (forked workers share the descriptor, pickled
    copies open the path again) and checked against its digest: after an edit that moved it (reading by offsets
    gives shifted bytes; an mmap would SIGBUS on a shortened file) it raises a :class:`ManifestError` naming the
    file and line, while lines appended or a ``touch`` change nothing. A manifest that is no regular file (a pipe) is
    held in memory instead.

    Lines are split as :func:`read_manifest` splits them, and ``records[i]`` raises the :class:`ManifestError`
    (``file:line``) it would raise; only the line lengths are checked before access, so read every record once (as
    length estimation does) or trust a manifest index that did.

    Attributes:
        lines: [N] int64, the 1-based line number of each record.
        digests: [N] uint64, BLAKE2b-64 of each record's line (as UTF-8 bytes, the manifest index's ``hash``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        audio_root: str | os.PathLike | None = None,
        require_assistant_last: bool = True,
    ) -> None:
        self.path = Path(path)
        _refuse_folder(self.path)
        self.root = Path(audio_root) if audio_root is not None else self.path.parent
        self.require_assistant_last = require_assistant_last
        self._fd: int | None = None
        self._fd = self._open()  # kept open: read by its offsets later, and inherited by forked workers
        try:
            before = os.fstat(self._fd)
            regular = stat.S_ISREG(before.st_mode)
            with open(self._fd, "rb", closefd=False) as f:
                self.lines, self._starts, self._ends, self.digests, self._data = self._index(f, regular)
            after = os.fstat(self._fd)
        except OSError as e:
            raise ManifestError(f"{self.path}: cannot read manifest ({e.strerror or e})") from e
        if regular and _stamp(before) != _stamp(after):
            raise ManifestError(f"{self.path}: the manifest changed while it was being read; read it again")
        if not regular:  # a pipe: read once, and held in memory (self._data)
            os.close(self._fd)
            self._fd = None
        if not len(self.lines):
            raise ManifestError(f"{self.path}: manifest holds no records")
        self._stamp = _stamp(after)

    def _index(
        self, f: Any, regular: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes | None]:
        """``(lines, starts, ends, digests)`` [N] of the records read from ``f``, and the file's bytes when it is
        no regular file (it cannot be read again); a regular file is read in blocks (a copy of a file of
        gigabytes on every rank at once would take what holding it did)."""
        if regular:
            found = _block_spans(self.path, f, os.fstat(f.fileno()).st_size)
            if found is not None:
                return (*found, None)
            f.seek(0)  # other line breaks (CR, ...): the text is split as read_manifest splits it
        data = f.read()
        lines, starts, ends = self._spans(data)
        return lines, starts, ends, _digests(data, starts, ends), None if regular else data

    def _spans(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(line numbers, starts, ends)`` [N] of the records in the file's bytes."""
        _check_jsonl_start(self.path, data)
        bom = 3 if data.startswith(_BOM) else 0
        spans = _newline_spans(data, bom)
        if spans is None:  # other line breaks (CR, ...): split the text as read_manifest does
            spans = _text_spans(self.path, data, bom)
        _check_lengths(self.path, data, *spans)
        return spans

    def __len__(self) -> int:
        return len(self.lines)

    def __getstate__(self) -> dict[str, Any]:
        # a descriptor means nothing in another process: the copy opens the path again
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ManifestError(f"{self.path}: cannot read manifest ({e.strerror or e})") from e

    def _read(self, start: int, end: int) -> bytes:
        """The file's bytes ``[start, end)`` (fewer at its end), from the file the spans were found in."""
        if self._data is not None:
            return self._data[start:end]
        if self._fd is None:  # unpickled in another process; forked ones share it (pread moves no offset)
            self._fd = self._open()
        try:
            chunks, pos = [], start
            while pos < end:
                chunk = os.pread(self._fd, end - pos, pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
        except OSError as e:
            raise ManifestError(f"{self.path}: cannot read manifest ({e.strerror or e})") from e
        return b"".join(chunks)

    def text(self, i: int) -> bytes:
        """Record ``i``'s line as UTF-8 bytes, as it was when the manifest was read (:class:`ManifestError` if the
        file no longer holds it there)."""
        data = self._read(int(self._starts[i]), int(self._ends[i]))
        if _digest(data) != self.digests[i].tobytes():
            try:
                st = os.fstat(self._fd) if self._fd is not None else os.stat(self.path)
                now = f"now {_described(_stamp(st))}"
            except OSError as e:
                now = f"now {e.strerror or e}"
            raise ManifestError(
                f"{self.path}:{self.lines[i]}: the manifest changed after it was read (it was "
                f"{_described(self._stamp)}; {now}): this record is no longer at its place in the file; restart to "
                "read the manifest again"
            )
        return data

    def __getitem__(self, i: int | slice) -> Record | list[Record]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _position(i, len(self), self.path)
        line = int(self.lines[i])
        where = f"{self.path}:{line}"
        try:
            text = str(self.text(i), "utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(
                f"{where}: not UTF-8 (byte {e.start + 1} of the line); save the manifest as UTF-8"
            ) from None
        start = int(self._starts[i])

        def rest() -> str:  # a record holds at most MAX_RECORD_CHARS characters, of 4 bytes at most
            return str(self._read(start, start + 4 * MAX_RECORD_CHARS), "utf-8", errors="replace")

        return _to_record(
            _loads(text, where, rest), where, self.path.name, line, self.root, self.require_assistant_last
        )


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _digests(data: bytes | memoryview, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """[N] uint64: the :func:`_digest` of each span of ``data``."""
    out, view = bytearray(8 * len(starts)), memoryview(data)
    for j in range(0, len(starts), 8192):  # Python ints for a few spans at a time (36 bytes each)
        for k, (a, b) in enumerate(zip(starts[j : j + 8192].tolist(), ends[j : j + 8192].tolist()), j):
            out[8 * k : 8 * k + 8] = _digest(view[a:b])
    view.release()
    return np.frombuffer(out, dtype="<u8")


def _check_jsonl_start(path: Path, data: bytes) -> None:
    first = _first_byte(data)
    if first == b"[":
        raise ManifestError(f"{path}: a JSON list, not JSONL; read it with JsonListRecords")
    if not first:
        raise ManifestError(f"{path}: manifest holds no records")


def _check_lengths(
    path: Path, data: bytes | memoryview, lines: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> None:
    """Refuse a line of more than MAX_RECORD_CHARS characters (``data`` holds the spans)."""
    for i in np.flatnonzero(ends - starts > MAX_RECORD_CHARS).tolist():  # bytes >= characters
        n = len(str(data[starts[i] : ends[i]], "utf-8", errors="replace"))
        if n > MAX_RECORD_CHARS:
            raise _too_long(f"{path}:{lines[i]}", n)


_BLOCK = 16 << 20  # bytes of a JSONL file read at a time


def _block_spans(
    path: Path, f: Any, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(lines, starts, ends, digests)`` [N] of a JSONL file's records, read in blocks of whole lines (as
    :func:`_newline_spans` finds them) into one buffer; None when it holds other line breaks. ``size``: the file's,
    to size the buffer."""
    parts = []
    # one allocation: a new one per block would stay in the heap, as resident memory
    buf = bytearray(min(_BLOCK, size + 1))
    # the file offset of buf[0], the newlines before it, the bytes of buf holding a line not yet ended
    base, before, held = 0, 0, 0
    while True:
        if held == len(buf):  # a line longer than the buffer
            buf.extend(bytes(len(buf)))
        with memoryview(buf) as free:
            n = f.readinto(free[held:])
        filled = held + n
        cut = buf.rfind(b"\n", 0, filled) + 1 if n else filled  # whole lines; all that is left at the end
        if base == 0 and _first_byte(bytes(buf[: min(filled, 1 << 16)])) == b"[":  # as is_json_list decides
            _check_jsonl_start(path, bytes(buf[:filled]))
        if cut:
            with memoryview(buf) as whole, whole[:cut] as piece:
                spans = _newline_spans(piece, 3 if base == 0 and buf.startswith(_BOM) else 0)
                if spans is None:
                    return None
                lines, starts, ends = spans
                _check_lengths(path, piece, lines + before, starts, ends)
                parts.append((lines + before, starts + base, ends + base, _digests(piece, starts, ends)))
            before += buf.count(b"\n", 0, cut)
            base += cut
        held = filled - cut
        buf[:held] = buf[cut:filled]
        if not n:
            break
    if not parts:  # blank: "holds no records"
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, np.zeros(0, dtype="<u8")
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))  # type: ignore[return-value]


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file unchanged: device, inode, size, mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _described(stamp: tuple[int, int, int, int]) -> str:
    """``"inode <n>, <size> bytes, modified <time>"`` of a :func:`_stamp`."""
    ns = stamp[3]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9:09d}"
    return f"inode {stamp[1]}, {stamp[2]} bytes, modified {when}"


def _position(i: Any, n: int, what: Any) -> int:
    """Index ``i`` (negative counts from the end) of ``n`` records as a position in ``[0, n)``; a list's IndexError
    and TypeError otherwise."""
    try:
        i = operator.index(i)
    except TypeError:
        raise TypeError(f"record indices must be integers or slices, not {type(i).__name__}") from None
    if not -n <= i < n:
        raise IndexError(f"record {i} out of range for {n} records of {what}")
    return i % n


def _text_spans(path: Path, data: bytes, bom: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(line numbers, starts, ends)`` [N] of the non-blank lines as :func:`_jsonl_lines` splits the decoded text,
    as byte offsets into ``data`` (which starts with ``bom`` bytes of BOM)."""
    text = _decode(path, data)
    numbers, starts, ends = [], [], []
    pos, at = 0, bom  # the character and the byte where the line starts
    for lineno, m in enumerate(LINE_BREAK.finditer(text + "\n"), start=1):
        line = text[pos : m.start()]
        size = len(line.encode("utf-8"))
        if line.strip():
            if len(line) > MAX_RECORD_CHARS:
                raise _too_long(f"{path}:{lineno}", len(line))
            numbers.append(lineno)
            starts.append(at)
            ends.append(at + size)
        at += size + len(m.group())  # line breaks are ASCII
        pos = m.end()
    return (
        np.asarray(numbers, dtype=np.int64),
        np.asarray(starts, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
    )


class JsonListRecords(JsonlRecords):
    """The records of a JSON-list manifest, held and read as :class:`JsonlRecords` holds a JSONL manifest's (each
    record's line, byte span and digest; read from the file and parsed on access), every one checked when the
    manifest is opened, as :func:`read_manifest` checks them.

    Args:
        on_record: called with each record as it is checked (in file order), e.g. to hash it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        audio_root: str | os.PathLike | None = None,
        require_assistant_last: bool = True,
        on_record: Callable[[Record], None] | None = None,
    ) -> None:
        self._on_record = on_record
        super().__init__(path, audio_root, require_assistant_last)
        del self._on_record

    def _index(
        self, f: Any, regular: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes | None]:
        data = f.read()  # a JSON list is parsed as a whole
        lines, starts, ends = self._spans(data)
        return lines, starts, ends, _digests(data, starts, ends), None if regular else data

    def _spans(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        text = _decode(self.path, data)
        if not text.lstrip().startswith("["):
            raise ManifestError(f"{self.path}: JSONL, not a JSON list; read it with JsonlRecords")
        spans: list[tuple[int, int]] = []
        items = _parse_json_list(self.path, text, spans)
        n = len(items)
        lines, starts, ends = (np.zeros(n, dtype=np.int64) for _ in range(3))
        at, prev = 3 if data.startswith(_BOM) else 0, 0  # the byte and the character after the last record
        for k, ((line, obj), (a, b)) in enumerate(zip(items, spans)):
            items[k] = None  # each object freed once checked
            record = _to_record(
                obj, f"{self.path}:{line}", self.path.name, line, self.root, self.require_assistant_last
            )
            if self._on_record is not None:
                self._on_record(record)
            lines[k] = line
            starts[k] = at = at + len(text[prev:a].encode("utf-8"))
            ends[k] = at = at + len(text[a:b].encode("utf-8"))
            prev = b
        return lines, starts, ends


class CompactRecords(Sequence):
    """Records kept as one bytes object of their pickles (``records[i]`` unpickles record ``i``; a slice gives a
    list), for records that have no file to be read from again (a manifest's are :class:`JsonlRecords` and
    :class:`JsonListRecords`, which hold less).

    A list of :class:`Record` takes kilobytes per record and, in every DataLoader worker, is copied page by page as
    reference counts touch it (copy-on-read: a million records cost gigabytes per worker by the end of an epoch);
    one bytes object and an offsets array are never written to. Unpickling a record takes microseconds.

    Attributes:
        lines: [N] int64, each record's line (from its ``source`` ``file:line``; 0 where it has none).
        digests: [N] uint64, BLAKE2b-64 of each record's ``repr`` (its values: pickles of equal records may differ
            in how they share strings), so DDP ranks holding records that differ in any field tell them apart.
    """

    def __init__(self, records: Sequence[Record]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self.digests = np.frombuffer(b"".join(_digest(repr(r).encode()) for r in records), dtype="<u8")
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._starts = self._ends - np.asarray([len(b) for b in blobs], dtype=np.int64)
        self._data = b"".join(blobs)
        lines = (r.source.rpartition(":")[2] for r in records)
        self.lines = np.asarray([int(x) if x.isdigit() else 0 for x in lines], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int | slice) -> Record | list[Record]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _position(i, len(self), "a JSON-list manifest")
        return pickle.loads(memoryview(self._data)[int(self._starts[i]) : int(self._ends[i])])


def _newline_spans(data: bytes | memoryview, skip: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(line numbers, starts, ends)`` [N] of the non-blank lines of ``data[skip:]``, split as :func:`_jsonl_lines`
    splits the decoded text, found with numpy instead of a Python loop; None when a line break other than "\n" or
    "\r\n" occurs (the caller then splits the text)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    # one pass: the "\n"s and any other control character; in blocks, as a mask of the whole file would double the
    # memory that reading a manifest of gigabytes takes
    block = 1 << 20
    ctrl = np.concatenate(
        [np.zeros(0, dtype=np.int64)]
        + [np.flatnonzero(buf[i : i + block] < 0x20) + i for i in range(0, len(buf), block)]
    )
    kind = buf[ctrl]
    cr = ctrl[kind == ord("\r")]
    if np.isin(kind, OTHER_BREAKS).any() or (buf[np.minimum(cr + 1, len(buf) - 1)] != ord("\n")).any():
        return None
    breaks = ctrl[kind == ord("\n")]
    starts = np.concatenate([[skip], breaks + 1]).astype(np.int64)
    ends = np.concatenate([breaks, [len(data)]]).astype(np.int64)
    ends -= (ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r"))
    numbers = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends > starts
    # A line starting with "{" is not blank; any other may be whitespace only (str.strip's notion of it).
    for i in np.flatnonzero(keep & (buf[np.minimum(starts, len(buf) - 1)] != ord("{"))).tolist():
        keep[i] = bool(str(data[starts[i] : ends[i]], "utf-8", errors="replace").strip())
    return numbers[keep], starts[keep], ends[keep]


def _too_long(where: str, n: int) -> ManifestError:
    return ManifestError(
        f"{where}: record has {n} characters, more than MAX_RECORD_CHARS={MAX_RECORD_CHARS} (no model context "
        "holds that much text; split it)"
    )


def _too_deep(where: str) -> ManifestError:
    return ManifestError(f"{where}: malformed JSON: nested too deeply")


def _read_text(path: Path) -> str:
    _refuse_folder(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror or e})") from e
    return _decode(path, data)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ManifestError(
            f"{path}:{line}: not UTF-8 (byte {column} of the line); save the manifest as UTF-8"
        ) from None


def _jsonl_lines(path: Path, text: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line, refusing runaway ones."""
    for lineno, line in enumerate(LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_CHARS:
            raise _too_long(f"{path}:{lineno}", len(line))
        yield lineno, line


def _loads(line: str, where: str, rest: Callable[[], str] | None = None) -> Any:
    """``json.loads(line)``; ``rest()``: the file's text from this line on, read only when the line is no JSON, to
    tell a record written over several lines (``json.dump(..., indent=2)``) from a broken one."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        hint = ""
        if rest is not None and _object_over_lines(rest()):
            hint = (
                " (a record written over several lines: JSONL holds one record per line, as json.dumps writes it "
                "without indent; or put the records in a JSON list [...])"
            )
        raise ManifestError(f"{where}: malformed JSON at column {e.colno}: {e.msg}{hint}") from e
    except RecursionError:
        raise _too_deep(where) from None


def _object_over_lines(text: str) -> bool:
    """Whether ``text`` starts with a JSON object that spans more than one line."""
    text = text.lstrip()
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(obj, dict) and LINE_BREAK.search(text, 0, end) is not None


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    def rest(lineno: int) -> Callable[[], str]:
        def read() -> str:  # the text after the (lineno - 1)-th line break
            breaks = LINE_BREAK.finditer(text)
            start = next(m.end() for i, m in enumerate(breaks, 2) if i == lineno) if lineno > 1 else 0
            return text[start : start + MAX_RECORD_CHARS]  # a record holds no more

        return read

    return [
        (lineno, _loads(line, f"{path}:{lineno}", rest(lineno))) for lineno, line in _jsonl_lines(path, text)
    ]


def _parse_json_list(
    path: Path, text: str, spans: list[tuple[int, int]] | None = None
) -> list[tuple[int, Any]]:
    """Decode a top-level JSON list element by element so that every record knows its starting line (and, into
    ``spans``, its ``(start, end)`` in ``text``)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    items = []
    pos = ws.match(text, text.index("[") + 1).end()

    def fail(e: json.JSONDecodeError | None, at: int, msg: str) -> ManifestError:
        line = text.count("\n", 0, e.pos if e else at) + 1
        return ManifestError(f"{path}:{line}: malformed JSON list: {e.msg if e else msg}")

    if text.startswith("]", pos):
        return items
    # the line at offset `counted`: newlines counted once, not from the start per record (quadratic)
    line, counted = 1, 0
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e, pos, "") from e
        except RecursionError:
            raise _too_deep(f"{path}:{line}") from None
        if end - pos > MAX_RECORD_CHARS:
            raise _too_long(f"{path}:{line}", end - pos)
        items.append((line, obj))
        if spans is not None:
            spans.append((pos, end))
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                raise fail(None, pos + 1, "unexpected text after the closing ']'")
            return items
        else:
            raise fail(None, pos, "expected ',' or ']' between records")


def _to_record(
    obj: Any, where: str, fname: str, line: int, root: Path, require_assistant_last: bool
) -> Record:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object per record, got {type(obj).__name__}")
    if "conversations" not in obj:
        raise ManifestError(f"{where}: record has no 'conversations' field (expected a list of messages)")
    if "audio" in obj and "sound" in obj:
        raise ManifestError(f"{where}: record has both 'audio' and 'sound'; give the audio once")
    audio_key = "sound" if "sound" in obj else "audio"

    rid = obj.get("id", f"{fname}:{line}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ManifestError(f"{where}: field 'id' must be a string or integer, got {type(rid).__name__}")
    if isinstance(rid, str):
        _check_text(rid, where, "id")

    convs = obj["conversations"]
    if not isinstance(convs, list):
        raise ManifestError(
            f"{where}: field 'conversations' must be a list of messages, got {type(convs).__name__}"
        )
    if not convs:
        raise ManifestError(f"{where}: field 'conversations' is empty")
    messages = [_to_message(m, where, i) for i, m in enumerate(convs)]

    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise ManifestError(f"{where}: conversations[{i}]: a 'system' message may only come first")
    if all(m.role == "system" for m in messages):
        raise ManifestError(f"{where}: field 'conversations' has only a system message")
    if require_assistant_last and messages[-1].role != "assistant":
        raise ManifestError(
            f"{where}: the last message of 'conversations' must be the assistant's (the training target), "
            f"got role {messages[-1].role!r}"
        )

    audios = _to_audios(obj.get(audio_key), where, audio_key, root)
    n_sound = sum(m.content.count(AUDIO_PLACEHOLDER) for m in messages)
    if n_sound != len(audios):
        raise ManifestError(
            f"{where}: {n_sound} '{AUDIO_PLACEHOLDER}' placeholder(s) in 'conversations' but {len(audios)} "
            f"audio(s) in '{audio_key}'; each audio needs exactly one '{AUDIO_PLACEHOLDER}'"
        )
    extra = {k: v for k, v in obj.items() if k not in ("id", "conversations", audio_key)}
    return Record(id=str(rid), audios=audios, messages=messages, extra=extra, source=where)


def _to_message(m: Any, where: str, i: int) -> Message:
    fld = f"conversations[{i}]"
    if not isinstance(m, dict):
        raise ManifestError(
            f"{where}: {fld} must be an object with 'role' and 'content', got {type(m).__name__}"
        )
    if "from" in m or "value" in m:  # AF3 / LLaVA layout
        role_key, content_key = "from", "value"
        mapping = AF3_ROLES
    else:
        role_key, content_key = "role", "content"
        mapping = {r: r for r in ROLES}
    for key in (role_key, content_key):
        if key not in m:
            raise ManifestError(f"{where}: {fld} has no '{key}' field")
    role, content = m[role_key], m[content_key]
    if not isinstance(role, str) or role not in mapping:
        raise ManifestError(
            f"{where}: {fld}.{role_key} is {role!r}; expected one of {', '.join(repr(r) for r in mapping)}"
        )
    if not isinstance(content, str):
        raise ManifestError(f"{where}: {fld}.{content_key} must be a string, got {type(content).__name__}")
    _check_text(content, where, f"{fld}.{content_key}")
    for tok in FORBIDDEN_TOKENS:  # named as the file names it (`value` in the AF3 layout)
        if tok in content:
            raise ManifestError(f"{where}: {fld}.{content_key} contains the special token {tok!r}")
    if content_key == "value":
        content = _AF3_SOUND_NEWLINE.sub(AUDIO_PLACEHOLDER, content)
    return Message(role=mapping[role], content=content)


def _check_text(text: str, where: str, fld: str) -> None:
    """A lone surrogate (a JSON escape such as "\\ud800") is not text a tokenizer, or a UTF-8 file, takes."""
    try:
        check_typed_text(text, f"field '{fld}'", forbidden=())
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None


def _seconds(value: Any, where: str, fld: str, low: str) -> float:
    """A finite number of seconds in ``[0, MAX_SECONDS]`` (> 0 when ``low`` is "> 0")."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (low == "> 0" and value == 0) or value > MAX_SECONDS:
        raise ManifestError(
            f"{where}: field '{fld}' must be a number {low} and <= {MAX_SECONDS:g} (seconds), got {value!r}"
        )
    return float(value)


def _to_audios(value: Any, where: str, key: str, root: Path) -> list[AudioRef]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [
        _to_audio_ref(v, where, f"{key}[{i}]" if isinstance(value, list) else key, root)
        for i, v in enumerate(items)
    ]


def _to_audio_ref(v: Any, where: str, fld: str, root: Path) -> AudioRef:
    expected = 'a path string or an object {"path": ..., "offset": s, "duration": s}'
    if isinstance(v, str):
        path, offset, duration = v, 0.0, None
    elif isinstance(v, dict):
        unknown = set(v) - {"path", "offset", "duration"}
        if unknown:
            raise ManifestError(
                f"{where}: field '{fld}' has unknown keys {sorted(unknown)}; expected {expected}"
            )
        path, offset, duration = v.get("path"), v.get("offset", 0.0), v.get("duration")
        if not isinstance(path, str):
            raise ManifestError(f"{where}: field '{fld}.path' must be a string, got {type(path).__name__}")
        offset = _seconds(offset, where, f"{fld}.offset", ">= 0")
        if duration is not None:
            duration = _seconds(duration, where, f"{fld}.duration", "> 0")
    else:
        raise ManifestError(
            f"{where}: field '{fld}' must be {expected} (or a list of them), got {type(v).__name__}"
        )
    if not path.strip():
        raise ManifestError(f"{where}: field '{fld}' is an empty path")
    p = Path(os.path.expanduser(path))
    resolved = p if p.is_absolute() else root / p
    return AudioRef(
        path=str(resolved), offset=float(offset), duration=None if duration is None else float(duration)
    )
