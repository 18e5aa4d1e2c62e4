"""Manifest records -> model-ready samples (token ids, labels, log-mel windows), with bad-sample handling.

Labels (default, ``train_on_prompt=False``): -100 everywhere except the assistant turns' content tokens and
their closing ``<|im_end|>``. The ``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>``, the system
and user turns and every audio token stay -100. ``train_on_prompt=True`` gives the reference processor's
convention instead: every token is a label except ``<sound>``, ``<|sound_bos|>``, ``<|sound_eos|>`` and pad.

How the assistant spans are found: the conversation is rendered with ``processor.render_chat`` one message at a
time (each render of ``messages[:k+1]`` extends the render of ``messages[:k]``), so every piece starts at
``<|im_start|>``. Special tokens are split off before BPE pre-tokenization, so tokenizing the pieces one by one
gives exactly the ids of tokenizing the whole string (tested), and the ids equal
``processor.apply_chat_template`` for the same conversation (tested).

Bad samples (missing/undecodable/empty/NaN audio, audio shorter than ``min_audio_seconds``, a sequence longer
than ``max_text_tokens``): with ``bad_sample_policy="error"`` indexing raises :class:`BadSampleError` naming the
record id, ``manifest:line`` and the reason; with ``"skip"`` it returns a :class:`BadSample` marker, which
:func:`~musicflamingo.data.collate.collate` drops and passes on in ``batch["bad_samples"]``. A marker rather than
``None`` because samples are built in DataLoader worker processes: the reason has to travel with the batch to the
main process, where a :class:`BadSampleTracker` counts, logs (once per sample) and writes them.

The dataset draws no random numbers: a sample depends only on its record (no random crops), so workers and resumed
runs see identical samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from musicflamingo.audio.features import num_frames, tokens_from_frames
from musicflamingo.audio.io import AudioError, load_audio
from musicflamingo.data.collate import IGNORE_INDEX
from musicflamingo.data.manifest import FORBIDDEN_TOKENS, AudioRef, Message, Record

log = logging.getLogger(__name__)

ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"


class BadSampleError(ValueError):
    """A sample cannot be built (under ``bad_sample_policy="error"``); names id, ``manifest:line`` and reason."""


class TooManyBadSamplesError(RuntimeError):
    """The share of skipped samples exceeded ``max_bad_fraction``."""


class _SampleProblem(ValueError):
    """Internal: a data problem that makes one sample unusable (as opposed to a bug)."""


@dataclass(frozen=True)
class BadSample:
    """Marker returned for a skipped sample: dataset ``index``, record ``id``, ``source`` (``file:line``), ``reason``."""

    index: int
    id: str
    source: str
    reason: str


class BadSampleTracker:
    """Counts skipped samples in the main process (batches carry their :class:`BadSample` markers).

    ``num_seen``/``num_bad`` count sample visits (so a bad file counts once per epoch); :attr:`bad` keeps each bad
    sample once, in order of discovery, and each is logged once. :meth:`check` raises
    :class:`TooManyBadSamplesError` when ``num_bad / num_seen > max_bad_fraction`` (after ``min_seen`` visits,
    so that one bad file in the first batch does not stop a run).
    """

    def __init__(self, max_bad_fraction: float | None = None, min_seen: int = 100) -> None:
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1] or None, got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = int(min_seen)
        self.num_seen = 0
        self.num_bad = 0
        self.bad: dict[tuple[str, int], BadSample] = {}

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_seen if self.num_seen else 0.0

    def update(self, num_samples: int, bad: Sequence[BadSample], check: bool = True) -> None:
        """Record a batch that asked for ``num_samples`` samples of which ``bad`` were skipped."""
        self.num_seen += int(num_samples)
        self.num_bad += len(bad)
        for b in bad:
            key = (b.source, b.index)
            if key not in self.bad:
                self.bad[key] = b
                log.warning("skipping bad sample %r (%s): %s", b.id, b.source, b.reason)
        if check:
            self.check()

    def update_from_batch(self, batch: dict[str, Any], check: bool = True) -> dict[str, Any]:
        """Pop ``num_samples``/``bad_samples`` from a collated batch, record them, return the batch."""
        bad = batch.pop("bad_samples", [])
        self.update(batch.pop("num_samples", len(batch.get("ids", [])) + len(bad)), bad, check=check)
        return batch

    def check(self) -> None:
        if self.max_bad_fraction is None or self.num_seen < self.min_seen:
            return
        if self.bad_fraction > self.max_bad_fraction:
            raise TooManyBadSamplesError(
                f"{self.num_bad} of {self.num_seen} samples were skipped ({self.bad_fraction:.1%}), more than "
                f"max_bad_fraction={self.max_bad_fraction:.1%}; first: {next(iter(self.bad.values()), None)}"
            )

    def write_jsonl(self, path: str | os.PathLike) -> None:
        """Write each bad sample once as ``{"index", "id", "source", "reason"}`` lines."""
        with open(path, "w", encoding="utf-8") as f:
            for b in self.bad.values():
                f.write(json.dumps(asdict(b), ensure_ascii=False) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_seen": self.num_seen,
            "num_bad": self.num_bad,
            "bad": [asdict(b) for b in self.bad.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_seen, self.num_bad = int(state["num_seen"]), int(state["num_bad"])
        self.bad = {(d["source"], d["index"]): BadSample(**d) for d in state.get("bad", [])}


class ConversationDataset(Dataset):
    """Map-style dataset of :class:`~musicflamingo.data.manifest.Record` -> per-sample dicts.

    Args:
        records: manifest records (see :func:`~musicflamingo.data.manifest.read_manifest`).
        processor: a :class:`~musicflamingo.processor.MusicFlamingoProcessor` (tokenizer, chat template, log-mel).
        train_on_prompt: label every non-audio token (the reference processor's convention) instead of only the
            assistant turns.
        bad_sample_policy: ``"error"`` (raise :class:`BadSampleError`) or ``"skip"`` (return a :class:`BadSample`).
        max_text_tokens: longest allowed decoder sequence (text + audio tokens); longer samples are bad samples.
        min_audio_seconds: shorter audio is a bad sample (it is almost surely broken).
        seed: kept for API symmetry with samplers; the dataset itself is deterministic.

    ``dataset[i]`` is a dict: ``input_ids`` long [S], ``labels`` long [S], ``input_features`` float32 [w, 128, F],
    ``input_features_mask`` int32 [w, F] (``w`` = this sample's windows, 0 for text-only), ``num_audio_tokens``
    int, ``id`` str.
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: Any,
        *,
        train_on_prompt: bool = False,
        bad_sample_policy: str = "error",
        max_text_tokens: int | None = None,
        min_audio_seconds: float = 0.1,
        seed: int = 0,
    ) -> None:
        if bad_sample_policy not in ("error", "skip"):
            raise ValueError(f"bad_sample_policy must be 'error' or 'skip', got {bad_sample_policy!r}")
        if max_text_tokens is not None and max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1 or None, got {max_text_tokens}")
        self.records = list(records)
        self.processor = processor
        self.train_on_prompt = train_on_prompt
        self.bad_sample_policy = bad_sample_policy
        self.max_text_tokens = max_text_tokens
        self.min_audio_seconds = float(min_audio_seconds)
        self.seed = int(seed)
        tok = processor.tokenizer
        self._encode = tok.encode
        self._header_ids = tok.encode(ASSISTANT_HEADER)
        self._tail_ids = tok.encode(TURN_END + "\n")  # [<|im_end|>, "\n"]: the "\n" is not learned
        self._audio_ids = {
            processor.audio_token_id,
            processor.audio_bos_token_id,
            processor.audio_eos_token_id,
        }
        self._unlabelled = self._audio_ids | (
            {processor.pad_token_id} if processor.pad_token_id is not None else set()
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        rec = self.records[index]
        try:
            return self._build(rec)
        except (AudioError, _SampleProblem) as e:
            if self.bad_sample_policy == "error":
                raise BadSampleError(f"sample {rec.id!r} ({rec.source}): {e}") from e
            return BadSample(index=int(index), id=rec.id, source=rec.source, reason=str(e))

    # ------------------------------------------------------------------ text
    def encode_conversation(
        self, messages: Sequence[Message], audio_token_counts: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """Token ids [S] and labels [S] of one conversation whose i-th ``<sound>`` expands to
        ``<|sound_bos|>`` + ``<sound>`` * counts[i] + ``<|sound_eos|>``."""
        ids: list[int] = []
        labels: list[int] = []
        counts = iter(audio_token_counts)
        p = self.processor
        for piece, learn_from, learn_to in self._pieces(messages):
            for j, t in enumerate(piece):
                if t == p.audio_token_id:
                    n = next(counts, None)
                    if n is None:
                        raise ValueError("more <sound> tokens in the conversation than audio token counts")
                    ids += [p.audio_bos_token_id] + [t] * int(n) + [p.audio_eos_token_id]
                    labels += [IGNORE_INDEX] * (int(n) + 2)
                    continue
                ids.append(t)
                learn = self.train_on_prompt or learn_from <= j < learn_to
                labels.append(t if learn and t not in self._unlabelled else IGNORE_INDEX)
        if next(counts, None) is not None:
            raise ValueError("fewer <sound> tokens in the conversation than audio token counts")
        return ids, labels

    def _pieces(self, messages: Sequence[Message]) -> list[tuple[list[int], int, int]]:
        """Rendered conversation cut at special-token boundaries: ``(ids, learn_from, learn_to)`` per piece,
        where ``ids[learn_from:learn_to]`` is assistant content + ``<|im_end|>`` (empty range elsewhere)."""
        for i, m in enumerate(messages):  # read_manifest rejects these; Records built in code may not
            if any(t in m.content for t in FORBIDDEN_TOKENS):
                raise ValueError(
                    f"message {i} contains a chat special token, which would fake a turn boundary"
                )
        convo = [{"role": m.role, "content": m.content} for m in messages]
        pieces = []
        prev = ""
        for k, m in enumerate(messages):
            cur = self.processor.render_chat(convo[: k + 1], add_generation_prompt=False)
            if not cur.startswith(prev) or not cur[len(prev) :].startswith(TURN_START):
                raise RuntimeError(
                    "the chat template is not a per-message concatenation starting each turn with <|im_start|>; "
                    "assistant spans cannot be located"
                )
            seg, prev = cur[len(prev) :], cur
            if m.role != "assistant":
                pieces.append((self._encode(seg), 0, 0))
                continue
            cut = seg.rfind(ASSISTANT_HEADER)  # the segment may start with the default system turn
            if cut < 0:
                raise RuntimeError(f"rendered assistant turn lacks {ASSISTANT_HEADER!r}: {seg[:60]!r}")
            if cut > 0:
                pieces.append((self._encode(seg[:cut]), 0, 0))
            pieces.append(self._assistant_piece(seg[cut:]))
        return pieces

    def _assistant_piece(self, seg: str) -> tuple[list[int], int, int]:
        ids = self._encode(seg)
        tail = self._tail_ids
        if ids[-len(tail) :] != tail:
            raise RuntimeError(f"assistant turn does not end with {TURN_END!r} + newline: {seg[-40:]!r}")
        head = self._header_ids
        if ids[: len(head)] == head:
            start = len(head)
        else:
            # The content starts with a newline that BPE merged with the header's "\n" into one token: that token
            # straddles header and content; leave it unlearned and learn from the next token on.
            common = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
            start = common + 1
        return ids, start, len(ids) - len(tail) + 1

    # ------------------------------------------------------------------ audio
    def _load(self, ref: AudioRef) -> np.ndarray:
        p = self.processor
        x = load_audio(ref.path, sampling_rate=p.sampling_rate, offset=ref.offset, duration=ref.duration)
        if x.shape[0] < self.min_audio_seconds * p.sampling_rate:
            raise _SampleProblem(
                f"{ref.path}: audio lasts {x.shape[0] / p.sampling_rate:.3f} s, shorter than "
                f"min_audio_seconds={self.min_audio_seconds}"
            )
        return x[: usable_samples(x.shape[0], p.chunk_length, p.max_audio_len, p.sampling_rate)]

    def _build(self, rec: Record) -> dict[str, Any]:
        p = self.processor
        waves = [self._load(ref) for ref in rec.audios]
        counts = [p.audio_token_count(int(w.shape[0])) for w in waves]
        ids, labels = self.encode_conversation(rec.messages, counts)
        if self.max_text_tokens is not None and len(ids) > self.max_text_tokens:
            raise _SampleProblem(
                f"sequence has {len(ids)} tokens, more than max_text_tokens={self.max_text_tokens}"
            )
        windows = [w for wave, ref in zip(waves, rec.audios) for w in p.split_windows(wave, source=ref.path)]
        if windows:
            feats, mask = p.extract_features(windows)  # (w, 128, F), (w, F)
        else:
            frames = p.feature_extractor.nb_max_frames
            feats = torch.zeros((0, p.feature_size, frames), dtype=torch.float32)
            mask = torch.zeros((0, frames), dtype=torch.int32)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "input_features": feats,
            "input_features_mask": mask,
            "num_audio_tokens": int(sum(counts)),
            "id": rec.id,
        }

    # ------------------------------------------------------------------ lengths for the sampler
    def estimate_lengths(self) -> list[int]:
        """Total tokens of every sample without decoding audio (see :func:`estimate_num_tokens`)."""
        return [estimate_num_tokens(r, self) for r in self.records]


def usable_samples(num_samples: int, chunk_length: float, max_audio_len: float, sampling_rate: int) -> int:
    """``num_samples`` minus a trailing remainder of <= 2 mel frames (<= 320 samples) that would form a window of
    0 audio tokens.

    The reference assigns such a zero-token window to the *next* audio of the batch when it rebuilds RoTE
    timestamps (and raises ``IndexError`` for the last audio), so a training batch must not contain one.
    """
    window = int(round(chunk_length * sampling_rate))
    n = int(num_samples)
    rest = n % window
    within_cap = n < int(max_audio_len // chunk_length) * window
    if n > window and rest and within_cap and tokens_from_frames(num_frames(rest)) < 1:
        return n - rest
    return n


def audio_duration(ref: AudioRef) -> float:
    """Seconds of audio a reference will yield: its ``duration`` if given, else ``soundfile.info`` minus the
    offset; 0.0 when the file cannot be inspected (it will fail, and be handled, when the sample is built)."""
    if ref.duration is not None:
        return ref.duration
    try:
        import soundfile as sf

        return max(0.0, float(sf.info(ref.path).duration) - ref.offset)
    except Exception:
        return 0.0


def estimate_num_tokens(record: Record, dataset: ConversationDataset) -> int:
    """Decoder tokens of a sample (text + audio placeholders), computed from the manifest without decoding audio.

    The text is tokenized as in ``dataset[i]`` and each audio contributes ``audio_token_count + 2`` (bos/eos), so
    the count is exact when the durations are (``duration`` fields, or file headers at 16 kHz); resampled files
    may differ by a token.
    """
    p = dataset.processor
    sizes = [int(math.ceil(audio_duration(a) * p.sampling_rate)) for a in record.audios]
    sizes = [usable_samples(n, p.chunk_length, p.max_audio_len, p.sampling_rate) for n in sizes]
    counts = [p.audio_token_count(n) for n in sizes]
    text = sum(len(piece) for piece, _, _ in dataset._pieces(record.messages))
    return text - len(counts) + sum(n + 2 for n in counts)
