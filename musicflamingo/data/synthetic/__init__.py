"""Synthetic music corpus with known ground truth (key, tempo, metre, instrument), rendered with FluidSynth.

``build_corpus(out_dir, seed=0, n_train=400, ...)`` writes ``train/val/test.jsonl`` (caption + four-option
multiple-choice records per clip), 16 kHz WAV clips and ``corpus.json``; ``corpus_texts(info)`` returns the
text for tokenizer training. Command line: ``python -m musicflamingo.data.synthetic --out data/synthetic``.
"""

from musicflamingo.data.synthetic.build import (
    SPLITS,
    CorpusConfig,
    CorpusConfigError,
    CorpusInfo,
    build_corpus,
    corpus_texts,
)
from musicflamingo.data.synthetic.render import SynthesizerNotFoundError
from musicflamingo.data.synthetic.text import NUM_OPTIONS, QUESTION_TYPES

__all__ = [
    "NUM_OPTIONS",
    "QUESTION_TYPES",
    "SPLITS",
    "CorpusConfig",
    "CorpusConfigError",
    "CorpusInfo",
    "SynthesizerNotFoundError",
    "build_corpus",
    "corpus_texts",
]
