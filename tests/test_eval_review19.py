"""Review round 19 of the benchmark journey: a letter after a lead-in ("Based on the audio, B.") is that letter
(MuChoMusic's own parser read it, ours left it unparsed), beside the look-alikes that must stay unparsed or
ambiguous; a Jam-ALT run with `limit` begun on metadata.csv resumes on metadata.jsonl with the same songs; a
benchmark.audio_dir set to the clips' own folder is named as such; the console line shows MuChoMusic's own
parser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from release_fixtures import make_mmau, make_muchomusic
from test_eval_release_formats import _bench, _cfg
from test_eval_review18 import REVISED, _songs, make_jam_alt_v12

from musicflamingo.eval import BenchmarkError, evaluate, headline
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
    # "(B)" is read by the bracket rule (letter) before the lead-in rule (claim)
    assert parse_choice(answer, CHOICES) == ChoiceParse(1, "ok", "letter" if "(B)" in answer else "claim")


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


# ---- Jam-ALT: a limited run begun on metadata.csv, resumed on metadata.jsonl ----------------------------------
def _jam_alt_csv_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A Jam-ALT v1.0 folder (metadata.csv + audio/ + lyrics/) and the v1.2 files to add to it, whose
    metadata.jsonl lists the songs in the reverse order of the CSV (v1.2 lists them by language subset)."""
    v12 = make_jam_alt_v12(tmp_path)
    rows = (v12 / "metadata.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (v12 / "metadata.jsonl").write_text("".join(reversed(rows)), encoding="utf-8")
    old = tmp_path / "jam"
    for lang in ("en", "de", "fr", "es"):
        shutil.copytree(v12 / "subsets" / lang / "audio", old / "audio", dirs_exist_ok=True)
    (old / "lyrics").mkdir()
    for name, text in REVISED.items():
        (old / "lyrics" / f"{name}.txt").write_text(text, encoding="utf-8")
    shutil.copy(tmp_path / "src" / "JamendoLyrics.csv", old / "metadata.csv")
    return old, v12


def test_jam_alt_limited_run_resumes_on_metadata_jsonl_with_the_same_songs(tmp_path):
    """`limit=2` begun on metadata.csv, resumed with `limit=2` once metadata.jsonl (another song order) sits
    beside it: the resume took the JSONL's first two songs, asked two songs anew and reported those instead of
    the two finished ones. Now the JSONL's rows keep the CSV's order."""
    old, v12 = _jam_alt_csv_folder(tmp_path)
    csv_order = [Path(song["Filepath"]).stem for song in _songs(tmp_path / "src")]
    asked = []

    def predict(batch):
        asked.extend(it.id for it in batch)
        return [REVISED[it.id] for it in batch]

    evaluate(_cfg("jamendolyrics", old, tmp_path / "out", "limit=2"), predict_fn=predict)
    assert sorted(asked) == sorted(csv_order[:2])
    asked.clear()
    shutil.copytree(v12 / "subsets", old / "subsets")
    shutil.copy(v12 / "metadata.jsonl", old / "metadata.jsonl")
    results = evaluate(_cfg("jamendolyrics", old, tmp_path / "out", "limit=2"), predict_fn=predict)
    assert asked == []  # nothing asked again
    per_item = (tmp_path / "out" / "per_item.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in per_item) == sorted(csv_order[:2])
    assert (
        results["num_items"] == 2
        and json.loads((tmp_path / "out" / "run.json").read_text())["data_file"] == "metadata.jsonl"
    )
    # a fresh limited run on the v1.2 folder asks the same songs as one on the v1.0 table
    evaluate(_cfg("jamendolyrics", old, tmp_path / "fresh", "limit=2"), predict_fn=predict)
    assert sorted(asked) == sorted(csv_order[:2])


# ---- benchmark.audio_dir set to the clips' own folder ----------------------------------------------------------
def test_audio_dir_set_to_the_clips_folder_says_where_the_clips_belong(tmp_path):
    """MMAU's audio_id is "./test-mini-audios/<id>.wav", read below benchmark.audio_dir: set to the folder of the
    clips themselves, every clip was "not found" at <audio_dir>/test-mini-audios/<id>.wav with no word on why."""
    root = make_mmau(tmp_path / "mmau")
    (root / "test-mini-audios").rename(tmp_path / "clips")
    with pytest.raises(BenchmarkError) as e:
        _bench("mmau", root, f"benchmark.audio_dir={tmp_path / 'clips'}")
    clip = next((tmp_path / "clips").iterdir())
    assert f"a file of that name is at {tmp_path / 'clips'}/" in str(e.value)
    assert f"the clips belong in {tmp_path / 'clips' / 'test-mini-audios'}/" in str(e.value)
    # a clip simply missing gets no such hint
    (tmp_path / "clips").rename(root / "test-mini-audios")
    (root / "test-mini-audios" / clip.name).unlink()
    with pytest.raises(BenchmarkError, match="1 of .* audio files not found") as e:
        _bench("mmau", root)
    assert "a file of that name" not in str(e.value)


# ---- the console line ----------------------------------------------------------------------------------------
def test_headline_shows_muchomusics_own_parser_where_there_is_one(tmp_path):
    """eval.py's console line left out `accuracy_official` (MuChoMusic's own parser, the number its authors
    report), so a MuChoMusic run printed only our two rules; other benchmarks have no such number to print."""
    root = make_muchomusic(tmp_path / "mc")

    def predict(batch):  # the answer's text, lowercased: MuChoMusic's substring fallback reads it
        return [it.answer.lower() for it in batch]

    results = evaluate(_cfg("muchomusic", root, tmp_path / "out"), predict_fn=predict)
    official = results["tasks"]["mcq"]["accuracy_official"]
    assert f"accuracy_official={official:.4f}" in headline(results)
    mmau = evaluate(_cfg("mmau", make_mmau(tmp_path / "mmau"), tmp_path / "out2"), predict_fn=predict)
    assert "accuracy_official" not in headline(mmau) and "accuracy_mmau=" in headline(mmau)
