"""Review round 13, "eval scoring": the benchmarks scored against their own official scorers' rules, with tiny
release folders in the authors' layouts (tests/release_fixtures.py) and known predictions.

Where a test re-implements an official rule it is a few lines and names its source file; the package is never
imported for the expected number.
"""

from __future__ import annotations

import shutil

import pytest
from release_fixtures import make_mmau, make_music_avqa, make_nsynth, make_opencpop
from test_eval_release_formats import _bench, _cfg

from musicflamingo.eval import BenchmarkError, evaluate
from musicflamingo.eval.metrics import error_rate
from musicflamingo.eval.report import paper_comparison


# ---- a data file of another split than benchmark.split ---------------------------------------------------------
def test_opencpop_train_file_as_root_is_not_scored_as_the_test_split(tmp_path):
    """benchmark.root may be the data file itself: root=segments/train.txt under the default split=test read the
    train phrases and put the paper's test CER beside them."""
    root = make_opencpop(tmp_path / "Opencpop")
    train = root / "segments" / "train.txt"
    with pytest.raises(
        BenchmarkError, match=r"train\.txt is the release's 'train' split.*benchmark\.split=train"
    ):
        _bench("opencpop", train)
    assert [it.id for it in _bench("opencpop", train, "benchmark.split=train").items] == [
        "2003000080",
        "2003000102",
    ]
    with pytest.raises(BenchmarkError, match="'train' split"):  # benchmark.file names it too
        _bench("opencpop", root, "benchmark.file=segments/train.txt")
    assert len(_bench("opencpop", root / "segments" / "test.txt").items) == 3  # the split asked for: read


def test_music_avqa_val_file_is_not_scored_as_the_test_split(tmp_path):
    root = make_music_avqa(tmp_path / "MUSIC-AVQA")
    folder = root / "data" / "json_update"
    shutil.copy(folder / "avqa-test.json", folder / "avqa-val.json")
    with pytest.raises(BenchmarkError, match=r"avqa-val\.json is the release's 'val' split"):
        _bench("music_avqa", folder / "avqa-val.json")
    # root is the JSON itself: its audio is found under data/audio/ as for root=<release folder>
    items = _bench("music_avqa", folder / "avqa-val.json", "benchmark.split=val").items
    assert {it.audio for it in items} <= {str(p) for p in (root / "data" / "audio").glob("*.wav")}
    answers = {it.id: it.answer for it in items}
    cfg = _cfg("music_avqa", folder / "avqa-val.json", tmp_path / "out", "benchmark.split=val")
    results = evaluate(cfg, predict_fn=lambda batch: [answers[it.id] for it in batch])
    assert results["tasks"]["mcq"]["accuracy"] == 1.0
    assert paper_comparison(results) == []  # the val split: no paper column


def test_music_avqa_root_as_the_json_finds_the_audio_beside_data(tmp_path):
    """docs: benchmark.root may be the data file itself. For MUSIC-AVQA the audio (data/audio/) was looked for only
    in data/json_update/, so every item was 'audio missing'."""
    root = make_music_avqa(tmp_path / "MUSIC-AVQA")
    by_root = {it.id: it.audio for it in _bench("music_avqa", root).items}
    by_file = {
        it.id: it.audio for it in _bench("music_avqa", root / "data" / "json_update" / "avqa-test.json").items
    }
    assert by_file == by_root and len(by_file) == 6


def test_nsynth_examples_json_of_another_split_is_refused(tmp_path):
    root = make_nsynth(tmp_path / "nsynth")
    valid = root / "nsynth-valid"
    shutil.copytree(root / "nsynth-test", valid)
    with pytest.raises(BenchmarkError, match=r"'valid' split, but benchmark\.split='test'"):
        _bench("nsynth_family", valid / "examples.json")
    assert len(_bench("nsynth_family", valid / "examples.json", "benchmark.split=valid").items) == 7


def test_mmau_test_mini_file_under_split_test_is_refused(tmp_path):
    """split=test with root=mmau-test-mini.json scored test-mini under the test split's name (its paper row says
    'answers withheld')."""
    root = make_mmau(tmp_path / "MMAU")
    with pytest.raises(BenchmarkError, match=r"'test-mini' split, but benchmark\.split='test'"):
        _bench("mmau", root / "mmau-test-mini.json", "benchmark.split=test")
    assert _bench("mmau", root / "mmau-test-mini.json").items


# ---- lyrics: numbers are compared as written (docs/evaluation.md) ------------------------------------------------
def test_numbers_in_lyrics_are_compared_as_written_as_alt_eval_does():
    alt_eval = pytest.importorskip("alt_eval")
    refs, hyps = ["Twenty-one guns, 1,000 times", "we're 2 of us"], ["21 guns 1000 times", "were two of us"]
    ours = error_rate(refs, hyps)
    # 21 for twenty-one: a substitution and a deletion; two for 2: a substitution ("we're" is "were": apostrophes
    # are deleted, "1,000" is "1000"): 3 errors in 5 + 4 reference words
    assert ours == pytest.approx(3 / 9)
    assert error_rate(refs[:1], hyps[:1]) == pytest.approx(
        alt_eval.compute_metrics(refs[:1], hyps[:1])["WER"]
    )
