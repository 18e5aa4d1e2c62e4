"""Verifiable rewards for GRPO: the paper's three (format, QA accuracy, caption facts) and the caption-fact scorer.

A reward is any object with a float ``weight`` and ``__call__(output, target) -> float | None``: ``output`` is the
parsed completion (:class:`musicflamingo.reasoning.ThinkOutput`; a run without think mode gives every completion
status ``plain``, all answer), ``target`` what the record says is right (:class:`Target`), and ``None`` means the
reward does not apply to that sample. The GRPO module (`musicflamingo.grpo`) builds them from ``model.rewards`` in
the config, one ``_target_`` per entry, adds ``weight * value`` over the rewards that apply and logs each one's
mean. As in the paper (arXiv 2511.10289, section 3.3), QA samples get format + accuracy and caption samples
format + caption facts::

    rewards:
      format: {_target_: musicflamingo.rewards.FormatReward, weight: 1.0}
      accuracy: {_target_: musicflamingo.rewards.AccuracyReward, weight: 1.0}
      caption_facts: {_target_: musicflamingo.rewards.CaptionFactsReward, weight: 1.0}
      mine: {_target_: my_package.MyReward, weight: 0.5}   # anything importable with weight and __call__

Caption facts (:func:`caption_fact_hits`) are the metadata categories a caption should state (key, tempo,
metre, instrument family...), each matched as a whole phrase after :func:`normalize_answer`. A record states
them in a ``facts`` field (``{"genre": "jazz", "bpm": ["120 BPM", "120 bpm"]}``: a value or a list of accepted
spellings); records of the synthetic corpus (``meta`` with key, tempo, metre, instrument family) get them from
:func:`synthetic_facts`, in the corpus' own vocabulary, where naming a wrong value of a category (another key,
another tempo bucket) voids that category: a caption listing every key scores nothing for the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from musicflamingo.chat import option_letter
from musicflamingo.data.synthetic.theory import (
    INSTRUMENT_FAMILIES,
    MODES,
    TEMPO_BUCKETS,
    TIME_SIGNATURES,
    Key,
)
from musicflamingo.eval.parsing import normalize_text, parse_choice
from musicflamingo.reasoning import ThinkOutput, parse_think

# Record tasks whose answer is a description scored by facts; every other task is a question with one answer.
CAPTION_TASKS = ("caption",)
_KEEP = "#/"  # kept by normalize_answer: "C# minor" is not "C minor", "3/4" is not "34"


def normalize_answer(text: str) -> str:
    """eval's :func:`~musicflamingo.eval.parsing.normalize_text` (NFKC, lower case, letters, digits and combining
    marks kept) keeping ``#`` and ``/`` too, with sharps and flats spelled ``#``/``b``. ``"(B) C# minor."`` ->
    ``"b c# minor"``."""
    return normalize_text(str(text).replace("♯", "#").replace("♭", "b"), keep=_KEEP)


def _contains(haystack: str, phrase: str) -> bool:
    """Whole-phrase containment of normalised texts (" 60 bpm " is not in " 160 bpm ")."""
    return bool(phrase) and f" {phrase} " in f" {haystack} "


# ---------------------------------------------------------------------------------------------- caption facts
@dataclass(frozen=True)
class Fact:
    """One metadata category a caption should state: any of ``spellings`` names it (the first is the value);
    naming one of ``others`` (the category's wrong values) voids it."""

    category: str
    spellings: tuple[str, ...]
    others: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.spellings or not all(isinstance(s, str) and normalize_answer(s) for s in self.spellings):
            raise ValueError(
                f"fact {self.category!r}: needs at least one non-empty spelling, got {self.spellings!r}"
            )


KEY_NAMES = tuple(Key(pc, mode).name for mode in MODES for pc in range(12))


def synthetic_facts(meta: Mapping[str, Any]) -> tuple[Fact, ...]:
    """The four facts of a synthetic-corpus clip, as its captions spell them (``text.caption``): key ("Eb
    major"), tempo ("120 BPM"), metre ("3/4"), instrument family ("strings"); the other values of each table
    are the wrong ones."""
    key = Key.parse(str(meta["key"])).name
    bpm = int(meta["tempo_bpm"])
    metre = str(meta["time_signature"])
    family = str(meta["instrument_family"]).lower()
    families = [f.lower() for f in INSTRUMENT_FAMILIES]
    return (
        Fact("key", (key,), tuple(k for k in KEY_NAMES if k != key)),
        Fact("tempo", (f"{bpm} BPM",), tuple(f"{b} BPM" for b in TEMPO_BUCKETS if b != bpm)),
        Fact("time_signature", (metre,), tuple(t for t in TIME_SIGNATURES if t != metre)),
        Fact("instrument_family", (family,), tuple(f for f in families if f != family)),
    )


SYNTHETIC_FACT_FIELDS = ("key", "tempo_bpm", "time_signature", "instrument_family")


def record_facts(extra: Mapping[str, Any], where: str = "record") -> tuple[Fact, ...]:
    """A record's caption facts: its ``facts`` field, else :func:`synthetic_facts` of its ``meta`` when that holds
    the corpus' fields, else none. ``where`` names the record in errors."""
    facts = extra.get("facts")
    if facts is not None:
        if not isinstance(facts, Mapping) or not facts:
            raise ValueError(
                f"{where}: 'facts' must be a non-empty object {{category: value or [spellings]}}"
            )
        out = []
        for category, value in facts.items():
            spellings = [value] if isinstance(value, (str, int, float)) else value
            # a bool is no spelling: {"instrumental": true} asked every caption for the word "True" (always 0)
            if (
                not isinstance(spellings, Sequence)
                or isinstance(spellings, str)
                or any(isinstance(s, bool) for s in spellings)
            ):
                raise ValueError(
                    f"{where}: facts.{category} must be a string or a list of strings (the words a caption "
                    f"states it with), got {value!r}"
                )
            try:
                out.append(Fact(str(category), tuple(str(s) for s in spellings)))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        return tuple(out)
    meta = extra.get("meta")
    if isinstance(meta, Mapping) and all(k in meta for k in SYNTHETIC_FACT_FIELDS):
        try:
            return synthetic_facts(meta)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: meta does not describe a synthetic clip: {e}") from None
    return ()


def caption_fact_hits(caption: str, facts: Sequence[Fact]) -> dict[str, bool]:
    """``{category: stated}``: a spelling occurs as a whole phrase and none of the category's wrong values does."""
    text = normalize_answer(caption)
    return {
        f.category: any(_contains(text, normalize_answer(s)) for s in f.spellings)
        and not any(_contains(text, normalize_answer(o)) for o in f.others)
        for f in facts
    }


def caption_fact_score(caption: str, facts: Sequence[Fact]) -> float:
    """Share of ``facts`` the caption states (:func:`caption_fact_hits`), 0..1; ValueError without facts."""
    if not facts:
        raise ValueError("caption_fact_score needs at least one fact")
    hits = caption_fact_hits(caption, facts)
    return sum(hits.values()) / len(hits)


# ---------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """What a record says is right. ``kind``: ``"qa"`` (one answer; with ``choices``, multiple choice and
    ``correct`` the right option's index) or ``"caption"`` (scored by ``facts``); ``task``: the record's own
    ``task`` field (or ``kind``)."""

    kind: str
    task: str
    answer: str
    choices: tuple[str, ...] = ()
    facts: tuple[Fact, ...] = ()
    correct: int | None = None

    @classmethod
    def from_record(cls, extra: Mapping[str, Any], reference: str, where: str = "record") -> Target:
        """From a manifest record's extra fields (``task``, ``answer``, ``choices``, ``facts``/``meta``) and its
        last assistant turn ``reference`` (in the MF-Think layout, its answer part). A field that would make the
        rewards silently 0 (an empty or non-text answer, one that is none of the choices) is a ValueError naming
        ``where`` and the field."""
        ref = parse_think(reference)
        reference = ref.answer if ref.well_formed else reference.strip()
        task, kind = record_task(extra)
        answer = extra.get("answer")
        if answer is None and ref.status == "broken":  # its tags would become part of the answer to match
            raise ValueError(
                f"{where}: the last assistant turn has think tags but is not <think>...</think><answer>..."
                "</answer> (a tag unclosed or out of place): mend it, or give the record an 'answer'"
            )
        if answer is None:
            answer, field = reference, "the last assistant turn"
        elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: 'answer' must be a string or a number, got {answer!r:.80}")
        else:
            answer, field = str(answer), "'answer'"
        choices = extra.get("choices") or ()
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r:.80}")
        if kind == "qa" and _lettered(choices):
            # eval's option parser reads a completion's text against each choice's whole text: with the labels
            # in them, a right answer given as the option's text ("120 BPM") scored 0 (only letters counted)
            raise ValueError(
                f"{where}: 'choices' carry their option letters ({choices[0]!r:.40}, {choices[1]!r:.40}, ...): "
                "give the option texts alone, as eval.py's benchmarks do (the prompt shows the letters)"
            )
        correct = None
        if kind == "qa":
            if not normalize_answer(answer):
                raise ValueError(
                    f"{where}: {field} is empty: the accuracy reward has no answer to compare with"
                )
            if choices:
                correct = _choice_index(answer, choices)
                if correct is None:
                    raise ValueError(
                        f"{where}: {field} {answer!r:.80} is none of 'choices' {list(choices)!r:.120} (as the "
                        "option's text or its letter)"
                    )
        return cls(
            kind=kind,
            task=task,
            answer=answer,
            choices=tuple(choices),
            facts=record_facts(extra, where) if kind == "caption" else (),
            correct=correct,
        )


def record_task(extra: Mapping[str, Any]) -> tuple[str, str]:
    """A record's ``(task, kind)`` from its extra fields, as :class:`Target` reads them (``task``: its own field,
    else the kind; ``kind``: ``"caption"`` or ``"qa"``), without checking its reward fields."""
    task = str(extra.get("task") or "")
    kind = "caption" if task in CAPTION_TASKS else "qa"
    return task or kind, kind


def _lettered(choices: Sequence[str]) -> bool:
    """Whether every choice starts with its own option label: "(A) 60 BPM", "B. 120 BPM", "C) ...", "D: ..."."""
    return len(choices) >= 2 and all(
        re.match(rf"\s*(\({option_letter(i)}\)|{option_letter(i)}[.):])\s", c)
        for i, c in enumerate(choices)
        if i < 26
    )


def _choice_index(answer: str, choices: Sequence[str]) -> int | None:
    """The option a reference answer names: its text (case and punctuation aside) first, so choices that are
    letters keep their meaning, else eval's option parser (a letter "B", "(B) 120 BPM")."""
    norm = normalize_answer(answer)  # keeps "#": "C# minor" is not "C minor"
    exact = [i for i, c in enumerate(choices) if normalize_answer(c) == norm]
    if exact:
        return exact[0]
    parsed = parse_choice(answer, choices)
    return parsed.index if parsed.status == "ok" else None


def answer_matches(answer: str, target: Target) -> bool:
    """Multiple choice: eval's option parser (`eval.parsing.parse_choice`: the letter "B", "(B)", "The answer is
    B", the option's text in any case) names the right option (or one with the same text). Otherwise: normalised
    exact match (:func:`normalize_answer`) with the reference answer."""
    if target.correct is not None:
        got = parse_choice(answer, target.choices).index
        return got is not None and target.choices[got].strip() == target.choices[target.correct].strip()
    got = normalize_answer(answer)
    return bool(got) and got == normalize_answer(target.answer)


# ---------------------------------------------------------------------------------------------- rewards
def _check_weight(weight: float, reward: str) -> float:
    """A finite number (a NaN weight made every reward, so every loss, NaN; the message names the class: Hydra's
    error for `model.rewards.<name>` shows only this line)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(
            f"{reward} weight (model.rewards.<name>.weight) must be a finite number, got {weight!r}"
        )
    return float(weight)


class FormatReward:
    """1 when the completion is exactly ``<think>...</think><answer>...</answer>`` with a non-empty answer, else 0;
    every sample."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = _check_weight(weight, type(self).__name__)

    def __call__(self, output: ThinkOutput, target: Target) -> float | None:
        return 1.0 if output.well_formed and output.answer else 0.0  # an empty answer answers nothing


class AccuracyReward:
    """QA samples: 1 when the answer (the ``<answer>`` text in think mode) matches (:func:`answer_matches`)."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = _check_weight(weight, type(self).__name__)

    def __call__(self, output: ThinkOutput, target: Target) -> float | None:
        if target.kind != "qa":
            return None
        return 1.0 if answer_matches(output.answer, target) else 0.0


class CaptionFactsReward:
    """Caption samples with facts: the share of facts the caption states (:func:`caption_fact_score`).

    ``source``: ``"answer"`` scores the ``<answer>`` text (the caption), ``"all"`` the whole completion.
    """

    def __init__(self, weight: float = 1.0, source: str = "answer") -> None:
        if source not in ("answer", "all"):
            raise ValueError(f"CaptionFactsReward source must be 'answer' or 'all', got {source!r}")
        self.weight = _check_weight(weight, type(self).__name__)
        self.source = source

    def __call__(self, output: ThinkOutput, target: Target) -> float | None:
        if target.kind != "caption" or not target.facts:
            return None
        return caption_fact_score(output.answer if self.source == "answer" else output.text, target.facts)
