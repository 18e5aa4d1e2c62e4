"""Review round 17, infer.py and serve.py: a researcher captions a folder and serves the model.

infer.py over a folder with an unreadable file (skip_bad_audio=false): the answers already being decoded when the
bad file was reached were dropped with the batch (the files before it, prefilled, were never written to output=);
they finish and are written first now, the error names the file and says how to skip it, and a rerun asks only
the rest.

infer.py output=: an answer cut at max_new_tokens was reused by a rerun with a larger limit ("already
answered"): a quick test run's truncated captions became the real run's.

serve.py: audio a few hundredths of a second over `max_audio_seconds` was refused as "1200.0 s long, over the
limit of 1200 s".
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
from test_infer import audios, ckpt, loaded, make_cfg  # noqa: F401
from tiny_assets import make_tone, write_audio

from musicflamingo import inference
from musicflamingo.audio.io import AudioError
from musicflamingo.inference import infer
from musicflamingo.serve.audio import check_duration, open_bytes
from musicflamingo.serve.errors import APIError


@pytest.fixture
def once(loaded, monkeypatch):  # noqa: F811
    """infer() runs on the module's loaded model instead of loading the checkpoint at every call."""
    monkeypatch.setattr(inference, "load_model", lambda *args, **kwargs: loaded)


# ---------------------------------------------------------------------------------------------- infer.py
def test_a_bad_file_in_a_folder_keeps_the_answers_started_before_it(ckpt, audios, once, tmp_path):  # noqa: F811
    folder = tmp_path / "music"
    folder.mkdir()
    for k, name in enumerate(("a.wav", "b.wav", "d.wav")):
        shutil.copy(audios[k % len(audios)], folder / name)
    (folder / "c.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")  # sorted third
    out = tmp_path / "answers.jsonl"
    base = [f"ckpt={ckpt}", f"audio={folder}", f"output={out}", "max_new_tokens=3"]
    printed = io.StringIO()
    with pytest.raises(AudioError) as e:
        infer(make_cfg(*base), out=printed)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # a.wav and b.wav were prefilled when c.wav failed: their answers are kept, d.wav was never started
    assert [r["audio"].rsplit("/", 1)[-1] for r in rows] == ["a.wav", "b.wav"]
    assert str(e.value).startswith(str(folder / "c.wav") + ": ") and "skip_bad_audio=true" in str(e.value)
    assert "== " + str(folder / "a.wav") in printed.getvalue() and "c.wav" not in printed.getvalue()

    (folder / "c.wav").unlink()
    again = infer(make_cfg(*base), out=io.StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["audio"].rsplit("/", 1)[-1] for r in rows] == ["a.wav", "b.wav", "d.wav"]  # only d.wav asked
    fresh = infer(make_cfg(*base[:2], "max_new_tokens=3"), out=io.StringIO())
    assert again == fresh  # the kept answers are the ones an uninterrupted run gives


def test_answers_cut_at_the_token_limit_are_not_reused_under_another(ckpt, audios, once, tmp_path):  # noqa: F811
    """A quick run with max_new_tokens=2 into answers.jsonl, then the real one with a larger limit: the 2-token
    answers were reused as "already answered" for every input; a cut row names its limit now and only a run with
    the same limit reuses it (the row stays in the file)."""
    out = tmp_path / "answers.jsonl"
    base = [f"ckpt={ckpt}", f"audio=[{audios[0]},{audios[1]}]", f"output={out}", "stream=false"]
    quick = infer(make_cfg(*base, "max_new_tokens=2"), out=io.StringIO())
    longer = infer(make_cfg(*base, "max_new_tokens=5"), out=io.StringIO())
    assert all(a != b and a.startswith(b) for a, b in zip(longer, quick)), (longer, quick)  # asked again
    assert longer == infer(make_cfg(*base[:2], "max_new_tokens=5"), out=io.StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # the tiny random model never stops by itself: every answer is cut, and its row says at which limit
    assert [r["max_new_tokens"] for r in rows] == [2, 2, 5, 5]
    # the same limit reads its own rows back, asking nothing
    assert infer(make_cfg(*base, "max_new_tokens=5"), out=io.StringIO()) == longer
    assert len(out.read_text().splitlines()) == 4


# ---------------------------------------------------------------------------------------------- serve.py
def test_audio_just_over_the_limit_reads_as_over_it(tmp_path):
    """A song a few hundredths of a second over `max_audio_seconds` was "3.0 s long, over the limit of 3 s" (a
    20:00.04 song: "1200.0 s long, over the limit of 1200 s"); the length has the decimals that show it is over."""
    raw = write_audio(tmp_path / "a.wav", make_tone(440, 3.04)).read_bytes()
    with pytest.raises(APIError) as e:
        open_bytes(raw, "wav", 3.0, "messages[0].content[0].input_audio.data")
    err = e.value.body()["error"]
    assert err["code"] == "audio_too_long" and err["param"] == "messages[0].content[0].input_audio.data"
    assert "the audio is 3.04 s long, over the limit of 3 s" in err["message"], err
    with pytest.raises(APIError, match=r"3\.5 s long, over the limit of 3 s"):
        check_duration(3.5, 3.0, "x")
    check_duration(3.0000001, 3.0, "x")  # within the resampler's rounding: not over
