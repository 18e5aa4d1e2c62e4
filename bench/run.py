"""Side-by-side benchmarks of musicflamingo against the reference (`transformers`) and the hardware.

    python bench/run.py [--quick] [--cases train,decode] [--device cpu|cuda] [--repeats N] [--out bench/results.json]
    python bench/run.py --render bench/results_cuda.json     # rewrite the docs table from saved results

Every measurement runs in a fresh worker process (`bench/run.py --worker JOB`): timing workers hold both
implementations loaded from the SAME checkpoint (ours saved with `save_pretrained`, the reference loaded from it
with the same dtype) and alternate them; memory workers hold one implementation so `ru_maxrss` is its own.
Results are printed as a table of ratios (ours / reference), saved as JSON, and, for full runs, written into
`docs/performance.md` between the `<!-- bench:DEVICE:begin/end -->` markers. See docs/performance.md (method).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

MARKER = "BENCH_RESULT "
CASES = (
    "hardware",
    "parity",
    "train",
    "prefill",
    "decode",
    "features",
    "load",
    "decode_compile",
    "train_compile",
)

# Sizes per mode. `--quick` is for the smoke test: tiny model, smallest sizes, one iteration.
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        train=dict(batch=2, audio_seconds=30.0, text_tokens=200),
        prefill_seconds=[30.0, 300.0, 1200.0],
        decode=dict(batches=[1, 8], audio_seconds=30.0, text_tokens=16, new_tokens=64),
        features_seconds=1200.0,
        hw_sizes=[1024, 2048],
        load_shard="200MB",
        repeats=dict(hardware=10, train=5, prefill=3, decode=3, features=5, load=2),
        # GPU steps take milliseconds: more runs for stable medians, same wall-clock budget.
        repeats_cuda=dict(hardware=20, train=20, prefill=10, decode=5, features=20, load=2),
    ),
    "quick": dict(
        train=dict(batch=2, audio_seconds=8.0, text_tokens=8),
        prefill_seconds=[4.0, 8.0],
        decode=dict(batches=[1, 2], audio_seconds=4.0, text_tokens=4, new_tokens=4),
        features_seconds=30.0,
        hw_sizes=[512],
        load_shard="10MB",
        repeats=dict(hardware=2, train=1, prefill=1, decode=1, features=1, load=1),
    ),
}


class WorkerError(RuntimeError):
    """A worker process failed or printed no result."""


def duration_label(seconds: float) -> str:
    return f"{seconds / 60:g}min" if seconds >= 60 else f"{seconds:g}s"


# ---------------------------------------------------------------------------------------------- workers
class Launcher:
    """Runs jobs in fresh worker processes (or, with `inprocess`, in this one: for the smoke test only)."""

    def __init__(self, device: str, threads: int, timeout: float, inprocess: bool = False) -> None:
        self.device, self.threads, self.timeout, self.inprocess = device, threads, timeout, inprocess

    def __call__(self, job: dict) -> dict:
        job = {"device": self.device, "threads": self.threads} | job
        what = " ".join(str(job[k]) for k in ("kind", "mode", "impl", "dtype") if job.get(k))
        t0 = time.perf_counter()
        print(f"[bench] {what} ...", end="", file=sys.stderr, flush=True)
        try:
            result = self._run(job)
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return result

    def _run(self, job: dict) -> dict:
        if self.inprocess:
            from cases import run_job

            return json.loads(json.dumps(run_job(job)))
        env = os.environ | {
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
        }
        cmd = [sys.executable, str(HERE / "run.py"), "--worker", json.dumps(job)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.timeout, env=env, cwd=str(ROOT)
            )
        except subprocess.TimeoutExpired:
            raise WorkerError(f"{job['kind']} job timed out after {self.timeout:.0f}s: {job}") from None
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])
        raise WorkerError(
            f"{job['kind']} job failed (exit code {proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}"
        )


# ---------------------------------------------------------------------------------------------- plan
def prepare(launch: Launcher, cases: list[str], quick: bool, tmp: Path, size: dict) -> dict[str, dict]:
    """Write the checkpoints the cases need (ours, `save_pretrained`) and return {name: {path, config}}."""
    from cases import bench_config, describe

    wanted = {
        "train": "train",
        "decode": "train",
        "decode_compile": "train",
        "train_compile": "train",
        "prefill": "prefill",
        "load": "load",
        "parity": "parity",
    }
    ckpts: dict[str, dict] = {}
    for case in cases:
        name = wanted.get(case)
        if name is None or name in ckpts:
            continue
        config = bench_config(name, quick)
        job = {
            "kind": "prepare",
            "config": config.to_hf_dict(),
            "path": str(tmp / name),
            "dtype": "bf16" if name == "load" else "fp32",
            "fast_init": name == "load",
            "max_shard_size": size["load_shard"] if name == "load" else "5GB",
        }
        info = launch(job)
        ckpts[name] = {"path": job["path"], "config": job["config"], "describe": describe(config), **info}
    return ckpts


def _warm_page_cache(path: str) -> None:
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_cases(
    launch: Launcher,
    cases: list[str],
    args: argparse.Namespace,
    tmp: Path,
    on_case: Any = None,
) -> dict[str, Any]:
    """Run every selected case; a failing case records its error and the others still run. `on_case(raw)` is
    called with the results so far after each case (the caller saves them: a run cut short keeps its numbers)."""
    from cases import train_step_flops

    size = SIZES["quick" if args.quick else "full"]
    defaults = size.get("repeats_cuda", size["repeats"]) if args.device == "cuda" else size["repeats"]
    rep = {k: (args.repeats or v) for k, v in defaults.items()}
    infer_dtype = args.infer_dtype or ("bf16" if args.device == "cuda" else "fp32")
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    ckpts = prepare(launch, cases, args.quick, tmp, size)

    def raw() -> dict[str, Any]:
        models = {name: ck["describe"] for name, ck in ckpts.items()}
        return {"cases": results, "errors": errors, "models": models}

    def guarded(case: str, fn: Any) -> None:
        try:
            results[case] = fn()
        except Exception as e:  # noqa: BLE001 (report and continue with the other cases)
            errors[case] = f"{type(e).__name__}: {e}"
            print(f"[bench] {case} FAILED: {errors[case]}", file=sys.stderr)
        if on_case is not None:
            on_case(raw())

    def timed_and_mem(kind: str, base: dict, variants: dict[str, dict], mem_steps: int) -> dict:
        timing = launch(base | {"kind": kind, "mode": "time", "variants": list(variants.values())})
        out = {}
        for (label, variant), t in zip(variants.items(), timing["variants"]):
            job = base | variant | {"kind": kind, "mode": "mem", "mem_steps": mem_steps}
            if variant.get("time_only"):
                mem = None
            elif all("peak_bytes" in t[impl] for impl in ("ours", "ref")):
                # CUDA: the timing worker measured each implementation's peak (cases.run_time), saving a worker
                # start (~20 s of imports, CUDA context and loading) per variant
                mem = {
                    i: {"peak_bytes": t[i]["peak_bytes"], "in_timing_worker": True} for i in ("ours", "ref")
                }
            elif args.device == "cuda":  # peak counters reset per implementation: one worker measures both
                mem = launch(job | {"impl": "both"})
            else:  # CPU peak RSS cannot be reset: one fresh worker per implementation
                mem = {impl: launch(job | {"impl": impl})[impl] for impl in ("ours", "ref")}
            out[label] = {"time": t, "mem": mem, "job": variant}
        return out

    hw_sizes = [4096, 8192] if (args.device == "cuda" and not args.quick) else size["hw_sizes"]
    if "hardware" in cases:
        guarded(
            "hardware",
            lambda: launch({"kind": "hardware", "sizes": hw_sizes, "repeats": rep["hardware"]}),
        )
    if "parity" in cases:
        guarded("parity", lambda: launch({"kind": "parity", **ckpts["parity"]}))
    train_base = {**ckpts.get("train", {}), **size["train"], "repeats": rep["train"]}
    if "train" in cases:

        def train() -> dict:
            variants = {d: {"dtype": d} for d in ("fp32", "bf16")}
            out = timed_and_mem("train", train_base, variants, mem_steps=2)
            for r in out.values():
                r["flops_per_step"] = train_step_flops(train_base)
            return out

        guarded("train", train)
    if "prefill" in cases:
        base = {**ckpts.get("prefill", {}), "dtype": infer_dtype, "batch": 1, "text_tokens": 16}
        base["repeats"] = rep["prefill"]
        variants = {duration_label(s): {"audio_seconds": s} for s in size["prefill_seconds"]}
        if (
            args.device == "cpu" and not args.quick and "20min" in variants
        ):  # ~15 s per run on one core: no warm-up, two runs each
            variants["20min"] |= {"warmup": 0, "repeats": min(rep["prefill"], 2)}
        guarded("prefill", lambda: timed_and_mem("prefill", base, variants, mem_steps=1))
    d = size["decode"]
    decode_base = {**ckpts.get("train", {}), "dtype": infer_dtype, "repeats": rep["decode"]}
    decode_base |= {"audio_seconds": d["audio_seconds"], "text_tokens": d["text_tokens"]}
    decode_base["new_tokens"] = d["new_tokens"]
    if "decode" in cases:
        variants = {f"batch{b}": {"batch": b} for b in d["batches"]}
        if args.device == "cpu" and not args.quick and args.infer_dtype is None:
            # bf16 too (the release's dtype): its one-token attention takes another path on CPU (see
            # qwen2.decode_attention). The targets read the fp32 rows, CPU inference's default.
            variants |= {f"batch{b}-bf16": {"batch": b, "dtype": "bf16"} for b in d["batches"]}
        guarded("decode", lambda: timed_and_mem("decode", decode_base, variants, mem_steps=1))
    if "features" in cases:
        base = {"audio_seconds": size["features_seconds"], "repeats": rep["features"]}
        label = duration_label(size["features_seconds"])
        guarded("features", lambda: timed_and_mem("features", base, {label: {}}, mem_steps=1))
    if "load" in cases:

        def load() -> dict:
            ck = ckpts["load"]
            _warm_page_cache(ck["path"])  # both read from the page cache, not the disk
            runs: dict[str, list[dict]] = {"ours": [], "ref": []}
            for r in range(rep["load"]):
                for impl in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
                    job = {"kind": "load", "impl": impl, "path": ck["path"], "dtype": "bf16"}
                    runs[impl].append(launch(job)[impl])
            return {"runs": runs, "checkpoint_bytes": ck["weights_bytes"], "params": ck["params"]}

        guarded("load", load)
    if "decode_compile" in cases:
        # Ours with `compile=True` (static KV cache, traced in the warm-up) against the reference's eager run.
        # Last, so that a slow trace or a failure costs no other case; time only.
        variants = {f"batch{b}": {"batch": b, "compile": True, "time_only": True} for b in d["batches"]}
        guarded("decode_compile", lambda: timed_and_mem("decode", decode_base, variants, mem_steps=1))
    if "train_compile" in cases and (args.device == "cuda" or args.quick or args.cases_named):
        # Ours with its layers compiled (`model.net.compile=true` in train.py) against the reference's eager step;
        # time only, last (tracing takes tens of seconds). Full CPU runs skip it unless --cases names it: on this
        # CPU it gained nothing (docs/performance.md).

        variants = {d: {"dtype": d, "compile": True, "time_only": True} for d in ("fp32", "bf16")}
        guarded("train_compile", lambda: timed_and_mem("train", train_base, variants, mem_steps=2))
    return raw()


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest sizes, one iteration (smoke test)")
    ap.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated subset of {','.join(CASES)} (default: all; train_compile only on CUDA or --quick)",
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed runs per implementation (default: per case)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both implementations (default: 1 on CPU, stable on a shared machine; all cores "
        "with --device cuda)",
    )
    ap.add_argument(
        "--infer-dtype", choices=("fp32", "bf16"), default=None, help="prefill/decode weights dtype"
    )
    ap.add_argument("--out", default=None, help="JSON results (default bench/results[_cuda][_quick].json)")
    ap.add_argument("--doc", default=None, help="markdown file whose table section is rewritten")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    ap.add_argument("--render", default=None, help="re-render table/doc from an existing results JSON")
    ap.add_argument("--inprocess", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cases_named = args.cases is not None
    cases = [c.strip() for c in (args.cases or ",".join(CASES)).split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    args.case_list = cases
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        from cases import run_job

        print(MARKER + json.dumps(run_job(json.loads(args.worker))), flush=True)
        return 0
    import torch
    from report import build_report, machine_info, render_table, update_doc

    if args.render is not None:  # e.g. results_cuda.json brought back from a GPU machine: no measurement
        report = json.loads(Path(args.render).read_text())
        table = render_table(report)
        print(table)
        if not args.no_doc:
            doc = Path(args.doc or ROOT / "docs" / "performance.md")
            update_doc(doc, report["device"], report, table)
            print(f"[bench] updated {doc}", file=sys.stderr)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    # One thread by default on CPU: on a busy 2-core machine two OpenMP threads stall each other (a 1.6 s
    # training step took 3-17 s), while one thread gives stable ratios. Ratios are what this benchmark reports.
    threads = args.threads or ((os.cpu_count() or 1) if args.device == "cuda" else 1)
    timeout = args.timeout or (120.0 if args.quick else 600.0)
    launch = Launcher(args.device, threads, timeout, inprocess=args.inprocess)
    suffix = ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    out = Path(args.out or HERE / f"results{suffix}.json")
    machine = machine_info(args.device, threads)  # before the run: records the load average at start
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mf-bench-"))
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(raw: dict[str, Any]) -> dict[str, Any]:
        report = build_report(raw, args, machine, time.perf_counter() - t0)
        out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    try:
        # Saved after every case: a run stopped by a time limit (a lent GPU machine) keeps what it measured.
        raw = run_cases(launch, args.case_list, args, tmp, on_case=save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = save(raw)
    table = render_table(report)
    print(table)
    print(f"[bench] wrote {out}", file=sys.stderr)
    if not args.no_doc and (args.doc or not args.quick):
        doc = Path(args.doc or ROOT / "docs" / "performance.md")
        update_doc(doc, args.device, report, table)
        print(f"[bench] updated {doc}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
