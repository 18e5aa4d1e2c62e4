"""Audio of a request: base64 bytes, `data:` URLs and `file://` paths -> checked 16 kHz mono waveforms.

Bytes are written to a temporary file with the declared format's suffix and decoded by `audio.io.load_audio`,
the path `infer.py` takes for a file, so the server hears exactly what the command line hears. The first bytes
are checked against well-known signatures first, so an image or a document is refused by name instead of with a
decoder's message. Durations are checked from the header before decoding (soundfile's frames, else the container's
length by ffprobe; and from the samples after): `open_*` gives a `Source` with its header length, so a request
whose audio cannot fit the server's limits is refused before anything is decoded; `decode_source` decodes it.
"""

from __future__ import annotations

import binascii
import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from musicflamingo.audio.io import (
    ONE_MEL_FRAME,
    SAMPLING_RATE,
    AudioError,
    audio_duration,
    container_duration,
    load_audio,
)
from musicflamingo.serve.errors import APIError, bad_request

FORMATS = ("wav", "mp3", "flac", "ogg")
MIME_FORMATS = {
    "audio/wav": "wav",
    "audio/wave": "wav",
    "audio/x-wav": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/ogg": "ogg",
    "application/ogg": "ogg",
}
# (offset, magic, what it is): enough to name what a client sent by mistake.
SIGNATURES = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"\x1a\x45\xdf\xa3", "WebM/Matroska (decode it to wav first)"),
    (4, b"ftyp", "MP4/M4A (decode it to wav first)"),
    (0, b"<", "text (HTML or XML)"),
    (0, b"{", "text (JSON)"),
)
_AUDIO_SIGNATURES = ((0, b"RIFF"), (0, b"RF64"), (0, b"fLaC"), (0, b"OggS"), (0, b"ID3"))
MIN_SAMPLES = 2 * ONE_MEL_FRAME + 1  # 3 mel frames: the shortest audio that makes one audio token


@dataclass
class Audio:
    """A decoded audio: waveform (T,) float32 at 16 kHz, and where it came from (for messages)."""

    wave: np.ndarray
    source: str

    @property
    def seconds(self) -> float:
        return self.wave.shape[0] / SAMPLING_RATE


def _looks_like_audio(head: bytes) -> bool:
    if any(head[o : o + len(m)] == m for o, m in _AUDIO_SIGNATURES):
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0  # an MPEG frame sync


def sniff(head: bytes) -> str | None:
    """What the first bytes say a non-audio payload is ("a PNG image"), or None when it may be audio."""
    if _looks_like_audio(head):
        return None
    for offset, magic, what in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


# Characters of base64 decoded per call: each call holds the GIL (binascii, str.split), so a 50-MB song in one call
# stalled every other client's stream for seconds (4.6 s with the regex this replaced); between two pieces the
# event loop's thread gets its turn. 1 MiB takes ~10 ms here.
B64_PIECE = 1 << 20


def decode_base64(data: object, param: str) -> bytes:
    """Strict base64 (standard alphabet, padding checked; whitespace and newlines allowed) -> bytes, decoded in
    pieces of `B64_PIECE` characters (whitespace dropped, each piece a multiple of 4 but the last) so that other
    threads, the event loop's, run between them."""
    if not isinstance(data, str) or not data:
        raise bad_request(param, "must be a non-empty base64 string")
    out: list[bytes] = []
    padded = False  # the last piece ended in padding: nothing may follow
    carry = ""  # characters past the last whole 4-character group, for the next piece
    for start in range(0, len(data), B64_PIECE):
        piece = carry + "".join(data[start : start + B64_PIECE].split())
        last = start + B64_PIECE >= len(data)
        cut = len(piece) if last else len(piece) - len(piece) % 4
        piece, carry = piece[:cut], piece[cut:]
        if not piece:
            continue
        if padded:
            raise bad_request(param, "not valid base64 (Excess data after padding)")
        if not piece.isascii():
            raise bad_request(param, "not valid base64 (Only base64 data is allowed)")
        try:
            out.append(binascii.a2b_base64(piece.encode("ascii"), strict_mode=True))
        except binascii.Error as e:
            raise bad_request(param, f"not valid base64 ({e})") from None
        padded = piece.endswith("=")
    raw = b"".join(out)
    if not raw:
        raise bad_request(param, "decodes to 0 bytes")
    return raw


def parse_data_url(url: str, param: str) -> tuple[bytes, str]:
    """`data:audio/wav;base64,...` -> (bytes, format)."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(param, "a data: URL needs a ',' before its data")
    parts = head[len("data:") :].split(";")
    mime = parts[0].strip().lower()
    if "base64" not in [p.strip().lower() for p in parts[1:]]:
        raise bad_request(param, "only base64 data: URLs are supported (data:audio/wav;base64,...)")
    fmt = MIME_FORMATS.get(mime)
    if fmt is None:
        raise bad_request(
            param, f"media type {mime or '(none)'!r} is not supported; use one of {sorted(MIME_FORMATS)}"
        )
    return decode_base64(payload, param), fmt


def check_duration(seconds: float | None, max_seconds: float, param: str) -> None:
    if seconds is not None and seconds > max_seconds + 1e-6:
        raise bad_request(
            param,
            f"the audio is {_over(seconds, max_seconds)} s long, over the limit of {max_seconds:g} s",
            code="audio_too_long",
        )


def _over(seconds: float, limit: float) -> str:
    """`seconds` with the decimals it takes to read as over `limit` (a 1200.04-s song was "1200.0 s long, over the
    limit of 1200 s")."""
    for digits in (1, 2, 3, 4, 5):
        text = f"{seconds:.{digits}f}"
        if float(text) > limit:
            return text
    return f"{seconds:.6f}"


# Seconds a container's stated length (ffprobe's) may run over the decoded samples' (encoder delay and padding are
# tens of ms): a length over the limit by more is refused before decoding, and this much is decoded past the limit.
CONTAINER_SLACK_S = 1.0


@dataclass
class Source:
    """An audio part opened but not decoded: a file to decode (`temporary`: uploaded bytes, deleted by `close`),
    its header's length and whether that length is what decoding gives (soundfile's frames) or a container's
    statement (ffprobe's, within `CONTAINER_SLACK_S`); `seconds` None: no header says."""

    path: str
    shown: str
    param: str
    seconds: float | None = None
    exact: bool = False
    temporary: bool = False

    def close(self) -> None:
        if self.temporary:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.temporary = False

    def least_samples(self) -> int:
        """16-kHz samples that decoding yields at least, by the header (0 when it says nothing)."""
        if self.seconds is None:
            return 0
        # exact: frames * 16000 / rate, rounded up as the resampler does (its float error is far under 1e-6)
        if self.exact:
            return max(0, math.ceil(self.seconds * SAMPLING_RATE - 1e-6))
        return max(0, math.floor((self.seconds - CONTAINER_SLACK_S) * SAMPLING_RATE))


def _open_file(path: str, max_seconds: float, param: str, shown: str, temporary: bool = False) -> Source:
    """The file's header length (soundfile's, else the container's by ffprobe), checked against the limit before
    anything is decoded."""
    source = Source(path, shown, param, audio_duration(path), True, temporary)
    try:
        if source.seconds is None:  # m4a, mp4, mkv, webm, opus: the container's stated length
            source.seconds, source.exact = container_duration(path), False
        if source.exact:
            check_duration(source.seconds, max_seconds, param)
        elif source.seconds is not None and source.seconds > max_seconds + CONTAINER_SLACK_S:
            raise bad_request(
                param,
                f"the audio is longer than the limit of {max_seconds:g} s (its container says "
                f"{source.seconds:.1f} s)",
                code="audio_too_long",
            )
    except BaseException:
        source.close()
        raise
    return source


def decode_source(source: Source, max_seconds: float) -> Audio:
    """Decode an opened audio part (400 naming its field when it cannot be used or is over the limit)."""
    path, param = source.path, source.param
    # no exact length (a container's, or none: raw AAC): decode one second past the limit, not a 2-hour file whole
    probe = None if source.exact else max_seconds + CONTAINER_SLACK_S
    try:
        wave = load_audio(path, SAMPLING_RATE, min_samples=MIN_SAMPLES, max_seconds=probe)
    except AudioError as e:
        # The decoder's message starts with the path it read, a temporary file for uploaded bytes.
        msg = str(e)
        msg = msg[len(path) + 2 :] if msg.startswith(path + ": ") else msg
        raise bad_request(param, f"cannot use this audio: {msg}", code="invalid_audio") from None
    audio = Audio(wave, source.shown)
    if probe is not None and audio.seconds > max_seconds + 1e-6:
        raise bad_request(
            param, f"the audio is longer than the limit of {max_seconds:g} s", code="audio_too_long"
        )
    check_duration(audio.seconds, max_seconds, param)
    return audio


def _decode_file(path: str, max_seconds: float, param: str, shown: str) -> Audio:
    source = _open_file(path, max_seconds, param, shown)
    return decode_source(source, max_seconds)


def open_bytes(raw: bytes, fmt: str, max_seconds: float, param: str) -> Source:
    """Encoded audio bytes of the declared format, written to a temporary file and their header checked (400
    naming `param` when they are not audio or over the limit); `Source.close` deletes the file."""
    what = sniff(raw[:16])
    if what is not None:
        raise bad_request(param, f"the data is {what}, not {fmt} audio", code="invalid_audio")
    fd, tmp = tempfile.mkstemp(suffix="." + fmt, prefix="musicflamingo-serve-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
    except BaseException:
        os.unlink(tmp)
        raise
    return _open_file(tmp, max_seconds, param, f"{param} ({fmt}, {len(raw)} bytes)", temporary=True)


def decode_bytes(raw: bytes, fmt: str, max_seconds: float, param: str) -> Audio:
    """Encoded audio bytes of the declared format -> Audio (400 naming `param` when they are not usable)."""
    source = open_bytes(raw, fmt, max_seconds, param)
    try:
        return decode_source(source, max_seconds)
    finally:
        source.close()


def resolve_file_url(url: str, audio_root: str | None, param: str) -> Path:
    """A `file://` URL -> an existing file inside `audio_root` (symlinks resolved first); 403 outside it."""
    if audio_root is None:
        raise APIError(
            403,
            f"{param}: file:// URLs are turned off on this server (it has no audio_root)",
            param,
            "file_urls_disabled",
        )
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(param, f"file:// URLs name no host, got {parsed.netloc!r}")
    path = Path(unquote(parsed.path))
    if "\x00" in str(path):  # (%00: os.path.realpath raised ValueError, a 500)
        raise bad_request(param, "a file:// URL's path cannot hold a NUL byte (%00)")
    if not path.is_absolute():
        raise bad_request(param, "a file:// URL needs an absolute path (file:///songs/a.wav)")
    real = Path(os.path.realpath(path))
    root = Path(audio_root)
    if real != root and root not in real.parents:
        raise APIError(403, f"{param}: {path} is outside the server's audio_root", param, "path_not_allowed")
    try:
        found = real.is_file()
    except OSError as e:  # a name longer than the file system allows (ENAMETOOLONG): was a 500
        raise bad_request(
            param, f"{path}: cannot read it ({e.strerror or e})", code="file_not_found"
        ) from None
    if not found:
        raise bad_request(param, f"{path} is not a file under audio_root", code="file_not_found")
    return real


def open_url(url: object, audio_root: str | None, max_seconds: float, param: str) -> Source:
    """An `audio_url` value (`data:` or `file://`) -> an opened Source, its header checked."""
    if not isinstance(url, str) or not url:
        raise bad_request(param, "must be a non-empty URL string (data: or file://)")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        raw, fmt = parse_data_url(url, param)
        return open_bytes(raw, fmt, max_seconds, param)
    if scheme == "file":
        path = resolve_file_url(url, audio_root, param)
        return _open_file(str(path), max_seconds, param, str(path))
    raise bad_request(
        param,
        f"URL scheme {scheme or '(none)'!r} is not supported: use data: or a file:// path under audio_root",
    )


def load_url(url: object, audio_root: str | None, max_seconds: float, param: str) -> Audio:
    """An `audio_url` value (`data:` or `file://`) -> Audio."""
    source = open_url(url, audio_root, max_seconds, param)
    try:
        return decode_source(source, max_seconds)
    finally:
        source.close()
