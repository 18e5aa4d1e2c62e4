"""Metrics against the packages and scorers whose numbers researchers compare ours with (review round 9, metrics).

jiwer, sacrebleu and rouge-score are runtime dependencies; scikit-learn and alt-eval (the Jam-ALT lyrics scorer)
are optional here: their tests skip without them.
"""

from __future__ import annotations

import random
import warnings

import pytest

from musicflamingo.eval.benchmarks import EvalItem
from musicflamingo.eval.metrics import (
    error_rate,
    normalize_lyrics,
    score_caption,
    score_classification,
    score_items,
    score_lyrics,
)
from musicflamingo.eval.parsing import option_letter, parse_choice

CHOICES = ["Piano", "Acoustic guitar", "Violin", "Drums"]


def _lyrics_item(i: int, text: str, language: str) -> EvalItem:
    return EvalItem(f"s{i}", f"{i}.wav", "p", "lyrics", answer=text, meta={"language": language})


def _edits(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two token lists (substitutions, deletions, insertions all cost 1)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


# ----------------------------------------------------------------------------------------------------------------
# Fixes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("language", ["zh-Hans", "zh_CN", "ZH-hant-TW", "cmn_hans_cn", "yue_hant_hk"])
def test_chinese_language_tags_with_subtags_are_scored_with_cer(language):
    # A lyrics JSONL tagged "zh-Hans" (BCP 47) or "cmn_hans_cn" (FLEURS) was scored with WER: a Chinese line has
    # no spaces, so one wrong character made the whole line one wrong "word" (WER 1.0 instead of CER 0.25).
    items = [_lyrics_item(0, "我爱音乐", language)]
    summary, rows = score_lyrics(items, ["我爱音东"])
    assert rows[0]["metric"] == "cer" and rows[0]["error"] == pytest.approx(0.25)
    assert summary["cer"] == pytest.approx(0.25) and summary["wer"] is None
    assert summary["per_language"][language]["metric"] == "cer"
    _, rows = score_lyrics(
        [_lyrics_item(0, "hello", "en-US"), _lyrics_item(1, "hello", "zhx")], ["hello", "x"]
    )
    assert [r["metric"] for r in rows] == ["wer", "wer"]


def test_cer_languages_given_as_one_string_is_one_language():
    # `benchmark.cer_languages=zh` reaches the scorer as the string "zh", which was read as the letters {z, h}.
    items = [_lyrics_item(0, "我爱音乐", "zh"), _lyrics_item(1, "hello world", "en")]
    results, _ = score_items(items, {"s0": "我爱音东", "s1": "hello"}, cer_languages="zh")
    lyr = results["lyrics"]
    assert lyr["cer"] == pytest.approx(0.25) and lyr["n_cer"] == 1
    assert lyr["wer"] == pytest.approx(0.5) and lyr["n_wer"] == 1


def test_digit_groups_and_dotted_abbreviations_are_one_word():
    # "1,000" vs "1000" was 2 errors (["1", "000"] vs ["1000"]); alt-eval and LyricWhiz's jiwer RemovePunctuation
    # count none, and read "u.s.a." as "usa".
    assert normalize_lyrics("A 1,000 times in the U.S.A., 3.5 miles") == "a 1000 times in the usa 35 miles"
    assert error_rate(["a thousand, 1,000 times"], ["a thousand 1000 times"]) == 0.0
    assert error_rate(["born in the u.s.a."], ["born in the USA"]) == 0.0
    # ... while a comma between words, an ellipsis and a spaced dot still separate words
    assert normalize_lyrics("oh,oh,oh hey...you Mr. Smith 9:30") == "oh oh oh hey you mr smith 9 30"


def test_modifier_letter_apostrophe_is_an_apostrophe():
    # U+02BC (a letter to Unicode, kept by NFKC) made "donʼt" a different word from "don't".
    assert normalize_lyrics("Donʼt stop") == normalize_lyrics("don't stop") == "dont stop"
    assert error_rate(["don't stop"], ["donʼt stop"]) == 0.0


def test_first_line_letter_then_explanation_is_that_letter():
    # "B" on a line of its own, then the reasoning: was unparsed (scored wrong).
    for answer in [
        "B\n\nThe guitar is strummed.",
        "B\nAcoustic, plucked strings",
        "**B**\n\nbecause ...",
        "B \r\nok",
    ]:
        assert parse_choice(answer, CHOICES).index == 1, answer
    # the other rules still decide first / still see two letters
    assert parse_choice("B\n\nOn reflection, the answer is C.", CHOICES).index == 2
    assert parse_choice("B\nor maybe (C)", CHOICES).status == "ambiguous"
    # a capital that starts a sentence is no letter
    assert parse_choice("A gentle piano melody", CHOICES).index == 0  # via the option text
    assert parse_choice("A\ngentle melody", CHOICES).index == 0  # a first line that is only "A" is the letter


def test_full_width_letters_and_brackets_are_letters():
    # The option-text rule read NFKC text, the letter rules did not: "（B）" and "Ｂ" were unparsed.
    assert parse_choice("（B）", CHOICES).index == 1
    assert parse_choice("Ｂ", CHOICES).index == 1
    assert parse_choice("答案是（C）。", CHOICES).index == 2
    assert parse_choice("The answer is Ｄ.", CHOICES).index == 3


# ----------------------------------------------------------------------------------------------------------------
# Against the packages and scorers
# ----------------------------------------------------------------------------------------------------------------
_WORDS = {
    "en": "love night heart fire dance tonight forever rain shine dream well-known rock-n-roll".split(),
    "de": "Liebe Nacht über Straße schön Herz Feuer träumen Größe weiß".split(),
    "fr": "amour nuit cœur été rêve déjà où fenêtre garçon Noël".split(),
    "es": "corazón niño mañana canción ¿qué? ¡ay! noche fuego sueño España".split(),
}
_EXTRAS = [
    "1,000",
    "3.5",
    "U.S.A.",
    "(yeah)",
    "oh!",
    "—",
    "...",
    "24/7",
    "#1",
    "$5",
    "100%",
    '"so"',
    "«la»",
    "9:30",
]


def _lyrics(rng: random.Random, language: str, n: int) -> str:
    lines = []
    for _ in range(rng.randint(1, 4)):
        words = []
        for _ in range(rng.randint(1, n)):
            w = rng.choice(_EXTRAS) if rng.random() < 0.15 else rng.choice(_WORDS[language])
            words.append(w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w)
        lines.append(" ".join(words) + rng.choice(["", ",", ".", "!", "?"]))
    return "\n".join(lines)


def _corrupt(rng: random.Random, text: str, language: str) -> str:
    out = []
    for w in text.split():
        r = rng.random()
        if r < 0.08:
            continue
        out += [rng.choice(_WORDS[language])] if r < 0.16 else [w, "yeah"] if r < 0.2 else [w]
    return " ".join(out)


def _pairs(seed: int, n: int = 24) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lang = rng.choice(sorted(_WORDS))
        ref = _lyrics(rng, lang, 12)
        rows.append((lang, ref, _corrupt(rng, ref, lang) if rng.random() < 0.9 else ""))
    return rows


def test_wer_is_pooled_edit_distance_over_normalised_words():
    pairs = _pairs(0) + [("en", "", "words with no reference"), ("en", "!!!", "x")]
    refs, hyps = [r for _, r, _ in pairs], [h for _, _, h in pairs]
    norm = [(normalize_lyrics(r).split(), normalize_lyrics(h).split()) for r, h in zip(refs, hyps)]
    norm = [(r, h) for r, h in norm if r]  # empty references are left out (docs)
    pooled = sum(_edits(r, h) for r, h in norm) / sum(len(r) for r, _ in norm)
    item_mean = sum(_edits(r, h) / len(r) for r, h in norm) / len(norm)
    assert error_rate(refs, hyps) == pytest.approx(pooled)
    assert abs(pooled - item_mean) > 1e-3  # the case tells the two aggregations apart
    summary, rows = score_lyrics([_lyrics_item(i, r, lang) for i, (lang, r, _) in enumerate(pairs)], hyps)
    assert summary["empty_references"] == 2 and [r["error"] for r in rows][-2:] == [None, None]
    for lang in _WORDS:
        idx = [i for i, (lg, r, _) in enumerate(pairs) if lg == lang and normalize_lyrics(r)]
        want = sum(_edits(*norm_i) for norm_i in (norm[i] for i in idx)) / sum(len(norm[i][0]) for i in idx)
        assert summary["per_language"][lang]["error"] == pytest.approx(want)


def test_cer_is_pooled_character_edit_distance():
    refs = ["我爱音乐。", "感受停在我发端的指尖", "你好，世界！", "１２３"]
    hyps = ["我 喜欢 音乐", "感受停在我发的指尖啊", "", "123"]
    chars = [
        (list(normalize_lyrics(r, cer=True)), list(normalize_lyrics(h, cer=True))) for r, h in zip(refs, hyps)
    ]
    want = sum(_edits(r, h) for r, h in chars) / sum(len(r) for r, _ in chars)
    assert error_rate(refs, hyps, cer=True) == pytest.approx(want)
    assert want == pytest.approx((2 + 2 + 4 + 0) / (4 + 10 + 4 + 3))


def test_wer_equals_alt_eval_on_text_without_apostrophes():
    alt_eval = pytest.importorskip("alt_eval")
    pairs = _pairs(1, 32)
    for lang in sorted(_WORDS):
        refs = [r for lg, r, _ in pairs if lg == lang]
        hyps = [h for lg, _, h in pairs if lg == lang]
        theirs = alt_eval.compute_metrics(refs, hyps, languages=lang)["WER"]
        assert error_rate(refs, hyps) == pytest.approx(theirs), lang
    # the documented difference: alt-eval splits contractions ("we're" -> "we 're"), we join them ("were")
    assert alt_eval.compute_metrics(["we're going"], ["were going"])["WER"] == pytest.approx(2 / 3)
    assert error_rate(["we're going"], ["were going"]) == 0.0


def _caption_items() -> tuple[list[EvalItem], list[str]]:
    rng = random.Random(3)
    vocab = (
        "a the slow sad piano guitar plays playing played melodies melody drums loud low-quality café".split()
    )
    refs, hyps = [], []
    for i in range(30):
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 40)))
        hyp = " ".join(w for w in ref.split() if rng.random() < 0.7) + rng.choice(
            ["", ".", " Song!", "\nnew line"]
        )
        refs.append(ref.capitalize() + ".")
        hyps.append(hyp if i % 7 else "")
    hyps[5] = " ".join(vocab * 40)  # a very long caption
    items = [EvalItem(f"c{i}", "x.wav", "p", "caption", answer=r) for i, r in enumerate(refs)]
    return items, hyps


def test_caption_bleu_and_rouge_equal_the_packages():
    import sacrebleu
    from rouge_score import rouge_scorer

    items, hyps = _caption_items()
    refs = [it.answer for it in items]
    summary, rows = score_caption(items, hyps)
    bleu = sacrebleu.metrics.BLEU(tokenize="13a", smooth_method="exp", lowercase=False)
    assert summary["bleu"] == pytest.approx(bleu.corpus_score(hyps, [refs]).score)
    sentence = sacrebleu.metrics.BLEU(effective_order=True)
    sentence_mean = sum(sentence.sentence_score(h, [r]).score for h, r in zip(hyps, refs)) / len(refs)
    assert abs(summary["bleu"] - sentence_mean) > 0.1  # corpus BLEU, not a mean of sentence BLEUs
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    each = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]
    assert [r["rougeL"] for r in rows] == pytest.approx(each)
    assert summary["rougeL"] == pytest.approx(sum(each) / len(each))
    # Porter stemming, as documented (rouge-score's own default is none)
    _, (row,) = score_caption(
        [EvalItem("s", "x.wav", "p", "caption", answer="plays melodies")], ["playing melody"]
    )
    assert row["rougeL"] == 1.0
    assert (
        rouge_scorer.RougeScorer(["rougeL"]).score("plays melodies", "playing melody")["rougeL"].fmeasure == 0
    )


def test_classification_metrics_equal_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(4)
    for _ in range(60):
        k = rng.randint(2, 6)
        labels = [f"genre{i}" for i in range(k)]
        present = rng.sample(range(k), rng.randint(1, k))
        items, preds, y_true, y_pred = [], [], [], []
        for j in range(rng.randint(1, 20)):
            a = rng.choice(present)
            items.append(
                EvalItem(
                    f"i{j}", "x.wav", "p", "classification", answer=labels[a], choices=labels, answer_index=a
                )
            )
            y_true.append(labels[a])
            if rng.random() < 0.15:
                preds.append("I cannot tell"), y_pred.append("none")
            else:
                p = rng.randrange(k)
                preds.append(f"({option_letter(p)}) {labels[p]}"), y_pred.append(labels[p])
        s, _ = score_classification(items, preds)
        assert s["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
        with warnings.catch_warnings():  # sklearn warns of the "none" label, which y_true lacks
            warnings.simplefilter("ignore")
            assert s["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(y_true, y_pred))
            f1 = metrics.f1_score(
                y_true, y_pred, average="macro", labels=sorted(set(y_true)), zero_division=0
            )
        assert s["macro_f1"] == pytest.approx(f1)
