"""Audio decoding: file or in-memory array -> 16 kHz mono float32 numpy, with clear errors.

Files are read with ``soundfile`` (wav, flac, ogg, mp3 and whatever libsndfile knows), seeking to ``offset`` and
reading only the requested frames; other formats fall back to ``torchcodec`` when installed, then to the
``ffmpeg`` command line. Multi-channel audio is averaged to mono; resampling uses ``soxr`` at very high quality.
Every problem raises :class:`AudioError` (a ``ValueError``) naming the source and what is wrong.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

SAMPLING_RATE = 16000
ONE_MEL_FRAME = 160  # samples at 16 kHz; an audio needs 321 samples (3 frames) for one audio token


class AudioError(ValueError):
    """Audio that cannot be used: missing, undecodable, empty, non-finite or too short."""


def _as_float(x: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1]; floats pass through."""
    if np.issubdtype(x.dtype, np.floating):
        return x
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    if x.dtype == np.bool_:
        raise TypeError("boolean arrays are not audio")
    raise TypeError(f"unsupported sample dtype {x.dtype}")


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
            x = x.mean(axis=1)
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
    """Very-high-quality ``soxr`` resampling of ``[T]`` float32; output has ``ceil(T * target / orig)`` samples."""
    if orig_sr == target_sr:
        return x
    import soxr

    n_out = -(-x.shape[0] * target_sr // orig_sr)
    y = soxr.resample(x, orig_sr, target_sr, quality="VHQ")
    return np.pad(y, (0, max(0, n_out - y.shape[0])))[:n_out]


def _read_soundfile(path: str, offset: float, duration: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        sr = f.samplerate
        start = int(round(offset * sr))
        if f.frames > 0 and start >= f.frames:
            raise AudioError(
                f"{path}: offset {offset:.3f} s is past the end of the audio ({f.frames / sr:.3f} s)"
            )
        if start:
            f.seek(start)
        count = -1 if duration is None else int(round(duration * sr))
        data = f.read(count, dtype="float32", always_2d=True)  # [T, C]
    return data.mean(axis=1), sr


def _read_torchcodec(path: str, offset: float, duration: float | None, sr: int) -> np.ndarray:
    from torchcodec.decoders import AudioDecoder  # optional dependency

    dec = AudioDecoder(path, sample_rate=sr)
    stop = None if duration is None else offset + duration
    samples = dec.get_samples_played_in_range(start_seconds=offset, stop_seconds=stop)
    return samples.data.mean(dim=0).numpy().astype(np.float32)


def _read_ffmpeg(path: str, offset: float, duration: float | None, sr: int) -> np.ndarray:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed")
    cmd = [exe, "-nostdin", "-v", "error", "-ss", f"{offset:.6f}", "-i", path]
    if duration is not None:
        cmd += ["-t", f"{duration:.6f}"]
    # ffmpeg downmixes stereo to mono as (L + R) / 2; it resamples with its own (swr) resampler here.
    cmd += ["-vn", "-ac", "1", "-ar", str(sr), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"ffmpeg exited with status {proc.returncode}")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def load_audio(
    path: str | os.PathLike,
    sampling_rate: int = SAMPLING_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    min_samples: int = 1,
) -> np.ndarray:
    """Decode ``[offset, offset + duration)`` seconds of an audio file to mono float32 ``[T]`` at ``sampling_rate``.

    Args:
        path: audio file (wav/flac/ogg/mp3 via soundfile; other formats via torchcodec or ffmpeg).
        sampling_rate: output rate (soxr VHQ resampling when the file differs).
        offset: start in seconds.
        duration: length in seconds; ``None`` reads to the end.
        min_samples: raise when fewer samples come out (``ONE_MEL_FRAME`` = 160 asks for one mel frame).

    Raises:
        AudioError: missing or undecodable file, bad offset/duration, empty or non-finite audio, too short.
    """
    name = os.fspath(path)
    if offset < 0 or not np.isfinite(offset):
        raise AudioError(f"{name}: offset must be a finite number >= 0 s, got {offset}")
    if duration is not None and (duration <= 0 or not np.isfinite(duration)):
        raise AudioError(f"{name}: duration must be > 0 s or None, got {duration}")
    p = Path(name)
    if not p.exists():
        raise AudioError(f"{name}: audio file not found")
    if not p.is_file():
        raise AudioError(f"{name}: not a regular file")
    errors = []
    try:
        x, sr = _read_soundfile(name, offset, duration)
        x = resample(x, sr, sampling_rate)
    except AudioError:
        raise
    except Exception as e:  # libsndfile cannot decode it: try the other decoders
        errors.append(f"soundfile: {e}")
        x = None
        for reader in (_read_torchcodec, _read_ffmpeg):
            try:
                x = reader(name, offset, duration, sampling_rate)
                break
            except ImportError:
                errors.append(f"{reader.__name__[6:]}: not installed")
            except Exception as e2:
                errors.append(f"{reader.__name__[6:]}: {e2}")
        if x is None:
            raise AudioError(f"{name}: cannot decode audio ({'; '.join(errors)})") from None
    if x.shape[0] == 0:
        where = "" if offset == 0 and duration is None else f" in [{offset}, {offset + (duration or 0)}) s"
        raise AudioError(f"{name}: audio is empty (0 samples{where})")
    return validate_waveform(x, name=name, min_samples=min_samples)


def audio_duration(
    path: str | os.PathLike, offset: float = 0.0, duration: float | None = None
) -> float | None:
    """Seconds that ``load_audio(path, offset=offset, duration=duration)`` will yield, from the file header
    (soundfile: wav, flac, ogg, mp3): ``duration`` when given (the file is not opened), else the length after
    ``offset`` (>= 0). ``None`` when soundfile cannot tell (other formats, a missing or damaged file): a cheap
    estimate, not a check; callers pick what unknown means for them."""
    if duration is not None:
        return float(duration)
    import soundfile as sf

    try:
        info = sf.info(os.fspath(path))
    except Exception:  # whatever libsndfile refuses; load_audio reports real problems later
        return None
    if info.samplerate <= 0 or info.frames <= 0:
        return None
    return max(0.0, info.frames / info.samplerate - offset)


def load_or_validate(
    audio: str | os.PathLike | np.ndarray | torch.Tensor,
    sampling_rate: int = SAMPLING_RATE,
    name: str = "audio",
    min_samples: int = 1,
) -> tuple[np.ndarray, str]:
    """A path is decoded with :func:`load_audio`; an array is checked with :func:`validate_waveform` (assumed to be
    at ``sampling_rate`` already). Returns ``(waveform [T], source name)``."""
    if isinstance(audio, (str, os.PathLike)):
        return load_audio(audio, sampling_rate, min_samples=min_samples), Path(audio).name
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return validate_waveform(audio, name=name, min_samples=min_samples), name
    raise AudioError(f"{name}: expected a file path, numpy array or torch tensor, got {type(audio).__name__}")
