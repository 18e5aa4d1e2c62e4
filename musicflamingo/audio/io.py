"""Audio decoding: file or in-memory array -> 16 kHz mono float32 numpy, with clear errors.

Files are read with ``soundfile`` (wav, flac, ogg, mp3 and whatever libsndfile knows), seeking near ``offset`` and
reading only the requested frames (and a margin for the resampler), a block at a time, each averaged to mono and
resampled as it comes (a 20-min file holds its output, not its channels); other formats (and a header that gives no
length, or a wrong one: a VBR MP3 without a Xing frame) fall back to ``torchcodec`` when installed, then to the
``ffmpeg`` command line. Multi-channel audio is averaged to mono; resampling uses ``soxr`` at high quality (as the
reference's soundfile path does), for what ffmpeg decodes too.
Every problem raises :class:`AudioError` (a ``ValueError``) naming the source and what is wrong.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
ONE_MEL_FRAME = 160  # samples at 16 kHz; an audio needs 321 samples (3 frames) for one audio token


class AudioError(ValueError):
    """Audio that cannot be used: missing, undecodable, empty, non-finite or too short."""


def _as_float(x: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1]; floats pass through."""
    if np.issubdtype(x.dtype, np.floating):
        return x
    if np.issubdtype(x.dtype, np.unsignedinteger):  # unsigned PCM (8-bit WAV) is centred on half its range
        half = float(2 ** (8 * x.dtype.itemsize - 1))
        return ((x.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    if x.dtype == np.bool_:
        raise TypeError("boolean arrays are not audio")
    raise TypeError(f"unsupported sample dtype {x.dtype}")


def channel_mean(frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``frames.mean(axis=1)`` of ``[T, C]`` float32/float64 frames, bit for bit, as mono ``[T]`` (in ``out`` if
    given).

    numpy's mean over the short channel axis runs one tiny inner loop per frame: 5 s of the 16 s a 20-min stereo WAV
    took to load. Summing column by column is ~5x faster and adds in the same order, which is numpy's below 8
    channels (from 8 on it sums pairwise, so np.mean is kept there)."""
    channels = frames.shape[1]
    if channels >= 8 or frames.dtype not in (np.float32, np.float64):
        return np.mean(frames, axis=1, out=out)
    out = np.empty(frames.shape[0], frames.dtype) if out is None else out
    np.copyto(out, frames[:, 0])
    for c in range(1, channels):
        out += frames[:, c]
    out /= channels
    return out


def validate_waveform(x: np.ndarray | torch.Tensor, name: str = "audio", min_samples: int = 1) -> np.ndarray:
    """Check an in-memory waveform and return it as contiguous float32 mono ``[T]``.

    Accepts ``[T]``, ``[C, T]`` or ``[T, C]`` (at most 8 channels, averaged), float or integer PCM, numpy or torch.
    Raises :class:`AudioError` naming ``name`` when it is empty, has NaN/inf, or has fewer than ``min_samples``.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype in (torch.bfloat16, torch.float16) else x.numpy()
    try:
        x = _as_float(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise AudioError(f"{name}: not a waveform ({e})") from None
    if x.ndim == 2:
        if x.shape[0] <= 8 and x.shape[0] <= x.shape[1]:
            x = x.mean(axis=0)
        elif x.shape[1] <= 8:
            x = channel_mean(x)
        else:
            raise AudioError(f"{name}: 2-D audio must be [channels, time] or [time, channels], got {x.shape}")
    elif x.ndim != 1:
        raise AudioError(f"{name}: expected a mono waveform [T] (or [C, T]), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argmax(bad))
        raise AudioError(
            f"{name}: audio has {int(bad.sum())} non-finite samples (NaN or inf), first at sample {first}"
        )
    if x.shape[0] < min_samples:
        raise AudioError(f"{name}: audio has {x.shape[0]} samples, fewer than the {min_samples} required")
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``soxr`` resampling of ``[T]`` float32 at its high quality, the reference's (``transformers.audio_utils``
    reading a file with soundfile, as ``librosa.load``): the same waveform, so the same features, from any file;
    output has ``ceil(T * target / orig)`` samples."""
    if orig_sr == target_sr:
        return x
    import soxr

    n_out = -(-x.shape[0] * target_sr // orig_sr)
    y = soxr.resample(x, orig_sr, target_sr, quality="HQ")
    if y.shape[0] >= n_out:  # a view: np.pad copied the 20-min output once more
        return y[:n_out]
    return np.pad(y, (0, n_out - y.shape[0]))


class _Resampled:
    """:func:`resample`'s output samples ``[lo, hi)`` (``hi`` None: to the end) of a ``[T]`` float32 signal given a
    block at a time: soxr streams at the same high quality, and its output does not depend on how the input is cut,
    so the samples are the one-call ones, without holding the whole input."""

    def __init__(self, orig_sr: int, target_sr: int, lo: int = 0, hi: int | None = None) -> None:
        import soxr

        self.rates, self.lo = (orig_sr, target_sr), lo
        # past the output's end: resample's zero padding
        self.out = None if hi is None else np.zeros(hi - lo, np.float32)
        self.pieces: list[np.ndarray] = []  # without `hi`: the kept output as it came
        self.done = 0  # output samples given so far
        self.stream = soxr.ResampleStream(orig_sr, target_sr, 1, dtype="float32", quality="HQ")

    def add(self, x: np.ndarray, last: bool = False) -> None:
        y = self.stream.resample_chunk(x, last=last)
        if self.out is None:
            self.pieces.append(y[max(0, self.lo - self.done) :])
        else:
            a, b = max(self.done, self.lo), min(self.done + y.shape[0], self.lo + self.out.shape[0])
            if a < b:
                self.out[a - self.lo : b - self.lo] = y[a - self.done : b - self.done]
        self.done += y.shape[0]

    def samples(self, n_in: int) -> np.ndarray:
        """The kept samples, for an input of ``n_in`` samples (resample's output length: ``ceil(n_in * target /
        orig)``)."""
        n_out = max(0, -(-n_in * self.rates[1] // self.rates[0]) - self.lo)
        if self.out is not None:
            return self.out[: min(self.out.shape[0], n_out)]
        y = np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32)
        return y[:n_out] if y.shape[0] >= n_out else np.pad(y, (0, n_out - y.shape[0]))


# A header outside this range is corrupt or hostile: a 40 kB WAV claiming 1 Hz would resample to 320 M samples.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
# Source seconds read past a cap, so the resampler's filter sees the same samples around the cut as a full read.
_CAP_MARGIN = 0.5
# Bytes of float32 channels read at a time (and averaged to mono) from a file soundfile decodes.
_READ_BLOCK_BYTES = 1 << 23


def check_sample_rate(name: str, rate: int) -> None:
    """AudioError naming the file unless ``MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE``."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz (a corrupt header?)"
        )


class _NoLength(Exception):
    """soundfile opened the file but its header gives no length (0 frames), or a wrong one (an MP3 without a
    Xing/Info/VBRI frame, whose length libsndfile guesses from the first frame's bit rate and then reads no
    further): the other decoders read the whole file."""


class _Damaged(Exception):
    """soundfile read the header but stopped in the frames (a truncated or damaged file). ``partial``: what it
    decoded before it stopped, as ``_decode_soundfile`` returns it, where kept when no other decoder reads more."""

    def __init__(self, message: str, partial: tuple[np.ndarray, int] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


# MPEG audio frame headers: kbit/s by [MPEG-1?][layer] and index 1-14; Hz by version (3: MPEG-1, 2: 2, 0: 2.5).
_MP3_KBPS = {
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frame(buf, pos: int) -> tuple[int, int] | None:
    """(bytes, samples) of the MPEG audio frame whose header starts at ``pos``; None when none does (or it is
    free-format)."""
    if pos + 4 > len(buf) or buf[pos] != 0xFF or buf[pos + 1] & 0xE0 != 0xE0:
        return None
    version, layer = (buf[pos + 1] >> 3) & 3, 4 - ((buf[pos + 1] >> 1) & 3)  # layer 4: reserved
    rate_index, kbps_index = (buf[pos + 2] >> 2) & 3, buf[pos + 2] >> 4
    if version == 1 or layer == 4 or rate_index == 3 or kbps_index in (0, 15):
        return None
    mpeg1 = version == 3
    bits, rate = _MP3_KBPS[mpeg1, layer][kbps_index - 1] * 1000, _MP3_RATES[version][rate_index]
    pad = (buf[pos + 2] >> 1) & 1
    if layer == 1:
        return (12 * bits // rate + pad) * 4, 384
    per_frame = 576 if layer == 3 and not mpeg1 else 1152
    return per_frame // 8 * bits // rate + pad, per_frame


def _mp3_scanned_frames(buf) -> int | None:
    """Samples per channel that the MPEG frames of an MP3 hold, counted from their headers, when its first frame
    is no Xing/Info/VBRI frame (the length libsndfile reports is then a guess); None when it is one (libsndfile's
    length is exact) or no run of frames is found."""
    pos = 0
    if (
        buf[:3] == b"ID3" and len(buf) >= 10
    ):  # ID3v2: a 10-byte header, a syncsafe size, maybe a 10-byte footer
        pos = 10 + sum((buf[6 + i] & 0x7F) << (7 * (3 - i)) for i in range(4)) + (10 if buf[5] & 0x10 else 0)
    start = None
    for at in range(
        pos, min(len(buf), pos + 65536)
    ):  # the first frame followed by another (as decoders sync)
        first = _mp3_frame(buf, at)
        if first is not None and _mp3_frame(buf, at + first[0]) is not None:
            start = at
            break
    if start is None:
        return None
    head = bytes(buf[start : start + _mp3_frame(buf, start)[0]])
    if b"Xing" in head or b"Info" in head or b"VBRI" in head:
        return None
    samples, at = 0, start
    while (frame := _mp3_frame(buf, at)) is not None:
        samples, at = samples + frame[1], at + frame[0]
    return samples


def _check_mp3_length(path: str, data: bytes | None, frames: int, sr: int) -> int | None:
    """:class:`_NoLength` when the frames of an MP3 without a length frame hold another length than libsndfile's
    guess (a VBR file: libsndfile stops at its guess, a third of the song, say); else the samples its frames hold
    (None where a length frame gives libsndfile the length)."""
    import mmap

    if data is not None:
        counted = _mp3_scanned_frames(data)
    else:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            counted = _mp3_scanned_frames(buf)
    if counted is not None and abs(counted - frames) > max(4 * 1152, counted // 100):
        raise _NoLength(
            f"an MP3 without a Xing/VBRI length frame: libsndfile guesses {frames / sr:.2f} s, "
            f"its frames hold {counted / sr:.2f} s"
        )
    return counted


def _promised_frames(f) -> int | None:
    """Frames that the header of a WAV/AIFF (``f``, open) says it holds when the file holds fewer (libsndfile then
    reads what is there, and logs the header's size next to the file's); None when it says nothing of the kind (or
    a size of 0xFFFFFFFF: a WAV written to a pipe, its size unknown)."""
    log = f.extra_info
    said = re.search(r"'COMM' chunk \((\d+)\) not equal|'ds64' chunk of (\d+)", log)
    if said:
        return int(said.group(1) or said.group(2))
    said = re.search(r"^ *data : (\d+) \(should be (\d+)\)", log, re.M)
    if said and 0 < int(said.group(2)) < int(said.group(1)) < 0xFFFFFFFF:
        return int(f.frames * int(said.group(1)) / int(said.group(2)))  # the data chunk's bytes, as frames
    return None


# Openings of formats libsndfile reads with decoders of its own: no libmpg123 behind them
_NOT_MPEG = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM", b"caff", b"wvpk", b".snd")
# what libmpg123 prints: "Note: Illegal Audio-MPEG-Header ...", "[src/libmpg123/parse.c:wetwork():1349] error: ..."
_MPG123_LINE = re.compile(
    r"(Note: (Illegal Audio-MPEG-Header|Trying to resync|Skipped \d+ bytes|Hit end of)"
    r"|\[[^\]]*mpg123[^\]]*\] |\[[^\]]*\.c:\w+\(\):\d+\] )"
)
_stderr_lock = threading.Lock()  # fd 2 is the process's: one capture at a time


def _new_stderr_lock() -> None:  # a process forked while another thread held it would wait for it for ever
    global _stderr_lock
    _stderr_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_stderr_lock)


@contextlib.contextmanager
def _mpg123_notes(path: str, data: bytes | None = None) -> Iterator[list[str]]:
    """Capture what libmpg123 (libsndfile's MP3 decoder) prints on C's stderr while the block runs: a damaged MP3
    printed its resync notes at every header read and every decode (thousands of lines for a folder of bad
    files), beside our own warning naming the file. The list yielded is filled with its lines at exit; anything
    else written to stderr meanwhile (another thread's log) is written there after. A file that opens as another
    format libsndfile reads (WAV, FLAC, Ogg, AIFF) is not captured, nor a read outside the main thread: fd 2 is the
    process's, so captures take turns, and serve's decoding threads would decode one MP3 at a time."""
    notes: list[str] = []
    if data is not None:
        head = data[:4]
    else:
        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError:
            head = b""
    if head in _NOT_MPEG or threading.current_thread() is not threading.main_thread():
        yield notes
        return
    with _stderr_lock, contextlib.ExitStack() as stack:
        try:  # no stderr to capture, or no temporary file: libmpg123 prints as it did
            tmp = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except OSError:
            yield notes
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:  # dup2 inside: an interrupt landing right after it still gives fd 2 back
            os.dup2(tmp.fileno(), 2)
            yield notes
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            others = []  # written back as they came: bytes (not UTF-8 decoded), every one of them
            for line in tmp.read().splitlines(keepends=True):
                text = line.decode(errors="replace")
                if _MPG123_LINE.match(text):
                    notes.append(text.strip())
                else:
                    others.append(line)
            rest = b"".join(others)
            with contextlib.suppress(OSError):  # a stderr gone (a closed pipe) does not fail the decode
                while rest:
                    rest = rest[os.write(2, rest) :]


def _read_soundfile(
    path: str, offset: float, seconds: float | None, target: int, data: bytes | None = None
) -> tuple[np.ndarray, int]:
    """:func:`_decode_soundfile` with libmpg123's notes captured (:func:`_mpg123_notes`): a file it resynced in is
    named once in a warning (the first note with it), not in a note per bad frame; one it gave up in is
    :class:`_Damaged` (ffmpeg decodes it), the note in the reason."""
    error: Exception | None = None
    with _mpg123_notes(path, data) as notes:
        try:
            x, left = _decode_soundfile(path, offset, seconds, target, data)
        except (_NoLength, AudioError):
            raise
        except Exception as e:  # _Damaged, or libsndfile refusing to open it
            error = e
    if isinstance(error, _Damaged):
        said = f"{error}; libmpg123: {notes[0]}" if notes else str(error)
        raise _Damaged(said, error.partial) from None
    if error is not None and notes:
        # libsndfile said "File does not exist" of a file whose first frames are bad
        raise _Damaged(f"libmpg123: {notes[0]}") from None
    if error is not None:
        raise error
    if notes:
        logger.warning(
            "Audio %s is damaged: its MP3 decoder skipped bad frames (%d notes, first: %s); decoded %.2f s.",
            path,
            len(notes),
            notes[0],
            x.shape[0] / target,
        )
    return x, left


def _decode_soundfile(
    path: str, offset: float, seconds: float | None, target: int, data: bytes | None = None
) -> tuple[np.ndarray, int]:
    """Mono float32 at ``target`` Hz of ``[offset, offset + seconds)`` (``None``: to the end) and how many samples
    at ``target`` Hz the file holds from ``offset`` to its end (its header's length). ``data``: the file's bytes
    (``path`` names them).

    The span is taken on the ``target`` grid of the whole file decoded and resampled: samples
    ``round(offset * target)`` on, ``round(seconds * target)`` of them. Only the frames around it are read: at
    another rate, ``_CAP_MARGIN`` s more on each side, starting on a frame that falls on the ``target`` grid, so
    that the resampler's filter sees what it sees in a full decode and the samples equal that decode's (not the
    edges of a segment resampled on its own). Raises :class:`_NoLength` when the header gives no length
    (libsndfile then reads nothing)."""
    import soundfile as sf

    with sf.SoundFile(path if data is None else io.BytesIO(data)) as f:
        sr, frames = f.samplerate, f.frames
        check_sample_rate(path, sr)
        if frames <= 0:
            raise _NoLength("the header gives a length of 0 frames")
        # an MP3 without a length frame: the samples its frames hold (libsndfile's length is a guess near it)
        counted = _check_mp3_length(path, data, frames, sr) if f.format == "MP3" else None
        if offset * sr >= frames:  # compared as floats: a huge offset does not overflow
            raise AudioError(
                f"{path}: offset {offset:.3f} s is past the end of the audio ({frames / sr:.3f} s)"
            )
        n_full = -(-frames * target // sr)  # the whole file's length at `target` (the resampler's)
        out_start = min(int(round(offset * target)), n_full)
        # a request past the end reads to the end (and does not overflow)
        whole = seconds is None or seconds * target >= n_full - out_start
        out_end = n_full if whole else out_start + int(round(seconds * target))
        if sr == target:
            first, last = out_start, out_end
        else:
            grid = sr // math.gcd(sr, target)  # frames between two frames that fall on the target grid
            margin = int(math.ceil(_CAP_MARGIN * sr))
            first = max(0, (out_start * sr // target - margin) // grid * grid)
            last = min(frames, -(-out_end * sr // target) + margin)
        if first:  # not seek(0): libmpg123 then decodes an mp3 1e-7 off the reference's read
            f.seek(first)
        # Read in blocks, each averaged to mono ([T, C] -> [T]: the same float32 means as one read) and resampled
        # as it comes: 20 min of 48 kHz 5.1 held 1.4 GB of channels, then 230 MB of mono, at once; now the output.
        n_in = last - first
        block = np.empty((min(n_in, _READ_BLOCK_BYTES // (4 * f.channels)), f.channels), np.float32)
        if sr == target:
            x, out = np.empty(n_in, np.float32), None
        else:
            skip = first * target // sr  # exact: `first` is on the target grid
            out, mono = (
                _Resampled(sr, target, out_start - skip, out_end - skip),
                np.empty(len(block), np.float32),
            )
        # the frames of the span itself; those around it are the resampler's margin, outside what was asked
        span = (out_start * sr // target, -(-out_end * sr // target))
        got, bad, bad_at = 0, 0, -1  # non-finite samples: counted, the first named in the file
        try:
            while got < n_in:
                ask = min(n_in - got, block.shape[0])
                part = f.read(ask, out=block[:ask])
                m = (x[got:] if out is None else mono)[: part.shape[0]]
                channel_mean(part, out=m)
                nonfinite = ~np.isfinite(m)
                if nonfinite.any():
                    at = first + got + np.flatnonzero(nonfinite)  # in the file
                    inside = (at >= span[0]) & (at < span[1])
                    # a NaN in the margin is not the span's: heard as silence, it cannot spread into its edges
                    m[at[~inside] - first - got] = 0.0
                    if inside.any():
                        bad_at = int(at[inside][0]) if not bad else bad_at
                        bad += int(inside.sum())
                got += part.shape[0]
                if out is not None and not bad:
                    out.add(m, last=got == n_in or part.shape[0] < ask)
                if part.shape[0] < ask:
                    break
        except Exception as e:  # a FLAC cut short: "lost sync"; ffmpeg decodes what is there
            raise _Damaged(f"{e} (its header says {frames / sr:.2f} s)") from None
        # A WAV or AIFF cut short: libsndfile takes the length the file holds, its log the one the header says.
        promised = _promised_frames(f) if whole else None
        mp3 = f.format == "MP3"
    # a healthy MP3 without a Xing frame (a CBR encode): libsndfile's guess overshoots the frames (by 0.3 s on a
    # minute), and the decode that ends where its frames end is the whole file, not one libmpg123 gave up in
    complete = counted is not None and first + got >= counted - sr // 10
    if mp3 and n_in - got > sr // 10 and not complete:
        # libmpg123 gave up at a damaged frame (ffmpeg resyncs past it), or a download was cut
        partial = (x[:got] if out is None else out.samples(got), n_full - out_start)
        at = f"it stopped at {(first + got) / sr:.2f} s (its header says {frames / sr:.2f} s)"
        raise _Damaged(at, partial)
    if n_in - got > sr // 10 and not complete:  # a download cut short: the header promises more than decodes
        promised = frames
    if complete:  # the length from `offset` to the end is the frames', not the guess
        n_full = max(out_start, min(n_full, -(-counted * target // sr)))
    if promised is not None and promised - (first + got) > sr // 10:
        logger.warning(
            "Audio %s is truncated or damaged: its header says %.2f s, its frames from %.2f s end at %.2f s.",
            path,
            promised / sr,
            first / sr,
            (first + got) / sr,
        )
    if bad:  # named in the file, before resampling spreads it
        raise AudioError(
            f"{path}: audio has {bad} non-finite samples (NaN or inf), first at {bad_at / sr:.3f} s "
            f"(sample {bad_at} at {sr} Hz)"
        )
    x = x[:got] if out is None else out.samples(got)
    return x, n_full - out_start


def _read_torchcodec(path: str, offset: float, seconds: float | None, sr: int) -> np.ndarray:
    from torchcodec.decoders import AudioDecoder  # optional dependency

    dec = AudioDecoder(path, sample_rate=sr)
    source_rate = getattr(getattr(dec, "metadata", None), "sample_rate", None)
    if source_rate is not None:
        check_sample_rate(path, int(source_rate))
    stop = None if seconds is None else offset + seconds
    samples = dec.get_samples_played_in_range(start_seconds=offset, stop_seconds=stop)
    return samples.data.mean(dim=0).numpy().astype(np.float32)


def _read_ffmpeg(path: str, offset: float, seconds: float | None, sr: int) -> np.ndarray:
    """The ``ffmpeg`` command line decodes at the file's own rate and channels (a WAV on its stdout, read as it
    comes); the channels are averaged and soxr takes it to ``sr`` as ``resample`` does, a block at a time, as the
    soundfile path does. (ffmpeg's own ``-ac 1`` gives (L + R) / sqrt(2) for stereo and drops the LFE of 5.1; its
    resampler is not soxr.) ``offset`` 0 is no seek: ``-ss 0`` dropped a Matroska file's first samples."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed")
    cmd = [exe, "-nostdin", "-v", "error"] + (["-ss", f"{offset:.6f}"] if offset > 0 else []) + ["-i", path]
    if seconds is not None:
        cmd += ["-t", f"{seconds:.6f}"]
    cmd += ["-vn", "-sn", "-dn", "-map_metadata", "-1", "-c:a", "pcm_f32le", "-f", "wav", "-"]
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: thousands of decoder warnings cannot block it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        try:
            channels, rate = _wav_stream_format(proc.stdout)
            if channels is not None:
                check_sample_rate(path, rate)
                blocks = _wav_stream_blocks(proc.stdout, channels)  # [T] mono float32 each
                if rate == sr:
                    y = np.concatenate([np.zeros(0, np.float32), *blocks])
                else:
                    out, n_in = _Resampled(rate, sr), 0
                    for block in blocks:
                        out.add(block)
                        n_in += block.shape[0]
                    out.add(np.zeros(0, np.float32), last=True)
                    y = out.samples(n_in)
        finally:
            proc.stdout.close()
            status = proc.wait()
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    if status != 0 or channels is None:
        msg = lines[-1] if lines else f"ffmpeg exited with status {status}"
        if "does not contain any stream" in msg or "matches no streams" in msg:
            msg = "no audio stream in the file"
        raise RuntimeError(msg.removeprefix(path + ": "))
    return y if seconds is None else y[: int(round(seconds * sr))]


def _wav_stream_format(stream) -> tuple[int | None, int]:
    """(channels, rate) of the 32-bit float WAV that ffmpeg writes to a pipe (its sizes unknown there: the data
    runs to the end), read up to its data; (None, 0) when no WAV came."""
    head = stream.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None, 0
    channels = rate = None
    while True:
        chunk = stream.read(8)
        if len(chunk) < 8:
            return None, 0
        size = int.from_bytes(chunk[4:8], "little")
        if chunk[:4] == b"data":
            break
        body = stream.read(size + (size & 1))
        if chunk[:4] == b"fmt ":
            channels, rate = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little")
    return (channels, rate) if channels else (None, 0)


def _wav_stream_blocks(stream, channels: int) -> Iterator[np.ndarray]:
    """The rest of that WAV's data, averaged to mono float32 a block at a time."""
    frame = 4 * channels
    rest = b""
    while block := stream.read(1 << 20):
        block = rest + block
        cut = len(block) - len(block) % frame
        rest = block[cut:]
        yield channel_mean(np.frombuffer(block[:cut], "<f4").reshape(-1, channels))


def load_audio(
    path: str | os.PathLike,
    sampling_rate: int = SAMPLING_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    min_samples: int = 1,
    max_seconds: float | None = None,
    data: bytes | None = None,
    source: str | None = None,
    warn_cut: bool = True,
) -> np.ndarray:
    """Decode ``[offset, offset + duration)`` seconds of an audio file to mono float32 ``[T]`` at ``sampling_rate``.

    Args:
        path: audio file (wav/flac/ogg/mp3 via soundfile; other formats via torchcodec or ffmpeg).
        sampling_rate: output rate (soxr HQ resampling when the file differs).
        offset: start in seconds.
        duration: length in seconds; ``None`` reads to the end.
        min_samples: raise when fewer samples come out (``ONE_MEL_FRAME`` = 160 asks for one mel frame).
        max_seconds: keep at most this many seconds (the processor's kept windows), applied before decoding and
            resampling: only those frames are read (plus ``_CAP_MARGIN`` s for the resampler, then cut), so a
            3-hour file costs what its first minutes do. A cut logs one warning naming the file.
            A segment (``offset``, ``duration``, the cap) holds the samples of the whole file decoded and
            resampled, cut at ``round(offset * sampling_rate)`` (files soundfile reads).
        data: the file's bytes as encoded (e.g. read from a shard); ``path`` then only names it in messages.
            Decoded exactly as the file would be.
        source: where the segment was asked for (a manifest's ``file:line``), named beside the file when the segment
            runs past the file's end.
        warn_cut: log the cut to ``max_seconds`` (False where the cap is a bound on a measurement, not audio kept).

    Raises:
        AudioError: missing or undecodable file, a sample rate outside 1-384 kHz, bad offset/duration, empty or
            non-finite audio, too short.
    """
    name = os.fspath(path)
    if offset < 0 or not np.isfinite(offset):
        raise AudioError(f"{name}: offset must be a finite number >= 0 s, got {offset}")
    if duration is not None and (duration <= 0 or not np.isfinite(duration)):
        raise AudioError(f"{name}: duration must be > 0 s or None, got {duration}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}")
    p = Path(name)
    if data is None:  # "~/song.mp3" as a shell would read it (Hydra passes it quoted); messages keep `name`
        p = p.expanduser()
    if data is None and not p.exists():
        raise AudioError(f"{name}: audio file not found")
    if data is None and not p.is_file():
        raise AudioError(f"{name}: not a regular file")
    if data is not None and not data:
        raise AudioError(
            f"{name}: no audio bytes (the file was missing or empty when the shards were written)"
        )
    if data is None and p.stat().st_size == 0:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    capped = max_seconds is not None and (duration is None or duration > max_seconds)
    keep = int(round(max_seconds * sampling_rate)) if capped else None
    errors, left = [], None  # left: samples from `offset` to the end, by the header
    try:
        # cut to `max_seconds` on the target grid; the reader adds its own margin for the resampler
        x, left = _read_soundfile(str(p), offset, max_seconds if capped else duration, sampling_rate, data)
    except AudioError:
        raise
    except Exception as e:  # libsndfile cannot decode it (or finds no length): try the other decoders
        errors.append(f"soundfile: {e}")
        x = None
        seconds = max_seconds + _CAP_MARGIN if capped else duration  # cut below, after resampling
        for reader in (_read_torchcodec, _read_ffmpeg):
            try:
                if data is None:
                    x = reader(str(p), offset, seconds, sampling_rate)
                else:  # these decoders read files: bytes go through a temporary one with the same suffix
                    with tempfile.NamedTemporaryFile(suffix=p.suffix) as tmp:
                        tmp.write(data)
                        tmp.flush()
                        x = reader(tmp.name, offset, seconds, sampling_rate)
                break
            except AudioError:
                raise
            except ImportError:
                errors.append(f"{reader.__name__[6:]}: not installed")
            except Exception as e2:
                errors.append(f"{reader.__name__[6:]}: {e2}")
        asked = None if seconds is None else seconds * sampling_rate  # what the other decoders were asked for
        if x is not None and asked is not None and x.shape[0] < asked - sampling_rate // 10:
            left = x.shape[0]  # they reached the file's end: the length after `offset`, as a header gives it
        if x is not None and isinstance(e, _Damaged):
            logger.warning(
                "Audio %s is truncated or damaged: soundfile stopped reading it (%s); ffmpeg decoded %.2f s.",
                name,
                e,
                x.shape[0] / sampling_rate,
            )
        if x is None and isinstance(e, _Damaged) and e.partial is not None:
            x, left = e.partial  # what libmpg123 decoded before it stopped, as before ffmpeg was asked
            logger.warning(
                "Audio %s is truncated or damaged: soundfile stopped reading it (%s) and no other decoder read it "
                "(%s); keeping the %.2f s decoded.",
                name,
                e,
                "; ".join(errors[1:]),
                x.shape[0] / sampling_rate,
            )
        if x is None and isinstance(e, _NoLength) and not str(e).startswith("an MP3"):
            others = "; ".join(errors[1:])  # a header saying 0 frames, and no other decoder
            raise AudioError(f"{name}: audio is empty (0 samples by its header; {others})") from None
        if x is None:
            # libsndfile's message repeats the path, and says an MP3 it cannot parse "does not exist"
            said = [m.replace(f"Error opening {str(p)!r}: ", "") for m in errors]
            # a shard's bytes: "Error opening <_io.BytesIO object at 0x7f0e...>: " names a buffer, not the file
            said = [re.sub(r"Error opening <_io\.BytesIO object at 0x[0-9a-fA-F]+>: ", "", m) for m in said]
            said = [
                "soundfile: not a format it reads"
                if "File does not exist or is not a regular file" in m
                else m
                for m in said
            ]
            raise AudioError(f"{name}: cannot decode audio ({'; '.join(said)})") from None
    wanted = None if duration is None else min(duration, max_seconds) if capped else duration
    if wanted is not None and left is not None and left < wanted * sampling_rate - sampling_rate // 10:
        # a manifest's segment past the file's end (by its header, or where ffmpeg's decoding stopped)
        logger.warning(
            "Audio %s: the segment [%g, %g) s runs past the end of the audio (%.2f s): keeping [%g, %.2f) s.",
            name if source is None else f"{name} ({source})",
            offset,
            offset + duration,
            offset + left / sampling_rate,
            offset,
            offset + left / sampling_rate,
        )
    if capped and (x.shape[0] > keep or (left is not None and left > keep)):
        known = [s for s in (duration, None if left is None else left / sampling_rate) if s is not None]
        length = f"{min(known):.1f} s" if known else f"more than {max_seconds:g} s"
        if warn_cut:
            logger.warning("Audio %s lasts %s: keeping its first %g s.", name, length, max_seconds)
        x = x[:keep]
    if x.shape[0] == 0:
        # The span is named when it is what holds nothing: not for a file empty from 0 s, whatever was asked
        # (serve reads a file of unknown length as [0, limit + 1) s)
        under_a_sample = duration is not None and duration * sampling_rate < 0.5
        where = ""
        if offset or under_a_sample:
            where = f" in [{offset}, {offset + duration}) s" if duration is not None else f" after {offset} s"
        raise AudioError(f"{name}: audio is empty (0 samples{where})")
    return validate_waveform(x, name=name, min_samples=min_samples)


def audio_duration(
    path: str | os.PathLike, offset: float = 0.0, duration: float | None = None
) -> float | None:
    """Seconds that ``load_audio(path, offset=offset, duration=duration)`` will yield, from the file header
    (soundfile: wav, flac, ogg, mp3): ``duration`` when given (the file is not opened), else the length after
    ``offset`` (>= 0). ``None`` when soundfile cannot tell (other formats, a missing or damaged file, a sample
    rate outside 1-384 kHz, an MP3 whose frames hold another length than libsndfile guesses): a cheap estimate,
    not a check; callers pick what unknown means for them."""
    if duration is not None:
        return float(duration)
    import soundfile as sf

    try:
        with _mpg123_notes(os.path.expanduser(os.fspath(path))):  # the decode names a damaged file
            info = sf.info(os.path.expanduser(os.fspath(path)))
    except Exception:  # whatever libsndfile refuses; load_audio reports real problems later
        return None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE or info.frames <= 0:
        return None
    if info.format == "MP3":
        try:  # without a Xing/VBRI frame libsndfile's length is a guess: a VBR file's is wrong
            _check_mp3_length(os.path.expanduser(os.fspath(path)), None, info.frames, info.samplerate)
        except Exception:  # _NoLength, or the file changed under us
            return None
    return max(0.0, info.frames / info.samplerate - offset)


# ffmpeg formats whose length ffprobe estimates from the bit rate (raw streams, no container): no length said
_ESTIMATED_FORMATS = frozenset({"aac", "ac3", "eac3", "dts", "mp3", "mp2", "truehd", "mlp"})


def container_duration(path: str | os.PathLike, timeout: float = 10.0) -> float | None:
    """Seconds that the container of a file soundfile cannot read (m4a, mp4, mkv, webm, opus, ...) says its first
    audio stream lasts, by ``ffprobe`` (nothing decoded). ``None`` without ffprobe, for a file ffprobe cannot read
    or without an audio stream, when no length is stated, or when ffprobe would only estimate one from the bit rate
    (a raw AAC stream). Not exact (an encoder's delay and padding: tens of ms): callers compare it with a margin.
    :func:`audio_duration` comes first for the formats soundfile reads."""
    exe = shutil.which("ffprobe")
    if exe is None:
        return None
    cmd = [exe, "-v", "error", "-select_streams", "a:0", "-show_entries"]
    cmd += ["stream=duration:format=duration,format_name", "-of", "json", os.path.expanduser(os.fspath(path))]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        said = json.loads(done.stdout or b"{}")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    fmt, streams = said.get("format") or {}, said.get("streams") or []
    if done.returncode != 0 or not streams or fmt.get("format_name") in _ESTIMATED_FORMATS:
        return None
    for value in (streams[0].get("duration"), fmt.get("duration")):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    return None


def load_or_validate(
    audio: str | os.PathLike | np.ndarray | torch.Tensor,
    sampling_rate: int = SAMPLING_RATE,
    name: str = "audio",
    min_samples: int = 1,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, str]:
    """A path is decoded with :func:`load_audio` (at most ``max_seconds``, cut before decoding); an array is checked
    with :func:`validate_waveform` (assumed to be at ``sampling_rate`` already; the caller cuts it). Returns
    ``(waveform [T], source name)``."""
    if isinstance(audio, (str, os.PathLike)):
        wave = load_audio(audio, sampling_rate, min_samples=min_samples, max_seconds=max_seconds)
        return wave, Path(audio).name
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return validate_waveform(audio, name=name, min_samples=min_samples), name
    raise AudioError(f"{name}: expected a file path, numpy array or torch tensor, got {type(audio).__name__}")
