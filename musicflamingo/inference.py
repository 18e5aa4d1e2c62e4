"""Command-line inference: captions and questions about audio files, streamed; and a multi-turn chat.

`infer(cfg)` is what `infer.py` (a thin `@hydra.main` wrapper) and the tests call. Both modes are thin users of
the generation engine (`musicflamingo.engine`): batch inference keeps `batch_size` slots busy, a file joining as
soon as another's answer is done, and prints the answers in file order, the oldest unfinished one token by token;
`ChatSession` is one slot whose cache persists across turns, so each turn prefills only its new tokens and the
audio is encoded once, in the turn that brings it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import itertools
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from musicflamingo.audio.io import AudioError, audio_duration
from musicflamingo.chat import (
    END_OF_TURN,
    check_typed_text,
    continuation_text,
    conversation,
    think_prompt,
    user_message,
)
from musicflamingo.checkpoint import (
    CheckpointError,
    check_checkpoint_dir,
    generation_config,
    load_config,
    stop_ids,
    stop_token_ids,
)
from musicflamingo.engine import (
    AnswerText,
    Engine,
    Request,
    SamplingParams,
    Slot,
    check_stop_strings,
    parse_stop_strings,
    unsupported_generation_fields,
)
from musicflamingo.errors import RunStopped
from musicflamingo.jsonl import LINE_BREAK
from musicflamingo.model import MusicFlamingo
from musicflamingo.model.config import ConfigError
from musicflamingo.planner import MemoryPlan, check_generation
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.reasoning import ThinkDisplay, parse_think
from musicflamingo.runfolder import FolderLock
from musicflamingo.runtime import RuntimeConfigError, clock, resolve_device_dtype, set_threads
from musicflamingo.settings import check_infer_settings
from musicflamingo.tokenizer import Tokenizer, TokenizerError, read_json_object

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Describe this track in full detail - tell me the genre, tempo, and key, then dive into the instruments, "
    "production style, and overall mood it creates."
)


class InferenceError(ValueError):
    """Bad inference settings or inputs (the message names the field or file and what was expected)."""


class InferInterrupted(RunStopped):
    """SIGTERM (a queue's preemption or time limit) stopped a batch run; `exit_code` is 128 + the signal (143), as
    Ctrl-C's is 130. The message says what `output=` keeps."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises `InferInterrupted` where the run is, so it ends as a Ctrl-C does: the `output=` lock given
    back and one line saying how many answers the file keeps and that the same command goes on (it died silently,
    leaving the researcher to count the rows). A second SIGTERM kills at once; the earlier handler is restored."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise InferInterrupted(f"stopped by {signal.Signals(signum).name}", signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# Errors caused by the user's inputs: `infer.py` prints them as one line instead of a traceback.
USER_ERRORS: tuple[type[ValueError], ...] = (
    InferenceError,
    RuntimeConfigError,
    CheckpointError,
    AudioError,
    TokenizerError,
    ConfigError,
)

# (seed last: a warning names the others)
SAMPLING_FIELDS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
)
DEFAULT_MAX_NEW_TOKENS = (
    1024  # `max_new_tokens: null` when generation_config.json gives none (at most the window)
)
# What `audio=FOLDER` picks up (any file the decoders read can still be named one by one).
AUDIO_SUFFIXES = frozenset(".aac .aif .aiff .flac .m4a .mp3 .mp4 .oga .ogg .opus .wav .webm .wma".split())


def typed_text(text: str, what: str) -> str:
    """`text` (a prompt, a chat line) unless it holds a chat special token or a lone surrogate: refused, as training
    data refuses them (`chat.check_typed_text`), with an InferenceError naming `what`."""
    try:
        return check_typed_text(text, what)
    except ValueError as e:
        raise InferenceError(str(e)) from None


def sampling_params(cfg: Mapping[str, Any], stops: Sequence[int] = ()) -> SamplingParams:
    """The decoding settings of `configs/infer.yaml` (missing keys: `SamplingParams`' defaults), its `stop` strings
    (a text or a list of them; null or missing: none here, `infer` reads null as generation_config.json's) and stop
    ids."""
    try:
        return SamplingParams(
            **{k: cfg[k] for k in SAMPLING_FIELDS if k in cfg},
            stop_ids=tuple(stops),
            stop_strings=stop_strings(cfg.get("stop")),
        )
    except ValueError as e:
        raise InferenceError(str(e)) from None


def stop_strings(value: Any, field: str = "stop", escapes: bool = False) -> tuple[str, ...]:
    """`stop=` (a text, a list of texts, or null: none) as stop strings (`engine.parse_stop_strings`); a bad value is
    an InferenceError naming `field`."""
    try:
        return parse_stop_strings(value, field, escapes)
    except ValueError as e:
        raise InferenceError(str(e)) from None


def load_model(
    ckpt: Any, device: str | None = "auto", dtype: str | None = "auto", quantize: str | None = None
) -> tuple[MusicFlamingo, MusicFlamingoProcessor]:
    """Checked folder -> (model in eval mode on `device`, processor); `quantize="int8"` / `"int4"`: quantized linears
    (`model/quantize.py`; a checkpoint saved quantized loads quantized without it)."""
    path = check_checkpoint_dir(ckpt)
    config = load_config(path)
    quantize = quantize or config.quantization
    dev, dt = resolve_device_dtype(device, dtype, config.num_parameters(), quantize)
    processor = MusicFlamingoProcessor.from_pretrained(path)
    t0 = time.perf_counter()
    model = MusicFlamingo.from_pretrained(path, dtype=dt, device=dev, quantize=quantize).eval()
    logger.info(
        "loaded %s (%s, %s%s) in %.1f s",
        path,
        dev,
        str(dt).replace("torch.", ""),
        f", {quantize} linears" if quantize else "",
        time.perf_counter() - t0,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- batch inference
def _text(value: Any, field: str) -> str:
    """One `field` value as text. Hydra turns `prompt=2024` into an int and `prompt=true` into a bool: taken as the
    text typed; a mapping (`prompt={a:1}`), a nested list or null is refused, naming the field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float, os.PathLike)):
        return str(value)
    raise InferenceError(
        f"{field}={value!r}: expected text or a list of texts; quote text holding {{}}, [], :, = or , for "
        f"Hydra: '{field.split('[')[0]}=\"...\"'"
    )


def _texts(value: Any, field: str) -> list[str]:
    """`field` (one value or a list of them) as a list of texts (see `_text`); None: []."""
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_text(v, f"{field}[{i}]") for i, v in enumerate(value)]
    return [_text(value, field)]


def _expand_inputs(
    files: Sequence[str], check: bool = True
) -> tuple[list[str], list[str | None], list[str | None], list[dict[str, Any] | None]]:
    """`audio=` entries as (files, their own prompts): a folder gives its audio files (`AUDIO_SUFFIXES`, sorted,
    hidden ones left out), a pattern with * ? or [ that names no file gives its matches (sorted; ** goes into
    subfolders); a folder or pattern with no audio is an AudioError. A file named like a pattern (`[Remix].flac`)
    stays itself. A `.jsonl` file is a list of items (`_read_items`), which may bring their own prompts (else None)
    and are named by file:line in errors (the third list; None for the others), and whose other fields (an id) go
    into their output= rows (the fourth list; None for the others). `check`: a JSONL item's audio file must
    exist."""
    out: list[str] = []
    own: list[str | None] = []
    where: list[str | None] = []
    fields: list[dict[str, Any] | None] = []
    for f in files:
        path = Path(f).expanduser()
        if path.suffix.lower() == ".jsonl" and path.is_file():
            items = _read_items(f, check)
            out += [a for a, _, _, _ in items]
            own += [p for _, p, _, _ in items]
            where += [w for _, _, w, _ in items]
            fields += [x for _, _, _, x in items]
            continue
        if path.is_dir():
            found = sorted(
                str(Path(f) / p.name)
                for p in path.iterdir()
                if p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
            if not found:
                raise AudioError(f"{f}: folder holds no audio files ({' '.join(sorted(AUDIO_SUFFIXES))})")
        elif not path.exists() and any(c in f for c in "*?["):
            found = sorted(m for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
            if not found:
                raise AudioError(f"{f}: no file matches this pattern")
        else:
            found = [f]
        out += found
        own += [None] * len(found)
        where += [None] * len(found)
        fields += [None] * len(found)
    return out, own, where, fields


# other names of an item's fields, refused by name rather than ignored
_ITEM_ALIASES = {
    **dict.fromkeys("question query instruction".split(), ["prompt"]),
    **dict.fromkeys("path file filename filepath audio_path audio_file wav song".split(), ["audio"]),
}


def _read_items(jsonl: str, check: bool = True) -> list[tuple[str, str | None, str, dict[str, Any]]]:
    """`audio=items.jsonl`: one JSON object a line, `{"audio": "song.mp3", "prompt": "What key?"}` (`prompt`
    optional: the `prompt=` setting's, else the default caption prompt), as (audio, its own prompt, file:line, its
    other fields); a relative audio path is read from the JSONL's folder, as a training manifest's; blank lines are
    skipped; other fields (an id, a reference answer) are the researcher's, left to the output= row. A bad line
    is an InferenceError naming file:line and what was expected; `check`: a missing audio file is an AudioError
    naming file:line too."""
    path = Path(jsonl).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no item
    except UnicodeDecodeError:
        raise InferenceError(
            f"audio={jsonl}: not UTF-8 (expected JSON Lines of audio/prompt items)"
        ) from None
    except OSError as e:
        raise AudioError(f"audio={jsonl}: cannot read it ({e.strerror or e})") from None
    items: list[tuple[str, str | None, str, dict[str, Any]]] = []
    expected = 'expected a JSON object {"audio": "song.mp3", "prompt": "..."} (prompt optional)'
    for number, line in enumerate(
        LINE_BREAK.split(text), 1
    ):  # JSON Lines' breaks, as manifests and benchmarks
        if not line.strip():
            continue
        where = f"{jsonl}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{where}: not JSON ({e.msg}); {expected}") from None
        if not isinstance(item, dict):
            raise InferenceError(f"{where}: got {type(item).__name__}; {expected}")
        # other fields (an id, a reference answer) are the researcher's; a misspelt or other name of audio or
        # prompt is not (a "question" left the default caption prompt asked)
        for key in item:
            if key in ("audio", "prompt"):
                continue
            if key == "system_prompt":
                raise InferenceError(
                    f"{where}: system_prompt is one setting for the whole run (system_prompt=), not per item"
                )
            name = str(key).lower()
            # a misspelt other name too ("qustion" asked the default caption prompt); closer than for audio and
            # prompt themselves, so that an id field ("song_id", "title") stays the researcher's
            close = (
                _ITEM_ALIASES.get(name)
                or difflib.get_close_matches(name, ["audio", "prompt"], n=1, cutoff=0.6)
                or [_ITEM_ALIASES[m][0] for m in difflib.get_close_matches(name, list(_ITEM_ALIASES), 1, 0.8)]
            )
            if close:
                raise InferenceError(f"{where}: unknown field {key!r} (did you mean {close[0]}?); {expected}")
        audio, prompt = item.get("audio"), item.get("prompt")
        if not isinstance(audio, str) or not audio:
            raise InferenceError(f"{where}: audio={audio!r}: expected a path text; {expected}")
        if prompt is not None and not isinstance(prompt, str):
            raise InferenceError(
                f"{where}: prompt={prompt!r}: expected text (or no prompt field); {expected}"
            )
        if prompt is not None:
            prompt = typed_text(prompt, f"{where}: prompt")
        file = Path(audio).expanduser()
        if not file.is_absolute():
            file = Path(jsonl).parent / audio  # as given, so that output= rows name it as the list does
        if check:
            try:
                _check_audio_files([str(file)])
            except AudioError as e:
                raise AudioError(f"{where}: {e}") from None
        items.append(
            (str(file), prompt, where, {k: v for k, v in item.items() if k not in ("audio", "prompt")})
        )
    if not items:
        raise InferenceError(f"audio={jsonl}: holds no items; {expected}, one a line")
    return items


def _check_audio_files(files: Sequence[str]) -> None:
    for f in files:
        p = Path(f).expanduser()
        if not p.exists():
            raise AudioError(f"{f}: audio file not found")
        if not p.is_file():
            raise AudioError(f"{f}: not a regular file")


def cut_by(slot: Slot) -> str | None:
    """What ended a finished slot's answer short of an end: "max_new_tokens" (its token limit), "context" (the
    model's last position, reached first: a long prompt's budget is what the context leaves), or None (a stop id or
    string ended it). The two differ for a rerun: under another max_new_tokens an answer cut at its limit changes,
    one cut by the context does not (unless the new limit is below its length)."""
    if slot.finish_reason != "length":
        return None
    return "max_new_tokens" if len(slot.tokens) >= slot.params.max_new_tokens else "context"


class _Progress:
    """What follows each answer's header in a run of more than one input: its place in the whole run ("[3/300]", a
    resumed run's included) and, once one of this run's answers is done, the time since the run began and the time
    left at its pace so far ("[3/300] elapsed 0:41, ETA 1:07:24"): a folder of 500 songs said how far it was, never
    when it would end. `to_do`: the answers this run asks (`indices` places them in the `total` inputs); `clock`:
    seconds (time.perf_counter; a test's own)."""

    def __init__(
        self, indices: Sequence[int], total: int, to_do: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.indices, self.total, self.to_do, self.clock = indices, total, to_do, clock
        self.start = clock()
        self.done = 0  # answers of this run finished
        self.skipped = 0  # inputs given up (skip_bad_audio): no answer to wait for, and no time to count

    def place(self, i: int) -> str:
        """Request `i`'s place in the run: "[3/300]"."""
        return f"[{self.indices[i] + 1}/{self.total}]"

    def header(self, i: int) -> str:
        """The text after request `i`'s header: its place, then the time so far and left once there is a pace."""
        place = self.place(i)
        if not self.done:
            return place
        elapsed = self.clock() - self.start
        left = max(self.to_do - self.done - self.skipped, 0) * elapsed / self.done
        return f"{place} elapsed {clock(elapsed)}, ETA {clock(left)}"


class _Printer:
    """Prints answers labelled, in request order, without interleaving: the oldest unfinished answer as its text
    grows (`stream`), each later one whole once every answer before it is out. `places`: what follows request i's
    label in its header (a run's progress, `_Progress.header`), none by default; a skipped input's header says its
    place only."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        labels: Sequence[str],
        out: TextIO | None,
        stream: bool,
        think: bool = False,
        places: _Progress | None = None,
    ) -> None:
        self.tok, self.labels, self.out, self.stream = tokenizer, labels, out, stream
        self.places = places
        self.think = think  # think mode: each answer through a ThinkDisplay (reasoning apart, answer last)
        self.view: ThinkDisplay | None = None
        self.shown = 0  # the request printed next
        self.pushed = 0  # its characters already printed
        self.live = False  # its header is out

    def _header(self, i: int, timed: bool = True) -> str:
        if self.places is None:
            return f"== {self.labels[i]} ==\n"
        return f"== {self.labels[i]} == {self.places.header(i) if timed else self.places.place(i)}\n"

    def update(
        self,
        answers: Sequence[str | AnswerText | Sequence[int]],
        finished: Sequence[bool],
        started: int | None = None,
        skipped: Mapping[int, str] | None = None,
        stops: Sequence[str | None] | None = None,
    ) -> None:
        """`answers`: each request's text so far (an `engine.AnswerText`, read with `since`: never a piece of a stop
        string; or its text), or its token ids so far (decoded here: no stop strings).
        `started`: requests whose audio is read (all by default): a later one gets no header yet, as its file may
        still fail to decode. `skipped`: requests given up (`skip_bad_audio`), with the reason, shown in turn.
        `stops`: the stop string that ended each finished answer (None: none did), which think mode's parse reads
        (`reasoning.parse_think`: a think answer cut before `</answer>` is complete)."""
        out = self.out
        if out is None:
            return
        started = len(answers) if started is None else started
        while self.shown < started:
            i = self.shown
            if skipped and i in skipped:
                out.write(f"{self._header(i, timed=False)}(skipped: {skipped[i]})\n")
                self.shown = i + 1
                continue
            if not self.live and (self.stream or finished[i]):
                out.write(self._header(i))
                self.live, self.pushed = True, 0
                self.view = ThinkDisplay(out) if self.think else None
            if self.live:
                answer = answers[i]
                if isinstance(answer, AnswerText):  # what it added, not the whole answer again each token
                    text = answer.since(self.pushed)
                else:
                    answer = (
                        answer if isinstance(answer, str) else self.tok.decode(answer).removesuffix("\ufffd")
                    )
                    text = answer[self.pushed :]
                if self.view:
                    self.view.write(text)
                else:
                    out.write(text)
                self.pushed = len(answer)
            if not finished[i]:
                break
            if self.view:
                self.view.finish(stops[i] if stops else None)
            else:
                out.write("\n")
            self.live, self.shown = False, i + 1
        out.flush()


def generate_answers(
    model: MusicFlamingo,
    processor: MusicFlamingoProcessor,
    conversations: Sequence[list[dict[str, Any]]],
    labels: Sequence[str],
    params: SamplingParams,
    slots: int | None = None,
    compile: bool = False,
    out: TextIO | None = None,
    stream: bool = True,
    think: bool = False,
    *,
    indices: Sequence[int] | None = None,
    on_answer: Callable[[int, str, str | None, int], None] | None = None,
    skip_bad_audio: bool = False,
    origins: Sequence[str | None] | None = None,
    total: int | None = None,
) -> list[str | None]:
    """One answer per conversation through an engine with `slots` slots (all at once by default); each request
    is prepared (audio read, features) when it joins. Prints to `out` (None: silent, see `_Printer`; `think`:
    reasoning apart, answer last, `reasoning.ThinkDisplay`). Returns the decoded answers (no special tokens).

    `indices`: each conversation's place in the whole input (default 0..n-1), which picks its sampling stream
    (`SamplingParams.for_prompt`): the same answers whatever `slots`, or a resumed run skipping some inputs.
    `on_answer(i, text, cut, tokens)`: called as each answer is done (`output=` writes it; `cut`: what ended it
    short of an end, `cut_by`; `tokens`: how many it generated). `skip_bad_audio`: a file that cannot be read is
    reported and its answer is None, instead of an AudioError ending the run (which comes once the answers already
    started are done). `origins`: where each conversation comes from (a JSONL list's file:line, or None), named
    before its audio errors. `total`: how many inputs `indices` count in (more than one: each header says where
    its answer stands, "== a.wav == [3/300]", so a long run shows how far it is, a resumed one included; and once
    an answer is done, the time so far and left: "[3/300] elapsed 0:41, ETA 1:07:24", `_Progress`)."""
    n = len(conversations)
    indices = range(n) if indices is None else indices
    engine = Engine(model, slots=min(slots or n, n), compile=compile, tokenizer=processor.tokenizer)
    answers: list[str | AnswerText] = [
        ""
    ] * n  # each answer so far (cut before a stop string), text once done
    texts: list[str | None] = [None] * n
    finished = [False] * n
    skipped: dict[int, str] = {}  # request -> why its audio could not be used
    cut: dict[int, str] = {}  # request -> what cut its answer (`cut_by`), not ended by a stop id or string
    stopped: list[str | None] = [None] * n  # the stop string that ended each answer, if one did
    owner: dict[int, int] = {}  # slot -> request
    progress = _Progress(indices, total, n) if total is not None and total > 1 else None
    printer = _Printer(processor.tokenizer, labels, out, stream, think, progress)
    t0, n_tokens, joined = time.perf_counter(), 0, 0

    def record(slot: int, token: int) -> None:
        i = owner[slot]
        s = engine.slots[slot]
        answers[i] = s.text.text if s.done else s.text  # joined once, not at every token
        if s.done:
            finished[i] = True
            if (why := cut_by(s)) is not None:
                cut[i] = why
            stopped[i] = None if s.text is None else s.text.stop
            engine.release(slot)
            texts[i] = answers[i]
            if progress is not None:
                progress.done += 1
            if on_answer is not None:
                on_answer(i, texts[i], why, len(s.tokens))

    # a file that stops the run: raised once the answers being decoded are done
    failed: AudioError | None = None
    while (joined < n and failed is None) or engine.decoding:
        while joined < n and failed is None and engine.free_slots():
            i = joined
            joined += 1
            try:
                inputs = processor.apply_chat_template([conversations[i]])
            except AudioError as e:
                origin = None if origins is None else origins[i]
                named = str(e) if origin is None else f"{origin}: {e}"
                if not skip_bad_audio:
                    # the answers already decoding finish first (`on_answer` writes them: output= keeps them and
                    # a rerun asks only the rest); they were dropped with the whole batch
                    failed, joined = AudioError(f"{named} (skip_bad_audio=true skips such files)"), i
                    failed.__cause__ = e
                    if engine.decoding:  # said now: the answers may take a while
                        logger.warning(
                            "%s; the %d answers already started finish first, then the run stops",
                            failed,
                            len(engine.decoding),
                        )
                    break
                skipped[i], finished[i] = named, True
                if progress is not None:
                    progress.skipped += 1
                continue
            request = Request(
                inputs["input_ids"][0],
                params.for_prompt(indices[i]),
                inputs.get("input_features"),
                inputs.get("input_features_mask"),
            )
            try:
                slot = engine.admit(request)
            except ValueError as e:  # e.g. a prompt longer than the model's context
                raise InferenceError(f"{labels[i]}: {e}") from None
            owner[slot.index] = i
            n_tokens += 1
            record(slot.index, slot.tokens[-1])
        for slot, token in engine.step():
            n_tokens += 1
            record(slot, token)
        printer.update(answers, finished, joined, skipped, stopped)
    if failed is not None:
        raise failed
    dt = time.perf_counter() - t0
    logger.info(
        "%d answers, %d new tokens in %.2f s (%.1f tokens/s)",
        n - len(skipped),
        n_tokens,
        dt,
        n_tokens / max(dt, 1e-9),
    )
    # a silent cut reads as the model's whole answer (a caption ending mid-sentence); the context's end (prompt +
    # answer at the model's max positions) cuts before max_new_tokens does for long audio, and a larger
    # max_new_tokens cannot help there
    for why, ended, fix in (
        (
            "max_new_tokens",
            f"the token limit (max_new_tokens={params.max_new_tokens})",
            "raise max_new_tokens",
        ),
        (
            "context",
            f"the end of the model's context ({engine.limit} positions for prompt and answer)",
            "a shorter prompt or audio leaves the answer more room",
        ),
    ):
        names = [labels[i] for i in sorted(cut) if cut[i] == why]
        if names:
            logger.warning(
                "%d of %d answers ended at %s, not at an end token, so they may be cut short: %s%s; %s",
                len(names),
                n - len(skipped),
                ended,
                ", ".join(names[:10]),
                f" and {len(names) - 10} more" if len(names) > 10 else "",
                fix,
            )
    if skipped:
        names = [labels[i] for i in sorted(skipped)]
        logger.warning(
            "skipped %d of %d files (skip_bad_audio=true): %s%s",
            len(names),
            n,
            ", ".join(names[:10]),
            f" and {len(names) - 10} more" if len(names) > 10 else "",
        )
    return texts


# ---------------------------------------------------------------------------------------------- chat
class ChatSession:
    """A multi-turn conversation in one engine slot whose KV cache persists across turns.

    `ids` are the tokens whose keys/values are in the cache (positions `0..len(ids)-1`); `pending` is the last
    answer's last token, not fed yet. A new user turn feeds `pending` + the turn's tokens (with the closing
    `<|im_end|>` of the previous answer when it was cut by `max_new_tokens`, see `chat.continuation_text`) at
    positions continuing the cache, so `history_ids` is exactly the token sequence a from-scratch run over the
    whole conversation would see. An answer cut by a stop string (`params.stop_strings`) keeps the tokens before
    it (`Engine.rewind`); `pending` is then the rest of the cut answer's text, encoded, and `<|im_end|>`: the
    history holds the answer as the user saw it.

    Turn n samples from its own stream of (`seed`, n) (`SamplingParams.for_prompt`), counted over the session
    (resets included): a seeded chat repeats as a whole, and its turns differ.
    """

    def __init__(
        self,
        model: MusicFlamingo,
        processor: MusicFlamingoProcessor,
        params: SamplingParams | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        # default stops: generation_config.json's eos ids and the config's, as infer.py's, and its stop strings
        generation = getattr(model, "generation_defaults", {})
        eos = stop_ids(generation, model.config)
        self.params = params or SamplingParams(
            stop_ids=tuple(eos), stop_strings=generation.get("stop_strings") or ()
        )
        self.system_prompt = system_prompt
        self.end_of_turn_id = processor.tokenizer.require_id(END_OF_TURN)
        self.engine = Engine(model, slots=1, tokenizer=processor.tokenizer)
        self.turns = 0  # turns asked in this session: turn n samples from (seed, n)
        self.last_stop: str | None = None  # the stop string that ended the last answer, if one did
        # what cut the last answer, not ended by a stop: its token limit (a note on the max_new_tokens that cut
        # it), or the model's context (a note on the positions): a cut answer reads as the model's whole one
        self.last_cut: str | None = None
        self.reset()

    @property
    def stops(self) -> tuple[int, ...]:
        return self.params.stop_ids

    @stops.setter
    def stops(self, ids: Sequence[int]) -> None:
        self.params = dataclasses.replace(self.params, stop_ids=tuple(ids))

    def reset(self) -> None:
        """Forget the conversation (the cache buffers are kept for reuse)."""
        self.messages: list[dict[str, Any]] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        self.ids: list[int] = []
        self.pending: list[int] = []
        self.last_new_ids: list[int] = []
        self.engine.release(0)

    @property
    def history_ids(self) -> list[int]:
        """Every token of the conversation so far, the last answer included."""
        return self.ids + self.pending

    @torch.inference_mode()
    def ask(self, text: str, audio: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn (optionally with an audio file), generate the answer, return its text.

        `on_text` receives the answer's text deltas as they are generated (never a piece of a stop string).
        """
        processor, engine = self.processor, self.engine
        typed_text(text, "message")
        if audio is not None:
            _check_audio_files([audio])
        message = user_message(text, audio)
        pending: list[int] = []  # the last answer's tokens not in the cache yet, fed before the turn's
        if engine.slots[0] is None:
            turn = processor.render_chat(self.messages + [message], add_generation_prompt=True)
        else:
            pending = self.pending
            if pending and pending[0] in self.stops:
                # any stop closes the answer as the template does (<|im_end|>), whatever id it stopped on
                # (a checkpoint's <|endoftext|>): the cached history stays the render of the conversation
                pending = [self.end_of_turn_id]
            closed = pending[-1:] == [self.end_of_turn_id]
            turn = continuation_text(
                self.messages, message, closed, processor.default_system_prompt, processor.audio_token
            )
        batch = processor(turn, audio=[audio] if audio is not None else None)
        feed = torch.cat([torch.tensor(pending, dtype=torch.long), batch["input_ids"][0]])
        features, features_mask = batch.get("input_features"), batch.get("input_features_mask")
        params = self.params.for_prompt(self.turns)
        try:
            if engine.slots[0] is None:
                slot = engine.admit(Request(feed, params, features, features_mask), index=0)
            else:
                last = engine.slots[0].last
                engine.slots[0].last = None  # fed here, as `pending`
                try:
                    slot = engine.extend(0, feed, params, features, features_mask)
                except BaseException:
                    engine.slots[0].last = last
                    raise
        except ValueError as e:
            if engine.slots[0] is None:  # the question alone: /reset would only ask it again
                what, fix = (
                    ("the question with its audio", " or /audio a shorter file") if audio else ("it", "")
                )
                raise InferenceError(
                    f"{e}: {what} alone does not fit, /reset cannot help; shorten it{fix}"
                ) from None
            raise InferenceError(f"{e}; start a new conversation (/reset)") from None
        self.turns += 1
        self.ids += feed.tolist()
        shown = 0
        while True:
            if on_text is not None:  # never a piece of a stop string (`engine.AnswerText`)
                on_text(slot.text.since(shown))
                shown = len(slot.text)
            if slot.done:
                break
            engine.step()
        self.last_new_ids = list(slot.tokens)
        answer = slot.text.text
        self.last_stop = slot.text.stop
        self.last_cut = {
            None: None,
            "max_new_tokens": f"max_new_tokens={slot.params.max_new_tokens}: raise it for longer answers",
            "context": f"the end of the model's context ({engine.limit} positions): /reset starts a new conversation",
        }[cut_by(slot)]
        if slot.text.stop is not None:
            # a stop string cut the answer inside its tokens: keep those before it, then the rest of its text
            keep = slot.text.kept_tokens()
            # decoded as the answer was (`reasoning.TagsKept`: think tags that are special tokens read as text)
            rest = answer[len(slot.text.decoder.tokenizer.decode(slot.tokens[:keep])) :]
            engine.rewind(0, keep)
            self.ids += slot.tokens
            self.pending = processor.tokenizer.encode(rest) + [self.end_of_turn_id]
        else:
            self.ids += slot.tokens[:-1]
            self.pending = [slot.tokens[-1]]
        self.messages += [message, {"role": "assistant", "content": answer}]
        return answer


def _stdin_lines(prompt: str = "you> ") -> Iterator[str]:
    if sys.stdin.isatty():
        while True:
            try:
                yield input(prompt)
            except EOFError:
                return
    else:
        # Undecodable bytes become lone surrogates, which `chat.check_typed_text` refuses for that line only,
        # instead of a UnicodeDecodeError that would end the conversation.
        # utf-8-sig: a file saved by a Windows editor starts with a BOM, which was sent as part of the first question
        stream = open(sys.stdin.fileno(), encoding="utf-8-sig", errors="surrogateescape", closefd=False)
        for line in stream:
            yield line.rstrip("\n")


def _typed_path(text: str) -> str:
    """A path typed or pasted after /audio: as is when it names something, else unquoted as a shell would, for
    the '/my song.wav' or /my\\ song.wav a drag and drop pastes."""
    if not text or Path(text).expanduser().exists():
        return text
    try:
        words = shlex.split(text)
    except ValueError:  # an unmatched quote: a name of its own (it's.flac)
        return text
    return words[0] if len(words) == 1 else text


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    audio: str | None = None,
    out: TextIO | None = None,
    think: bool = False,
) -> list[str]:
    """Drive `session` from `lines` (stdin by default): `/audio PATH` attaches a file to the next message,
    `/reset` starts again (with the initial audio), `/quit` or end of input stops. Returns the answers. `think`:
    each question gets the think suffix and each answer shows its reasoning apart, the answer last; the history
    keeps the whole answer, reasoning included, as the reference chat template does."""
    out = out if out is not None else sys.stdout
    attach = audio
    answers: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line == "/reset":
            session.reset()
            attach = audio
            out.write("(new conversation)\n")
            continue
        if line.startswith("/audio"):
            path = _typed_path(line[len("/audio") :].strip())
            try:
                _check_audio_files([path] if path else ["(no path given)"])
            except AudioError as e:
                out.write(f"error: {e}\n")
                continue
            attach = path
            out.write(f"(attached {path} to the next message)\n")
            continue
        out.write("assistant> ")
        out.flush()
        view = ThinkDisplay(out) if think else None

        def show(delta: str, view: ThinkDisplay | None = view) -> None:
            if view is not None:
                view.write(delta)
                return
            out.write(delta)
            out.flush()

        try:
            answers.append(session.ask(think_prompt(line) if think else line, audio=attach, on_text=show))
        except USER_ERRORS as e:
            out.write(f"\nerror: {e}\n")
            if isinstance(e, AudioError) and attach is not None:
                # kept, the file would fail every later question (and the initial one every /reset)
                out.write(f"({attach} is not attached; ask again, or /audio another file)\n")
                audio = None if attach == audio else audio
                attach = None
            continue
        attach = None  # the audio now lives in the cache
        if view is not None:
            view.finish(session.last_stop)  # a think answer cut before `</answer>` is complete
        else:
            out.write("\n")
        if session.last_cut is not None:  # as infer.py's batch warns
            out.write(f"(the answer may be cut short: it stopped at {session.last_cut})\n")
        out.flush()
    return answers


class _Output:
    """`output=`: a JSON Lines file with one object per answered input (`audio`, `prompt`, `answer`; think mode:
    the answer, `thinking` and the whole `text` apart; a `system_prompt` that is set), appended and flushed as each
    answer is done. A rerun skips the (audio, prompt) pairs the file holds, so a long run resumes where it stopped;
    only rows asked the same way count (think mode or not, the same system prompt, the same stop strings, which a
    row names when there are any): the others are kept, not reused, as their question was another one. An answer
    cut at the token limit names it (`max_new_tokens`) and is reused only under the same one: a quick run with
    max_new_tokens=16 into the file left every later run its 16-token captions, "already answered". One cut at the
    end of the model's context (its prompt left the answer fewer positions than max_new_tokens) says so (`"cut":
    "context"`) with its length (`new_tokens`), and is reused under any limit that would not cut it sooner: it named
    max_new_tokens, so a rerun under another limit asked it again for the same answer. A sampled
    answer names its sampling (`do_sample`, `temperature`, `top_k`, `top_p`, `seed`) and is reused only by a run
    sampling the same way; a row without them is a greedy answer (rows written before rows named their sampling
    read so too): a sampled rerun into the greedy run's file was handed the greedy captions, and the reverse.
    An answer decoded under a repetition penalty (greedy or sampled) names it (`repetition_penalty`) and is reused
    only under the same one; a row without it was decoded without one (1.0, as every row written before).
    A row names its file as the run was given it (`audio`) and, when that is not the file's resolved path, by that
    path too (`resolved_audio`): a rerun matches it by the resolved path, so `./music/a.wav`, `music/a.wav` or an
    absolute path from another folder is the same file (each was asked again). The `audio` text as given matches
    too (a moved project's rows, rows written before), unless both resolved paths name files that exist and differ:
    `music/a.wav` in another folder is another song.

    One infer.py at a time per file: `<file>.lock` (`runfolder.FolderLock`, held from before the file is read until
    `close()`) refuses a second one, which would answer every input again into the same file (and could cut off
    the first one's rows while dropping a torn last row)."""

    def __init__(
        self,
        path: str,
        think: bool,
        system_prompt: str | None = None,
        stop: Sequence[str] = (),
        max_new_tokens: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> None:
        self.path, self.think, self.system_prompt = Path(path).expanduser(), think, system_prompt
        if path.endswith(("/", os.sep)) or self.path.is_dir():  # `output=results/` made a file named results
            raise InferenceError(
                f"output={path}: a folder; output= names the .jsonl file the answers go in "
                f"(output={os.path.join(path, 'answers.jsonl')})"
            )
        self.stop = list(stop)  # the stop strings that cut the answers: rows cut by others are not reused
        # the token limit: the rows it cut name it, and are reused only under the same (`_limit_fits`)
        self.max_new_tokens = max_new_tokens
        # how the answers are sampled (`_sampling`): None for greedy decoding
        self.sampling = _sampling(sampling or {})
        # applied greedy or sampled, so apart from `sampling`: a row without one was decoded without (1.0)
        self.repetition_penalty = (sampling or {}).get("repetition_penalty", 1.0)
        # rows by (resolved path, prompt) and (audio as given, prompt): (line number, row), in file order
        self.by_path: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        self.by_text: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        self.other = 0  # rows asked another way (think mode, system prompt): kept in the file, not reused
        self.added = 0  # rows this run wrote
        self.lock = FolderLock(
            self.path.parent,
            f"{self.path.name}.lock",
            "infer.py",
            "name another output= file",
            InferenceError,
            subject=f"output={self.path}",
        )
        above = next((a for a in self.path.parents if a.exists()), None)
        if above is not None and not above.is_dir():  # said "cannot write there (File exists)"
            raise InferenceError(
                f"output={self.path}: {above} is a file, where a folder is expected; name a .jsonl file in a folder"
            )
        try:  # before the model loads: an unwritable file would fail at the first answer, losing it
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as e:
            raise InferenceError(
                f"output={self.path}: cannot write there ({e.strerror or e}); name a .jsonl file in a writable folder"
            ) from None
        try:
            if self.path.exists():
                self._read()
            try:
                with open(self.path, "a", encoding="utf-8"):
                    pass
            except OSError as e:
                raise InferenceError(
                    f"output={self.path}: cannot write there ({e.strerror or e}); name a .jsonl file in a writable "
                    "folder"
                ) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Gives the file back (removes its lock)."""
        self.lock.release()

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        if not self.path.is_file():
            raise InferenceError(f"output={self.path}: not a regular file")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InferenceError(
                f"output={self.path}: not UTF-8 (expected the JSON Lines infer.py writes)"
            ) from None
        *lines, last = text.split("\n")
        # our last write, cut short by a crash: not JSON (a whole object is a row, or another file's line)
        torn = (
            bool(last) and (last.startswith(_ROW_START) or _ROW_START.startswith(last)) and not _is_json(last)
        )
        for number, line in enumerate([*lines, "" if torn else last], 1):
            row = _json_row(line)
            if row is None and line.strip():
                raise InferenceError(
                    f"output={self.path}:{number}: expected a JSON object with audio, prompt and answer texts "
                    "(as infer.py's output= writes); name another file"
                )
            if row is None:
                continue
            if (
                ("thinking" in row) != self.think
                or row.get("system_prompt") != self.system_prompt
                or (row.get("stop") or []) != self.stop
                or not self._limit_fits(row)
                or _sampling(row) != self.sampling
                or row.get("repetition_penalty", 1.0) != self.repetition_penalty
            ):
                self.other += 1
                continue
            self.by_text.setdefault((row["audio"], row["prompt"]), []).append((number, row))  # as before
            resolved = row.get("resolved_audio")
            if not isinstance(resolved, str):  # its own resolved path (or a row written before)
                resolved = row["audio"] if os.path.isabs(row["audio"]) else None
            if resolved is not None:  # the file it names wherever the rerun is started
                self.by_path.setdefault((resolved, row["prompt"]), []).append((number, row))
        if self.other:
            logger.info(
                "%s: %d rows were asked with another think, system_prompt, stop, repetition_penalty or sampling "
                "setting (do_sample, temperature, top_k, top_p, seed), or cut where this max_new_tokens would not "
                "cut them: kept, not reused",
                self.path,
                self.other,
            )
        if torn:  # dropped once every other line is known to be a row (its input is answered again)
            logger.warning("%s: dropping its last line, cut short by an interrupted run", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(len(text.encode("utf-8")) - len(last.encode("utf-8")))
        elif last:  # a whole row without its newline: the next row starts a line of its own
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")

    def _limit_fits(self, row: Mapping[str, Any]) -> bool:
        """Whether this run's max_new_tokens gives `row`'s answer again: any limit for an answer that ended by
        itself, the same one for an answer it cut (`max_new_tokens`), one no shorter than an answer the context
        cut (`"cut": "context"`, `new_tokens` long; a smaller limit cuts it sooner)."""
        limit = self.max_new_tokens
        if row.get("cut") == "context":
            n = row.get("new_tokens")
            ok = isinstance(n, int) and not isinstance(n, bool) and n >= 1
            return ok and "max_new_tokens" not in row and (limit is None or n <= limit)
        return row.get("max_new_tokens", limit) == limit

    def answer(self, audio: str, prompt: str, nth: int = 0) -> str | None:
        """The answer the file holds for the `nth` time (audio, prompt) is asked in the run (think mode: the whole
        text), else None. Rows of a pair asked more than once carry their `repeat` number (they are written as
        they finish, not in input order); rows without one (a pair asked once) take the numbers left, in file
        order."""
        path = resolved_path(audio)
        found = self.by_path.get((path, prompt), []) + [
            (number, row)
            for number, row in self.by_text.get((audio, prompt), [])
            if not _other_file(row.get("resolved_audio"), path)
        ]
        rows = [row for _, row in sorted(dict(found).items())]
        numbered = {r["repeat"]: r for r in rows if _repeat(r) is not None}
        free = (n for n in itertools.count() if n not in numbered)
        by_number = {**dict(zip(free, (r for r in rows if _repeat(r) is None))), **numbered}
        row = by_number.get(nth)
        if row is None:
            return None
        return row.get("text", row["answer"]) if self.think else row["answer"]

    def write(
        self,
        audio: str,
        prompt: str,
        text: str,
        repeat: int | None = None,
        cut: str | None = None,
        new_tokens: int = 0,
        item: Mapping[str, Any] | None = None,
    ) -> None:
        """Append the answer to (audio, prompt); `repeat`: which time the run asks this pair, for a pair asked more
        than once (its answers finish in any order: a rerun matches each with its own input, and so its own
        sampling stream); `cut`: what ended the answer short of an end (`cut_by`): "max_new_tokens" (the row
        names the limit) or "context" (the row says so, with the answer's `new_tokens`); `item`: the other fields
        of the input's line in an items.jsonl (`{"id": 7}`), kept in the row as `"item"` (rows are written as they
        finish, not in the list's order: an id joins them back; not read by a rerun)."""
        row: dict[str, Any] = {"audio": audio, "prompt": prompt, "answer": text}
        if item:
            row["item"] = dict(item)
        if (resolved := resolved_path(audio)) != audio:
            row["resolved_audio"] = resolved
        if repeat is not None:
            row["repeat"] = repeat
        if self.think:
            split = parse_think(text)
            row.update(answer=split.answer, thinking=split.thinking, text=text)
        if self.system_prompt is not None:
            row["system_prompt"] = self.system_prompt
        if self.stop:
            row["stop"] = self.stop
        if cut == "max_new_tokens" and self.max_new_tokens is not None:
            row["max_new_tokens"] = self.max_new_tokens
        elif cut == "context":
            row.update(cut="context", new_tokens=new_tokens)
        if self.sampling is not None:
            row.update(do_sample=True, **self.sampling)
        if self.repetition_penalty != 1:
            row["repetition_penalty"] = self.repetition_penalty
        line = json.dumps(row) + "\n"  # ASCII escapes: any file name (even not UTF-8) round-trips
        # closed at once: a crash loses no finished answer; a full disk (an OSError naming no file) is named here,
        # and the rerun drops a torn last row and keeps the others
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            self.added += 1
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot add the answer for {audio}: {e.strerror or e}; the answers before it are kept and a rerun "
                "goes on from there",
                str(self.path),
            ) from e


# how every row `_Output.write` writes begins: a torn last row begins so, or is shorter
_ROW_START = '{"audio": '


def _repeat(row: Mapping[str, Any]) -> int | None:
    """A row's `repeat` number (see `_Output.write`), None when it has none."""
    n = row.get("repeat")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def resolved_path(path: str) -> str:
    """`path` as an absolute path, `~` expanded and symbolic links followed: the file an `output=` row names."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):  # a symbolic link loop, an unreadable folder on the way
        return os.path.abspath(os.path.expanduser(path))


def _other_file(resolved: Any, path: str) -> bool:
    """Whether a row's `resolved_audio` and an input's resolved `path` are two files that exist (a row whose file
    has moved away is matched by its name, as before)."""
    return (
        isinstance(resolved, str) and resolved != path and os.path.exists(resolved) and os.path.exists(path)
    )


# the settings a sampled answer depends on besides do_sample (a greedy one depends on none of them)
_SAMPLED = ("temperature", "top_k", "top_p", "seed")


def _sampling(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """How `settings` (a run's decoding settings, or an `output=` row) sample: their temperature, top_k, top_p and
    seed when `do_sample` is true (missing ones: `SamplingParams`' defaults), None for greedy decoding (a row
    without `do_sample`: every row written before rows named their sampling reads as greedy)."""
    if settings.get("do_sample") is not True:
        return None
    return {k: settings.get(k, getattr(SamplingParams, k)) for k in _SAMPLED}


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _json_row(line: str) -> dict[str, Any] | None:
    """A line of an `output=` file as its object; None when it is not one (not JSON, or no audio/prompt/answer)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("audio", "prompt", "answer"))
    return row if ok else None


def _memory_plan(
    cfg: Mapping[str, Any],
    ckpt: Path,
    files: Sequence[str],
    prompts: Sequence[str],
    slots: int,
    new_tokens: int,
) -> MemoryPlan:
    """The predicted peak of this run from the checkpoint's config.json and the audio files' headers (no weight
    read); refuses a run that would not fit unless `plan` or `memory_check=false` (`planner.check_generation`)."""
    return check_generation(
        cfg,
        ckpt,
        [audio_duration(f) for f in files],
        prompt_chars=max((len(p) for p in prompts), default=len(DEFAULT_PROMPT)),
        slots=slots,
        new_tokens=new_tokens,
    )


# ---------------------------------------------------------------------------------------------- entry point
def _decoding(cfg: Mapping[str, Any], ckpt: Path) -> dict[str, Any]:
    """The decoding settings of `cfg`, `max_new_tokens` resolved: null is the checkpoint's generation_config.json
    value (2048 for the release, as the reference's generate uses), else 1024, at most the model's context window;
    a number past the window can never be used (10**8 was accepted and ran to 32k): refused, naming it."""
    settings = {k: cfg[k] for k in SAMPLING_FIELDS if k in cfg}
    window = load_config(ckpt).text.max_position_embeddings
    n = settings.get("max_new_tokens")
    if n is None:
        default = generation_config(ckpt).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        settings["max_new_tokens"] = min(default, window)
    elif isinstance(n, int) and not isinstance(n, bool) and n > window:
        raise InferenceError(
            f"max_new_tokens={n} is more than the model's context window, {window} tokens for prompt and answer "
            f"together ({ckpt / 'config.json'}: text_config.max_position_embeddings)"
        )
    if cfg.get("stop") is None:  # generation_config.json's, as the reference's generate() reads them
        try:
            stops = check_stop_strings(generation_config(ckpt).get("stop_strings"), "stop_strings")
        except ValueError as e:
            raise CheckpointError(f"{ckpt / 'generation_config.json'}: {e}") from None
    else:
        stops = stop_strings(cfg.get("stop"), escapes=True)
    settings["stop"] = list(stops)
    sampling_params(settings)  # bad decoding settings fail before the model is loaded
    _warn_unused_generation_config(ckpt, settings, n is None)
    if not settings.get("do_sample", False):
        # greedy decoding reads none of these: say so rather than give argmax answers as samples
        unused = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        given = [f"{k}={settings[k]}" for k, off in unused.items() if settings.get(k, off) != off]
        if given:
            logger.warning(
                "%s: used only when sampling; do_sample=false decodes greedily (pass do_sample=true)",
                " ".join(given),
            )
    return settings


def _warn_unused_generation_config(ckpt: Path, settings: Mapping[str, Any], length_from_file: bool) -> None:
    """Name the fields of the checkpoint's generation_config.json that change the reference's tokens and that this
    run does not apply: sampling the file asks for when infer decodes greedily (infer's settings are its own, see
    configs/infer.yaml), a `repetition_penalty` other than this run's, a `max_length` alone (prompt + answer, per
    prompt), and those the engine does not implement."""
    path = ckpt / "generation_config.json"
    raw = read_json_object(path, CheckpointError)
    overridden = []
    if raw.get("do_sample") is True and not settings.get("do_sample", False):
        overridden = [f"{k}={raw[k]!r}" for k in ("do_sample", "temperature", "top_k", "top_p") if k in raw]
    if length_from_file and raw.get("max_length") is not None and raw.get("max_new_tokens") is None:
        overridden.append(f"max_length={raw['max_length']!r}")
    unsupported = unsupported_generation_fields(raw)
    if overridden:
        logger.warning(
            "%s sets %s: infer.py decodes with its own settings (%s); pass them (max_new_tokens for a length) to "
            "decode as the file says",
            path,
            " ".join(overridden),
            " ".join(f"{k}={settings.get(k, getattr(SamplingParams, k))}" for k in SAMPLING_FIELDS[:-1]),
        )
    # applied greedy or sampled, so named whatever do_sample says (generate() applies the file's; infer its own)
    penalty = settings.get("repetition_penalty", SamplingParams.repetition_penalty)
    if raw.get("repetition_penalty") not in (None, 1) and raw["repetition_penalty"] != penalty:
        logger.warning(
            "%s sets repetition_penalty=%r: infer.py decodes with its own, repetition_penalty=%r; pass "
            "repetition_penalty=%r to decode as the file says",
            path,
            raw["repetition_penalty"],
            penalty,
            raw["repetition_penalty"],
        )
    if unsupported:
        logger.warning(
            "%s sets %s, which the reference's generate() applies and infer.py does not implement: answers differ "
            "from the reference's",
            path,
            " ".join(unsupported),
        )


def _flag(cfg: Mapping[str, Any], key: str) -> bool:
    value = cfg.get(key, False)
    if not isinstance(value, bool):
        raise InferenceError(f"{key}={value!r}: expected true or false")
    return value


def infer(
    cfg: Mapping[str, Any], lines: Iterable[str] | None = None, out: TextIO | None = None
) -> list[str | None]:
    """Run `configs/infer.yaml`-shaped settings; returns one answer per audio file (or per chat turn).

    `lines` feeds the interactive mode (stdin when None); `out` receives the printed text (stdout when None).
    `think=true`: questions get the think suffix (`chat.think_prompt`), the reasoning is shown apart and the answer
    last; the returned answers are the whole texts, tags included (`reasoning.parse_think` splits them).
    `plan=true` writes the memory plan to `out` and returns [] without loading the model.
    `output=FILE`: answers are appended to it as JSON Lines, and those it already holds are not asked again (they
    are returned from it); a file that holds every answer needs none of the audio files (they may have moved).
    `skip_bad_audio=true`: an unreadable file is reported and its answer is None. `stop`: stop strings (null:
    generation_config.json's), each answer cut before the first to appear (`engine.AnswerText`).
    """
    out = out if out is not None else sys.stdout
    check_infer_settings(cfg)  # types and ranges (sampling: below), before the checkpoint or audio is read
    set_threads(cfg.get("threads"))
    ckpt = check_checkpoint_dir(cfg.get("ckpt"))
    decoding = _decoding(cfg, ckpt)
    skip_bad_audio = _flag(cfg, "skip_bad_audio")
    # the files are checked once it is known which are asked: an output= file may hold every answer already
    files, own_prompts, origins, fields = _expand_inputs(_texts(cfg.get("audio"), "audio"), check=False)
    prompts = [typed_text(p, "prompt") for p in _texts(cfg.get("prompt"), "prompt")]

    def check_inputs(asked: Sequence[int]) -> None:
        if skip_bad_audio:
            return
        for i in asked:
            try:
                _check_audio_files([files[i]])
            except AudioError as e:
                raise AudioError(str(e) if origins[i] is None else f"{origins[i]}: {e}") from None

    system_prompt = cfg.get("system_prompt")
    if system_prompt is not None:
        system_prompt = typed_text(_text(system_prompt, "system_prompt"), "system_prompt")
    output = _text(cfg["output"], "output") if cfg.get("output") not in (None, "") else None
    interactive = bool(cfg.get("interactive", False))
    think = _flag(cfg, "think")

    if interactive:
        if len(files) > 1:
            raise InferenceError(f"interactive=true takes at most one audio file, got {len(files)}: {files}")
        if any(p is not None for p in own_prompts):
            raise InferenceError(
                "interactive=true takes the first question as prompt=, not from a JSONL list"
            )
        if len(prompts) > 1:
            raise InferenceError("interactive=true takes at most one prompt (the first question)")
        if output:
            raise InferenceError("output= writes the answers of a batch run; interactive=true keeps none")
        check_inputs(range(len(files)))
        plan = _memory_plan(cfg, ckpt, files, prompts, 1, decoding["max_new_tokens"])
        if cfg.get("plan"):
            out.write(plan.table() + "\n")
            return []
        model, processor = load_model(
            ckpt, cfg.get("device", "auto"), cfg.get("dtype", "auto"), cfg.get("quantize")
        )
        params = sampling_params(decoding, stop_token_ids(ckpt, model.config))
        session = ChatSession(model, processor, params, system_prompt)
        audio = files[0] if files else None
        if lines is None:
            lines = _stdin_lines()
            logger.info("chat: type a question; /audio PATH, /reset, /quit (or end of input)")
        # chained, not unpacked: stdin is read line by line as the chat goes, after the given prompts
        return run_chat(session, itertools.chain(prompts, lines), audio=audio, out=out, think=think)

    if not prompts:
        prompts = [DEFAULT_PROMPT]
    if not files:
        raise InferenceError("audio is not set: pass audio=song.mp3 or audio=[a.mp3,b.wav]")
    if len(prompts) > 1 and any(p is not None for p in own_prompts):
        raise InferenceError(
            f"got {len(prompts)} prompts and a JSONL list whose items bring their own: give one prompt= (for the "
            "items without one) or put every prompt in the list"
        )
    if len(prompts) not in (1, len(files)):
        raise InferenceError(
            f"got {len(prompts)} prompts for {len(files)} audio files: give one prompt for all or one per file"
        )
    if len(prompts) == 1:
        prompts = prompts * len(files)
    prompts = [p if own is None else own for p, own in zip(prompts, own_prompts)]
    batch_size = len(files) if cfg.get("batch_size") is None else cfg.get("batch_size")
    if int(batch_size) < 1:
        raise InferenceError(f"batch_size must be >= 1 or null, got {batch_size!r}")
    if cfg.get("plan"):
        check_inputs(range(len(files)))
        plan = _memory_plan(cfg, ckpt, files, prompts, int(batch_size), decoding["max_new_tokens"])
        out.write(plan.table() + "\n")
        return []
    # The n-th time an (audio, prompt) pair comes (one song sampled N times) is matched with its n-th row; a file
    # named two ways (`a.wav`, `./a.wav`) is one file asked twice.
    seen: Counter[tuple[str, str]] = Counter()
    keys = []
    resolved = [resolved_path(f) for f in files]
    for f, r, p in zip(files, resolved, prompts):
        keys.append((f, p, seen[r, p]))
        seen[r, p] += 1
    # `output=`: held (its lock) from its reading to the last answer
    stops = decoding["stop"]
    limit = decoding["max_new_tokens"]
    with (
        _stop_on_sigterm(),
        (
            _Output(output, think, system_prompt, stops, limit, decoding)
            if output
            else contextlib.nullcontext()
        ) as results,
    ):
        answers = [None if results is None else results.answer(*key) for key in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        if results is not None and len(todo) < len(files):
            logger.info(
                "%s: %d of %d inputs already answered", results.path, len(files) - len(todo), len(files)
            )
        if not todo:
            logger.info("%s holds the answers to all %d inputs: nothing to ask", results.path, len(files))
            return answers
        # only the inputs still to answer are read: a finished one's file may have moved since
        check_inputs(todo)
        _memory_plan(  # refuses a run predicted not to fit (memory_check=false to skip)
            cfg,
            ckpt,
            [files[i] for i in todo],
            [prompts[i] for i in todo],
            min(int(batch_size), len(todo)),
            decoding["max_new_tokens"],
        )
        model, processor = load_model(
            ckpt, cfg.get("device", "auto"), cfg.get("dtype", "auto"), cfg.get("quantize")
        )
        params = sampling_params(decoding, stop_token_ids(ckpt, model.config))
        convs = [
            conversation(think_prompt(prompts[i]) if think else prompts[i], files[i], system_prompt)
            for i in todo
        ]

        def save(k: int, text: str, cut: str | None, new_tokens: int) -> None:
            if results is not None:
                i = todo[k]
                repeated = seen[resolved[i], prompts[i]] > 1
                repeat = keys[i][2] if repeated else None
                results.write(files[i], prompts[i], text, repeat, cut, new_tokens, fields[i])

        try:
            texts = generate_answers(
                model,
                processor,
                convs,
                [files[i] for i in todo],
                params,
                int(batch_size),
                bool(cfg.get("compile", False)),
                out,
                bool(cfg.get("stream", True)),
                think,
                indices=todo,
                on_answer=save,
                skip_bad_audio=skip_bad_audio,
                origins=[origins[i] for i in todo],
                total=len(files),
            )
        except (KeyboardInterrupt, InferInterrupted) as e:
            if results is None:
                raise
            # say what is kept and how to go on
            kept = (
                f"{len(files) - len(todo) + results.added} of {len(files)} answers are in {results.path}; the same "
                "command asks only the others"
            )
            if isinstance(e, InferInterrupted):  # the one line infer.py prints (exit 143)
                raise InferInterrupted(f"{e}: {kept}", e.signum) from None
            logger.warning("stopped: %s", kept)
            raise
        for i, text in zip(todo, texts):
            answers[i] = text
        return answers
