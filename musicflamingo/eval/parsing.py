"""Answer parsers: map a model's free-text answer to an option, a label, or nothing.

Two multiple-choice rules, both reported (docs/evaluation.md has the table of what each does):

* :func:`mmau_string_match` -- the official MMAU rule (``evaluation.py`` of github.com/Sakshi113/MMAU, reused
  unchanged by MMAR): token sets, no letters. Reimplemented here, same behaviour.
* :func:`parse_choice` -- our letter/option parser: "(B)", "B", "B.", "The answer is B", "It's B", or the option
  text.
  An answer that names two different options is *ambiguous*, one that names none is *unparsed*; both score
  as wrong and are counted. Options with the same text (MMAU repeats some) count as one option.

:func:`muchomusic_choice` reimplements MuChoMusic's own parser (``muchomusic_eval/scoring.py``), reported
beside the two rules for that benchmark.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# The "(A) piano" layout the parsers read is written by chat.format_options (training data and eval prompts).
from musicflamingo.chat import OPTION_LETTERS, format_options, option_letter
from musicflamingo.reasoning import TAGS, parse_think

__all__ = [
    "ChoiceParse",
    "ParseStatus",
    "format_options",
    "mmau_string_match",
    "muchomusic_choice",
    "normalize_text",
    "option_letter",
    "parse_choice",
    "parse_label",
]

ParseStatus = Literal["ok", "ambiguous", "unparsed"]


# --------------------------------------------------------------------------------------------------------------
# Rule 1: MMAU string match
# --------------------------------------------------------------------------------------------------------------
def _mmau_tokens(text: str) -> set[str]:
    # Same regex and lowercasing as MMAU's evaluation.py: word tokens, as a set (order and counts ignored).
    return set(re.findall(r"\b\w+\b", str(text).lower()))


def mmau_string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """MMAU's official rule. True iff

    1. the prediction has at least one word token, and
    2. every word token of ``answer`` occurs in the prediction, and
    3. the prediction has no token that belongs only to wrong choices (tokens shared with the answer are allowed).

    The prediction is used raw (MMAU's script does not strip "(A)" or "answer is"), so a bare letter is wrong
    unless the answer itself is that letter.
    """
    prediction_tokens = _mmau_tokens(prediction)
    answer_tokens = _mmau_tokens(answer)
    if not prediction_tokens:
        return False
    incorrect_tokens: set[str] = set()
    for choice in choices:
        choice_tokens = _mmau_tokens(choice)
        if choice_tokens != answer_tokens:
            incorrect_tokens.update(choice_tokens - answer_tokens)
    return answer_tokens.issubset(prediction_tokens) and prediction_tokens.isdisjoint(incorrect_tokens)


# --------------------------------------------------------------------------------------------------------------
# Rule 2: letter / option parser
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceParse:
    """Result of :func:`parse_choice`: ``index`` is the chosen option (0-based) or None."""

    index: int | None
    status: ParseStatus
    via: str = ""  # which rule fired: "bare", "answer_is", "claim", "letter", "text", "" (none)


def normalize_text(text: str, keep: str = "") -> str:
    """Lowercase, NFKC, every character but letters, digits, combining marks and those in ``keep`` -> space,
    whitespace collapsed. Marks are kept: Thai and Devanagari vowel signs are not alphanumeric, and as spaces they
    split words ("ดนตรี" read as "ดนตร"; "संगीत", music, held the phrase "गीत", song)."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(
        ch if ch.isalnum() or ch in keep or unicodedata.category(ch)[0] == "M" else " " for ch in text
    )
    return " ".join(text.split())


def _contains_phrase(haystack: str, phrase: str) -> bool:
    # Whole-word containment on normalised text ("piano" is not found in "pianola").
    return bool(phrase) and f" {phrase} " in f" {haystack} "


# Every optional run of spaces below is followed by a fixed character, so a long run cannot make the regex
# backtrack cubically ("The answer", 1,000 spaces, then a word took 51 s; "B", 800 spaces, then a word 2 s).
_BARE = re.compile(r"^\s*(?:[\(\[]\s*)?([A-Za-z])\s*(?:[\)\]]\s*)?(?:[.:)]\s*)?$")
# Keywords are case-insensitive; a lower-case letter is read only where it ends the answer or its sentence
# (_LOWER_ENDS: "the answer is a piano" names no letter). "The answer must be B", "So the answer has to be B",
# "Answer - B" state the letter as "is" does.
_ANSWER_IS = re.compile(
    r"\b(?i:(answer)|option|choice)\s*"
    r"(?:(?i:is|was|=|(?:would|must|should|will|has\s+to|can\s+only)\s+be)\s*)?(?:[:\-\u2013\u2014]\s*)?"
    r"(?:(?i:option)\s*)?([\(\[])?(?<![A-Za-z])([A-Za-z])[\)\]]?(?![A-Za-z])"
)
# after a lower-case letter: a full stop, "!", or the end of the answer. Not "a" or "i" at the very end, where
# an answer cut by the token limit may stop mid-sentence ("... the answer is a")
_LOWER_ENDS = re.compile(r"[ \t]*[.!](?:\s|$)|[ \t]*$")
_WORD_NEXT = re.compile(r"\s+\w")
# "B, C or D": the list goes on after a comma-listed letter ("B, C major" is no list)
_LIST_GOES_ON = re.compile(r"\s+(?i:or|and)\s+[\(\[]?[A-Z](?![\w'’])")
# One more letter listed after a stated one: "answer is B or C", "Answer: B, C", "B and (C)", "B/C".
_LISTED = re.compile(
    r"\s*(,\s*(?:or|and)\b|,|or\b|and\b|/|&)\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])", re.IGNORECASE
)
# ... unless that letter is the subject of a verb: "the answer is B, and C is wrong"
_SUBJECT = re.compile(
    r"\s+(?:is|was|are|were|isn't|wasn't|would|could|can|cannot|can't|does|doesn't|did|has|had|seems|sounds|"
    r"might|may|should|will|also)\b",
    re.IGNORECASE,
)
# Markdown emphasis and quotes around a letter ("**B**", "`B`", 'The answer is "B"'): dropped before the letter
# rules read the answer (the option-text rule reads the answer as written).
_EMPHASIS = re.compile(r"[*`\"\u201c\u201d]+|'(?=[A-Z]')|(?<=[A-Z])'")
_PAREN = re.compile(r"[\(\[]([A-Z])[\)\]]")
# "B." / "B)" / "B:" at the start, a first line that is the letter alone ("B\n\nThe guitar is ..."), or
# "B, because ..."
_LEADING = re.compile(
    r"^\s*([A-Z])(?:\s*[.:)](?:\s|$)|[ \t]*\r?\n|[ \t]*[,\-\u2013\u2014][ \t]*(?i:because|since)\b)"
)


# A sentence that states one letter, which MuChoMusic's parser reads as that letter too: "It's B", "I think B.",
# "I'd go with (B)", "Probably B", "I think B is correct", and "B is the correct answer" at a sentence's start.
_APOS = "['\u2019]"  # optional where it follows "I": _EMPHASIS drops a quote after a capital ("I'd" -> "Id")
_CLAIM = re.compile(
    rf"(?<![\w'\u2019])(?i:it{_APOS}?s|it\s+(?:is|was)|it{_APOS}d\s+be"
    r"|it\s+(?:must|should|would|could|might|may|has\s+to)(?:\s+also)?\s+be"
    rf"|i(?:{_APOS}?d|{_APOS}?ll|\s+would|\s+will)?\s+(?:say|go\s+with|choose|pick|select|opt\s+for)"
    r"|i\s+(?:think|believe|guess)|my\s+(?:choice|pick|guess)\s+(?:is|would\s+be)|probably|most\s+likely"
    rf"|(?:i{_APOS}?m\s+|i\s+am\s+)?going\s+with|that{_APOS}?s|th(?:at|is)\s+(?:is|would\s+be)"
    r"|so|hence|thus|therefore|clearly|definitely|certainly)"  # "..., so B.", "Hence B.", "That's B."
    r"\s*(?:(?i:also|probably|likely|definitely|clearly|certainly|surely)\b\s*)?"  # "it's also C", "it is probably B"
    r"(?::\s*)?(?=[\(\[]?[A-Z](?![\w'\u2019]))"
)
_CLAIMED = re.compile(r"([\(\[])?([A-Z])(?(1)[\)\]])")
# what may follow a stated letter: the end, punctuation, a dash, "because ...", or "is correct" / "is the answer"
_CLAIM_END = re.compile(
    r"\s*(?:$|[.,;:!?\)\]]|[-\u2013\u2014](?:\s|$)|(?i:because|since|as|and|or|but|so)\b)"
)
# "B is correct", "B would be the right answer", "B seems correct", "B is the most likely answer", "B fits best"
_IS_CORRECT = re.compile(
    r"\s+(?i:(?:is|would\s+be|must\s+be|seems(?:\s+to\s+be)?)\s+(?:the\s+)?(?:most\s+likely\s+)?"
    r"(?:(?:correct|right|best)(?:\s+(?:answer|option|choice|one))?|answer)|fits\s+best)"
    r"(?=\s*(?:$|[.,;:!?)]|(?i:because|since|as|here|and|or|but|so)\b))"  # "C is right after D" states no answer
)
# "B is correct" counts at the start of a sentence or clause only ("I don't think B is correct" states nothing)
_SENTENCE_LETTER = re.compile(
    r"(?:^|(?<=[.!?;:\n]))[ \t]*(?=[\(\[]?[A-Z][\)\]]?\s+(?i:is|would|must|seems|fits)\b)"
)
# "Based on the audio, B." / "From what I hear: (B)" / "A and C are wrong; B.": a lead-in, a comma, colon or
# semicolon, then one letter that ends the sentence, its line or the answer. Not after a letter ("The notes are
# E, G, B.", "A or B, B": a list) nor a digit ("In bars 1-4, C.")
_FINAL_LETTER = re.compile(
    r"(?<=[^\W\d])(?<!\b[A-Z])[\)\]]?[ \t]*[,:;][ \t]*(?=[\(\[]?[A-Z][\)\]]?[ \t]*(?:[.!](?:\s|$)|\r?\n|$))"
)
# a negation earlier in the clause: "I don't think it's B", "Not because it's B"
_NEGATION = re.compile(r"(?i:\b(?:not|no|never|neither|nor|unlikely|doubt)\b|n['\u2019]t\b)")
# a note or chord name that starts an option's text: "C major", "C#", "Bb", "Am", "F#:7/1", "G7"
_NOTE_NAME = re.compile(
    r"[A-G](?:[#\u266f\u266d:\d]|b(?![a-z])|m(?![a-z])|\s*(?i:sharp|flat|major|minor|maj|min)\b)"
)


def _claims(text: str, choices: Sequence[str], lead_in: bool = False) -> set[int]:
    """The options the answer's letter-stating sentences name (rule 2b of :func:`parse_choice`), each with the
    letters listed after it and, for a letter that is also a note name or another option's whole text, that
    option too (so the caller finds two). `lead_in`: those of the lead-in letters instead ("Based on the audio,
    B.", rule 5)."""
    n, out = len(choices), set()
    finals = (
        {m.end() for m in _FINAL_LETTER.finditer(text)} if lead_in else set()
    )  # the regex checked the end
    if lead_in:
        starts = [(pos, True) for pos in finals]
    else:
        starts = [(m.end(), True) for m in _CLAIM.finditer(text)]
        starts += [(m.end(), False) for m in _SENTENCE_LETTER.finditer(text)]
    clauses = [0] + [b.end() for b in re.finditer(r"[.!?;:,\n]", text)]  # where each clause starts
    for pos, phrase in starts:
        if not (m := _CLAIMED.match(text, pos)):
            continue  # "(B" without its bracket: the letter rule reads it
        letter, rest = m.group(2), text[m.end() : m.end() + _window(choices)]
        clause = clauses[bisect.bisect_right(clauses, pos) - 1]
        if (i := _letter_index(letter, n)) is None or _NEGATION.search(text, clause, pos):
            continue
        listed = _listed_after(text, m.end(), n)  # "It's B or C": a hedge, ambiguous
        ends = pos in finals or _IS_CORRECT.match(text, m.end())
        if not (ends or (phrase and (listed or _CLAIM_END.match(text, m.end())))):
            continue
        if _letters_before_a_verb(text, m.end()):
            continue  # "I think A, B and C are wrong": the letters are a subject
        out |= {i, *listed}
        if m.group(1) or _contains_phrase(normalize_text(rest), normalize_text(choices[i])):
            continue  # "(C)" or "C, D minor": the letter
        if (j := _also_text(letter, i, choices)) is not None:
            out.add(j)  # "It's D" among note names: the letter D, or the note D
        out |= {  # "It's C." among (A) G major (B) C major: the letter C, or the key of C
            j
            for j, c in enumerate(choices)
            if _first_same(j, choices) != _first_same(i, choices)
            and str(c).strip().startswith(letter)
            and _NOTE_NAME.match(str(c).strip())
        }
    return out


def _window(choices: Sequence[str]) -> int:
    """How much of the answer after a letter is read for an option's text (a bound: a long, repetitive answer
    stays linear to parse)."""
    return 4 * max((len(str(c)) for c in choices), default=0) + 16


def _letters_before_a_verb(text: str, pos: int) -> bool:
    """Whether letters listed from ``pos`` on end at a verb: ", B and C are wrong"."""
    end = pos
    while (m := _LISTED.match(text, end)) and m.group(2).isupper():
        end = m.end()
    return end > pos and bool(_SUBJECT.match(text, end))


def _is_a_word(text: str, m: re.Match[str], choices: Sequence[str]) -> bool:
    """Whether the unbracketed capital after "answer is" starts words rather than naming a letter: the pronoun
    "I" ("Answer: I think ...") or an option's own text ("The answer is A minor", "Answer: A male vocalist").
    A lower-case letter is one only bracketed or where it ends its sentence or the answer ("the answer is b."),
    "a" and "i" not at the very end (an article or "i" where the token limit cut the answer)."""
    if m.group(3).islower() and not m.group(2):
        end = _LOWER_ENDS.match(text, m.end())
        return not end or (m.group(3) in "ai" and not end.group().strip())
    if m.group(2) or not _WORD_NEXT.match(text, m.end()):
        return False  # "(A) ...", "A.", "A," or the end: a letter
    if m.group(3) == "I":
        return True
    rest = normalize_text(text[m.start(3) : m.start(3) + _window(choices)]) + " "
    return any(c and rest.startswith(c + " ") for c in map(normalize_text, choices))


def _listed_after(text: str, pos: int, num_options: int) -> list[int]:
    """The options of letters listed right after a stated letter ending at ``pos`` ("B or C", "B, C and D"). A
    capital that starts words is no letter: "B, C major", "B and I think" and "B, and C is wrong" list nothing,
    nor does "B, C and D are wrong" (the letters after the comma are a subject)."""
    out: list[int] = []
    run = None  # where the letters after the last comma begin in ``out``
    while (m := _LISTED.match(text, pos)) and m.group(2).isupper():
        if m.group(1).startswith(","):
            run = len(out)
        if (m.group(1) == "," and not _LIST_GOES_ON.match(text, m.end())) or m.group(2) == "I":
            if _WORD_NEXT.match(text, m.end()):
                break
        if _SUBJECT.match(text, m.end()):
            if run is not None:
                del out[run:]
            break
        if (i := _letter_index(m.group(2), num_options)) is None:
            break
        out.append(i)
        pos = m.end()
    return out


def _letter_index(letter: str, num_options: int) -> int | None:
    idx = OPTION_LETTERS.index(letter.upper())
    return idx if idx < num_options else None


def _also_text(letter: str, i: int, choices: Sequence[str], rest: str = "") -> int | None:
    """The option whose whole text is ``letter`` when that is another option than letter ``i`` names: note and
    chord names ("D" among (A) G (B) A# (C) D (D) E, MMAU's harmony questions) or a one-letter word ("a"). An
    unbracketed "D" then names two options ("(D)" is a letter), unless ``rest`` (the answer after the letter)
    goes on with option ``i``'s text ("Answer: C. E")."""
    same = next((j for j, c in enumerate(choices) if str(c).strip().lower() == letter.lower()), None)
    if same is None or _first_same(same, choices) == _first_same(i, choices):
        return None
    return None if _contains_phrase(normalize_text(rest), normalize_text(choices[i])) else same


def _first_same(i: int, choices: Sequence[str]) -> int:
    """The first option whose text is option ``i``'s text (a repeated option names one answer)."""
    text = str(choices[i]).strip()
    return next(j for j, c in enumerate(choices) if str(c).strip() == text)


def _text_matches(prediction: str, choices: Sequence[str]) -> set[int]:
    """Options whose normalised text occurs in the prediction, keeping only maximal ones: an option whose text
    is inside another matched option's text ("piano" inside "grand piano") is dropped. Repeated options
    count once (as their first occurrence)."""
    pred = normalize_text(prediction)
    found = {i: c for i, c in enumerate(map(normalize_text, choices)) if _contains_phrase(pred, c)}
    return {_first_same(i, choices) for i in _maximal(found)}


def _maximal(found: Mapping[int, str]) -> set[int]:
    """The keys of ``found`` (option or label -> the normalised text matched) whose text is inside no other
    matched text ("piano" inside "grand piano" is dropped; equal texts keep each other)."""
    return {
        i
        for i, text in found.items()
        if not any(j != i and other != text and _contains_phrase(other, text) for j, other in found.items())
    }


def _one_found(hits: set[int], via: str) -> ChoiceParse:
    """One option found -> it; several -> ambiguous; none -> unparsed."""
    if len(hits) == 1:
        return ChoiceParse(next(iter(hits)), "ok", via)
    return ChoiceParse(None, "ambiguous", via) if hits else ChoiceParse(None, "unparsed")


def _answer_part(prediction: str | None) -> str:
    """The answer a prediction gives: its ``<answer>`` text or what follows ``</think>`` where it has think tags
    (a checkpoint that thinks unasked; :func:`~musicflamingo.reasoning.parse_think`, which ``think=true`` runs
    score), else the whole text. Reasoning that weighs options ("not piano") named them as answers."""
    text = str(prediction or "")
    return parse_think(text).answer if TAGS.any_tag.search(text) else text


def parse_choice(prediction: str, choices: Sequence[str]) -> ChoiceParse:
    """Map a free-text answer to one of ``choices`` (presented as "(A) ...", "(B) ...").

    Tried in order, the first rule that finds something decides:

    1. ``bare``: the whole answer is one letter, optionally bracketed or followed by "." / ":" / ")":
       "B", "(b)", "B." (lower case accepted here, and in rule 2 where the letter ends its sentence).
    2. ``answer_is``: "answer is B", "Answer: (B)", "the correct option is C", "the answer must be B", "Answer -
       B"; lower case where the letter ends its sentence ("the answer is b.") -- the *last* "answer ..." phrase
       wins (models restate the options before concluding), else the last "option/choice ..." phrase ("the answer
       is B, not option C" -> B). Letters listed after it ("the answer is B or C", "Answer: B, C") name no
       one option: ambiguous.
       ``claim``: a sentence stating one letter: "It's B", "I think B.", "I'd go with (B)", "Probably B", "So
       B.", "That's B.", or "B is correct" / "B is the answer" / "B would be correct" / "B fits best" at the start
       of a sentence ("A is wrong; B is correct"). The letter must end there (punctuation, the end, "because",
       "is correct"): "It's A cappella", "I think A male ..." state no letter. A negation earlier in the clause
       ("I don't think it's B") states nothing; two sentences naming different letters, or letters listed after
       one ("It's B or C"), are ambiguous, as is a letter that is also a note name starting another option
       ("It's C." among (A) G major (B) C major).
    3. ``letter``: upper-case letters in brackets "(B)" anywhere, or a leading "B." / "B)" / "B:" / "B,
       because", or a first line that is the letter alone ("B\n\nThe guitar ..."). One distinct letter -> that
       option; two or more -> ambiguous (unless they are options with the same text).
    4. ``text``: option texts found in the answer (lowercased, punctuation-insensitive, whole words, maximal
       matches only). One -> that option; two or more -> ambiguous, unless exactly one of them is written in
       the answer as such (options that differ only in punctuation: "F#:7/1", "F:7/1"). A text listed under
       several letters names its first one.
    5. ``claim`` (lead-in): a lead-in, a comma, colon or semicolon and a letter ending the sentence or line
       ("Based on the audio, B.", "A and C are wrong; B."; not after a letter or digit: "The notes are E, G,
       B."), where rules 1-4 find nothing or rule 4 finds only that letter's option (a description reads the
       same: "Key: D. The genre is jazz." is jazz).

    An answer with think tags is read for its answer only (:func:`_answer_part`). Rules 1-3 read the answer
    NFKC-normalised (full-width "（B）" is "(B)") and without markdown emphasis and
    quotes ("**B**", "The answer is \"B\"").
    A capital after "answer is" that starts words is no letter: "I" ("Answer: I think ...") or an option's own
    text ("The answer is A minor", "Answer: A male vocalist"); rule 4 reads those. An unbracketed letter that is
    also another option's whole text (chord and note names: "D" among (A) G (B) A# (C) D (D) E) names two
    options: ambiguous in rules 1-3, unless its own option's text follows it ("Answer: C. E"); "(D)" is a letter.

    Letters beyond the number of options are ignored. Empty or unmatched answers are ``unparsed``.
    """
    n = len(choices)
    text = _answer_part(prediction).strip()
    if not text:
        return ChoiceParse(None, "unparsed")

    # NFKC as the text rule reads it: full-width "（B）" / "Ｂ" are "(B)" / "B"
    plain = _EMPHASIS.sub("", unicodedata.normalize("NFKC", text))
    m = _BARE.match(plain)
    if m and (idx := _letter_index(m.group(1), n)) is not None:
        if not re.search(r"[\(\)\[\]]", plain) and _also_text(m.group(1), idx, choices) is not None:
            return ChoiceParse(None, "ambiguous", "bare")  # "D": letter D, or the option whose text is "D"
        return ChoiceParse(idx, "ok", "bare")

    stated = [
        (bool(x.group(1)), {i, *_listed_after(plain, x.end(), n)}, x)
        for x in _ANSWER_IS.finditer(plain)
        if (i := _letter_index(x.group(3), n)) is not None and not _is_a_word(plain, x, choices)
    ]
    if stated:
        said = [(i, x) for is_answer, i, x in stated if is_answer] or [(i, x) for _, i, x in stated]
        last, x = said[-1]
        i = _letter_index(x.group(3), n)
        if not x.group(2) and (j := _also_text(x.group(3), i, choices, plain[x.end() :])) is not None:
            last = {*last, j}  # "The answer is C" among chord names: the letter C, or the chord C
        named = {_first_same(i, choices) for i in last}
        if len(named) > 1:  # "the answer is B or C": no one option (MuChoMusic's and MMAU's scorers agree)
            return ChoiceParse(None, "ambiguous", "answer_is")
        return ChoiceParse(min(last), "ok", "answer_is")

    if claimed := _claims(plain, choices):
        if len({_first_same(i, choices) for i in claimed}) > 1:
            return ChoiceParse(None, "ambiguous", "claim")
        return ChoiceParse(min(claimed), "ok", "claim")

    letters = {i for x in _PAREN.finditer(plain) if (i := _letter_index(x.group(1), n)) is not None}
    if (m := _LEADING.match(plain)) and (i := _letter_index(m.group(1), n)) is not None:
        letters.add(i)
        if (j := _also_text(m.group(1), i, choices, plain[m.end() :])) is not None:
            letters.add(j)  # "C.\n..." among chord names: the letter C, or the chord C
    if len(letters) > 1 and len({_first_same(i, choices) for i in letters}) == 1:
        letters = {min(letters)}  # "(A) 1.63 seconds ... (D) 1.63 seconds": one answer under two letters
    if len(letters) == 1:
        return ChoiceParse(letters.pop(), "ok", "letter")
    if len(letters) > 1:
        return ChoiceParse(None, "ambiguous", "letter")

    hits = _text_matches(text, choices)
    if len(hits) > 1:  # texts that differ only in punctuation ("F#:7/1", "F:7/1"): the one written as such
        written = {i for i in hits if str(choices[i]).strip().lower() in text.lower()}
        hits = written if len(written) == 1 else hits
    # last, as a lead-in letter is as often a description ("Key: D.", "It resolves to the tonic, C."): read
    # before a stated claim or an option's text, it made "Key: D. I think it's B." ambiguous and "Key: D. The
    # genre is jazz." option D; read where the texts name nothing, or only that letter's own option
    if (lead := _claims(plain, choices, lead_in=True)) and hits <= lead:
        if len({_first_same(i, choices) for i in lead}) > 1:
            return ChoiceParse(None, "ambiguous", "claim")
        return ChoiceParse(min(lead), "ok", "claim")
    return _one_found(hits, "text")


def parse_label(
    prediction: str, labels: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None
) -> ChoiceParse:
    """Open-question classification: find which label (or one of its aliases) the answer names.

    ``labels`` are the display names; ``aliases`` maps a display name to extra spellings ("hip hop" ->
    ["hiphop", "rap"]). Same whole-word, maximal-match, one-or-ambiguous logic as rule 4 of
    :func:`parse_choice`; no letters.
    """
    text = _answer_part(prediction).strip()
    if not text:
        return ChoiceParse(None, "unparsed")
    aliases = aliases or {}
    spellings = [[lab, *aliases.get(lab, ())] for lab in labels]
    pred = normalize_text(text)
    found: dict[int, str] = {}
    for i, names in enumerate(spellings):
        for name in sorted((normalize_text(s) for s in names), key=len, reverse=True):
            if _contains_phrase(pred, name):
                found[i] = name
                break
    return _one_found(_maximal(found), "text")


# --------------------------------------------------------------------------------------------------------------
# MuChoMusic's own parser
# --------------------------------------------------------------------------------------------------------------
def muchomusic_choice(
    prediction: str, choices: Sequence[str], prefix: str = "The correct answer is:"
) -> int | None:
    """MuChoMusic's ``extract_responses`` (github.com/mulab-mir/muchomusic, ``muchomusic_eval/scoring.py``),
    same behaviour: the text after the last ``prefix`` is searched for the capital *characters* A-D; exactly
    one distinct one picks that option (so "A Guitar" is A). Otherwise the first option whose lowercased,
    stripped text is a substring of the lowercased output wins. None when neither finds one."""
    output = str(prediction or "").split(prefix)[-1].strip()
    letters = [c for c in OPTION_LETTERS[: min(4, len(choices))] if c in output]
    if len(letters) == 1:
        return OPTION_LETTERS.index(letters[0])
    lowered = output.lower().strip()
    for i, choice in enumerate(choices):
        if str(choice).lower().strip() in lowered:
            return i
    return None
