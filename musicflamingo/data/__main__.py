"""Data preparation commands: ``python -m musicflamingo.data <command> ...``.

    python -m musicflamingo.data index data/train.jsonl data/val.jsonl --processor CKPT_DIR
    python -m musicflamingo.data shard data/train.jsonl s3://bucket/train-shards --workers 8

Each command's module gives ``add_parser(subparsers)``, which adds its subcommand with ``set_defaults(func=...)``;
a new command is one entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from musicflamingo.cli import run_cli
from musicflamingo.data import index, shards

COMMANDS = (index.add_parser, shards.add_parser)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musicflamingo.data", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(lambda: args.func(args))


if __name__ == "__main__":
    main()
