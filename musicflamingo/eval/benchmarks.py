"""Benchmark readers: each public release format, read from a local path, becomes a list of :class:`EvalItem`.

Nothing is downloaded. ``build_benchmark(cfg)`` dispatches on ``cfg["format"]``; the keys each format reads
are in its ``configs/benchmark/<name>.yaml`` and in docs/evaluation.md (with the field names assumed for each
release). Bad files fail with :class:`BenchmarkError` naming the file, the line and the field.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musicflamingo.chat import format_options
from musicflamingo.eval.parsing import normalize_text

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus", ".aac", ".aiff", ".aif", ".webm")

DEFAULT_MCQ_PROMPT = (
    "{question}\nChoose the correct option from the following options:\n{options}\n"
    "Answer with the option's letter and text."
)
DEFAULT_CLS_MCQ_PROMPT = (
    "{question}\nChoose one of the following options:\n{options}\nAnswer with the option's letter and text."
)
DEFAULT_CLS_OPEN_PROMPT = "{question} Answer with one of: {labels}."


class BenchmarkError(ValueError):
    """A benchmark file or config does not match the expected format (message names file, line, field)."""


@dataclass
class EvalItem:
    """One question to the model and what it is scored against.

    ``audio`` is an absolute path; ``offset``/``duration`` (seconds) select a segment (``duration=None``: to
    the end). ``task`` decides the scoring: ``mcq`` and ``classification`` use ``choices`` + ``answer_index``,
    ``caption`` and ``lyrics`` use the reference text ``answer``. ``groups`` holds the fields results are broken
    down by (a value may be a list: the item counts in each). ``meta`` holds task extras (``aspects``,
    ``language``, ``labels``...).
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


@dataclass
class Benchmark:
    """A read benchmark: its items, where they came from, and how many were dropped for missing audio."""

    name: str
    items: list[EvalItem]
    source: str
    skipped_missing_audio: int = 0


# --------------------------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a ``.json`` (list of objects, or an object of objects), ``.jsonl`` or ``.csv`` file, each with
    its 1-based line number (for JSON lists: the item's position) so errors can point at it."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            # Header is line 1; DictReader.line_num is wrong for quoted multi-line cells, so count rows.
            return [(i + 2, dict(row)) for i, row in enumerate(csv.DictReader(f))]
    text = path.read_text(encoding="utf-8")
    if suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            first = next((ln for ln in text.splitlines() if ln.strip()), "")
            try:  # a ".json" file that is really JSON lines (MMAR exports exist in both layouts)
                looks_jsonl = isinstance(json.loads(first), dict) and text.strip() != first.strip()
            except json.JSONDecodeError:
                looks_jsonl = False
            if not looks_jsonl:
                raise BenchmarkError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        else:
            return _json_rows(path, data)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        rows.append((lineno, rec))
    return rows


def _json_rows(path: Path, data: Any) -> list[tuple[int, dict[str, Any]]]:
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = [{"id": k, **v} if "id" not in v else v for k, v in data.items()]  # {id: record} layout
    elif isinstance(data, dict):  # one record (a one-line JSONL file named .json)
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BenchmarkError(f"{path}: expected a JSON list of objects")
    return [(i + 1, r) for i, r in enumerate(data)]


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
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise BenchmarkError(f"{where}: field '{key}' should be a list of strings, got {value!r:.80}")
        return [str(v) for v in value]
    if kind is str:
        return str(value)
    return value


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else (base / p).resolve())


def _data_file(cfg: Mapping[str, Any]) -> Path:
    """``root`` may be the data file itself or its folder (then ``file`` names the file inside it)."""
    root = Path(os.path.expanduser(str(cfg["root"])))
    if root.is_file():
        return root
    if not root.is_dir():
        raise BenchmarkError(
            f"benchmark.root={root} does not exist (expected the {cfg.get('name')} release folder)"
        )
    if not cfg.get("file"):
        raise BenchmarkError(f"benchmark.root={root} is a folder; set benchmark.file to the file inside it")
    return root / str(cfg["file"])


def _audio_base(cfg: Mapping[str, Any], data_file: Path) -> Path:
    # Relative audio paths are relative to benchmark.audio_dir when set (itself relative to root), else to the
    # data file's folder (MMAU's "./test-mini-audios/x.wav" sits next to mmau-test-mini.json).
    if cfg.get("audio_dir"):
        root = Path(os.path.expanduser(str(cfg["root"])))
        base = root if root.is_dir() else data_file.parent
        return (base / os.path.expanduser(str(cfg["audio_dir"]))).resolve()
    return data_file.parent.resolve()


def _answer_index(answer: str, choices: Sequence[str], where: str) -> int:
    if answer in choices:
        return list(choices).index(answer)
    norm = [normalize_text(c) for c in choices]
    if normalize_text(answer) in norm:
        return norm.index(normalize_text(answer))
    log.warning(
        "%s: answer %r is not one of the choices %r; the letter rule will count it wrong",
        where,
        answer,
        choices,
    )
    return -1


def _mcq_item(rec_id, audio, question, choices, answer, template, where, groups) -> EvalItem:
    if len(choices) < 2:
        raise BenchmarkError(f"{where}: field 'choices' needs at least 2 options, got {choices!r}")
    prompt = template.format(question=question.strip(), options=format_options(choices))
    return EvalItem(
        id=str(rec_id),
        audio=audio,
        prompt=prompt,
        task="mcq",
        answer=answer,
        choices=list(choices),
        answer_index=_answer_index(answer, choices, where),
        groups=groups,
        meta={"question": question},
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


# --------------------------------------------------------------------------------------------------------------
# Readers, one per release format
# --------------------------------------------------------------------------------------------------------------
def _read_mcq_records(
    cfg: Mapping[str, Any], audio_field: str, filter_field: str, filter_key: str, group_by: list[str]
) -> list[EvalItem]:
    """A JSON list / JSONL of ``{question, choices, answer, <audio_field>, ...}`` records (MMAU and MMAR)."""
    path = _data_file(cfg)
    base = _audio_base(cfg, path)
    keep = set(cfg.get(filter_key) or [])
    items = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        if keep and rec.get(filter_field) not in keep:
            continue
        items.append(
            _mcq_item(
                rec.get("id", f"L{line}"),
                _resolve(_field(rec, cfg.get("audio_field", audio_field), where), base),
                _field(rec, "question", where),
                _field(rec, "choices", where, list),
                _field(rec, "answer", where),
                cfg.get("prompt") or DEFAULT_MCQ_PROMPT,
                where,
                _groups(rec, cfg.get("group_by", group_by)),
            )
        )
    return items


def read_mmau(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """MMAU ``mmau-test-mini.json``: list of ``{id, audio_id, question, choices, answer, task, category,
    sub-category, difficulty, ...}``; ``audio_id`` is relative to the JSON's folder. ``tasks`` filters on the
    ``task`` field (sound / music / speech)."""
    return _read_mcq_records(
        cfg, "audio_id", "task", "tasks", ["task", "category", "sub-category", "difficulty"]
    )


def read_mmar(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """MMAR ``MMAR-meta.json`` (a JSON list; JSONL also read): ``{id, audio_path, question, choices, answer,
    modality, category, sub-category, language, ...}``. ``modalities`` filters on ``modality``."""
    return _read_mcq_records(
        cfg, "audio_path", "modality", "modalities", ["modality", "category", "sub-category"]
    )


def _audio_index(folder: Path) -> dict[str, str]:
    """Stem -> path of every audio file under ``folder`` (walked once)."""
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(AUDIO_SUFFIXES):
                index.setdefault(Path(name).stem, str(Path(dirpath, name).resolve()))
    return index


def _muchomusic_audio(rec: Mapping[str, Any], index: dict[str, str], base: Path, where: str) -> str:
    if rec.get("audio_path"):
        return _resolve(str(rec["audio_path"]), base)
    ident = _field(rec, "dataset_identifier", where).removesuffix(".json")
    dataset = str(rec.get("dataset", ""))
    # As in MuChoMusic's utils.py: SDD ids are track ids ("123.json" -> 123, file "123.2min.mp3"); MusicCaps ids
    # are "<ytid>_<n>.json" (the ytid may itself contain "_"), file "[<ytid>]-[<start>-<end>].wav".
    audio_id = ident if dataset == "sdd" else "_".join(ident.split("_")[:-1]) or ident
    for stem in (audio_id, f"{audio_id}.2min"):
        if stem in index:
            return index[stem]
    bracket = f"[{audio_id}]"
    for stem, p in index.items():
        if stem.startswith(bracket):
            return p
    return str(base / f"{audio_id}.wav")  # reported as missing by build_benchmark


def read_muchomusic(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """MuChoMusic ``muchomusic.csv`` (or a JSON/JSONL export with the same columns): ``question``,
    ``correct_answer``, ``distractor_{1,2,3}_answer``, ``dataset`` (musiccaps / sdd), ``dataset_identifier``,
    ``genre``, ``music_knowledge``, ``music_reasoning``. Options are the answer + 3 distractors, shuffled with
    ``random.Random(f"{seed}:{id}")`` so an item's order does not depend on the others."""
    path = _data_file(cfg)
    base = _audio_base(cfg, path)
    index = _audio_index(base) if base.is_dir() else {}
    seed = int(cfg.get("seed", 0))
    items = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        rec_id = str(rec.get("id") or f"L{line}")
        answer = _field(rec, "correct_answer", where)
        options = [answer] + [_field(rec, f"distractor_{k}_answer", where) for k in (1, 2, 3)]
        random.Random(f"{seed}:{rec_id}").shuffle(options)
        items.append(
            _mcq_item(
                rec_id,
                _muchomusic_audio(rec, index, base, where),
                _field(rec, "question", where),
                options,
                answer,
                cfg.get("prompt") or DEFAULT_MCQ_PROMPT,
                where,
                _groups(rec, cfg.get("group_by", ["dataset", "genre", "music_knowledge", "music_reasoning"])),
            )
        )
    return items


def read_classification(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """JSONL of ``{audio, label}`` (field names: ``audio_field`` / ``label_field``); ``labels`` lists the label
    set in order, ``label_names`` optionally maps a label to the text shown to the model, ``aliases`` maps a
    label to extra spellings the parser accepts. ``mode``: ``mcq`` (labels as "(A) ..." options) or ``open``
    (label set listed in the question)."""
    path = _data_file(cfg)
    base = _audio_base(cfg, path)
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
    template = cfg.get("prompt") or (DEFAULT_CLS_MCQ_PROMPT if mode == "mcq" else DEFAULT_CLS_OPEN_PROMPT)
    prompt = template.format(question=question, options=format_options(names), labels=", ".join(names))
    audio_key, label_key = cfg.get("audio_field", "audio"), cfg.get("label_field", "label")
    items = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        label = _field(rec, label_key, where)
        if label not in labels:
            raise BenchmarkError(f"{where}: field '{label_key}' = {label!r} is not in the label set {labels}")
        idx = labels.index(label)
        items.append(
            EvalItem(
                id=str(rec.get("id") or f"L{line}"),
                audio=_resolve(_field(rec, audio_key, where), base),
                prompt=prompt,
                task="classification",
                answer=names[idx],
                choices=names,
                answer_index=idx,
                offset=float(rec.get("offset", 0.0) or 0.0),
                duration=float(rec["duration"]) if rec.get("duration") else None,
                groups={"label": names[idx]},
                meta={"mode": mode, "aliases": aliases},
            )
        )
    return items


def read_musiccaps(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """MusicCaps ``musiccaps-public.csv``: ``ytid, start_s, end_s, aspect_list, caption, is_balanced_subset,
    is_audioset_eval``. Audio is ``audio_dir/audio_template`` (default ``{ytid}.wav``); with ``segment: true``
    the file is the full YouTube audio and ``start_s..end_s`` is cut from it, with ``segment: false`` the file is
    already the 10-s clip. ``subset``: ``all``, ``eval`` (is_audioset_eval) or ``balanced``."""
    path = _data_file(cfg)
    base = _audio_base(cfg, path)
    template = str(cfg.get("audio_template", "{ytid}.wav"))
    segment = bool(cfg.get("segment", True))
    subset = str(cfg.get("subset", "all"))
    flag = {"all": None, "eval": "is_audioset_eval", "balanced": "is_balanced_subset"}
    if subset not in flag:
        raise BenchmarkError(
            f"benchmark {cfg.get('name')}: subset must be one of {list(flag)}, got {subset!r}"
        )
    items = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        if flag[subset] and str(rec.get(flag[subset], "")).strip().lower() not in ("true", "1"):
            continue
        ytid = _field(rec, "ytid", where)
        try:
            start, end = float(_field(rec, "start_s", where)), float(_field(rec, "end_s", where))
        except ValueError:
            raise BenchmarkError(
                f"{where}: start_s/end_s must be numbers, got {rec.get('start_s')!r}, {rec.get('end_s')!r}"
            ) from None
        fmt = {k: rec.get(k) for k in rec} | {"ytid": ytid, "start_s": int(start), "end_s": int(end)}
        items.append(
            EvalItem(
                id=f"{ytid}_{int(start)}",
                audio=_resolve(template.format(**fmt), base),
                prompt=str(cfg.get("prompt")),
                task="caption",
                answer=_field(rec, "caption", where),
                offset=start if segment else 0.0,
                duration=(end - start) if segment else None,
                meta={"aspects": _field(rec, "aspect_list", where, list) if rec.get("aspect_list") else []},
            )
        )
    return items


def read_lyrics(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """JSONL of ``{audio, lyrics, language?}`` (``language`` defaults to ``default_language``)."""
    path = _data_file(cfg)
    base = _audio_base(cfg, path)
    items = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        lang = str(rec.get("language") or cfg.get("default_language", "en"))
        items.append(
            EvalItem(
                id=str(rec.get("id") or f"L{line}"),
                audio=_resolve(_field(rec, cfg.get("audio_field", "audio"), where), base),
                prompt=str(cfg.get("prompt")),
                task="lyrics",
                answer=_field(rec, cfg.get("lyrics_field", "lyrics"), where),
                offset=float(rec.get("offset", 0.0) or 0.0),
                duration=float(rec["duration"]) if rec.get("duration") else None,
                groups={"language": lang},
                meta={"language": lang},
            )
        )
    return items


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


def read_synthetic(cfg: Mapping[str, Any]) -> list[EvalItem]:
    """The project's synthetic corpus (test split JSONL). MCQ records: ``task: "mcq"``, ``question_type``,
    ``choices``, ``answer`` (option text), ``answer_letter``, ``audio`` (relative to the JSONL), ``conversations``.
    The prompt is the user turn without ``<sound>`` (what the model was trained on); if it does not already
    list "(A) ..." options they are appended with ``prompt``. Caption records (``task: "caption"``) are scored
    with BLEU/ROUGE-L against ``caption`` or the assistant turn when ``include_captions`` is true."""
    path = _data_file(cfg)
    base = path.parent.resolve() if not cfg.get("audio_dir") else _audio_base(cfg, path)
    include_captions = bool(cfg.get("include_captions", True))
    items, skipped = [], 0
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        task = rec.get("task")
        audio = _resolve(_field(rec, "audio", where), base)
        user, assistant = _turns(rec, where)
        text = user.replace("<sound>", "").strip()
        seg = {
            "offset": float(rec.get("offset", 0.0) or 0.0),
            "duration": float(rec["duration"]) if rec.get("duration") else None,
        }
        if task == "mcq":
            choices = _field(rec, "choices", where, list)
            answer = _field(rec, "answer", where)
            letter = str(rec.get("answer_letter") or "").strip().strip("()").upper()
            idx = _answer_index(answer, choices, where)
            if letter and (idx < 0 or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[idx] != letter):
                raise BenchmarkError(
                    f"{where}: answer_letter {letter!r} does not point at answer {answer!r} in {choices}"
                )
            question = text or _field(rec, "question", where)
            # The user turn is what the model was trained on; add the options only if it does not list them.
            template = "{question}" if "(A)" in question else (cfg.get("prompt") or DEFAULT_MCQ_PROMPT)
            item = _mcq_item(rec.get("id", f"L{line}"), audio, question, choices, answer, template, where, {})
            item.groups = {"question_type": str(rec.get("question_type") or "n/a")}
            item.offset, item.duration = seg["offset"], seg["duration"]
            items.append(item)
        elif task == "caption" and include_captions:
            reference = str(rec.get("caption") or assistant).strip()
            if not reference:
                raise BenchmarkError(f"{where}: caption record has no 'caption' field and no assistant turn")
            prompt = text or str(cfg.get("caption_prompt"))
            items.append(
                EvalItem(
                    id=str(rec.get("id", f"L{line}")),
                    audio=audio,
                    prompt=prompt,
                    task="caption",
                    answer=reference,
                    **seg,
                )
            )
        else:
            skipped += 1
    if skipped:
        log.info("%s: skipped %d records whose task is not scored here", path, skipped)
    return items


READERS: dict[str, Callable[[Mapping[str, Any]], list[EvalItem]]] = {
    "mmau": read_mmau,
    "mmar": read_mmar,
    "muchomusic": read_muchomusic,
    "classification": read_classification,
    "musiccaps": read_musiccaps,
    "lyrics": read_lyrics,
    "synthetic": read_synthetic,
}


def build_benchmark(cfg: Mapping[str, Any]) -> Benchmark:
    """Read the benchmark described by ``cfg`` (a ``configs/benchmark/*.yaml`` group as a plain mapping).

    Checks that ids are unique and that every audio file exists; missing audio raises unless
    ``skip_missing_audio`` is true (then those items are dropped and counted).
    """
    fmt = cfg.get("format")
    if fmt not in READERS:
        raise BenchmarkError(f"benchmark.format={fmt!r} is not one of {sorted(READERS)}")
    if not cfg.get("root"):
        raise BenchmarkError(
            f"benchmark.root is not set: pass benchmark.root=/path/to/{cfg.get('name', fmt)}"
        )
    items = READERS[fmt](cfg)
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        if it.id in seen:
            raise BenchmarkError(
                f"benchmark {cfg.get('name')}: id {it.id!r} appears twice (items {seen[it.id]} and {i})"
            )
        seen[it.id] = i
    missing = [it for it in items if not Path(it.audio).is_file()]
    if missing and not cfg.get("skip_missing_audio", False):
        shown = ", ".join(it.audio for it in missing[:3])
        raise BenchmarkError(
            f"benchmark {cfg.get('name')}: {len(missing)} of {len(items)} audio files not found (e.g. {shown}); "
            "fix benchmark.audio_dir or set benchmark.skip_missing_audio=true"
        )
    if missing:
        log.warning("benchmark %s: dropping %d items whose audio is missing", cfg.get("name"), len(missing))
        gone = {it.id for it in missing}
        items = [it for it in items if it.id not in gone]
    return Benchmark(str(cfg.get("name", fmt)), items, str(_data_file(cfg)), len(missing))
