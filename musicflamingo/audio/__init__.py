"""Audio front end: decoding (``io``) and Whisper log-mel features with windowing (``features``)."""

from musicflamingo.audio.features import (
    LogMelExtractor,
    audio_token_count,
    mel_filter_bank,
    num_frames,
    split_windows,
    tokens_from_frames,
    usable_samples,
)
from musicflamingo.audio.io import AudioError, load_audio, load_or_validate, resample, validate_waveform

__all__ = [
    "AudioError",
    "LogMelExtractor",
    "audio_token_count",
    "load_audio",
    "load_or_validate",
    "mel_filter_bank",
    "num_frames",
    "resample",
    "split_windows",
    "tokens_from_frames",
    "usable_samples",
    "validate_waveform",
]
