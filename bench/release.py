"""The release-size model (`music_flamingo_2601`, 8.27 B) on this machine: ours against the reference, each in its
own process (they do not fit in memory together), plus the machine's own limits measured in the same run.

    make bench-release                                   # = python bench/release.py (writes the table below)
    python bench/release.py --preset tiny --out /tmp/r   # smoke run on the tiny preset (seconds)

A random checkpoint of the exact release shapes (bf16, 5 GB shards, written by our `save_pretrained`) is made once
under `--ckpt` (default `outputs/release-ckpt`, ~100 s, 16.5 GB) and reused. Each implementation then runs in a
fresh worker process, in bf16, with the same threads: load time (files in the page cache), process start to first
token (30 s of audio), time to first token for 30 s and 5 min of audio (`generate(max_new_tokens=1)`: encoder,
RoTE, projector, prefill, one argmax), decode tokens/s at batch 1 and 4 (time from the first new token to the
last), and peak RSS. The machine's limits: the bf16 matmul rate (`flops.matmul_ceiling`) and the memory read
bandwidth (summing a 2 GB tensor), so each number can be read against what is physically possible. The table
goes between the `bench:release` markers of docs/performance.md and the JSON to `bench/results_release.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()  # process start, for "start -> first token"

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# ---------------------------------------------------------------------------------------------- checkpoint
def write_checkpoint(path: Path, preset: str) -> dict:
    """Random weights of the preset's exact shapes in bf16, written by our `save_pretrained`; reused when present."""
    from musicflamingo import MusicFlamingo, MusicFlamingoConfig

    config = MusicFlamingoConfig.from_name(preset)
    if (path / "config.json").is_file():
        return {"params": config.num_parameters(), "written_s": 0.0}
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = MusicFlamingo(config)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # normal(0, 0.02): values do not matter for speed, only that they are finite
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.reset_buffers("cpu")
    model.save_pretrained(path, max_shard_size="5GB")
    return {"params": config.num_parameters(), "written_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- worker
def _inputs(config, seconds: float, batch: int, text: int = 16) -> dict:
    from cases import audio_batch, windows_for

    w = windows_for(config, seconds)
    inputs = audio_batch(config, [w] * batch, [text] * batch, seed=1)
    inputs.pop("labels")
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    return inputs


def _generate(impl: str, model, inputs: dict, n: int, pad: int, streamer=None) -> torch.Tensor:
    if impl == "ours":
        return model.generate(**inputs, max_new_tokens=n, stop_token_ids=[])
    kw = {"streamer": streamer} if streamer is not None else {}
    return model.generate(
        **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad, **kw
    )


def worker(impl: str, ckpt: str, cases: list[str], decode_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from cases import _TimingStreamer, load_ours, load_ref

    from musicflamingo import MusicFlamingoConfig

    config = MusicFlamingoConfig.from_json(Path(ckpt) / "config.json")
    pad = config.text.pad_token_id or 0
    out: dict = {}
    t0 = time.perf_counter()
    model = (load_ours if impl == "ours" else load_ref)(ckpt, torch.bfloat16, torch.device("cpu"))
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_gb"] = peak_rss_gb()
    with torch.inference_mode():
        for case in cases:
            kind, arg = case.split(":")
            if kind == "ttft":
                seconds = float(arg)
                inputs = _inputs(config, seconds, 1)
                t0 = time.perf_counter()
                _generate(impl, model, inputs, 1, pad)
                out[f"ttft_{arg}s"] = time.perf_counter() - t0
                out.setdefault("start_to_first_token_s", time.perf_counter() - START)
            elif kind == "decode":
                batch = int(arg)
                inputs = _inputs(config, 30.0, batch)
                if impl == "ours":
                    stamps = []
                    for _ in model.stream_generate(**inputs, max_new_tokens=decode_tokens, stop_token_ids=[]):
                        stamps.append(time.perf_counter())
                else:
                    streamer = _TimingStreamer(torch.device("cpu"))
                    _generate(impl, model, inputs, decode_tokens, pad, streamer)
                    stamps = streamer.times[1:]
                out[f"decode_b{batch}_tokens_s"] = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def machine_limits(threads: int, quick: bool) -> dict:
    from flops import matmul_ceiling

    torch.set_num_threads(threads)
    sizes = (512,) if quick else (2048, 4096)
    flops = matmul_ceiling("cpu", torch.bfloat16, sizes, repeats=3 if quick else 5)["flops"]
    x = torch.ones(int(2e8 if quick else 1e9), dtype=torch.bfloat16)  # 0.4 / 2 GB
    x.sum()
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 2 / (time.perf_counter() - t0))
    return {"bf16_matmul_tflops": flops / 1e12, "read_gb_s": sorted(rates)[1] / 1e9}


# ---------------------------------------------------------------------------------------------- report
ROWS = [
    ("load_s", "from_pretrained, s", "lower"),
    ("start_to_first_token_s", "process start -> first token (30 s audio), s", "lower"),
    ("ttft_30s", "time to first token, 30 s audio, s", "lower"),
    ("ttft_300s", "time to first token, 5 min audio, s", "lower"),
    ("decode_b1_tokens_s", "decode batch 1, tokens/s", "higher"),
    ("decode_b4_tokens_s", "decode batch 4, tokens/s", "higher"),
    ("peak_rss_gb", "peak RSS, GB", "lower"),
]


def render(result: dict) -> str:
    ours, ref, m = result["ours"], result["ref"], result["machine"]
    lines = ["| measure | ours | reference | ours / ref |", "|---|---:|---:|---:|"]
    for key, label, _ in ROWS:
        a, b = ours.get(key), ref.get(key)
        if a is None or b is None:
            continue
        lines.append(f"| {label} | {a:.3g} | {b:.3g} | {a / b:.2f}x |")
    weights_gb = result["weights_gb"]
    lines += [
        "",
        f"Machine limits measured in the same run: bf16 matmul {m['bf16_matmul_tflops']:.2f} TFLOP/s, memory read "
        f"{m['read_gb_s']:.1f} GB/s; weights {weights_gb:.1f} GB, so decode at batch 1 can reach at most "
        f"~{m['read_gb_s'] / weights_gb:.2f} tokens/s (one read of every weight per token).",
    ]
    return "\n".join(lines)


def update_doc(path: Path, body: str, command: str, wall_s: float) -> None:
    begin, end = "<!-- bench:release:begin -->", "<!-- bench:release:end -->"
    block = f"{begin}\nCommand: `{command}` ({wall_s / 60:.1f} min), {time.strftime('%Y-%m-%d')}.\n\n{body}\n{end}"
    text = path.read_text()
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## Results (release size, CPU)\n\n{block}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="music_flamingo_2601")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (made once, reused)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cases", default="ttft:30,ttft:300,decode:1,decode:4")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON results (default bench/results_release.json)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    ap.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.preset != "music_flamingo_2601"
    ckpt = Path(args.ckpt or ROOT / "outputs" / ("release-ckpt" if not quick else f"{args.preset}-ckpt"))
    cases = args.cases.split(",")
    if args.worker:
        print(json.dumps(worker(args.worker, str(ckpt), cases, args.decode_tokens, args.threads)))
        return 0
    t0 = time.perf_counter()
    print(f"[release] checkpoint {ckpt} ...", flush=True)
    info = write_checkpoint(ckpt, args.preset)
    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    result = {"preset": args.preset, "threads": args.threads, "weights_gb": weights / 1e9, **info}
    result["machine"] = machine_limits(args.threads, quick)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for impl in ("ours", "ref"):
        print(f"[release] {impl} ...", flush=True)
        cmd = [sys.executable, __file__, "--worker", impl, "--ckpt", str(ckpt), "--cases", args.cases]
        cmd += ["--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
        result[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - t0
    table = render(result)
    print(table)
    out = Path(args.out or HERE / "results_release.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        command = "python bench/release.py" + ("" if not argv else " " + " ".join(argv))
        update_doc(ROOT / "docs" / "performance.md", table, command, wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
