"""Throughput of one `serve.py` process: the same requests sent one at a time, then all at once (continuous
batching), on loopback. Prints tokens/s of both, their ratio, and whether every answer was the same.

    python bench/serve.py                              # a random `small`-sized decoder, 64 requests, max_batch 16
    python bench/serve.py --ckpt DIR --requests 128 --max-batch 32 --device cuda
    python bench/serve.py --size tiny --max-tokens 32  # the tests' tiny model (Python overhead dominates)

Requests: songs of 0.5 to 20 s (synthetic tones) times eight questions, `--max-tokens` each, streamed (SSE) with
usage, greedy. Throughput is generated tokens over wall-clock time, client included (both run on this machine).
The numbers go in docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_checkpoint / tiny_assets: random checkpoints, synthetic audio

from tiny_assets import make_tone, write_audio  # noqa: E402
from tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

MODEL = "bench"
SECONDS = (0.5, 1.0, 2.0, 3.5, 5.0, 8.0, 12.0, 20.0)
QUESTIONS = (
    "Describe this track.",
    "What is the tempo?",
    "What key is it in?",
    "Which instruments play?",
    "Is there singing?",
    "What genre is it?",
    "How does it end?",
    "Generate a structured lyric sheet from the input music.",
)
# The `small` preset's decoder (4 x 256) on the tiny tokenizer: a model where a decode step costs more than
# Python's bookkeeping, as it does for the release.
SIZES = {
    "tiny": {},
    "small": dict(
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4)
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable,
        str(ROOT / "serve.py"),
        f"ckpt={ckpt}",
        f"port={port}",
        f"model_name={MODEL}",
        *overrides,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve.py did not come up in 300 s")


def body(song: Path, question: str, max_tokens: int) -> dict:
    audio = {"data": base64.b64encode(song.read_bytes()).decode(), "format": "wav"}
    content = [{"type": "input_audio", "input_audio": audio}, {"type": "text", "text": question}]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one(h: httpx.AsyncClient, base: str, payload: dict) -> tuple[str, int, float]:
    """(text, completion tokens, seconds to the first content) of one streamed request."""
    t0, first, text, tokens = time.perf_counter(), None, [], 0
    async with h.stream("POST", f"{base}/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text.append(choice["delta"]["content"])
    return "".join(text), tokens, first or 0.0


async def run(base: str, payloads: list[dict], concurrent: bool) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=len(payloads) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as h:
        await one(h, base, payloads[0])  # warm-up: first allocations, first kernels
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(h, base, p) for p in payloads))
        else:
            results = [await one(h, base, p) for p in payloads]
        return results, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, help="a checkpoint folder (default: a random one, --size)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        ckpt = args.ckpt or write_tiny_checkpoint(tmp / f"random-{args.size}", seed=0, **SIZES[args.size])
        songs = [
            write_audio(tmp / f"song_{i}.wav", make_tone(110 * (i + 2), s)) for i, s in enumerate(SECONDS)
        ]
        pairs = [(s, q) for s in songs for q in QUESTIONS]
        payloads = [body(*pairs[i % len(pairs)], args.max_tokens) for i in range(args.requests)]
        overrides = [
            f"device={args.device}",
            f"dtype={args.dtype}",
            f"max_batch={args.max_batch}",
            f"max_queue={max(64, args.requests)}",
            "log_level=WARNING",
            f"compile={str(args.compile).lower()}",
        ]
        if args.threads:
            overrides.append(f"threads={args.threads}")
        proc, base = start_server(ckpt, overrides)
        server = psutil.Process(proc.pid)
        try:
            seq, seq_s = asyncio.run(run(base, payloads, concurrent=False))
            rss_seq = server.memory_info().rss
            par, par_s = asyncio.run(run(base, payloads, concurrent=True))
            rss_par = server.memory_info().rss
            health = httpx.get(f"{base}/health", timeout=10).json()
        finally:
            proc.terminate()
            proc.wait(30)

    seq_tokens, par_tokens = sum(r[1] for r in seq), sum(r[1] for r in par)
    same = sum(a[0] == b[0] for a, b in zip(seq, par))
    result = {
        "model": str(args.ckpt or f"random {args.size}"),
        "device": args.device,
        "requests": args.requests,
        "max_batch": args.max_batch,
        "max_tokens": args.max_tokens,
        "sequential_tokens_per_s": seq_tokens / seq_s,
        "concurrent_tokens_per_s": par_tokens / par_s,
        "ratio": (par_tokens / par_s) / (seq_tokens / seq_s),
        "sequential_s": seq_s,
        "concurrent_s": par_s,
        "tokens": par_tokens,
        "mean_first_token_s_sequential": sum(r[2] for r in seq) / len(seq),
        "mean_first_token_s_concurrent": sum(r[2] for r in par) / len(par),
        "answers_equal": f"{same}/{len(seq)}",
        "peak_live": health["peak_live"],
        "server_rss_mib": [round(rss_seq / 2**20), round(rss_par / 2**20)],
    }
    print(
        f"{result['model']} on {args.device}, {args.requests} requests x {args.max_tokens} tokens, "
        f"max_batch {args.max_batch}:\n"
        f"  one at a time  {result['sequential_tokens_per_s']:8.1f} tokens/s  ({seq_s:.1f} s, first token "
        f"{result['mean_first_token_s_sequential'] * 1000:.0f} ms)\n"
        f"  all at once    {result['concurrent_tokens_per_s']:8.1f} tokens/s  ({par_s:.1f} s, first token "
        f"{result['mean_first_token_s_concurrent'] * 1000:.0f} ms, {health['peak_live']} decoding together)\n"
        f"  ratio          {result['ratio']:8.2f}x   answers equal: {result['answers_equal']}   "
        f"server RSS {result['server_rss_mib'][0]} -> {result['server_rss_mib'][1]} MiB"
    )
    print("BENCH_RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
