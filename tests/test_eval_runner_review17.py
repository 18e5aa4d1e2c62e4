"""Review round 17, the eval runner: where a benchmark's embedded audio is cached (MMAU test-mini's Parquet copy,
``benchmark.audio_cache``) names a folder, not the items, so a rerun with another cache resumes."""

from __future__ import annotations

from test_benchmarks_review17 import make_mmau_hf
from test_eval_release_formats import _cfg

from musicflamingo.eval import evaluate


def test_a_rerun_with_another_audio_cache_resumes_the_same_items(tmp_path):
    """Rerunning an MMAU Parquet evaluation with benchmark.audio_cache elsewhere was refused as a changed setting
    although the items and their audio are the same; it resumes and predicts nothing again."""
    root = tmp_path / "MMAU-test-mini"
    make_mmau_hf(root, tmp_path / "clips")
    out = tmp_path / "out"
    calls: list[str] = []

    def predict(batch):
        calls.extend(it.id for it in batch)
        return ["(A)" for _ in batch]

    first = evaluate(_cfg("mmau", root, out, f"benchmark.audio_cache={tmp_path / 'a'}"), predict_fn=predict)
    n = len(calls)
    assert n == first["num_items"] > 0
    again = evaluate(_cfg("mmau", root, out, f"benchmark.audio_cache={tmp_path / 'b'}"), predict_fn=predict)
    assert len(calls) == n  # nothing predicted again
    assert again["num_predicted"] == first["num_predicted"] == n
    assert again["tasks"]["mcq"]["accuracy"] == first["tasks"]["mcq"]["accuracy"]


def test_think_with_a_benchmarks_short_token_limit_is_warned_about(tmp_path, caplog):
    """eval.py think=true kept the benchmark's max_new_tokens (64 for MMAR, sized for a letter) without a word: most
    think answers were cut before </answer> and scored as broken. It now says so before predicting."""
    root = tmp_path / "MMAU-test-mini"
    make_mmau_hf(root, tmp_path / "clips")

    def predict(batch):
        return ["<think>it is bright</think><answer>(A)</answer>" for _ in batch]

    caplog.set_level("WARNING", logger="musicflamingo.eval.runner")
    extra = (f"benchmark.audio_cache={tmp_path / 'a'}", "think=true")
    evaluate(_cfg("mmau", root, tmp_path / "short", *extra, "max_new_tokens=64"), predict_fn=predict)
    warned = [r.getMessage() for r in caplog.records if "cut before its </answer>" in r.getMessage()]
    assert warned and "max_new_tokens=64" in warned[0]
    caplog.clear()
    evaluate(_cfg("mmau", root, tmp_path / "long", *extra, "max_new_tokens=1024"), predict_fn=predict)
    assert not [r for r in caplog.records if "cut before its </answer>" in r.getMessage()]
    caplog.clear()
    evaluate(
        _cfg("mmau", root, tmp_path / "plain", f"benchmark.audio_cache={tmp_path / 'a'}"), predict_fn=predict
    )
    assert not [r for r in caplog.records if "cut before its </answer>" in r.getMessage()]
