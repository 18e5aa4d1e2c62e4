"""Tiny random reference models (`transformers`, test-only) and model inputs built without our own processor.

Import from tests as ``from reference_model import ...``. The tiny config follows the spec's CPU parity recipe
(§6.3): several layers, GQA, partial rotary (default RoTE factor 0.2 of 80 dims = 16 per axis), full 30 s windows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tiny_assets import TINY_IDS

SR = 16000
WINDOW = 30 * SR


def reference_config(**text_overrides):
    from transformers import AudioFlamingo3EncoderConfig, MusicFlamingoConfig, Qwen2Config

    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        hidden_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_source_positions=1500,
    )
    text_kwargs = dict(
        vocab_size=TINY_IDS.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        rope_theta=1e6,
        pad_token_id=TINY_IDS.pad_token_id,
        eos_token_id=TINY_IDS.eos_token_id,
    )
    text_kwargs.update(text_overrides)
    text = Qwen2Config(**text_kwargs)
    return MusicFlamingoConfig(
        audio_config=audio,
        text_config=text,
        audio_token_id=TINY_IDS.audio_token_id,
        audio_bos_token_id=TINY_IDS.audio_bos_token_id,
        audio_eos_token_id=TINY_IDS.audio_eos_token_id,
    )


def make_reference_model(seed: int = 0, **text_overrides):
    """A random tiny `MusicFlamingoForConditionalGeneration` in fp32 eval mode, with non-trivial norms/biases."""
    from transformers import MusicFlamingoForConditionalGeneration

    torch.manual_seed(seed)
    model = MusicFlamingoForConditionalGeneration(reference_config(**text_overrides)).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def windows_of(audio: np.ndarray, window: int = WINDOW, max_windows: int = 40) -> list[np.ndarray]:
    n = max(1, math.ceil(len(audio) / window))
    n = min(n, max_windows)
    cap = min(len(audio), n * window)
    return [audio[i * window : min((i + 1) * window, cap)] for i in range(n)]


def reference_features(audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Reference WhisperFeatureExtractor features over all windows; returns (features, mask, tokens per audio)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    chunks, per_audio = [], []
    for a in audios:
        w = windows_of(a)
        chunks += w
        per_audio.append(len(w))
    out = fe(chunks, sampling_rate=SR, return_attention_mask=True, return_tensors="pt")
    feats, mask = out["input_features"], out["attention_mask"].to(torch.int32)
    tokens, row = [], 0
    for n in per_audio:
        L = int(mask[row : row + n].sum())
        tokens.append(((L - 1) // 2 + 1 - 2) // 2 + 1)
        row += n
    return feats, mask, tokens


def build_batch(audios: list[np.ndarray], text_lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """One audio per row: random text ids, bos, <sound>*N, eos, more text; rows left-padded with pad id."""
    g = torch.Generator().manual_seed(seed)
    feats, mask, tokens = reference_features(audios) if audios else (None, None, [])
    rows = []
    for i, n_text in enumerate(text_lengths):
        pre = torch.randint(0, 290, (3,), generator=g).tolist()
        post = torch.randint(0, 290, (n_text,), generator=g).tolist()
        audio = []
        if i < len(tokens):
            audio = (
                [TINY_IDS.audio_bos_token_id]
                + [TINY_IDS.audio_token_id] * tokens[i]
                + [TINY_IDS.audio_eos_token_id]
            )
        rows.append(pre + audio + post)
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), TINY_IDS.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r) :] = torch.tensor(r)
        attn[i, S - len(r) :] = 1
    batch = {"input_ids": ids, "attention_mask": attn}
    if feats is not None:
        batch["input_features"] = feats
        batch["input_features_mask"] = mask
    labels = ids.clone()
    labels[attn == 0] = -100
    labels[
        (ids == TINY_IDS.audio_token_id)
        | (ids == TINY_IDS.audio_bos_token_id)
        | (ids == TINY_IDS.audio_eos_token_id)
    ] = -100
    batch["labels"] = labels
    return batch


def random_audio(seconds: float | None = None, samples: int | None = None, seed: int = 0) -> np.ndarray:
    n = samples if samples is not None else int(seconds * SR)
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(n)).astype(np.float32)
