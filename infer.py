r"""Ask Music Flamingo about audio files, or chat with it.

    python infer.py ckpt=DIR audio=song.mp3 'prompt="What is the tempo, and the key?"'
    python infer.py ckpt=DIR audio=[a.mp3,b.wav] max_new_tokens=256
    python infer.py ckpt=DIR audio=song.mp3 interactive=true
    python infer.py ckpt=DIR audio=song.mp3 'stop="\n\n"'    # each answer ends before its first blank line
    python infer.py ckpt=DIR audio=music/ output=answers.jsonl skip_bad_audio=true   # resumable
    python infer.py ckpt=DIR audio=items.jsonl output=answers.jsonl   # {"audio": "a.mp3", "prompt": "..."} a line
    python infer.py ckpt=DIR 'audio="Artist - Song (feat. X) [Remix].flac"'       # Hydra quotes

A thin Hydra wrapper around :func:`musicflamingo.inference.infer`; settings: configs/infer.yaml.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from musicflamingo.cli import run_cli, run_entry_point


def run(cfg: DictConfig) -> list[str]:
    # imported here, not at the top: a command line Hydra refuses (a typo'd key) is named without importing torch
    from musicflamingo.inference import infer
    from musicflamingo.settings import check_infer_settings

    check_infer_settings(cfg)  # log_level is used before infer() checks the rest
    logging.basicConfig(
        level=str(cfg.get("log_level", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return infer(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: run(cfg))  # bad checkpoint, audio or settings: one line, exit 2, no traceback


if __name__ == "__main__":
    # a song or prompt Hydra cannot read: how to quote it, not a lexer error; a misspelt key: one line, exit 2
    run_entry_point(main, "infer", __doc__)
