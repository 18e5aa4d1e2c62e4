"""Review round 19 of the benchmark journey: a letter after a lead-in ("Based on the audio, B.") is that letter
(MuChoMusic's own parser read it, ours left it unparsed), beside the look-alikes that must stay unparsed or
ambiguous."""

from __future__ import annotations

import pytest

from musicflamingo.eval.parsing import ChoiceParse, muchomusic_choice, parse_choice

CHOICES = ["Piano", "Acoustic guitar", "Drums", "Violin"]
KEYS = ["G major", "C major", "D minor", "E minor"]
NOTES = ["G", "A#", "D", "E"]  # MMAU's harmony questions: option texts that are letters


# ---- a lead-in, then the letter --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer",
    [
        "Based on the audio, B.",
        "Based on the audio, B",
        "Based on the audio, **B**.",
        "From what I hear: (B)",
        "After listening to the clip, B.",
        "Based on the audio, B. The strings are plucked.",  # the letter ends its sentence
        "Based on the audio, B\nThe strings are plucked.",  # ... or its line
        "Having heard the plucked strings, B!",
    ],
)
def test_a_letter_after_a_lead_in_is_that_letter(answer):
    assert parse_choice(answer, CHOICES) == ChoiceParse(1, "ok", "claim")


def test_a_lead_in_letter_scores_as_muchomusic_scores_it():
    # MuChoMusic's parser takes the one capital A-D of "Based ... B." (the letter) and nothing when the lead-in has
    # another ("After ..., B."); MMAU's string match has no letters
    assert muchomusic_choice("Based on the audio, B.", CHOICES) == 1
    assert parse_choice("Based on the audio, B.", CHOICES).index == 1


@pytest.mark.parametrize(
    ("answer", "choices", "index", "status"),
    [
        ("The notes are E, G, B.", CHOICES, None, "unparsed"),  # a list of note names
        ("The notes are G, E, D.", CHOICES, None, "unparsed"),
        ("It moves from A to B, C.", CHOICES, None, "unparsed"),  # the lead-in ends in a letter
        ("In bars 1-4, C.", CHOICES, None, "unparsed"),  # ... or a number
        ("Based on the audio, B. Actually, C.", CHOICES, None, "ambiguous"),  # two letters stated
        ("Based on the audio, C.", KEYS, None, "ambiguous"),  # the letter C (D minor), or the key of C
        ("Based on the audio, D.", NOTES, None, "ambiguous"),  # the letter D (E), or the option "D"
        ("Based on the audio, (C).", KEYS, 2, "ok"),  # bracketed: the letter
        ("Based on the audio, A cappella.", CHOICES, None, "unparsed"),  # a capital that starts words
        ("Based on the audio, E.", CHOICES, None, "unparsed"),  # no option E
        ("Based on the audio, B.C. Jones plays it", CHOICES, None, "unparsed"),  # an initial, no letter
    ],
)
def test_look_alikes_of_a_lead_in_letter(answer, choices, index, status):
    parsed = parse_choice(answer, choices)
    assert (parsed.index, parsed.status) == (index, status)
