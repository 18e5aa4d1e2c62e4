"""Score a Music Flamingo checkpoint on one benchmark.

    python eval.py benchmark=mmau ckpt=/path/to/ckpt benchmark.root=/path/to/MMAU [limit=100] [batch_size=8]

A thin Hydra wrapper around :func:`musicflamingo.eval.evaluate`; results land in ``output_dir``
(``outputs/eval/<benchmark>/<tag>``) and a rerun with the same settings resumes there. Scoring rules:
docs/evaluation.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from musicflamingo.audio.io import AudioError
from musicflamingo.checkpoint import CheckpointError
from musicflamingo.eval import BenchmarkError, EvalConfigError, PredictionsFileError, evaluate, headline
from musicflamingo.model.config import ConfigError
from musicflamingo.tokenizer import TokenizerError

# Bad config, data, audio or checkpoint: one clear line instead of a traceback.
USER_ERRORS = (
    EvalConfigError,
    BenchmarkError,
    PredictionsFileError,
    AudioError,
    CheckpointError,
    ConfigError,
    TokenizerError,
)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        results = evaluate(cfg)
    except USER_ERRORS as e:
        sys.exit(f"eval.py: error: {e}")
    print(headline(results))
    print(f"results: {results['files']['results_md']}")


if __name__ == "__main__":
    main()
