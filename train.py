"""Train or fine-tune Music Flamingo: `python train.py experiment=<name> data.train=<jsonl> trainer.max_steps=N`.

All logic lives in `musicflamingo.training.train(cfg)`, which tests call with a composed config.
"""

import hydra
from omegaconf import DictConfig

from musicflamingo.cli import run_cli, run_entry_point


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # imported here, not at the top: a command line Hydra refuses (a typo'd key) is named without importing torch
    from musicflamingo.training import train

    result = run_cli(lambda: train(cfg))
    if result is None:  # a sweep job that failed with an input error (named already); the next job runs
        return None
    return result[0].get("train/loss")


if __name__ == "__main__":
    run_entry_point(main, "train")  # a command line Hydra cannot read or compose: one line, exit 2
