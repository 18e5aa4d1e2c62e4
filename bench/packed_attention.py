"""Packed rows (`data.pack`): attention run by run against the (T, T) block-diagonal mask, side by side.

    python bench/packed_attention.py                          # small, 1 row of 8 conversations x 1024 tokens
    python bench/packed_attention.py --conversations 16 --length 512 --precision bf16-mixed

One training step (forward, backward) of the decoder on a packed row, in `Qwen2Model.packed_attention` "runs"
(`segment_attention`, the default) and "mask" (`segment_mask`, what compiled layers take): median seconds of
`--repeats` steps after a warm-up, the bytes autograd keeps for backward, and the ratios. Both compute the same
numbers (tests/test_packing.py checks outputs and gradients); the runs skip the masked-out blocks' work and keep
no (T, T) mask.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cases import kept_for_backward  # noqa: E402  (bench/cases.py, beside this file)

from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024, help="tokens per conversation")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = MusicFlamingoConfig.from_name(args.preset)
    model = MusicFlamingo(config).to(device).train()
    lm = model.language_model
    T = args.conversations * args.length
    embeds = torch.randn(1, T, config.text.hidden_size, device=device) * 0.02
    seq_ids = torch.arange(args.conversations, device=device).repeat_interleave(args.length)[None]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def forward() -> torch.Tensor:
        with autocast:
            return lm(embeds, seq_ids=seq_ids).float().square().mean()

    def step() -> None:
        forward().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = {}
    for mode in ("runs", "mask"):
        lm.packed_attention = mode
        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        rows[mode] = (statistics.median(times), kept_for_backward(forward, [*model.parameters(), embeds]))
        print(
            f"{mode:>5}: step {rows[mode][0] * 1e3:8.1f} ms   kept for backward {rows[mode][1] / 1e6:8.2f} MB",
            flush=True,
        )
    (t_runs, k_runs), (t_mask, k_mask) = rows["runs"], rows["mask"]
    print(
        f"{args.preset}, {args.precision}, {torch.get_num_threads()} threads, 1 row of {args.conversations} x "
        f"{args.length} tokens: runs / mask time {t_runs / t_mask:.2f}x, kept {k_runs / k_mask:.2f}x"
    )


if __name__ == "__main__":
    main()
