"""Train or fine-tune Music Flamingo: `python train.py experiment=<name> data.train=<jsonl> trainer.max_steps=N`.

All logic lives in `musicflamingo.training.train(cfg)`, which tests call with a composed config.
"""

import hydra
from omegaconf import DictConfig

from musicflamingo.cli import run_cli
from musicflamingo.training import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = run_cli(lambda: train(cfg))
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()
