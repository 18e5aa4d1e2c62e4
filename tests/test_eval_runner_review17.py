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
