"""Ask Music Flamingo about audio files, or chat with it.

    python infer.py ckpt=DIR audio=song.mp3 'prompt="What is the tempo, and the key?"'
    python infer.py ckpt=DIR audio=[a.mp3,b.wav] max_new_tokens=256
    python infer.py ckpt=DIR audio=song.mp3 interactive=true

A thin Hydra wrapper around :func:`musicflamingo.inference.infer`; settings: configs/infer.yaml.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from musicflamingo.cli import run_cli
from musicflamingo.inference import infer


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(
        level=str(cfg.get("log_level", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    run_cli(lambda: infer(cfg))  # bad checkpoint, audio or settings: one line, exit 2, no traceback


if __name__ == "__main__":
    main()
