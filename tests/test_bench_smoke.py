"""Smoke test of the benchmark harness (bench/): every case at its smallest size, one iteration.

This checks the harness (plans, workers, tables, JSON, docs section), not speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"
CASE_KINDS = ("hardware", "parity", "train", "prefill", "decode", "features", "load")


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    run = _load("run")
    out = tmp_path_factory.mktemp("bench") / "results.json"
    threads = torch.get_num_threads()
    # One thread: two OpenMP threads on a busy 2-core machine stall each other (seconds become minutes).
    try:
        rc = run.main(["--quick", "--inprocess", "--no-doc", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    return rc, report


def test_quick_run_covers_every_case(quick_report):
    rc, report = quick_report
    assert report["errors"] == {}, report["errors"]
    assert rc == 0
    assert set(report["raw"]) == set(CASE_KINDS) | {"decode_compile", "train_compile"}
    # compiled rows are `decode` / `train` rows
    assert {r["case"] for r in report["rows"]} == set(CASE_KINDS)
    assert report["raw"]["train"].keys() == report["raw"]["train_compile"].keys() == {"fp32", "bf16"}
    assert len(report["raw"]["prefill"]) == 2 and len(report["raw"]["decode"]) == 2
    assert report["raw"]["decode_compile"].keys() == report["raw"]["decode"].keys()
    compiled = [r for r in report["rows"] if r["variant"].endswith("-compile")]
    assert sorted(r["case"] for r in compiled) == ["decode", "decode", "train", "train"]


def test_quick_numbers_are_finite_and_positive_where_timed(quick_report):
    _, report = quick_report
    values = list(_numbers(report["raw"]))
    assert values and all(math.isfinite(v) for v in values)
    for row in report["rows"]:
        assert math.isfinite(row["ours"]), row
        if row["ref"] is not None:
            assert row["ref"] > 0 and math.isfinite(row["ratio"]), row
        if (
            row["case"] in ("train", "prefill", "decode", "features")
            and row["metric"] != "matmul utilisation"
            and not row["variant"].endswith("-compile")  # measured for time only
        ):
            assert row["ours_peak_mb"] is not None and row["ref_peak_mb"] is not None, row
    # Same weights and inputs: the reference and ours agree (fp32 parity, greedy tokens).
    parity = report["raw"]["parity"]
    assert parity["fp32"]["rel_diff"] < 1e-4 and parity["fp32"]["greedy_match"] == 1.0
    assert parity["bf16"]["rel_diff"] < 0.05
    for entry in report["raw"]["train"].values():
        t = entry["time"]
        assert abs(t["ours"]["warmup"]["loss"] - t["ref"]["warmup"]["loss"]) < 1e-3


def test_quick_table_lists_every_case_and_target(quick_report):
    _, report = quick_report
    report_mod = _load("report")
    table = report_mod.render_table(report)
    for case in CASE_KINDS:
        assert f"| {case} |" in table
    assert len(report["targets"]) == len(report_mod.TARGETS)
    for t in report["targets"]:
        assert t["status"] in ("PASS", "MISS", "n/a")
        assert f"| {t['target']} |" in table


def test_timing_worker_measures_each_peak_with_device_counters(monkeypatch):
    """CUDA timing workers measure both implementations' peaks (no memory workers): checked with a stand-in
    allocator on CPU. Resident = setup + what warm-up keeps; plus the largest rise within one timed step."""
    cases = _load("cases")

    class Counter:
        def __init__(self):
            self.allocated = self.high = 0

        def now(self):
            return self.allocated

        def reset(self):
            self.high = self.allocated

        def peak(self):
            return self.high

        def alloc(self, n):
            self.allocated += n
            self.high = max(self.high, self.allocated)

    mem = Counter()
    sizes = {"ours": (100, 30, 5), "ref": (200, 50, 0)}  # setup, transient per step, kept by the first step

    def fake_setup(impl, job, device):
        weights, transient, kept = sizes[impl]
        mem.alloc(weights)
        calls = [0]

        def step():
            calls[0] += 1
            mem.alloc(transient + (kept if calls[0] == 1 else 0))
            mem.alloc(-transient)
            return {"seconds": 1.0}

        return step

    monkeypatch.setitem(cases.SETUPS, "fake", fake_setup)
    monkeypatch.setattr(cases, "warm_device_libraries", lambda device: None)
    out = cases.run_time({"kind": "fake", "repeats": 3}, torch.device("cpu"), memory=mem)
    assert out["ours"]["peak_bytes"] == 100 + 5 + 30 and out["ref"]["peak_bytes"] == 200 + 50
    assert (
        out["ours"]["n"] == 3
        and "peak_bytes" not in cases.run_time({"kind": "fake", "repeats": 1}, torch.device("cpu"))["ours"]
    )


def test_worker_subprocess_round_trip():
    run = _load("run")
    launch = run.Launcher("cpu", threads=1, timeout=120)
    out = launch({"kind": "hardware", "sizes": [64], "repeats": 1})
    assert set(out["ceiling_flops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in out["ceiling_flops"].values())


def test_decoder_flops_match_linear_parameter_count():
    """6 * N * T for the decoder: the formula's matmul part equals 2 * (decoder Linear weights) * tokens, except
    the last layer's queries, output projection and MLP, which see only the labelled tokens."""
    flops = _load("flops")
    from musicflamingo import MusicFlamingo, MusicFlamingoConfig

    config = MusicFlamingoConfig.from_name("tiny")
    model = MusicFlamingo(config)
    layers = model.language_model.layers

    def linear(modules):
        return sum(m.weight.numel() for m in modules if isinstance(m, torch.nn.Linear))

    last = layers[-1]
    per_token_last = linear([last.self_attn.q_proj, last.self_attn.o_proj, *last.mlp.modules()])
    B, S = 2, 10
    q = config.text.num_attention_heads * config.text.head_dim
    L, D, V = config.text.num_hidden_layers, config.text.hidden_size, config.text.vocab_size
    f = flops.forward_flops(config, windows=0, batch=B, seq_len=S, labelled=0)
    assert f["matmul"] == 2 * (linear(layers.modules()) - per_token_last) * B * S
    assert f["attention"] == (L - 1) * 2 * S * S * q * B
    n = 7  # labelled tokens: the last layer's rest and the head see these
    g = flops.forward_flops(config, windows=0, batch=B, seq_len=S, labelled=n)
    assert g["matmul"] == f["matmul"] + 2 * per_token_last * n + 2 * D * V * n
    assert g["attention"] == f["attention"] + 4 * S * q * n
    assert flops.training_flops(config, 0, B, S, n) == 3 * g["total"]


def test_update_doc_rewrites_only_its_section(tmp_path):
    report_mod = _load("report")
    doc = tmp_path / "perf.md"
    doc.write_text("# Perf\n\nintro\n\n<!-- bench:cpu:begin -->\nold\n<!-- bench:cpu:end -->\n\ntail\n")
    report = {
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "threads": 2,
            "bf16_isa": [],
            "torch": "x",
            "transformers": "y",
        },
        "date": "2026-01-01T00:00:00",
        "command": "python bench/run.py",
        "wall_s": 60.0,
    }
    for _ in range(2):  # idempotent
        report_mod.update_doc(doc, "cpu", report, "| new table |")
    text = doc.read_text()
    assert text.count("<!-- bench:cpu:begin -->") == 1 and "old" not in text
    assert "| new table |" in text and "Test CPU" in text and text.endswith("tail\n")
    report_mod.update_doc(doc, "cuda", report | {"machine": report["machine"] | {"gpu": "G"}}, "| gpu |")
    assert "<!-- bench:cuda:begin -->" in doc.read_text() and "| new table |" in doc.read_text()


def test_render_rewrites_doc_from_saved_results(quick_report, tmp_path):
    _, report = quick_report
    run = _load("run")
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(report))
    doc = tmp_path / "perf.md"
    doc.write_text("# Perf\n<!-- bench:cpu:begin -->\nold\n<!-- bench:cpu:end -->\n")
    assert run.main(["--render", str(saved), "--doc", str(doc)]) == 0
    text = doc.read_text()
    # the section's old body is gone (not the word: the rendered command line may hold it, e.g. in a path)
    assert "begin -->\nold\n" not in text and "| train | fp32 | tokens/s |" in text


def test_release_bench_runs_on_the_tiny_preset(tmp_path, capsys):
    """bench/release.py end to end at the smallest size: checkpoints (bf16, int8, int4), every worker, table, JSON.
    The workers run in this process (`--inprocess`: ten interpreter starts were most of the time); one worker
    process then checks the process round trip gives the same fields."""
    release = _load("release")
    out = tmp_path / "r.json"
    argv = ["--preset", "tiny", "--ckpt", str(tmp_path / "ck"), "--threads", "1", "--inprocess"]
    argv += ["--cases", "first:30,decode:2", "--int8-cases", "first:30", "--int4-cases", "first:30"]
    argv += ["--long-cases", "ttft:60", "--decode-tokens", "3", "--out", str(out), "--no-doc"]
    threads = torch.get_num_threads()
    try:
        assert release.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    for impl in ("ours", "ref"):
        assert "error" not in result[impl], result[impl]
        assert result[impl]["ttft_30s"] > 0 and result[impl]["decode_b2_tokens_s"] > 0
        assert result[impl]["decode_b1_tokens_s"] > 0
    assert result["int8"]["ttft_30s"] > 0 and result["int8_weights_gb"] < result["weights_gb"]
    assert (tmp_path / "ck-int8" / "config.json").is_file()
    assert result["int4"]["decode_b1_tokens_s"] > 0 and result["int4_weights_gb"] < result["int8_weights_gb"]
    assert json.loads((tmp_path / "ck-int4" / "config.json").read_text())["quantization_config"]["bits"] == 4
    for impl in ("ours", "int8"):
        assert result["long"][impl]["ttft_60s"] > 0 and result["long"][impl]["peak_rss_gb"] > 0
    assert result["machine"]["read_gb_s"] > 0 and "| decode batch 4" not in stdout
    assert "time to first token, 30 s audio" in stdout
    assert "| decode batch 1, int8 >= 3.5x reference bf16 |" in stdout
    assert "| decode batch 1, int4 (the 3.5x goal, with 4-bit weights) |" in stdout
    assert "| 60 s of audio, int8, no out-of-memory |" in stdout
    assert result["machine"]["int8_gemm_vs_bf16"] > 0 and "x the bf16 rate" in stdout
    # A worker in its own process, as the release size runs them: its JSON line comes back with the same fields.
    args = argparse.Namespace(decode_tokens=3, threads=1, preset="tiny", inprocess=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = release._run_worker("int4", tmp_path / "ck-int4", "first:30", args, env)
    assert alone.keys() == result["int4"].keys() and alone["decode_b1_tokens_s"] > 0, alone


def test_release_bench_inprocess_is_refused_at_the_release_size(capsys):
    with pytest.raises(SystemExit):
        _load("release").main(["--inprocess", "--no-doc"])
    assert "--inprocess is for small presets" in capsys.readouterr().err


def test_release_int8_prefill_verdict_says_why_when_missed():
    """The int8-prefill row states the int8 GEMM's measured gain, and a miss carries its reason, not a bare word."""
    release = _load("release")
    result = {
        "machine": {"bf16_matmul_tflops": 1.0, "read_gb_s": 20.0, "int8_gemm_vs_bf16": 1.3},
        "ours": {"ttft_30s": 10.0},
        "int8": {"ttft_30s": 12.0},
    }
    row = "time to first token, 30 s, int8 no slower than bf16"
    measured, verdict = {a: (b, c) for a, b, c in release.targets(result)}[row]
    assert measured == "1.20x (int8 GEMM 1.30x the bf16 rate)"
    assert verdict.startswith("missed: ") and "rescal" in verdict
    result["int8"]["ttft_30s"] = 8.0
    assert {a: c for a, b, c in release.targets(result)}[row] == "met"


def test_gpu_release_bench_runs_on_the_tiny_preset_on_cpu(tmp_path, capsys):
    """bench/gpu_release.py end to end on CPU at the smallest size: the three workers (QLoRA with the int8 stand-in,
    ours, the reference), LoRA steps that train the same adapters on both sides, a full fine-tune step, compiled
    decode after both (the model handed back frozen), the planner's predictions, the QLoRA merge check, the full
    fine-tune fit, one JSON. The ours and reference workers run in this process (`--inprocess`: interpreter starts
    were most of the time), the qlora worker in a worker process of its own, as all three run on a GPU (its process
    imports neither transformers nor peft: ~6 CPU s less than the reference's)."""
    out = tmp_path / "g.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--inprocess", "ours,ref"]
    argv += [
        "--cases",
        "qlora,ttft:30,decode:2,lora,full,compiled:1",
        "--decode-tokens",
        "4",
        "--out",
        str(out),
    ]
    _load("gpu_release").main(argv)
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    for impl in ("ours", "ref"):
        assert result[impl]["exit"] == 0 and result[impl]["ttft:30"]["s"] > 0
        assert result[impl]["decode:2"]["tokens_s"] > 0
    assert "compiled:1" not in result["ref"] and result["ours"]["compiled:1"]["tokens_s"] > 0
    assert "full" not in result["ref"] and result["ours"]["full"]["tokens_s"] > 0
    # weights, their gradients and AdamW's two states, all in bf16, at least
    assert result["ours"]["full"]["plan_gb"] >= 4 * result["ours"]["weights_gb"]
    assert result["ours"]["ttft:30"]["plan_gb"] > 0 and result["ours"]["decode:2"]["plan_gb"] > 0
    lora, ref_lora = result["ours"]["lora"], result["ref"]["lora"]
    assert lora["tokens_s"] > 0 and 0 < lora["trainable"] < 0.2 * result["ours"]["weights_gb"] * 1e9 / 2
    # peft's regex keeps the reference's adapters on the language model, where ours are, and all of them learn
    assert (
        ref_lora["trainable"] == lora["trainable"]
        and ref_lora["tensors_with_grad"] == lora["trainable_tensors"]
    )
    assert lora["tensors_with_grad"] == lora["trainable_tensors"] and lora["plan_gb"] > 0
    qlora = result["qlora"]["qlora"]
    assert result["qlora"]["exit"] == 0 and result["qlora"]["quantizer"].startswith("int8 stand-in")
    assert qlora["tokens_s"] > 0 and qlora["tensors_with_grad"] == qlora["trainable_tensors"] > 0
    assert qlora["quantized_left"] == 0 and qlora["merged"] > 0 and qlora["logits_rel_diff"] < 0.05
    assert qlora["top1_agree"] > 0.9 and qlora["weight_rel_err"] < 2**-7
    assert set(result["qlora"]) == {"device", "build_s", "weights_gb", "quantizer", "qlora", "exit"}
    assert result["full_finetune"]["bf16-true"]["one_gpu_peak_gb"] > 0
    assert "| time to first token, 30 s audio, s |" in stdout  # the rendered table
    assert "| time to first token, 30 s, <= 0.5x reference |" in stdout
    assert "| QLoRA adapters merge into bf16" in stdout


def test_gpu_release_bench_inprocess_is_refused_at_the_release_size(capsys):
    with pytest.raises(SystemExit):
        _load("gpu_release").main(["--inprocess", "ours", "--device", "cpu"])
    assert "--inprocess is for small presets" in capsys.readouterr().err


def test_gpu_release_targets_and_table_from_a_results_json(tmp_path):
    gpu_release = _load("gpu_release")
    result = {
        "preset": "music_flamingo_2601",
        "command": "python bench/gpu_release.py",
        "gpu_gb": 80.0,
        "bf16_peak_tflops": 989.0,
        "ours": {
            "device": "NVIDIA H100",
            "ttft:30": {"s": 0.2, "peak_gb": 17.0, "plan_gb": 16.0},
            "decode:1": {"tokens_s": 40.0},
            "compiled:1": {"tokens_s": 130.0},
            "lora": {"tokens_s": 2600.0, "peak_gb": 30.0, "model_tflops": 400.0, "plan_gb": 40.0},
        },
        "qlora": {
            "exit": 0,
            "qlora": {
                "tokens_s": 900.0,
                "peak_gb": 12.0,
                "reserved_gb": 14.2,
                "plan_gb": 11.0,
                "merged": 112,
                "quantized_left": 0,
                "logits_rel_diff": 0.004,
                "top1_agree": 0.97,
                "weight_rel_err": 0.003,
            },
        },
        "ref": {
            "ttft:30": {"s": 0.3, "peak_gb": 17.5},
            "decode:1": {"tokens_s": 60.0},
            "lora": {"tokens_s": 2000.0, "peak_gb": 40.0},
        },
        "full_finetune": {"bf16-true": {"one_gpu_peak_gb": 120.0, "fits_one": False, "fsdp_gpus": 2}},
    }
    rows = {a: (b, c) for a, b, c in gpu_release.targets(result)}
    assert rows["time to first token, 30 s, <= 0.5x reference"] == ("0.67x", "missed")
    assert rows["decode batch 1, >= 2x reference"] == ("eager 0.67x, compiled 2.17x", "met")
    assert rows["LoRA step >= 1.3x reference tokens/s at <= 0.8x its peak memory"] == (
        "1.30x tokens/s, 0.75x memory",
        "met",
    )
    utilisation = rows[
        "LoRA utilisation of the bf16 dense peak (no target; executed FLOPs, recomputation included)"
    ]
    assert utilisation[0].startswith("40.4% of 989 TFLOP/s; published: NeMo")
    assert rows["QLoRA (nf4 base), 30 s + 256 tokens, batch 1, checkpointing: < 20 GB"] == (
        "14.2 GB reserved (12.0 GB allocated) at 900 tokens/s",
        "met",
    )
    merge = rows[
        "QLoRA adapters merge into bf16 (merged weights within bf16 rounding; logits vs the 4-bit model: relative "
        "norm of the difference < 5 %)"
    ]
    assert merge[1] == "met" and "top token agrees at 97% of positions" in merge[0]
    result["qlora"]["qlora"]["weight_rel_err"] = 0.02  # a merged weight off by more than bf16 rounding
    assert {a: c for a, b, c in gpu_release.targets(result)}[
        "QLoRA adapters merge into bf16 (merged weights within bf16 rounding; logits vs the 4-bit model: relative "
        "norm of the difference < 5 %)"
    ] == "missed"
    result["qlora"]["qlora"]["weight_rel_err"] = 0.003
    planner = "memory planner, {}: within 15 % of the measured peak"
    assert rows[planner.format("ttft:30")] == ("16.0 vs 17.0 GB (0.94x)", "met")
    assert rows[planner.format("lora")] == ("40.0 vs 30.0 GB (1.33x)", "missed")
    assert rows[planner.format("qlora")] == ("11.0 vs 12.0 GB (0.92x)", "met")
    assert rows["full fine-tune, AdamW, bf16-true (planner)"] == ("120 GB on one", "FSDP over 2 GPUs")
    doc = tmp_path / "perf.md"
    doc.write_text("intro\n<!-- bench:gpu_release:begin -->\nold\n<!-- bench:gpu_release:end -->\nafter\n")
    gpu_release.update_doc(doc, result)
    text = doc.read_text()
    assert (
        "old" not in text
        and text.endswith("after\n")
        and "| decode batch 1, tokens/s | 40 | 60 | 0.67x |" in text
    )


def test_gpu_release_reference_holds_the_values_ours_drew():
    gpu_release = _load("gpu_release")
    from musicflamingo import MusicFlamingoConfig

    config = MusicFlamingoConfig.from_name("tiny", text=dict(tie_word_embeddings=False))
    ours = gpu_release.random_model(config, torch.device("cpu"))
    ref = gpu_release.reference_from(ours, torch.device("cpu"))
    theirs = ref.state_dict()
    from musicflamingo.checkpoint import ours_to_hf

    mine = {gpu_release._module_name(ours_to_hf(k)): v for k, v in ours.state_dict().items()}
    assert set(mine) == set(theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    assert next(ref.parameters()).dtype == torch.bfloat16


def test_packed_attention_bench_runs_on_the_tiny_preset(capsys):
    """bench/packed_attention.py at its smallest: both modes timed and measured, the ratios printed."""
    bench = _load("packed_attention")
    bench.main(["--preset", "tiny", "--conversations", "3", "--length", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    kept = [
        float(line.split("kept for backward")[1].split("MB")[0])
        for line in out.splitlines()
        if "kept for backward" in line
    ]
    assert len(kept) == 2 and kept[0] < kept[1]  # runs keep no (T, T) mask
    assert "runs / mask time" in out and "1 row of 3 x 64 tokens" in out
