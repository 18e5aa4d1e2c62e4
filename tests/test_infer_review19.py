"""Review round 19, infer.py journey: captioning a folder into output= and rerunning it.

An answer cut at the end of the model's context (its prompt left fewer positions than max_new_tokens) was recorded
as cut at max_new_tokens, so a rerun under another limit asked it again for the same answer; and the batch's warning
told the researcher to raise max_new_tokens, which cannot lengthen it.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from test_infer_review6 import make_cfg
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingoProcessor
from musicflamingo.chat import conversation
from musicflamingo.inference import InferenceError, _read_items, infer

ROOM = 5  # answer positions the short context leaves after the prompt


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("audio")
    return [
        str(write_audio(d / f"{name}.wav", make_tone(freq, 1.0))) for name, freq in (("a", 440), ("b", 330))
    ]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory, songs) -> Path:
    """A tiny checkpoint whose context ends ROOM positions after the prompt of "Key?" about a 1-s song."""
    probe = write_tiny_checkpoint(tmp_path_factory.mktemp("probe") / "tiny")
    processor = MusicFlamingoProcessor.from_pretrained(probe)
    n = processor.apply_chat_template([conversation("Key?", songs[0], None)])["input_ids"].shape[-1]
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "short", text={"max_position_embeddings": n + ROOM}
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_cut_by_the_context_are_reused_under_any_limit_that_does_not_cut_them_sooner(
    short_context, songs, tmp_path, caplog
):
    out = tmp_path / "answers.jsonl"
    base = [f"ckpt={short_context}", f"audio=[{songs[0]},{songs[1]}]", "prompt=Key?", f"output={out}"]
    with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
        first = infer(make_cfg(*base, "max_new_tokens=20"), out=io.StringIO())
    # the tiny random model never stops by itself: the context ends both answers, and the rows say so
    rows = _rows(out)
    assert [(r.get("cut"), r.get("new_tokens"), "max_new_tokens" in r) for r in rows] == [
        ("context", ROOM, False)
    ] * 2
    warned = caplog.text
    assert "2 of 2 answers ended at the end of the model's context" in warned, warned
    assert "raise max_new_tokens" not in warned and "max_new_tokens=20" not in warned, warned

    # another limit that leaves the answers as they are reads them back: nothing asked, nothing written
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="musicflamingo.inference"):
        assert infer(make_cfg(*base, "max_new_tokens=50"), out=io.StringIO()) == first
        assert infer(make_cfg(*base, f"max_new_tokens={ROOM}"), out=io.StringIO()) == first
    assert len(_rows(out)) == 2 and caplog.text.count("nothing to ask") == 2, caplog.text

    # a smaller limit cuts them sooner: asked again, and those rows name their limit
    shorter = infer(make_cfg(*base, "max_new_tokens=2"), out=io.StringIO())
    assert all(a != b and b.startswith(a) for a, b in zip(shorter, first)), (shorter, first)
    assert [r.get("max_new_tokens") for r in _rows(out)] == [None, None, 2, 2]
    assert infer(make_cfg(*base[:3], "max_new_tokens=2"), out=io.StringIO()) == shorter


def test_a_context_cut_row_with_a_bad_length_is_not_reused(short_context, songs, tmp_path):
    """A hand-edited row saying "cut": "context" without a usable `new_tokens` cannot show it is this run's answer:
    kept in the file, asked again."""
    out = tmp_path / "answers.jsonl"
    row = {"audio": songs[0], "prompt": "Key?", "answer": "C major", "cut": "context", "new_tokens": "5"}
    out.write_text(json.dumps(row) + "\n")
    (answer,) = infer(
        make_cfg(
            f"ckpt={short_context}", f"audio={songs[0]}", "prompt=Key?", f"output={out}", "max_new_tokens=20"
        ),
        out=io.StringIO(),
    )
    assert answer != "C major" and [r["answer"] for r in _rows(out)] == ["C major", answer]


# ---------------------------------------------------------------------------------------------- items.jsonl fields
@pytest.mark.parametrize(
    ("field", "meant"),
    [("qustion", "prompt"), ("questoin", "prompt"), ("instructions", "prompt"), ("filepth", "audio")],
)
def test_a_misspelt_other_name_of_an_item_field_is_refused(tmp_path, field, meant):
    """`{"audio": ..., "qustion": "What key?"}`: "question" was refused by name, its misspelling taken for an id
    field and ignored, so the item was asked the default caption prompt, silently. Id fields near those names stay
    the researcher's."""
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"audio": "a.wav", field: "What key?"}) + "\n")
    with pytest.raises(
        InferenceError, match=rf"items\.jsonl:1: unknown field '{field}' \(did you mean {meant}\?\)"
    ):
        _read_items(str(items), check=False)
    ids = {"song_id": 7, "title": "x", "query_id": 1, "file_id": 3, "path_id": 4}
    items.write_text(json.dumps({"audio": "a.wav", "prompt": "Key?", **ids}) + "\n")
    assert _read_items(str(items), check=False) == [(str(tmp_path / "a.wav"), "Key?", f"{items}:1", ids)]


# ---------------------------------------------------------------------------------------------- progress
def test_headers_say_where_each_answer_stands_in_the_run(short_context, songs, tmp_path):
    """A folder of hundreds of songs printed "== a.wav ==" headers only: nothing said how far the run was. Each
    header now says its input's place in the whole run, a resumed run's included; a single song's header is bare."""
    out = tmp_path / "answers.jsonl"
    row = {"audio": songs[0], "prompt": "Key?", "answer": "C major"}
    out.write_text(json.dumps(row) + "\n")
    base = [f"ckpt={short_context}", "prompt=Key?", "max_new_tokens=2"]
    printed = io.StringIO()
    infer(make_cfg(*base, f"audio=[{songs[0]},{songs[1]},{songs[0]}]", f"output={out}"), out=printed)
    headers = [line for line in printed.getvalue().splitlines() if line.startswith("== ")]
    # the first input was answered before: the others keep their places in the run
    # (each followed by the time so far and left once an answer is done: test_infer_review20)
    assert [h.split(" elapsed ")[0] for h in headers] == [
        f"== {songs[1]} == [2/3]",
        f"== {songs[0]} == [3/3]",
    ], printed.getvalue()
    printed = io.StringIO()
    infer(make_cfg(*base, f"audio={songs[1]}"), out=printed)
    assert printed.getvalue().startswith(f"== {songs[1]} ==\n"), printed.getvalue()
