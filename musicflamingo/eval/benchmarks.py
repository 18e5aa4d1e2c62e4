"""Benchmark readers: each public release, read from its folder as the authors distribute it, becomes a list of
:class:`EvalItem`.

Nothing is downloaded. ``build_benchmark(cfg)`` dispatches on ``cfg["format"]``; the keys each format reads are
in its ``configs/benchmark/<name>.yaml``, the folder layout each expects is its ``LAYOUTS`` entry (also in
docs/evaluation.md). Bad files fail with :class:`BenchmarkError` naming the file, the line (in a JSON list: the
record) and the field; a folder that is not the release names what is missing and the layout expected.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import random
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musicflamingo.chat import format_options
from musicflamingo.eval.parsing import normalize_text
from musicflamingo.jsonl import LINE_BREAK

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".m4a",
    ".opus",
    ".aac",
    ".aiff",
    ".aif",
    ".webm",
    ".au",
    ".mp4",
)

DEFAULT_MCQ_PROMPT = (
    "{question}\nChoose the correct option from the following options:\n{options}\n"
    "Answer with the option's letter and text."
)
DEFAULT_CLS_MCQ_PROMPT = (
    "{question}\nChoose one of the following options:\n{options}\nAnswer with the option's letter and text."
)
DEFAULT_CLS_OPEN_PROMPT = "{question} Answer with one of: {labels}."
DEFAULT_CAPTION_PROMPT = (
    "Describe this music clip in a few sentences, covering genre, instruments, mood and recording quality."
)
DEFAULT_LYRICS_PROMPT = "Transcribe the lyrics of this song."

# The folder each format expects (one line each: they are quoted in errors). <root> is benchmark.root.
LAYOUTS = {
    "mmau": "<root>/mmau-test-mini.json + <root>/test-mini-audios/<id>.wav (split=test: mmau-test.json + "
    "test-audios/); the Hugging Face copy (gamma-lab-umd/MMAU-test-mini): <root>/data/test-*.parquet, audio inside",
    "mmar": "<root>/MMAR-meta.jsonl (before Feb 2026: MMAR-meta.json) + <root>/audio/<id>.wav",
    "mmau_pro": "<root>/test.parquet + <root>/data/<uuid>.wav (data.zip extracted next to it)",
    "muchomusic": "<root>/muchomusic.csv + <root>/sdd/audio/<nn>/<track_id>.2min.mp3 + "
    "<root>/musiccaps/audio/[<ytid>]-[<start>-<end>].wav (or the downloader's <ytid>_<start>.wav)",
    "musiccaps": "<root>/musiccaps-public.csv + audio files named <ytid>.wav, [<ytid>]-[<start>-<end>].wav or "
    "<ytid>_<start>.wav anywhere under <root>",
    "music_instruct": "<root>/MusicInstruct/music_instruct.json ({'QA': [...]}) + MusicCaps audio named "
    "<ytid>.wav or [<ytid>]-[<start>-<end>].wav under <root> (or benchmark.audio_dir)",
    "music_avqa": "<root>/data/json_update/avqa-test.json (or avqa-test.json in <root>) + <root>/data/audio/"
    "<video_id>.wav (extract_audio.py's output)",
    "gtzan": "<root>/genres/<genre>/<genre>.000NN.au (or .wav, e.g. Kaggle's Data/genres_original) + an "
    "optional split list such as test_filtered.txt",
    "nsynth": "<root>/nsynth-<split>/examples.json + <root>/nsynth-<split>/audio/<note_str>.wav (or <root> is "
    "nsynth-<split> itself)",
    "medley_solos": "<root>/Medley-solos-DB_metadata.csv + Medley-solos-DB_<subset>-<instrument_id>_<uuid4>.wav "
    "anywhere under <root>",
    "jamendolyrics": "<root>/JamendoLyrics.csv + <root>/mp3/<name>.mp3 (the Hugging Face copy: <root>/subsets/"
    "<lang>/mp3/) + <root>/lyrics/<name>.txt; Jam-ALT (Hugging Face jamendolyrics/jam-alt): <root>/metadata.csv + "
    "<root>/audio/<name>.mp3 + <root>/lyrics/<name>.txt, or <root>/metadata.jsonl (or subsets/<lang>/metadata.jsonl) "
    "+ subsets/<lang>/audio/<name>.mp3",
    "opencpop": "<root>/segments/test.txt (uid|text|phonemes|...) + <root>/segments/wavs/<uid>.wav",
    "musdb18_lyrics": "<root>/<split>/<track name>.txt (MUSDB18 lyrics extension) + benchmark.audio_dir = MUSDB18 "
    "(<split>/<track name>.stem.mp4) or MUSDB18-HQ (<split>/<track name>/mixture.wav)",
    "lyrics": "<root>/test.jsonl of {audio, lyrics, language}",
    "classification": "<root>/test.jsonl of {audio, label}",
    "synthetic": "<root>/test.jsonl of the project's synthetic corpus",
}

# Release-specific advice when an audio file cannot be read (quoted in that error).
AUDIO_HINTS = {
    "gtzan": "the Kaggle copy's jazz.00054.wav does not decode; benchmark.split=test_filtered.txt leaves it out",
}


class BenchmarkError(ValueError):
    """A benchmark file or config does not match the expected format (message names file, line, field)."""


@dataclass
class EvalItem:
    """One question to the model and what it is scored against.

    ``audio`` is an absolute path; ``offset``/``duration`` (seconds) select a segment (``duration=None``: to
    the end). ``task`` decides the scoring: ``mcq`` and ``classification`` use ``choices`` + ``answer_index``
    (``correct_indices`` lists every option whose text is the answer, when the release repeats it);
    ``caption``, ``open_qa`` and ``lyrics`` use the reference text ``answer``. ``groups`` holds the fields
    results are broken down by (a value may be a list: the item counts in each). ``meta`` holds task extras
    (``aspects``, ``language``, ``mode``, the release ``record`` for the official scorers...).
    """

    id: str
    audio: str
    prompt: str
    task: str
    answer: str = ""
    choices: list[str] = field(default_factory=list)
    answer_index: int = -1
    offset: float = 0.0
    duration: float | None = None
    groups: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    correct_indices: list[int] = field(default_factory=list)


@dataclass
class Benchmark:
    """A read benchmark: its items, where they came from, and what was left out on the way.

    ``rows`` counts the release's records that were read, ``skipped`` the ones that did not become items (by
    reason: filtered split or subset, not answerable here...), ``missing_audio`` the items whose audio file is
    absent (dropped, as ``skipped_missing_audio``, only with ``skip_missing_audio``).
    """

    name: str
    items: list[EvalItem]
    source: str
    skipped_missing_audio: int = 0
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    missing_audio: int = 0
    layout: str = ""
    # reason -> field -> value -> rows: the skipped rows a reader counted by a group field (MMAU-Pro's
    # multi-audio rows by category), so a paper number over one group knows whether rows of it were left out
    skipped_by: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        out = {
            "rows": self.rows,
            "items": len(self.items),
            "skipped_rows": dict(self.skipped),
            "missing_audio": self.missing_audio,
            "dropped_missing_audio": self.skipped_missing_audio,
        }
        if self.skipped_by:
            out["skipped_rows_by"] = self.skipped_by
        return out

    def describe(self) -> str:
        """One line: what was read and what was left out (logged before the first prediction)."""
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        text = f"{self.rows} rows read from {self.source}: {len(self.items)} items, skipped rows: {skipped}"
        if self.missing_audio:
            text += f", audio missing: {self.missing_audio} (dropped)"
        return text


def _same(wanted: str, value: str) -> bool:
    return wanted == value


class ReadLog:
    """What a reader saw: the data file, the number of rows, the rows it left out (by reason) and, per filter
    setting, the values the filtered field had (:meth:`check_filters`)."""

    def __init__(self) -> None:
        self.source = ""
        self.rows = 0
        self.skipped: Counter[str] = Counter()
        self.skipped_by: dict[str, dict[str, Counter[str]]] = {}  # reason -> field -> value -> rows
        # setting -> (values allowed, field name, match rule, values the rows had)
        self.filters: dict[str, tuple[list[str], str, Callable[[str, str], bool], set[str]]] = {}

    def skip(self, reason: str, n: int = 1, by: Mapping[str, Any] | None = None) -> None:
        """Count ``n`` rows left out for ``reason``; ``by`` ({field: value}) also counts them under those
        values (:attr:`Benchmark.skipped_by`)."""
        self.skipped[reason] += n
        for key, value in (by or {}).items():
            self.skipped_by.setdefault(reason, {}).setdefault(key, Counter())[str(value)] += n

    def keep(
        self,
        setting: str,
        allowed: Iterable[Any] | None,
        value: Any,
        key: str,
        same: Callable[[str, str], bool] = _same,
    ) -> bool:
        """Filter ``benchmark.<setting>`` (None or empty: keep every row) on ``value``, a row's field ``key``:
        False (and counted) when no allowed value is ``same`` as it. The values seen are kept for check_filters.
        A single value (``tasks=music`` on the command line) is a list of one, not of its letters."""
        if isinstance(allowed, (str, int, float)):
            allowed = [allowed]
        wanted = [str(v) for v in allowed or []]
        if not wanted:
            return True
        value = str(value)
        self.filters.setdefault(setting, (wanted, key, same, set()))[3].add(value)
        if any(same(w, value) for w in wanted):
            return True
        self.skip(f"{key} not in {wanted}")
        return False

    def check_filters(self) -> None:
        """Refuse a filter value that matches no row: a typo ("Music" for "music") in one of several values
        would silently drop that subset, and in the only value would end as "no items"."""
        for setting, (wanted, key, same, seen) in self.filters.items():
            unknown = [w for w in wanted if not any(same(w, v) for v in seen)]
            if not unknown:
                continue
            folded = {v.casefold(): v for v in sorted(seen)}
            hints = [f"{w!r} -> {folded[w.casefold()]!r}" for w in unknown if w.casefold() in folded]
            raise BenchmarkError(
                f"{self.source}: benchmark.{setting}: {', '.join(map(repr, unknown))} "
                f"{'matches' if len(unknown) == 1 else 'match'} no row's "
                f"{key!r}; values present: {', '.join(sorted(seen)[:30])}{', ...' if len(seen) > 30 else ''}"
                + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            )


# --------------------------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[tuple[int, str, dict[str, Any]]]:
    """Rows of a ``.json`` (list of objects, or an object of objects), ``.jsonl``, ``.csv`` or ``.parquet`` file,
    each as ``(number, where, record)``: ``number`` is the 1-based line (JSON Lines, CSV) or record position
    (JSON, Parquet), ``where`` the location errors name: ``file:line`` where it is a line, ``file record N (id
    X)`` in a JSON list (a record number shown as ``file:N`` reads as a line of the file, which it is not)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found")
    try:
        return _read_records(path)
    except UnicodeDecodeError as e:  # e.g. a CSV saved by Excel in the Windows code page
        raise BenchmarkError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None
    except csv.Error as e:
        raise BenchmarkError(f"{path}: not a readable CSV file ({e})") from None


def _read_text(path: Path) -> str:
    """A release's text file (split list, transcript, JSON) as UTF-8, a leading BOM dropped (it would stick to the
    first word or id); other encodings are a :class:`BenchmarkError` naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BenchmarkError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None


def _read_records(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return [(i + 1, f"{path} row {i + 1}", r) for i, r in enumerate(_read_parquet(path))]
    text = path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is not JSON
    # Lines end at "\n" ("\r\n") as in training manifests, not at every str.splitlines() break: U+2028, U+0085
    # and the like are legal inside JSON strings (json.dumps(ensure_ascii=False) writes them raw).
    lines = LINE_BREAK.split(text)
    if suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            first = next((ln for ln in lines if ln.strip()), "")
            try:  # a ".json" file that is really JSON lines (MMAR exports exist in both layouts)
                looks_jsonl = isinstance(json.loads(first), dict) and text.strip() != first.strip()
            except json.JSONDecodeError:
                looks_jsonl = False
            if not looks_jsonl:
                raise BenchmarkError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        else:
            return _json_rows(path, data)
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        rows.append((lineno, f"{path}:{lineno}", rec))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """A CSV file's rows as ``{column: cell}``, each numbered by the line it starts on: a quoted cell may hold line
    breaks (MusicCaps captions), so the row count is not the line. A row with more cells than the header (an
    unquoted comma in a value) is refused: its values would sit under the wrong columns. A short row's missing
    cells are None, as csv.DictReader has them."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM before the header
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        start = reader.line_num + 1  # the line the next row starts on
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:  # a blank line
                continue
            if len(cells) > len(header):
                raise BenchmarkError(
                    f"{path}:{line}: {len(cells)} cells, but the header has {len(header)} columns "
                    f"({', '.join(header)}); a value holding a comma must be quoted"
                )
            rows.append((line, f"{path}:{line}", dict(zip(header, [*cells, *[None] * len(header)]))))
    return rows


def _json_rows(path: Path, data: Any) -> list[tuple[int, str, dict[str, Any]]]:
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = [{"id": k, **v} if "id" not in v else v for k, v in data.items()]  # {id: record} layout
    elif isinstance(data, dict):  # one record (a one-line JSONL file named .json)
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BenchmarkError(f"{path}: expected a JSON list of objects")
    return [
        (i + 1, f"{path} record {i + 1}" + (f" (id {r['id']})" if r.get("id") is not None else ""), r)
        for i, r in enumerate(data)
    ]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq  # only MMAU-Pro ships Parquet; the other readers do not need pyarrow
    except ImportError:
        raise BenchmarkError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise BenchmarkError(f"{path}: not a readable Parquet file ({e})") from None


def _field(rec: Mapping[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in rec or rec[key] is None or (kind is str and str(rec[key]).strip() == ""):
        raise BenchmarkError(f"{where}: missing field '{key}' (has: {', '.join(sorted(rec)) or 'nothing'})")
    value = rec[key]
    if kind is list:
        if isinstance(value, str):  # CSV cells hold Python/JSON list literals
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise BenchmarkError(f"{where}: field '{key}' should be a list, got {value[:60]!r}") from None
        if hasattr(value, "tolist"):  # numpy arrays from Parquet
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise BenchmarkError(f"{where}: field '{key}' should be a list of strings, got {value!r:.80}")
        return [str(v) for v in value]
    if kind is str:
        return str(value)
    return value


def _seconds(value: Any, where: str, key: str, *, duration: bool = False) -> float | None:
    """A record's ``offset`` / ``duration`` in seconds: a number (or a CSV cell holding one) >= 0. Absent,
    null or an empty cell: 0 for an offset, None (to the end of the file) for a duration. A duration of 0 is
    refused, as in training manifests (``data.manifest._seconds``): it selects no audio, and reading it as
    "the whole file" (as before) hid typos."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None if duration else 0.0
    try:
        seconds = (
            float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        )
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0 or (duration and seconds == 0):
        want = "a number > 0; leave it out for the rest of the file" if duration else "a number >= 0"
        raise BenchmarkError(f"{where}: field '{key}' must be seconds ({want}), got {value!r}")
    return seconds


AUDIO_EXPECTED = 'a path string or an object {"path": ..., "offset": s, "duration": s}'


def _audio_path(rec: Mapping[str, Any], key: str, where: str, base: Path) -> str:
    """``rec[key]`` as an absolute path; a non-string (an object or list, as in training manifests) is refused
    here rather than turned into a file name such as "{'path': ...}" and reported missing (or dropped)."""
    value = rec.get(key)
    if isinstance(value, (dict, list, tuple, bool)):
        raise BenchmarkError(
            f"{where}: field '{key}' must be a path string, got {type(value).__name__} {value!r:.80}"
        )
    return _resolve(_field(rec, key, where), base)


def _audio_segment(
    rec: Mapping[str, Any], key: str, where: str, base: Path
) -> tuple[str, float, float | None]:
    """``(path, offset, duration)`` of a record's audio: ``rec[key]`` a path string with the segment in the
    record's own ``offset`` / ``duration`` fields, or the training manifests' object form ``{"path", "offset",
    "duration"}`` (then the record may not have its own: two segments for one clip)."""
    value = rec.get(key)
    if not isinstance(value, dict):
        if isinstance(value, (list, tuple, bool)):  # several clips per record: training only
            raise BenchmarkError(
                f"{where}: field '{key}' must be {AUDIO_EXPECTED}, got {type(value).__name__}"
            )
        seg, prefix = rec, ""
        path = _audio_path(rec, key, where, base)
    else:
        unknown = sorted(set(value) - {"path", "offset", "duration"})
        if unknown:
            raise BenchmarkError(
                f"{where}: field '{key}' has unknown keys {unknown}; expected {AUDIO_EXPECTED}"
            )
        both = [k for k in ("offset", "duration") if k in value and rec.get(k) is not None]
        if both:
            raise BenchmarkError(
                f"{where}: '{both[0]}' is given both in field '{key}' and beside it; keep one"
            )
        if not isinstance(value.get("path"), str) or not value["path"].strip():
            raise BenchmarkError(
                f"{where}: field '{key}.path' must be a path string, got {value.get('path')!r}"
            )
        seg, prefix = value, f"{key}."
        path = _resolve(value["path"], base)
    offset = _seconds(seg.get("offset"), where, prefix + "offset")
    return path, offset or 0.0, _seconds(seg.get("duration"), where, prefix + "duration", duration=True)


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else (base / p).resolve())


def _root(cfg: Mapping[str, Any]) -> Path:
    root = Path(os.path.expanduser(str(cfg["root"])))
    if not root.exists():
        raise BenchmarkError(
            f"benchmark.root={root} does not exist (expected the {cfg.get('name')} release: "
            f"{LAYOUTS.get(str(cfg.get('format')), 'see docs/evaluation.md')})"
        )
    return root


def _locate(cfg: Mapping[str, Any], candidates: Sequence[str], what: str = "") -> Path:
    """The release's data file: ``root`` itself when it is a file, else ``benchmark.file`` or the first of
    ``candidates`` found in ``root`` or one or two folders below it (a parent folder of the release works)."""
    root = _root(cfg)
    if root.is_file():
        return root
    names = [str(cfg["file"])] if cfg.get("file") else list(candidates)
    for pattern in ("", "*/", "*/*/"):
        for name in names:
            hits = sorted(root.glob(pattern + name)) if pattern else [root / name]
            hits = [h for h in hits if h.is_file()]
            if hits:
                return hits[0]
    layout = LAYOUTS.get(str(cfg.get("format")), "see docs/evaluation.md")
    raise BenchmarkError(
        f"benchmark {cfg.get('name')}: {root} has no {what or ' or '.join(names)}; expected layout: {layout}"
    )


def _check_split(path: Path, split: str, named: str | None) -> None:
    """Refuse a data file whose release name is another split's (``named``, from ``path``'s name) than
    ``benchmark.split``: ``benchmark.root`` or ``benchmark.file`` pointing at ``avqa-val.json`` or
    ``segments/train.txt`` under the default ``split: test`` scored that split as the test split, beside the
    paper's test number."""
    if named is not None and named != split:
        raise BenchmarkError(
            f"{path} is the release's {named!r} split, but benchmark.split={split!r}: pass "
            f"benchmark.split={named} to score it, or point benchmark.root at the {split!r} split's file"
        )


def _audio_base(cfg: Mapping[str, Any], data_file: Path) -> Path:
    # Relative audio paths are relative to benchmark.audio_dir when set (itself relative to root), else to the
    # data file's folder (MMAU's "./test-mini-audios/x.wav" sits next to mmau-test-mini.json).
    if cfg.get("audio_dir"):
        root = Path(os.path.expanduser(str(cfg["root"])))
        base = root if root.is_dir() else data_file.parent
        return (base / os.path.expanduser(str(cfg["audio_dir"]))).resolve()
    return data_file.parent.resolve()


def _audio_index(folder: Path) -> dict[str, str]:
    """Stem -> path of every audio file under ``folder`` (walked once; stems NFC-normalised, since a macOS
    copy stores accented names decomposed)."""
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.lower().endswith(AUDIO_SUFFIXES):
                stem = unicodedata.normalize("NFC", name[: name.rfind(".")])
                index.setdefault(stem, str(Path(dirpath, name).resolve()))
    return index


def _find(folder: Path, name: str) -> Path:
    """``folder/name``, also when the disk holds the other Unicode normal form of ``name`` (else the path as
    given, for the caller to report as missing)."""
    path = folder / name
    if path.exists():
        return path
    for form in ("NFC", "NFD"):
        alt = folder / unicodedata.normalize(form, name)
        if alt.exists():
            return alt
    return path


def _record_id(rec: Mapping[str, Any], line: int) -> str:
    """The record's ``id`` (also 0 or ""), else ``L<line>``."""
    return str(rec["id"]) if rec.get("id") is not None else f"L{line}"


def _stable_id(*parts: Any) -> str:
    """A short id from the given values, for releases without one (same rows -> same id, in any order)."""
    return hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:12]


def _answer_indices(answer: str, choices: Sequence[str]) -> list[int]:
    """Every option whose text is the answer: exact matches, else matches after :func:`normalize_text`. MMAU
    repeats some options, and an answer listed under two letters is correct under either. (Exact first:
    chord names such as "F#:7/1" and "F:7/1" are equal once punctuation is dropped.)"""
    exact = [i for i, c in enumerate(choices) if c.strip() == answer.strip()]
    if exact:
        return exact
    norm = normalize_text(answer)
    return [i for i, c in enumerate(choices) if norm and normalize_text(c) == norm]


def _mcq_item(
    rec_id: Any,
    audio: str,
    question: str,
    choices: Sequence[str],
    answer: str,
    template: str,
    where: str,
    groups: dict[str, Any],
    *,
    withheld: bool = False,
) -> EvalItem:
    if len(choices) < 2:
        raise BenchmarkError(f"{where}: field 'choices' needs at least 2 options, got {list(choices)!r}")
    prompt = template.format(question=question.strip(), options=format_options(choices))
    correct = [] if withheld else _answer_indices(answer, choices)
    if not correct and not withheld:
        log.warning(
            "%s: answer %r is not one of the choices %r; the letter rule will count it wrong",
            where,
            answer,
            list(choices),
        )
    return EvalItem(
        id=str(rec_id),
        audio=audio,
        prompt=prompt,
        task="mcq",
        answer=answer,
        choices=list(choices),
        answer_index=correct[0] if correct else -1,
        groups=groups,
        meta={"question": question, **({"withheld": True} if withheld else {})},
        correct_indices=correct,
    )


def _groups(rec: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    out = {}
    for k in keys:
        v = rec.get(k)
        if isinstance(v, str) and v.strip().startswith("[") and v.strip().endswith("]"):
            try:
                v = [str(x) for x in ast.literal_eval(v)]  # MuChoMusic stores category lists as "['...']"
            except (ValueError, SyntaxError):
                pass
        out[k] = v if v not in (None, "") else "n/a"
    return out


def _placeholders(template: str) -> set[str]:
    try:
        return {
            name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name
        }
    except ValueError as e:  # "{question" (unclosed brace) and the like
        raise BenchmarkError(
            f"{template!r}: not a valid template ({e}); write a literal brace as {{{{ or }}}}"
        ) from None


def _prompt(
    cfg: Mapping[str, Any], default: str, fills: Sequence[str] | None = ("question", "options")
) -> str:
    """``benchmark.prompt`` (null: ``default``), checked before any item is read: a placeholder the reader
    does not fill would fail at the first item as a bare KeyError. ``fills`` None: used as written."""
    template = str(cfg.get("prompt") or default)
    if fills is None:
        return template
    unknown = _placeholders(template) - set(fills)
    if unknown:
        raise BenchmarkError(
            f"benchmark.prompt={template!r}: unknown placeholder(s) {sorted(unknown)}; benchmark "
            f"{cfg.get('name')} fills {', '.join('{' + f + '}' for f in fills) or 'none (a plain instruction)'}"
        )
    return template


# --------------------------------------------------------------------------------------------------------------
# Multiple choice: MMAU, MMAR, MMAU-Pro, MuChoMusic
# --------------------------------------------------------------------------------------------------------------
def _embedded_audio(blob: bytes, name: str | None, cache: Path) -> str:
    """Bytes of an audio file stored inside a release's Parquet (Hugging Face ``Audio`` columns) written once to
    ``cache`` (never the benchmark folder), named by their SHA-1 and by what they are: the MMAU test-mini copy holds
    MP3 streams under ".wav" names, so the suffix comes from the bytes (the stored name's when they say nothing)."""
    digest = hashlib.sha1(blob).hexdigest()
    if blob[:4] == b"RIFF":
        suffix = ".wav"
    elif blob[:4] == b"fLaC":
        suffix = ".flac"
    elif blob[:4] == b"OggS":
        suffix = ".ogg"
    elif blob[:3] == b"ID3" or (len(blob) > 1 and blob[0] == 0xFF and blob[1] & 0xE0 == 0xE0):
        suffix = ".mp3"
    else:
        suffix = Path(name or "").suffix.lower() or ".bin"
    path = cache / digest[:2] / f"{digest}{suffix}"
    if not (path.is_file() and path.stat().st_size == len(blob)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # a reader of the same cache never sees half a file
    return str(path)


def _audio_cache(cfg: Mapping[str, Any]) -> Path:
    """``benchmark.audio_cache``, else ``$XDG_CACHE_HOME/musicflamingo/embedded_audio`` (``~/.cache`` unset)."""
    if cfg.get("audio_cache"):
        return Path(os.path.expanduser(str(cfg["audio_cache"]))).resolve()
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home, "musicflamingo", "embedded_audio").resolve()


_LETTER_PREFIX = re.compile(r"\(([A-Z])\)\s*")


def _mmau_parquet_rows(
    paths: Sequence[Path], cache: Path
) -> Iterable[tuple[str, dict[str, Any], Callable[[], str]]]:
    """``(where, record, audio path on call)`` of the Hugging Face copy of MMAU test-mini
    (gamma-lab-umd/MMAU-test-mini, ``data/test-*.parquet``): ``instruction`` (the question), ``choices`` and ``answer`` written "(A) Man", the
    audio file's bytes in ``context`` (``{bytes, path}``) and every other field (``id, dataset, task, split,
    category, sub-category, difficulty``) in the JSON string ``other_attributes``. The record is the GitHub JSON's
    (no letter prefixes, a one-element ``category`` list unwrapped), for the official scorer's file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError(f"{paths[0]}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for path in paths:
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=32)  # the audio is inside: not all at once
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    n += 1
                    yield _mmau_parquet_row(row, f"{path} row {n}", path, cache)
        except BenchmarkError:
            raise
        except Exception as e:  # pyarrow's own error types for damaged files
            raise BenchmarkError(f"{path}: not a readable Parquet file ({e})") from None


def _mmau_parquet_row(
    row: Mapping[str, Any], where: str, path: Path, cache: Path
) -> tuple[str, dict[str, Any], Callable[[], str]]:
    attrs = row.get("other_attributes")
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{where}: field 'other_attributes' is not JSON ({e.msg})") from None
    if not isinstance(attrs, dict):
        raise BenchmarkError(
            f"{where}: field 'other_attributes' should be a JSON object with id, task, category, ...; got "
            f"{attrs!r:.60}"
        )
    raw = _field(row, "choices", where, list)
    letters = [m.group(1) if (m := _LETTER_PREFIX.match(c)) else "" for c in raw]
    prefixed = letters == [chr(ord("A") + i) for i in range(len(raw))]
    choices = [_LETTER_PREFIX.sub("", c, count=1) if prefixed else c for c in raw]
    answer = str(row.get("answer") or "")
    if prefixed and answer in raw:
        answer = choices[raw.index(answer)]
    elif prefixed:
        answer = _LETTER_PREFIX.sub("", answer, count=1)
    category = attrs.get("category")
    if isinstance(category, list) and len(category) == 1:  # 13 rows ship ["Reasoning"]
        category = category[0]
    rec = {
        "id": attrs.get("id"),
        "question": row.get("instruction"),
        "choices": choices,
        "answer": answer,
        **{k: v for k, v in attrs.items() if k not in ("id", "category")},
        "category": category,
    }
    audio = row.get("context")
    if not isinstance(audio, dict) or not (audio.get("bytes") or audio.get("path")):
        raise BenchmarkError(
            f"{where}: field 'context' should hold the audio ({{'bytes': ..., 'path': ...}}), got "
            f"{type(audio).__name__}"
        )
    if audio.get("bytes"):  # written only for the rows kept (benchmark.tasks)
        return where, rec, lambda: _embedded_audio(audio["bytes"], audio.get("path"), cache)
    return where, rec, lambda: _resolve(str(audio["path"]), path.parent)


def _mmau_parquet_files(cfg: Mapping[str, Any]) -> list[Path]:
    """The Hugging Face copy's Parquet shards: ``root`` (or ``benchmark.file``) itself, else
    ``<root>/data/*.parquet`` or ``<root>/*.parquet``; [] when there are none."""
    root = Path(os.path.expanduser(str(cfg["root"])))
    if cfg.get("file") and not root.is_file():
        root = root / str(cfg["file"])
    if root.is_file():
        return [root] if root.suffix.lower() == ".parquet" else []
    return sorted(root.glob("data/*.parquet")) or sorted(root.glob("*.parquet"))


def read_mmau(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MMAU (github.com/Sakshi113/MMAU): ``mmau-test-mini.json`` (``split: test-mini``, answers included) or
    ``mmau-test.json`` (``split: test``, answers withheld: predictions are written for the official server,
    nothing is scored). A JSON list of ``{id, audio_id, question, choices, answer, dataset, task, split,
    category, sub-category, difficulty}``; ``audio_id`` ("./test-mini-audios/<id>.wav") is relative to the
    JSON. The Hugging Face copy (``data/test-*.parquet``, audio inside) is read when there is no JSON
    (:func:`_mmau_parquet_rows`); its audio goes to ``benchmark.audio_cache``. ``tasks`` filters on ``task``
    (sound / music / speech)."""
    split = str(cfg.get("split") or "test-mini")
    if split not in ("test-mini", "test"):
        raise BenchmarkError(f"benchmark.split must be test-mini or test for MMAU, got {split!r}")
    parquet = _mmau_parquet_files(cfg)
    if parquet and not (Path(os.path.expanduser(str(cfg["root"]))) / f"mmau-{split}.json").is_file():
        read.source = str(parquet[0]) if len(parquet) == 1 else f"{parquet[0].parent}/*.parquet"
        cache = _audio_cache(cfg)
        rows: Iterable[tuple[str, Mapping[str, Any], Callable[[], str]]] = _mmau_parquet_rows(parquet, cache)
    else:
        path = _locate(cfg, [f"mmau-{split}.json"])
        _check_split(
            path, split, (m := re.fullmatch(r"mmau-(test-mini|test)\.json", path.name)) and m.group(1)
        )
        read.source = str(path)
        base = _audio_base(cfg, path)
        audio_key = cfg.get("audio_field") or "audio_id"
        rows = (
            (where, rec, lambda rec=rec, where=where: _audio_path(rec, audio_key, where, base))
            for _, where, rec in read_records(path)
        )
    items = []
    for where, rec, audio in rows:
        read.rows += 1
        if parquet and rec.get("split") not in (None, "", split):  # test-mini and test share the shard names
            raise BenchmarkError(
                f"{where}: a row of the release's {rec['split']!r} split, but benchmark.split={split!r}: pass "
                f"benchmark.split={rec['split']} to score it, or point benchmark.root at the {split!r} split"
            )
        if not read.keep("tasks", cfg.get("tasks"), rec.get("task"), "task"):
            continue
        withheld = not str(rec.get("answer") or "").strip()
        if withheld and split == "test-mini":
            _field(rec, "answer", where)  # raises: test-mini ships its answers
        item = _mcq_item(
            _field(rec, "id", where),
            audio(),
            _field(rec, "question", where),
            _field(rec, "choices", where, list),
            str(rec.get("answer") or ""),
            _prompt(cfg, DEFAULT_MCQ_PROMPT),
            where,
            _groups(rec, cfg.get("group_by") or ["task", "category", "sub-category", "difficulty"]),
            withheld=withheld,
        )
        item.meta["record"] = rec
        items.append(item)
    return items


def read_mmar(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MMAR (github.com/ddlBoJack/MMAR): ``MMAR-meta.jsonl`` since Feb 2026 (adds ``thinking``, ``cue``,
    ``rubric``), ``MMAR-meta.json`` (a JSON list) before; both are found. Records ``{id, audio_path, question,
    choices, answer, modality, category, sub-category, language, source, url, timestamp}``; ``audio_path``
    ("./audio/<id>.wav") is relative to the file. ``modalities`` filters on ``modality``. The JSON version has
    6 answers that are not exactly a choice: "2040" (choice "2040 ") is matched, the other 5 are counted as
    ``answer_not_in_choices``."""
    path = _locate(cfg, ["MMAR-meta.jsonl", "MMAR-meta.json"])
    read.source = str(path)
    base = _audio_base(cfg, path)
    items = []
    for _, where, rec in read_records(path):
        read.rows += 1
        if not read.keep("modalities", cfg.get("modalities"), rec.get("modality"), "modality"):
            continue
        item = _mcq_item(
            _field(rec, "id", where),
            _audio_path(rec, cfg.get("audio_field") or "audio_path", where, base),
            _field(rec, "question", where),
            _field(rec, "choices", where, list),
            _field(rec, "answer", where),
            _prompt(cfg, DEFAULT_MCQ_PROMPT),
            where,
            _groups(rec, cfg.get("group_by") or ["modality", "category", "sub-category"]),
        )
        item.meta["record"] = rec
        items.append(item)
    return items


def read_mmau_pro(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MMAU-Pro (huggingface.co/datasets/gamma-lab-umd/MMAU-Pro): ``test.parquet`` with ``id, audio_path``
    (a list of "data/<uuid>.wav", relative to the Parquet file once ``data.zip`` is extracted next to it)
    ``, question, choices, answer, category``. Only multiple-choice rows are read: ``open`` and ``instruction
    following`` rows (LLM-judged and regex-checked upstream) and rows with several audio files are skipped and
    counted. ``categories`` filters on ``category`` (``[music]`` for MMAU-Pro-Music)."""
    path = _locate(cfg, ["test.parquet"])
    read.source = str(path)
    base = _audio_base(cfg, path)
    items = []
    for _, where, rec in read_records(path):
        read.rows += 1
        if rec.get("category") in ("open", "instruction following"):
            read.skip("not multiple choice")
            continue
        if not read.keep("categories", cfg.get("categories"), rec.get("category"), "category"):
            continue
        audio = rec.get("audio_path")
        audio = [audio] if isinstance(audio, str) else list(audio if audio is not None else [])
        # the official scorer scores these rows (it reads no audio): counted by category, so that the paper's
        # MMAU-Pro-Music row says it is not comparable when music rows are among them
        if len(audio) != 1:
            read.skip(
                "several audio files" if audio else "no audio file", by={"category": rec.get("category")}
            )
            continue
        choices = _field(rec, "choices", where, list) if rec.get("choices") is not None else []
        if len(choices) < 2:  # the official scorer drops these too
            read.skip("no choices")
            continue
        item = _mcq_item(
            _field(rec, "id", where),
            _resolve(str(audio[0]), base),
            _field(rec, "question", where),
            choices,
            _field(rec, "answer", where),
            _prompt(cfg, DEFAULT_MCQ_PROMPT),
            where,
            _groups(rec, cfg.get("group_by") or ["category"]),
        )
        item.meta["record"] = rec
        items.append(item)
    return items


def _clip_index(index: Mapping[str, str]) -> dict[Any, str]:
    """MusicCaps clips by ``ytid`` and by ``(ytid, start)``, from the names they are downloaded under: the
    official "[<ytid>]-[<start>-<end>]", the downloaders' "<ytid>_<start>" and plain "<ytid>". A ``ytid`` with
    clips of several starts is left out of the by-``ytid`` lookup: any one of them could be the wrong clip."""
    clips: dict[Any, str] = {}
    starts: dict[str, set[str]] = {}
    for stem, path in sorted(index.items()):
        if stem.startswith("[") and "]-[" in stem:
            ytid, _, rest = stem[1:].partition("]-[")
            start = rest.split("-", 1)[0]
        else:
            ytid, _, start = stem.rpartition("_")
            if not ytid or not start.isdigit():
                ytid, start = stem, ""
        clips.setdefault((ytid, start), path)
        clips.setdefault(ytid, path)
        clips.setdefault(stem, path)  # a ytid may itself end in "_<digits>"
        starts.setdefault(ytid, set()).add(start)
    for ytid, found in starts.items():
        if len(found) > 1 and "" not in found and ytid not in index:
            del clips[ytid]
    return clips


def read_muchomusic(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MuChoMusic (Zenodo 12709974, github.com/mulab-mir/muchomusic): ``muchomusic.csv`` with ``question_id,
    question, dataset, dataset_identifier, genre, music_knowledge, music_reasoning, correct_answer,
    distractor_{1,2,3}_answer`` (+ annotation statistics). ``dataset_identifier`` is an SDD track id or a
    MusicCaps "<ytid>_<start>" (a ".json" suffix is tolerated). Audio: every audio file under ``audio_dir``
    (default: the CSV's folder, recursively) by stem: SDD "<track_id>.2min" / "<track_id>", MusicCaps
    "[<ytid>]-[<start>-<end>]", "<ytid>_<start>" or "<ytid>". Ids are ``question_id``; options are the answer +
    3 distractors shuffled with ``random.Random(f"{seed}:{id}")``, so an item's order depends on nothing else."""
    path = _locate(cfg, ["muchomusic.csv"])
    read.source = str(path)
    base = _audio_base(cfg, path)
    index = _audio_index(base) if base.is_dir() else {}
    clips = _clip_index(index)
    try:
        seed = int(cfg.get("seed", 0))
    except (TypeError, ValueError):
        raise BenchmarkError(f"benchmark.seed={cfg.get('seed')!r}: expected an integer") from None
    items = []
    for _, where, rec in read_records(path):
        read.rows += 1
        ident = _field(rec, "dataset_identifier", where).removesuffix(".json")
        dataset = str(rec.get("dataset", ""))
        rec_id = str(rec.get("question_id") or rec.get("id") or "").strip()
        if not rec_id:  # exports without the id column: derived from the row's content, not its position
            rec_id = f"{dataset}:{ident}:{_stable_id(rec.get('question'), rec.get('correct_answer'))}"
        original = [_field(rec, "correct_answer", where)]
        original += [_field(rec, f"distractor_{k}_answer", where) for k in (1, 2, 3)]
        order = list(range(4))
        random.Random(f"{seed}:{rec_id}").shuffle(order)
        if rec.get("audio_path"):
            audio = _resolve(str(rec["audio_path"]), base)
        elif dataset == "sdd":  # SDD keeps track <id> in audio/<its last two digits>/ (415600 -> 00/)
            expected = base / "sdd" / "audio" / ident[-2:].zfill(2) / f"{ident}.2min.mp3"
            audio = index.get(f"{ident}.2min") or index.get(ident) or str(expected)
        else:
            ytid, _, start = ident.rpartition("_")
            audio = (
                clips.get((ytid, start)) or clips.get(ytid) or clips.get(ident) or str(base / f"{ident}.wav")
            )
        item = _mcq_item(
            rec_id,
            audio,
            _field(rec, "question", where),
            [original[j] for j in order],
            original[0],
            _prompt(cfg, DEFAULT_MCQ_PROMPT),
            where,
            _groups(rec, cfg.get("group_by") or ["dataset", "genre", "music_knowledge", "music_reasoning"]),
        )
        # MuChoMusic's compare_answers counts the correct answer's own position only (answer_orders.index(0)): a
        # distractor with the same text is a wrong option there, so it is one here too
        item.answer_index = order.index(0)
        item.correct_indices = [item.answer_index]
        item.meta.update(record=rec, answer_orders=order, official_rule="muchomusic")
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------------------------
# Classification: GTZAN, NSynth, Medley-solos-DB (and any JSONL of {audio, label})
# --------------------------------------------------------------------------------------------------------------
def _label_setup(cfg: Mapping[str, Any]) -> tuple[list[str], list[str], dict[str, list[str]], str, str]:
    """(labels, display names, aliases by display name, mode, prompt) from a classification config."""
    labels = [str(x) for x in cfg.get("labels") or []]
    if len(labels) < 2:
        raise BenchmarkError(
            f"benchmark {cfg.get('name')}: 'labels' must list at least 2 labels, got {labels}"
        )
    names_map = dict(cfg.get("label_names") or {})
    names = [str(names_map.get(lab, lab)) for lab in labels]
    aliases = {
        str(names_map.get(k, k)): [str(a) for a in v] for k, v in dict(cfg.get("aliases") or {}).items()
    }
    mode = str(cfg.get("mode", "mcq"))
    if mode not in ("mcq", "open"):
        raise BenchmarkError(f"benchmark {cfg.get('name')}: mode must be 'mcq' or 'open', got {mode!r}")
    question = str(cfg.get("question", "What is the label of this audio?"))
    default = DEFAULT_CLS_MCQ_PROMPT if mode == "mcq" else DEFAULT_CLS_OPEN_PROMPT
    template = _prompt(cfg, default, ("question", "options", "labels"))
    prompt = template.format(question=question, options=format_options(names), labels=", ".join(names))
    return labels, names, aliases, mode, prompt


def _cls_item(setup: tuple, rec_id: str, audio: str, label: str, where: str, key: str) -> EvalItem:
    labels, names, aliases, mode, prompt = setup
    if label not in labels:
        raise BenchmarkError(f"{where}: field '{key}' = {label!r} is not in the label set {labels}")
    idx = labels.index(label)
    return EvalItem(
        id=rec_id,
        audio=audio,
        prompt=prompt,
        task="classification",
        answer=names[idx],
        choices=names,
        answer_index=idx,
        groups={"label": names[idx]},
        meta={"mode": mode, "aliases": aliases},
        correct_indices=[idx],
    )


def read_classification(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """JSONL of ``{audio, label}`` (field names: ``audio_field`` / ``label_field``); ``labels`` lists the label
    set in order, ``label_names`` optionally maps a label to the text shown to the model, ``aliases`` maps a
    label to extra spellings the parser accepts. ``mode``: ``mcq`` (labels as "(A) ..." options) or ``open``
    (label set listed in the question)."""
    path = _locate(cfg, ["test.jsonl"])
    read.source = str(path)
    base = _audio_base(cfg, path)
    setup = _label_setup(cfg)
    audio_key, label_key = cfg.get("audio_field") or "audio", cfg.get("label_field") or "label"
    items = []
    for line, where, rec in read_records(path):
        read.rows += 1
        audio, offset, duration = _audio_segment(rec, audio_key, where, base)
        item = _cls_item(setup, _record_id(rec, line), audio, _field(rec, label_key, where), where, label_key)
        item.offset, item.duration = offset, duration
        items.append(item)
    return items


def _gtzan_genres_dir(root: Path, labels: Sequence[str]) -> Path | None:
    for cand in (root, root / "genres", root / "genres_original", root / "Data" / "genres_original"):
        if cand.is_dir() and any((cand / lab).is_dir() for lab in labels):
            return cand
    for cand in sorted(root.glob("*/genres*")) + sorted(root.glob("*/*/genres*")):
        if cand.is_dir() and any((cand / lab).is_dir() for lab in labels):
            return cand
    return None


def read_gtzan(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """GTZAN as released (``genres/<genre>/<genre>.000NN.au``; the Kaggle copy's ``genres_original`` with
    ``.wav`` works too). ``split``: ``null`` for all 1000 clips, or a split list (a file name looked up in
    ``root``, or a path) with one "<genre>/<genre>.000NN.<ext>" per line, e.g. the fault-filtered
    ``test_filtered.txt`` (Kereliuk et al. 2015; github.com/jongpillee/music_dataset_split). A list entry
    matches the clip whatever its extension. Ids are the clip names ("blues.00012")."""
    root = _root(cfg)
    setup = _label_setup(cfg)
    labels = setup[0]
    genres = _gtzan_genres_dir(root, labels)
    if genres is None:
        raise BenchmarkError(
            f"benchmark {cfg.get('name')}: {root} has no genre folders ({', '.join(labels[:3])}, ...); "
            f"expected layout: {LAYOUTS['gtzan']}"
        )
    index = _audio_index(genres)
    split = cfg.get("split")
    if split:
        split_path = Path(os.path.expanduser(str(split)))
        if not split_path.is_absolute():
            found = [
                p for p in (root / split_path, genres / split_path, genres.parent / split_path) if p.is_file()
            ]
            split_path = found[0] if found else root / split_path
        if not split_path.is_file():
            raise BenchmarkError(
                f"benchmark.split={split}: split list not found (looked in {root}); pass its path, or null for "
                "all clips"
            )
        read.source = str(split_path)
        entries = [(n, ln.strip()) for n, ln in enumerate(_read_text(split_path).splitlines(), 1)]
        entries = [(n, e) for n, e in entries if e]
    else:
        read.source = str(genres)
        entries = [
            (0, f"{Path(p).parent.name}/{stem}")
            for stem, p in sorted(index.items())
            if Path(p).parent.name in labels
        ]
    items = []
    for n, entry in entries:
        read.rows += 1
        where = f"{read.source}:{n}" if n else str(genres)
        genre, _, name = entry.replace("\\", "/").rpartition("/")
        stem = name[: name.rfind(".")] if Path(name).suffix.lower() in AUDIO_SUFFIXES else name
        genre = genre.rsplit("/", 1)[-1] or stem.split(".")[0]
        audio = index.get(stem) or str(genres / genre / f"{stem}.au")
        items.append(_cls_item(setup, stem, audio, genre, where, "genre"))
    return items


def read_nsynth(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """NSynth (magenta.tensorflow.org/datasets/nsynth): ``nsynth-<split>/examples.json``, an object keyed by
    note name (``{note_str: {note, instrument_family_str, instrument_source_str, pitch, velocity, qualities,
    ...}}``) + ``nsynth-<split>/audio/<note_str>.wav``. ``root`` is the split folder or its parent. The label is
    ``label_field`` (``instrument_family_str`` or ``instrument_source_str``); ids are the note names."""
    split = str(cfg.get("split") or "test")
    root = _root(cfg)
    if root.is_dir() and not cfg.get("file") and (root / "examples.json").is_file():
        # root is a split folder: it must be the one asked for (nsynth-test/ read as split=valid scored the test)
        if (m := re.fullmatch(r"nsynth-(\w+)", root.name)) and m.group(1) != split:
            raise BenchmarkError(
                f"benchmark.root={root} is the NSynth {m.group(1)!r} split, but benchmark.split={split!r}: point "
                f"root at nsynth-{split}/ or at the folder that holds it"
            )
        path = root / "examples.json"
    else:  # never a bare examples.json further down: it may be another split's
        path = _locate(cfg, [f"nsynth-{split}/examples.json"])
        _check_split(path, split, (m := re.fullmatch(r"nsynth-(\w+)", path.parent.name)) and m.group(1))
    read.source = str(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BenchmarkError(f"{path}: expected an object of {{note_str: {{...}}}} records")
    audio_dir = _audio_base(cfg, path) if cfg.get("audio_dir") else path.parent / "audio"
    setup = _label_setup(cfg)
    key = cfg.get("label_field") or "instrument_family_str"
    items = []
    for note, rec in data.items():
        read.rows += 1
        where = f"{path}: note {note}"
        item = _cls_item(setup, note, str(audio_dir / f"{note}.wav"), _field(rec, key, where), where, key)
        item.groups["pitch"] = "n/a" if rec.get("pitch") is None else str(rec["pitch"])
        items.append(item)
    return items


def read_medley_solos(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """Medley-solos-DB (Zenodo 3464194): ``Medley-solos-DB_metadata.csv`` (``subset, instrument,
    instrument_id, song_id, uuid4``) + the extracted ``Medley-solos-DB_<subset>-<instrument_id>_<uuid4>.wav``
    files anywhere under ``root``. ``subset`` (training / validation / test, default test) keeps one subset;
    the other rows are counted as skipped. Ids are the uuid4s."""
    path = _locate(cfg, ["Medley-solos-DB_metadata.csv", "annotation/Medley-solos-DB_metadata.csv"])
    read.source = str(path)
    base = _audio_base(cfg, path) if cfg.get("audio_dir") else _root(cfg)
    index = _audio_index(base if base.is_dir() else path.parent)
    subset = str(cfg.get("subset") or "test")
    setup = _label_setup(cfg)
    items = []
    for _, where, rec in read_records(path):
        read.rows += 1
        if not read.keep("subset", [subset], _field(rec, "subset", where), "subset"):
            continue
        uuid = _field(rec, "uuid4", where)
        stem = f"Medley-solos-DB_{subset}-{_field(rec, 'instrument_id', where)}_{uuid}"
        audio = index.get(stem) or str(base / f"{stem}.wav")
        items.append(_cls_item(setup, uuid, audio, _field(rec, "instrument", where), where, "instrument"))
    return items


# --------------------------------------------------------------------------------------------------------------
# Captioning and open questions: MusicCaps, Music Instruct, MusicAVQA
# --------------------------------------------------------------------------------------------------------------
def read_musiccaps(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MusicCaps ``musiccaps-public.csv``: ``ytid, start_s, end_s, audioset_positive_labels, aspect_list,
    caption, author_id, is_balanced_subset, is_audioset_eval`` (captions may hold newlines). Audio: with
    ``audio_template`` unset, any audio file under ``audio_dir`` (default: the CSV's folder) named
    "[<ytid>]-[<start>-<end>]", "<ytid>_<start>" or "<ytid>"; with a template, ``audio_dir/audio_template``
    formatted with the row's columns. ``segment: true``: the file is the full YouTube audio and
    ``start_s..end_s`` is cut from it. ``subset``: ``all``, ``eval`` (is_audioset_eval) or ``balanced``."""
    path = _locate(cfg, ["musiccaps-public.csv"])
    read.source = str(path)
    base = _audio_base(cfg, path)
    template = cfg.get("audio_template")
    clips = {} if template else _clip_index(_audio_index(base) if base.is_dir() else {})
    segment = bool(cfg.get("segment", False))
    subset = str(cfg.get("subset") or "all")
    flag = {"all": None, "eval": "is_audioset_eval", "balanced": "is_balanced_subset"}
    if subset not in flag:
        raise BenchmarkError(
            f"benchmark {cfg.get('name')}: subset must be one of {list(flag)}, got {subset!r}"
        )
    items = []
    for _, where, rec in read_records(path):
        read.rows += 1
        if flag[subset] and str(rec.get(flag[subset], "")).strip().lower() not in ("true", "1"):
            read.skip(f"not in subset {subset}")
            continue
        ytid = _field(rec, "ytid", where)
        try:
            start, end = float(_field(rec, "start_s", where)), float(_field(rec, "end_s", where))
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):  # "nan", "inf" parse
                raise ValueError
        except ValueError:
            raise BenchmarkError(
                f"{where}: start_s/end_s must be numbers of seconds with 0 <= start_s < end_s, got "
                f"{rec.get('start_s')!r}, {rec.get('end_s')!r}"
            ) from None
        fmt = {k: rec.get(k) for k in rec} | {"ytid": ytid, "start_s": int(start), "end_s": int(end)}
        if template:
            try:
                audio = _resolve(str(template).format(**fmt), base)
            except (KeyError, IndexError, ValueError) as e:
                raise BenchmarkError(
                    f"benchmark.audio_template={template!r}: cannot fill it from {where} ({type(e).__name__}: {e}); "
                    f"placeholders are the CSV's columns: {', '.join('{' + k + '}' for k in fmt)}"
                ) from None
        else:
            audio = clips.get((ytid, str(int(start)))) or clips.get(ytid) or str(base / f"{ytid}.wav")
        items.append(
            EvalItem(
                id=f"{ytid}_{int(start)}",
                audio=audio,
                prompt=_prompt(cfg, DEFAULT_CAPTION_PROMPT, None),
                task="caption",
                answer=_field(rec, "caption", where),
                offset=start if segment else 0.0,
                duration=(end - start) if segment else None,
                meta={"aspects": _field(rec, "aspect_list", where, list) if rec.get("aspect_list") else []},
            )
        )
    return items


def read_music_instruct(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """Music Instruct (huggingface.co/datasets/m-a-p/Music-Instruct, MusiLingo): ``MusicInstruct/
    music_instruct.json`` (``question_type: all``; ``short`` / ``long``: ``music_instruct_short.json`` /
    ``_long.json``), an object ``{"QA": [{question, answer, ytid, is_audioset_eval, ...}]}``. The test split
    is the pairs whose MusicCaps clip is in AudioSet's eval split (``is_audioset_eval``), as MusiLingo's
    loader does. Audio: the MusicCaps clip of ``ytid`` under ``audio_dir`` (default: ``root``). The release
    has no ids: an item's id is "<ytid>:<hash of question and answer>" (a repeated pair gets "#2", ...)."""
    qtype = str(cfg.get("question_type") or "all")
    if qtype not in ("all", "short", "long"):
        raise BenchmarkError(f"benchmark.question_type must be all, short or long, got {qtype!r}")
    name = "music_instruct.json" if qtype == "all" else f"music_instruct_{qtype}.json"
    path = _locate(cfg, [f"MusicInstruct/{name}", name])
    read.source = str(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("QA"), list):
        raise BenchmarkError(f"{path}: expected an object {{'QA': [...]}} (Music Instruct's layout)")
    base = _audio_base(cfg, path) if cfg.get("audio_dir") else _root(cfg)
    clips = _clip_index(_audio_index(base if base.is_dir() else path.parent))
    split = str(cfg.get("split") or "test")
    if split not in ("test", "train"):  # anything but "test" read as train scored the wrong split
        raise BenchmarkError(f"benchmark.split must be test or train for Music Instruct, got {split!r}")
    want_eval = split == "test"
    seen: Counter[str] = Counter()
    items = []
    for n, rec in enumerate(data["QA"], 1):
        read.rows += 1
        where = f"{path}: QA[{n - 1}]"
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: expected an object, got {type(rec).__name__}")
        in_eval = rec.get("is_audioset_eval")
        if isinstance(in_eval, str):  # "False" is not true (a CSV or string-typed export)
            in_eval = in_eval.strip().lower() in ("true", "1")
        if bool(in_eval) != want_eval:
            read.skip("not in split " + ("test" if want_eval else "train"))
            continue
        ytid, question, answer = (_field(rec, k, where) for k in ("ytid", "question", "answer"))
        rec_id = f"{ytid}:{_stable_id(question, answer)}"
        seen[rec_id] += 1
        if seen[rec_id] > 1:
            rec_id += f"#{seen[rec_id]}"
        items.append(
            EvalItem(
                id=rec_id,
                audio=clips.get(ytid) or str(base / f"{ytid}.wav"),
                prompt=str(question).strip(),
                task="open_qa",
                answer=answer,
                groups={"question_type": qtype},
            )
        )
    return items


# Number words MusicAVQA answers with, and the digits a model may write instead.
_NUMBER_ALIASES = {
    w: [str(i)]
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
} | {"more than ten": ["more than 10"]}


_AVQA_SLOT = re.compile(r"<[^<>]*>")


def read_music_avqa(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MUSIC-AVQA (github.com/GeWu-Lab/MUSIC-AVQA): ``avqa-<split>.json`` (``data/json_update/``, the
    corrected release, preferred over ``data/json/``), a list of ``{video_id, question_id, type,
    question_content, templ_values, question_deleted, anser}`` (sic: "anser"). The placeholders (``<Object>``,
    ``<LR>``, ``<FL>``, ``<TH>``, ...) are filled from ``templ_values`` in order. ``modalities`` keeps question
    types by their first element (default ``[Audio]``: the audio-only questions). The answer is open (yes / no, a number word, ...): the
    choices an answer is parsed against are the answers the same question template has in the file.
    Audio: ``<video_id>.wav`` anywhere under ``audio_dir`` (default: ``root``)."""
    split = str(cfg.get("split") or "test")
    path = _locate(
        cfg,
        [f"data/json_update/avqa-{split}.json", f"json_update/avqa-{split}.json", f"avqa-{split}.json"]
        + [f"data/json/avqa-{split}.json", f"json/avqa-{split}.json"],
    )
    _check_split(path, split, (m := re.fullmatch(r"avqa-(\w+)\.json", path.name)) and m.group(1))
    read.source = str(path)
    base = _audio_base(cfg, path) if cfg.get("audio_dir") else _root(cfg)
    if not base.is_dir():  # root is the JSON itself: data/audio/ is beside data/json_update/ (or data/json/)
        release = path.parent.parent.parent
        base = (
            release
            if path.parent.name in ("json_update", "json") and (release / "data").is_dir()
            else path.parent
        )
    index = _audio_index(base)
    rows = []
    for _, where, rec in read_records(path):
        read.rows += 1
        try:
            qtype = json.loads(_field(rec, "type", where))
            values = json.loads(rec.get("templ_values") or "[]")
            if not (isinstance(qtype, list) and qtype and isinstance(values, list)):
                raise TypeError
            qtype, values = [str(t) for t in qtype], [str(v) for v in values]
        except (json.JSONDecodeError, TypeError):
            raise BenchmarkError(
                f"{where}: fields 'type' / 'templ_values' should hold JSON lists (as '[\"Audio\", \"Counting\"]'"
                f" / '[\"violin\"]'), got {rec.get('type')!r} / {rec.get('templ_values')!r}"
            ) from None
        if str(rec.get("question_deleted") or 0).strip() not in ("0", "1"):
            raise BenchmarkError(
                f"{where}: field 'question_deleted' should be 0 or 1, got {rec['question_deleted']!r}"
            )
        if int(rec.get("question_deleted") or 0):
            read.skip("question_deleted")
            continue
        if not read.keep("modalities", cfg.get("modalities"), qtype[0], "type"):
            continue
        rows.append((where, rec, qtype, values))
    answers_by_template: dict[str, list[str]] = {}
    for where, rec, _, _ in rows:
        answers = answers_by_template.setdefault(str(rec.get("question_content")), [])
        if (ans := _field(rec, "anser", where)) not in answers:
            answers.append(ans)
    template = _prompt(cfg, "{question} Answer with a single word or number.", ("question",))
    items = []
    for where, rec, qtype, values in rows:
        question = _field(rec, "question_content", where).strip()
        # every "<...>" slot (<Object>, <LR>, <FL>, <TH>, <LRer>, <LL>, <BA>) takes the next value, as the
        # release's own loader fills them (net_grd_avst/dataloader_avst.py: each word holding "<", in order)
        slots = _AVQA_SLOT.findall(question)
        if len(slots) != len(values):
            raise BenchmarkError(
                f"{where}: field 'templ_values' has {len(values)} value(s) {values} for the {len(slots)} "
                f"slot(s) {slots} of question_content {question!r}"
            )
        parts = _AVQA_SLOT.split(question)  # text, value, text, ...: len(values) + 1 pieces of text
        question = "".join(
            p + (values[k].replace("_", " ") if k < len(values) else "") for k, p in enumerate(parts)
        )
        choices = sorted(answers_by_template[str(rec["question_content"])])
        if len(choices) < 2:  # a template whose rows all share one answer: parse against yes/no or numbers
            fallback = {"yes", "no"} if choices[0] in ("yes", "no") else set(_NUMBER_ALIASES)
            # ... when the answer is one of them; any other answer ("left") is parsed against itself alone
            choices = sorted({*choices, *fallback}) if choices[0] in fallback else choices
        answer = str(rec["anser"])
        idx = choices.index(answer)
        items.append(
            EvalItem(
                id=str(_field(rec, "question_id", where)),
                audio=index.get(str(rec.get("video_id"))) or str(base / f"{rec.get('video_id')}.wav"),
                prompt=template.format(question=question),
                task="mcq",
                answer=answer,
                choices=choices,
                answer_index=idx,
                groups={"type": " / ".join(qtype)},
                meta={"mode": "open", "aliases": _NUMBER_ALIASES, "question": question},
                correct_indices=[idx],
            )
        )
    return items


# --------------------------------------------------------------------------------------------------------------
# Lyrics transcription: JamendoLyrics, Opencpop, MUSDB18 lyrics (and any JSONL of {audio, lyrics})
# --------------------------------------------------------------------------------------------------------------
LANGUAGE_CODES = {"english": "en", "german": "de", "french": "fr", "spanish": "es", "chinese": "zh"}


def _lyrics_item(
    cfg: Mapping[str, Any], rec_id: str, audio: str, text: str, lang: str, **seg: Any
) -> EvalItem:
    return EvalItem(
        id=rec_id,
        audio=audio,
        prompt=_prompt(cfg, DEFAULT_LYRICS_PROMPT, None),
        task="lyrics",
        answer=text,
        groups={"language": lang},
        meta={"language": lang},
        **seg,
    )


def read_lyrics(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """JSONL of ``{audio, lyrics, language?}`` (``language`` defaults to ``default_language``)."""
    path = _locate(cfg, ["test.jsonl"])
    read.source = str(path)
    base = _audio_base(cfg, path)
    items = []
    for line, where, rec in read_records(path):
        read.rows += 1
        audio, offset, duration = _audio_segment(rec, cfg.get("audio_field") or "audio", where, base)
        items.append(
            _lyrics_item(
                cfg,
                _record_id(rec, line),
                audio,
                _field(rec, cfg.get("lyrics_field") or "lyrics", where),
                str(rec.get("language") or cfg.get("default_language", "en")),
                offset=offset,
                duration=duration,
            )
        )
    return items


def _language_code(language: str) -> str:
    """JamendoLyrics' "English" and Jam-ALT's "en" alike as "en" (an unknown name lowercased)."""
    return LANGUAGE_CODES.get(language.strip().lower(), language.strip().lower())


def _same_language(wanted: str, language: str) -> bool:
    """``languages: [English]``, ``[english]`` and ``[en]`` all keep JamendoLyrics' "English" rows and Jam-ALT's
    ``metadata.jsonl`` rows of language "en"."""
    return _language_code(wanted) == _language_code(language)


def _jamendo_audio(folder: Path, filepath: str, lang: str, index: dict[str, str]) -> str:
    """A JamendoLyrics song's audio: ``mp3/<Filepath>`` (GitHub), ``subsets/<lang>/mp3/<Filepath>`` (the Hugging
    Face copy, whose ``mp3/`` is gone or holds symlinks), ``audio/<Filepath>`` (Jam-ALT), else a file of that name
    anywhere under ``folder`` (``index``: filled on first use); else the GitHub path, reported missing."""
    for sub in ("mp3", f"subsets/{lang}/mp3", "audio", f"subsets/{lang}/audio"):
        path = _find(folder / sub, filepath)
        if path.is_file():
            return str(path)
    if not index:
        for dirpath, _, files in os.walk(folder):
            for name in sorted(files):
                index.setdefault(unicodedata.normalize("NFC", name), str(Path(dirpath, name)))
        index.setdefault("", "")  # walked (an empty folder is not walked again)
    return index.get(unicodedata.normalize("NFC", filepath)) or str(_find(folder / "mp3", filepath))


def _jam_alt_jsonl(cfg: Mapping[str, Any]) -> list[Path]:
    """Jam-ALT's ``metadata.jsonl`` files when the folder has no CSV table (since v1.2 on the Hugging Face Hub):
    ``<root>/metadata.jsonl`` (every song), else every ``<root>/subsets/<lang>/metadata.jsonl`` (a download of the
    language subsets alone, or ``benchmark.root`` a subset folder); none when ``benchmark.file`` names a file."""
    root = _root(cfg)
    if root.is_file() or cfg.get("file"):
        return []
    if (root / "metadata.jsonl").is_file():
        return [root / "metadata.jsonl"]
    return sorted(root.glob("subsets/*/metadata.jsonl"))


def _jam_alt_rows(cfg: Mapping[str, Any], paths: list[Path], read: ReadLog) -> list[EvalItem]:
    """Jam-ALT's ``metadata.jsonl`` rows (the Hugging Face audio-folder layout): ``file_name`` (the audio, relative
    to the file's folder: ``subsets/<lang>/audio/<name>.mp3`` at the top, ``audio/<name>.mp3`` in a subset),
    ``name``, ``text`` (the revised lyrics, line and section breaks kept) and ``language`` (``en``, ``de``, ``fr``,
    ``es``); other fields (``lines``, ``words``, ``license_type``...) are not read."""
    read.source = ", ".join(map(str, paths))
    index: dict[str, str] = {}
    items = []
    for path in paths:
        for _, where, rec in read_records(path):
            read.rows += 1
            language = _field(rec, "language", where)
            if not read.keep("languages", cfg.get("languages"), language, "language", _same_language):
                continue
            file_name = _field(rec, "file_name", where)
            audio = Path(_resolve(file_name, path.parent))
            name = str(rec.get("name") or "").strip() or audio.stem
            lang = _language_code(language)
            if not audio.is_file():
                # a copy laid out otherwise (the older Jam-ALT folders), else reported at file_name's path
                found = Path(_jamendo_audio(path.parent, audio.name, lang, index))
                audio = found if found.is_file() else audio
            items.append(_lyrics_item(cfg, name, str(audio), _field(rec, "text", where), lang))
            items[-1].meta["scorer"] = "alt-eval"
    return items


def _song_name(filepath: str) -> str:
    """A JamendoLyrics / Jam-ALT song's name, its id: the CSV's ``Filepath`` without the extension."""
    return filepath[: filepath.rfind(".")] if "." in filepath else filepath


def read_jamendolyrics(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """JamendoLyrics MultiLang (github.com/f90/jamendolyrics): ``JamendoLyrics.csv`` (``URL, Filepath, Artist,
    Title, Genre, LicenseType, Language, LyricOverlap, Polyphonic, NonLexical``) + ``mp3/<Filepath>`` +
    ``lyrics/<name>.txt`` (the normalised lyrics; ``<name>.words.txt`` is the word list for alignment). The
    Hugging Face copy (jamendolyrics/jamendolyrics) keeps the audio in ``subsets/<lang>/mp3/``. Jam-ALT
    (jamendolyrics/jam-alt, the revised transcripts of the same songs) ships ``metadata.csv`` (the same columns) +
    ``audio/<Filepath>`` + ``lyrics/<name>.txt``, and is read when there is no ``JamendoLyrics.csv``; since v1.2
    also ``metadata.jsonl`` + ``subsets/<lang>/{metadata.jsonl,audio/}``, read whenever there (the table its
    Hugging Face loader reads, :func:`_jam_alt_rows`). Jam-ALT's items are also scored by its own scorer, alt-eval (``meta["scorer"]``).
    Whole songs are transcribed. ``languages`` keeps some (English, German, French, Spanish, or their codes);
    ids are the names."""
    try:
        path = _locate(cfg, ["JamendoLyrics.csv", "metadata.csv"], "JamendoLyrics.csv")
    except BenchmarkError:
        jsonl = _jam_alt_jsonl(cfg)
        if not jsonl:
            raise
        return _jam_alt_rows(cfg, jsonl, read)
    if path.suffix.lower() == ".jsonl":  # benchmark.file / benchmark.root naming Jam-ALT's metadata.jsonl
        return _jam_alt_rows(cfg, [path], read)
    if (
        path.name.lower() == "metadata.csv"
        and not cfg.get("file")
        and (path.parent / "metadata.jsonl").is_file()
    ):
        # Jam-ALT since v1.2 keeps metadata.csv and lyrics/ beside metadata.jsonl, the table its Hugging Face
        # loader (load_dataset, as alt-eval's README scores it) reads: the release's current text, in the CSV's
        # song order, so that `limit=N` asks the songs a run begun on the CSV asked, whatever the JSONL's order
        items = _jam_alt_rows(cfg, [path.parent / "metadata.jsonl"], read)
        order = {_song_name(str(rec.get("Filepath"))): k for k, (_, _, rec) in enumerate(read_records(path))}
        return sorted(items, key=lambda it: order.get(it.id, len(order)))
    read.source = str(path)
    folder = path.parent
    jam_alt = path.name.lower() == "metadata.csv"  # Jam-ALT's table (revised, formatted lyrics)
    index: dict[str, str] = {}
    items = []
    for _, where, rec in read_records(path):
        read.rows += 1
        language = _field(rec, "Language", where)
        if not read.keep("languages", cfg.get("languages"), language, "Language", _same_language):
            continue
        filepath = _field(rec, "Filepath", where)
        name = _song_name(filepath)
        lyrics = _find(folder / "lyrics", f"{name}.txt")
        if not lyrics.is_file():
            raise BenchmarkError(
                f"{where}: lyrics file {lyrics} not found; expected layout: {LAYOUTS['jamendolyrics']}"
            )
        text = _read_text(lyrics)
        lang = _language_code(language)
        items.append(_lyrics_item(cfg, name, _jamendo_audio(folder, filepath, lang, index), text, lang))
        if jam_alt:
            items[-1].meta["scorer"] = "alt-eval"
    return items


def read_opencpop(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """Opencpop (wenet.org.cn/opencpop): ``segments/<split>.txt`` (``split``: test or train), one
    ``uid|text|phonemes|notes|note_durations|phoneme_durations|slurs`` line per sung phrase, + ``segments/
    wavs/<uid>.wav``. The reference is the Chinese ``text`` (scored with CER); ids are the uids."""
    split = str(cfg.get("split") or "test")
    path = _locate(cfg, [f"segments/{split}.txt", f"{split}.txt"])
    _check_split(path, split, path.stem if path.stem in ("train", "test") else None)
    read.source = str(path)
    wavs = _audio_base(cfg, path) if cfg.get("audio_dir") else path.parent / "wavs"
    items = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        read.rows += 1
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise BenchmarkError(f"{path}:{n}: expected 'uid|text|phonemes|...', got {line[:60]!r}")
        uid = parts[0].strip()
        items.append(_lyrics_item(cfg, uid, str(wavs / f"{uid}.wav"), parts[1].strip(), "zh"))
    return items


def _mmss(value: str, where: str) -> float:
    minutes, _, seconds = value.partition(":")
    try:
        return 60 * int(minutes) + float(seconds)
    except ValueError:
        raise BenchmarkError(f"{where}: expected a MM:SS time, got {value!r}") from None


# The MUSDB18 lyrics extension's line types. The authors' own preprocessing (github.com/schufo/plla-tisvs
# 03_preprocessing_musdb_audio_txt_char.py) maps them to its older labels a->n, b->s, c->d, d->x, and its data.py
# treats x as "no vocals in snippet" (text replaced by a lone space token): a d line has no singing to transcribe.
MUSDB_LINE_TYPES = ("a", "b", "c", "d")


def read_musdb18_lyrics(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """MUSDB18 lyrics extension (Schulze-Forster et al. 2021, Zenodo 3989267): ``<split>/<track name>.txt``
    with one ``MM:SS MM:SS <a|b|c|d> <text>`` line per annotated span (a line starting with ``*`` was rejected by
    the annotators and is skipped; a ``d`` span has no vocals and is skipped, its text, if any, kept out of the
    song's reference; any other type is refused). Audio from ``audio_dir``: MUSDB18 ``<split>/<track
    name>.stem.mp4`` (its first stream is the mixture) or MUSDB18-HQ ``<split>/<track name>/mixture.wav``.
    ``unit: song`` scores whole songs (the lines joined), ``unit: line`` each annotated line as a segment (id
    "<track>#<n>")."""
    split = str(cfg.get("split") or "test")
    unit = str(cfg.get("unit") or "song")
    if unit not in ("song", "line"):
        raise BenchmarkError(f"benchmark.unit must be song or line, got {unit!r}")
    root = _root(cfg)
    folders = [root / split, root / "lyrics_transcripts" / split, root / "lyrics" / split]
    folder = next((f for f in folders if f.is_dir() and any(f.glob("*.txt"))), None)
    if folder is None:
        raise BenchmarkError(
            f"benchmark {cfg.get('name')}: {root} has no {split}/<track>.txt transcripts; expected layout: "
            f"{LAYOUTS['musdb18_lyrics']}"
        )
    read.source = str(folder)
    audio_root = Path(os.path.expanduser(str(cfg.get("audio_dir") or root)))
    if not audio_root.is_absolute():
        audio_root = root / audio_root
    items = []
    for path in sorted(folder.glob("*.txt")):
        track = path.stem
        hq = audio_root / split / track / "mixture.wav"
        audio = str(hq if hq.is_file() else audio_root / split / f"{track}.stem.mp4")
        lines = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            read.rows += 1
            where = f"{path}:{n}"
            if line.startswith("*"):
                read.skip("rejected line (*)")
                continue
            parts = line.split(maxsplit=3)
            if len(parts) < 3 or parts[2] not in MUSDB_LINE_TYPES:
                raise BenchmarkError(
                    f"{where}: expected 'MM:SS MM:SS <type> <text>' with type one of "
                    f"{', '.join(MUSDB_LINE_TYPES)}, got {line[:60]!r}"
                )
            start, end = _mmss(parts[0], where), _mmss(parts[1], where)
            if parts[2] == "d":  # no singing in this span: nothing to transcribe (it may have no text at all)
                read.skip("no vocals (type d)")
                continue
            if len(parts) < 4:
                raise BenchmarkError(f"{where}: a type {parts[2]!r} line needs its text, got {line[:60]!r}")
            lines.append((n, start, end, parts[2], parts[3].strip()))
        if unit == "song" and lines:
            items.append(_lyrics_item(cfg, track, audio, "\n".join(t for *_, t in lines), "en"))
        for n, start, end, kind, text in lines if unit == "line" else []:
            item = _lyrics_item(cfg, f"{track}#{n}", audio, text, "en", offset=start, duration=end - start)
            item.groups["line_type"] = kind
            items.append(item)
    return items


# --------------------------------------------------------------------------------------------------------------
# The project's synthetic corpus
# --------------------------------------------------------------------------------------------------------------
def _turns(rec: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(first user text, first assistant text) of ``conversations`` in the LLaVA/AF3 layout (``from``/``value``)
    or the chat layout (``role``/``content``, content a string or a list of ``{"type":"text"}`` parts)."""
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        return "", ""
    user = assistant = ""
    for turn in convs:
        if not isinstance(turn, dict):
            raise BenchmarkError(f"{where}: 'conversations' entries must be objects, got {turn!r:.60}")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content", ""))
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if role in ("human", "user") and not user:
            user = str(content)
        elif role in ("gpt", "assistant") and not assistant:
            assistant = str(content)
    return user, assistant


def read_synthetic(cfg: Mapping[str, Any], read: ReadLog) -> list[EvalItem]:
    """The project's synthetic corpus (test split JSONL). MCQ records: ``task: "mcq"``, ``question_type``,
    ``choices``, ``answer`` (option text), ``answer_letter``, ``audio`` (relative to the JSONL), ``conversations``.
    The prompt is the user turn without ``<sound>`` (what the model was trained on); if it does not already
    list "(A) ..." options they are appended with ``prompt``. Caption records (``task: "caption"``) are scored
    with BLEU/ROUGE-L against ``caption`` or the assistant turn when ``include_captions`` is true, and by the facts
    they should state (:func:`musicflamingo.rewards.record_facts`: a ``facts`` field, or the clip's ``meta``)."""
    path = _locate(cfg, ["test.jsonl"])
    read.source = str(path)
    base = path.parent.resolve() if not cfg.get("audio_dir") else _audio_base(cfg, path)
    include_captions = bool(cfg.get("include_captions", True))
    items = []
    for line, where, rec in read_records(path):
        read.rows += 1
        task = rec.get("task")
        audio, offset, duration = _audio_segment(rec, "audio", where, base)
        user, assistant = _turns(rec, where)
        text = user.replace("<sound>", "").strip()
        seg = {"offset": offset, "duration": duration}
        if task == "mcq":
            choices = _field(rec, "choices", where, list)
            answer = _field(rec, "answer", where)
            letter = str(rec.get("answer_letter") or "").strip().strip("()").upper()
            correct = _answer_indices(answer, choices)
            if letter and (not correct or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[correct[0]] != letter):
                raise BenchmarkError(
                    f"{where}: answer_letter {letter!r} does not point at answer {answer!r} in {choices}"
                )
            question = text or _field(rec, "question", where)
            # The user turn is what the model was trained on; add the options only if it does not list them.
            template = "{question}" if "(A)" in question else _prompt(cfg, DEFAULT_MCQ_PROMPT)
            item = _mcq_item(_record_id(rec, line), audio, question, choices, answer, template, where, {})
            item.groups = {"question_type": str(rec.get("question_type") or "n/a")}
            item.offset, item.duration = seg["offset"], seg["duration"]
            items.append(item)
        elif task == "caption" and include_captions:
            reference = str(rec.get("caption") or assistant).strip()
            if not reference:
                raise BenchmarkError(f"{where}: caption record has no 'caption' field and no assistant turn")
            prompt = text or str(cfg.get("caption_prompt"))
            from musicflamingo.rewards import record_facts  # here: see eval.metrics.score_caption_facts

            try:
                facts = record_facts(rec, where)
            except ValueError as e:
                raise BenchmarkError(str(e)) from None
            items.append(
                EvalItem(
                    id=_record_id(rec, line),
                    audio=audio,
                    prompt=prompt,
                    task="caption",
                    answer=reference,
                    meta={"facts": [dataclasses.asdict(f) for f in facts]} if facts else {},
                    **seg,
                )
            )
        else:
            read.skip(f"task {task!r} not scored here")
    return items


# The benchmark settings each format reads, besides COMMON_KEYS. A key that its format does not read (a
# `+benchmark.task=[music]` typo for `tasks`) is refused: ignored, it would score every task without a word.
COMMON_KEYS = frozenset({"name", "format", "root", "max_new_tokens", "skip_missing_audio", "cer_languages"})
_LABEL_KEYS = ("labels", "label_names", "aliases", "mode", "question", "prompt")
FORMAT_KEYS: dict[str, frozenset[str]] = {
    "mmau": frozenset(
        {"split", "file", "audio_dir", "audio_field", "audio_cache", "tasks", "group_by", "prompt"}
    ),
    "mmar": frozenset({"file", "audio_dir", "audio_field", "modalities", "group_by", "prompt"}),
    "mmau_pro": frozenset({"file", "audio_dir", "categories", "group_by", "prompt"}),
    "muchomusic": frozenset({"file", "audio_dir", "seed", "group_by", "prompt"}),
    "classification": frozenset({"file", "audio_dir", "audio_field", "label_field", *_LABEL_KEYS}),
    "gtzan": frozenset({"split", *_LABEL_KEYS}),
    "nsynth": frozenset({"split", "file", "audio_dir", "label_field", *_LABEL_KEYS}),
    "medley_solos": frozenset({"file", "audio_dir", "subset", *_LABEL_KEYS}),
    "musiccaps": frozenset({"file", "audio_dir", "audio_template", "segment", "subset", "prompt"}),
    "music_instruct": frozenset(
        {"file", "audio_dir", "question_type", "split"}
    ),  # the question is the prompt
    "music_avqa": frozenset({"file", "audio_dir", "split", "modalities", "prompt"}),
    "lyrics": frozenset({"file", "audio_dir", "audio_field", "lyrics_field", "default_language", "prompt"}),
    "jamendolyrics": frozenset({"file", "languages", "prompt"}),
    "opencpop": frozenset({"file", "audio_dir", "split", "prompt"}),
    "musdb18_lyrics": frozenset({"audio_dir", "split", "unit", "prompt"}),
    "synthetic": frozenset({"file", "audio_dir", "include_captions", "caption_prompt", "prompt"}),
}


# configs/eval.yaml's top-level settings a benchmark does not take (named when typed as benchmark.<key>)
EVAL_SETTINGS = frozenset(
    {"limit", "batch_size", "sort_by_length", "think", "stop", "system_prompt", "tag", "dtype", "device"}
)


def check_benchmark_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse a benchmark setting that ``cfg["format"]`` does not read, naming the close spelling it may be. With
    ``format=classification`` (a JSONL of yours on a GTZAN, NSynth or Medley-solos-DB config) the keys of those
    configs are allowed: they come from the config file."""
    fmt = str(cfg.get("format"))
    known = COMMON_KEYS | FORMAT_KEYS.get(fmt, frozenset())
    if fmt == "classification":
        known |= FORMAT_KEYS["gtzan"] | FORMAT_KEYS["nsynth"] | FORMAT_KEYS["medley_solos"]
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        # eval.yaml's own settings typed under benchmark. (+benchmark.limit=2 limited nothing)
        top = f" (did you mean {key}=..., a setting of eval.py itself?)" if key in EVAL_SETTINGS else ""
        raise BenchmarkError(
            f"benchmark.{key}: benchmark {cfg.get('name', fmt)} (format {fmt}) has no such setting"
            + (top or (f" (did you mean benchmark.{close[0]}?)" if close else ""))
            + f"; it reads: {', '.join(sorted(known))}"
        )


READERS: dict[str, Callable[[Mapping[str, Any], ReadLog], list[EvalItem]]] = {
    "mmau": read_mmau,
    "mmar": read_mmar,
    "mmau_pro": read_mmau_pro,
    "muchomusic": read_muchomusic,
    "classification": read_classification,
    "gtzan": read_gtzan,
    "nsynth": read_nsynth,
    "medley_solos": read_medley_solos,
    "musiccaps": read_musiccaps,
    "music_instruct": read_music_instruct,
    "music_avqa": read_music_avqa,
    "lyrics": read_lyrics,
    "jamendolyrics": read_jamendolyrics,
    "opencpop": read_opencpop,
    "musdb18_lyrics": read_musdb18_lyrics,
    "synthetic": read_synthetic,
}


def build_benchmark(cfg: Mapping[str, Any]) -> Benchmark:
    """Read the benchmark described by ``cfg`` (a ``configs/benchmark/*.yaml`` group as a plain mapping).

    Checks that ids are unique, that something was read, and that every audio file exists; missing audio
    raises (naming the count, examples and the layout expected) unless ``skip_missing_audio`` is true (then
    those items are dropped and counted).
    """
    fmt = cfg.get("format")
    if fmt not in READERS:
        raise BenchmarkError(f"benchmark.format={fmt!r} is not one of {sorted(READERS)}")
    name = str(cfg.get("name", fmt))
    check_benchmark_keys(cfg)
    if not cfg.get("root"):
        raise BenchmarkError(f"benchmark.root is not set: pass benchmark.root=/path/to/{name}")
    read = ReadLog()
    items = READERS[fmt](cfg, read)
    read.check_filters()
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        if it.id in seen:
            raise BenchmarkError(
                f"benchmark {name}: id {it.id!r} appears twice (items {seen[it.id]} and {i})"
            )
        seen[it.id] = i
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(read.skipped.items()))
    if not items:
        raise BenchmarkError(
            f"benchmark {name}: no items in {read.source} ({read.rows} rows"
            + (f", skipped: {skipped}" if skipped else "")
            + f"); expected layout: {LAYOUTS.get(str(fmt), 'see docs/evaluation.md')}"
        )
    missing = [it for it in items if not Path(it.audio).is_file()]
    if missing and not cfg.get("skip_missing_audio", False):
        shown = ", ".join(f"item {it.id!r}: {it.audio}" for it in missing[:3])
        first = Path(missing[0].audio)
        hint = ""
        if (first.parent.parent / first.name).is_file():
            # benchmark.audio_dir set to the folder of the clips while the data file's paths name that folder
            # ("./test-mini-audios/<id>.wav"): the paths are read below audio_dir
            hint = (
                f"; a file of that name is at {first.parent.parent / first.name}: the data file's audio paths "
                f"name a {first.parent.name}/ folder, read below benchmark.audio_dir (or the data file's folder), "
                f"so the clips belong in {first.parent}/"
            )
        raise BenchmarkError(
            f"benchmark {name}: {len(missing)} of {len(items)} audio files not found (e.g. {shown}){hint}; "
            f"expected layout: {LAYOUTS.get(str(fmt), 'see docs/evaluation.md')}; fix benchmark.root / "
            "benchmark.audio_dir or set benchmark.skip_missing_audio=true"
        )
    if missing:
        log.warning(
            "benchmark %s: dropping %d of %d items whose audio is missing (e.g. item %r: %s)",
            name,
            len(missing),
            len(items),
            missing[0].id,
            missing[0].audio,
        )
        gone = {it.id for it in missing}
        items = [it for it in items if it.id not in gone]
    return Benchmark(
        name=name,
        items=items,
        source=read.source,
        skipped_missing_audio=len(missing),
        rows=read.rows,
        skipped=dict(read.skipped),
        skipped_by={r: {k: dict(c) for k, c in by.items()} for r, by in read.skipped_by.items()},
        missing_audio=len(missing),
        layout=LAYOUTS.get(str(fmt), ""),
    )
