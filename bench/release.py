"""The release-size model (`music_flamingo_2601`, 8.27 B) on this machine: ours against the reference, each in its
own process (they do not fit in memory together), plus the machine's own limits measured in the same run.

    make bench-release                                   # = python bench/release.py (writes the table below)
    python bench/release.py --preset tiny --out /tmp/r   # smoke run on the tiny preset (seconds)

A random checkpoint of the exact release shapes (bf16, 5 GB shards, written by our `save_pretrained`) is made once
under `--ckpt` (default `outputs/release-ckpt`, ~100 s, 16.5 GB) and reused. Each implementation then runs in a
fresh worker process, in bf16, with the same threads: load time (files in the page cache), process start to first
token (30 s of audio), time to first token for 30 s and 5 min of audio (`generate(max_new_tokens=1)`: encoder,
RoTE, projector, prefill, one argmax), decode tokens/s at batch 1 and 4 (time from the first new token to the
last), and peak RSS. The machine's limits: the bf16 matmul rate (`flops.matmul_ceiling`), the memory read
bandwidth (summing a 2 GB tensor) and how much faster the int8 GEMM runs than the bf16 one, so each number can be
read against what is physically possible. The table goes between the `bench:release` markers of
docs/performance.md and the JSON to `bench/results_release.json`.
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
    """This process's peak resident set (VmHWM; memory-mapped weights count once paged in). Not `ru_maxrss`:
    Linux carries that across fork and exec, so a worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# ---------------------------------------------------------------------------------------------- checkpoint
def write_checkpoint(path: Path, preset: str) -> dict:
    """Random weights of the preset's exact shapes in bf16, written by our `save_pretrained`; reused when present."""
    from cases import random_model

    from musicflamingo import MusicFlamingoConfig

    config = MusicFlamingoConfig.from_name(preset)
    if (path / "config.json").is_file():
        return {"params": config.num_parameters(), "written_s": 0.0}
    t0 = time.perf_counter()
    random_model(config, torch.device("cpu")).save_pretrained(path, max_shard_size="5GB")
    return {"params": config.num_parameters(), "written_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- worker
def _stream(impl: str, model, inputs: dict, n: int, pad: int) -> list[float]:
    """perf_counter at every new token (the first one included)."""
    if impl != "ref":
        stamps = []
        for _ in model.stream_generate(**inputs, max_new_tokens=n, stop_token_ids=[]):
            stamps.append(time.perf_counter())
        return stamps
    from cases import _TimingStreamer, greedy_generate

    streamer = _TimingStreamer(torch.device("cpu"))
    greedy_generate(impl, model, inputs, n, pad, streamer)
    return streamer.times[1:]  # the first `put` is the prompt


def _load(impl: str, ckpt: str):
    if impl == "ref":
        from cases import load_ref

        return load_ref(ckpt, torch.bfloat16, torch.device("cpu"))
    from musicflamingo import MusicFlamingo

    return MusicFlamingo.from_pretrained(
        ckpt, dtype=torch.bfloat16
    )  # int8, int4: a quantized checkpoint folder


def worker(impl: str, ckpt: str, cases: list[str], decode_tokens: int, threads: int) -> dict:
    """Cases: `first:S` (S s of audio, batch 1: time to first token, then decode tokens/s), `ttft:S` (one
    token), `decode:B` (B rows of 64 text tokens: decode tokens/s at batch B)."""
    torch.set_num_threads(threads)
    from cases import greedy_generate, release_inputs

    from musicflamingo import MusicFlamingoConfig

    config = MusicFlamingoConfig.from_json(Path(ckpt) / "config.json")
    pad = config.text.pad_token_id or 0
    out: dict = {"cpu": cpu_name(), "rss_before_load_gb": peak_rss_gb()}
    t0 = time.perf_counter()
    model = _load(impl, ckpt)
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_gb"] = peak_rss_gb()
    with torch.inference_mode():
        for case in cases:
            kind, arg = case.split(":")
            if kind == "first":
                inputs = release_inputs(config, float(arg), 1)
                t0 = time.perf_counter()
                stamps = _stream(impl, model, inputs, decode_tokens, pad)
                out[f"ttft_{arg}s"] = stamps[0] - t0
                out.setdefault("start_to_first_token_s", stamps[0] - START)
                out["decode_b1_tokens_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
            elif kind == "ttft":
                inputs = release_inputs(config, float(arg), 1)
                t0 = time.perf_counter()
                greedy_generate(impl, model, inputs, 1, pad)
                out[f"ttft_{arg}s"] = time.perf_counter() - t0
                out.setdefault("start_to_first_token_s", time.perf_counter() - START)
            elif kind == "decode":
                batch = int(arg)
                stamps = _stream(impl, model, release_inputs(config, 0, batch), decode_tokens, pad)
                out[f"decode_b{batch}_tokens_s"] = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
            else:
                raise SystemExit(f"unknown case {case!r} (first:S, ttft:S, decode:B)")
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def quantized_checkpoint(src: Path, method: str) -> dict:
    """`src-<method>`: the int8 or int4 checkpoint of `src` (`from_pretrained(quantize=...)` + `save_pretrained`),
    made once."""
    dst = src.with_name(f"{src.name}-{method}")
    if (dst / "config.json").is_file():
        return {f"{method}_quantize_s": None}
    from musicflamingo import MusicFlamingo

    t0 = time.perf_counter()
    model = MusicFlamingo.from_pretrained(src, dtype=torch.bfloat16, quantize=method)
    took = time.perf_counter() - t0
    model.save_pretrained(dst)
    return {f"{method}_quantize_s": took}


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX: results are only comparable on the same kind of CPU."""
    model, amx = "unknown CPU", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                amx = "amx_bf16" in line.split()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} vCPUs, {'AMX' if amx else 'no AMX'}"


def machine_limits(threads: int, quick: bool) -> dict:
    from flops import matmul_ceiling

    torch.set_num_threads(threads)
    sizes = (512,) if quick else (2048, 4096)
    flops = matmul_ceiling("cpu", torch.bfloat16, sizes, repeats=3 if quick else 5)["flops"]
    x = torch.ones(int(2.5e7 if quick else 1e9), dtype=torch.bfloat16)  # 50 MB (smoke runs) / 2 GB
    best = 0.0
    # Summed as bf16 and as float32 (the same bytes, two bf16 ones read as one finite float): on an Intel Xeon the
    # bf16 sum is bound by its conversions (12 GB/s against 19 for float32), on an AMD EPYC neither is.
    for view in (x, x.view(torch.float32)):
        view.sum()
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            view.sum()
            rates.append(x.numel() * 2 / (time.perf_counter() - t0))
        best = max(best, sorted(rates)[1])
    return {
        "bf16_matmul_tflops": flops / 1e12,
        "read_gb_s": best / 1e9,
        "int8_gemm_vs_bf16": int8_gemm_speedup(quick),
        "cpu": cpu_name(),
    }


def int8_gemm_speedup(quick: bool) -> float:
    """How much faster `torch._int_mm` (int8 x int8 -> int32, the int8 prefill's GEMM) runs than the bf16 GEMM on
    a prefill product of the release's MLP shape, (1024, 3584) x (3584, 18944); median of 3 each, after a warm one.
    The int8 prefill pays for its activation quantization and rescale passes out of this gain."""
    m, k, n = (256, 512, 1024) if quick else (1024, 3584, 18944)
    g = torch.Generator().manual_seed(0)
    a8, b8 = (torch.randint(-127, 128, s, dtype=torch.int8, generator=g) for s in ((m, k), (n, k)))
    a16, b16 = a8.to(torch.bfloat16), b8.to(torch.bfloat16)
    # Each as the model calls it: int8 into a reused buffer, bf16 through F.linear.
    acc = torch.empty(m, n, dtype=torch.int32)
    times = {}
    for name, fn in (
        ("int8", lambda: torch._int_mm(a8, b8.t(), out=acc)),
        ("bf16", lambda: torch.nn.functional.linear(a16, b16)),
    ):
        fn()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = sorted(runs)[1]
    return times["bf16"] / times["int8"]


# ---------------------------------------------------------------------------------------------- report
ROWS = [
    ("load_s", "from_pretrained, s"),
    ("rss_before_load_gb", "RSS before load (imports), GB"),
    ("rss_after_load_gb", "RSS after load, GB"),
    ("start_to_first_token_s", "process start -> first token (30 s audio), s"),
    ("ttft_30s", "time to first token, 30 s audio, s"),
    ("ttft_300s", "time to first token, 5 min audio, s"),
    ("decode_b1_tokens_s", "decode batch 1, tokens/s"),
    ("decode_b4_tokens_s", "decode batch 4, tokens/s"),
    ("peak_rss_gb", "peak RSS, GB"),
]


def prefill_flops(config, windows: int, text_tokens: int = 16 + 5) -> float:
    """Multiply-add FLOPs (x2) of a batch-1 prefill of `windows` full windows: encoder, projector, decoder, one
    head row; attention counted as QK^T and PV (causal: half of the square in the decoder)."""
    a, t = config.audio, config.text
    frames, tokens = a.max_source_positions, windows * a.tokens_per_window + text_tokens
    enc_lin = a.num_hidden_layers * (4 * a.hidden_size**2 + 2 * a.hidden_size * a.intermediate_size)
    enc = windows * (2 * frames * enc_lin + a.num_hidden_layers * 4 * frames**2 * a.hidden_size)
    proj = 2 * windows * a.tokens_per_window * (a.hidden_size + t.hidden_size) * t.hidden_size
    kv = t.num_key_value_heads * t.head_dim
    dec_lin = t.num_hidden_layers * (
        2 * t.hidden_size**2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size
    )
    dec = 2 * tokens * dec_lin + t.num_hidden_layers * 2 * tokens**2 * t.num_attention_heads * t.head_dim
    return enc + proj + dec + 2 * t.hidden_size * t.vocab_size


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


PARTS = ("ours", "ref", "int8", "int4", "long")


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict with the measured reason where missed) for the issue's targets."""
    ours, ref, q, m = result.get("ours", {}), result.get("ref", {}), result.get("int8", {}), result["machine"]
    q4 = result.get("int4", {})
    ceiling = m["bf16_matmul_tflops"] * 1e12
    rows = []

    def ratio(a, b):
        return None if a is None or b is None else a / b

    r = ratio(ours.get("ttft_30s"), ref.get("ttft_30s"))
    if r is not None:
        f = result["prefill_flops_30s"]
        use_o, use_r = f / ours["ttft_30s"] / ceiling, f / ref["ttft_30s"] / ceiling
        why = (
            "met"
            if r <= 0.5
            else f"missed: the prefill is {f / 1e12:.1f} TFLOP; ours runs at {use_o:.0%} and the reference at {use_r:.0%} "
            f"of this machine's bf16 matmul rate ({m['bf16_matmul_tflops']:.2f} TFLOP/s), so 0.5x would need "
            f"{2 * use_r:.0%} of it"
        )
        rows.append(("time to first token, 30 s, bf16 <= 0.5x reference", f"{r:.2f}x", why))
    r = ratio(ours.get("decode_b1_tokens_s"), ref.get("decode_b1_tokens_s"))
    if r is not None:
        gbs = ours["decode_b1_tokens_s"] * result["decode_bytes"] / 1e9
        need = 2 * ref["decode_b1_tokens_s"] * result["decode_bytes"] / 1e9
        why = (
            "met"
            if r >= 2
            else f"missed: the reference already reads {ref['decode_b1_tokens_s'] * result['decode_bytes'] / 1e9:.1f} "
            f"GB/s (the same bf16 GEMV kernels); 2x would need {need:.1f} GB/s, {need / m['read_gb_s']:.0%} of the "
            "read bandwidth"
        )
        rows.append(
            (
                "decode batch 1, bf16 >= 2x reference",
                f"{r:.2f}x ({gbs:.1f} GB/s of weights read, {gbs / m['read_gb_s']:.0%} of the read bandwidth)",
                why,
            )
        )
    r = ratio(q.get("decode_b1_tokens_s"), ref.get("decode_b1_tokens_s"))
    if r is not None:
        int8_bytes = result["decode_bytes"] / 2  # one byte per weight (+ row scales)
        gbs = q["decode_b1_tokens_s"] * int8_bytes / 1e9
        need = 3.5 * ref["decode_b1_tokens_s"] * int8_bytes / 1e9
        why = (
            "met"
            if r >= 3.5
            else f"missed: int8 steps read {gbs:.1f} GB/s ({gbs / m['read_gb_s']:.0%} of the read bandwidth, the rate "
            f"of aten._weight_int8pack_mm on these shapes); 3.5x would need {need:.1f} GB/s "
            f"({need / m['read_gb_s']:.0%})"
        )
        rows.append(("decode batch 1, int8 >= 3.5x reference bf16", f"{r:.2f}x", why))
    r = ratio(q4.get("decode_b1_tokens_s"), ref.get("decode_b1_tokens_s"))
    if r is not None and result.get("int4_weights_gb"):
        read = result["int4_decode_bytes"]
        gbs = q4["decode_b1_tokens_s"] * read / 1e9
        rows.append(
            (
                "decode batch 1, int4 (the 3.5x goal, with 4-bit weights)",
                f"{r:.2f}x ({gbs:.1f} GB/s of int4 weights and scales, {gbs / m['read_gb_s']:.0%} of the read "
                "bandwidth)",
                "met" if r >= 3.5 else "missed",
            )
        )
    r = ratio(q.get("ttft_30s"), ours.get("ttft_30s"))
    if r is not None:
        rows.append(
            (
                "time to first token, 30 s, int8 no slower than bf16",
                f"{r:.2f}x"
                + (f" (int8 GEMM {g:.2f}x the bf16 rate)" if (g := m.get("int8_gemm_vs_bf16")) else ""),
                "met"
                if r <= 1.0
                else "missed: the int8 GEMM's gain over bf16 on this CPU is smaller than the cost of quantizing "
                "each row's activations and rescaling the int32 results (docs/performance.md, int8 against bf16)",
            )
        )
    if "int8_weights_gb" in result:
        rows.append(
            (
                "int8 weights about 8.3 GB",
                f"{result['int8_weights_gb']:.2f} GB",
                "met, with the embedding table (1.09 GB) kept in bf16: only its rows are read",
            )
        )
    r = ratio(q4.get("ttft_30s"), ours.get("ttft_30s"))
    if r is not None:
        rows.append(
            (
                "time to first token, 30 s, int4 vs bf16 (no target)",
                f"{r:.2f}x",
                "the decoder's prefill dequantizes its 4-bit weights for bf16 GEMMs; the audio tower runs in int8",
            )
        )
    if "int4_weights_gb" in result:
        rows.append(
            (
                "int4 weights (no target)",
                f"{result['int4_weights_gb']:.2f} GB",
                "language model and head in 4 bits, embedding bf16, audio tower and projector int8",
            )
        )
    if ours.get("rss_after_load_gb") is not None:
        grew = ours["rss_after_load_gb"] - ours.get("rss_before_load_gb", 0.0)
        rows.append(
            (
                "RSS growth of a load <= 1.02x weights + a constant",
                f"+{grew:.2f} GB for {result['weights_gb']:.1f} GB of weights (mapped: pages come in on first use; "
                f"peak over the whole run {ours['peak_rss_gb']:.1f} GB = {ours['peak_rss_gb'] / result['weights_gb']:.2f}x)",
                "met" if grew <= 0.02 * result["weights_gb"] + 1.0 else "missed",
            )
        )
    for impl, long in result.get("long", {}).items():
        for key in [k for k in long if k.startswith("ttft_")]:
            rows.append(
                (
                    f"{key[5:-1]} s of audio, {'bf16' if impl == 'ours' else impl}, no out-of-memory",
                    f"time to first token {long[key]:.0f} s, "
                    + (
                        f"peak RSS {long['peak_rss_gb']:.1f} GB"
                        if "peak_rss_gb" in long
                        else "peak RSS not measured"
                    ),
                    "met (ran)"
                    + (f" on {long['cpu']}" if long.get("cpu") not in (None, m.get("cpu")) else ""),
                )
            )
        if "error" in long:
            verdict = "not run" if long["error"].startswith("not run") else "missed"
            text = (
                long["error"][:400] if verdict == "not run" else long["error"][-200:]
            )  # a traceback: its end
            rows.append((f"20 min of audio, {'bf16' if impl == 'ours' else impl}", text, verdict))
    return rows


def render(result: dict) -> str:
    ours, ref, q, m = result.get("ours", {}), result.get("ref", {}), result.get("int8", {}), result["machine"]
    q4 = result.get("int4", {})
    lines = [
        "| measure | ours bf16 | ours int8 | ours int4 | reference bf16 | ours / ref | int8 / ref | int4 / ref |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        a, b, d, c = ours.get(key), q.get(key), q4.get(key), ref.get(key)
        if a is None and b is None and d is None and c is None:
            continue
        r = [f"{x / c:.2f}x" if x is not None and c else "-" for x in (a, b, d)]
        lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {_fmt(d)} | {_fmt(c)} | {' | '.join(r)} |")
    weights_gb = result["weights_gb"]
    lines += [
        "",
        f"Machine limits measured in the same run: bf16 matmul {m['bf16_matmul_tflops']:.2f} TFLOP/s, memory read "
        f"{m['read_gb_s']:.1f} GB/s"
        + (f", int8 GEMM {m['int8_gemm_vs_bf16']:.2f}x the bf16 rate" if "int8_gemm_vs_bf16" in m else "")
        + f"; weights {weights_gb:.1f} GB ({result['decode_bytes'] / 1e9:.1f} GB read per "
        f"decode step: the decoder and the head), so decode at batch 1 can reach at most "
        f"~{m['read_gb_s'] / (result['decode_bytes'] / 1e9):.2f} tokens/s in bf16."
        + (f" CPU: {m['cpu']}." if "cpu" in m else ""),
    ]
    rows = targets(result)
    if rows:
        lines += ["", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def update_doc(path: Path, body: str, command: str, wall_s: float) -> None:
    begin, end = "<!-- bench:release:begin -->", "<!-- bench:release:end -->"
    from report import write_marked

    block = f"{begin}\nCommand: `{command}` ({wall_s / 60:.1f} min), {time.strftime('%Y-%m-%d')}.\n\n{body}\n{end}"
    write_marked(path, begin, end, block, "Results (release size, CPU)")


def _page_in(folder: Path) -> None:
    """Read a checkpoint's files once, so every worker starts with its weights in the page cache (the bf16 and int8
    folders together are larger than this machine's memory: the one used last would otherwise come from disk)."""
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def _run_worker(impl: str, ckpt: Path, cases: str, args, env: dict) -> dict:
    if impl in ("ours", "ref", "int8", "int4"):
        _page_in(ckpt)
    cmd = [sys.executable, __file__, "--worker", impl, "--ckpt", str(ckpt), "--cases", cases]
    cmd += [
        "--decode-tokens",
        str(args.decode_tokens),
        "--threads",
        str(args.threads),
        "--preset",
        args.preset,
    ]
    if args.inprocess:
        return _run_worker_here(cmd[2:])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        # A worker killed for memory (-9) is a result, not a crash of the benchmark: it goes into the table.
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_worker_here(argv: list[str]) -> dict:
    """`--inprocess` (smoke runs of small presets only): the worker's own `main` in this process, its JSON line
    read from its stdout as from a worker process's; this process's thread count is put back after."""
    import contextlib
    import io
    import traceback

    threads, buf = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
    except BaseException as e:  # noqa: BLE001  as a worker process's non-zero exit
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"error": f"exit 1: {''.join(traceback.format_exception(e))[-1500:]}"}
    finally:
        torch.set_num_threads(threads)
    if rc:
        return {"error": f"exit {rc}: {buf.getvalue()[-1500:]}"}
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="music_flamingo_2601")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (made once, reused)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--cases", default="first:30,ttft:300,decode:4", help="bf16 cases, ours and the reference"
    )
    ap.add_argument(
        "--int8-cases", default="first:30,decode:4", help="cases of ours with quantize=int8 ('' skips)"
    )
    ap.add_argument(
        "--int4-cases", default="first:30,decode:4", help="cases of ours with quantize=int4 ('' skips)"
    )
    ap.add_argument(
        "--long-cases", default="ttft:1200", help="ours only, bf16 and int8, own processes ('' skips)"
    )
    ap.add_argument("--long-impls", default="ours,int8", help="which run the long cases: ours (bf16), int8")
    ap.add_argument("--only", default=",".join(PARTS), help="parts to run; the others are kept from --out")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON results (default bench/results_release.json)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    ap.add_argument(
        "--worker",
        choices=["ours", "ref", "int8", "int4", "write", "limits", "quantize-int8", "quantize-int4"],
        help=argparse.SUPPRESS,
    )
    # every worker in this process: the smoke test's tiny preset only (the release size needs their own processes)
    ap.add_argument("--inprocess", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.preset != "music_flamingo_2601"
    if args.inprocess and not quick:
        ap.error("--inprocess is for small presets: the release size's workers need their own processes")
    ckpt = Path(args.ckpt or ROOT / "outputs" / ("release-ckpt" if not quick else f"{args.preset}-ckpt"))
    if args.worker == "write":
        print(json.dumps(write_checkpoint(ckpt, args.preset)))
        return 0
    if args.worker == "limits":
        print(json.dumps(machine_limits(args.threads, quick)))
        return 0
    if args.worker and args.worker.startswith("quantize-"):
        print(json.dumps(quantized_checkpoint(ckpt, args.worker.split("-")[1])))
        return 0
    if args.worker:
        cases = [c for c in args.cases.split(",") if c]
        print(json.dumps(worker(args.worker, str(ckpt), cases, args.decode_tokens, args.threads)))
        return 0
    from musicflamingo import MusicFlamingoConfig

    out = Path(args.out or HERE / "results_release.json")
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    print(f"[release] checkpoint {ckpt} ...", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    info = _run_worker("write", ckpt, "", args, env)
    if "error" in info:
        raise SystemExit(f"writing the checkpoint failed:\n{info['error']}")
    config = MusicFlamingoConfig.from_name(args.preset)
    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    previous = json.loads(out.read_text()) if out.is_file() and only != set(PARTS) else {}
    result = {**previous, "preset": args.preset, "threads": args.threads, "weights_gb": weights / 1e9, **info}
    t = config.text
    result["decode_bytes"] = 2 * (
        config.num_parameters() - _audio_params(config) - t.vocab_size * t.hidden_size
    )
    result["prefill_flops_30s"] = prefill_flops(config, 1)
    # Every step that allocates runs in a process of its own: this one stays small (its freed memory would not go
    # back to the system, and the workers' weights need the page cache).
    result["machine"] = _run_worker("limits", ckpt, "", args, env)
    int8_ckpt, int4_ckpt = ckpt.with_name(ckpt.name + "-int8"), ckpt.with_name(ckpt.name + "-int4")
    wanted = {"int8": args.int8_cases or args.long_cases, "int4": args.int4_cases}
    for method, path in (("int8", int8_ckpt), ("int4", int4_ckpt)):
        if wanted[method] and (method in only or (method == "int8" and "long" in only)):
            print(f"[release] {method} checkpoint {path} ...", flush=True)
            made = _run_worker(f"quantize-{method}", ckpt, "", args, env)
            if "error" in made:
                raise SystemExit(f"quantizing failed:\n{made['error']}")
            result.update({k: v for k, v in made.items() if v is not None})
            result[f"{method}_weights_gb"] = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9
    result["int4_decode_bytes"] = _int4_decode_bytes(config)
    parts = [
        ("ours", ckpt, args.cases),
        ("ref", ckpt, args.cases),
        ("int8", int8_ckpt, args.int8_cases),
        ("int4", int4_ckpt, args.int4_cases),
    ]
    for impl, path, cases in parts:
        if impl in only and cases:
            print(f"[release] {impl}: {cases} ...", flush=True)
            result[impl] = _run_worker(impl, path, cases, args, env)
            if "error" in result[impl] and impl not in ("int8", "int4"):
                raise SystemExit(f"{impl} worker failed:\n{result[impl]['error']}")
    if "long" in only and args.long_cases:
        result["long"] = previous.get("long", {})  # one implementation may be run again alone
        for impl, path in (("ours", ckpt), ("int8", int8_ckpt)):
            if impl not in args.long_impls.split(","):
                continue
            print(f"[release] long, {impl}: {args.long_cases} ...", flush=True)
            result["long"][impl] = _run_worker(impl, path, args.long_cases, args, env)
    wall = time.perf_counter() - t0
    table = render(result)
    print(table)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        command = "python bench/release.py" + ("" if not argv else " " + " ".join(argv))
        update_doc(ROOT / "docs" / "performance.md", table, command, wall)
    return 0


def _int4_decode_bytes(config) -> int:
    """Bytes a batch-1 int4 decode step reads: the 4-bit linears of the language model and the head with their
    scales and zeros (the norms and biases are a rounding error)."""
    from musicflamingo.model.musicflamingo import MusicFlamingo
    from musicflamingo.model.quantize import Int4Linear, quantize_model

    with torch.device("meta"):
        model = quantize_model(MusicFlamingo(config), "int4")
    return sum(
        m.weight.numel() + 2 * m.weight_scale_zero.numel()
        for m in model.modules()
        if isinstance(m, Int4Linear)
    )


def _audio_params(config) -> int:
    """Parameters of the audio tower and projector (read once per clip, not per decode step)."""
    t = config.text
    text = t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
    kv = t.num_key_value_heads * t.head_dim
    layer = (
        t.hidden_size * (t.hidden_size + 2 * kv)
        + (t.hidden_size + 2 * kv)  # q, k, v with bias
        + t.hidden_size**2
        + 3 * t.hidden_size * t.intermediate_size
        + 2 * t.hidden_size
    )
    return config.num_parameters() - text - t.num_hidden_layers * layer - t.hidden_size


if __name__ == "__main__":
    raise SystemExit(main())
