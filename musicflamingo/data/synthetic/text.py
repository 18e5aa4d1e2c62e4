"""Captions and four-option multiple-choice questions for a clip, as JSONL conversation records.

Record layout (one JSON object per line, ``audio`` relative to the manifest's folder)::

    {"id": "train-00003-caption", "audio": "audio/train-00003.wav", "task": "caption",
     "conversations": [{"role": "user", "content": "<sound>Describe the track."},
                       {"role": "assistant", "content": "A solo violin ... at 120 BPM. ..."}],
     "meta": {...ground truth...}}
    {"id": "train-00003-tempo", ..., "task": "mcq", "question_type": "tempo",
     "choices": ["160 BPM", "60 BPM", "120 BPM", "90 BPM"], "answer": "120 BPM", "answer_letter": "C",
     "conversations": [{"role": "user", "content": "<sound>What is the tempo of this track?\\n(A) 160 BPM (B) ..."},
                       {"role": "assistant", "content": "120 BPM"}]}

For training, :func:`chat_record` folds one clip's questions into one multi-turn conversation
(``<split>_chat.jsonl``): the clip is encoded once for four supervised answers instead of once per answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from musicflamingo.chat import AUDIO_PLACEHOLDER, format_options
from musicflamingo.data.synthetic.theory import (
    INSTRUMENT_FAMILIES,
    TEMPO_BUCKETS,
    TIME_SIGNATURES,
    Key,
    key_distractors,
)

CAPTION_PROMPT = "Describe the track."
LETTERS = "ABCD"
NUM_OPTIONS = len(LETTERS)
QUESTION_TYPES = ("key", "tempo", "time_signature", "instrument_family")
QUESTIONS = {
    "key": "What is the key of this piece?",
    "tempo": "What is the tempo of this track?",
    "time_signature": "What is the time signature of this piece?",
    "instrument_family": "Which instrument family plays this piece?",
}
# The answer is the option's text: that is what the audio tells. A letter would add a lookup in the prompt that a
# small model trained from scratch learns late; both scoring rules of eval.py read the option text.
ANSWER_INSTRUCTION = "Answer with the option."


def caption(meta: dict[str, Any]) -> str:
    """One fixed-order sentence stating the four facts a listener can hear (a small model learns it faster;
    the source piece and progression stay in ``meta``: they are not in the audio's reach of a 4-6 s clip)."""
    return (
        f"A solo {meta['instrument_label']} ({meta['instrument_family'].lower()} family) plays in {meta['key']}, "
        f"in {meta['time_signature']} time at {meta['tempo_bpm']} BPM."
    )


def mcq_choices(
    meta: dict[str, Any], question_type: str, rng: np.random.Generator, answer_position: int | None = None
) -> tuple[list[str], str]:
    """Four distinct options and the correct one, which sits at ``answer_position`` (0-3; random when None)
    with the distractors in random order around it. Distractors are well separated: other tempo buckets,
    other metres, other instrument families, and keys from :func:`key_distractors`."""
    if question_type == "key":
        key = Key.parse(meta["key"])
        answer = key.name
        options = [answer] + [k.name for k in key_distractors(key, rng, NUM_OPTIONS - 1)]
    elif question_type == "tempo":
        answer = f"{meta['tempo_bpm']} BPM"
        options = [f"{b} BPM" for b in TEMPO_BUCKETS]
    elif question_type == "time_signature":
        answer = meta["time_signature"]
        options = list(TIME_SIGNATURES)
    elif question_type == "instrument_family":
        answer = meta["instrument_family"]
        others = [f for f in INSTRUMENT_FAMILIES if f != answer]
        picks = rng.choice(len(others), size=NUM_OPTIONS - 1, replace=False)
        options = [answer] + [others[int(i)] for i in picks]
    else:
        raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
    if answer not in options or len(set(options)) != NUM_OPTIONS:
        raise ValueError(
            f"{question_type}: answer {answer!r} must be one of {NUM_OPTIONS} distinct {options}"
        )
    wrong = [options[int(i)] for i in rng.permutation(NUM_OPTIONS) if options[int(i)] != answer]
    pos = int(rng.integers(NUM_OPTIONS)) if answer_position is None else answer_position
    if not 0 <= pos < NUM_OPTIONS:
        raise ValueError(f"answer_position must be in 0..{NUM_OPTIONS - 1}, got {answer_position}")
    return wrong[:pos] + [answer] + wrong[pos:], answer


def clip_records(
    clip_id: str,
    audio: str,
    meta: dict[str, Any],
    rng: np.random.Generator,
    answer_positions: dict[str, int] | None = None,
) -> list[dict]:
    """The caption record and one MCQ record per question type for one clip; ``answer_positions`` maps a
    question type to the index of the correct option (random where missing)."""

    def conv(user: str, assistant: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": AUDIO_PLACEHOLDER + user},
            {"role": "assistant", "content": assistant},
        ]

    records = [
        {
            "id": f"{clip_id}-caption",
            "audio": audio,
            "task": "caption",
            "conversations": conv(CAPTION_PROMPT, caption(meta)),
            "meta": meta,
        }
    ]
    for qt in QUESTION_TYPES:
        choices, answer = mcq_choices(meta, qt, rng, (answer_positions or {}).get(qt))
        letter = LETTERS[choices.index(answer)]
        # One line of options, "(A) 60 BPM (B) 90 BPM ...", unlike the one-per-line layout of eval prompts.
        prompt = f"{QUESTIONS[qt]}\n{format_options(choices, sep=' ')}\n{ANSWER_INSTRUCTION}"
        records.append(
            {
                "id": f"{clip_id}-{qt}",
                "audio": audio,
                "task": "mcq",
                "question_type": qt,
                "choices": choices,
                "answer": answer,
                "answer_letter": letter,
                "conversations": conv(prompt, answer),
                "meta": meta,
            }
        )
    return records


def chat_record(clip_id: str, records: list[dict], rng: np.random.Generator) -> dict:
    """One clip's MCQ records (from :func:`clip_records`) as one multi-turn conversation, questions in random
    order. Only the first user turn carries ``<sound>``: the clip is encoded once for all four answers.

    The caption is not a turn here (the corpus writes it as a conversation of its own): from-scratch runs of the
    main job's model with a caption turn last stayed at chance for 150-250 steps while the audio tower's
    gradient died out. Its facts repeat the answers, so every fact after the first answer can be copied from
    the turns before it: the loss rewards copying rather than listening.
    """
    mcq = [r for r in records if r["task"] == "mcq"]
    if not mcq:
        raise ValueError(f"{clip_id}: expected MCQ records, got tasks {[r['task'] for r in records]}")
    order = [mcq[int(i)] for i in rng.permutation(len(mcq))]
    conversations = []
    for k, r in enumerate(order):
        user, assistant = r["conversations"]
        content = user["content"] if k == 0 else user["content"].replace(AUDIO_PLACEHOLDER, "")
        conversations += [{"role": "user", "content": content}, dict(assistant)]
    return {
        "id": f"{clip_id}-chat",
        "audio": order[0]["audio"],
        "task": "chat",
        "question_types": [r["question_type"] for r in order],
        "conversations": conversations,
        "meta": order[0]["meta"],
    }
