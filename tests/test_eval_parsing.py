"""The two multiple-choice rules on hand-written answers (the table in docs/evaluation.md)."""

from __future__ import annotations

import pytest

from musicflamingo.eval.parsing import (
    ChoiceParse,
    format_options,
    mmau_string_match,
    muchomusic_choice,
    parse_choice,
    parse_label,
)

CHOICES = ["Piano", "Acoustic guitar", "Violin", "Drums"]
ANSWER = "Acoustic guitar"  # option (B)

# answer text -> (letter-parser status, letter-parser correct, MMAU-rule correct)
CASES = {
    "B": ("ok", True, False),  # bare letter: MMAU has no letters
    "(B)": ("ok", True, False),
    "b.": ("ok", True, False),
    "The answer is B": ("ok", True, False),
    "The answer is (C)": ("ok", False, False),  # a clear answer, the wrong one
    "Acoustic guitar": ("ok", True, True),  # exact option text
    "acoustic guitar.": ("ok", True, True),
    "(B) Acoustic guitar": ("ok", True, True),
    "It is an acoustic guitar playing arpeggios.": ("ok", True, True),
    "Acoustic guitar or violin": ("ambiguous", False, False),  # names two options
    "(A) or (B)": ("ambiguous", False, False),
    "": ("unparsed", False, False),  # empty answer
    "I am not sure.": ("unparsed", False, False),
    "guitar": ("unparsed", False, False),  # part of an option's text is not the option
    "(E)": ("unparsed", False, False),  # no option E
    "**B**": ("ok", True, False),  # markdown emphasis around the letter
    "The answer is **B**.": ("ok", True, False),
    'The answer is "B"': ("ok", True, False),
    "The answer is 'B'.": ("ok", True, False),
    "`(B)`": ("ok", True, False),
    "**Acoustic guitar**": ("ok", True, True),
}


@pytest.mark.parametrize("text", list(CASES))
def test_mcq_rules_on_hand_written_answers(text):
    status, letter_ok, mmau_ok = CASES[text]
    parsed = parse_choice(text, CHOICES)
    assert parsed.status == status
    assert (parsed.index == 1) is letter_ok
    assert mmau_string_match(ANSWER, text, CHOICES) is mmau_ok


def test_answer_is_letter_beats_restated_options():
    # The model restates all options, then concludes: the concluding letter counts.
    text = "Options: (A) Piano (B) Acoustic guitar (C) Violin. The answer is (C)."
    assert parse_choice(text, CHOICES).index == 2
    assert parse_choice("Answer: D", CHOICES).index == 3
    assert parse_choice("The answer is B, not option C.", CHOICES).index == 1
    assert parse_choice("Option A is wrong; the correct choice is D", CHOICES).index == 3
    assert parse_choice("Answer: Acoustic guitar", CHOICES).index == 1  # "A" of "Acoustic" is no letter


def test_maximal_text_match():
    choices = ["Piano", "Grand piano", "Organ"]
    assert (
        parse_choice("a grand piano", choices).index == 1
    )  # "piano" inside "grand piano" is not a second hit
    assert parse_choice("piano", choices).index == 0


def test_mmau_rule_shared_words():
    # MMAU's own example shape: tokens shared with the answer ("a") are allowed, answer tokens must all appear.
    choices = ["A child", "A woman", "An adult man", "A teenager"]
    assert mmau_string_match("A child", "a child", choices)
    assert mmau_string_match("A child", "It sounds like a child.", choices)
    assert not mmau_string_match("A child", "child", choices)  # "a" missing
    assert not mmau_string_match("A child", "a child or a woman", choices)


def test_parse_label_with_aliases():
    labels = ["blues", "hip-hop", "pop", "rock"]
    aliases = {"hip-hop": ["hip hop", "rap"]}
    assert parse_label("This is a rap track.", labels, aliases).index == 1
    assert parse_label("Hip-Hop", labels, aliases).index == 1
    assert parse_label("pop rock", labels, aliases).status == "ambiguous"
    assert parse_label("", labels, aliases).status == "unparsed"
    assert parse_label("jazz", labels, aliases).status == "unparsed"


def test_format_options():
    assert format_options(["x", "y"]) == "(A) x\n(B) y"


# MMAU e277d88f lists its answer "1.63 seconds" as both (A) and (D); 7a0376a4's chords differ only in "#".
REPEATED = ["1.63 seconds", "2.74 seconds", "1.53 seconds", "1.63 seconds"]
CHORDS = ["F#:7/1", "B:maj/1", "E:maj/1", "D#:7/1"]


@pytest.mark.parametrize(
    "answer, index, status",
    [
        ("(D) 1.63 seconds", 3, "ok"),  # the letter the model wrote
        ("1.63 seconds", 0, "ok"),  # the text names one answer, not two options
        ("(A) or (D)", 0, "ok"),  # two letters with the same text
        ("(A) or (B)", None, "ambiguous"),
        ("1.63 seconds or 2.74 seconds", None, "ambiguous"),
    ],
)
def test_repeated_option_text_is_one_answer(answer, index, status):
    parsed = parse_choice(answer, REPEATED)
    assert (parsed.index, parsed.status) == (index, status)


def test_options_equal_after_normalisation_stay_distinct():
    # "F#:7/1" and "F:7/1"-like texts normalise alike, but only identical texts are merged.
    assert parse_choice("(D) D#:7/1", CHORDS).index == 3
    assert parse_choice("F#:7/1 or D#:7/1", CHORDS).status == "ambiguous"


def test_an_option_written_as_such_wins_over_its_punctuation_twin():
    # "F#:7/1" and "F:7/1" both normalise to "f 7 1": the one written verbatim is the answer
    twins = ["F#:7/1", "F:7/1", "G:maj", "A:min"]
    assert parse_choice("F#:7/1", twins) == ChoiceParse(0, "ok", "text")
    assert parse_choice("The chord is F:7/1.", twins) == ChoiceParse(1, "ok", "text")
    assert parse_choice("F#:7/1 or F:7/1", twins).status == "ambiguous"


KEYS = ["C major", "A minor", "G major", "D minor"]


@pytest.mark.parametrize(
    "answer, choices, index, via",
    [
        ("The answer is A minor.", KEYS, 1, "text"),  # a key name, not the letter A (C major)
        ("The answer is C major", ["A minor", "C major", "G major", "E minor"], 1, "text"),  # not letter C
        ("Answer: A male vocalist", ["Piano", "A male vocalist", "Drums", "Violin"], 1, "text"),  # an article
        ("Answer: I think it is the violin.", CHOICES + [f"x{i}" for i in range(6)], 2, "text"),  # "I" of 10
        ("The answer is B because the strings are plucked.", CHOICES, 1, "answer_is"),  # still a letter
        ("The answer is A, piano.", CHOICES, 0, "answer_is"),
        ("The answer is (A) minor", KEYS, 0, "answer_is"),  # bracketed: always the letter
    ],
)
def test_a_capital_that_starts_words_is_no_letter(answer, choices, index, via):
    assert parse_choice(answer, choices) == ChoiceParse(index, "ok", via)


@pytest.mark.parametrize(
    "output, index",
    [
        ("A", 0),
        ("A Guitar", 0),  # MuChoMusic counts capital characters: "A Guitar" is option A
        ("The correct answer is: (C) Violin", 2),
        ("Acoustic guitar", 0),  # the capital "A" of "Acoustic" reads as the letter A
        ("acoustic guitar", 1),  # no capital A-D: the first option contained in the output
        ("B or C", None),  # two letters, and no option text: nothing
        ("drums", 3),
    ],
)
def test_muchomusic_parser(output, index):
    assert muchomusic_choice(output, CHOICES) == index
