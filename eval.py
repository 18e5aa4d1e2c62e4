"""Score a Music Flamingo checkpoint on one benchmark.

    python eval.py benchmark=mmau ckpt=/path/to/ckpt benchmark.root=/path/to/MMAU [limit=100] [batch_size=8]

A thin Hydra wrapper around :func:`musicflamingo.eval.evaluate`; results land in ``output_dir``
(``outputs/eval/<benchmark>/<tag>``) and a rerun with the same settings resumes there. Scoring rules:
docs/evaluation.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from musicflamingo.cli import run_cli, run_entry_point


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    # imported here, not at the top: a command line Hydra refuses (a typo'd key) is named without importing torch
    from musicflamingo.eval import evaluate, headline

    # Bad settings, data, audio or checkpoint: one clear line (exit 2) instead of a traceback.
    results = run_cli(lambda: evaluate(cfg), prefix="eval.py: error")
    if results is None or "plan" in results:  # a failed sweep job (named already), or plan=true: nothing ran
        return
    print(headline(results))
    print(f"results: {results['files']['results_md']}")


if __name__ == "__main__":
    run_entry_point(main, "eval")  # a command line Hydra cannot read or compose: one line, exit 2
