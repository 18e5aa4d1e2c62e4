"""Shared offline test fixtures: a tiny Qwen2-style tokenizer, the reference processor, synthetic audio.

Import from tests as ``from tiny_assets import ...`` (pytest puts ``tests/`` on ``sys.path``).

The tokenizer is a byte-level BPE laid out like Qwen2's ``tokenizer.json`` (NFC normaliser, the Qwen2 split
regex, byte-level pre-tokenizer and decoder). Its base vocabulary has ``BASE_VOCAB_SIZE`` entries (256 bytes
+ merges learned from a small built-in text) and the special tokens follow in Qwen2's order, so the ids are
fixed constants that tiny models can use:

    <|endoftext|> 297 (pad)   <|im_start|> 298   <|im_end|> 299 (eos)
    <sound> 300   <|sound_bos|> 301   <|sound_eos|> 302          vocab_size 303
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BASE_VOCAB_SIZE = 297
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>", "<|sound_bos|>", "<|sound_eos|>")

# Same regex as transformers' Qwen2Tokenizer (PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

SYSTEM_PROMPT = (
    "You are Music Flamingo, a multimodal assistant for language and music. "
    "On each turn you receive an audio clip which contains music and optional text, "
    "you will receive at least one or both; use your world knowledge and reasoning "
    "to help the user with any task. Interpret the entirety of the content any input music"
    "--regardlenss of whether the user calls it audio, music, or sound."
)

# Copied from transformers' convert_musicflamingo_to_hf.py (write_processor): the reference templates.
# fmt: off
TOKENIZER_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
PROCESSOR_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
        "<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}"
            "{{ m['content'] }}"
        "{% else %}"
            "{% set audio = namespace(found=False) %}"
            "{% set text_buf = namespace(v='') %}"
            "{% for c in m['content'] %}"
                "{% if c.get('type') == 'audio' or 'audio' in c %}"
                    "{% set audio.found = True %}"
                "{% elif c.get('type') == 'text' or 'text' in c %}"
                    "{% set text_buf.v = text_buf.v + c['text'] %}"
                "{% endif %}"
            "{% endfor %}"
            "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
        "{% endif %}"
        "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
    "{% endif %}"
)
# fmt: on

_CORPUS = """\
Describe this track in full detail - tell me the genre, tempo, and key, then dive into the instruments,
production style, and overall mood it creates. This track is an uplifting dance-pop anthem at 128 BPM in
A minor. The piano plays a bright melody over a steady four-on-the-floor kick drum, while the bass guitar
and strings build tension before the chorus. The vocals are clear and the mix is wide and polished.
What is the tempo of the song? The tempo is 96 beats per minute. What key is it in? It is in C major.
Generate a structured lyric sheet from the input music. Verse 1: Midnight cravings in bloom, the city
sings a quiet tune. Chorus: we are dancing in the rain, we are singing once again.
The guitar solo uses a minor pentatonic scale; the drummer plays a shuffle rhythm with ghost notes.
Jazz, rock, classical, hip hop, electronic, country, folk, blues, reggae, metal and ambient music.
Chords: C, G, Am, F, Dm7, E7, Bb, F#m. Time signature 4/4, 3/4 and 6/8. Instruments: violin, cello,
trumpet, saxophone, flute, synthesizer, organ, harp. The recording sounds warm, with reverb and delay.
"""


@dataclass(frozen=True)
class TinyTokenizerIds:
    """Ids of the tiny tokenizer written by :func:`write_tiny_tokenizer`."""

    pad_token_id: int = 297  # <|endoftext|>, as Qwen2
    im_start_id: int = 298
    eos_token_id: int = 299  # <|im_end|>
    audio_token_id: int = 300  # <sound>
    audio_bos_token_id: int = 301  # <|sound_bos|>
    audio_eos_token_id: int = 302  # <|sound_eos|>
    vocab_size: int = 303


TINY_IDS = TinyTokenizerIds()


def _build_tokenizer():
    """Train the byte-level BPE (deterministic: tiny corpus, single pass)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(
        models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != BASE_VOCAB_SIZE:
        raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} base tokens, expected {BASE_VOCAB_SIZE}")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_tiny_tokenizer(dirpath: str | Path) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` of the tiny Qwen2-style tokenizer into ``dirpath``.

    Loadable by ``transformers.AutoTokenizer`` (as ``Qwen2Tokenizer``) and by ``musicflamingo.tokenizer``.
    Returns the directory.
    """
    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer()
    for name in SPECIAL_TOKENS:
        assert tok.token_to_id(name) == _expected_id(name), (name, tok.token_to_id(name))
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            "<|im_start|>",
            "<|im_end|>",
            "<sound>",
            "<|sound_bos|>",
            "<|sound_eos|>",
        ],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def _expected_id(token: str) -> int:
    return BASE_VOCAB_SIZE + SPECIAL_TOKENS.index(token)


def write_reference_processor(dirpath: str | Path):
    """Build the reference ``transformers.MusicFlamingoProcessor`` (as the convert script does), save it to
    ``dirpath`` and return it. Test-only: imports transformers."""
    import tempfile

    from transformers import AutoTokenizer, MusicFlamingoProcessor, WhisperFeatureExtractor

    out = Path(dirpath)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), chat_template=TOKENIZER_CHAT_TEMPLATE)
    processor = MusicFlamingoProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=PROCESSOR_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    return processor


def make_tone(freq: float, seconds: float, sr: int = 16000, amp: float = 0.5) -> np.ndarray:
    """Sine tone ``amp*sin(2*pi*freq*n/sr)``, float32 ``[round(seconds*sr)]``."""
    n = np.arange(int(round(seconds * sr)), dtype=np.float64)
    return (amp * np.sin(2 * np.pi * freq * n / sr)).astype(np.float32)


def write_audio(path: str | Path, array: np.ndarray, sr: int = 16000) -> Path:
    """Write ``array`` ([T] mono or [T, C]) to ``path``; the format follows the suffix (wav/flac/ogg/mp3).

    wav/flac are 16-bit PCM; ogg is Vorbis; mp3 goes through soundfile (libsndfile >= 1.1) or the ffmpeg CLI.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(array, dtype=np.float32)
    suffix = path.suffix.lower()
    try:
        import soundfile as sf

        kw = {
            "wav": {"subtype": "PCM_16"},
            "flac": {"subtype": "PCM_16"},
            "ogg": {"format": "OGG", "subtype": "VORBIS"},
        }
        kw["mp3"] = {"format": "MP3", "subtype": "MPEG_LAYER_III"}
        sf.write(str(path), x, sr, **kw.get(suffix.lstrip("."), {}))
        return path
    except Exception:
        if suffix == ".wav":  # stdlib fallback
            pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
            with wave.open(str(path), "wb") as w:
                w.setnchannels(1 if x.ndim == 1 else x.shape[1])
                w.setsampwidth(2)
                w.setframerate(sr)
                w.writeframes(pcm.tobytes())
            return path
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            wav = write_audio(Path(tmp) / "x.wav", x, sr)
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(path)], check=True)
        return path
