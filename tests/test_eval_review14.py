"""Review round 14, eval metrics journey: honest lyrics counts (empty references), the CER row named by its
languages, MMAU-Pro's paper row marked when its multi-audio questions are skipped, MuChoMusic scored by the
correct answer's own position (its compare_answers), and answer parsing against the official scorers."""

from __future__ import annotations

import csv
import json

import pytest
from release_fixtures import make_mmau_pro, make_muchomusic
from test_eval_release_formats import _bench, _official_muchomusic, _run
from test_eval_runner import CountingPredictor, _write_mcq_fixture
from test_eval_runner import _cfg as _runner_cfg
from test_metrics_review9 import _lyrics_item

from musicflamingo.eval import EvalConfigError, evaluate
from musicflamingo.eval.metrics import score_items, score_lyrics
from musicflamingo.eval.parsing import ChoiceParse, mmau_string_match, muchomusic_choice, parse_choice
from musicflamingo.eval.report import markdown_report, paper_comparison


# ---- lyrics: empty references ----------------------------------------------------------------------------------
def test_empty_references_are_left_out_of_every_count():
    # "♪ ♪" and "..." normalise to nothing: no error rate, so neither in n_wer nor in n / the language's n
    items = [
        _lyrics_item(0, "hello world", "en"),
        _lyrics_item(1, "♪ ♪", "en"),
        _lyrics_item(2, "...", "de"),
        _lyrics_item(3, "我爱音乐", "zh"),
    ]
    summary, rows = score_lyrics(items, ["hello", "la la la", "", "我爱音东"])
    assert [r["error"] for r in rows] == [0.5, None, None, 0.25]
    assert summary["empty_references"] == 2
    assert (summary["n"], summary["n_wer"], summary["n_cer"]) == (2, 1, 1)
    assert summary["wer"] == pytest.approx(0.5) and summary["cer"] == pytest.approx(0.25)
    en, de = summary["per_language"]["en"], summary["per_language"]["de"]
    assert (en["n"], en["error"], en["empty_references"]) == (1, pytest.approx(0.5), 1)
    assert (de["n"], de["error"], de["empty_references"]) == (0, None, 1)
    # the run's num_scored is the tasks' n: the empty references are not among the scored items
    tasks, _ = score_items(items, {it.id: p for it, p in zip(items, ["hello", "x", "", "我爱音东"])})
    assert tasks["lyrics"]["n"] == 2
    md = markdown_report({"benchmark": "lyrics", "num_items": 4, "num_scored": 2, "tasks": tasks})
    assert "- items scored: 2, empty references (predicted, not scored): 2\n" in md
    assert "| WER (1 items) | 0.5000 |" in md


# ---- lyrics: the CER row names its languages -------------------------------------------------------------------
def test_cer_row_names_the_languages_it_scored():
    items = [
        _lyrics_item(0, "こんにちは世界", "ja"),
        _lyrics_item(1, "สวัสดีครับ", "th"),
        _lyrics_item(2, "hello world", "en"),
    ]
    tasks, _ = score_items(items, {"s0": "こんにちは世界", "s1": "สวัสดี", "s2": "hello world"})
    assert tasks["lyrics"]["cer_language_codes"] == ["ja", "th"]
    md = markdown_report({"benchmark": "lyrics", "num_items": 3, "num_scored": 3, "tasks": tasks})
    assert "| CER, ja, th (2 items) |" in md and "Chinese" not in md
    # a results.json written before cer_language_codes: the languages come from per_language
    old = {k: v for k, v in tasks["lyrics"].items() if k != "cer_language_codes"}
    md = markdown_report({"benchmark": "lyrics", "num_items": 3, "num_scored": 3, "tasks": {"lyrics": old}})
    assert "| CER, ja, th (2 items) |" in md


# ---- MMAU-Pro: the paper row when multi-audio questions were skipped ------------------------------------------
def test_mmau_pro_paper_row_says_multi_audio_music_rows_were_skipped(tmp_path):
    pytest.importorskip("pyarrow")
    root = make_mmau_pro(tmp_path / "MMAU-Pro")
    # a3f4c2e0-0004 is a music question over two audio files: the official scorer scores it, we cannot
    results = _run("mmau_pro", root, {"a3f4c2e0-0001": "(A) Sitar", "a3f4c2e0-0002": "(D) 150 BPM"})
    assert results["counts"]["skipped_rows_by"] == {"several audio files": {"category": {"music": 1}}}
    (row,) = paper_comparison(results)
    assert row["ours"] == 50.0 and "1 music rows skipped (several audio files)" in row["note"]
    assert "NV-Embed-v2" in row["note"]
    assert "not comparable" in row["note"]
    assert "not comparable" in (root / "out" / "results.md").read_text()


def test_mmau_pro_paper_row_ignores_multi_audio_rows_of_other_categories(tmp_path):
    pytest.importorskip("pyarrow")
    root = make_mmau_pro(tmp_path / "MMAU-Pro")
    bench = _bench("mmau_pro", root, "benchmark.categories=null")
    assert bench.counts()["skipped_rows_by"] == {"several audio files": {"category": {"music": 1}}}
    results = {
        "benchmark": "mmau_pro",
        "settings": {"format": "mmau_pro"},
        "num_items": 2,
        "num_predicted": 2,
        "counts": {
            "items": 2,
            "skipped_rows": {"several audio files": 3},
            "skipped_rows_by": {"several audio files": {"category": {"multi": 3}}},
        },
        "tasks": {"mcq": {"n": 2, "by": {"category": {"music": {"n": 2, "accuracy": 0.5}}}}},
    }
    assert "skipped" not in paper_comparison(results)[0]["note"]


# ---- MuChoMusic: the correct answer's position only ------------------------------------------------------------
def test_muchomusic_distractor_with_the_answers_text_is_wrong_as_in_compare_answers(tmp_path):
    root = make_muchomusic(tmp_path / "muchomusic")
    path = root / "muchomusic.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows[0]["distractor_1_answer"] = rows[0]["correct_answer"]  # the release has such near-duplicates
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    items = {it.id: it for it in _bench("muchomusic", root).items}
    dup = items[rows[0]["question_id"]]
    order = dup.meta["answer_orders"]
    right, twin = order.index(0), order.index(1)
    assert dup.correct_indices == [right] and dup.answer_index == right
    letter = "ABCD"
    answers = {i: f"({letter[it.answer_index]})" for i, it in items.items()}
    answers[dup.id] = f"({letter[twin]})"  # the distractor that reads as the answer
    results = _run("muchomusic", root, answers)
    s = results["tasks"]["mcq"]
    official = _official_muchomusic(root / "out" / "muchomusic_predictions.json")
    assert official == pytest.approx(3 / 4)
    assert s["accuracy"] == pytest.approx(official) and s["accuracy_official"] == pytest.approx(official)
    assert s["repeated_answer"] == 0
    per_item = [json.loads(x) for x in (root / "out" / "per_item.jsonl").read_text().splitlines()]
    assert next(r for r in per_item if r["id"] == dup.id)["correct"] is False


# ---- parsing: letters listed after "the answer is" -------------------------------------------------------------
CHOICES4 = ["Sitar", "Electric guitar", "Violin", "Harmonium"]


@pytest.mark.parametrize(
    ("answer", "index", "status"),
    [
        ("The answer is B or C", None, "ambiguous"),  # MuChoMusic's parser and MMAU's rule: no option
        ("Answer: B and C", None, "ambiguous"),
        ("Answer: (B), (C)", None, "ambiguous"),
        ("The answer is B/C.", None, "ambiguous"),
        ("The answer is B, C is the other choice", 1, "ok"),  # "C is": a word, not a listed letter
        ("The answer is B, a plucked string", 1, "ok"),
        ("The answer is C, Violin, not B", 2, "ok"),
        ("Answer: B and I am sure", 1, "ok"),  # the pronoun I
        ("The answer is B, and C would be wrong", 1, "ok"),  # C is a subject
        ("The answer is B or C because both are plucked", None, "ambiguous"),
        ("The answer is (B) Electric guitar", 1, "ok"),
    ],
)
def test_letters_listed_after_the_answer_name_no_one_option(answer, index, status):
    parsed = parse_choice(answer, CHOICES4)
    assert (parsed.index, parsed.status) == (index, status)
    # the official scorers give none of the hedged answers credit either
    if status == "ambiguous":
        assert muchomusic_choice(answer, CHOICES4) is None
        assert not mmau_string_match(CHOICES4[1], answer, CHOICES4)


def test_letters_listed_after_the_answer_with_one_text_are_that_answer():
    # MMAU repeats options: "A or D" with the same text under both names one answer
    assert parse_choice(
        "The answer is A or D", ["1.63 seconds", "2 seconds", "3 seconds", "1.63 seconds"]
    ) == (ChoiceParse(0, "ok", "answer_is"))


# ---- resuming with other settings ------------------------------------------------------------------------------
def test_rescoring_with_other_scoring_settings_resumes_and_other_prompts_are_named(tmp_path):
    _write_mcq_fixture(tmp_path)
    first = CountingPredictor()
    evaluate(_runner_cfg(tmp_path), predict_fn=first)
    # group_by is read when scoring only: the same predictions, another breakdown, nothing predicted again
    again = CountingPredictor()
    results = evaluate(_runner_cfg(tmp_path, "benchmark.group_by=[difficulty]"), predict_fn=again)
    assert first.seen == ["q0", "q1", "q2", "q3"] and again.seen == []
    assert list(results["tasks"]["mcq"]["by"]) == ["difficulty"]
    # a run.json written while group_by was part of the identity still resumes
    run_json = tmp_path / "out" / "run.json"
    old = json.loads(run_json.read_text())
    old["benchmark_cfg"]["group_by"] = ["task"]
    run_json.write_text(json.dumps(old))
    assert evaluate(_runner_cfg(tmp_path), predict_fn=again)["num_scored"] == 4 and again.seen == []
    # a setting that changes the answers is refused, naming the setting and both values
    with pytest.raises(
        EvalConfigError, match=r"differs in: benchmark_cfg\.prompt \(.* in run\.json, '\{question\} "
    ):
        evaluate(_runner_cfg(tmp_path, "benchmark.prompt='{question} {options}'"), predict_fn=again)


def test_paper_row_says_when_group_by_drops_the_papers_subset_field(tmp_path):
    # benchmark.group_by=[difficulty] on MMAU: the MMAU-Music row had no number and no word why
    _write_mcq_fixture(tmp_path)
    results = evaluate(
        _runner_cfg(tmp_path, "benchmark.group_by=[difficulty]"), predict_fn=CountingPredictor()
    )
    (row,) = paper_comparison(results)
    assert row["ours"] is None and "add task to benchmark.group_by" in row["note"]
    results = evaluate(_runner_cfg(tmp_path), predict_fn=CountingPredictor())
    (row,) = paper_comparison(results)
    assert row["ours"] == 100.0 and "group_by" not in row["note"]
