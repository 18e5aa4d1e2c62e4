"""Whisper log-mel features, 30-s windowing and audio token counts (reference spec §1.1, §1.2, §3.2).

The numbers follow ``transformers.WhisperFeatureExtractor._torch_extract_fbank_features`` exactly: every window is
right-padded with zeros to ``chunk_length`` seconds, all windows go through ONE batched ``torch.stft`` (periodic
Hann, ``center=True``, reflect padding), the last STFT frame is dropped, the power spectrum is projected on a
Slaney mel bank built in float64, then ``log10(clamp(., 1e-10))``, a per-window floor at ``max - 8`` and
``(x + 4) / 4``. The frame mask marks ``ceil(n / hop)`` valid frames of a window with ``n`` real samples.

:class:`LogMelExtractor` is also called as transformers' ``WhisperFeatureExtractor`` (the reference processor's
``feature_extractor``): ``extractor(audio, sampling_rate=16000, return_tensors="pt")`` gives its ``input_features``
and ``attention_mask`` (see :meth:`LogMelExtractor.whisper_features`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# The dependency goes audio -> model (the encoder's output-length formula), never the other way.
from musicflamingo.model.encoder import conv_output_lengths
from musicflamingo.tokenizer import BatchEncoding

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30.0
MAX_AUDIO_LEN = 1200.0
FEATURE_SIZE = 128


def _hertz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    # Linear below 1 kHz, logarithmic above (Slaney's Auditory Toolbox), as transformers' hertz_to_mel.
    freq = np.atleast_1d(np.asarray(freq, dtype=np.float64))
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hertz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.atleast_1d(np.asarray(mels, dtype=np.float64))
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return freq


def mel_filter_bank(
    num_frequency_bins: int = N_FFT // 2 + 1,
    num_mel_filters: int = FEATURE_SIZE,
    min_frequency: float = 0.0,
    max_frequency: float = 8000.0,
    sampling_rate: int = SAMPLING_RATE,
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters in float64, ``[num_frequency_bins, num_mel_filters]``.

    Same arithmetic (and order of operations) as ``transformers.audio_utils.mel_filter_bank(..., norm="slaney",
    mel_scale="slaney")`` so that the float32 cast is bit-identical.
    """
    mel_min = _hertz_to_mel_slaney(min_frequency)[0]
    mel_max = _hertz_to_mel_slaney(max_frequency)[0]
    mel_freqs = np.linspace(mel_min, mel_max, num_mel_filters + 2)
    filter_freqs = _mel_to_hertz_slaney(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    # Triangles: rising edge from f[i] to f[i+1], falling edge from f[i+1] to f[i+2].
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))
    # Slaney area normalisation: roughly constant energy per channel.
    enorm = 2.0 / (filter_freqs[2 : num_mel_filters + 2] - filter_freqs[:num_mel_filters])
    return filters * np.expand_dims(enorm, 0)


def num_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Valid mel frames of a window with ``num_samples`` real samples: ``ceil(n / hop)``."""
    return -(-int(num_samples) // hop_length)


def tokens_from_frames(num_mel_frames: int) -> int:
    """Audio tokens for ``L`` valid mel frames: the encoder's output length (conv stride 2, then avg-pool 2).

    The formula lives with the encoder that defines it (``model.encoder.conv_output_lengths``), so the ``<sound>``
    count and the encoder's frames cannot disagree.
    """
    return int(conv_output_lengths(int(num_mel_frames))[1])


def window_bounds(
    num_samples: int,
    chunk_length: float = CHUNK_LENGTH,
    max_audio_len: float = MAX_AUDIO_LEN,
    sampling_rate: int = SAMPLING_RATE,
) -> tuple[list[tuple[int, int]], bool]:
    """``[(start, end), ...]`` sample spans of the windows of an audio, and whether it was truncated.

    As the reference ``_process_audio``: ``max(1, ceil(n / window))`` windows, at most
    ``max_audio_len // chunk_length`` of them; the last window is the (possibly short) remainder.
    """
    window = int(sampling_rate * chunk_length)
    max_windows = int(max_audio_len // chunk_length)
    n_win = max(1, (num_samples + window - 1) // window)
    truncated = n_win > max_windows
    n_win = min(n_win, max_windows)
    cap = min(num_samples, n_win * window)
    return [(i * window, min((i + 1) * window, cap)) for i in range(n_win)], truncated


def split_windows(
    audio: np.ndarray | torch.Tensor,
    chunk_length: float = CHUNK_LENGTH,
    max_audio_len: float = MAX_AUDIO_LEN,
    sampling_rate: int = SAMPLING_RATE,
    source: str | None = None,
) -> list[np.ndarray | torch.Tensor]:
    """Cut a mono waveform ``[T]`` into ``chunk_length``-second windows (views, no copy).

    Audio longer than ``max_audio_len`` seconds keeps only its first ``max_audio_len // chunk_length`` windows;
    one warning is logged naming ``source`` (e.g. the file name), the duration and what was kept.
    """
    n = int(audio.shape[0])
    bounds, truncated = window_bounds(n, chunk_length, max_audio_len, sampling_rate)
    if truncated:
        name = source if source is not None else "<in-memory array>"
        kept, limit = bounds[-1][1] / sampling_rate, len(bounds) * chunk_length
        if limit == max_audio_len:
            logger.warning(
                "Audio %s lasts %.1f s, longer than max_audio_len=%gs: keeping the first %.1f s (%d windows of %gs).",
                name,
                n / sampling_rate,
                max_audio_len,
                kept,
                len(bounds),
                chunk_length,
            )
        else:  # only whole windows are kept: a 95-s audio with max_audio_len=100 keeps 90 s (was "longer than 100s")
            logger.warning(
                "Audio %s lasts %.1f s, longer than the %gs that max_audio_len=%gs keeps (%d whole windows of %gs): "
                "keeping the first %.1f s.",
                name,
                n / sampling_rate,
                limit,
                max_audio_len,
                len(bounds),
                chunk_length,
                kept,
            )
    return [audio[s:e] for s, e in bounds]


def audio_token_count(
    num_samples: int,
    chunk_length: float = CHUNK_LENGTH,
    max_audio_len: float = MAX_AUDIO_LEN,
    sampling_rate: int = SAMPLING_RATE,
    hop_length: int = HOP_LENGTH,
) -> int:
    """Number of ``<sound>`` tokens for an audio of ``num_samples`` samples (spec §3.2).

    ``L`` is the sum of valid mel frames over the audio's (truncated) windows; 35 s -> 875, 112077 samples -> 175.
    """
    bounds, _ = window_bounds(num_samples, chunk_length, max_audio_len, sampling_rate)
    total = sum(num_frames(e - s, hop_length) for s, e in bounds)
    return tokens_from_frames(total)


def usable_samples(
    num_samples: int,
    chunk_length: float = CHUNK_LENGTH,
    max_audio_len: float = MAX_AUDIO_LEN,
    sampling_rate: int = SAMPLING_RATE,
    hop_length: int = HOP_LENGTH,
) -> int:
    """``num_samples`` minus a trailing remainder of <= 2 mel frames (<= 320 samples at 16 kHz with the 160-sample
    hop) that would form a window of 0 audio tokens (e.g. a GTZAN clip: 30.013 s, a 30-s window and a 13-ms one).

    The reference assigns such a zero-token window to the *next* audio of the batch when it rebuilds RoTE
    timestamps (and raises ``IndexError`` for the last audio). Training (the dataset) and generation (the
    processor: inference, eval, serve) all cut it, so no batch contains one; the <= 20 ms cut changes no token.
    """
    window = int(round(chunk_length * sampling_rate))
    n = int(num_samples)
    rest = n % window
    within_cap = n < int(max_audio_len // chunk_length) * window
    if n > window and rest and within_cap and tokens_from_frames(num_frames(rest, hop_length)) < 1:
        return n - rest
    return n


# transformers' WhisperFeatureExtractor.__call__ keywords: given any of them (or one waveform), a call is transformers'
WHISPER_CALL_KEYWORDS = (
    "sampling_rate",
    "return_tensors",
    "return_attention_mask",
    "padding",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "do_normalize",
)


class LogMelExtractor:
    """Batched Whisper log-mel front end.

    Called with a list of windows (``extractor(windows)``, what the processor does) it returns ``(features, mask)``;
    called as transformers' ``WhisperFeatureExtractor`` (``extractor(audio, sampling_rate=16000,
    return_tensors="pt")``: one waveform, or any of its keywords) it returns its ``input_features`` and
    ``attention_mask`` (:meth:`whisper_features`).

    Args:
        feature_size: mel bins (128 for Music Flamingo).
        sampling_rate: input rate in Hz.
        chunk_length: window length in seconds; a window has ``chunk_length * sampling_rate`` samples and
            ``samples / hop_length`` frames (3000 for 30 s).
        n_fft, hop_length: STFT parameters (400, 160).
        return_attention_mask: transformers' default for its call's mask (``preprocessor_config.json``); the windows
            call always returns the frame mask.

    :meth:`pad` is transformers' ``feature_extractor.pad`` (what a Whisper-style data collator calls).
    """

    model_input_names = ["input_features"]  # transformers' attributes
    padding_side = "right"  # pad() pads here, with padding_value (preprocessor_config.json)
    padding_value = 0.0

    def __init__(
        self,
        feature_size: int = FEATURE_SIZE,
        sampling_rate: int = SAMPLING_RATE,
        chunk_length: float = CHUNK_LENGTH,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        return_attention_mask: bool = True,
    ) -> None:
        for key, value in (("feature_size", feature_size), ("sampling_rate", sampling_rate)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        for key, value in (("n_fft", n_fft), ("hop_length", hop_length)):
            if value < 1:  # hop_length 0 would divide by zero below
                raise ValueError(f"{key} must be >= 1, got {value}")
        n_samples = chunk_length * sampling_rate
        if chunk_length <= 0 or n_samples != int(n_samples) or int(n_samples) % hop_length:
            raise ValueError(
                f"chunk_length={chunk_length} s must give a whole number of samples divisible by hop_length="
                f"{hop_length} at {sampling_rate} Hz (got {n_samples} samples)"
            )
        if n_fft > n_samples:  # also a mel filter bank of n_fft // 2 + 1 rows: a MemoryError for n_fft=1e9
            raise ValueError(
                f"n_fft={n_fft} must be at most the {int(n_samples)} samples of a {chunk_length:g}-s window at "
                f"{sampling_rate} Hz"
            )
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.chunk_length = chunk_length
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.return_attention_mask = return_attention_mask
        self.n_samples = int(n_samples)
        self.nb_max_frames = self.n_samples // hop_length
        # float64 numpy, as transformers' attribute (numpy code reading it keeps float64); log_mel uses the float32
        # cast the reference makes before its matmul. [n_fft//2+1, feature_size]
        self.mel_filters = mel_filter_bank(n_fft // 2 + 1, feature_size, 0.0, 8000.0, sampling_rate)
        self._mel_filters_f32 = torch.from_numpy(self.mel_filters.astype(np.float32))

    def __call__(
        self,
        windows: Sequence[np.ndarray | torch.Tensor],
        device: str | torch.device | None = None,
        **whisper_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | BatchEncoding:
        """Log-mel features of ``W`` windows.

        Args:
            windows: ``W`` mono float waveforms, each with at most ``n_samples`` samples.
            device: where to run the STFT (results come back on that device).

        Returns:
            features: float32 ``[W, feature_size, nb_max_frames]``.
            mask: int32 ``[W, nb_max_frames]``, 1 for the ``ceil(n / hop)`` frames holding real samples.

        One waveform (an array/tensor ``[T]`` or a list of numbers), or any of transformers' keywords
        (``sampling_rate=``, ``return_tensors=``, ...), makes this transformers' call: :meth:`whisper_features`.
        """
        if whisper_kwargs or _is_one_waveform(windows):
            return self.whisper_features(windows, device=device, **whisper_kwargs)
        if len(windows) == 0:
            raise ValueError("LogMelExtractor needs at least one window, got an empty list")
        device = torch.device(device) if device is not None else torch.device("cpu")
        batch = torch.zeros(len(windows), self.n_samples, dtype=torch.float32, device=device)
        mask = torch.zeros(len(windows), self.nb_max_frames, dtype=torch.int32, device=device)
        for i, w in enumerate(windows):
            w = torch.as_tensor(w)
            if w.ndim != 1:
                raise ValueError(f"window {i} must be a mono waveform [T], got shape {tuple(w.shape)}")
            if w.shape[0] > self.n_samples:
                raise ValueError(
                    f"window {i} has {w.shape[0]} samples, more than one {self.chunk_length} s window "
                    f"({self.n_samples}); cut the audio with split_windows first"
                )
            batch[i, : w.shape[0]] = w.to(device=device, dtype=torch.float32)
            mask[i, : num_frames(w.shape[0], self.hop_length)] = 1
        return self.log_mel(batch), mask

    def whisper_features(
        self,
        raw_speech: Any,
        *,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        do_normalize: bool | None = None,
        device: str | torch.device | None = None,
        **unknown: Any,
    ) -> BatchEncoding:
        """transformers' ``WhisperFeatureExtractor.__call__``: the same ``input_features`` and ``attention_mask``
        (tested against it on the same audio).

        ``raw_speech`` is one mono waveform (array, tensor or list of numbers) or a batch (a list of them, or a
        ``[B, T]`` array). Each is cut to ``max_length`` samples (default one ``chunk_length`` window: audio past
        30 s is dropped, as there; the processor windows it instead) and zero-padded to it (``padding=True``: to
        the longest). ``attention_mask`` is per mel frame with ``return_attention_mask=True`` (what the reference
        processor passes); left out or False it is transformers' per-*sample* mask when the config's
        ``return_attention_mask`` is set (its behaviour, kept for equal results). ``return_tensors``: ``"pt"``
        (torch), ``"np"`` or None (numpy). ``sampling_rate`` other than the extractor's is refused, naming both.
        """
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown keyword(s) {sorted(unknown)}: transformers' WhisperFeatureExtractor "
                f"keywords are {list(WHISPER_CALL_KEYWORDS) + ['device']} (for a whole song use the processor, "
                "which windows it: processor(text, audio=...))"
            )
        if sampling_rate is None:
            logger.warning(
                "%s called without sampling_rate: pass sampling_rate=%d to have the rate checked (as transformers)",
                type(self).__name__,
                self.sampling_rate,
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"sampling_rate={sampling_rate}: this feature extractor takes {self.sampling_rate} Hz audio, not "
                f"{sampling_rate} Hz; resample it first (musicflamingo.audio.io.resample(x, {sampling_rate}, "
                f"{self.sampling_rate})) or give the processor a file path"
            )
        if do_normalize:
            raise ValueError("do_normalize=True is not supported (Whisper log-mel only, as the reference)")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: 'pt' (torch), 'np' (numpy) or None (numpy)")
        if padding in (True, "longest", "max_length"):
            longest = padding != "max_length"
        elif padding in (False, None, "do_not_pad"):
            longest = None
        else:
            raise ValueError(f"padding={padding!r}: expected 'max_length' (default), True/'longest' or False")
        for key, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{key}={value!r}: expected a positive whole number of samples")
        waves = _waveforms(raw_speech)
        limit = max_length or self.n_samples

        def multiple(n: int) -> int:
            m = pad_to_multiple_of
            return n if not m or n % m == 0 else (n // m + 1) * m

        if truncation:
            waves = [w[: multiple(limit)] for w in waves]
        if longest is None:
            length = max(w.shape[0] for w in waves)
        else:
            length = multiple(max(w.shape[0] for w in waves) if longest else limit)
        lengths = sorted({max(length, w.shape[0]) for w in waves})
        if len(lengths) > 1 or (longest is None and any(w.shape[0] != length for w in waves)):
            raise ValueError(
                f"audios of {sorted({w.shape[0] for w in waves})} samples cannot be batched with padding={padding!r},"
                f" truncation={truncation!r}: keep padding='max_length' and truncation=True (transformers' "
                "defaults), or pass one audio"
            )
        batch = torch.zeros(len(waves), lengths[0], dtype=torch.float32)
        samples = torch.zeros(len(waves), lengths[0], dtype=torch.int32)  # transformers' per-sample mask
        for i, w in enumerate(waves):
            batch[i, : w.shape[0]] = torch.from_numpy(w)
            samples[i, : w.shape[0]] = 1
        run_on = torch.device(device) if device is not None else torch.device("cpu")
        out = {"input_features": self.log_mel(batch.to(run_on)).cpu()}  # [B, feature_size, length // hop]
        # transformers pads with `return_attention_mask or do_normalize`, None meaning the config's default, and
        # turns the mask into frames only when the argument itself is true
        asked = return_attention_mask or do_normalize
        if asked if asked is not None else self.return_attention_mask:
            mask = samples
            if return_attention_mask:
                mask = mask[:, :: self.hop_length].contiguous()
                if lengths[0] % self.hop_length:
                    mask = mask[:, :-1].contiguous()
            out["attention_mask"] = mask
        if return_tensors != "pt":
            out = {k: v.numpy() for k, v in out.items()}
        return BatchEncoding(out)

    def pad(
        self,
        processed_features: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """transformers' ``SequenceFeatureExtractor.pad``, as a Whisper-style data collator calls it
        (``feature_extractor.pad([{"input_features": f}, ...], return_tensors="pt")``): the same output (tested).

        ``processed_features``: a list of dicts (a DataLoader batch) or a dict of per-example lists (or ``[B, ...]``
        arrays), holding ``input_features``. Each example is padded with ``padding_value`` on the right along its
        FIRST axis (as there; the processor's ``[feature_size, F]`` features are all whole windows, so they are only
        stacked, and a mask made for them is ``[B, feature_size]`` ones, as there: use the processor's
        ``input_features_mask`` for frames): ``padding=True``/``"longest"`` to the longest example, ``"max_length"`` to ``max_length``, both
        rounded up to ``pad_to_multiple_of``; ``truncation=True`` first cuts to ``max_length``. ``attention_mask``
        (ones per first-axis step when ``return_attention_mask``, default the config's; one given is padded whatever
        that says) is padded with 0; other keys (``labels``) are stacked as given. Examples left of different lengths
        (``padding=False``) are refused, naming the shapes (transformers returns a numpy object array of them, or
        fails for ``"pt"``).

        Returns a dict of ``[B, ...]`` arrays: torch tensors when the examples are tensors or ``return_tensors="pt"``,
        numpy otherwise; float64 becomes float32. Where transformers fails (1-D examples with ``feature_size > 1``)
        they are padded along their one axis.
        """
        data = processed_features
        if isinstance(data, (list, tuple)):  # a DataLoader's list of examples -> a dict of lists
            if not data or not all(isinstance(x, Mapping) for x in data):
                raise ValueError(
                    "pad takes a dict holding 'input_features' or a non-empty list of such dicts, got "
                    f"{'an empty list' if not data else 'a list of ' + type(data[0]).__name__}"
                )
            keys = list(data[0].keys())
            for i, example in enumerate(data):
                if set(example.keys()) != set(keys):
                    raise ValueError(
                        f"pad: example {i} has keys {sorted(example)}, example 0 has {sorted(keys)}: every example "
                        "needs the same keys"
                    )
            data = {k: [x[k] for x in data] for k in keys}
        name = self.model_input_names[0]
        if not isinstance(data, Mapping) or name not in data:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"pad takes a dict (or a list of dicts) holding {name!r}, got {got}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: 'pt' (torch), 'np' (numpy) or None")
        if padding is True or padding == "longest":
            longest = True
        elif padding is False or padding == "do_not_pad":
            longest = None
        elif padding == "max_length":
            longest = False
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length (the number of steps to pad to)")
        else:
            raise ValueError(
                f"padding={padding!r}: expected True/'longest', 'max_length' or False/'do_not_pad'"
            )
        for key, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{key}={value!r}: expected a positive whole number")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length (the number of steps to cut to)")
        if len(data[name]) == 0:
            raise ValueError(f"pad: {name!r} holds no examples")
        if return_tensors is None:  # tensors in, tensors out (as there)
            first = data[name][0]
            first = first[0] if isinstance(first, (list, tuple)) and len(first) else first
            return_tensors = "pt" if isinstance(first, torch.Tensor) else "np"
        batch = {k: [_to_numpy(x, k, i) for i, x in enumerate(v)] for k, v in data.items()}
        sizes = {k: len(v) for k, v in batch.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"pad: the keys hold batches of different sizes: {sizes}")
        feats = batch[name]
        for i, f in enumerate(feats):
            if f.ndim == 0:
                raise ValueError(f"pad: {name} example {i} is a single number, expected a sequence")

        def multiple(n: int) -> int:
            m = pad_to_multiple_of
            return n if not m or n % m == 0 else (n // m + 1) * m

        with_mask = self.return_attention_mask if return_attention_mask is None else return_attention_mask
        if with_mask and "attention_mask" not in batch:
            batch["attention_mask"] = [np.ones(f.shape[0], dtype=np.int32) for f in feats]
        masks = batch.get("attention_mask")
        if truncation:
            cut = multiple(max_length)
            feats[:] = [f[:cut] for f in feats]
            if masks is not None:
                masks[:] = [m[:cut] for m in masks]
        target = (
            None if longest is None else multiple(max(f.shape[0] for f in feats) if longest else max_length)
        )
        for i, f in enumerate(feats):
            short = 0 if target is None else target - f.shape[0]
            if short > 0:
                widths = [(0, short)] + [(0, 0)] * (f.ndim - 1)
                feats[i] = np.pad(f, widths, constant_values=self.padding_value)
                if masks is not None:
                    masks[i] = np.pad(masks[i], (0, short))
        out = {}
        for key, values in batch.items():
            shapes = sorted({v.shape for v in values})
            if len(shapes) > 1:
                raise ValueError(
                    f"pad: {key} examples have shapes {shapes}, which cannot be stacked into one array (padding="
                    f"{padding!r}, truncation={truncation!r}; only {name} and attention_mask are padded)"
                )
            stacked = np.stack(values)
            stacked = stacked.astype(np.float32) if stacked.dtype == np.float64 else stacked
            out[key] = torch.from_numpy(stacked) if return_tensors == "pt" else stacked
        return BatchEncoding(out)

    def log_mel(self, batch: torch.Tensor) -> torch.Tensor:
        """``[W, n_samples]`` float32 zero-padded windows -> ``[W, feature_size, nb_max_frames]`` features."""
        window = torch.hann_window(self.n_fft, device=batch.device)  # periodic
        stft = torch.stft(
            batch, self.n_fft, self.hop_length, window=window, return_complex=True
        )  # [W, 201, F+1]
        # Drop the last frame. |z| written straight into a contiguous buffer (the matmul's fast path) and squared in
        # place: the same bits as the reference's `(stft[..., :-1].abs() ** 2)` without its two extra copies.
        w, bins, frames = stft.shape
        power = torch.empty(w, bins, frames - 1, dtype=batch.dtype, device=batch.device)  # [W, 201, F]
        torch.abs(stft[..., :-1], out=power).square_()
        mel = self._mel_filters_f32.to(batch.device).T @ power  # [W, feature_size, F]
        log_spec = torch.clamp(mel, min=1e-10).log10()
        # Dynamic-range floor per window (the max over mel and time includes padded frames, which sit at -10).
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0

    def to_dict(self) -> dict:
        """The ``WhisperFeatureExtractor`` config fields (``preprocessor_config.json``)."""
        return {
            "chunk_length": int(self.chunk_length)
            if float(self.chunk_length).is_integer()
            else self.chunk_length,
            "dither": 0.0,
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": self.feature_size,
            "hop_length": self.hop_length,
            "n_fft": self.n_fft,
            "n_samples": self.n_samples,
            "nb_max_frames": self.nb_max_frames,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": self.return_attention_mask,
            "sampling_rate": self.sampling_rate,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LogMelExtractor:
        """Build from a ``WhisperFeatureExtractor`` config dict; unsupported settings raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"feature extractor settings must be an object, got {type(d).__name__}")
        if _number(d, "dither", 0.0) != 0.0:
            raise ValueError(f"feature extractor dither={d['dither']} is not supported (expected 0.0)")
        if d.get("do_normalize", False):
            raise ValueError("feature extractor do_normalize=True is not supported (Whisper log-mel only)")
        # Settings the reference featurizes with that ours would ignore (other features without a word): refused.
        kind = d.get("feature_extractor_type")
        if kind is not None and kind != "WhisperFeatureExtractor":
            raise ValueError(
                f"feature extractor feature_extractor_type={kind!r} is not supported (expected "
                "'WhisperFeatureExtractor': the log-mel front end of Music Flamingo)"
            )
        if _number(d, "padding_value", 0.0) != 0.0:  # the reference pads each window's waveform with it
            raise ValueError(
                f"feature extractor padding_value={d['padding_value']!r} is not supported (expected 0.0: a window "
                "is padded with silence)"
            )
        if d.get("padding_side") not in (None, "right"):  # "left" puts the padding before the audio
            raise ValueError(
                f"feature extractor padding_side={d['padding_side']!r} is not supported (expected 'right': a "
                "window's audio comes first, then its padding)"
            )
        # WhisperFeatureExtractor's default, also for null (transformers reads it as false)
        return_attention_mask = d.get("return_attention_mask")
        return_attention_mask = False if return_attention_mask is None else return_attention_mask
        if not isinstance(return_attention_mask, bool):
            raise ValueError(
                f"feature extractor return_attention_mask={return_attention_mask!r} must be true or false"
            )
        return cls(
            feature_size=_number(d, "feature_size", FEATURE_SIZE, integer=True),
            sampling_rate=_number(d, "sampling_rate", SAMPLING_RATE, integer=True),
            chunk_length=_number(d, "chunk_length", CHUNK_LENGTH),
            n_fft=_number(d, "n_fft", N_FFT, integer=True),
            hop_length=_number(d, "hop_length", HOP_LENGTH, integer=True),
            return_attention_mask=return_attention_mask,
        )


def _is_one_waveform(x: Any) -> bool:
    """One waveform rather than a list of windows: a 1-D array/tensor, or a list of numbers."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 1
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (int, float, np.number))


def _waveforms(raw_speech: Any) -> list[np.ndarray]:
    """transformers' reading of ``raw_speech``: one waveform or a batch of them -> float32 ``[T]`` arrays."""
    if isinstance(raw_speech, torch.Tensor):
        raw_speech = raw_speech.detach().cpu().numpy()
    if isinstance(raw_speech, np.ndarray):
        if raw_speech.ndim not in (1, 2):
            raise ValueError(
                f"audio of shape {tuple(raw_speech.shape)}: expected one mono waveform [T] or a batch [B, T]"
            )
        items = list(raw_speech) if raw_speech.ndim == 2 else [raw_speech]
    elif isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0:
        items = [raw_speech] if _is_one_waveform(raw_speech) else list(raw_speech)
    else:
        raise ValueError(
            f"audio must be a waveform (numpy array, torch tensor or list of numbers) or a non-empty list of them, "
            f"got {type(raw_speech).__name__}"
        )
    waves = []
    for i, w in enumerate(items):
        if isinstance(w, torch.Tensor):
            w = w.detach().cpu().numpy()
        try:
            w = np.asarray(w, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(
                f"audio {i}: expected a mono waveform of numbers, got {type(w).__name__}"
            ) from None
        if w.ndim != 1 or w.shape[0] == 0:
            raise ValueError(
                f"audio {i} has shape {tuple(w.shape)}: expected a non-empty mono waveform [T] (mix stereo down "
                "first: musicflamingo.audio.io.load_audio does)"
            )
        waves.append(w)
    return waves


def _to_numpy(x: Any, key: str, i: int) -> np.ndarray:
    """One example of :meth:`LogMelExtractor.pad`'s ``key`` as a numpy array (tensors leave their device)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    try:
        return np.asarray(x)
    except ValueError:  # ragged nested lists
        raise ValueError(f"pad: {key} example {i} is not a rectangular array of numbers") from None


def _number(d: dict, key: str, default: float, integer: bool = False) -> Any:
    """``d[key]`` (or ``default``) as a finite number (an int when ``integer``); ValueError naming the key."""
    value = d.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and value != int(value)):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"feature extractor {key}={value!r} must be {kind}")
    return int(value) if integer else float(value)
