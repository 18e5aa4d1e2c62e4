"""Metrics on hand-computed examples: WER/CER, caption aspect recall, MCQ summary, confusion matrix."""

from __future__ import annotations

import pytest

from musicflamingo.eval.benchmarks import EvalItem
from musicflamingo.eval.metrics import (
    aspect_mentioned,
    error_rate,
    normalize_lyrics,
    score_caption,
    score_classification,
    score_items,
    score_lyrics,
    score_mcq,
)


def test_normalize_lyrics():
    assert normalize_lyrics("Don't STOP—me  now!!") == "dont stop me now"
    # every apostrophe the docs list, the acute accent too (NFKC would split it into a space + a combining mark)
    assert {normalize_lyrics(f"don{a}t") for a in "'’‘`´"} == {"dont"}
    assert normalize_lyrics("我 爱 音乐。", cer=True) == "我爱音乐"


def test_wer_hand_computed():
    # "the cat sat on the mat" (6 words) vs "the cat sit on mat": 1 substitution + 1 deletion = 2/6.
    assert error_rate(["The cat, sat on the mat!"], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    # Corpus level: (1 + 1) edits over (4 + 2) reference words.
    assert error_rate(["a b c d", "hello world"], ["a b x d", "hello"]) == pytest.approx(2 / 6)


def test_cer_chinese_hand_computed():
    # 我爱音乐 (4 chars) vs 我喜欢音乐: 爱->喜 substitution + 欢 insertion = 2/4.
    assert error_rate(["我爱音乐。"], ["我 喜欢 音乐"], cer=True) == pytest.approx(0.5)


def test_score_lyrics_splits_languages():
    items = [
        EvalItem("e1", "x.wav", "p", "lyrics", answer="hello world", meta={"language": "en"}),
        EvalItem("z1", "y.wav", "p", "lyrics", answer="我爱音乐", meta={"language": "zh"}),
    ]
    summary, rows = score_lyrics(items, ["hello", "我爱音乐"])
    assert summary["wer"] == pytest.approx(0.5) and summary["n_wer"] == 1
    assert summary["cer"] == pytest.approx(0.0) and summary["n_cer"] == 1
    assert summary["per_language"]["zh"]["metric"] == "cer"
    assert [r["metric"] for r in rows] == ["wer", "cer"]


def test_aspect_recall_hand_computed():
    assert aspect_mentioned("low quality", "A low-quality recording")
    assert not aspect_mentioned("piano", "pianola")
    items = [
        EvalItem(
            "a",
            "a.wav",
            "p",
            "caption",
            answer="sad piano",
            meta={"aspects": ["low quality", "piano", "sad"]},
        ),
        EvalItem(
            "b", "b.wav", "p", "caption", answer="fast guitar", meta={"aspects": ["guitar", "fast tempo"]}
        ),
    ]
    summary, _ = score_caption(items, ["A sad piano melody, low-quality recording.", "slow guitar"])
    assert summary["aspect_recall"] == pytest.approx((3 / 3 + 1 / 2) / 2)
    assert summary["aspect_recall_micro"] == pytest.approx(4 / 5)
    # Identical captions (>= 4 words, so BLEU's 4-gram precision is defined): BLEU 100, ROUGE-L 1.
    refs = ["a sad piano melody plays", "a fast guitar riff repeats"]
    items = [EvalItem(str(i), "a.wav", "p", "caption", answer=r) for i, r in enumerate(refs)]
    same, _ = score_caption(items, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(1.0)


def test_caption_facts_per_category_hand_computed():
    """Crafted captions against the synthetic corpus' facts: all four right; two of four (a wrong key, no tempo);
    a caption naming two tempi (one right) does not state the tempo."""
    import dataclasses

    from musicflamingo.rewards import synthetic_facts

    meta = {"key": "F minor", "tempo_bpm": 60, "time_signature": "2/4", "instrument_family": "Reed"}
    facts = [dataclasses.asdict(f) for f in synthetic_facts(meta)]
    items = [EvalItem(str(i), "a.wav", "p", "caption", answer="x", meta={"facts": facts}) for i in range(3)]
    captions = [
        "A solo alto saxophone (reed family) plays in F minor, in 2/4 time at 60 BPM.",
        "A solo alto saxophone (reed family) plays in C major, in 2/4 time.",
        "A reed in F minor at 60 BPM or 160 BPM, in 3/4 time.",
    ]
    summary, rows = score_caption(items, captions)
    got = {c: f["accuracy"] for c, f in summary["facts"].items()}
    assert got == pytest.approx(
        {"key": 2 / 3, "tempo": 1 / 3, "time_signature": 2 / 3, "instrument_family": 1.0}
    )
    assert summary["facts_mean"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3 + 1) / 4)
    # Chance: one value of each category at random (24 keys, 4 tempi, 4 metres, the families).
    assert summary["facts"]["key"]["chance"] == pytest.approx(1 / 24)
    assert summary["facts"]["tempo"]["chance"] == pytest.approx(1 / 4)
    assert rows[1]["facts"] == {
        "key": False,
        "tempo": False,
        "time_signature": True,
        "instrument_family": True,
    }
    # Items without facts: no facts summary at all.
    plain, _ = score_caption([EvalItem("p", "a.wav", "p", "caption", answer="x")], ["x"])
    assert "facts" not in plain


def _mcq(i: str, answer_index: int, group: str) -> EvalItem:
    choices = ["Piano", "Guitar", "Violin"]
    return EvalItem(
        i,
        f"{i}.wav",
        "p",
        "mcq",
        answer=choices[answer_index],
        choices=choices,
        answer_index=answer_index,
        groups={"type": group},
    )


def test_score_mcq_summary():
    items = [_mcq("1", 0, "x"), _mcq("2", 1, "x"), _mcq("3", 2, "y"), _mcq("4", 0, "y")]
    preds = ["A", "Guitar", "(A) or (C)", ""]
    s, rows = score_mcq(items, preds)
    assert s["n"] == 4 and s["accuracy"] == pytest.approx(0.5) and s["accuracy_mmau"] == pytest.approx(0.25)
    assert s["unparsed"] == 1 and s["ambiguous"] == 1 and s["chance"] == pytest.approx(1 / 3)
    assert s["by"]["type"]["x"]["accuracy"] == pytest.approx(1.0)
    assert s["by"]["type"]["y"]["accuracy"] == pytest.approx(0.0)
    assert [r["parsed"] for r in rows] == ["A", "B", None, None]


def test_classification_confusion_matrix():
    labels = ["blues", "jazz", "rock"]
    items = [
        EvalItem(
            str(i),
            "a.wav",
            "p",
            "classification",
            answer=labels[t],
            choices=labels,
            answer_index=t,
            groups={"label": labels[t]},
            meta={"mode": "mcq"},
        )
        for i, t in enumerate([0, 0, 1, 2])
    ]
    s, _ = score_classification(items, ["(A) blues", "C", "jazz", "no idea"])
    assert s["confusion"] == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert s["per_class"]["rock"]["precision"] == pytest.approx(0.0)
    assert s["unparsed"] == 1


def test_mcq_repeated_answer_withheld_and_open_items():
    rep = ["1.63 seconds", "2.74 seconds", "1.53 seconds", "1.63 seconds"]
    items = [
        EvalItem(
            "r",
            "a.wav",
            "p",
            "mcq",
            answer="1.63 seconds",
            choices=rep,
            answer_index=0,
            correct_indices=[0, 3],
        ),
        EvalItem("w", "a.wav", "p", "mcq", choices=rep, meta={"withheld": True}),
        EvalItem(
            "o",
            "a.wav",
            "p",
            "mcq",
            answer="two",
            choices=["one", "two"],
            answer_index=1,
            meta={"mode": "open", "aliases": {"two": ["2"]}},
        ),
    ]
    summary, rows = score_mcq(items, ["(D) 1.63 seconds", "(A)", "2 instruments"])
    assert summary["n"] == 2 and summary["withheld"] == 1 and summary["accuracy"] == 1.0
    assert summary["repeated_answer"] == 1 and [r["id"] for r in rows] == ["r", "o"]
    assert rows[0]["parsed"] == "D" and rows[1]["via"] == "text"


def test_open_questions_scored_like_captions():
    items = [EvalItem("q", "a.wav", "p", "open_qa", answer="An electric guitar plays the melody.")]
    results, rows = score_items(items, {"q": "An electric guitar plays the melody."})
    assert results["open_qa"]["rougeL"] == pytest.approx(1.0) and results["open_qa"]["bleu"] == pytest.approx(
        100.0
    )
