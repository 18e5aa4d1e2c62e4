"""Review round 8 of evaluation: audio found by name where several downloads of one video lie side by side."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from release_fixtures import make_musiccaps
from test_eval_release_formats import _bench

from musicflamingo.eval import BenchmarkError


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
