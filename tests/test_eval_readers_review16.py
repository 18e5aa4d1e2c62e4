"""Review round 16, eval readers journey: benchmark readers checked against the releases' own files and loaders.

Rows quoted here are verbatim from the public releases (source named at each fixture)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from release_fixtures import make_musiccaps, tone

from musicflamingo.eval import BenchmarkError, build_benchmark
from musicflamingo.eval.parsing import parse_choice

REPO = Path(__file__).resolve().parents[1]

# github.com/GeWu-Lab/MUSIC-AVQA data/json_update/avqa-test.json (question_ids 95, 1294, 3952): the Visual and
# Audio-Visual templates use <LR>, <FL>, <TH>, <LL>, ... slots beside <Object>, all filled from templ_values in
# order (net_grd_avst/dataloader_avst.py replaces each word holding "<" with the next value).
AVQA_ROWS = [
    {
        "video_id": "00000045",
        "question_id": 95,
        "type": '["Audio-Visual", "Comparative"]',
        "question_content": "Is the instrument on the <LR> more rhythmic than the instrument on the <LR>?",
        "templ_values": '["right", "left"]',
        "question_deleted": 0,
        "anser": "yes",
    },
    {
        "video_id": "00000208",
        "question_id": 1294,
        "type": '["Visual", "Location"]',
        "question_content": "What is the instrument on the <LR> of <Object>?",
        "templ_values": '["left", "saxophone"]',
        "question_deleted": 0,
        "anser": "saxophone",
    },
    {
        "video_id": "00002951",
        "question_id": 3952,
        "type": '["Audio-Visual", "Comparative"]',
        "question_content": "Is the <Object> on the <LR> more rhythmic than the <Object> on the <LR>?",
        "templ_values": '["banjo", "left", "acoustic_guitar", "right"]',
        "question_deleted": 0,
        "anser": "no",
    },
]


def _avqa(root: Path, rows: list[dict]) -> dict:
    path = root / "data" / "json_update" / "avqa-test.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rows, indent=4))
    for r in rows:
        tone(root / "data" / "audio" / f"{r['video_id']}.wav")
    return {
        "name": "music_avqa",
        "format": "music_avqa",
        "root": str(root),
        "split": "test",
        "modalities": None,
    }


def test_music_avqa_fills_every_template_slot_in_order(tmp_path):
    bench = build_benchmark(_avqa(tmp_path, AVQA_ROWS))
    questions = {it.id: it.meta["question"] for it in bench.items}
    assert questions == {
        "95": "Is the instrument on the right more rhythmic than the instrument on the left?",
        "1294": "What is the instrument on the left of saxophone?",
        "3952": "Is the banjo on the left more rhythmic than the acoustic guitar on the right?",
    }
    assert all("<" not in it.prompt for it in bench.items)


def test_music_avqa_slot_count_mismatch_names_the_row(tmp_path):
    rows = [dict(AVQA_ROWS[2], templ_values='["banjo", "left"]')]
    with pytest.raises(BenchmarkError, match=r"avqa-test\.json.*templ_values.*2 value.*4 slot"):
        build_benchmark(_avqa(tmp_path, rows))


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("type", "[]", "type"), ("type", '"Audio"', "type"), ("question_deleted", "no", "question_deleted")],
)
def test_music_avqa_malformed_row_names_file_and_field(tmp_path, field, value, named):
    rows = [dict(AVQA_ROWS[0], **{field: value})]
    with pytest.raises(BenchmarkError, match=rf"avqa-test\.json record 1\b.*'{named}'"):
        build_benchmark(_avqa(tmp_path, rows))


@pytest.mark.parametrize(("start", "end"), [("nan", "10"), ("30", "inf"), ("-5", "5"), ("40", "30")])
def test_musiccaps_bad_start_end_names_the_row(tmp_path, start, end):
    root = make_musiccaps(tmp_path / "mc")
    path = root / "musiccaps-public.csv"
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows[1].update(start_s=start, end_s=end)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    cfg = {"name": "musiccaps", "format": "musiccaps", "root": str(root), "segment": True}
    with pytest.raises(BenchmarkError, match=r"musiccaps-public\.csv:\d+: start_s/end_s"):
        build_benchmark(cfg)


# github.com/Sakshi113/MMAU mmau-test-mini.json (commit 110127f): 10 of its ~330 music questions have options that
# are single letters (chord and note names), e.g. b11438e7-7867-429e-9a45-b35c2642a75c ("What is the root chord
# that starts at 10.14 seconds?", answer "D") and 56c7b462-6f24-4572-ba96-21731f1c3d67 (answer "E"); speech item
# 2d861e76-cb19-4178-8eaa-137c892a5d84 has the option "a". An unbracketed "D" there is the letter D *or* the
# option whose text is "D": it names two options, so it is ambiguous (it was read as letter D, silently).
ROOT_CHORD = ["G", "A#", "D", "E"]
TONIC = ["G", "D", "E", "C"]


@pytest.mark.parametrize(
    ("answer", "choices"),
    [
        ("D", ROOT_CHORD),
        ("D.", ROOT_CHORD),
        ("The answer is C", TONIC),
        ("Answer: C", TONIC),
        ("C\n\nThe tonic chord is C.", TONIC),
        ("a", ["twenty-one", "Berman's", "said", "a"]),
    ],
)
def test_unbracketed_letter_that_is_also_an_option_text_is_ambiguous(answer, choices):
    parsed = parse_choice(answer, choices)
    assert (parsed.index, parsed.status) == (None, "ambiguous")


@pytest.mark.parametrize(
    ("answer", "choices", "index"),
    [
        ("(D)", ROOT_CHORD, 3),  # brackets: a letter
        ("D)", ROOT_CHORD, 3),
        ("The answer is (C)", TONIC, 2),
        ("Answer: C. E", TONIC, 2),  # the letter, then its own option's text
        ("C\n\nThe tonic chord is E.", TONIC, 2),
        ("(C) D", ROOT_CHORD, 2),
        ("D", ["A", "B", "C", "D"], 3),  # letter and text name the same option
        ("E", TONIC, 2),  # no option E: the text
        ("B", ["piano", "guitar"], 1),
    ],
)
def test_letter_reading_kept_where_only_one_option_is_named(answer, choices, index):
    parsed = parse_choice(answer, choices)
    assert (parsed.index, parsed.status) == (index, "ok")
