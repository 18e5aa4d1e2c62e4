"""Turn raw benchmark results into rows of ratios, PASS/MISS targets, a markdown table and the docs section."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Any

MB = 1024 * 1024


def machine_info(device: str, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        cpu = m.group(1).strip() if m else cpu
        fam, model = (re.search(rf"^{k}:\s*(\S+)$", out, re.M) for k in ("CPU family", "Model"))
        if fam and model:  # "AMD EPYC" alone does not say which generation
            cpu += f" (family {fam.group(1)}, model {model.group(1)})"
        flags = re.search(r"^Flags:\s*(.+)$", out, re.M)
        flags = set(flags.group(1).split()) if flags else set()
    except (OSError, subprocess.SubprocessError):
        flags = set()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "bf16_isa": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "python": sys.version.split()[0],
        "load_avg_1min_at_start": os.getloadavg()[0],
    }
    for pkg in ("torch", "transformers"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _row(
    case: str, variant: str, metric: str, ours: Any, ref: Any = None, better: str = "higher", **kw
) -> dict:
    return {
        "case": case,
        "variant": variant,
        "metric": metric,
        "ours": ours,
        "ref": ref,
        "ratio": _ratio(ours, ref),
        "better": better,
        "ours_peak_mb": kw.get("ours_mem"),
        "ref_peak_mb": kw.get("ref_mem"),
        "mem_ratio": _ratio(kw.get("ours_mem"), kw.get("ref_mem")),
        "note": kw.get("note", ""),
    }


def _mem(entry: dict) -> tuple[float | None, float | None]:
    if not entry.get("mem"):  # a variant measured for time only
        return None, None
    return entry["mem"]["ours"]["peak_bytes"] / MB, entry["mem"]["ref"]["peak_bytes"] / MB


def build_rows(cases: dict[str, Any]) -> tuple[list[dict], dict[str, float]]:
    """One row per measured quantity, and the named values the targets read."""
    rows, v = [], {}
    ceiling = cases.get("hardware", {}).get("ceiling_flops", {})
    for dtype, flops in ceiling.items():
        rows.append(_row("hardware", dtype, "matmul GFLOP/s", flops / 1e9, note="machine ceiling"))
    for dtype, p in cases.get("parity", {}).items():
        note = f"max |diff| {p['max_abs_diff']:.3g}, greedy tokens equal {p['greedy_match']:.0%}"
        rows.append(_row("parity", dtype, "logits rel. diff", p["rel_diff"], better="lower", note=note))
        v[f"parity_{dtype}"] = p["rel_diff"]
    train = [(dtype, e, False) for dtype, e in cases.get("train", {}).items()]
    train += [(dtype, e, True) for dtype, e in cases.get("train_compile", {}).items()]
    for dtype, e, compiled in train:
        t = e["time"]
        tps = {impl: t[impl]["tokens"] / t[impl]["seconds"] for impl in ("ours", "ref")}
        om, rm = _mem(e)
        loss_diff = abs(t["ours"]["warmup"]["loss"] - t["ref"]["warmup"]["loss"])
        rows.append(
            _row(
                "train",
                f"{dtype}-compile" if compiled else dtype,
                "tokens/s",
                tps["ours"],
                tps["ref"],
                ours_mem=om,
                ref_mem=rm,
                note=f"step-1 loss |ours-ref| {loss_diff:.2g}",
            )
        )
        if compiled:  # an extra row (ours with layers compiled, the reference eager); targets read eager
            continue
        v[f"train_{dtype}"], v[f"train_mem_{dtype}"] = tps["ours"] / tps["ref"], om / rm
        if dtype in ceiling:
            util = {impl: e["flops_per_step"] / t[impl]["seconds"] / ceiling[dtype] for impl in tps}
            rows.append(
                _row(
                    "train",
                    dtype,
                    "matmul utilisation",
                    util["ours"],
                    util["ref"],
                    note=f"{e['flops_per_step'] / 1e9:.1f} GFLOP/step",
                )
            )
            v[f"util_{dtype}"] = util["ours"]
    for label, e in cases.get("prefill", {}).items():
        t = e["time"]
        om, rm = _mem(e)
        same = "same" if t["ours"]["first_token"] == t["ref"]["first_token"] else "DIFFERENT"
        rows.append(
            _row(
                "prefill",
                label,
                "latency s",
                t["ours"]["seconds"],
                t["ref"]["seconds"],
                better="lower",
                ours_mem=om,
                ref_mem=rm,
                note=f"first token {same}",
            )
        )
        v[f"prefill_{label}"] = t["ours"]["seconds"] / t["ref"]["seconds"]
    decode = [(label, e) for label, e in cases.get("decode", {}).items()]
    decode += [(f"{label}-compile", e) for label, e in cases.get("decode_compile", {}).items()]
    for label, e in decode:
        t = e["time"]
        om, rm = _mem(e)
        same = "same" if t["ours"]["last_token_sum"] == t["ref"]["last_token_sum"] else "DIFFERENT"
        rows.append(
            _row(
                "decode",
                label,
                "tokens/s",
                t["ours"]["tokens_per_s"],
                t["ref"]["tokens_per_s"],
                ours_mem=om,
                ref_mem=rm,
                note=f"last tokens {same}",
            )
        )
        v[f"decode_{label}"] = t["ours"]["tokens_per_s"] / t["ref"]["tokens_per_s"]
    for label, e in cases.get("features", {}).items():
        t = e["time"]
        om, rm = _mem(e)
        rel = abs(t["ours"]["checksum"] - t["ref"]["checksum"]) / max(abs(t["ref"]["checksum"]), 1e-12)
        rows.append(
            _row(
                "features",
                label,
                "audio s per s",
                t["ours"]["audio_s_per_s"],
                t["ref"]["audio_s_per_s"],
                ours_mem=om,
                ref_mem=rm,
                note=f"checksum rel. diff {rel:.1g}",
            )
        )
        v["features"] = t["ours"]["audio_s_per_s"] / t["ref"]["audio_s_per_s"]
    if "load" in cases:
        e = cases["load"]
        secs = {impl: median(r["seconds"] for r in runs) for impl, runs in e["runs"].items()}
        peak = {impl: median(r["peak_bytes"] for r in runs) / MB for impl, runs in e["runs"].items()}
        weights = e["checkpoint_bytes"] / MB
        rows.append(
            _row(
                "load",
                f"{weights:.0f}MB bf16",
                "load s",
                secs["ours"],
                secs["ref"],
                better="lower",
                ours_mem=peak["ours"],
                ref_mem=peak["ref"],
                note=f"peak/weights ours {peak['ours'] / weights:.2f}x, ref {peak['ref'] / weights:.2f}x",
            )
        )
        v["load_peak_over_weights"] = peak["ours"] / weights
    return rows, v


# (name, value key, comparison, threshold, unit)
TARGETS = [
    ("training tokens/s fp32 (ours/ref)", "train_fp32", ">=", 1.3, "x"),
    ("training tokens/s bf16 (ours/ref)", "train_bf16", ">=", 1.3, "x"),
    ("peak training memory fp32 (ours/ref)", "train_mem_fp32", "<=", 0.8, "x"),
    ("peak training memory bf16 (ours/ref)", "train_mem_bf16", "<=", 0.8, "x"),
    ("decode tokens/s batch 1 (ours/ref)", "decode_batch1", ">=", 2.0, "x"),
    ("decode tokens/s batch 8 (ours/ref)", "decode_batch8", ">=", 2.0, "x"),
    ("prefill latency 5 min (ours/ref)", "prefill_5min", "<=", 0.8, "x"),
    ("prefill latency 20 min (ours/ref)", "prefill_20min", "<=", 0.8, "x"),
    ("feature extraction (ours/ref)", "features", ">=", 1.0, "x"),
    ("checkpoint load peak RSS / weights (ours)", "load_peak_over_weights", "<=", 1.3, "x"),
    ("training matmul utilisation fp32 (ours)", "util_fp32", ">=", 0.5, ""),
    ("training matmul utilisation bf16 (ours)", "util_bf16", ">=", 0.5, ""),
]


def evaluate_targets(values: dict[str, float]) -> list[dict]:
    out = []
    for name, key, op, threshold, unit in TARGETS:
        value = values.get(key)
        if value is None or not math.isfinite(value):
            status = "n/a"
        else:
            status = "PASS" if (value >= threshold if op == ">=" else value <= threshold) else "MISS"
        out.append(
            {"target": name, "key": key, "value": value, "op": op, "threshold": threshold, "unit": unit}
        )
        out[-1]["status"] = status
    return out


def build_report(raw: dict, args: argparse.Namespace, machine: dict, wall_s: float) -> dict:
    rows, values = build_rows(raw["cases"])
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python bench/run.py", *sys.argv[1:]]),
        "device": args.device,
        "quick": bool(args.quick),
        "machine": machine,
        "wall_s": wall_s,
        "rows": rows,
        "targets": evaluate_targets(values),
        "errors": raw["errors"],
        "models": raw.get("models", {}),
        "raw": raw["cases"],
    }


def _fmt(x: Any, metric: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if "utilisation" in metric:
        return f"{x:.1%}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def render_table(report: dict) -> str:
    """Markdown: one table of measurements (ratios ours/ref), one of targets, then any errors."""
    lines = [
        "| case | variant | metric | ours | reference | ours/ref | ours peak MB | ref peak MB | mem ours/ref | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        mem_ratio = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}x"
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['metric']} | {_fmt(r['ours'], r['metric'])} | "
            f"{_fmt(r['ref'], r['metric'])} | {ratio} | {_fmt(r['ours_peak_mb'])} | {_fmt(r['ref_peak_mb'])} | "
            f"{mem_ratio} | {r['note']} |"
        )
    lines += ["", "| target | measured | goal | status |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        if t["unit"] == "x":
            measured = "-" if t["value"] is None else f"{t['value']:.2f}x"
            goal = f"{t['op']} {t['threshold']:g}x"
        else:
            measured = "-" if t["value"] is None else f"{t['value']:.1%}"
            goal = f"{t['op']} {t['threshold']:.0%}"
        lines.append(f"| {t['target']} | {measured} | {goal} | {t['status']} |")
    for case, err in report["errors"].items():
        lines.append(f"\nERROR in {case}: {err.splitlines()[0] if err else ''}")
    return "\n".join(lines)


def update_doc(path: Path, device: str, report: dict, table: str) -> None:
    """Rewrite the section between `<!-- bench:DEVICE:begin -->` and `<!-- bench:DEVICE:end -->`."""
    begin, end = f"<!-- bench:{device}:begin -->", f"<!-- bench:{device}:end -->"
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, threads used: {m['threads']}"
    if "load_avg_1min_at_start" in m:
        where += f", 1-min load average at start: {m['load_avg_1min_at_start']:.1f}"
    isa = f"; bf16 ISA: {', '.join(m['bf16_isa']) or 'none'}" if device == "cpu" else ""
    body = (
        f"{begin}\n"
        f"Machine: {where}{isa}. torch {m['torch']}, transformers {m['transformers']}.  \n"
        f"Date: {report['date']}. Command: `{report['command']}` ({report['wall_s'] / 60:.1f} min).\n"
        + "".join(f"- model `{k}`: {v}\n" for k, v in report.get("models", {}).items())
        + "\n"
        f"{table}\n{end}"
    )
    write_marked(path, begin, end, body, f"Results ({device})")


def write_marked(path: Path, begin: str, end: str, block: str, heading: str) -> None:
    """Put `block` (markers included) in place of the text from `begin` to `end` of the file at `path`, or, where the
    markers are missing, at its end under `## heading`."""
    text = path.read_text() if path.is_file() else "# Performance\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
