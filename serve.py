"""Serve Music Flamingo over an OpenAI-compatible API, with a web page to try songs.

    python serve.py ckpt=DIR                                  # http://127.0.0.1:8000 (page at /, API at /v1)
    python serve.py ckpt=DIR max_batch=16 port=8080 api_key=SECRET
    python serve.py ckpt=DIR host=0.0.0.0 audio_root=/srv/songs   # reachable from other machines

A thin Hydra wrapper around :func:`musicflamingo.serve.serve`; settings: configs/serve.yaml, guide:
docs/serving.md.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from musicflamingo.cli import run_cli, run_entry_point


def run(cfg: DictConfig) -> None:
    # imported here, not at the top: a command line Hydra refuses (a typo'd key) is named without importing torch
    from musicflamingo.serve import serve
    from musicflamingo.settings import check_serve_plan_settings

    check_serve_plan_settings(cfg)  # log_level is used before serve() checks the rest
    logging.basicConfig(
        level=str(cfg.get("log_level", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    serve(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: run(cfg))  # bad checkpoint or settings: one line, exit 2, no traceback


if __name__ == "__main__":
    run_entry_point(main, "serve")  # a command line Hydra cannot read or compose: one line, exit 2
