"""A complete, tiny, random Music Flamingo checkpoint folder for tests (inference, evaluation, training).

``write_tiny_checkpoint(dir)`` writes what ``save_pretrained`` of a real run writes: ``config.json``,
``generation_config.json``, ``model.safetensors`` (preset ``tiny``, random weights from ``seed``) and the processor
files (``tokenizer.json``, ``tokenizer_config.json``, ``processor_config.json``, ``preprocessor_config.json``,
``chat_template.jinja``) built on the tiny tokenizer of :mod:`tiny_assets`, whose special ids the ``tiny`` preset
uses: pad 297, ``<|im_end|>`` (eos) 299, ``<sound>`` 300, ``<|sound_bos|>`` 301, ``<|sound_eos|>`` 302, vocab 303.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_assets import TINY_IDS, write_tiny_tokenizer

from musicflamingo import MusicFlamingo, MusicFlamingoConfig, MusicFlamingoProcessor
from musicflamingo.tokenizer import load_tokenizer


def write_tiny_checkpoint(dirpath: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random model + processor into ``dirpath`` and return the folder.

    ``overrides`` go to ``MusicFlamingoConfig.from_name("tiny", ...)`` (e.g. ``text={"num_hidden_layers": 1}``);
    the token ids must stay those of the tiny tokenizer. The global RNG is left untouched.
    """
    out = Path(dirpath)
    config = MusicFlamingoConfig.from_name("tiny", **overrides)
    ids = (config.text.pad_token_id, config.text.eos_token_id, config.audio_token_id, config.text.vocab_size)
    expected = (TINY_IDS.pad_token_id, TINY_IDS.eos_token_id, TINY_IDS.audio_token_id, TINY_IDS.vocab_size)
    if ids != expected:
        raise ValueError(
            f"tiny checkpoint token ids (pad, eos, <sound>, vocab) {ids} != tokenizer's {expected}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicFlamingo(config).eval()
    model.save_pretrained(out)

    write_tiny_tokenizer(out)  # tokenizer.json + tokenizer_config.json, read back through our loader
    processor = MusicFlamingoProcessor(load_tokenizer(out), chunk_length=config.window_seconds)
    processor.save_pretrained(out)
    return out
