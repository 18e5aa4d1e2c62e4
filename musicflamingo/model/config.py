"""Typed model configuration: audio encoder, Qwen2 decoder, and the Music Flamingo glue.

`MusicFlamingoConfig.from_hf_dict` / `to_hf_dict` read and write the reference `config.json` (model_type
"musicflamingo", nested `audio_config` of type "audioflamingo3_encoder" and `text_config` of type "qwen2").
Presets live in `PRESETS` and are built with `MusicFlamingoConfig.from_name(name, **overrides)`.

Every config is validated in `__post_init__` before any tensor exists, so a hostile or mistyped `config.json`
cannot ask for terabytes: `ConfigError` names the field, the value and what was expected.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing, mistyped or out of bounds."""


# Upper bounds far above any real model, low enough that nothing absurd gets allocated.
_MAX_DIM = 65_536
_MAX_LAYERS = 512
_MAX_VOCAB = 4_000_000
_MAX_POSITIONS = 10_000_000
MAX_PARAMETERS = 200_000_000_000


def _check_int(obj: Any, name: str, lo: int, hi: int, where: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{name}={value} is outside the allowed range [{lo}, {hi}]")


def _check_float(obj: Any, name: str, lo: float, hi: float, where: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{name}={value} is outside the allowed range [{lo}, {hi}]")


def _check_probability(obj: Any, name: str, where: str) -> None:
    """A dropout probability: 0 <= p < 1 (p = 1 would zero everything and divide by zero when rescaling)."""
    _check_float(obj, name, 0.0, 1.0, where)
    if getattr(obj, name) >= 1.0:
        raise ConfigError(f"{where}.{name}={getattr(obj, name)} must be below 1 (a dropout probability)")


@dataclass
class AudioEncoderConfig:
    """Whisper-style encoder (AudioFlamingo3Encoder). `max_source_positions` = mel frames per window / 2.

    Dropout (training only, as the reference): `dropout` on the hidden states after the positions and on the
    attention and MLP outputs before each residual add; `activation_dropout` after the MLP's GELU;
    `attention_dropout` on the attention probabilities. `layerdrop` (config.json `layerdrop` or
    `encoder_layerdrop`): in training each layer is skipped with this probability (one `torch.rand([])` per layer,
    as the reference draws it). `scale_embedding` is read and written back but, as in the reference, unused.
    """

    num_mel_bins: int = 128
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_attention_heads: int = 20
    intermediate_size: int = 5120
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    layerdrop: float = 0.0

    def __post_init__(self) -> None:
        w = "audio_config"
        _check_int(self, "num_mel_bins", 1, 1024, w)
        _check_int(self, "hidden_size", 1, _MAX_DIM, w)
        _check_int(self, "num_hidden_layers", 0, _MAX_LAYERS, w)
        _check_int(self, "num_attention_heads", 1, 1024, w)
        _check_int(self, "intermediate_size", 1, 8 * _MAX_DIM, w)
        _check_int(self, "max_source_positions", 2, 1_000_000, w)
        _check_float(self, "layer_norm_eps", 0.0, 1.0, w)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _check_probability(self, name, w)
        _check_float(self, "layerdrop", 0.0, 1.0, w)  # 1 skips every layer, as the reference would
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"audio_config.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.max_source_positions % 2:
            raise ConfigError(
                f"audio_config.max_source_positions={self.max_source_positions} must be even (avg pool 2)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mel_frames(self) -> int:
        """Mel frames per window: conv2 halves them to `max_source_positions`."""
        return 2 * self.max_source_positions

    @property
    def tokens_per_window(self) -> int:
        """Post-pool frames per full window (750 for 30 s)."""
        return self.max_source_positions // 2


@dataclass
class TextConfig:
    """Qwen2 decoder. `attention_dropout`: dropout on the attention probabilities, training only."""

    vocab_size: int = 151672
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = 151643
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        w = "text_config"
        _check_int(self, "vocab_size", 1, _MAX_VOCAB, w)
        _check_int(self, "hidden_size", 1, _MAX_DIM, w)
        _check_int(self, "intermediate_size", 1, 8 * _MAX_DIM, w)
        _check_int(self, "num_hidden_layers", 0, _MAX_LAYERS, w)
        _check_int(self, "num_attention_heads", 1, 1024, w)
        _check_int(self, "num_key_value_heads", 1, 1024, w)
        _check_int(self, "max_position_embeddings", 1, _MAX_POSITIONS, w)
        _check_float(self, "rope_theta", 1.0, 1e12, w)
        _check_float(self, "rms_norm_eps", 0.0, 1.0, w)
        _check_probability(self, "attention_dropout", w)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"text_config.hidden_size={self.hidden_size} must be divisible by "
                    f"num_attention_heads={self.num_attention_heads} (or set head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_int(self, "head_dim", 2, 4096, w)
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim={self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None:
                _check_int(self, name, 0, self.vocab_size - 1, w)


# sub-config model types the reference maps to the architecture we implement (MusicFlamingoConfig.__post_init__
# renames the older "musicflamingo_encoder"; an absent one takes the first, as its SubConfigSpec defaults)
_AUDIO_MODEL_TYPES = ("audioflamingo3_encoder", "musicflamingo_encoder")
_TEXT_MODEL_TYPES = ("qwen2",)


@dataclass
class MusicFlamingoConfig:
    """Music Flamingo: encoder -> RoTE -> projector -> Qwen2, with audio spliced at `audio_token_id`."""

    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio_token_id: int = 151669
    audio_bos_token_id: int = 151670
    audio_eos_token_id: int = 151671
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    audio_frame_step: float = 0.01  # seconds per input mel frame (hop 160 at 16 kHz)
    rote_theta: float = 1200.0  # also RoTE's "max positions" (HF sets max_position_embeddings = rope_theta)
    rote_partial_rotary_factor: float = 0.2  # rotated dims per axis = int(audio.hidden_size * factor)
    name: str = "custom"
    quantization: str | None = (
        None  # "int8" / "int4": the checkpoint stores quantized linears (`model/quantize.py`)
    )

    def __post_init__(self) -> None:
        if isinstance(self.audio, dict):
            self.audio = AudioEncoderConfig(**self.audio)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        w = "config"
        for name in ("audio_token_id", "audio_bos_token_id", "audio_eos_token_id"):
            _check_int(self, name, 0, self.text.vocab_size - 1, w)
        if self.projector_hidden_act != "gelu":
            raise ConfigError(
                f"config.projector_hidden_act={self.projector_hidden_act!r}: only 'gelu' is supported"
            )
        _check_float(self, "audio_frame_step", 1e-5, 1.0, w)
        _check_float(self, "rote_theta", 1.0, 1e9, w)
        _check_float(self, "rote_partial_rotary_factor", 0.0, 0.5, w)
        if self.rote_rotated_dims > self.audio.hidden_size:
            # int(d * factor) odd: each axis rotates one pair more (arange(0, dim, 2)); the reference accepts the
            # config and fails in its first audio forward with a bare shape mismatch
            raise ConfigError(
                f"config.rote_partial_rotary_factor={self.rote_partial_rotary_factor} (config.json "
                f"rope_parameters.partial_rotary_factor) with audio_config.hidden_size={self.audio.hidden_size}: "
                f"RoTE rotates {self.rote_rotated_dims} channels (2 axes x int({self.audio.hidden_size} * "
                f"{self.rote_partial_rotary_factor}) = {self.rote_dim_per_axis}, rounded up to whole pairs), more "
                f"than the {self.audio.hidden_size} the encoder outputs; use a smaller factor"
            )
        if self.quantization not in (None, *QUANT_CONFIGS):
            raise ConfigError(
                f"config.quantization={self.quantization!r}: expected null or one of {list(QUANT_CONFIGS)}"
            )
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise ConfigError(
                f"config describes {n:,} parameters, above the limit of {MAX_PARAMETERS:,}; refusing"
            )

    # ------------------------------------------------------------------ derived
    @property
    def rote_dim_per_axis(self) -> int:
        return int(self.audio.hidden_size * self.rote_partial_rotary_factor)

    @property
    def rote_rotated_dims(self) -> int:
        """Encoder channels RoTE rotates: 2 axes x one pair per `arange(0, dim, 2)` frequency (512 of 1280)."""
        return 4 * ((self.rote_dim_per_axis + 1) // 2)

    @property
    def window_seconds(self) -> float:
        """Audio seconds per encoder window (30.0 for the released checkpoint)."""
        return self.audio.mel_frames * self.audio_frame_step

    def num_parameters(self) -> int:
        """Exact parameter count, computed from the config alone (no allocation)."""
        a, t = self.audio, self.text
        d, f = a.hidden_size, a.intermediate_size
        enc_layer = 4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d  # k_proj has no bias; 2 LayerNorms
        enc = a.num_mel_bins * d * 3 + d + d * d * 3 + d + a.max_source_positions * d
        enc += a.num_hidden_layers * enc_layer + 2 * d
        proj = (
            d * t.hidden_size
            + t.hidden_size * t.hidden_size
            + (2 * t.hidden_size if self.projector_bias else 0)
        )
        h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
        q = t.num_attention_heads * t.head_dim
        lm_layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * t.intermediate_size + 2 * h
        lm = t.vocab_size * h + t.num_hidden_layers * lm_layer + h
        head = 0 if t.tie_word_embeddings else t.vocab_size * h
        return enc + proj + lm + head

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, preset: str, /, **overrides: Any) -> MusicFlamingoConfig:
        """Build a preset; `overrides` may set top-level fields (`name` too) or `audio={...}` / `text={...}` partial
        dicts."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[preset]
        audio = {**base.get("audio", {}), **(overrides.pop("audio", None) or {})}
        text = {**base.get("text", {}), **(overrides.pop("text", None) or {})}
        top = {k: v for k, v in base.items() if k not in ("audio", "text")}
        top.update(overrides)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(top) - valid)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid: {sorted(valid)}")
        top.setdefault("name", preset)
        return cls(
            audio=_make(AudioEncoderConfig, audio, "audio"), text=_make(TextConfig, text, "text"), **top
        )

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> MusicFlamingoConfig:
        """Parse the reference `config.json` (transformers >= 5.5 layout)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "musicflamingo":
            raise ConfigError(f"{source}: model_type={model_type!r}, expected 'musicflamingo'")
        ac, tc = d.get("audio_config"), d.get("text_config")
        # a missing one: the reference builds the release's sizes and fails with a shape error per tensor
        for key, sub in (("audio_config", ac), ("text_config", tc)):
            if not isinstance(sub, dict):
                what = "is missing" if key not in d else f"is {_short_repr(sub)}"
                raise ConfigError(
                    f"{source}: {key} {what}; 'audio_config' and 'text_config' must be JSON objects (the encoder's "
                    "and the decoder's fields)"
                )
        # the reference builds each part by its sub-config's model_type (AutoConfig / AutoModel): another one is
        # another architecture (a llama decoder has no q/k/v biases, ...), never to be read as ours
        for key, sub, accepted in (
            ("audio_config", ac, _AUDIO_MODEL_TYPES),
            ("text_config", tc, _TEXT_MODEL_TYPES),
        ):
            if sub.get("model_type") not in (None, *accepted):
                expected = " or ".join(map(repr, accepted))
                raise ConfigError(
                    f"{source}: {key}.model_type={sub['model_type']!r}: expected {expected} (absent reads as "
                    f"{accepted[0]!r}); the reference builds another {key.split('_')[0]} model for it, which this "
                    "model does not implement"
                )

        def pick(sub: dict, *names: str, default: Any = None) -> Any:
            for n in names:
                if n in sub and sub[n] is not None:
                    return sub[n]
            return default

        def flag(sub: dict, name: str, default: bool, where: str) -> bool:
            # a JSON boolean only: bool("false") is True, and a tied head read so loads the wrong weights
            value = pick(sub, name, default=default)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}{name} must be a JSON boolean (true or false), got {value!r}")
            return value

        def number(sub: dict, name: str, default: float, where: str) -> float:
            value = pick(sub, name, default=default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}{name} must be a number, got {value!r}")
            return float(value)

        def table(sub: dict, name: str, where: str) -> dict:
            value = pick(sub, name, default={})
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} must be a JSON object, got {value!r}")
            return value

        def rope_value(sub: dict, name: str, default: float, where: str) -> float:
            # as transformers' convert_rope_params_to_dict: the older `rope_scaling` when set, else
            # `rope_parameters`; a value missing there is the flat field of older files (`rope_theta` beside them),
            # else the config class's default
            key = "rope_scaling" if table(sub, "rope_scaling", where) else "rope_parameters"
            params = table(sub, key, where)
            unread = table(sub, "rope_parameters", where).get(name) if key == "rope_scaling" else None
            if params.get(name) is not None:
                value = number(params, name, 0.0, f"{where}{key}.")
            else:
                if sub.get(name) is None and unread is None and where == "text_config.":
                    defaulted[f"{where}{name}"] = default
                value = number(sub, name, default, where)
            if unread is not None and unread != value:
                log.warning(
                    "%s: %srope_parameters.%s=%r is not read: %srope_scaling (transformers' older name) is set too, "
                    "and the reference reads it instead, giving %s=%r; remove the one you do not mean",
                    source,
                    where,
                    name,
                    unread,
                    where,
                    name,
                    value,
                )
            return value

        def only(sub: dict, name: str, supported: str, where: str, why: str) -> None:
            # a field the reference honours that we do not implement: refuse it rather than compute other numbers
            value = sub.get(name)
            if value is not None and value != supported:
                raise ConfigError(f"{where}{name}={value!r} is not supported (only {supported!r}): {why}")

        defaulted: dict[str, Any] = {}  # text_config fields the file leaves out -> the reference's default
        try:
            only(
                ac, "activation_function", "gelu", "audio_config.", "the encoder's MLP is the exact erf GELU"
            )
            only(tc, "hidden_act", "silu", "text_config.", "the decoder's MLP is SwiGLU (silu)")
            _check_text_attention(tc)
            audio = AudioEncoderConfig(
                num_mel_bins=pick(ac, "num_mel_bins", default=128),
                hidden_size=pick(ac, "hidden_size", "d_model", default=1280),
                num_hidden_layers=pick(ac, "num_hidden_layers", "encoder_layers", default=32),
                num_attention_heads=pick(ac, "num_attention_heads", "encoder_attention_heads", default=20),
                intermediate_size=pick(ac, "intermediate_size", "encoder_ffn_dim", default=5120),
                max_source_positions=pick(ac, "max_source_positions", default=1500),
                scale_embedding=flag(ac, "scale_embedding", False, "audio_config."),
                dropout=pick(ac, "dropout", default=0.0),
                attention_dropout=pick(ac, "attention_dropout", default=0.0),
                activation_dropout=pick(ac, "activation_dropout", default=0.0),
                layerdrop=pick(ac, "layerdrop", "encoder_layerdrop", default=0.0),
            )
            # scaled RoPE (the reference reads rope_scaling before rope_parameters, for older files)
            for key in ("rope_parameters", "rope_scaling"):
                kind = table(tc, key, "text_config.")
                kind = kind.get("rope_type", kind.get("type", "default"))
                why = (
                    "scaled RoPE variants (linear, dynamic, yarn, ...) change the positions; not implemented"
                )
                only({"rope_type": kind}, "rope_type", "default", f"text_config.{key}.", why)
            rope_theta = rope_value(tc, "rope_theta", _QWEN2_DEFAULTS["rope_theta"], "text_config.")
            eos = tc.get("eos_token_id")
            if isinstance(eos, list):  # generation-style list: keep the first as the canonical eos
                for i, x in enumerate(eos):  # the others are checked too: a string here is a broken file
                    if isinstance(x, bool) or not isinstance(x, int):
                        raise ConfigError(f"text_config.eos_token_id[{i}] must be an integer, got {x!r}")
                eos = eos[0] if eos else None
            q = _QWEN2_DEFAULTS  # what the reference's Qwen2Config takes for a field the file leaves out
            for key in q:
                if (
                    key != "rope_theta"
                    and tc.get(key) is None
                    and (key != "num_key_value_heads" or key not in tc)
                ):
                    defaulted[f"text_config.{key}"] = q[key]
            heads = pick(tc, "num_attention_heads", default=q["num_attention_heads"])
            text = TextConfig(
                vocab_size=pick(tc, "vocab_size", default=q["vocab_size"]),
                hidden_size=pick(tc, "hidden_size", default=q["hidden_size"]),
                intermediate_size=pick(tc, "intermediate_size", default=q["intermediate_size"]),
                num_hidden_layers=pick(tc, "num_hidden_layers", default=q["num_hidden_layers"]),
                num_attention_heads=heads,
                # null is plain multi-head attention, as Qwen2Config reads it
                num_key_value_heads=pick(
                    tc,
                    "num_key_value_heads",
                    default=heads if "num_key_value_heads" in tc else q["num_key_value_heads"],
                ),
                head_dim=pick(tc, "head_dim"),
                rope_theta=rope_theta,
                rms_norm_eps=pick(tc, "rms_norm_eps", default=q["rms_norm_eps"]),
                max_position_embeddings=pick(
                    tc, "max_position_embeddings", default=q["max_position_embeddings"]
                ),
                tie_word_embeddings=flag(tc, "tie_word_embeddings", False, "text_config."),
                bos_token_id=tc.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=tc.get("pad_token_id"),
                attention_dropout=pick(tc, "attention_dropout", default=0.0),
            )
            rote_key = "rope_scaling" if table(d, "rope_scaling", "") else "rope_parameters"
            rote = table(d, rote_key, "")
            if rote.get("rope_type", "default") != "default":
                raise ConfigError(f"{rote_key}.rope_type={rote.get('rope_type')!r}, expected 'default'")
            if defaulted:  # our own saves and transformers' write every one of them
                log.warning(
                    "%s: text_config leaves out %s: read as Qwen2Config's defaults, as the reference reads them",
                    source,
                    ", ".join(f"{k.split('.')[-1]} (= {v})" for k, v in defaulted.items()),
                )
            return cls(
                audio=audio,
                text=text,
                audio_token_id=d.get("audio_token_id", _AUDIO_ID_DEFAULTS["audio_token_id"]),
                audio_bos_token_id=d.get("audio_bos_token_id", _AUDIO_ID_DEFAULTS["audio_bos_token_id"]),
                audio_eos_token_id=d.get("audio_eos_token_id", _AUDIO_ID_DEFAULTS["audio_eos_token_id"]),
                projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                projector_bias=flag(d, "projector_bias", True, ""),
                audio_frame_step=d.get("audio_frame_step", 0.01),
                rote_theta=rope_value(d, "rope_theta", 1200.0, ""),
                rote_partial_rotary_factor=rope_value(d, "partial_rotary_factor", 0.2, ""),
                name=d.get("_musicflamingo_preset", "custom"),
                quantization=_quantization(d.get("quantization_config"), source),
            )
        except ConfigError as e:
            taken = [f"{k}={v}" for k, v in defaulted.items()]
            note = f" ({', '.join(taken)}: the file leaves them out, Qwen2Config's defaults)" if taken else ""
            # a top-level token id the message names but the file leaves out: the reference's default, not a typo
            ids = [k for k in _AUDIO_ID_DEFAULTS if k not in d and f"config.{k}=" in str(e)]
            if ids:
                note += (
                    f" (config.json leaves out {', '.join(ids)}: the reference's default"
                    f"{'s' if len(ids) > 1 else ''} {', '.join(str(_AUDIO_ID_DEFAULTS[k]) for k in ids)}, the "
                    "release tokenizer's ids; set the ids of this model's tokenizer)"
                )
            raise ConfigError(f"{source}: {e}{note}") from None
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: invalid value type: {e}") from None

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The reference `config.json` layout, loadable by `transformers` >= 5.5."""
        a, t = self.audio, self.text
        return {
            "architectures": ["MusicFlamingoForConditionalGeneration"],
            "model_type": "musicflamingo",
            "audio_config": {
                "model_type": "audioflamingo3_encoder",
                "num_mel_bins": a.num_mel_bins,
                "hidden_size": a.hidden_size,
                "num_hidden_layers": a.num_hidden_layers,
                "num_attention_heads": a.num_attention_heads,
                "intermediate_size": a.intermediate_size,
                "max_source_positions": a.max_source_positions,
                "activation_function": "gelu",
                "scale_embedding": a.scale_embedding,
                "dropout": a.dropout,
                "attention_dropout": a.attention_dropout,
                "activation_dropout": a.activation_dropout,
                "layerdrop": a.layerdrop,
            },
            "text_config": {
                "model_type": "qwen2",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "tie_word_embeddings": t.tie_word_embeddings,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "pad_token_id": t.pad_token_id,
                "attention_dropout": t.attention_dropout,
                "use_cache": True,
            },
            "audio_token_id": self.audio_token_id,
            "audio_bos_token_id": self.audio_bos_token_id,
            "audio_eos_token_id": self.audio_eos_token_id,
            "projector_hidden_act": self.projector_hidden_act,
            "projector_bias": self.projector_bias,
            "audio_frame_step": self.audio_frame_step,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rote_theta,
                "partial_rotary_factor": self.rote_partial_rotary_factor,
            },
            "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": dtype or "float32",
            "_musicflamingo_preset": self.name,
            **({"quantization_config": {**QUANT_CONFIGS[self.quantization]}} if self.quantization else {}),
        }

    @classmethod
    def from_json(cls, path: str | Path) -> MusicFlamingoConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        return cls.from_hf_dict(read_json_object(path, ConfigError), source=str(path))

    def to_json(self, path: str | Path, dtype: str | None = None) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(dtype), indent=2) + "\n")


# Qwen2Config's defaults (transformers 4.x to 5.x), which the reference takes for a text_config field its config.json
# leaves out (a file written with only the fields that differ from them, or by hand): not the release's values
_QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}

# What a quantized save writes into config.json (`model/quantize.py`); `transformers` does not know these methods.
QUANT_CONFIGS = {
    "int8": {"quant_method": "musicflamingo_int8", "bits": 8, "granularity": "per output row, symmetric"},
    "int4": {
        "quant_method": "musicflamingo_int4",
        "bits": 4,
        "granularity": "language model and head: groups of 128 (or 64, 32) input columns, asymmetric; audio tower and "
        "projector: int8",
    },
}


# MusicFlamingoConfig's defaults (the release tokenizer's ids), which the reference takes for a top-level token id its
# config.json leaves out
_AUDIO_ID_DEFAULTS = {"audio_token_id": 151669, "audio_bos_token_id": 151670, "audio_eos_token_id": 151671}


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path` (a checkpoint's config.json, generation_config.json, adapter_config.json), else
    `error` naming the file: not UTF-8 JSON, nested too deeply for the parser, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise error(f"{path}: not valid JSON ({why})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quantization(q: Any, source: str) -> str | None:
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else q
    ours = {c["quant_method"]: name for name, c in QUANT_CONFIGS.items()}
    if not isinstance(method, str) or method not in ours:  # a list or a table is not hashable: no `in` first
        raise ConfigError(
            f"{source}: quantization_config.quant_method={method!r} is not supported (only {sorted(ours)}, written "
            "by our save_pretrained of a quantize=int8/int4 model); load the unquantized checkpoint and pass "
            "quantize=int8 instead"
        )
    return ours[method]


def _check_text_attention(tc: dict[str, Any]) -> None:
    """Refuse a text_config whose reference model would use sliding-window attention in some layer: the decoder
    here attends over the whole sequence in every layer. The reference (Qwen2Config) uses `layer_types` when given,
    else slides in layers `i >= max_window_layers` when `use_sliding_window` is true and `sliding_window` is set."""
    types = tc.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or any(not isinstance(t, str) for t in types):
            raise ConfigError(f"text_config.layer_types must be a list of strings, got {types!r}")
        other = sorted({t for t in types if t != "full_attention"})
        if other:
            raise ConfigError(
                f"text_config.layer_types holds {other}: only 'full_attention' layers are supported "
                "(sliding-window attention is not implemented)"
            )
        return
    sliding = tc.get("use_sliding_window", False)
    if not isinstance(sliding, bool):
        raise ConfigError(
            f"text_config.use_sliding_window must be a JSON boolean (true or false), got {sliding!r}"
        )
    if sliding and tc.get("sliding_window") is not None:
        first = tc.get("max_window_layers", 28)
        layers = tc.get("num_hidden_layers", 28)
        if isinstance(first, int) and isinstance(layers, int) and first >= layers:
            return  # no layer slides
        raise ConfigError(
            f"text_config.use_sliding_window=true with sliding_window={tc.get('sliding_window')!r} gives the "
            f"layers from max_window_layers={first!r} on sliding-window attention, which is not implemented: set "
            "use_sliding_window to false (the released checkpoint does)"
        )


def _make(cls: type, values: dict[str, Any], where: str) -> Any:
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown {where} config field(s) {unknown}; valid: {sorted(valid)}")
    return cls(**values)


# Named presets. `tiny` is for tests (token ids get overridden by the test tokenizer), `small` trains from scratch
# on CPU (3 s windows: 300 mel frames -> 75 audio tokens per window; a 4x256 decoder: the main job is limited by
# training steps, and a bf16 step of ~8 clips takes ~0.79 s with 4 layers against ~0.94 s with 6), `music_flamingo_2601`
# is the release.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "audio": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        "text": dict(
            vocab_size=303,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            bos_token_id=None,
            eos_token_id=299,
            pad_token_id=297,
        ),
        # The ids of the tests' tiny byte-level BPE (tests/tiny_assets.py): <|endoftext|> 297, <|im_end|> 299.
        "audio_token_id": 300,
        "audio_bos_token_id": 301,
        "audio_eos_token_id": 302,
    },
    "small": {
        "audio": dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_source_positions=150,  # 3 s windows: attention cost is quadratic in the window length
        ),
        "text": dict(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rope_theta=10000.0,
            bos_token_id=None,
            eos_token_id=3,  # SentencePiece from `train_sentencepiece`: <unk> 0, <|endoftext|> 1 (pad), <|im_end|> 3
            pad_token_id=1,
        ),
        "audio_token_id": 4,
        "audio_bos_token_id": 5,
        "audio_eos_token_id": 6,
    },
    "music_flamingo_2601": {},
}
