"""Review round 8 of evaluation: audio found by name where several downloads of one video lie side by side; the
paper's numbers beside runs scored the same way only."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from release_fixtures import make_musdb18_lyrics, make_music_avqa, make_musiccaps
from test_eval_release_formats import REPO, _bench, _run

from musicflamingo.eval import BenchmarkError
from musicflamingo.eval.report import paper_comparison


def test_musiccaps_clip_of_another_start_is_not_taken_for_the_asked_one(tmp_path):
    """A folder holding the same video cut at two other starts ("<ytid>_0", "<ytid>_60") gave the first of them
    to a row asking for start 30 (by ytid alone): a wrong clip, scored silently. With several starts and none
    matching, the row is given no clip of that video (the missing file is then named); one clip still serves."""
    root = make_musiccaps(tmp_path / "musiccaps")
    items = {it.id: it for it in _bench("musiccaps", root).items}
    asked = Path(items["-0Gj8-vB1q4_30"].audio)
    ytid = "-0Gj8-vB1q4"
    for start in (0, 60):
        shutil.copy(asked, asked.with_name(f"{ytid}_{start}.wav"))
    asked.unlink()
    with pytest.raises(BenchmarkError, match=f"1 of 5 audio files not found .*{ytid}.wav"):
        _bench("musiccaps", root)
    # one clip of the video under another start: still the clip of that row (downloaders round starts)
    asked.with_name(f"{ytid}_60.wav").unlink()
    audio = Path({it.id: it for it in _bench("musiccaps", root).items}["-0Gj8-vB1q4_30"].audio)
    assert audio.name == f"{ytid}_0.wav"


def test_musiccaps_plain_ytid_file_wins_over_other_starts(tmp_path):
    root = make_musiccaps(tmp_path / "musiccaps")
    items = {it.id: it for it in _bench("musiccaps", root).items}
    asked = Path(items["-0Gj8-vB1q4_30"].audio)
    ytid = "-0Gj8-vB1q4"
    for name in (f"{ytid}_0.wav", f"{ytid}_60.wav", f"{ytid}.wav"):
        shutil.copy(asked, asked.with_name(name))
    asked.unlink()
    audio = Path({it.id: it for it in _bench("musiccaps", root).items}["-0Gj8-vB1q4_30"].audio)
    assert audio.name == f"{ytid}.wav"


@pytest.mark.parametrize(
    "benchmark,label,changed",
    [
        ("musdb18_lyrics", "MUSDB18 lyrics (WER)", {"unit": "line"}),
        ("music_avqa", "MusicAVQA", {"modalities": None}),
        ("music_avqa", "MusicAVQA", {"modalities": ["Audio", "Audio-Visual"]}),
    ],
)
def test_paper_number_not_beside_another_unit_or_question_set(tmp_path, benchmark, label, changed):
    """MUSDB18 scored line by line (`unit=line`) or MusicAVQA with its visual questions (`modalities=null`) got
    the paper's whole-song WER / audio-question accuracy beside them as if comparable. The settings are recorded
    in results.json and a paper number needs the release's own; a single value is a list of one, as the readers
    take it."""
    bench = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "benchmark" / f"{benchmark}.yaml"))
    root = (make_musdb18_lyrics if benchmark == "musdb18_lyrics" else make_music_avqa)(tmp_path / benchmark)
    results = _run(benchmark, root, defaultdict(str))
    settings = results["settings"]
    assert {k: settings[k] for k in changed} == {k: bench[k] for k in changed}

    def labels(**override):
        return [r["label"] for r in paper_comparison(results | {"settings": settings | override})]

    assert label in labels()
    assert label not in labels(**changed)
    if benchmark == "music_avqa":
        assert label in labels(modalities="Audio")


@pytest.mark.parametrize("language", ["ja", "th", "Japanese", "my"])
def test_lyrics_in_languages_without_word_spaces_are_scored_with_cer(language):
    """A Japanese or Thai line has no spaces: WER counted one wrong character as the whole line wrong. The
    benchmarks' cer_languages and the code's default agree."""
    from musicflamingo.eval.metrics import CER_LANGUAGES, uses_cer

    assert uses_cer(language, CER_LANGUAGES)
    for name in ("jamendolyrics", "lyrics", "musdb18_lyrics", "opencpop"):
        listed = OmegaConf.load(REPO / "configs" / "benchmark" / f"{name}.yaml").cer_languages
        assert list(listed) == list(CER_LANGUAGES), name
