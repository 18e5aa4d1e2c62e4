"""Scores: multiple choice (two rules, three for MuChoMusic), classification (+ confusion matrix), captioning and
open questions (BLEU / ROUGE-L), lyrics WER/CER.

``score_items(items, predictions)`` groups items by ``task`` and returns one summary per task plus per-item
details. Units: accuracies, recalls, ROUGE-L and WER/CER are fractions (0..1; WER can exceed 1); BLEU is
sacrebleu's 0..100. The rules are written down in docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from musicflamingo.eval.benchmarks import EvalItem
from musicflamingo.eval.parsing import (
    ChoiceParse,
    mmau_string_match,
    muchomusic_choice,
    normalize_text,
    option_letter,
    parse_choice,
    parse_label,
)

# Languages scored with CER (characters, whitespace removed) instead of WER: Chinese, Japanese, Thai, Lao and
# Burmese are written without spaces between words.
CER_LANGUAGES = (
    *("zh", "zh-cn", "zh-tw", "zh-hk", "cmn", "yue", "chinese", "mandarin", "cantonese"),
    *("ja", "japanese", "th", "thai", "lo", "lao", "my", "burmese"),
)


def uses_cer(language: Any, cer_languages: Iterable[str] | str) -> bool:
    """Whether ``language`` is scored with CER: it, or its first subtag, is in ``cer_languages`` (any case), so
    "zh-Hans", "zh_CN" and FLEURS' "cmn_hans_cn" count as "zh" / "cmn". A single string is one language
    (``benchmark.cer_languages=zh``), not its letters."""
    if isinstance(cer_languages, str):
        cer_languages = [cer_languages]
    cer_set = {str(x).strip().lower() for x in cer_languages}
    lang = str(language).strip().lower()
    return lang in cer_set or re.split(r"[-_]", lang, maxsplit=1)[0] in cer_set


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group_values(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value] or ["n/a"]
    return [str(value)]


def _breakdown(items: Sequence[EvalItem], rows: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict:
    """``{field: {value: {n, accuracy, accuracy_mmau, chance, unparsed}}}``; list-valued fields count an item
    once under each listed value."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in keys:
        buckets: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for it, row in zip(items, rows):
            for v in _group_values(it.groups.get(key, "n/a")):
                buckets[v].append(row)
        out[key] = {v: _mcq_summary(rs) for v, rs in sorted(buckets.items())}
    return out


def _mcq_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    out = {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n if n else None,
        "accuracy_mmau": sum(r["correct_mmau"] for r in rows) / n if n else None,
        "chance": _mean([r["chance"] for r in rows]),
        "unparsed": sum(r["status"] == "unparsed" for r in rows),
        "ambiguous": sum(r["status"] == "ambiguous" for r in rows),
    }
    official = [r["correct_official"] for r in rows if "correct_official" in r]
    if official:
        out["accuracy_official"] = sum(official) / len(official)
    return out


def correct_set(it: EvalItem) -> set[int]:
    """The options scored as right: every option whose text is the answer (``correct_indices``), else
    ``answer_index``; empty when the answer is not among the choices."""
    return set(it.correct_indices) or ({it.answer_index} if it.answer_index >= 0 else set())


def _mcq_row(it: EvalItem, pred: str, parsed: ChoiceParse) -> dict[str, Any]:
    row = {
        "id": it.id,
        "parsed": option_letter(parsed.index) if parsed.index is not None else None,
        "status": parsed.status,
        "via": parsed.via,
        "target": option_letter(it.answer_index) if it.answer_index >= 0 else None,
        "correct": parsed.index is not None and parsed.index in correct_set(it),
        "correct_mmau": mmau_string_match(it.answer, pred, it.choices),
        "chance": 1.0 / len(it.choices),
    }
    if it.meta.get("official_rule") == "muchomusic":
        row["correct_official"] = muchomusic_choice(pred, it.choices) in correct_set(it)
    return row


def score_mcq(items: Sequence[EvalItem], preds: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both rules on every item: ``accuracy`` (letter/option parser; an option whose text is the answer is
    right under any of its letters), ``accuracy_mmau`` (MMAU string match), ``accuracy_official``
    (MuChoMusic's own parser, for its items), counts of ``unparsed`` / ``ambiguous`` answers, ``chance`` (mean
    1/num_options), and a breakdown ``by`` every group field. Open-answer items (``meta["mode"] == "open"``,
    MusicAVQA) are parsed with :func:`parse_label` against their choices. Items whose answer is withheld
    (MMAU test) are not scored, only counted (``withheld``)."""
    withheld = sum(bool(it.meta.get("withheld")) for it in items)
    pairs = [(it, p) for it, p in zip(items, preds) if not it.meta.get("withheld")]
    items, preds = [it for it, _ in pairs], [p for _, p in pairs]
    rows = []
    for it, p in pairs:
        if it.meta.get("mode") == "open":
            parsed = parse_label(p, it.choices, it.meta.get("aliases") or {})
        else:
            parsed = parse_choice(p, it.choices)
        rows.append(_mcq_row(it, p, parsed))
    summary = _mcq_summary(rows)
    summary["answer_not_in_choices"] = sum(not correct_set(it) for it in items)
    summary["repeated_answer"] = sum(len(it.correct_indices) > 1 for it in items)
    if withheld:
        summary["withheld"] = withheld
    keys = dict.fromkeys(k for it in items for k in it.groups)
    summary["by"] = _breakdown(items, rows, keys)
    return summary, rows


def score_classification(
    items: Sequence[EvalItem], preds: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy (both rules), balanced accuracy, macro-F1, per-class recall/precision/F1 and a confusion matrix
    ``confusion[true][pred]`` over the labels plus a last column ``none`` (unparsed or ambiguous)."""
    if not items:
        return {"n": 0}, []
    labels = list(items[0].choices)
    rows = []
    for it, p in zip(items, preds):
        aliases = it.meta.get("aliases") or {}
        if it.meta.get("mode") == "open":
            parsed = parse_label(p, labels, aliases)
        else:
            parsed = parse_choice(p, labels)
            if parsed.status == "unparsed" and aliases:  # "(A) ..." rules found nothing: try the spellings
                parsed = parse_label(p, labels, aliases)
        row = _mcq_row(it, p, parsed)
        row["label"], row["predicted"] = it.answer, labels[parsed.index] if parsed.index is not None else None
        rows.append(row)
    k = len(labels)
    confusion = [[0] * (k + 1) for _ in range(k)]
    for it, row in zip(items, rows):
        col = labels.index(row["predicted"]) if row["predicted"] is not None else k
        confusion[it.answer_index][col] += 1
    per_class = {}
    for i, lab in enumerate(labels):
        tp, support, predicted = confusion[i][i], sum(confusion[i]), sum(confusion[r][i] for r in range(k))
        rec = tp / support if support else None
        prec = tp / predicted if predicted else None
        f1 = 2 * tp / (support + predicted) if support + predicted else None
        per_class[lab] = {"n": support, "recall": rec, "precision": prec, "f1": f1}
    summary = _mcq_summary(rows)
    present = [v for v in per_class.values() if v["n"]]
    summary.update(
        chance=1.0 / k,
        balanced_accuracy=_mean([v["recall"] for v in present]),
        macro_f1=_mean([v["f1"] or 0.0 for v in present]),
        labels=labels,
        confusion=confusion,
        per_class=per_class,
        by={
            "label": {
                lab: _mcq_summary([r for r in rows if r["label"] == lab])
                for lab in labels
                if per_class[lab]["n"]
            }
        },
    )
    return summary, rows


def aspect_mentioned(aspect: str, caption: str) -> bool:
    """True iff the normalised aspect (lowercase, punctuation -> space, whitespace collapsed) occurs as a
    whole-word phrase in the normalised caption."""
    a, c = normalize_text(aspect), normalize_text(caption)
    return bool(a) and f" {a} " in f" {c} "


def score_caption(
    items: Sequence[EvalItem], preds: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, one reference), mean ROUGE-L F1 (rouge-score with
    Porter stemming) and aspect recall (MusicCaps ``aspect_list``): ``aspect_recall`` is the mean over items of
    mentioned/listed, ``aspect_recall_micro`` pools all aspects."""
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = [it.answer for it in items]
    hyps = [str(p or "") for p in preds]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows, recalls, hit_total, aspect_total = [], [], 0, 0
    for it, hyp in zip(items, hyps):
        rouge = scorer.score(it.answer, hyp)["rougeL"].fmeasure
        aspects = list(it.meta.get("aspects") or [])
        hits = [a for a in aspects if aspect_mentioned(a, hyp)]
        if aspects:
            recalls.append(len(hits) / len(aspects))
            hit_total, aspect_total = hit_total + len(hits), aspect_total + len(aspects)
        rows.append({"id": it.id, "rougeL": rouge, "aspects_mentioned": hits, "aspects": len(aspects)})
    summary = {
        "n": len(items),
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score if items else None,
        "rougeL": _mean([r["rougeL"] for r in rows]),
        "aspect_recall": _mean(recalls),
        "aspect_recall_micro": hit_total / aspect_total if aspect_total else None,
        "empty_predictions": sum(not h.strip() for h in hyps),
    }
    facts = score_caption_facts(items, hyps, rows)
    if facts:
        summary["facts"] = facts
        summary["facts_mean"] = _mean([f["accuracy"] for f in facts.values()])
        summary["facts_chance_mean"] = _mean([f["chance"] for f in facts.values()])
    return summary, rows


def score_caption_facts(
    items: Sequence[EvalItem], hyps: Sequence[str], rows: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per fact category (key, tempo...): the share of captions that state it right
    (:func:`musicflamingo.rewards.caption_fact_hits`, the GRPO caption reward's rule), over the items whose
    ``meta["facts"]`` lists it, next to chance (one value of the category picked at random: 1 / (1 + the number
    of wrong values it lists)). Adds each row's ``facts`` hits."""
    # rewards reads the synthetic corpus' tables through the data package: imported here, where it is used, so
    # that eval.py's import chain stays free of Lightning (tests/test_runtime.py)
    from musicflamingo.rewards import Fact, caption_fact_hits

    hits: dict[str, list[bool]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    for it, hyp, row in zip(items, hyps, rows):
        listed = [
            Fact(f["category"], tuple(f["spellings"]), tuple(f.get("others", ())))
            for f in it.meta.get("facts", ())
        ]
        if not listed:
            continue
        row["facts"] = caption_fact_hits(hyp, listed)
        for f in listed:
            hits[f.category].append(row["facts"][f.category])
            chance[f.category].append(1.0 / (1 + len(f.others)))
    return {
        c: {"n": len(h), "accuracy": sum(h) / len(h), "chance": sum(chance[c]) / len(chance[c])}
        for c, h in hits.items()
    }


_APOSTROPHES = "'’‘`´ʼ"  # ASCII, right/left single quote, grave, acute, modifier letter apostrophe (U+02BC)


# A dot inside a word ("u.s.a.", "3.5") and a comma between digits ("1,000") join, as alt-eval's Moses
# tokenizer and jiwer's RemovePunctuation (LyricWhiz) have it; "hey...you" and "oh,oh" stay apart.
_JOINING = re.compile(r"(?<=\w)\.(?=\w)|(?<=\d),(?=\d)")


def normalize_lyrics(text: str, *, cer: bool = False) -> str:
    """NFKC, lowercase, apostrophes deleted ("don't" -> "dont"), a dot inside a word and a comma between digits
    deleted ("u.s.a." -> "usa", "1,000" -> "1000"), every other punctuation or symbol character (Unicode
    categories P* and S*) -> space, whitespace collapsed. With ``cer=True`` all whitespace is removed
    (character error rate for Chinese)."""
    # apostrophes first: NFKC turns the acute accent "´" into a space and a combining accent
    text = re.sub(f"[{_APOSTROPHES}]", "", str(text))
    text = _JOINING.sub("", unicodedata.normalize("NFKC", text).lower())
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return "".join(text.split()) if cer else " ".join(text.split())


def error_rate(references: Sequence[str], hypotheses: Sequence[str], *, cer: bool = False) -> float | None:
    """Corpus WER (or CER): total substitutions + deletions + insertions over total reference words (chars),
    after :func:`normalize_lyrics`; pairs whose normalised reference is empty are left out."""
    import jiwer

    pairs = [
        (normalize_lyrics(r, cer=cer), normalize_lyrics(h, cer=cer)) for r, h in zip(references, hypotheses)
    ]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    if cer:
        return float(jiwer.cer(refs, hyps))
    return float(jiwer.wer(refs, hyps))


# alt-eval's compute_metrics keys kept in a lyrics summary: the Jam-ALT paper's WER, case-sensitive WER
# (WER_case) and the precision / recall / F1 of punctuation, parentheses, line and section breaks
ALT_EVAL_KEYS = (
    *("WER", "MER", "WIL", "WER_case", "ER_case", "hits", "substitutions", "deletions", "insertions"),
    *(f"{m}_{t}" for t in ("punc", "pare", "line", "sect") for m in ("P", "R", "F1")),
)


ALT_EVAL_MISSING = "alt-eval is not installed (pip install alt-eval): Jam-ALT's metrics were not computed"


def alt_eval_scores(references: Sequence[str], hypotheses: Sequence[str], languages: Sequence[str]) -> dict:
    """Jam-ALT's own metrics: ``alt_eval.compute_metrics`` (github.com/audioshake/alt-eval, the scorer of the
    Jam-ALT paper) on the raw texts, line breaks and punctuation kept, as ``{n, <ALT_EVAL_KEYS>}``; a rate with
    nothing to count (NaN there: no parenthesis in any text) is None. Without the package: ``{n, error}``."""
    try:
        from alt_eval import compute_metrics
    except ImportError:
        return {"n": len(references), "error": ALT_EVAL_MISSING}
    codes = [_alt_eval_language(lang) for lang in languages]
    unknown = sorted({str(lang) for lang, code in zip(languages, codes) if code is None})
    if unknown:
        # alt-eval raises LanguageNotFoundError for them after every prediction was made: named here instead
        return {
            "n": len(references),
            "error": f"alt-eval knows no language {', '.join(map(repr, unknown))} (it takes ISO 639 codes or "
            "English names, e.g. 'en', 'Italian'): Jam-ALT's metrics were not computed for these items (the lyrics "
            "summary's wer/cer still scores them)",
        }
    try:
        scores = compute_metrics(list(references), [str(h or "") for h in hypotheses], languages=codes)
    except Exception as e:  # e.g. ZeroDivisionError: references with no word in alt-eval's tokenisation ("½")
        # its metrics are secondary: the report of a finished run is written, naming why they are missing
        return {
            "n": len(references),
            "error": f"alt-eval failed ({type(e).__name__}: {e}): Jam-ALT's metrics "
            "were not computed for these items (the lyrics summary's wer/cer still scores them)",
        }
    out: dict[str, Any] = {"n": len(references)}
    for key in ALT_EVAL_KEYS:
        value = scores.get(key)
        out[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return out


def _alt_eval_language(language: str) -> str | None:
    """The ISO 639-1 code alt-eval tokenises ``language`` as (``"en"``, ``"en-US"``, ``"italian"`` -> ``"it"``),
    or None when its ``iso639`` table has none (alt-eval would raise)."""
    try:
        from iso639 import Language  # alt-eval's own dependency (python-iso639)
    except ImportError:  # an alt-eval reading languages otherwise: its own call decides
        return str(language)
    lang = str(language).strip()
    base = re.split(r"[-_]", lang, maxsplit=1)[0]
    for candidate in dict.fromkeys((lang, lang.lower(), lang.title(), base.lower(), base.title())):
        try:
            code = Language.match(candidate).part1
        except Exception:  # iso639.LanguageNotFoundError (and its older versions' errors)
            continue
        if code:
            return code
    return None


def score_lyrics(
    items: Sequence[EvalItem], preds: Sequence[str], cer_languages: Sequence[str] | str = CER_LANGUAGES
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """WER over the items of word-separated languages, CER over the others (:func:`uses_cer`: ``language`` or
    its first subtag in ``cer_languages``), and per language.

    An item whose reference is empty once normalised (an instrumental line, a reference of punctuation only) has
    no error rate: it is left out of every count and rate (``n``, ``n_wer``, ``n_cer``, the languages' ``n``)
    and counted in ``empty_references``, as ESB / the Open ASR Leaderboard drop such references and jiwer 3
    refuses them (jiwer 4 would count the hypothesis' words as insertions over zero reference words).
    ``cer_language_codes`` lists the languages scored with CER, as the items write them."""
    rows = []
    for it, p in zip(items, preds):
        use_cer = uses_cer(it.meta.get("language", "en"), cer_languages)
        rows.append(
            {
                "id": it.id,
                "metric": "cer" if use_cer else "wer",
                "error": error_rate([it.answer], [p], cer=use_cer),
            }
        )
    scored = [i for i, r in enumerate(rows) if r["error"] is not None]
    by_lang: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_lang[str(it.meta.get("language", "en"))].append(i)
    word_idx = [i for i in scored if rows[i]["metric"] == "wer"]
    char_idx = [i for i in scored if rows[i]["metric"] == "cer"]
    per_language = {}
    for lang, idx in sorted(by_lang.items()):
        use_cer = uses_cer(lang, cer_languages)
        kept = [i for i in idx if rows[i]["error"] is not None]
        per_language[lang] = {
            "n": len(kept),
            "metric": "cer" if use_cer else "wer",
            "error": error_rate([items[i].answer for i in kept], [preds[i] for i in kept], cer=use_cer)
            if kept
            else None,
        }
        if len(kept) < len(idx):
            per_language[lang]["empty_references"] = len(idx) - len(kept)
    summary = {
        "n": len(scored),
        "wer": error_rate([items[i].answer for i in word_idx], [preds[i] for i in word_idx])
        if word_idx
        else None,
        "cer": error_rate([items[i].answer for i in char_idx], [preds[i] for i in char_idx], cer=True)
        if char_idx
        else None,
        "n_wer": len(word_idx),
        "n_cer": len(char_idx),
        "empty_references": len(rows) - len(scored),
        "cer_language_codes": sorted({str(items[i].meta.get("language", "en")) for i in char_idx}),
        "per_language": per_language,
    }
    # Jam-ALT's references keep case, punctuation and line breaks: its own scorer's metrics too, overall and per
    # language (the paper's tables), over the items scored above
    jam_alt = [i for i in scored if items[i].meta.get("scorer") == "alt-eval"]
    if jam_alt:

        def alt(idx: Sequence[int]) -> dict[str, Any]:
            langs = [str(items[i].meta.get("language", "en")) for i in idx]
            return alt_eval_scores([items[i].answer for i in idx], [preds[i] for i in idx], langs)

        summary["alt_eval"] = alt(jam_alt)
        if (
            summary["alt_eval"].get("error") != ALT_EVAL_MISSING
        ):  # one language unknown: the others, per language
            langs = sorted({str(items[i].meta.get("language", "en")) for i in jam_alt})
            summary["alt_eval"]["per_language"] = {
                lang: alt([i for i in jam_alt if str(items[i].meta.get("language", "en")) == lang])
                for lang in langs
            }
    return summary, rows


def score_items(
    items: Sequence[EvalItem], predictions: Mapping[str, str], *, cer_languages: Sequence[str] = CER_LANGUAGES
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Score every item that has a prediction; returns ``({task: summary}, per-item rows)``."""
    by_task: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        if it.id in predictions:
            by_task[it.task].append(it)
    results: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    order = ("mcq", "classification", "caption", "open_qa", "lyrics")
    for task, its in sorted(
        by_task.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)
    ):
        preds = [predictions[it.id] for it in its]
        if task == "mcq":
            summary, task_rows = score_mcq(its, preds)
        elif task == "classification":
            summary, task_rows = score_classification(its, preds)
        elif task in ("caption", "open_qa"):  # open answers are compared with the reference like captions
            summary, task_rows = score_caption(its, preds)
        elif task == "lyrics":
            summary, task_rows = score_lyrics(its, preds, cer_languages)
        else:
            raise ValueError(
                f"item {its[0].id}: unknown task {task!r} (expected mcq/classification/caption/open_qa/lyrics)"
            )
        results[task] = summary
        rows += [{"task": task, **r} for r in task_rows]
    return results, rows
