"""Review round 20 of the benchmark journey: the option parser on the phrasings chat models give a multiple-choice
answer in ("So the answer must be B." was unparsed), beside answers that must name no letter; an answer with
think tags is read for its answer only."""

from __future__ import annotations

import pytest

from musicflamingo.eval.parsing import ChoiceParse, parse_choice, parse_label

CHOICES = ["Piano", "Acoustic guitar", "Drums", "Violin"]  # the answer is (B)

# How chat models state option B (collected from chat-model answers to "(A) ... (D) ..." prompts)
NAMES_B = [
    # "answer ..." with another verb than "is", or a dash
    "So the answer must be B.",
    "The answer must be (B).",
    "The answer should be B.",
    "The answer has to be B.",
    "Therefore, the answer would be B.",
    "Answer - B",
    "Answer \u2014 B",
    "The correct option is (B)",
    "Answer: B) Acoustic guitar",
    "Final Answer: (B) Acoustic guitar",
    "**Answer:** B",
    "The correct answer is: B",
    "The answer is option B.",
    # lower case where the letter ends the sentence
    "b",
    "The answer is b.",
    "the answer is b",
    "answer: (b)",
    # a sentence that states the letter
    "I'd go with B",
    "I'd go with option B.",
    "Going with B.",
    "It must be B.",
    "It should be B.",
    "That's B.",
    "That would be B.",
    "So B.",
    "Hence B.",
    "Clearly B.",
    "Not A, not C, not D, so B.",
    "I think it's B.",
    # the letter, then a verdict on it
    "B is correct",
    "B is the right answer.",
    "B would be correct.",
    "B seems correct.",
    "B is the most likely answer.",
    "B fits best.",
    "A and C are wrong; B is correct.",
    # a clause that ends in the letter, a leading letter
    "Both A and C are wrong; B.",
    "B, because the strings are plucked.",
    "B. The strings are plucked.",
    "B\n\nThe strings are plucked.",
    # the option quoted by its text
    "The instrument is an acoustic guitar.",
    '"Acoustic guitar"',
    # think blocks: the answer is read, not the reasoning that weighs the options
    "<think>The timbre is plucked strings, so not piano.</think>\nB",
    "<think>Plucked strings, not a piano.</think><answer>The answer is B.</answer>",
    "<think>Could be A or C? No.</think>\n<answer>B</answer>",
    "<think>Not the drums.</think> Acoustic guitar",
]

# Answers that name no option by letter (and none by text): a capital or an article that starts words, a
# letter that is a note, a key or a side, a negated or hedged letter, and think blocks that never answer
NAMES_NONE = [
    "A minor key",
    "I think a guitar plays",
    "Beats per minute: 120",
    "The answer is unclear.",
    "The answer is a guitar of some kind.",
    "The answer must be a string instrument.",
    "So the answer must be a plucked instrument.",
    "The answer is a",  # cut by the token limit mid-sentence
    "Answer: a bright timbre",
    "the answer is b-flat",
    "It's A cappella.",
    "The song is in A minor.",
    "This is B flat.",
    "The key is B flat major.",
    "The notes are E, G, B.",
    "So it is in E.",
    "That is, C major.",
    "Hence, a harp.",
    "Side B of the record.",
    "I don't think it's B.",
    "The answer is not B.",
    "B is not correct.",
    "B is wrong.",
    "Either B or C.",
    "The answer is B or C.",
    "Options: a",
    "the answers.",
    "I cannot tell from the audio.",
    "<think>It could be B.</think>",  # stopped after thinking: no answer came
    "<think>B sounds plucked, so the answer must be B",  # cut while thinking
]


def test_phrasings_of_a_letter_name_that_letter():
    misread = {a: parse_choice(a, CHOICES) for a in NAMES_B}
    misread = {a: p for a, p in misread.items() if (p.index, p.status) != (1, "ok")}
    assert len(NAMES_B) >= 30 and not misread


def test_answers_that_state_no_letter_name_no_option():
    misread = {a: p for a in NAMES_NONE if (p := parse_choice(a, CHOICES)).index is not None}
    assert len(NAMES_NONE) >= 20 and not misread


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("The answer is a.", ChoiceParse(0, "ok", "answer_is")),  # a full stop: the letter, not an article
        ("I think the answer is c", ChoiceParse(2, "ok", "answer_is")),
        ("the answer is b, i think", ChoiceParse(None, "unparsed", "")),  # lower case ends no sentence there
        ("So the answer must be B or C.", ChoiceParse(None, "ambiguous", "answer_is")),
        ("So the answer must be B. No, the answer must be C.", ChoiceParse(2, "ok", "answer_is")),  # the last
        ("<think>The answer is C.</think><answer>B</answer>", ChoiceParse(1, "ok", "bare")),
    ],
)
def test_edges_of_the_new_phrasings(answer, expected):
    assert parse_choice(answer, CHOICES) == expected


def test_a_label_is_read_from_the_answer_not_the_thinking():
    labels = ["rock", "jazz", "blues"]
    assert parse_label("<think>Not rock; the swing says jazz? No.</think><answer>Blues</answer>", labels) == (
        ChoiceParse(2, "ok", "text")
    )
