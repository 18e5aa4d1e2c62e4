"""Manifest records -> model-ready samples (token ids, labels, log-mel windows), with bad-sample handling.

Ids and labels come from :class:`musicflamingo.chat.ChatEncoder`: by default only the assistant turns (content
and closing ``<|im_end|>``) are learned; ``train_on_prompt=True`` learns every non-audio, non-pad token (the
reference processor's convention). The ids equal ``processor.apply_chat_template`` for the same conversation
(tested).

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from musicflamingo.audio.io import AudioError, audio_duration, container_duration, load_audio
from musicflamingo.chat import Conversation
from musicflamingo.data.manifest import AudioRef, CompactRecords, JsonlRecords, Message, Record
from musicflamingo.errors import RunStopped

log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample cannot be built (under ``bad_sample_policy="error"``); names id, ``manifest:line`` and reason."""


class TooManyBadSamplesError(RunStopped, RuntimeError):
    """The share of skipped samples exceeded ``max_bad_fraction``."""


class _SampleProblem(ValueError):
    """Internal: a data problem that makes one sample unusable (as opposed to a bug)."""


@dataclass  # not frozen: Lightning's precision plugins rebuild dataclasses in a batch (apply_to_collection)
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

    def update(
        self, num_samples: int, bad: Sequence[BadSample], check: bool = True, log_new: bool = True
    ) -> None:
        """Record a batch that asked for ``num_samples`` samples of which ``bad`` were skipped (``log_new``: log
        each one not seen before)."""
        self.num_seen += int(num_samples)
        self.num_bad += len(bad)
        for b in bad:
            key = (b.source, b.index)
            if key not in self.bad:
                self.bad[key] = b
                if log_new:
                    log.warning("skipping bad sample %r (%s): %s", b.id, b.source, b.reason)
        if check:
            self.check()

    def update_from_batch(self, batch: dict[str, Any], check: bool = True) -> dict[str, Any]:
        """Pop ``num_samples``/``bad_samples`` from a collated batch, record them, return the batch."""
        bad = batch.pop("bad_samples", [])
        self.update(batch.pop("num_samples", len(batch.get("ids", [])) + len(bad)), bad, check=check)
        return batch

    def check(self, final: bool = False) -> None:
        """Raise when too many samples were bad; `final` (the run's end): however few were seen."""
        if (
            self.max_bad_fraction is None
            or not self.num_seen
            or (self.num_seen < self.min_seen and not final)
        ):
            return
        if self.bad_fraction > self.max_bad_fraction:
            first = next(iter(self.bad.values()), None)
            raise TooManyBadSamplesError(
                f"{self.num_bad} of {self.num_seen} samples were skipped ({self.bad_fraction:.1%}), more than "
                f"max_bad_fraction={self.max_bad_fraction:.1%}"
                + ("" if first is None else f"; first: {first.id!r} ({first.source}): {first.reason}")
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


# (audio path, offset) of the files this process has warned are cut to the kept seconds
_cut_warned: set[tuple[str, float]] = set()


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
    ) -> None:
        if bad_sample_policy not in ("error", "skip"):
            raise ValueError(f"bad_sample_policy must be 'error' or 'skip', got {bad_sample_policy!r}")
        if max_text_tokens is not None and max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1 or None, got {max_text_tokens}")
        # JsonlRecords (JSON lists: JsonListRecords) and CompactRecords stay as they are: compact, parsed on access (a list of records would take
        # gigabytes, copied into every DataLoader worker as reference counts touch it)
        self.records = records if isinstance(records, (JsonlRecords, CompactRecords)) else list(records)
        self.processor = processor
        self.train_on_prompt = train_on_prompt
        self.bad_sample_policy = bad_sample_policy
        self.max_text_tokens = max_text_tokens
        self.min_audio_seconds = float(min_audio_seconds)
        self.chat = processor.chat_encoder(train_on_prompt)

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
        ``<|sound_bos|>`` + ``<sound>`` * counts[i] + ``<|sound_eos|>`` (see :class:`~musicflamingo.chat.ChatEncoder`)."""
        return self.chat.encode(chat_messages(messages), audio_token_counts)

    # ------------------------------------------------------------------ audio
    def _decode(self, ref: AudioRef, source: str | None = None) -> np.ndarray:
        """Mono float32 [T] of ``ref`` at the processor's rate, only the kept windows decoded, from the file or
        from the bytes :meth:`_audio_bytes` gives; ``source`` (the record's ``file:line``) is named in the warning
        for a segment past the file's end."""
        p = self.processor
        key = (ref.path, ref.offset)  # warned once per file: not at each epoch, nor for each record of a song
        x = load_audio(
            ref.path,
            sampling_rate=p.sampling_rate,
            offset=ref.offset,
            duration=ref.duration,
            max_seconds=p.kept_seconds,
            data=self._audio_bytes(ref),
            source=source or None,
            warn_cut=key not in _cut_warned,
        )
        if x.shape[0] >= round(p.kept_seconds * p.sampling_rate) and len(_cut_warned) < 100_000:
            _cut_warned.add(key)  # as long as the kept seconds: it was cut (and warned about) or ends there
        return x

    def _audio_bytes(self, ref: AudioRef) -> bytes | None:
        """The encoded file of ``ref`` when it is already in memory (the shard dataset's), else None: read the file."""
        return None

    def _load(self, ref: AudioRef, source: str | None = None) -> np.ndarray:
        p = self.processor
        try:
            x = self._decode(ref, source)
        except AudioError as e:
            hint = relative_path_hint(ref.path, source) if str(e).endswith("audio file not found") else ""
            if hint:
                raise AudioError(f"{e} {hint}") from None
            raise
        if x.shape[0] < self.min_audio_seconds * p.sampling_rate:
            raise _SampleProblem(
                f"{ref.path}: audio lasts {x.shape[0] / p.sampling_rate:.3f} s, shorter than "
                f"min_audio_seconds={self.min_audio_seconds}"
            )
        x = x[: p.usable_samples(x.shape[0])]
        if p.audio_token_count(int(x.shape[0])) < 1:
            # a window of 0 audio tokens: RoTE's timestamps would go to the next audio (IndexError for the last)
            raise _SampleProblem(
                f"{ref.path}: audio lasts {x.shape[0] / p.sampling_rate:.3f} s ({x.shape[0]} samples), too short "
                "for one audio token"
            )
        return x

    def _build(self, rec: Record) -> dict[str, Any]:
        p = self.processor
        waves = [self._load(ref, rec.source) for ref in rec.audios]
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
            "source": rec.source,  # `file:line`: unique where ids need not be (GRPO finds the record by it)
        }

    # ------------------------------------------------------------------ lengths for the sampler
    def estimate_lengths(
        self, known: Sequence[int] | None = None, seconds: Mapping[int, Sequence[float]] | None = None
    ) -> list[int]:
        """Total tokens of every sample, decoding only audio of unknown length (see :func:`estimate_num_tokens`).

        ``known[i] >= 0`` is taken as sample i's count and ``seconds[i]`` as its audios' durations (both from a
        manifest index, :mod:`musicflamingo.data.index`): only the other samples are read and tokenized.
        """
        out = np.full(len(self), -1, dtype=np.int64) if known is None else np.array(known, dtype=np.int64)
        todo = np.flatnonzero(out < 0).tolist()
        seconds = seconds or {}
        # a progress bar only when it takes a while (~0.4 ms per record, more with audio headers to read)
        for i in tqdm(todo, desc="estimating lengths", unit="rec", disable=len(todo) < 20_000, mininterval=5):
            out[i] = estimate_num_tokens(self.records[i], self, seconds.get(i))
        return out.tolist()


def relative_path_hint(path: str, source: str | None) -> str:
    """For an audio file not found at ``path`` (resolved against the folder of the manifest that ``source``,
    ``manifest:line``, names), a sentence saying so when the path as written names a file from the working
    directory (a manifest written with paths relative to where it was made); else ""."""
    if not source or ":" not in source:
        return ""
    folder = Path(source.rsplit(":", 1)[0]).parent
    try:
        written = Path(path).relative_to(folder)
    except ValueError:  # resolved against data.audio_root, or absolute
        return ""
    if written.is_absolute() or not written.is_file():
        return ""
    return (
        f"(relative audio paths resolve against the manifest's folder, {folder}{os.sep}, not the working "
        f"directory, where {written} is a file: write paths relative to the manifest, or set data.audio_root)"
    )


def chat_messages(messages: Sequence[Message]) -> Conversation:
    """Manifest messages as chat messages (``{"role", "content"}`` dicts)."""
    return [{"role": m.role, "content": m.content} for m in messages]


def audio_seconds(
    path: str | os.PathLike, offset: float = 0.0, duration: float | None = None
) -> float | None:
    """Seconds of one manifest audio: its ``duration`` field, the file header, or for a file only ffmpeg reads (m4a,
    mka, webm, ...) its container's length (ffprobe); None when none tells (a missing or damaged file, a raw stream
    such as ADTS AAC)."""
    seconds = audio_duration(path, offset=offset, duration=duration)
    if seconds is None and os.path.isfile(os.path.expanduser(os.fspath(path))):
        whole = container_duration(path)  # soundfile cannot read it: ffmpeg's container may say
        seconds = None if whole is None else max(0.0, whole - offset)
    return seconds


def record_seconds(record: Record) -> list[float]:
    """Seconds of each audio of ``record`` (:func:`audio_seconds`); NaN when none tells (:func:`estimate_num_tokens`
    decodes those)."""
    out = []
    for ref in record.audios:
        seconds = audio_seconds(ref.path, ref.offset, ref.duration)
        out.append(math.nan if seconds is None else seconds)
    return out


# Seconds decoded at most, once, of an audio whose length nothing states (by the index build and the shard writer):
# a longer one is stored as exactly this long, a lower bound that counts exactly under every processor keeping at
# most this much (20 minutes by default); one keeping more decodes such an audio again (estimate_num_tokens)
DECODED_SECONDS_CAP = 3600.0


# decoded_seconds' results in this process (an index build's worker, a shard writer): (file, its size, mtime,
# device, inode and ctime, rate, offset, duration, cap) -> seconds, or the AudioError message of a file that does not
# decode
_decoded: dict[tuple, float | str] = {}
_DECODED_KEPT = 65536  # results held at most (a few MiB)


def decoded_seconds(
    path: str, sampling_rate: int, offset: float = 0.0, duration: float | None = None
) -> float:
    """Seconds of ``path`` (from ``offset``, ``duration`` at most) decoded at ``sampling_rate``, at most
    :data:`DECODED_SECONDS_CAP`: a value whose ``ceil(seconds * sampling_rate)`` gives back the decoded count of
    samples exactly (``n / rate * rate`` may round up past ``n``). Raises :class:`AudioError` when it does not
    decode. Each file is decoded once per process while it stays the same file (size, mtime, inode, ctime): the
    records of one song (a conversation per question) decoded an hour of raw AAC each, and warned each time."""
    try:
        st = os.stat(os.path.expanduser(path))
        # the inode and its change time too: a file replaced (os.replace, cp -p, an unpacked archive) may keep the
        # size and an mtime that was copied or set, never the inode and ctime of the file decoded
        key = (os.path.abspath(os.path.expanduser(path)), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
        key += (st.st_ctime_ns,)
        key += (sampling_rate, offset, duration, DECODED_SECONDS_CAP)
    except OSError:
        key = None  # missing: load_audio names it
    if key is not None and key in _decoded:
        known = _decoded[key]
        if isinstance(known, str):
            raise AudioError(known)
        return known
    try:
        n = int(
            load_audio(  # the cap bounds a measurement: no "keeping its first hour" warning (none is kept)
                path,
                sampling_rate=sampling_rate,
                offset=offset,
                duration=duration,
                max_seconds=DECODED_SECONDS_CAP,
                warn_cut=False,
            ).shape[0]
        )
    except AudioError as e:
        if key is not None:
            _remember(key, str(e))
        raise
    s = min(n / sampling_rate, DECODED_SECONDS_CAP)
    while math.ceil(s * sampling_rate) > n:
        s = math.nextafter(s, 0.0)
    if key is not None:
        _remember(key, s)
    return s


def _remember(key: tuple, value: float | str) -> None:
    if len(_decoded) >= _DECODED_KEPT:
        _decoded.clear()
    _decoded[key] = value


def estimate_num_tokens(
    record: Record, dataset: ConversationDataset, seconds: Sequence[float] | None = None
) -> int:
    """Decoder tokens of a sample (text + audio placeholders), computed from the manifest, decoding only the audio
    whose length nothing else states.

    The text is tokenized as in ``dataset[i]`` and each audio contributes ``audio_token_count + 2`` (bos/eos), so
    the count is exact when the durations are (``duration`` fields, or file headers at 16 kHz); resampled files
    and container lengths may differ by a token. ``seconds``: the audios' durations (:func:`record_seconds`) when
    already known; an unknown one (NaN) is decoded as ``dataset[i]`` decodes it (up to the kept seconds), and counts
    as no audio only when that fails (the sample is then a bad one when built); so is one stored as
    :data:`DECODED_SECONDS_CAP` (a lower bound) when the processor keeps more. Counting an audio of unknown length
    as none let an m4a clip of thousands of tokens pass the batch budget and fill packed rows far past it.
    """
    p = dataset.processor
    seconds = record_seconds(record) if seconds is None else seconds
    sizes = []
    for ref, s in zip(record.audios, seconds):
        if math.isnan(s):
            n = _decoded_samples(dataset, ref)
        elif s == DECODED_SECONDS_CAP and p.kept_seconds > s:  # "at least this long": decoded, else the bound
            n = _decoded_samples(dataset, ref) or int(math.ceil(s * p.sampling_rate))
        else:  # capped at what the windows keep (the same count), so an absurd duration cannot overflow the int
            n = int(math.ceil(min(s, p.kept_seconds) * p.sampling_rate))
        sizes.append(p.usable_samples(n))
    counts = [p.audio_token_count(n) for n in sizes]
    return dataset.chat.num_tokens(chat_messages(record.messages), counts)


def _decoded_samples(dataset: ConversationDataset, ref: AudioRef) -> int:
    """Samples of ``ref`` that ``dataset[i]`` decodes (up to the kept seconds); 0 when it cannot be decoded, or when
    its bytes are not a local file's (shards: no audio is fetched for an estimate)."""
    if type(dataset)._audio_bytes is not ConversationDataset._audio_bytes:
        return 0
    try:
        return int(dataset._decode(ref).shape[0])
    except Exception:  # an estimate: the sample reports its own problem when it is built
        return 0
