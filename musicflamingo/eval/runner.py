"""The evaluation loop: batched, resumable prediction, then scoring and reports.

``predictions.jsonl`` in the output folder is the checkpoint of a run: one ``{"id", "prediction"}`` line per
finished item (with ``"stop"``, the stop string that ended the answer, when one did: see :class:`Prediction`),
appended batch by batch and flushed + fsync'd, so a killed run loses at most the batch in flight. On rerun, items
already in the file are skipped; a torn last line (no trailing newline, or not valid JSON) left by a kill is cut
off before appending. ``run.json`` records what produced the predictions
(benchmark, data file, checkpoint path, dtype and a fingerprint of the checkpoint's files, prompt settings) so
a rerun into the same folder with different settings or re-saved weights fails instead of mixing predictions.
``eval.lock`` (:class:`EvalLock`) refuses a second run into a folder while one writes there; the run that holds
it first removes the temporary files of report writes an earlier run was killed in, then writes ``.hydra/`` and
Hydra's job log ``eval.log`` (a refused run, or ``plan=true``, changes nothing in the folder).

``evaluate(cfg)`` is the entry point that ``eval.py`` wraps; the only model-dependent code is
``build_predict_fn(cfg)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from musicflamingo.chat import think_prompt
from musicflamingo.checkpoint import (
    PROCESSOR_FILES,
    CheckpointError,
    check_checkpoint_dir,
    generation_config,
    is_model_file,
    load_config,
    stop_token_ids,
)
from musicflamingo.engine import AnswerText, check_stop_strings, parse_stop_strings
from musicflamingo.errors import RunStopped
from musicflamingo.eval.benchmarks import AUDIO_HINTS, Benchmark, BenchmarkError, EvalItem, build_benchmark
from musicflamingo.eval.metrics import CER_LANGUAGES, score_items
from musicflamingo.eval.report import write_json, write_report, write_text
from musicflamingo.planner import check_generation
from musicflamingo.reasoning import think_report
from musicflamingo.runfolder import FolderLock, JobLog, remove_interrupted_writes, save_run_config
from musicflamingo.runtime import RuntimeConfigError, resolve_device_dtype, stderr_is_terminal
from musicflamingo.settings import SettingsError, check_eval_settings

log = logging.getLogger(__name__)

PredictFn = Callable[[list[EvalItem]], list[str]]
PREDICTIONS_FILE = "predictions.jsonl"


class Prediction(str):
    """An answer a ``predict_fn`` returns, ``stop`` naming the stop string that ended it (None: a stop id or the token
    limit did), which the answer leaves out. ``predictions.jsonl`` records it beside the text, and think mode's parse
    reads it (:func:`~musicflamingo.reasoning.parse_think`: a think answer cut before its ``</answer>`` stop string
    is complete, not broken). A plain ``str`` answer is one no stop string ended."""

    stop: str | None

    def __new__(cls, text: str, stop: str | None = None) -> Prediction:
        obj = super().__new__(cls, text)
        obj.stop = stop
        return obj


class EvalConfigError(ValueError):
    """The evaluation config cannot run (missing checkpoint, unset path, output folder of another run)."""


class EvalSettingsError(EvalConfigError, SettingsError):
    """A setting of ``configs/eval.yaml`` refused by :func:`musicflamingo.settings.check_eval_settings` (both kinds)."""


class PredictionsFileError(ValueError):
    """``predictions.jsonl`` is damaged somewhere other than its last line."""


class EvalFolderInUseError(EvalConfigError):
    """Another eval.py is writing into the output folder (it holds ``eval.lock``)."""


# --------------------------------------------------------------------------------------------------------------
# The output folder: one run at a time, the temporary files of killed writes removed
# --------------------------------------------------------------------------------------------------------------
LOCK_FILE = "eval.lock"


def EvalLock(folder: str | os.PathLike) -> FolderLock:  # noqa: N802 (the lock's name here)
    """``<output_dir>/eval.lock``: two runs into one folder (a job array sharing ``tag``) would both append to
    ``predictions.jsonl`` and overwrite each other's ``run.json`` and reports: the second is refused, naming the
    first; the rerun after a kill takes the lock over (`runfolder.FolderLock`)."""
    advice = "pass tag=<new name> or output_dir=<another folder>"
    return FolderLock(folder, LOCK_FILE, "eval.py", advice, EvalFolderInUseError)


class EvalInterrupted(RunStopped):
    """SIGTERM (a queue's preemption or time limit) stopped the run; ``exit_code`` is 128 + the signal (143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


@contextlib.contextmanager
def stop_on_sigterm(predictions: Path) -> Iterator[None]:
    """SIGTERM raises :class:`EvalInterrupted` where the run is, so it ends as a Ctrl-C does: the report file being
    written loses only its temporary file, the lock is given back and eval.py prints one line saying the rerun
    resumes (instead of dying silently). A second SIGTERM kills at once; the earlier handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise EvalInterrupted(
            f"stopped by {signal.Signals(signum).name}; the predictions made so far are kept in {predictions}: "
            "the same command resumes from there",
            signum,
        )

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# --------------------------------------------------------------------------------------------------------------
# predictions.jsonl
# --------------------------------------------------------------------------------------------------------------
def load_predictions(
    path: str | Path, *, repair: bool = True, stops: dict[str, str] | None = None
) -> dict[str, str]:
    """Read ``{id: prediction}`` from a predictions file (missing file: empty). ``stops``: a dict that gets
    ``{id: stop string}`` for the lines that name the stop string that ended their answer (lines without one, as
    files written before it was recorded: none).

    A last line without its newline, or a last line that is not valid JSON, is a write interrupted by a kill:
    with ``repair=True`` the file is truncated to the end of the last good line. Damage elsewhere raises
    :class:`PredictionsFileError` naming the line. An id seen twice keeps its first prediction.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    preds, keep = _parse_predictions(path, data, stops)
    if keep < len(data):
        if not repair:
            raise PredictionsFileError(f"{path}: last line is incomplete ({len(data) - keep} bytes)")
        log.warning(
            "%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
            path,
            len(data) - keep,
        )
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return preds


def predicted_ids(path: str | Path) -> set[str]:
    """The ids a predictions file holds answers for (missing file: none), read without writing: a torn last line
    is passed over, not cut off (only the run that holds the folder's lock repairs the file, in
    :func:`load_predictions`); damage elsewhere raises :class:`PredictionsFileError` as there."""
    path = Path(path)
    return set(_parse_predictions(path, path.read_bytes(), None)[0]) if path.exists() else set()


def _parse_predictions(path: Path, data: bytes, stops: dict[str, str] | None) -> tuple[dict[str, str], int]:
    """``({id: prediction}, the length of data up to the end of its last good line)`` (see :func:`load_predictions`)."""
    keep = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
    lines = data[:keep].split(b"\n")[:-1]
    preds: dict[str, str] = {}
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            pid, pred = str(rec["id"]), rec["prediction"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            if lineno == len(lines):  # torn last line that happened to contain a newline byte
                keep -= len(raw) + 1
                break
            raise PredictionsFileError(
                f"{path}:{lineno}: not a {{'id', 'prediction'}} JSON line; fix or delete the file to start over"
            ) from None
        if pid not in preds and stops is not None and isinstance(rec.get("stop"), str) and rec["stop"]:
            stops[pid] = rec["stop"]
        preds.setdefault(pid, "" if pred is None else str(pred))
    return preds, keep


def limit_items(
    items: Sequence[EvalItem], limit: int, answered: set[str] | frozenset[str] = frozenset()
) -> tuple[list[EvalItem], int]:
    """The items ``limit=N`` asks: those already ``answered`` (ids in the folder's predictions.jsonl) first, up to
    ``limit``, then the first unanswered ones, all in the items' order. Returns ``(items, kept)``: ``kept`` counts
    the answered items taken from past the first ``limit`` in place of unanswered ones (0: the first ``limit``
    items, what a fresh folder gets).

    A resumed limited run so asks, and reports, the items it began with also when the benchmark lists them in
    another order now (Jam-ALT's metadata.jsonl read in metadata.csv's order; a data file rewritten), where taking
    the first ``limit`` would ask other items anew and report those instead. A run killed partway keeps its
    answers and takes the rest from the current order."""
    done = [it.id for it in items if it.id in answered]
    todo = [it.id for it in items if it.id not in answered]
    kept = set(done[:limit]) | set(todo[: max(0, limit - len(done))])
    return [it for it in items if it.id in kept], sum(it.id in kept for it in items[limit:])


def item_seconds(item: EvalItem) -> float:
    """The audio length an item feeds the model, in seconds: its segment's ``duration``, else the file's length
    after ``offset`` from the header (:func:`~musicflamingo.audio.io.audio_duration`); ``inf`` when unknown."""
    from musicflamingo.audio.io import audio_duration

    seconds = audio_duration(item.audio, offset=item.offset, duration=item.duration)
    return math.inf if seconds is None else seconds


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLines:
    """Log lines for a run whose stderr is a file or a pipe (a queue's job log), where the bar is off: after the
    first batch, then every ``1/lines`` of the items to predict and at the end: done / to do, the items reused
    from the predictions file, items/s and ETA. The rate counts from the end of the first batch, which includes
    loading the model."""

    def __init__(self, desc: str, total: int, reused: int, lines: int = 20) -> None:
        self.desc, self.total, self.reused = desc, total, reused
        self.every = max(1, -(-total // lines))
        self.done = 0
        self._t0 = time.perf_counter()
        self._first: tuple[int, float] | None = None  # (items, time) at the end of the first batch
        self._next = 0

    def update(self, n: int) -> None:
        self.done += n
        if self.done < self._next and self.done < self.total:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = (self.done, now)
        self._next = (self.done // self.every + 1) * self.every
        items, since = self.done - self._first[0], now - self._first[1]
        rate = items / since if items and since > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        log.info(
            "%s: %d/%d items%s | %s items/s | elapsed %s | ETA %s",
            self.desc,
            self.done,
            self.total,
            f" ({self.reused} more reused from {PREDICTIONS_FILE})" if self.reused else "",
            "n/a" if rate is None else f"{rate:.2f}",
            _clock(now - self._t0),
            "n/a" if eta is None and self.done < self.total else _clock(eta or 0.0),
        )


class UnreadableAudioError(ValueError):
    """An item's audio could not be read (undecodable, too short...) and the run was not asked to skip it."""


def predict_items(
    items: Sequence[EvalItem],
    predict_fn: PredictFn,
    path: str | Path,
    batch_size: int = 8,
    *,
    progress: bool = True,
    desc: str = "eval",
    length: Callable[[EvalItem], float] | None = None,
    unreadable: dict[str, str] | None = None,
    stops: dict[str, str] | None = None,
) -> dict[str, str]:
    """Predict every item not yet in ``path`` (batches of ``batch_size``), appending as it goes; returns all
    predictions of the file, old and new. ``stops``: a dict that gets ``{id: stop string}`` for the answers a stop
    string ended (a :class:`Prediction`'s ``stop``, recorded in the file as ``"stop"``), old and new.

    With ``length`` (e.g. :func:`item_seconds`) the items are batched longest first instead of in file order
    (stable among equal lengths): a batch is padded to its longest prompt, and a 5 min song among 30 s clips
    makes every row of its batch ~10 windows of audio tokens long. Longest first also puts the largest batch,
    the one that may run out of memory, at the start. Predictions are keyed by id, so only their order in the
    file changes.

    A batch that fails on an item's audio (``predict_fn`` raises ``AudioError``: an undecodable file, whose
    unknown length sorts it first) is redone one item at a time to find it. With ``unreadable`` (a dict) that
    item is left out and recorded as ``{id: reason}``; without, :class:`UnreadableAudioError` names it. Either
    way every answer obtained before stays in the file.
    """
    from tqdm import tqdm

    from musicflamingo.audio.io import AudioError

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preds = load_predictions(path, stops=stops)
    todo = [it for it in items if it.id not in preds]
    if len(todo) < len(items):
        log.info("resuming: %d of %d items already predicted in %s", len(items) - len(todo), len(items), path)
    if length is not None and batch_size > 1:
        lengths = {it.id: length(it) for it in todo}
        todo.sort(key=lambda it: -lengths[it.id])
    terminal = stderr_is_terminal()
    # in a file or a pipe (a queue's job log) the bar is off and progress goes to log lines
    lines = (
        ProgressLines(desc, len(todo), len(items) - len(todo)) if progress and not terminal and todo else None
    )
    with (
        # unbuffered: a failed write (a full disk) leaves nothing pending that closing the file would retry
        path.open("ab", buffering=0) as f,
        tqdm(total=len(todo), desc=desc, unit="item", disable=not progress or not terminal) as bar,
    ):

        def predict(batch: list[EvalItem]) -> None:
            out = predict_fn(list(batch))
            if not isinstance(out, (list, tuple)) or len(out) != len(batch):
                got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
                raise ValueError(f"predict_fn returned {got} answers for a batch of {len(batch)} items")
            answers = ["" if p is None else str(p) for p in out]
            ended = [getattr(p, "stop", None) for p in out]  # a Prediction's stop string
            rows = [
                {"id": it.id, "prediction": p, **({"stop": e} if isinstance(e, str) and e else {})}
                for it, p, e in zip(batch, answers, ended)
            ]
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            try:  # one write per batch, then fsync: a kill tears at most this batch's tail
                data = memoryview(text.encode("utf-8"))
                while data:  # a raw write may be short
                    data = data[f.write(data) :]
                os.fsync(f.fileno())
            except OSError as e:  # a full disk: name the file (the rerun drops the torn tail, keeps the rest)
                raise OSError(
                    e.errno,
                    f"cannot add the predictions of {len(batch)} item(s): {e.strerror or e}; the predictions "
                    "before them are kept and a rerun goes on from there",
                    str(path),
                ) from e
            preds.update({it.id: p for it, p in zip(batch, answers)})
            if stops is not None:
                stops.update({r["id"]: r["stop"] for r in rows if "stop" in r})
            bar.update(len(batch))
            if lines is not None:
                lines.update(len(batch))

        def skip(it: EvalItem, error: Exception) -> None:
            if unreadable is None:
                raise UnreadableAudioError(f"item {it.id}: {error}") from None
            log.warning("skipping item %s: its audio cannot be read (%s)", it.id, error)
            unreadable[it.id] = str(error)
            bar.update(1)
            if lines is not None:
                lines.update(1)

        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            try:
                predict(batch)
            except AudioError as e:
                if len(batch) == 1:
                    skip(batch[0], e)
                    continue
                for it in batch:  # some item's audio failed the batch: one at a time to find which
                    try:
                        predict([it])
                    except AudioError as e1:
                        skip(it, e1)
    return preds


def run_benchmark(
    items: Sequence[EvalItem],
    predict_fn: PredictFn,
    out_dir: str | Path,
    batch_size: int = 8,
    *,
    name: str = "benchmark",
    source: str = "",
    progress: bool = True,
    cer_languages: Sequence[str] = CER_LANGUAGES,
    extra: Mapping[str, Any] | None = None,
    length: Callable[[EvalItem], float] | None = None,
    official_format: str | None = None,
    think: bool = False,
    skip_unreadable: bool = False,
) -> dict[str, Any]:
    """Predict (resumably), score and report. Writes ``predictions.jsonl``, ``per_item.jsonl`` (parsed answers,
    correctness), ``results.json``, ``results.md`` and PNG plots into ``out_dir``; returns the results dict
    (``tasks`` holds one summary per task present). ``length``: batch by it (see :func:`predict_items`).
    ``official_format``: also write the prediction file that benchmark's own scorer reads
    (:func:`~musicflamingo.eval.report.write_official_predictions`). ``think``: the predictions are think-mode
    texts; their ``<answer>`` text is scored (:func:`~musicflamingo.reasoning.think_report`), per-item rows get
    the think status, thinking and lengths, and ``results["think"]`` counts the tags' statuses.
    ``skip_unreadable``: an item whose audio cannot be read is left out and listed in
    ``results["skipped_unreadable_audio"]`` instead of stopping the run (:func:`predict_items`).

    ``num_items`` counts this run's items, ``num_predicted`` those with a prediction, ``num_scored`` those
    scored (the tasks' ``n``) and ``num_withheld`` those predicted but not scorable (answers withheld)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unreadable: dict[str, str] | None = {} if skip_unreadable else None
    stops: dict[str, str] = {}  # id -> the stop string that ended its answer (think: cut before </answer>)
    preds = predict_items(
        items,
        predict_fn,
        out_dir / PREDICTIONS_FILE,
        batch_size,
        progress=progress,
        desc=name,
        length=length,
        unreadable=unreadable,
        stops=stops,
    )
    # scoring and the report take seconds at 10k items (captions): a line, so a job log does not look stalled
    log.info(
        "%s: scoring %d predicted items and writing the report", name, sum(it.id in preds for it in items)
    )
    if think:  # this run's items only: the file may hold more (a rerun with `limit`, audio skipped since)
        preds, think_rows, think_summary = think_report(
            {it.id: preds[it.id] for it in items if it.id in preds}, stops=stops
        )
    tasks, rows = score_items(items, preds, cer_languages=cer_languages)
    if think:
        rows = [{**r, **think_rows.get(r.get("id"), {})} for r in rows]
    write_text(out_dir / "per_item.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    results: dict[str, Any] = {
        "benchmark": name,
        "source": source,
        "num_items": len(items),
        "num_predicted": sum(it.id in preds for it in items),
        "num_scored": sum(s.get("n", 0) for s in tasks.values()),
        "num_withheld": sum(s.get("withheld", 0) for s in tasks.values()),
        **dict(extra or {}),
        "skipped_unreadable_audio": [
            {"id": it.id, "audio": it.audio, "reason": unreadable[it.id]}
            for it in items
            if unreadable and it.id in unreadable
        ],
        "tasks": tasks,
    }
    if think:
        results["think"] = think_summary
    official = (official_format, items, preds) if official_format else None
    results["files"] = write_report(results, out_dir, official=official)
    return results


# --------------------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------------------
def check_checkpoint(ckpt: Any) -> Path:
    """The checkpoint folder (:func:`musicflamingo.checkpoint.check_checkpoint_dir`, the check infer.py makes),
    or :class:`EvalConfigError` if ``ckpt`` is unset, not a folder, or lacks its config or tokenizer."""
    try:
        return check_checkpoint_dir(ckpt)
    except CheckpointError as e:
        raise EvalConfigError(str(e)) from None


def resolve_eval_dtype(
    cfg: Mapping[str, Any], ckpt: Path, config: Any = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype ``cfg`` loads ``ckpt`` with (:func:`musicflamingo.runtime.resolve_device_dtype`)."""
    config = load_config(ckpt) if config is None else config
    quantize = cfg.get("quantize") or config.quantization  # int8 linears (model/quantize.py)
    # auto: bf16 on CUDA, fp32 on CPU unless its weights do not fit; weights larger than memory are refused
    try:
        return resolve_device_dtype(
            cfg.get("device", "auto"), cfg.get("dtype", "auto"), config.num_parameters(), quantize
        )
    except RuntimeConfigError as e:
        raise EvalConfigError(str(e)) from None


def checkpoint_fingerprint(ckpt: Path) -> str:
    """A cheap fingerprint of what a checkpoint folder answers with: name, size and mtime_ns of its model
    files (config, weights, shards) and processor files. A re-save in place (train.py re-exporting
    <run>/export) changes it without reading gigabytes of weights; so does a copy that drops file times."""
    parts = []
    for f in sorted(ckpt.iterdir()):
        if (is_model_file(f.name) or f.name in PROCESSOR_FILES) and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def checkpoint_stop_strings(ckpt: Path) -> tuple[str, ...]:
    """The stop strings of the checkpoint's generation_config.json (none without them), as infer.py reads them;
    a bad value is an :class:`EvalConfigError` naming the file."""
    try:
        return check_stop_strings(generation_config(ckpt).get("stop_strings"), "stop_strings")
    except (CheckpointError, ValueError) as e:
        where = "" if isinstance(e, CheckpointError) else f"{ckpt / 'generation_config.json'}: "
        raise EvalConfigError(f"{where}{e}") from None


def eval_stop_strings(cfg: Mapping[str, Any], ckpt: Path | None) -> tuple[str, ...]:
    """The stop strings that cut eval.py's answers: ``stop`` as infer.py reads it (a text or a list of them, ``\\n``
    typed is a newline; ``[]``: none; :func:`musicflamingo.engine.parse_stop_strings`), null or missing: the
    checkpoint's generation_config.json ``stop_strings`` (:func:`checkpoint_stop_strings`; none without a
    checkpoint). A bad ``stop`` is an :class:`EvalConfigError` naming it."""
    if cfg.get("stop") is None:
        return checkpoint_stop_strings(ckpt) if ckpt is not None else ()
    try:
        return parse_stop_strings(cfg["stop"], "stop", escapes=True)
    except ValueError as e:
        raise EvalConfigError(str(e)) from None


def answer_text(tokenizer: Any, ids: Sequence[int], stops: Sequence[str], stop_ids: Sequence[int]) -> str:
    """A generated row's answer as infer.py gives it: its tokens up to a stop id (left out) or the token that
    completes one of ``stops``, decoded and cut before that stop string (:class:`musicflamingo.engine.AnswerText`,
    the engine's own matcher, fed the row's tokens as the engine fed them; the padding after is never read)."""
    return AnswerText.of_tokens(tokenizer, ids, stops, stop_ids).text


def build_predict_fn(cfg: Mapping[str, Any]) -> PredictFn:
    """Load ``cfg["ckpt"]`` with the project API and return a batched greedy ``predict_fn``.

    Each item becomes one user turn ``[audio, text]``; a segment (``offset``/``duration``) is cut with
    ``musicflamingo.audio.io.load_audio`` and passed as an array, a whole file is passed by path. Decoding is
    greedy with ``max_new_tokens``; only the new tokens are decoded, each answer up to its stop id or cut before
    the first of its stop strings (``stop``, null: generation_config.json's ``stop_strings``;
    :func:`eval_stop_strings`, :func:`answer_text`), as infer.py answers.
    """
    ckpt = check_checkpoint(cfg.get("ckpt"))
    from musicflamingo import MusicFlamingo, MusicFlamingoProcessor

    config = load_config(ckpt)
    quantize = cfg.get("quantize") or config.quantization
    device, dtype = resolve_eval_dtype(cfg, ckpt, config)
    stops = stop_token_ids(ckpt, config)  # generation_config.json's eos ids + the config's, as infer.py
    # and stop=, or null: the checkpoint's stop strings (matched on the text: generate needs the tokenizer)
    stop_strings = eval_stop_strings(cfg, ckpt)
    model = MusicFlamingo.from_pretrained(str(ckpt), dtype=dtype, device=device, quantize=quantize)
    model.eval()
    processor = MusicFlamingoProcessor.from_pretrained(str(ckpt))
    max_new_tokens = 256 if cfg.get("max_new_tokens") is None else int(cfg["max_new_tokens"])
    if max_new_tokens < 1:
        raise EvalConfigError(f"max_new_tokens={max_new_tokens}: expected an integer >= 1")
    compile_steps = bool(cfg.get("compile") or False)  # torch.compile the decode step (see generation.py)

    def audio_part(it: EvalItem) -> dict[str, Any]:
        if it.offset or it.duration is not None:
            from musicflamingo.audio.io import load_audio

            return {
                "type": "audio",
                "audio": load_audio(
                    it.audio, offset=it.offset, duration=it.duration, max_seconds=processor.kept_seconds
                ),
            }
        return {"type": "audio", "path": it.audio}

    # None: the processor's default system turn; "" is an empty system turn (as infer.py and the reference)
    system = (
        [{"role": "system", "content": str(cfg["system_prompt"])}]
        if cfg.get("system_prompt") is not None
        else []
    )

    @torch.inference_mode()
    def predict(batch: list[EvalItem]) -> list[str]:
        conversations = [
            [*system, {"role": "user", "content": [audio_part(it), {"type": "text", "text": it.prompt}]}]
            for it in batch
        ]
        inputs = processor.apply_chat_template(
            conversations, tokenize=True, add_generation_prompt=True, return_dict=True
        )
        feeds = {}
        for key in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
            value = inputs.get(key)
            if value is not None:
                feeds[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        extra = {"compile": True} if compile_steps else {}
        if stop_strings:  # matched on the decoded text: generate needs the tokenizer (it ran past them)
            extra.update(stop_strings=stop_strings, tokenizer=processor.tokenizer)
        out = model.generate(  # (B, S + new)
            **feeds, max_new_tokens=max_new_tokens, do_sample=False, stop_token_ids=stops, **extra
        )
        new = out[:, feeds["input_ids"].shape[1] :].cpu()
        if not hasattr(processor, "tokenizer"):  # a processor that only decodes (a stand-in; no stop strings)
            return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
        # each answer up to its stop id or cut before its stop string, as the engine cut infer.py's, naming the
        # stop string (think tags that are special tokens read as text: `reasoning.TagsKept`)
        cut = [AnswerText.of_tokens(processor.tokenizer, row, stop_strings, stops) for row in new.tolist()]
        return [Prediction(a.text.strip(), a.stop) for a in cut]

    return predict


class LazyPredictFn:
    """Builds the real ``predict_fn`` on first call, so a finished run re-reports without loading the model."""

    def __init__(self, factory: Callable[[], PredictFn]):
        self._factory, self._fn = factory, None

    def __call__(self, batch: list[EvalItem]) -> list[str]:
        if self._fn is None:
            self._fn = self._factory()
        return self._fn(batch)


# --------------------------------------------------------------------------------------------------------------
# evaluate(cfg)
# --------------------------------------------------------------------------------------------------------------
def _plain(cfg: Any) -> dict[str, Any]:
    """A DictConfig (or mapping) as a plain resolved dict; an unset ``???`` value becomes EvalConfigError."""
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(cfg, DictConfig):
            try:
                return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
            except MissingMandatoryValue as e:
                key = getattr(e, "full_key", "") or "a value"
                raise EvalConfigError(f"{key} is not set: pass {key}=... on the command line") from None
    except ImportError:  # pragma: no cover - omegaconf is a runtime requirement
        pass
    return dict(cfg)


# where the items and their audio live, not what they are: a moved benchmark or audio cache resumes
# below this, think mode's reasoning is mostly cut (the docs' think runs use 1024)
THINK_MIN_NEW_TOKENS = 512
_IDENTITY_IGNORED = ("root", "audio_dir", "skip_missing_audio", "audio_cache")
# benchmark settings read only when scoring: a rerun that rescores the same predictions with other values
# (Japanese lyrics with CER, another breakdown) resumes; a run.json that recorded them is compared without them
_SCORING_ONLY = ("cer_languages", "group_by")
# identity keys added later: a run.json written before them (no such key) still resumes, as it did
_IDENTITY_ADDED = ("dtype", "weights")
# a run's data file -> the newer file of the same items a later read prefers (Jam-ALT v1.0 -> v1.2)
_JAM_ALT_NEWER = {"metadata.csv": "metadata.jsonl"}
# benchmark settings that only pick which rows are items (an item's id, audio and prompt do not depend on them): a
# rerun with other values resumes, reusing the predictions of the items it shares with the runs before and
# predicting the others; its report counts its own items only (`run_benchmark`). run.json keeps the earlier runs'
# values (`earlier_filters`), each checked the same way.
FILTER_KEYS = ("tasks", "categories", "modalities", "languages", "subset")
# what an item's prediction is made from (`build_predict_fn`): another value for a shared id, another answer
_PREDICTION_INPUTS = ("audio", "prompt", "offset", "duration")


def _check_run_identity(
    out_dir: Path,
    identity: dict[str, Any],
    from_setting: bool = False,
    refilter: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> None:
    """Refuse to resume ``out_dir`` if its predictions came from another benchmark, checkpoint, prompt or stop
    strings (``from_setting``: this run's stop strings are ``stop``'s, not the checkpoint's). Other row filters
    (:data:`FILTER_KEYS`) resume when ``refilter`` is given: it is called with each earlier run's filter values and
    returns why the items these runs share would not be predicted alike (None: they would), which refuses."""
    path, predictions = out_dir / "run.json", out_dir / PREDICTIONS_FILE
    # an empty file holds nothing to mix with: a run that failed before its first prediction (a wrong ckpt that
    # would not load) must not lock the folder against the corrected rerun
    if path.exists() and predictions.exists() and predictions.stat().st_size > 0:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            old = e
        if not isinstance(old, dict):
            # damaged (a disk that filled up): the predictions' settings are unknown
            why = str(old) if isinstance(old, Exception) else f"a JSON {type(old).__name__}"
            raise EvalConfigError(
                f"{path}: not the JSON object of settings eval.py writes ({why}); it records what produced "
                f"{predictions.name} beside it: delete it to resume without that check, or pass tag=<new name> "
                "or output_dir=<new folder> to start afresh"
            )
        if isinstance(old.get("benchmark_cfg"), dict):
            old["benchmark_cfg"] = {k: v for k, v in old["benchmark_cfg"].items() if k not in _SCORING_ONLY}
        earlier = old.pop("earlier_filters", None)
        diff = sorted(
            k
            for k in set(old) | set(identity)
            if old.get(k) != identity.get(k) and not (k in _IDENTITY_ADDED and k not in old)
        )
        if "data_file" in diff and _JAM_ALT_NEWER.get(str(old.get("data_file"))) == identity.get("data_file"):
            if old.get("benchmark") == identity.get("benchmark"):
                # Jam-ALT's v1.2 files added beside its v1.0 table: the same songs by the same ids and prompts
                diff.remove("data_file")
                log.info(
                    "%s: resuming a run begun on %s with %s (Jam-ALT's newer table of the same songs); its "
                    "predictions are reused, the scores use the newer text",
                    out_dir,
                    old["data_file"],
                    identity["data_file"],
                )
        refused = None
        if diff == ["benchmark_cfg"] and refilter is not None and isinstance(old["benchmark_cfg"], dict):
            was, now = old["benchmark_cfg"], identity["benchmark_cfg"]
            if all(k in FILTER_KEYS for k in set(was) | set(now) if was.get(k) != now.get(k)):
                # every earlier run's filters (a list of dicts in run.json), then the last run's
                runs = [f for f in earlier if isinstance(f, dict)] if isinstance(earlier, list) else []
                runs.append({k: was[k] for k in FILTER_KEYS if k in was})
                for filters in runs:
                    refused = refilter(filters)
                    if refused is not None:
                        break
                else:
                    identity["earlier_filters"] = [f for i, f in enumerate(runs) if f not in runs[:i]]
                    log.info(
                        "%s: resuming with other row filters (%s); the predictions of the items these runs share "
                        "are reused",
                        out_dir,
                        ", ".join(
                            f"benchmark.{k}: {was.get(k)!r} -> {now.get(k)!r}"
                            for k in FILTER_KEYS
                            if was.get(k) != now.get(k)
                        ),
                    )
                    diff = []
        elif earlier is not None:  # the same filters again (or a refused change): the history stays
            identity["earlier_filters"] = earlier
        if "benchmark_cfg" in diff and isinstance(old.get("benchmark_cfg"), dict):
            was, now = old["benchmark_cfg"], identity["benchmark_cfg"]
            diff.remove("benchmark_cfg")
            diff += [
                f"benchmark_cfg.{k} ({was.get(k)!r} in run.json, {now.get(k)!r} now)"
                for k in sorted(set(was) | set(now))
                if was.get(k) != now.get(k)
            ]
            diff.sort()
        if diff:
            why = ""
            if "stop_strings" in diff and "stop_strings" not in old and not from_setting:
                why = (
                    f" (its predictions were made without the checkpoint's stop_strings "
                    f"{identity['stop_strings']!r}, which an earlier eval.py ignored: they run past them)"
                )
            elif "stop_strings" in diff:  # the setting that changes them, by its name
                now = "from stop=" if from_setting else "from generation_config.json: stop=null"
                why = (
                    f" (its predictions were cut at the stop strings {old.get('stop_strings', [])!r}, this run's "
                    f"are {identity.get('stop_strings', [])!r} ({now}): pass the stop= it ran with to resume it; "
                    "stop=null is generation_config.json's stop_strings, stop=[] none)"
                )
            if refused is not None:
                why = f" ({refused})"
            raise EvalConfigError(
                f"{out_dir} holds predictions of another run (differs in: {', '.join(diff)}){why}; "
                "pass tag=<new name> or output_dir=<new folder>, or delete the folder to redo it"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, identity)


def _other_filters_conflict(
    bench_cfg: Mapping[str, Any], filters: Mapping[str, Any], items: Sequence[EvalItem]
) -> str | None:
    """Why ``items`` (this run's benchmark, read with ``bench_cfg``) cannot reuse predictions made under the row
    filters ``filters`` (an earlier run's :data:`FILTER_KEYS` values): the benchmark read with those filters gives
    an id it shares with ``items`` another audio, segment or prompt (or can no longer be read). None: it can."""
    cfg = {k: v for k, v in bench_cfg.items() if k not in FILTER_KEYS}
    cfg.update(filters)
    cfg["skip_missing_audio"] = True  # only the items both runs have are compared
    try:
        before = {it.id: it for it in build_benchmark(cfg).items}
    except BenchmarkError as e:
        return f"the benchmark cannot be read with the earlier run's filters {dict(filters)!r}: {e}"
    for it in items:
        was = before.get(it.id)
        differs = [k for k in _PREDICTION_INPUTS if was is not None and getattr(was, k) != getattr(it, k)]
        if differs:
            return (
                f"item {it.id} has another {', '.join(differs)} under the earlier run's filters {dict(filters)!r}: "
                "its prediction would differ"
            )
    return None


def evaluate(cfg: Any, predict_fn: PredictFn | None = None) -> dict[str, Any]:
    """Run one benchmark described by a composed ``configs/eval.yaml``; returns the results dict.

    ``predict_fn`` replaces the checkpoint (tests pass a fake one); without it ``cfg.ckpt`` must be a
    checkpoint folder, checked before anything is read. The model is loaded only if some item still needs a
    prediction, and only if the memory plan fits the device (``memory_check``); ``plan=true`` prints the plan and
    returns ``{"plan": MemoryPlan}``. Under Hydra (eval.py) the job log's lines wait in memory until the output
    folder's lock is held (:class:`~musicflamingo.runfolder.JobLog`); a run that ends before (a bad setting,
    ``plan=true``) leaves no empty ``eval.log``.
    """
    with JobLog(lock=EvalLock) as job_log:
        return _evaluate(cfg, predict_fn, job_log)


def _evaluate(cfg: Any, predict_fn: PredictFn | None, job_log: JobLog) -> dict[str, Any]:
    c = _plain(cfg)
    try:  # types and ranges (stop= too), before the checkpoint or the benchmark is read
        check_eval_settings(c)
    except SettingsError as e:
        raise EvalSettingsError(str(e)) from None
    bench_cfg = dict(c.get("benchmark") or {})
    if not bench_cfg:
        raise EvalConfigError("no benchmark selected: pass benchmark=<name> (see configs/benchmark/)")
    ckpt = None if predict_fn is not None else check_checkpoint(c.get("ckpt"))
    bench: Benchmark = build_benchmark(bench_cfg)
    # What was found and what was left out, before the first prediction (a partial release is visible here).
    log.log(logging.WARNING if bench.missing_audio else logging.INFO, "%s: %s", bench.name, bench.describe())
    items = bench.items
    think = c.get("think", False)
    if not isinstance(think, bool):
        raise EvalConfigError(f"think={think!r}: expected true or false")
    if think:  # the think suffix after each prompt (chat.think_prompt); predictions keep the whole text
        items = [dataclasses.replace(it, prompt=think_prompt(it.prompt)) for it in items]
    out_dir = Path(os.path.expanduser(str(c.get("output_dir") or f"outputs/eval/{bench.name}/default")))
    limit, limit_kept = c.get("limit"), 0
    if limit is not None:
        if int(limit) < 0:
            raise EvalConfigError(f"limit must be >= 0 or null, got {limit}")
        # the items answered already first (read, not repaired: the lock is not held yet), so that a resume asks
        # the items its run began with, before the memory plan sizes them
        items, limit_kept = limit_items(items, int(limit), predicted_ids(out_dir / PREDICTIONS_FILE))
        if limit_kept:
            log.info(
                "limit=%d: %d item(s) already answered in %s are taken in place of as many of the first %d "
                "(the benchmark lists its items in another order than when they were asked, or an earlier run "
                "had another limit or filters); their predictions are reused. A new tag=<name> asks the first %d",
                int(limit),
                limit_kept,
                out_dir / PREDICTIONS_FILE,
                int(limit),
                int(limit),
            )
    max_new_tokens = c.get("max_new_tokens")
    if max_new_tokens is None:  # null: the benchmark's (0 is refused above, never a silent default)
        max_new_tokens = 256 if bench_cfg.get("max_new_tokens") is None else bench_cfg["max_new_tokens"]
    if think and int(max_new_tokens) < THINK_MIN_NEW_TOKENS:
        # the benchmarks' limits are sized for short answers: most think answers would be cut before </answer>
        log.warning(
            "think=true with max_new_tokens=%d: a think answer longer than that is cut before its </answer> and "
            "scored as broken (wrong); think runs want max_new_tokens=1024 or more (docs/reasoning.md)",
            int(max_new_tokens),
        )
    identity = {
        "benchmark": bench.name,
        "data_file": Path(bench.source).name,
        "ckpt": str(ckpt.resolve()) if ckpt else c.get("ckpt"),
        "max_new_tokens": int(max_new_tokens),
        "benchmark_cfg": {
            k: v for k, v in sorted(bench_cfg.items()) if k not in _IDENTITY_IGNORED + _SCORING_ONLY
        },
    }
    if think:  # only when set: folders of earlier runs (no key) still resume
        identity["think"] = True
    if c.get("system_prompt") is not None:  # likewise: another system turn, other answers
        identity["system_prompt"] = str(c["system_prompt"])
    if c.get(
        "quantize"
    ):  # int8 / int4 linears answer differently: never mixed with full-precision predictions
        identity["quantize"] = str(c["quantize"])
    # stop= (null: generation_config.json's stop strings) cuts the answers; only when there are some, so a folder
    # of a checkpoint without them resumes as before. A run.json without the key beside a checkpoint with them was
    # written by an eval.py that ignored them (its answers ran past them): refused, not mixed with cut answers
    # (_check_run_identity), unless stop=[] asks for answers that run past them
    stop_strings = eval_stop_strings(c, ckpt)
    if stop_strings:
        identity["stop_strings"] = list(stop_strings)
    if predict_fn is None:  # the memory plan (config.json, the items' audio headers): refused if it won't fit
        plan = check_generation(
            c,
            ckpt,
            [item_seconds(it) for it in items],
            prompt_chars=max((len(it.prompt) for it in items), default=0),
            slots=8 if c.get("batch_size") is None else int(c["batch_size"]),
            new_tokens=int(max_new_tokens),
            embed_batch=True,  # model.generate embeds the whole batch before its prefills
        )
        if c.get("plan"):
            print(plan.table())
            return {"plan": plan}
    # after the plan: resolving the dtype checks the device, which plan=true may not have (device=cuda on a laptop)
    if ckpt is not None:  # same path, other weights (re-exported) or another dtype: other answers
        identity["dtype"] = str(resolve_eval_dtype(c, ckpt)[1]).replace("torch.", "")
        identity["weights"] = checkpoint_fingerprint(ckpt)
    # one eval.py at a time in a folder; then what writes killed midway left there is removed
    with EvalLock(out_dir) as lock, stop_on_sigterm(out_dir / PREDICTIONS_FILE):
        if lock.locked:
            remove_interrupted_writes(out_dir)
        job_log.write()
        _check_run_identity(
            out_dir,
            identity,
            from_setting=c.get("stop") is not None,
            refilter=lambda filters: _other_filters_conflict(bench_cfg, filters, bench.items),
        )
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():  # what Hydra would have written before the lock (`output_subdir: null`)
            save_run_config(cfg, out_dir)
        if predict_fn is None:
            model_cfg = {**c, "max_new_tokens": int(max_new_tokens)}
            predict_fn = LazyPredictFn(lambda: build_predict_fn(model_cfg))
        try:
            results = run_benchmark(
                items,
                predict_fn,
                out_dir,
                8 if c.get("batch_size") is None else int(c["batch_size"]),
                name=bench.name,
                source=bench.source,
                progress=bool(c.get("progress", True)),
                # [] scores every language with WER: only an unset value takes the default list
                cer_languages=CER_LANGUAGES
                if bench_cfg.get("cer_languages") is None
                else bench_cfg["cer_languages"],
                length=item_seconds if c.get("sort_by_length", True) else None,
                extra={
                    "ckpt": identity["ckpt"],
                    "limit": limit,
                    # answered items past the first `limit` taken in place of unanswered ones (`limit_items`)
                    **({"limit_kept": limit_kept} if limit_kept else {}),
                    "skipped_missing_audio": bench.skipped_missing_audio,
                    "counts": bench.counts(),
                    # the settings the paper's numbers depend on (report.PAPER_RESULTS)
                    "settings": {
                        k: bench_cfg.get(k)
                        for k in ("format", "split", "subset", "unit", "modalities")
                        if k in bench_cfg
                    },
                },
                official_format=str(bench_cfg.get("format") or ""),
                think=think,
                skip_unreadable=bool(bench_cfg.get("skip_missing_audio")),
            )
        except UnreadableAudioError as e:
            hint = AUDIO_HINTS.get(str(bench_cfg.get("format")), "")
            raise EvalConfigError(
                f"{e}; benchmark.skip_missing_audio=true skips missing or unreadable audio files"
                + (f" ({hint})" if hint else "")
                + f"; the predictions made so far stay in {out_dir / PREDICTIONS_FILE}"
            ) from None
    log.info("%s: results in %s", bench.name, out_dir)
    return results


def headline(results: Mapping[str, Any]) -> str:
    """One line per task with its main numbers, for the console."""

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    keys = {
        "mcq": ("accuracy", "accuracy_mmau", "accuracy_official", "chance", "unparsed", "ambiguous"),
        "classification": (
            "accuracy",
            "accuracy_mmau",
            "balanced_accuracy",
            "chance",
            "unparsed",
            "ambiguous",
        ),
        "caption": ("bleu", "rougeL", "aspect_recall"),
        "open_qa": ("bleu", "rougeL"),
        "lyrics": ("wer", "cer"),
    }
    optional = {"accuracy_official"}  # the benchmark's own parser (MuChoMusic's): only where there is one
    lines = [
        f"{results['benchmark']} {task}: n={s.get('n', 0)} "
        + " ".join(f"{k}={f(s.get(k))}" for k in keys.get(task, ()) if k in s or k not in optional)
        for task, s in results["tasks"].items()
    ]
    if results.get("think"):
        t = results["think"]
        lines.append(
            f"{results['benchmark']} think: ok={t['ok']} missing={t['missing']} broken={t['broken']} "
            f"answer_words={f(t['answer_words_mean'])} thinking_words={f(t['thinking_words_mean'])}"
        )
    return "\n".join(lines)
